// The CUDA execution model on the CPU for the host runs of the kernel sources (tests/cuda_host/):
// a launch of G blocks is G OS threads in this process (so the grid sees the caller's memory and
// blocks run concurrently: grid barriers, tile queues and cross-block waits behave as on the
// device); inside a block, each CUDA thread is a fiber (ucontext) on that OS thread, switching
// only at __syncthreads, warp collectives and __nanosleep, in an order shuffled every round. Shared memory is
// the block's thread_local statics (see shim/cuda_bf16.h) plus a NaN-filled dynamic buffer.
// Warp collectives (shuffles, match, vote, the mma.sync m16n8k16 and ldmatrix.trans of
// moe_tiles.cuh under HORIZON_HOST_MMA) exchange through per-warp slots between two warp
// barriers.
//
// Failure modes become a return code instead of a hang: a block whose fibers all wait on
// barriers that cannot complete (a missing __syncthreads participant), or a launch still running
// after its time limit (a spin on a counter nobody bumps), is abandoned and reported.
// Include once per runner, before the kernel sources.
#pragma once
#include <ucontext.h>

#include <atomic>
#include <chrono>
#include <functional>
#include <memory>
#include <thread>
#include <vector>

#include "cuda_bf16.h"

thread_local dim3 threadIdx, blockIdx;
dim3 gridDim{1, 1, 1}, blockDim{128, 1, 1};

