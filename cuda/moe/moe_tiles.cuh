// Shared by the flash_moe forward (flash_moe.cu) and backward (flash_moe_bwd.cu): the tile
// shape, warp reductions, the bounded waits and grid barrier of a co-resident persistent grid,
// and the mma.sync m16n8k16 tile step (4 warps of 32 x 32 over a 64 x 64 tile).
#pragma once
#include "common.cuh"

namespace horizon_moe {
using bf16 = __nv_bfloat16;

constexpr int BM = 64, BN = 64, BK = 32, SK = BK + 8;  // SK: padded smem row (80 bytes)

static __device__ __forceinline__ int ldcg_i(const int* p) { return __ldcg(p); }
static __device__ __forceinline__ float ldcg_f(const float* p) { return __ldcg(p); }

static __device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

static __device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

// ---------------------------------------------------------------- bounded waits
//
// The persistent kernels wait for each other's blocks (grid barriers, tile dependencies). The
// host launches them cooperatively with an occupancy-sized grid, so every block is resident;
// should that fail anyway, no wait spins for ever: a wait longer than `limit_ns` gives up,
// raises the launch's abort flag (every other wait then gives up at once and every block
// returns) and records what happened in `status` (page-locked host memory the host reads:
// [0] code, [1] block, [2] kernel), so the run stops with an error instead of hanging.

enum WaitCode { kWaitTimedOut = 1 };

struct Waits {
  int* abort;        // device int, zeroed by the host before the launch
  int* status;       // host-visible int[3], or nullptr
  long long limit_ns;
  int kernel;        // 1 forward, 2 backward
};

static __device__ __forceinline__ long long now_ns() {
#ifdef HORIZON_HOST_MMA
  return host_now_ns();  // tests/cuda_host: the host runtime's clock
#else
  long long t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  return t;
#endif
}

static __device__ __forceinline__ int ld_volatile(const int* p) { return *(const volatile int*)p; }

// Thread-level: waits until *flag >= target. False when the launch gave up (this wait ran past
// the limit, or another one did).
static __device__ bool wait_at_least(const int* flag, int target, const Waits& w) {
  if (ld_volatile(flag) >= target) return true;
  const long long t0 = now_ns();
  unsigned sleep = 32;
  while (ld_volatile(flag) < target) {
    if (ld_volatile(w.abort)) return false;
    if (now_ns() - t0 > w.limit_ns) {
      atomicExch(w.abort, 1);
      if (w.status != nullptr) {
        volatile int* st = w.status;
        st[1] = (int)blockIdx.x;
        st[2] = w.kernel;
        __threadfence_system();
        st[0] = kWaitTimedOut;
        __threadfence_system();
      }
      return false;
    }
    __nanosleep(sleep);
    if (sleep < 1024) sleep *= 2;
  }
  return true;
}

// Block-level: thread 0 waits, the block learns the outcome (uniform across the block).
static __device__ bool block_wait_at_least(const int* flag, int target, const Waits& w) {
  __shared__ int s_ok;
  if (threadIdx.x == 0) {
    s_ok = wait_at_least(flag, target, w);
    __threadfence();
  }
  __syncthreads();
  const bool ok = s_ok != 0;
  return ok;  // s_ok is rewritten only after the next __syncthreads every thread passes
}

// Grid-wide barrier number `n` (1, 2, ...) on a zeroed counter. Every thread fences its own
// writes; thread 0 arrives and waits; the block barrier then releases the rest. False when the
// launch gave up: the caller returns.
static __device__ bool grid_barrier(int* counter, int n, const Waits& w) {
  __threadfence();
  __syncthreads();
  if (threadIdx.x == 0) atomicAdd(counter, 1);
  return block_wait_at_least(counter, n * (int)gridDim.x, w);
}

// ---------------------------------------------------------------- 1. route


// Finds the expert of global row block rb: the largest e with rbp[e] <= rb (rbp is
// non-decreasing; empty experts repeat a value and are skipped by taking the largest).
static __device__ __forceinline__ int expert_of_row_block(const int* rbp, int E, int rb) {
  int lo = 0, hi = E - 1;
  while (lo < hi) {
    const int mid = (lo + hi + 1) >> 1;
    if (ldcg_i(rbp + mid) <= rb)
      lo = mid;
    else
      hi = mid - 1;
  }
  return lo;
}



static __device__ __forceinline__ void mma16816(float c[4], const unsigned a[4], const unsigned b[2]) {
#ifdef HORIZON_HOST_MMA
  // tests/cuda_host: the kernels compiled for the CPU, the warp-wide MMA emulated there.
  host_mma16816(c, a, b);
#else
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
#endif
}

// An operand's BK slice in shared memory, in one of two layouts (16-byte aligned: filled with
// 16-byte stores):
//  rk[row][k]: K contiguous per tile row (operands read along their rows), fragments by 32-bit
//    loads; rows padded to SK (80 bytes) so a warp's loads fall in distinct banks.
//  kr[k][row]: tile rows contiguous per k (operands whose K runs down the matrix: the
//    weight-gradient reductions), staged as loaded (16-byte stores, no transpose on the way
//    in) and read with ldmatrix.trans; rows padded to ROWS + 8 (144 bytes for 64) so the 8
//    rows of an 8 x 8 ldmatrix fall in distinct bank groups.
template <int ROWS>
union alignas(16) Stage {
  bf16 rk[ROWS][SK];
  bf16 kr[BK][ROWS + 8];
};

struct alignas(16) TileSmem {
  Stage<BM> A;
  Stage<BN> B0;
  Stage<BN> B1;
};

static __device__ __forceinline__ unsigned lds32(const bf16* p) { return *reinterpret_cast<const unsigned*>(p); }

// Four 8 x 8 b16 matrices, transposed: lane t gives the row address (16 bytes) of row t % 8 of
// matrix t / 8 and receives, from matrix i, elements (2 (t % 4), t / 4) and (2 (t % 4) + 1, t / 4)
// in d[i] (low half first): for a k-major tile, the m16n8k16 fragment of the k-contiguous one.
static __device__ __forceinline__ void ldsm_x4_trans(unsigned (&d)[4], const bf16* row) {
#ifdef HORIZON_HOST_MMA
  host_ldmatrix_x4_trans(d, row);  // tests/cuda_host: exchanged per warp on the CPU
#else
  const unsigned a = (unsigned)__cvta_generic_to_shared(row);
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(d[0]), "=r"(d[1]), "=r"(d[2]), "=r"(d[3])
               : "r"(a));
#endif
}

