// Runs cuda/moe/flash_moe_bwd.cu on the CPU (tests/test_moe.py builds it with g++) on the host
// runtime (host_runtime.h: blocks as OS threads, CUDA threads as fibers, warp collectives and
// mma.sync m16n8k16 exchanged per warp), so the grid barriers, the tile queue and the
// cross-block waits run as on the device. The kernel source is compiled as is; with
// HORIZON_HOST_MMA defined, cuda/moe/moe_tiles.cuh calls host_mma16816 instead of its one asm
// statement.
#include "host_runtime.h"

#include "flash_moe_bwd_host_src.cu"  // the kernel file (copied by the test)

// p: the kernel's 28 pointer arguments in order; n: its 8 int arguments; G blocks of 128
// threads. Returns the number of failed blocks (deadlock or time limit).
extern "C" int run_flash_moe_bwd(void** p, const int* n, int G) {
  using bf = __nv_bfloat16;
  return horizon_host::launch((unsigned)G, 128, 0, [=] {
    horizon_flash_moe_bwd((bf*)p[0], (bf*)p[1], (bf*)p[2], (bf*)p[3], (bf*)p[4], (const bf*)p[5],
                          (const float*)p[6], (const bf*)p[7], (const bf*)p[8], (const bf*)p[9], (const bf*)p[10],
                          (const bf*)p[11], (const float*)p[12], (const int*)p[13], (const float*)p[14],
                          (const int*)p[15], (const int*)p[16], (const int*)p[17], (const bf*)p[18],
                          (const bf*)p[19], (bf*)p[20], (bf*)p[21], (bf*)p[22], (bf*)p[23], (bf*)p[24], (int*)p[25],
                          (int*)p[26], (int*)p[27], n[0], n[1], n[2], n[3], n[4], n[5], n[6], n[7]);
  });
}
