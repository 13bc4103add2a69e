// SwiGLU, y = silu(a) * b, and its backward; bf16 in/out, fp32 math, 16-byte accesses with a
// scalar loop for what is not a multiple of 8 elements (or not 16-byte aligned).
#include "common.cuh"

namespace {
using bf16 = __nv_bfloat16;
static __device__ __forceinline__ float sigmoidf_(float v) { return 1.f / (1.f + __expf(-v)); }
}  // namespace

extern "C" __global__ void __launch_bounds__(256)
horizon_swiglu_fwd(bf16* __restrict__ y, const bf16* __restrict__ a, const bf16* __restrict__ b, long long n) {
  const long long tid = blockIdx.x * (long long)blockDim.x + threadIdx.x;
  const long long stride = (long long)gridDim.x * blockDim.x;
  long long done = 0;
  if (horizon::aligned16(y) && horizon::aligned16(a) && horizon::aligned16(b)) {
    const long long nv = n / 8;
    for (long long i = tid; i < nv; i += stride) {
      float fa[8], fb[8];
      horizon::Vec<bf16>::load(a + 8 * i, fa);
      horizon::Vec<bf16>::load(b + 8 * i, fb);
#pragma unroll
      for (int j = 0; j < 8; ++j) fa[j] = fa[j] * sigmoidf_(fa[j]) * fb[j];
      horizon::Vec<bf16>::store(y + 8 * i, fa);
    }
    done = nv * 8;
  }
  for (long long i = done + tid; i < n; i += stride) {
    const float fa = __bfloat162float(a[i]);
    y[i] = __float2bfloat16_rn(fa * sigmoidf_(fa) * __bfloat162float(b[i]));
  }
}

// da = dy * b * s * (1 + a * (1 - s)), db = dy * a * s, s = sigmoid(a).
extern "C" __global__ void __launch_bounds__(256)
horizon_swiglu_bwd(bf16* __restrict__ da, bf16* __restrict__ db, const bf16* __restrict__ dy,
                   const bf16* __restrict__ a, const bf16* __restrict__ b, long long n) {
  const long long tid = blockIdx.x * (long long)blockDim.x + threadIdx.x;
  const long long stride = (long long)gridDim.x * blockDim.x;
  long long done = 0;
  if (horizon::aligned16(da) && horizon::aligned16(db) && horizon::aligned16(dy) && horizon::aligned16(a) &&
      horizon::aligned16(b)) {
    const long long nv = n / 8;
    for (long long i = tid; i < nv; i += stride) {
      float fa[8], fb[8], g[8], oa[8], ob[8];
      horizon::Vec<bf16>::load(a + 8 * i, fa);
      horizon::Vec<bf16>::load(b + 8 * i, fb);
      horizon::Vec<bf16>::load(dy + 8 * i, g);
#pragma unroll
      for (int j = 0; j < 8; ++j) {
        const float s = sigmoidf_(fa[j]);
        oa[j] = g[j] * fb[j] * s * (1.f + fa[j] * (1.f - s));
        ob[j] = g[j] * fa[j] * s;
      }
      horizon::Vec<bf16>::store(da + 8 * i, oa);
      horizon::Vec<bf16>::store(db + 8 * i, ob);
    }
    done = nv * 8;
  }
  for (long long i = done + tid; i < n; i += stride) {
    const float fa = __bfloat162float(a[i]), fb = __bfloat162float(b[i]), g = __bfloat162float(dy[i]);
    const float s = sigmoidf_(fa);
    da[i] = __float2bfloat16_rn(g * fb * s * (1.f + fa * (1.f - s)));
    db[i] = __float2bfloat16_rn(g * fa * s);
  }
}
