// flash_moe forward: the whole MoE layer in one persistent launch (see FLASHMOE.md).
//
// Phases, separated by grid-wide barriers (the host launches the grid cooperatively, sized by
// the occupancy query, so every block is resident; every wait is bounded, see moe_tiles.cuh):
//   1. route   one warp per token: fp32 router logits (bf16 operands), softmax, greedy top-k
//              (ties to the lowest expert), optional renormalisation.
//   2. count   the (token, choice) pairs are cut into chunks of 256; a warp per chunk counts
//              its pairs per expert.
//   3. scan    a warp per expert (all blocks): exclusive prefix over the chunks' counts, 32
//              chunks per step (warp scan): each chunk's base slot, and the expert's kept count.
//   4. place   every block derives the expert offsets (a warp scan over the kept counts; block
//              0 also stores them and the row-block prefix of the tile list); a warp per chunk
//              ranks its pairs inside the chunk in pair order (__match_any), so slot = (earlier
//              pairs of the same expert): deterministic token order; kept pairs go to
//              sorted[offset_e + slot].
//   5. tiles   blocks pull tile indices from an atomic counter. Up tiles (all handed out
//              first): h = silu(x_rows . w1^T) * (x_rows . w3^T) for 128 slots x 64 columns of
//              I, rows gathered from x by index. Down tiles: wait on the row block's counter,
//              then out_pair = h . w2^T (bf16, unscaled: the backward needs it too). In the
//              list an expert's tiles go N tile by N tile, each over all the expert's row
//              blocks, so the blocks running at once share one slice of the weights (read from
//              memory once, then from L2) instead of each row block streaming all of them.
//   6. combine y[t] = sum_j w[t, j] * out_pair[t, j] in choice order, fp32, to bf16.
//
// Tensor cores: mma.sync m16n8k16 bf16 -> fp32 on both sm_80 and sm_90a (a wgmma/TMA path for
// sm_90a is not written yet); 256 threads, 8 warps of 32 x 32 over a 128 x 64 tile. Operands
// are staged through shared memory by plain 16-byte loads (one shared stage; the next K slice
// is prefetched into registers during the MMAs). Data written by other blocks during the
// launch is read with ld.global.cg (L2), never through a possibly stale L1 line.
#include "moe/moe_tiles.cuh"

#include <math_constants.h>

