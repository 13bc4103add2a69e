// Gradient accumulation: acc (fp32) += scale * grad (bf16), in place.
// Used to fold a layer's bf16 parameter gradients into the fp32 accumulator over the
// micro-batches of a step. Memory bound: 16-byte loads of grad (8 bf16), two 16-byte
// loads/stores of acc per vector; a scalar head/tail covers sizes and offsets that are not
// multiples of 8 elements.
#include "common.cuh"

extern "C" __global__ void __launch_bounds__(256)
horizon_acc_bf16_to_f32(float* __restrict__ acc, const __nv_bfloat16* __restrict__ grad,
                        float scale, long long n) {
  const long long tid = blockIdx.x * (long long)blockDim.x + threadIdx.x;
  const long long stride = (long long)gridDim.x * blockDim.x;
  // Vector path only when both pointers are 16-byte aligned (torch allocations are; views
  // at odd offsets fall back to the scalar loop).
  const bool vec = horizon::aligned16(acc) && horizon::aligned16(grad);
  long long done = 0;
  if (vec) {
    const long long nv = n / 8;
    const horizon::Bf16x8* g8 = reinterpret_cast<const horizon::Bf16x8*>(grad);
    float4* a4 = reinterpret_cast<float4*>(acc);
    for (long long i = tid; i < nv; i += stride) {
      float g[8];
      horizon::unpack8(g8[i], g);
      float4 a0 = a4[2 * i], a1 = a4[2 * i + 1];
      a0.x += scale * g[0]; a0.y += scale * g[1]; a0.z += scale * g[2]; a0.w += scale * g[3];
      a1.x += scale * g[4]; a1.y += scale * g[5]; a1.z += scale * g[6]; a1.w += scale * g[7];
      a4[2 * i] = a0;
      a4[2 * i + 1] = a1;
    }
    done = nv * 8;
  }
  for (long long i = done + tid; i < n; i += stride) {
    acc[i] += scale * __bfloat162float(grad[i]);
  }
}
