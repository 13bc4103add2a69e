// Host stand-in for the CUDA headers a kernel file includes: just enough of CUDA to compile the
// kernel files with g++ and run them on host_runtime.h (a block = one OS thread running its CUDA
// threads as fibers; tests/cuda_host/). Not on nvcc's include path (the real build never sees it).
#pragma once
#include <algorithm>
#include <atomic>
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <thread>
using std::max;
using std::min;

struct dim3 {
  unsigned x = 0, y = 0, z = 0;
};
// Per OS thread = per block (the runtime sets threadIdx on every fiber switch).
extern thread_local dim3 threadIdx, blockIdx;
extern dim3 gridDim, blockDim;

struct uint4 {
  unsigned x, y, z, w;
};
static inline uint4 make_uint4(unsigned a, unsigned b, unsigned c, unsigned d) { return uint4{a, b, c, d}; }
struct float2 {
  float x, y;
};
struct alignas(16) float4 {
  float x, y, z, w;
};
static inline float4 make_float4(float a, float b, float c, float d) { return float4{a, b, c, d}; }

struct __nv_bfloat16 {
  unsigned short r;
};
struct __nv_bfloat162 {
  __nv_bfloat16 x, y;
};
static inline float __bfloat162float(__nv_bfloat16 h) {
  const uint32_t u = (uint32_t)h.r << 16;
  float f;
  memcpy(&f, &u, 4);
  return f;
}
static inline __nv_bfloat16 __float2bfloat16_rn(float f) {
  if (std::isnan(f)) return __nv_bfloat16{(unsigned short)0x7fc0};
  uint32_t u;
  memcpy(&u, &f, 4);
  u += 0x7fffu + ((u >> 16) & 1u);  // round to nearest even
  return __nv_bfloat16{(unsigned short)(u >> 16)};
}
static inline __nv_bfloat162 __floats2bfloat162_rn(float a, float b) {
  return __nv_bfloat162{__float2bfloat16_rn(a), __float2bfloat16_rn(b)};
}
static inline float2 __bfloat1622float2(__nv_bfloat162 v) { return float2{__bfloat162float(v.x), __bfloat162float(v.y)}; }

#define __device__
#define __global__
#define __forceinline__ inline
#define __noinline__
#define __launch_bounds__(...)
// One OS thread runs one block, so its thread_local statics are that block's shared memory.
// (Dynamic `extern __shared__` arrays are rewritten by tests/cuda_host/hostbuild.py.)
#define __shared__ static thread_local

template <class T>
static inline T __ldg(const T* p) {
  return *p;
}
template <class T>
static inline T __ldcg(const T* p) {
  return *(const volatile T*)p;
}
static inline uint4 __ldcg(const uint4* p) {
  uint4 v;
  memcpy(&v, (const void*)p, 16);
  return v;
}
void __syncthreads();
void __syncwarp(unsigned mask = 0xffffffffu);
float __shfl_xor_sync(unsigned, float v, int o);
int __shfl_xor_sync(unsigned, int v, int o);
int __shfl_up_sync(unsigned, int v, unsigned d);
int __shfl_sync(unsigned, int v, int src);
unsigned __match_any_sync(unsigned, int v);
int __any_sync(unsigned, int pred);
void __nanosleep(unsigned);
static inline int __popc(unsigned v) { return __builtin_popcount(v); }
static inline int __ffs(unsigned v) { return __builtin_ffs((int)v); }
// glibc declares __expf/__logf itself: the intrinsics become the libm calls.
#define __expf(v) std::exp((float)(v))
#define __logf(v) std::log((float)(v))
static inline float rsqrtf(float v) { return 1.f / std::sqrt(v); }
using std::isfinite;
static inline void __threadfence() { std::atomic_thread_fence(std::memory_order_seq_cst); }
static inline void __threadfence_block() { std::atomic_thread_fence(std::memory_order_seq_cst); }
static inline void __threadfence_system() { std::atomic_thread_fence(std::memory_order_seq_cst); }
static inline int atomicAdd(int* p, int v) { return __atomic_fetch_add(p, v, __ATOMIC_SEQ_CST); }
static inline int atomicExch(int* p, int v) { return __atomic_exchange_n(p, v, __ATOMIC_SEQ_CST); }
// %globaltimer: nanoseconds of the host's steady clock (host_runtime.h).
long long host_now_ns();
// Replace the kernels' inline PTX under HORIZON_HOST_MMA: mma.sync.m16n8k16 and
// ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 (host_runtime.h).
void host_mma16816(float c[4], const unsigned a[4], const unsigned b[2]);
void host_ldmatrix_x4_trans(unsigned (&d)[4], const void* row);