namespace {
using namespace horizon_moe;

constexpr int MOE_THREADS = 256;
constexpr int MOE_WARPS = MOE_THREADS / 32;
constexpr int FBM = 32 * (MOE_WARPS / 2);  // rows of a forward tile (warps of 32 x 32, 2 across)
static_assert(FBM == 128, "8 warps: 128-row tiles");

// A forward tile's operands in shared memory: 128 rows of A (gathered x, or h), 64 of each W.
struct alignas(16) FwdTileSmem {
  Stage<FBM> A;
  Stage<BN> B0;
  Stage<BN> B1;
};
constexpr int MOE_MAX_E = 256;
constexpr int MOE_MAX_K = 8;
constexpr int CHUNK = 256;  // pairs per placement chunk (8 warp steps)

struct MoeArgs {
  bf16* y;
  const bf16* x;
  const bf16* wr;
  const bf16* w1;
  const bf16* w3;
  const bf16* w2;
  float* logits;    // [T, E] fp32
  int* tope;        // [P] expert of pair p = t*k + j
  float* topw;      // [P] routing weight
  int* slot;        // [P] slot in the expert, -1 when dropped
  int* sorted;      // [P] pair index by (expert offset + slot)
  int* hist;        // [nchunks, E] per-chunk counts, then per-chunk base slots
  int* meta;        // off[E+1], rbp[E+1], kept[E], then counters (tile, barrier, abort)
  int* ready;       // [row blocks] finished up tiles per row block
  bf16* h;          // [P, I] activations, by sorted position
  bf16* outp;       // [P, H] unscaled expert outputs, by pair
  int T, H, I, E, k, cap, renorm;
  Waits waits;
};

static __device__ void route_phase(const MoeArgs& a, float* lg_all) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  float* lg = lg_all + warp * MOE_MAX_E;
  const int nwarps = gridDim.x * MOE_WARPS;
  const int hv = a.H / 8;
  for (int t = blockIdx.x * MOE_WARPS + warp; t < a.T; t += nwarps) {
    const bf16* xr = a.x + (long long)t * a.H;
    for (int e = 0; e < a.E; ++e) {
      const bf16* wrow = a.wr + (long long)e * a.H;
      float acc = 0.f;
      for (int v = lane; v < hv; v += 32) {
        float xf[8], wf[8];
        horizon::Vec<bf16>::load(xr + 8 * v, xf);
        horizon::Vec<bf16>::load(wrow + 8 * v, wf);
#pragma unroll
        for (int j = 0; j < 8; ++j) acc += xf[j] * wf[j];
      }
      acc = warp_sum(acc);
      if (lane == 0) lg[e] = acc;
    }
    __syncwarp();
    float m = -CUDART_INF_F;
    for (int e = lane; e < a.E; e += 32) {
      m = fmaxf(m, lg[e]);
      a.logits[(long long)t * a.E + e] = lg[e];
    }
    m = warp_max(m);
    float s = 0.f;
    for (int e = lane; e < a.E; e += 32) s += __expf(lg[e] - m);
    s = warp_sum(s);
    float chosen_p[MOE_MAX_K];
    int chosen_e[MOE_MAX_K];
    float total = 0.f;
#pragma unroll
    for (int j = 0; j < MOE_MAX_K; ++j) {
      chosen_p[j] = 0.f;
      chosen_e[j] = 0;
      if (j < a.k) {
        // Lane-local best, then a warp argmax: larger logit wins, equal logits go to the
        // lower expert index (the reference's stable sort).
        float bv = -CUDART_INF_F;
        int be = 0x7fffffff;
        for (int e = lane; e < a.E; e += 32) {
          const float v = lg[e];
          if (v > bv || (v == bv && e < be)) {
            bv = v;
            be = e;
          }
        }
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) {
          const float ov = __shfl_xor_sync(0xffffffffu, bv, o);
          const int oe = __shfl_xor_sync(0xffffffffu, be, o);
          if (ov > bv || (ov == bv && oe < be)) {
            bv = ov;
            be = oe;
          }
        }
        if (be < 0 || be >= a.E) be = 0;  // only if every logit is NaN; keeps indices valid
        chosen_e[j] = be;
        chosen_p[j] = __expf(bv - m) / s;
        total += chosen_p[j];
        __syncwarp();
        if (lane == (be & 31)) lg[be] = -CUDART_INF_F;
        __syncwarp();
      }
    }
    // Unrolled with static indices so chosen_* stay in registers.
#pragma unroll
    for (int j = 0; j < MOE_MAX_K; ++j) {
      if (lane == j && j < a.k) {
        a.tope[(long long)t * a.k + j] = chosen_e[j];
        a.topw[(long long)t * a.k + j] = a.renorm ? chosen_p[j] / total : chosen_p[j];
      }
    }
    __syncwarp();
  }
}

// ---------------------------------------------------------------- 2-4. count, scan, place

