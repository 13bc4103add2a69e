// Gradient checks: per-block partial sums of squares (fp32; the host sums the partials in a
// fixed order, so the norm is deterministic) and a non-finite flag, for fp32 and bf16 tensors.
#include "common.cuh"

namespace {

template <typename T>
static __device__ __forceinline__ void sq_norm_partial(float* __restrict__ partials, const T* __restrict__ x,
                                                       long long n) {
  using VT = horizon::Vec<T>;
  constexpr int W = VT::W;
  __shared__ float red[32];
  const long long tid = blockIdx.x * (long long)blockDim.x + threadIdx.x;
  const long long stride = (long long)gridDim.x * blockDim.x;
  float acc = 0.f;
  long long done = 0;
  if (horizon::aligned16(x)) {
    const long long nv = n / W;
    for (long long i = tid; i < nv; i += stride) {
      float f[W];
      VT::load(x + i * W, f);
#pragma unroll
      for (int j = 0; j < W; ++j) acc += f[j] * f[j];
    }
    done = nv * W;
  }
  for (long long i = done + tid; i < n; i += stride) {
    const float f = VT::get(x + i);
    acc += f * f;
  }
  acc = horizon::block_sum(acc, red);
  if (threadIdx.x == 0) partials[blockIdx.x] = acc;
}

template <typename T>
static __device__ __forceinline__ void nonfinite(int* __restrict__ flag, const T* __restrict__ x, long long n) {
  using VT = horizon::Vec<T>;
  constexpr int W = VT::W;
  const long long tid = blockIdx.x * (long long)blockDim.x + threadIdx.x;
  const long long stride = (long long)gridDim.x * blockDim.x;
  bool bad = false;
  long long done = 0;
  if (horizon::aligned16(x)) {
    const long long nv = n / W;
    for (long long i = tid; i < nv; i += stride) {
      float f[W];
      VT::load(x + i * W, f);
#pragma unroll
      for (int j = 0; j < W; ++j) bad |= !isfinite(f[j]);
    }
    done = nv * W;
  }
  for (long long i = done + tid; i < n; i += stride) bad |= !isfinite(VT::get(x + i));
  // Racing writers all store the same value: no atomic needed.
  if (__any_sync(0xffffffffu, bad) && (threadIdx.x & 31) == 0) *flag = 1;
}
}  // namespace

extern "C" __global__ void __launch_bounds__(256)
horizon_sq_norm_partial_f32(float* partials, const float* x, long long n) { sq_norm_partial<float>(partials, x, n); }

extern "C" __global__ void __launch_bounds__(256)
horizon_sq_norm_partial_bf16(float* partials, const __nv_bfloat16* x, long long n) {
  sq_norm_partial<__nv_bfloat16>(partials, x, n);
}

extern "C" __global__ void __launch_bounds__(256)
horizon_nonfinite_f32(int* flag, const float* x, long long n) { nonfinite<float>(flag, x, n); }

extern "C" __global__ void __launch_bounds__(256)
horizon_nonfinite_bf16(int* flag, const __nv_bfloat16* x, long long n) { nonfinite<__nv_bfloat16>(flag, x, n); }
