// Runs cuda/moe/flash_moe_bwd.cu on the CPU (tests/test_moe.py builds it with g++): a thread
// block is 128 std::threads with a std::barrier for __syncthreads, per-warp exchanges for the
// shuffles and for mma.sync m16n8k16 (operand fragments placed as the PTX ISA lays them out);
// a grid of G blocks is G forked processes over MAP_SHARED buffers, so the grid barriers, the
// tile queue and the cross-block waits run as on the device. The kernel source is compiled as
// is; with HORIZON_HOST_MMA defined, cuda/moe/moe_tiles.cuh calls host_mma16816 instead of
// its one asm statement.
#include "cuda_bf16.h"

#include <sys/wait.h>
#include <unistd.h>

#include <thread>
#include <vector>

thread_local dim3 threadIdx;
dim3 blockIdx, gridDim{1, 1, 1}, blockDim{128, 1, 1};

namespace {
std::barrier<>* g_block = nullptr;
struct Warp {
  std::barrier<>* bar;
  float f[32];
  int i[32];
  unsigned a[32][4], b[32][2];
};
Warp g_warps[4];

float lo(unsigned v) { return __bfloat162float(__nv_bfloat16{(unsigned short)(v & 0xffffu)}); }
float hi(unsigned v) { return __bfloat162float(__nv_bfloat16{(unsigned short)(v >> 16)}); }

template <class T>
T exchange(T (&slots)[32], T v, int src_xor) {
  Warp& w = g_warps[threadIdx.x / 32];
  const int l = threadIdx.x % 32;
  slots[l] = v;
  w.bar->arrive_and_wait();
  const T r = slots[l ^ src_xor];
  w.bar->arrive_and_wait();
  return r;
}
}  // namespace

void __syncthreads() { g_block->arrive_and_wait(); }
float __shfl_xor_sync(unsigned, float v, int o) { return exchange(g_warps[threadIdx.x / 32].f, v, o); }
int __shfl_xor_sync(unsigned, int v, int o) { return exchange(g_warps[threadIdx.x / 32].i, v, o); }

// g = lane / 4, q = lane % 4. A (16 x 16, row): a0 (g, 2q..2q+1), a1 (g+8, 2q..), a2 (g, 2q+8..),
// a3 (g+8, 2q+8..); B (16 x 8, col): b0 (k = 2q..2q+1, n = g), b1 (k = 2q+8.., n = g);
// C (16 x 8): c0, c1 (g, 2q..2q+1), c2, c3 (g+8, 2q..2q+1). Low half = lower index.
void host_mma16816(float c[4], const unsigned a[4], const unsigned b[2]) {
  Warp& w = g_warps[threadIdx.x / 32];
  const int l = threadIdx.x % 32;
  memcpy(w.a[l], a, 16);
  memcpy(w.b[l], b, 8);
  w.bar->arrive_and_wait();
  float A[16][16], B[16][8];
  for (int L = 0; L < 32; ++L) {
    const int g = L >> 2, q = L & 3;
    A[g][2 * q] = lo(w.a[L][0]);
    A[g][2 * q + 1] = hi(w.a[L][0]);
    A[g + 8][2 * q] = lo(w.a[L][1]);
    A[g + 8][2 * q + 1] = hi(w.a[L][1]);
    A[g][2 * q + 8] = lo(w.a[L][2]);
    A[g][2 * q + 9] = hi(w.a[L][2]);
    A[g + 8][2 * q + 8] = lo(w.a[L][3]);
    A[g + 8][2 * q + 9] = hi(w.a[L][3]);
    B[2 * q][g] = lo(w.b[L][0]);
    B[2 * q + 1][g] = hi(w.b[L][0]);
    B[2 * q + 8][g] = lo(w.b[L][1]);
    B[2 * q + 9][g] = hi(w.b[L][1]);
  }
  const int g = l >> 2, q = l & 3;
  for (int i = 0; i < 4; ++i) {
    const int r = g + (i >> 1) * 8, col = 2 * q + (i & 1);
    float s = 0.f;
    for (int k = 0; k < 16; ++k) s += A[r][k] * B[k][col];
    c[i] += s;
  }
  w.bar->arrive_and_wait();
}

#include "flash_moe_bwd_host_src.cu"  // the kernel file, asm swapped (written by the test)

namespace {
using bf = __nv_bfloat16;
void run_block(void** p, const int* n) {
  std::barrier<> block(128);
  g_block = &block;
  for (auto& w : g_warps) w.bar = new std::barrier<>(32);
  std::vector<std::thread> ts;
  for (int t = 0; t < 128; ++t)
    ts.emplace_back([=] {
      threadIdx.x = t;
      horizon_flash_moe_bwd((bf*)p[0], (bf*)p[1], (bf*)p[2], (bf*)p[3], (bf*)p[4], (const bf*)p[5], (const float*)p[6],
                            (const bf*)p[7], (const bf*)p[8], (const bf*)p[9], (const bf*)p[10], (const bf*)p[11],
                            (const float*)p[12], (const int*)p[13], (const float*)p[14], (const int*)p[15],
                            (const int*)p[16], (const int*)p[17], (const bf*)p[18], (const bf*)p[19], (bf*)p[20],
                            (bf*)p[21], (bf*)p[22], (bf*)p[23], (bf*)p[24], (int*)p[25], (int*)p[26], n[0], n[1], n[2],
                            n[3], n[4], n[5], n[6]);
    });
  for (auto& t : ts) t.join();
  for (auto& w : g_warps) delete w.bar;
}
}  // namespace

// p: the kernel's 27 pointer arguments in order; n: its 7 int arguments. G blocks (G forked
// processes; buffers the kernel writes must be in shared memory). Returns the failed blocks.
extern "C" int run_flash_moe_bwd(void** p, const int* n, int G) {
  gridDim.x = G;
  std::vector<pid_t> kids;
  for (int b = 0; b < G; ++b) {
    const pid_t pid = fork();
    if (pid == 0) {
      alarm(120);  // a deadlocked kernel fails the run instead of hanging it
      blockIdx.x = b;
      run_block(p, n);
      _exit(0);
    }
    if (pid < 0) return G;
    kids.push_back(pid);
  }
  int bad = 0;
  for (pid_t k : kids) {
    int st = 0;
    waitpid(k, &st, 0);
    if (!WIFEXITED(st) || WEXITSTATUS(st) != 0) ++bad;
  }
  return bad;
}