// A warp walks chunk c in pair order; `cnt` (E ints, this warp's) holds running per-expert
// counts. With `place`, each pair gets its slot and kept pairs are written to `sorted` (`off`:
// the expert offsets, in shared memory).
static __device__ void chunk_walk(const MoeArgs& a, int c, int* cnt, bool place, const int* off) {
  const int lane = threadIdx.x & 31;
  const int P = a.T * a.k;
  for (int e = lane; e < a.E; e += 32) cnt[e] = 0;
  __syncwarp();
  for (int step = 0; step < CHUNK / 32; ++step) {
    const int p = c * CHUNK + step * 32 + lane;
    const int e = p < P ? ldcg_i(a.tope + p) : -1;
    const unsigned peers = __match_any_sync(0xffffffffu, e);
    const int rank = e >= 0 ? cnt[e] + __popc(peers & ((1u << lane) - 1u)) : 0;
    __syncwarp();
    if (e >= 0 && lane == __ffs(peers) - 1) cnt[e] += __popc(peers);
    __syncwarp();
    if (place && e >= 0) {
      const int s = ldcg_i(a.hist + (long long)c * a.E + e) + rank;
      if (s < a.cap) {
        a.slot[p] = s;
        a.sorted[off[e] + s] = p;
      } else {
        a.slot[p] = -1;
      }
    }
  }
  __syncwarp();
  if (!place)
    for (int e = lane; e < a.E; e += 32) a.hist[(long long)c * a.E + e] = cnt[e];
  __syncwarp();
}

// Warp-wide inclusive prefix sum.
static __device__ __forceinline__ int warp_inclusive_sum(int v) {
  const int lane = threadIdx.x & 31;
#pragma unroll
  for (int o = 1; o < 32; o <<= 1) {
    const int t = __shfl_up_sync(0xffffffffu, v, o);
    if (lane >= o) v += t;
  }
  return v;
}

// Global warp e (of all blocks) turns expert e's per-chunk counts into per-chunk base slots
// (an exclusive prefix over the chunks, 32 at a time) and stores the expert's kept count.
static __device__ void scan_phase(const MoeArgs& a, int nchunks) {
  const int lane = threadIdx.x & 31;
  const int gw = blockIdx.x * MOE_WARPS + (threadIdx.x >> 5), nw = gridDim.x * MOE_WARPS;
  int* kept = a.meta + 2 * (a.E + 1);
  for (int e = gw; e < a.E; e += nw) {
    int run = 0;
    for (int c0 = 0; c0 < nchunks; c0 += 32) {
      const int c = c0 + lane;
      int* hp = a.hist + (long long)c * a.E + e;
      const int v = c < nchunks ? ldcg_i(hp) : 0;
      const int incl = warp_inclusive_sum(v);
      if (c < nchunks) *hp = run + incl - v;
      run += __shfl_sync(0xffffffffu, incl, 31);
    }
    if (lane == 0) kept[e] = min(run, a.cap);
  }
}

// Every block: off[e] (first sorted position of expert e, off[E] = kept pairs) into `s_off`
// (shared), by one warp scanning the kept counts; block 0 also stores off and the row-block
// prefix rbp (row blocks of FBM rows) to meta for the later phases.
static __device__ void offsets_phase(const MoeArgs& a, int* s_off) {
  const int lane = threadIdx.x & 31;
  if (threadIdx.x < 32) {
    int* off = a.meta;
    int* rbp = a.meta + a.E + 1;
    const int* kept = a.meta + 2 * (a.E + 1);
    int run_o = 0, run_r = 0;
    for (int e0 = 0; e0 < a.E; e0 += 32) {
      const int e = e0 + lane;
      const int n = e < a.E ? ldcg_i(kept + e) : 0;
      const int r = (n + FBM - 1) / FBM;
      const int io = warp_inclusive_sum(n), ir = warp_inclusive_sum(r);
      if (e < a.E) {
        s_off[e] = run_o + io - n;
        if (blockIdx.x == 0) {
          off[e] = run_o + io - n;
          rbp[e] = run_r + ir - r;
        }
      }
      run_o += __shfl_sync(0xffffffffu, io, 31);
      run_r += __shfl_sync(0xffffffffu, ir, 31);
    }
    if (lane == 0) {
      s_off[a.E] = run_o;
      if (blockIdx.x == 0) {
        off[a.E] = run_o;
        rbp[a.E] = run_r;
      }
    }
  }
  __syncthreads();
}

// 16 bytes of zeros or of src (src == nullptr means out of range).
static __device__ __forceinline__ uint4 load16(const bf16* src, bool l2_only) {
  if (src == nullptr) return make_uint4(0u, 0u, 0u, 0u);
  const uint4* p = reinterpret_cast<const uint4*>(src);
  return l2_only ? __ldcg(p) : __ldg(p);
}