// One warp's share (32 x 32) of a (32 x warps/2) x 64 tile over one BK slice: acc[mi][ni][4].
// TA / TB: the operand is staged k-major (Stage::kr), else row-major (Stage::rk).
template <bool TWO, bool TA = false, bool TB = false, class Smem>
static __device__ __forceinline__ void mma_slice(const Smem& sm, float (&acc0)[2][4][4], float (&acc1)[2][4][4]) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int wm = (warp >> 1) * 32, wn = (warp & 1) * 32;
  const int g = lane >> 2, q = lane & 3;
  // ldmatrix row of this lane: row lane % 8 of matrix lane / 8.
  const int lr = lane & 7, lo = ((lane >> 3) & 1) * 8, hi = ((lane >> 4) & 1) * 8;
#pragma unroll
  for (int kk = 0; kk < BK; kk += 16) {
    unsigned af[2][4];
#pragma unroll
    for (int mi = 0; mi < 2; ++mi) {
      const int r = wm + mi * 16 + g;
      if constexpr (TA) {
        // matrices (m, k) blocks: (0, 0), (8, 0), (0, 8), (8, 8) -> a0..a3
        ldsm_x4_trans(af[mi], &sm.A.kr[kk + hi + lr][wm + mi * 16 + lo]);
      } else {
        af[mi][0] = lds32(&sm.A.rk[r][kk + 2 * q]);
        af[mi][1] = lds32(&sm.A.rk[r + 8][kk + 2 * q]);
        af[mi][2] = lds32(&sm.A.rk[r][kk + 2 * q + 8]);
        af[mi][3] = lds32(&sm.A.rk[r + 8][kk + 2 * q + 8]);
      }
    }
#pragma unroll
    for (int np = 0; np < 2; ++np) {  // pairs of 8-column groups
      unsigned b0[4], b1[4];
      if constexpr (TB) {
        // matrices (n, k) blocks: (0, 0), (0, 8), (8, 0), (8, 8) -> b(ni) = d0, d1; b(ni + 1) = d2, d3
        ldsm_x4_trans(b0, &sm.B0.kr[kk + lo + lr][wn + np * 16 + hi]);
        if constexpr (TWO) ldsm_x4_trans(b1, &sm.B1.kr[kk + lo + lr][wn + np * 16 + hi]);
      } else {
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          const int n = wn + np * 16 + h * 8 + g;
          b0[2 * h] = lds32(&sm.B0.rk[n][kk + 2 * q]);
          b0[2 * h + 1] = lds32(&sm.B0.rk[n][kk + 2 * q + 8]);
          if constexpr (TWO) {
            b1[2 * h] = lds32(&sm.B1.rk[n][kk + 2 * q]);
            b1[2 * h + 1] = lds32(&sm.B1.rk[n][kk + 2 * q + 8]);
          }
        }
      }
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int ni = np * 2 + h;
        const unsigned bb0[2] = {b0[2 * h], b0[2 * h + 1]};
#pragma unroll
        for (int mi = 0; mi < 2; ++mi) mma16816(acc0[mi][ni], af[mi], bb0);
        if constexpr (TWO) {
          const unsigned bb1[2] = {b1[2 * h], b1[2 * h + 1]};
#pragma unroll
          for (int mi = 0; mi < 2; ++mi) mma16816(acc1[mi][ni], af[mi], bb1);
        }
      }
    }
  }
}

}  // namespace horizon_moe
