// Rotary position embedding (HF rotate_half convention), bf16, fp32 math.
// For each pair (i, i + D/2) of a row: forward o1 = x1*c1 - x2*s1, o2 = x2*c2 + x1*s2;
// backward (the exact transpose) d1 = g1*c1 + g2*s2, d2 = g2*c2 - g1*s1 (c/s at i and i+D/2).
// Input rows may be strided ([B, S, nh, D].transpose(1, 2) in attention); output is contiguous
// [B, nh, S, D]. out == in is allowed (each thread reads both halves before writing them).
#include "common.cuh"

namespace {
using bf16 = __nv_bfloat16;

template <int W>
static __device__ __forceinline__ void load_w(const bf16* p, float f[W]) {
  if constexpr (W == 8) {
    horizon::Vec<bf16>::load(p, f);
  } else {
#pragma unroll
    for (int j = 0; j < W; ++j) f[j] = __bfloat162float(p[j]);
  }
}

template <int W>
static __device__ __forceinline__ void store_w(bf16* p, const float f[W]) {
  if constexpr (W == 8) {
    horizon::Vec<bf16>::store(p, f);
  } else {
#pragma unroll
    for (int j = 0; j < W; ++j) p[j] = __float2bfloat16_rn(f[j]);
  }
}

template <int W>
static __device__ __forceinline__ void rope_rows(bf16* out, const bf16* in, const bf16* cos, const bf16* sin, int B,
                                                 int NH, int S, int D, long long sb, long long sh, long long ss,
                                                 long long cos_sb, int backward) {
  const int half = D / 2;
  const int nv = half / W;
  const long long rows = (long long)B * NH * S;
  const long long total = rows * nv;
  const long long stride = (long long)gridDim.x * blockDim.x;
  for (long long idx = blockIdx.x * (long long)blockDim.x + threadIdx.x; idx < total; idx += stride) {
    const long long row = idx / nv;
    const int v = (int)(idx - row * nv);
    const int s = (int)(row % S);
    const long long bh = row / S;
    const int h = (int)(bh % NH);
    const int b = (int)(bh / NH);
    const bf16* ir = in + b * sb + h * sh + s * ss;
    bf16* orow = out + row * D;
    const long long crow = (cos_sb ? b * cos_sb : 0) + (long long)s * D;
    const int i0 = v * W;
    float x1[W], x2[W], c1[W], c2[W], s1[W], s2[W], o1[W], o2[W];
    load_w<W>(ir + i0, x1);
    load_w<W>(ir + half + i0, x2);
    load_w<W>(cos + crow + i0, c1);
    load_w<W>(cos + crow + half + i0, c2);
    load_w<W>(sin + crow + i0, s1);
    load_w<W>(sin + crow + half + i0, s2);
    if (backward) {
#pragma unroll
      for (int j = 0; j < W; ++j) {
        o1[j] = x1[j] * c1[j] + x2[j] * s2[j];
        o2[j] = x2[j] * c2[j] - x1[j] * s1[j];
      }
    } else {
#pragma unroll
      for (int j = 0; j < W; ++j) {
        o1[j] = x1[j] * c1[j] - x2[j] * s1[j];
        o2[j] = x2[j] * c2[j] + x1[j] * s2[j];
      }
    }
    store_w<W>(orow + i0, o1);
    store_w<W>(orow + half + i0, o2);
  }
}
}  // namespace

// Strides are in elements; cos_sb is 0 when cos/sin are shared by the batch ([1, S, D]).
extern "C" __global__ void __launch_bounds__(256)
horizon_rope(bf16* out, const bf16* in, const bf16* __restrict__ cos, const bf16* __restrict__ sin, int B, int NH,
             int S, int D, long long sb, long long sh, long long ss, long long cos_sb, int backward) {
  const bool vec = (D / 2) % 8 == 0 && sb % 8 == 0 && sh % 8 == 0 && ss % 8 == 0 && cos_sb % 8 == 0 &&
                   horizon::aligned16(out) && horizon::aligned16(in) && horizon::aligned16(cos) &&
                   horizon::aligned16(sin);
  if (vec)
    rope_rows<8>(out, in, cos, sin, B, NH, S, D, sb, sh, ss, cos_sb, backward);
  else
    rope_rows<1>(out, in, cos, sin, B, NH, S, D, sb, sh, ss, cos_sb, backward);
}