// C[m, n] = sum_k A[m, k] * W[n, k] for a 128 x 64 tile: A rows given by `arow` pointers (per
// thread, its two rows r and r + 64; nullptr = padding row), W rows n0.. of a [N, K] matrix
// (and W1 when TWO; one row per thread). K % 8 == 0.
template <bool TWO>
static __device__ void tile_gemm(FwdTileSmem& sm, const bf16* arow0, const bf16* arow1, bool a_l2, const bf16* W0,
                                 const bf16* W1, int n0, int N, int K, float (&acc0)[2][4][4],
                                 float (&acc1)[2][4][4]) {
  const int tid = threadIdx.x;
  const int kv = tid & 3;   // which 8-element vector of the BK slice
  const int r0 = tid >> 2;  // rows r0 and r0 + 64 of A, row r0 of W
  const bf16* w0 = (n0 + r0 < N) ? W0 + (long long)(n0 + r0) * K : nullptr;
  const bf16* w1 = nullptr;
  if constexpr (TWO) w1 = (n0 + r0 < N) ? W1 + (long long)(n0 + r0) * K : nullptr;
#pragma unroll
  for (int mi = 0; mi < 2; ++mi)
#pragma unroll
    for (int ni = 0; ni < 4; ++ni)
#pragma unroll
      for (int c = 0; c < 4; ++c) {
        acc0[mi][ni][c] = 0.f;
        acc1[mi][ni][c] = 0.f;
      }
  // Register prefetch: the next slice's global loads are in flight while this slice's MMAs run.
  uint4 va0, va1, vb, vc;
  auto fetch = [&](int k0) {
    const int kc = k0 + kv * 8;
    const bool kin = kc < K;
    va0 = load16(kin && arow0 ? arow0 + kc : nullptr, a_l2);
    va1 = load16(kin && arow1 ? arow1 + kc : nullptr, a_l2);
    vb = load16(kin && w0 ? w0 + kc : nullptr, false);
    if constexpr (TWO) vc = load16(kin && w1 ? w1 + kc : nullptr, false);
  };
  fetch(0);
  for (int k0 = 0; k0 < K; k0 += BK) {
    __syncthreads();  // the previous slice's reads of shared memory are done
    *reinterpret_cast<uint4*>(&sm.A.rk[r0][kv * 8]) = va0;
    *reinterpret_cast<uint4*>(&sm.A.rk[r0 + 64][kv * 8]) = va1;
    *reinterpret_cast<uint4*>(&sm.B0.rk[r0][kv * 8]) = vb;
    if constexpr (TWO) *reinterpret_cast<uint4*>(&sm.B1.rk[r0][kv * 8]) = vc;
    __syncthreads();
    if (k0 + BK < K) fetch(k0 + BK);
    mma_slice<TWO>(sm, acc0, acc1);
  }
}

static __device__ __forceinline__ float silu(float v) { return v / (1.f + __expf(-v)); }

// Tile t of an expert's span in the list -> (row block, N tile): N tile by N tile, each over
// all the expert's row blocks. `per` = N tiles per row block; the expert's tiles are
// [rbp[e] * per, rbp[e + 1] * per), so e is also the expert of row block t / per.
static __device__ __forceinline__ void grouped_tile(const int* rbp, int E, long long t, int per, int& e, int& rb,
                                                    int& nt) {
  e = expert_of_row_block(rbp, E, (int)(t / per));
  const int r0 = ldcg_i(rbp + e), re = ldcg_i(rbp + e + 1) - r0;
  const long long local = t - (long long)r0 * per;
  nt = (int)(local / re);
  rb = r0 + (int)(local % re);
}