namespace horizon_host {

constexpr size_t kStack = 128 * 1024;

struct Barrier {
  int n = 0, arrived = 0;
  unsigned gen = 0;
};

struct Warp {
  Barrier bar;
  unsigned long long v[32];
  unsigned a[32][4], b[32][2];
};

enum Status { kOk = 0, kDeadlock = 1, kTimeout = 2 };

struct Block {
  int n = 0, cur = 0, live = 0;
  std::vector<ucontext_t> ctx;
  std::vector<std::unique_ptr<char[]>> stacks;
  std::vector<char> done;
  ucontext_t sched;
  Barrier bar;
  std::vector<Warp> warps;
  std::vector<unsigned char> dyn;
  const std::function<void()>* body = nullptr;
  bool progress = false, sleeping = false, abort = false;
  Status status = kOk;
};

thread_local Block* g_blk = nullptr;
std::chrono::steady_clock::time_point g_deadline;
std::atomic<bool> g_failed{false};  // a block failed: the others stop waiting for it

inline void yield() {
  Block& b = *g_blk;
  swapcontext(&b.ctx[b.cur], &b.sched);
}

inline void wait(Barrier& br) {
  Block& b = *g_blk;
  b.progress = true;
  const unsigned g = br.gen;
  if (++br.arrived == br.n) {
    br.arrived = 0;
    ++br.gen;
    return;
  }
  while (br.gen == g) yield();
}

inline Warp& warp() { return g_blk->warps[threadIdx.x / 32]; }

// All 32 lanes' values (as 64-bit slots) to f, which returns this lane's result.
template <class T, class F>
T collective(unsigned long long mine, F f) {
  Warp& w = warp();
  w.v[threadIdx.x % 32] = mine;
  wait(w.bar);
  const T r = f(w.v, (int)(threadIdx.x % 32));
  wait(w.bar);
  return r;
}

inline unsigned long long bits(float v) {
  unsigned u;
  memcpy(&u, &v, 4);
  return u;
}
inline float from_bits(unsigned long long s) {
  const unsigned u = (unsigned)s;
  float v;
  memcpy(&v, &u, 4);
  return v;
}

inline void fiber_entry() {
  Block& b = *g_blk;
  (*b.body)();
  b.done[b.cur] = 1;
  b.progress = true;
}  // returns to uc_link: the scheduler

inline void run_block(unsigned bx, int nthreads, size_t dyn_smem, const std::function<void()>& body, Status* out) {
  Block b;
  g_blk = &b;
  blockIdx.x = bx;
  b.n = b.live = nthreads;
  b.body = &body;
  b.bar.n = nthreads;
  b.warps.resize((nthreads + 31) / 32);
  for (auto& w : b.warps) w.bar.n = 32;
  b.dyn.assign(dyn_smem + 16, 0xff);  // 0xffffffff: a NaN float, -1 int; unwritten reads show
  b.ctx.resize(nthreads);
  b.done.assign(nthreads, 0);
  for (int t = 0; t < nthreads; ++t) {
    b.stacks.emplace_back(new char[kStack]);
    getcontext(&b.ctx[t]);
    b.ctx[t].uc_stack.ss_sp = b.stacks.back().get();
    b.ctx[t].uc_stack.ss_size = kStack;
    b.ctx[t].uc_link = &b.sched;
    makecontext(&b.ctx[t], fiber_entry, 0);
  }
  // Each round visits the fibers in a fresh pseudo-random order (seeded per block, so runs
  // repeat): code that reads another thread's write without a barrier between them sees it
  // sometimes before, sometimes after, instead of always in thread order.
  std::vector<int> order(nthreads);
  for (int t = 0; t < nthreads; ++t) order[t] = t;
  unsigned long long rng = 0x9e3779b97f4a7c15ull * (bx + 1);
  while (b.live > 0 && !b.abort) {
    b.progress = b.sleeping = false;
    for (int i = nthreads - 1; i > 0; --i) {
      rng ^= rng << 13;
      rng ^= rng >> 7;
      rng ^= rng << 17;
      std::swap(order[i], order[(int)(rng % (unsigned long long)(i + 1))]);
    }
    for (int i = 0; i < nthreads && !b.abort; ++i) {
      const int t = order[i];
      if (b.done[t]) continue;
      b.cur = t;
      threadIdx.x = t;
      swapcontext(&b.sched, &b.ctx[t]);
      if (b.done[t]) --b.live;
    }
    if (b.live > 0 && !b.progress && !b.sleeping) {
      b.status = kDeadlock;
      break;
    }
  }
  if (b.abort && b.status == kOk) b.status = kTimeout;
  if (b.status != kOk) g_failed = true;
  *out = b.status;
  g_blk = nullptr;  // unfinished fibers are dropped with their stacks (kernel locals are trivial)
}

// Runs body() as grid x threads CUDA threads; returns the number of blocks that failed.
// `resident` < grid starts only the first `resident` blocks (the others never get an SM: what
// a persistent kernel meets when its grid is not co-resident); gridDim still says `grid`.
inline int launch(unsigned grid, unsigned threads, size_t dyn_smem, const std::function<void()>& body,
                  double limit_s = 120.0, unsigned resident = ~0u) {
  gridDim = dim3{grid, 1, 1};
  blockDim = dim3{threads, 1, 1};
  g_deadline = std::chrono::steady_clock::now() + std::chrono::milliseconds((long long)(limit_s * 1000));
  g_failed = false;
  const unsigned started = resident < grid ? resident : grid;
  std::vector<Status> st(started, kOk);
  std::vector<std::thread> ts;
  for (unsigned bx = 0; bx < started; ++bx)
    ts.emplace_back([&, bx] { run_block(bx, (int)threads, dyn_smem, body, &st[bx]); });
  for (auto& t : ts) t.join();
  int bad = 0;
  for (Status s : st) bad += s != kOk;
  return bad;
}

inline void* dynamic_smem() {
  // 16-byte aligned like the device's dynamic shared memory.
  const uintptr_t p = reinterpret_cast<uintptr_t>(g_blk->dyn.data());
  return reinterpret_cast<void*>((p + 15) & ~uintptr_t(15));
}

}  // namespace horizon_host

// ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 as the PTX ISA defines it: lane t supplies the
// address of row t % 8 (8 b16 values) of matrix t / 8; with .trans each matrix is delivered
// transposed, so lane t receives from matrix i the elements (row 2 (t % 4), column t / 4) and
// (row 2 (t % 4) + 1, column t / 4), low half first, in d[i].
void host_ldmatrix_x4_trans(unsigned (&d)[4], const void* row) {
  using namespace horizon_host;
  Warp& w = warp();
  const int l = threadIdx.x % 32;
  w.v[l] = reinterpret_cast<unsigned long long>(row);
  wait(w.bar);
  const int r0 = 2 * (l % 4), c = l / 4;
  for (int i = 0; i < 4; ++i) {
    const auto* lo = reinterpret_cast<const unsigned short*>(w.v[8 * i + r0]);
    const auto* hi = reinterpret_cast<const unsigned short*>(w.v[8 * i + r0 + 1]);
    d[i] = (unsigned)lo[c] | ((unsigned)hi[c] << 16);
  }
  wait(w.bar);
}

