// Shared device helpers for every kernel file. Included once per file; everything is
// `static inline` so the unity build (all kernels in one translation unit) links.
#pragma once
#include <cuda_bf16.h>
#include <stdint.h>

namespace horizon {

// Eight bf16 values in one 16-byte load.
struct alignas(16) Bf16x8 {
  __nv_bfloat162 h[4];
};

static __device__ __forceinline__ bool aligned16(const void* p) {
  return (reinterpret_cast<uintptr_t>(p) & 15u) == 0;
}

static __device__ __forceinline__ void unpack8(const Bf16x8& v, float out[8]) {
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    float2 f = __bfloat1622float2(v.h[i]);
    out[2 * i] = f.x;
    out[2 * i + 1] = f.y;
  }
}

static __device__ __forceinline__ Bf16x8 pack8(const float in[8]) {
  Bf16x8 v;
#pragma unroll
  for (int i = 0; i < 4; ++i) v.h[i] = __floats2bfloat162_rn(in[2 * i], in[2 * i + 1]);
  return v;
}

// Sum over the block; every thread gets the total. `red` holds >= 32 floats of shared memory.
// The leading barrier makes back-to-back calls with the same `red` safe.
static __device__ __forceinline__ float block_sum(float v, float* red) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = (blockDim.x + 31) >> 5;
  __syncthreads();
  if (lane == 0) red[warp] = v;
  __syncthreads();
  float t = lane < nw ? red[lane] : 0.f;
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) t += __shfl_xor_sync(0xffffffffu, t, o);
  return t;
}

// W-wide vector access for the two element types the kernels take (16 bytes per access).
template <typename T>
struct Vec;
template <>
struct Vec<__nv_bfloat16> {
  static constexpr int W = 8;
  static __device__ __forceinline__ void load(const __nv_bfloat16* p, float f[8]) {
    unpack8(*reinterpret_cast<const Bf16x8*>(p), f);
  }
  static __device__ __forceinline__ void store(__nv_bfloat16* p, const float f[8]) {
    *reinterpret_cast<Bf16x8*>(p) = pack8(f);
  }
  static __device__ __forceinline__ float get(const __nv_bfloat16* p) { return __bfloat162float(*p); }
  static __device__ __forceinline__ void put(__nv_bfloat16* p, float v) { *p = __float2bfloat16_rn(v); }
};
template <>
struct Vec<float> {
  static constexpr int W = 4;
  static __device__ __forceinline__ void load(const float* p, float f[4]) {
    float4 v = *reinterpret_cast<const float4*>(p);
    f[0] = v.x; f[1] = v.y; f[2] = v.z; f[3] = v.w;
  }
  static __device__ __forceinline__ void store(float* p, const float f[4]) {
    *reinterpret_cast<float4*>(p) = make_float4(f[0], f[1], f[2], f[3]);
  }
  static __device__ __forceinline__ float get(const float* p) { return *p; }
  static __device__ __forceinline__ void put(float* p, float v) { *p = v; }
};

static __device__ __forceinline__ float round_bf16(float v) {
  return __bfloat162float(__float2bfloat16_rn(v));
}

}  // namespace horizon