// False when the launch gave up waiting (see moe_tiles.cuh): the kernel returns.
static __device__ bool tiles_phase(const MoeArgs& a, FwdTileSmem& sm, int* tile_counter) {
  __shared__ int s_tile;
  const int* off = a.meta;
  const int* rbp = a.meta + a.E + 1;
  const int* kept = a.meta + 2 * (a.E + 1);
  const int R = ldcg_i(rbp + a.E);
  const int nI = (a.I + BN - 1) / BN, nH = (a.H + BN - 1) / BN;
  const long long n_up = (long long)R * nI, n_total = n_up + (long long)R * nH;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int wm = (warp >> 1) * 32, wn = (warp & 1) * 32;
  const int g = lane >> 2, q = lane & 3;
  const int r0 = threadIdx.x >> 2;
  float acc0[2][4][4], acc1[2][4][4];
  for (;;) {
    if (threadIdx.x == 0) s_tile = atomicAdd(tile_counter, 1);
    __syncthreads();
    const long long tile = s_tile;
    __syncthreads();  // everyone has read s_tile before thread 0 may overwrite it
    if (tile >= n_total) return true;
    const bool up = tile < n_up;
    int e, rb, nt;
    grouped_tile(rbp, a.E, up ? tile : tile - n_up, up ? nI : nH, e, rb, nt);
    const int rb_local = rb - ldcg_i(rbp + e);
    const int rows = min(FBM, ldcg_i(kept + e) - rb_local * FBM);
    const int base = ldcg_i(off + e) + rb_local * FBM;  // first sorted position of this block
    const int n0 = nt * BN;
    if (up) {
      const bf16* ar0 = nullptr;
      const bf16* ar1 = nullptr;
      if (r0 < rows) ar0 = a.x + (long long)(ldcg_i(a.sorted + base + r0) / a.k) * a.H;
      if (r0 + 64 < rows) ar1 = a.x + (long long)(ldcg_i(a.sorted + base + r0 + 64) / a.k) * a.H;
      const long long wofs = (long long)e * a.I * a.H;
      tile_gemm<true>(sm, ar0, ar1, false, a.w1 + wofs, a.w3 + wofs, n0, a.I, a.H, acc0, acc1);
#pragma unroll
      for (int mi = 0; mi < 2; ++mi)
#pragma unroll
        for (int ni = 0; ni < 4; ++ni)
#pragma unroll
          for (int hh = 0; hh < 2; ++hh) {
            const int r = wm + mi * 16 + g + hh * 8;
            const int col = n0 + wn + ni * 8 + 2 * q;
            if (r < rows && col < a.I) {
              const float v0 = silu(acc0[mi][ni][2 * hh]) * acc1[mi][ni][2 * hh];
              const float v1 = silu(acc0[mi][ni][2 * hh + 1]) * acc1[mi][ni][2 * hh + 1];
              *reinterpret_cast<__nv_bfloat162*>(a.h + (long long)(base + r) * a.I + col) =
                  __floats2bfloat162_rn(v0, v1);
            }
          }
      __threadfence();
      __syncthreads();
      if (threadIdx.x == 0) atomicAdd(a.ready + rb, 1);
    } else {
      if (!block_wait_at_least(a.ready + rb, nI, a.waits)) return false;
      const bf16* ar0 = r0 < rows ? a.h + (long long)(base + r0) * a.I : nullptr;
      const bf16* ar1 = r0 + 64 < rows ? a.h + (long long)(base + r0 + 64) * a.I : nullptr;
      tile_gemm<false>(sm, ar0, ar1, true, a.w2 + (long long)e * a.H * a.I, nullptr, n0, a.H, a.I, acc0, acc1);
#pragma unroll
      for (int mi = 0; mi < 2; ++mi)
#pragma unroll
        for (int hh = 0; hh < 2; ++hh) {
          const int r = wm + mi * 16 + g + hh * 8;
          if (r >= rows) continue;
          const long long pair = ldcg_i(a.sorted + base + r);
#pragma unroll
          for (int ni = 0; ni < 4; ++ni) {
            const int col = n0 + wn + ni * 8 + 2 * q;
            if (col < a.H)
              *reinterpret_cast<__nv_bfloat162*>(a.outp + pair * a.H + col) =
                  __floats2bfloat162_rn(acc0[mi][ni][2 * hh], acc0[mi][ni][2 * hh + 1]);
          }
        }
    }
  }
}

