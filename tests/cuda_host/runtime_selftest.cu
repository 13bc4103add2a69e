// Kernels that check the host runtime itself (tests/test_kernels_host.py): the failure modes
// it must report instead of hanging, and its warp collectives against their definitions.
#include <cuda_bf16.h>

// Thread 5 leaves before the barrier the others wait at: on a GPU, undefined behaviour.
extern "C" __global__ void selftest_missing_barrier(int* out) {
  if (threadIdx.x == 5) return;
  __syncthreads();
  out[threadIdx.x] = 1;
}

// Block 0 waits for a flag nobody sets.
extern "C" __global__ void selftest_spin(int* flag) {
  if (blockIdx.x == 0 && threadIdx.x == 0)
    while (*(volatile int*)flag == 0) __nanosleep(100);
  __syncthreads();
}

// Per thread t (global g = blockIdx.x * blockDim.x + t) with v = in[g]:
// out[4g] = shfl_xor(v, 5), out[4g+1] = match_any(v), out[4g+2] = any(v == 7),
// out[4g+3] = the sum of v over the block (two __syncthreads through shared memory).
extern "C" __global__ void selftest_collectives(int* out, const int* in) {
  __shared__ int part[32];
  const int g = blockIdx.x * blockDim.x + threadIdx.x;
  const int v = in[g];
  out[4 * g] = __shfl_xor_sync(0xffffffffu, v, 5);
  out[4 * g + 1] = (int)__match_any_sync(0xffffffffu, v);
  out[4 * g + 2] = __any_sync(0xffffffffu, v == 7);
  int s = v;
  for (int o = 16; o > 0; o >>= 1) s += __shfl_xor_sync(0xffffffffu, s, o);
  if ((threadIdx.x & 31) == 0) part[threadIdx.x >> 5] = s;
  __syncthreads();
  int tot = 0;
  for (int w = 0; w < (int)(blockDim.x >> 5); ++w) tot += part[w];
  out[4 * g + 3] = tot;
}
