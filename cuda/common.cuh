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

}  // namespace horizon