long long host_now_ns() {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

void __syncthreads() { horizon_host::wait(horizon_host::g_blk->bar); }
void __syncwarp(unsigned) { horizon_host::wait(horizon_host::warp().bar); }

float __shfl_xor_sync(unsigned, float v, int o) {
  using namespace horizon_host;
  return collective<float>(bits(v), [o](const unsigned long long* s, int l) { return from_bits(s[l ^ o]); });
}
int __shfl_xor_sync(unsigned, int v, int o) {
  return horizon_host::collective<int>((unsigned)v,
                                       [o](const unsigned long long* s, int l) { return (int)(unsigned)s[l ^ o]; });
}
int __shfl_up_sync(unsigned, int v, unsigned d) {
  return horizon_host::collective<int>((unsigned)v, [d](const unsigned long long* s, int l) {
    return (int)(unsigned)s[l >= (int)d ? l - (int)d : l];
  });
}
int __shfl_sync(unsigned, int v, int src) {
  return horizon_host::collective<int>((unsigned)v,
                                       [src](const unsigned long long* s, int) { return (int)(unsigned)s[src & 31]; });
}
unsigned __match_any_sync(unsigned, int v) {
  return horizon_host::collective<unsigned>((unsigned)v, [](const unsigned long long* s, int l) {
    unsigned m = 0;
    for (int i = 0; i < 32; ++i)
      if (s[i] == s[l]) m |= 1u << i;
    return m;
  });
}
int __any_sync(unsigned, int pred) {
  return horizon_host::collective<int>(pred != 0, [](const unsigned long long* s, int) {
    int any = 0;
    for (int i = 0; i < 32; ++i) any |= s[i] != 0;
    return any;
  });
}

void __nanosleep(unsigned) {
  using namespace horizon_host;
  Block& b = *g_blk;
  b.sleeping = true;  // waiting on another block: not a deadlock of this one
  if (g_failed || std::chrono::steady_clock::now() > g_deadline) b.abort = true;
  std::this_thread::yield();
  yield();
}

namespace {
float bf_lo(unsigned v) { return __bfloat162float(__nv_bfloat16{(unsigned short)(v & 0xffffu)}); }
float bf_hi(unsigned v) { return __bfloat162float(__nv_bfloat16{(unsigned short)(v >> 16)}); }
}  // namespace

// mma.sync.m16n8k16.row.col.f32.bf16.bf16.f32, fragments as the PTX ISA lays them out:
// g = lane / 4, q = lane % 4. A (16 x 16, row): a0 (g, 2q..2q+1), a1 (g+8, 2q..), a2 (g, 2q+8..),
// a3 (g+8, 2q+8..); B (16 x 8, col): b0 (k = 2q..2q+1, n = g), b1 (k = 2q+8.., n = g);
// C (16 x 8): c0, c1 (g, 2q..2q+1), c2, c3 (g+8, 2q..2q+1). Low half = lower index.
void host_mma16816(float c[4], const unsigned a[4], const unsigned b[2]) {
  using namespace horizon_host;
  Warp& w = warp();
  const int l = threadIdx.x % 32;
  memcpy(w.a[l], a, 16);
  memcpy(w.b[l], b, 8);
  wait(w.bar);
  const int g = l >> 2, q = l & 3;
  // This lane's outputs need rows g, g+8 of A and columns 2q, 2q+1 of B.
  float A[2][16], B[2][16];
  for (int L = 0; L < 32; ++L) {
    const int gl = L >> 2, ql = L & 3;
    for (int hh = 0; hh < 2; ++hh) {
      if (gl == g) {
        A[hh][2 * ql] = bf_lo(w.a[L][hh]);
        A[hh][2 * ql + 1] = bf_hi(w.a[L][hh]);
        A[hh][2 * ql + 8] = bf_lo(w.a[L][hh + 2]);
        A[hh][2 * ql + 9] = bf_hi(w.a[L][hh + 2]);
      }
    }
    for (int cc = 0; cc < 2; ++cc) {
      if (gl == 2 * q + cc) {
        B[cc][2 * ql] = bf_lo(w.b[L][0]);
        B[cc][2 * ql + 1] = bf_hi(w.b[L][0]);
        B[cc][2 * ql + 8] = bf_lo(w.b[L][1]);
        B[cc][2 * ql + 9] = bf_hi(w.b[L][1]);
      }
    }
  }
  for (int i = 0; i < 4; ++i) {
    float s = 0.f;
    for (int k = 0; k < 16; ++k) s += A[i >> 1][k] * B[i & 1][k];
    c[i] += s;
  }
  wait(w.bar);
}
