// The row step of the fused linear + cross-entropy: for one chunk of logits [C, V] (one block
// per row), loss[row] = logsumexp - logit[label] (0 if ignored) and, in place,
// logits <- (softmax - onehot(label)) * scale (0 on ignored rows), fp32 math. The scale is read
// from device memory (1/#labels for a mean) so the host never synchronises. An out-of-range
// label gives a NaN loss so it cannot pass unnoticed.
#include "common.cuh"

#include <math_constants.h>

namespace {

// Merges two (max, sum of exp(x - max)) pairs.
static __device__ __forceinline__ void lse_merge(float& m, float& s, float m2, float s2) {
  const float mm = fmaxf(m, m2);
  if (mm == -CUDART_INF_F) return;  // both empty
  s = s * __expf(m - mm) + s2 * __expf(m2 - mm);
  m = mm;
}

template <typename T>
static __device__ __forceinline__ void ce_row(T* __restrict__ logits, float* __restrict__ loss,
                                              const long long* __restrict__ labels, const float* __restrict__ scale_p,
                                              int V, long long ignore_index) {
  using VT = horizon::Vec<T>;
  constexpr int W = VT::W;
  __shared__ float red_m[32], red_s[32], picked;
  const long long row = blockIdx.x;
  T* x = logits + row * (long long)V;
  const bool vec = (V % W == 0) && horizon::aligned16(logits);
  const int nv = vec ? V / W : 0;
  const long long lab = labels[row];
  const bool valid = lab != ignore_index;
  const bool in_range = lab >= 0 && lab < V;
  // Read the label's logit before any thread overwrites it (the barriers below order it).
  if (threadIdx.x == 0) picked = (valid && in_range) ? VT::get(x + lab) : 0.f;

  float m = -CUDART_INF_F, s = 0.f;
  for (int i = threadIdx.x; i < nv; i += blockDim.x) {
    float f[W];
    VT::load(x + (long long)i * W, f);
#pragma unroll
    for (int j = 0; j < W; ++j) lse_merge(m, s, f[j], 1.f);
  }
  for (int i = nv * W + threadIdx.x; i < V; i += blockDim.x) lse_merge(m, s, VT::get(x + i), 1.f);
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    const float m2 = __shfl_xor_sync(0xffffffffu, m, o), s2 = __shfl_xor_sync(0xffffffffu, s, o);
    lse_merge(m, s, m2, s2);
  }
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = (blockDim.x + 31) >> 5;
  if (lane == 0) {
    red_m[warp] = m;
    red_s[warp] = s;
  }
  __syncthreads();
  m = -CUDART_INF_F;
  s = 0.f;
  for (int w = 0; w < nw; ++w) lse_merge(m, s, red_m[w], red_s[w]);
  const float lse = m + __logf(s);
  if (threadIdx.x == 0) {
    loss[row] = !valid ? 0.f : (in_range ? lse - picked : CUDART_NAN_F);
  }
  const float sc = (valid && in_range) ? *scale_p : 0.f;
  for (int i = threadIdx.x; i < nv; i += blockDim.x) {
    float f[W];
    VT::load(x + (long long)i * W, f);
#pragma unroll
    for (int j = 0; j < W; ++j) {
      const long long col = (long long)i * W + j;
      f[j] = (__expf(f[j] - lse) - (col == lab ? 1.f : 0.f)) * sc;
    }
    VT::store(x + (long long)i * W, f);
  }
  for (int i = nv * W + threadIdx.x; i < V; i += blockDim.x) {
    const float p = __expf(VT::get(x + i) - lse);
    VT::put(x + i, (p - (i == lab ? 1.f : 0.f)) * sc);
  }
}
}  // namespace

extern "C" __global__ void __launch_bounds__(256)
horizon_ce_rows_bf16(__nv_bfloat16* logits, float* loss, const long long* labels, const float* scale, int V,
                     long long ignore_index) {
  ce_row<__nv_bfloat16>(logits, loss, labels, scale, V, ignore_index);
}

extern "C" __global__ void __launch_bounds__(256)
horizon_ce_rows_f32(float* logits, float* loss, const long long* labels, const float* scale, int V,
                    long long ignore_index) {
  ce_row<float>(logits, loss, labels, scale, V, ignore_index);
}