// ---------------------------------------------------------------- 6. combine

static __device__ void combine_phase(const MoeArgs& a) {
  const int hv = a.H / 8;
  const long long total = (long long)a.T * hv;
  const long long stride = (long long)gridDim.x * blockDim.x;
  for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < total; i += stride) {
    const long long t = i / hv;
    const int v = (int)(i - t * hv);
    float acc[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
    for (int j = 0; j < a.k; ++j) {
      const long long p = t * a.k + j;
      if (ldcg_i(a.slot + p) < 0) continue;
      const float w = ldcg_f(a.topw + p);
      const uint4 raw = __ldcg(reinterpret_cast<const uint4*>(a.outp + p * a.H + 8 * v));
      float f[8];
      horizon::unpack8(*reinterpret_cast<const horizon::Bf16x8*>(&raw), f);
#pragma unroll
      for (int c = 0; c < 8; ++c) acc[c] += w * f[c];
    }
    horizon::Vec<bf16>::store(a.y + t * a.H + 8 * v, acc);
  }
}

union alignas(16) MoeSmem {
  FwdTileSmem tile;
  float route_logits[MOE_WARPS * MOE_MAX_E];
  struct {
    int counts[MOE_WARPS * MOE_MAX_E];
    int off[MOE_MAX_E + 1];
  } chunks;
};

}  // namespace

// Requirements (checked by the Python side): H % 8 == 0, I % 8 == 0, 1 <= k <= 8, E <= 256,
// 16-byte aligned contiguous tensors, zeroed meta counters and ready[], a cooperative launch.
// status: host-visible int[3] (see moe_tiles.cuh) or null; spin_limit_ms bounds every wait.
extern "C" __global__ void __launch_bounds__(MOE_THREADS)
horizon_flash_moe_fwd(bf16* y, const bf16* x, const bf16* wr, const bf16* w1, const bf16* w3, const bf16* w2,
                      float* logits, int* tope, float* topw, int* slot, int* sorted, int* hist, int* meta, int* ready,
                      bf16* h, bf16* outp, int* status, int T, int H, int I, int E, int k, int cap, int renorm,
                      int spin_limit_ms) {
  __shared__ MoeSmem smem;
  int* counters = meta + 3 * E + 2;  // [0] tile queue, [1] grid barrier, [2] abort
  MoeArgs a{y, x, wr, w1, w3, w2, logits, tope, topw, slot, sorted, hist, meta, ready, h, outp,
            T, H, I, E, k, cap, renorm, Waits{counters + 2, status, spin_limit_ms * 1000000LL, 1}};
  const int P = T * k;
  const int nchunks = (P + CHUNK - 1) / CHUNK;
  const int warp = threadIdx.x >> 5;
  const int gw = blockIdx.x * MOE_WARPS + warp, nw = gridDim.x * MOE_WARPS;

  route_phase(a, smem.route_logits);
  if (!grid_barrier(counters + 1, 1, a.waits)) return;
  for (int c = gw; c < nchunks; c += nw) chunk_walk(a, c, smem.chunks.counts + warp * MOE_MAX_E, false, nullptr);
  if (!grid_barrier(counters + 1, 2, a.waits)) return;
  scan_phase(a, nchunks);
  if (!grid_barrier(counters + 1, 3, a.waits)) return;
  offsets_phase(a, smem.chunks.off);
  for (int c = gw; c < nchunks; c += nw) chunk_walk(a, c, smem.chunks.counts + warp * MOE_MAX_E, true, smem.chunks.off);
  if (!grid_barrier(counters + 1, 4, a.waits)) return;
  if (!tiles_phase(a, smem.tile, counters)) return;
  if (!grid_barrier(counters + 1, 5, a.waits)) return;
  combine_phase(a);
}
