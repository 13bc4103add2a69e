// RMSNorm forward and backward (HF LlamaRMSNorm semantics), bf16 in/out, fp32 statistics.
// forward:  y = bf16(w * bf16(x * r)), r = rsqrt(mean(x^2) + eps), r saved per row.
// backward: dx = r * (g - xhat * mean(g * xhat)), g = dy * w, xhat = x * r;
//           dW partial sums per block (fixed column ownership per thread, so no atomics; the
//           host sums the [grid, H] partials in a fixed order: deterministic). The grid is
//           sized by the occupancy query (as many blocks as fit at once, not 2 per SM).
#include "common.cuh"

namespace {
using bf16 = __nv_bfloat16;
}

extern "C" __global__ void __launch_bounds__(256)
horizon_rmsnorm_fwd(bf16* __restrict__ y, float* __restrict__ rstd, const bf16* __restrict__ x,
                    const bf16* __restrict__ w, long long rows, int H, float eps) {
  __shared__ float red[32];
  const bool vec = (H % 8 == 0) && horizon::aligned16(x) && horizon::aligned16(y) && horizon::aligned16(w);
  const int nv = H / 8;
  for (long long r = blockIdx.x; r < rows; r += gridDim.x) {
    const bf16* xr = x + r * H;
    bf16* yr = y + r * H;
    float ss = 0.f;
    if (vec) {
      for (int i = threadIdx.x; i < nv; i += blockDim.x) {
        float f[8];
        horizon::Vec<bf16>::load(xr + 8 * i, f);
#pragma unroll
        for (int j = 0; j < 8; ++j) ss += f[j] * f[j];
      }
    } else {
      for (int i = threadIdx.x; i < H; i += blockDim.x) {
        float f = __bfloat162float(xr[i]);
        ss += f * f;
      }
    }
    ss = horizon::block_sum(ss, red);
    const float rs = rsqrtf(ss / (float)H + eps);
    if (threadIdx.x == 0) rstd[r] = rs;
    if (vec) {
      for (int i = threadIdx.x; i < nv; i += blockDim.x) {
        float f[8], g[8];
        horizon::Vec<bf16>::load(xr + 8 * i, f);
        horizon::Vec<bf16>::load(w + 8 * i, g);
#pragma unroll
        for (int j = 0; j < 8; ++j) f[j] = g[j] * horizon::round_bf16(f[j] * rs);
        horizon::Vec<bf16>::store(yr + 8 * i, f);
      }
    } else {
      for (int i = threadIdx.x; i < H; i += blockDim.x) {
        float f = __bfloat162float(xr[i]);
        yr[i] = __float2bfloat16_rn(__bfloat162float(w[i]) * horizon::round_bf16(f * rs));
      }
    }
  }
}

// Dynamic shared memory: H floats (the block's dW accumulator). On the 8-wide path thread t
// owns columns 8v..8v+7 for v = t, t + blockDim, ... and keeps column 8v + j at dw_acc[j * nv + v]
// (value-major): a warp's 32 accumulators of one j are 32 consecutive floats, one per bank (the
// column-major layout dw_acc[8v + j] put 8 of them in each of 4 banks).
extern "C" __global__ void __launch_bounds__(256)
horizon_rmsnorm_bwd(bf16* __restrict__ dx, float* __restrict__ dw_part, const bf16* __restrict__ dy,
                    const bf16* __restrict__ x, const bf16* __restrict__ w, const float* __restrict__ rstd,
                    long long rows, int H) {
  extern __shared__ float dw_acc[];
  __shared__ float red[32];
  const bool vec = (H % 8 == 0) && horizon::aligned16(x) && horizon::aligned16(dx) && horizon::aligned16(dy) &&
                   horizon::aligned16(w);
  const int nv = H / 8;
  // Each thread owns the same columns in every row (the loops below share one mapping), so it
  // is the only writer of its dw_acc entries.
  for (int i = threadIdx.x; i < H; i += blockDim.x) dw_acc[i] = 0.f;
  __syncthreads();
  for (long long r = blockIdx.x; r < rows; r += gridDim.x) {
    const bf16* xr = x + r * H;
    const bf16* dyr = dy + r * H;
    bf16* dxr = dx + r * H;
    const float rs = rstd[r];
    float dot = 0.f;
    if (vec) {
      for (int i = threadIdx.x; i < nv; i += blockDim.x) {
        float a[8], g[8], ww[8];
        horizon::Vec<bf16>::load(xr + 8 * i, a);
        horizon::Vec<bf16>::load(dyr + 8 * i, g);
        horizon::Vec<bf16>::load(w + 8 * i, ww);
#pragma unroll
        for (int j = 0; j < 8; ++j) dot += g[j] * ww[j] * a[j];
      }
    } else {
      for (int i = threadIdx.x; i < H; i += blockDim.x)
        dot += __bfloat162float(dyr[i]) * __bfloat162float(w[i]) * __bfloat162float(xr[i]);
    }
    // mean(g * xhat) = rs * sum(g * x) / H
    const float m = horizon::block_sum(dot, red) * rs / (float)H;
    if (vec) {
      for (int i = threadIdx.x; i < nv; i += blockDim.x) {
        float a[8], g[8], ww[8], o[8];
        horizon::Vec<bf16>::load(xr + 8 * i, a);
        horizon::Vec<bf16>::load(dyr + 8 * i, g);
        horizon::Vec<bf16>::load(w + 8 * i, ww);
#pragma unroll
        for (int j = 0; j < 8; ++j) {
          const float xh = a[j] * rs;
          o[j] = rs * (g[j] * ww[j] - xh * m);
          dw_acc[j * nv + i] += g[j] * horizon::round_bf16(xh);
        }
        horizon::Vec<bf16>::store(dxr + 8 * i, o);
      }
    } else {
      for (int i = threadIdx.x; i < H; i += blockDim.x) {
        const float g = __bfloat162float(dyr[i]);
        const float xh = __bfloat162float(xr[i]) * rs;
        dxr[i] = __float2bfloat16_rn(rs * (g * __bfloat162float(w[i]) - xh * m));
        dw_acc[i] += g * horizon::round_bf16(xh);
      }
    }
  }
  __syncthreads();
  float* out = dw_part + (long long)blockIdx.x * H;
  if (vec) {
    for (int i = threadIdx.x; i < nv; i += blockDim.x) {
      float f[8];
#pragma unroll
      for (int j = 0; j < 8; ++j) f[j] = dw_acc[j * nv + i];
      if (horizon::aligned16(out + 8 * i)) {
        horizon::Vec<float>::store(out + 8 * i, f);
        horizon::Vec<float>::store(out + 8 * i + 4, f + 4);
      } else {
#pragma unroll
        for (int j = 0; j < 8; ++j) out[8 * i + j] = f[j];
      }
    }
  } else {
    for (int i = threadIdx.x; i < H; i += blockDim.x) out[i] = dw_acc[i];
  }
}
