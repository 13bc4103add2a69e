// flash_moe backward: the whole MoE layer's gradient in one persistent launch (FLASHMOE.md,
// "Backward"), driven by the routing state the forward (flash_moe.cu) left behind.
//
// Phases, separated by grid-wide barriers (the host launches the grid cooperatively, sized by
// the occupancy query, so every block is resident; every wait is bounded, see moe_tiles.cuh):
//   1. pairs   one warp per token: for each kept pair dw = <dy[t], out_pair> and the scaled
//              gradient row dyp[pos] = w * dy[t] (bf16, by sorted position pos = off[e] + slot);
//              the router backward of the token (through the optional renormalisation and
//              the fp32 softmax, plus the incoming dlogits) into dl [T, Ep] (bf16, columns
//              E..Ep-1 zero). Block 0 also builds the row-block prefix rbp[E+1].
//   2. tiles   blocks pull tile indices from an atomic counter over this list, in order:
//              a. mid   (row block, I tile): g, u recomputed from the gathered x rows, dh =
//                       dyp . w2[e]; SwiGLU backward in the epilogue -> dg, du (bf16, by
//                       sorted position); then bump ready[row block].
//              b. dw2   (expert, H tile, I tile): dw2[e] = dyp^T . h over the expert's rows.
//              c. dwr   (E tile, H tile): dWr = dl^T . x over all tokens.
//              d. dx    (row block, H tile): waits for its row block's mid tiles;
//                       dx_pair = dg . w1[e] + du . w3[e] (bf16, by pair, like outp).
//              e. dw13  (expert, H tile, I tile): waits for all of the expert's mid tiles;
//                       dw1[e] = dg^T . x_rows, dw3[e] = du^T . x_rows.
//              Every tile a block waits for (a) sits earlier in the list, so it was handed
//              out already to a running block that itself never waits: no deadlock.
//   3. combine (token block, H tile), grid-stride: dx[t] = sum_j dx_pair(t, j) over the kept
//              pairs in choice order + dl[t] . Wr.
//
// Determinism: every output element has exactly one writer (its tile) and a fixed summation
// order; no float atomics. Empty experts get weight-gradient tiles with an empty reduction
// (zeros); dropped pairs get no rows; partial tiles are masked on load (zeros) and on store.
//
// Tensor cores: mma.sync m16n8k16 bf16 -> fp32 (sm_80 and sm_90a), 64 x 64 tiles, 4 warps of
// 32 x 32, K slices of 32 staged in shared memory with the next slice prefetched into
// registers. Operands are "views" of row-major matrices, optionally with rows gathered through
// `sorted`; a view is read either row-wise (tile row = matrix row, K along the row) or
// transposed (tile row = matrix column, K down the rows: the weight-gradient reductions over
// slots/tokens), staged k-major as loaded and transposed by ldmatrix.trans into fragments.
// Data written earlier in this launch (dyp, dl, dg, du, dx_pair, rbp) is read with
// ld.global.cg (L2), never through a possibly stale L1 line.
#include "moe/moe_tiles.cuh"

#include <math_constants.h>

// A named namespace: the unity build puts every kernel file in one translation unit, and the
// forward's helpers live in an anonymous namespace with the same short names.
namespace flash_moe_bwd {
using namespace horizon_moe;

constexpr int THREADS = 128;
constexpr int WARPS = THREADS / 32;
constexpr int MAX_K = 8;

struct Args {
  bf16* dx;        // [T, H]
  bf16* dwr;       // [E, H]
  bf16* dw1;       // [E, I, H]
  bf16* dw3;       // [E, I, H]
  bf16* dw2;       // [E, H, I]
  const bf16* dy;  // [T, H]
  const float* dlogits;  // [T, E] fp32 or nullptr (no gradient on the logits output)
  const bf16* x;
  const bf16* wr;
  const bf16* w1;
  const bf16* w3;
  const bf16* w2;
  const float* logits;  // forward state (see kernels/moe/fused.py, MoeState)
  const int* tope;
  const float* topw;
  const int* slot;
  const int* sorted;
  const int* off;
  const bf16* h;     // [P, I] by sorted position
  const bf16* outp;  // [P, H] by pair
  bf16* dyp;         // scratch [P, H] by sorted position
  bf16* dl;          // scratch [T, Ep]
  bf16* dg;          // scratch [P, I] by sorted position
  bf16* du;          // scratch [P, I] by sorted position
  bf16* dxp;         // scratch [P, H] by pair
  int* meta;         // rbp[E+1], then counters: tile queue, grid barrier, abort (zeroed)
  int* ready;        // [row blocks] finished mid tiles (zeroed)
  int T, H, I, E, Ep, k, renorm;
  Waits waits;
};

// ---------------------------------------------------------------- 1. pairs and router

static __device__ void pairs_phase(const Args& a) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int nwarps = gridDim.x * WARPS;
  const int hv = a.H / 8;
  if (blockIdx.x == 0 && threadIdx.x == 0) {
    int r = 0;
    for (int e = 0; e < a.E; ++e) {
      a.meta[e] = r;
      r += (a.off[e + 1] - a.off[e] + BM - 1) / BM;
    }
    a.meta[a.E] = r;
  }
  for (int t = blockIdx.x * WARPS + warp; t < a.T; t += nwarps) {
    const float* lg = a.logits + (long long)t * a.E;
    float m = -CUDART_INF_F;
    for (int e = lane; e < a.E; e += 32) m = fmaxf(m, lg[e]);
    m = warp_max(m);
    float s = 0.f;
    for (int e = lane; e < a.E; e += 32) s += expf(lg[e] - m);
    s = warp_sum(s);
    const bf16* dyr = a.dy + (long long)t * a.H;
    // Per choice, in registers (static indices only): weight gradient, probability, expert.
    float dw[MAX_K], pj[MAX_K];
    int ej[MAX_K];
    float psum = 0.f;
#pragma unroll
    for (int j = 0; j < MAX_K; ++j) {
      dw[j] = 0.f;
      pj[j] = 0.f;
      ej[j] = -1;
      if (j < a.k) {
        const long long p = (long long)t * a.k + j;
        const int e = a.tope[p];
        const int sl = a.slot[p];
        ej[j] = e;
        pj[j] = expf(lg[e] - m) / s;
        psum += pj[j];
        if (sl >= 0) {  // kept: outp[p] was written by the forward; dropped rows never are
          const float w = a.topw[p];
          const bf16* orow = a.outp + p * a.H;
          bf16* drow = a.dyp + (long long)(a.off[e] + sl) * a.H;
          float acc = 0.f;
          for (int v = lane; v < hv; v += 32) {
            float fy[8], fo[8], fs[8];
            horizon::Vec<bf16>::load(dyr + 8 * v, fy);
            horizon::Vec<bf16>::load(orow + 8 * v, fo);
#pragma unroll
            for (int c = 0; c < 8; ++c) {
              acc += fy[c] * fo[c];
              fs[c] = w * fy[c];
            }
            horizon::Vec<bf16>::store(drow + 8 * v, fs);
          }
          dw[j] = warp_sum(acc);
        }
      }
    }
    // Renormalised weights w_j = p_j / S: dp_j = (dw_j - sum_i dw_i w_i) / S.
    float dp[MAX_K];
    float wdot = 0.f;
#pragma unroll
    for (int j = 0; j < MAX_K; ++j) wdot += dw[j] * pj[j];
#pragma unroll
    for (int j = 0; j < MAX_K; ++j) dp[j] = j >= a.k ? 0.f : a.renorm ? (dw[j] - wdot / psum) / psum : dw[j];
    // Softmax: dl_e = p_e (dp_e - sum_j dp_j p_j), dp_e nonzero only at the chosen experts.
    float c = 0.f;
#pragma unroll
    for (int j = 0; j < MAX_K; ++j) c += dp[j] * pj[j];
    for (int e = lane; e < a.Ep; e += 32) {
      float v = 0.f;
      if (e < a.E) {
        float sel = 0.f;
#pragma unroll
        for (int j = 0; j < MAX_K; ++j) sel += ej[j] == e ? dp[j] : 0.f;
        v = expf(lg[e] - m) / s * (sel - c);
        if (a.dlogits != nullptr) v += a.dlogits[(long long)t * a.E + e];
      }
      a.dl[(long long)t * a.Ep + e] = __float2bfloat16_rn(v);
    }
  }
}

// ---------------------------------------------------------------- tile machinery

// A row-major bf16 matrix M [nrows, ncols] whose row j (0 <= j < nrows) is row
// (gather ? gather[first + j] / gdiv : first + j) of `base` (ld elements between rows).
// ncols % 8 == 0 and ld % 8 == 0 with a 16-byte aligned base: every 8-column chunk is one
// aligned 16-byte load, entirely in or entirely out of range.
struct View {
  const bf16* base;
  const int* gather;
  long long ld;
  int first, gdiv, nrows, ncols;
  bool l2;  // written earlier in this launch: read through L2 only
};

static __device__ __forceinline__ View view(const bf16* base, long long ld, int first, int nrows, int ncols, bool l2,
                                            const int* gather = nullptr, int gdiv = 1) {
  View v;
  v.base = base;
  v.gather = gather;
  v.ld = ld;
  v.first = first;
  v.gdiv = gdiv;
  v.nrows = nrows;
  v.ncols = ncols;
  v.l2 = l2;
  return v;
}

// Pointer to row j of the view, nullptr when j is out of range (reads as zeros).
static __device__ __forceinline__ const bf16* row_ptr(const View& v, int j) {
  if (j < 0 || j >= v.nrows) return nullptr;
  const long long r = v.gather ? (long long)(ldcg_i(v.gather + v.first + j) / v.gdiv) : (long long)(v.first + j);
  return v.base + r * v.ld;
}

static __device__ __forceinline__ uint4 load16(const bf16* src, bool l2) {
  if (src == nullptr) return make_uint4(0u, 0u, 0u, 0u);
  const uint4* p = reinterpret_cast<const uint4*>(src);
  return l2 ? __ldcg(p) : __ldg(p);
}

// Per-thread loading duty for one operand and one BK slice (two 16-byte chunks):
//  row-wise (TR = false): tile rows lr = tid / 4 and lr + 32, K columns k0 + 8 (tid % 4) ..+7;
//    the row pointers are fixed for the tile (rp0, rp1).
//  transposed (TR = true): matrix rows (= K) k0 + kr and k0 + kr + 16 with kr = tid / 8,
//    matrix columns t0 + 8 (tid % 8) ..+7 (= tile rows).
template <bool TR>
static __device__ __forceinline__ void fetch2(const View& v, int t0, int k0, const bf16* rp0, const bf16* rp1, uint4& o0,
                                              uint4& o1) {
  const int tid = threadIdx.x;
  if constexpr (!TR) {
    const int kc = k0 + (tid & 3) * 8;
    const bool kin = kc < v.ncols;
    o0 = load16(kin && rp0 ? rp0 + kc : nullptr, v.l2);
    o1 = load16(kin && rp1 ? rp1 + kc : nullptr, v.l2);
  } else {
    const int kr = tid >> 3;
    const int col = t0 + (tid & 7) * 8;
    const bool cin = col < v.ncols;
    const bf16* q0 = cin ? row_ptr(v, k0 + kr) : nullptr;
    const bf16* q1 = cin ? row_ptr(v, k0 + kr + 16) : nullptr;
    o0 = load16(q0 ? q0 + col : nullptr, v.l2);
    o1 = load16(q1 ? q1 + col : nullptr, v.l2);
  }
}

// Writes a thread's two chunks into the operand's shared slice: row-major (s.rk[row][k]) or,
// transposed, k-major as loaded (s.kr[k][row]: 16-byte stores, 8 lanes per 128 contiguous
// bytes, no bank conflicts; mma_slice reads it back with ldmatrix.trans).
template <bool TR, int ROWS>
static __device__ __forceinline__ void stage2(Stage<ROWS>& s, const uint4& v0, const uint4& v1) {
  const int tid = threadIdx.x;
  if constexpr (!TR) {
    const int r = tid >> 2, kv = (tid & 3) * 8;
    *reinterpret_cast<uint4*>(&s.rk[r][kv]) = v0;
    *reinterpret_cast<uint4*>(&s.rk[r + 32][kv]) = v1;
  } else {
    const int kr = tid >> 3, c = (tid & 7) * 8;
    *reinterpret_cast<uint4*>(&s.kr[kr][c]) = v0;
    *reinterpret_cast<uint4*>(&s.kr[kr + 16][c]) = v1;
  }
}

template <bool TR>
static __device__ __forceinline__ void fixed_rows(const View& v, int t0, const bf16*& r0, const bf16*& r1) {
  r0 = r1 = nullptr;
  if constexpr (!TR) {
    r0 = row_ptr(v, t0 + (threadIdx.x >> 2));
    r1 = row_ptr(v, t0 + (threadIdx.x >> 2) + 32);
  }
}

// acc0 += tileA . tileB0^T (and acc1 += tileA . tileB1^T when TWO) over k in [0, K), where
// tileA(m, k) = A(at0 + m, k) (row-wise) or A(k, at0 + m) (transposed), likewise B with bt0.
// Accumulates: the caller zeroes. acc1 is untouched unless TWO.
template <bool TA, bool TB, bool TWO>
static __device__ void tile_mma(TileSmem& sm, const View& A, int at0, const View& B0, const View& B1, int bt0, int K,
                                float (&acc0)[2][4][4], float (&acc1)[2][4][4]) {
  const bf16 *ra0, *ra1, *rb0, *rb1, *rc0 = nullptr, *rc1 = nullptr;
  fixed_rows<TA>(A, at0, ra0, ra1);
  fixed_rows<TB>(B0, bt0, rb0, rb1);
  if constexpr (TWO) fixed_rows<TB>(B1, bt0, rc0, rc1);
  uint4 va0, va1, vb0, vb1, vc0, vc1;
  auto fetch = [&](int k0) {
    fetch2<TA>(A, at0, k0, ra0, ra1, va0, va1);
    fetch2<TB>(B0, bt0, k0, rb0, rb1, vb0, vb1);
    if constexpr (TWO) fetch2<TB>(B1, bt0, k0, rc0, rc1, vc0, vc1);
  };
  if (K > 0) fetch(0);
  for (int k0 = 0; k0 < K; k0 += BK) {
    __syncthreads();  // the previous slice's (or tile's) reads of shared memory are done
    stage2<TA>(sm.A, va0, va1);
    stage2<TB>(sm.B0, vb0, vb1);
    if constexpr (TWO) stage2<TB>(sm.B1, vc0, vc1);
    __syncthreads();
    if (k0 + BK < K) fetch(k0 + BK);
    mma_slice<TWO, TA, TB>(sm, acc0, acc1);
  }
}

static __device__ __forceinline__ void zero(float (&acc)[2][4][4]) {
#pragma unroll
  for (int mi = 0; mi < 2; ++mi)
#pragma unroll
    for (int ni = 0; ni < 4; ++ni)
#pragma unroll
      for (int c = 0; c < 4; ++c) acc[mi][ni][c] = 0.f;
}


// ---------------------------------------------------------------- 2. tiles

// (a) mid tile: rows [base, base + rows) of expert e, I columns [i0, i0 + 64).
// dh is computed first and parked in shared memory (each thread its own 32 values, laid out
// [value][thread] so a warp's accesses hit 32 banks), so at most two accumulators are live.
static __device__ void mid_tile(const Args& a, TileSmem& sm, int e, int base, int rows, int i0) {
  __shared__ float stash[32][THREADS];
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int wm = (warp >> 1) * 32, wn = (warp & 1) * 32;
  const int g = lane >> 2, q = lane & 3;
  const long long wofs = (long long)e * a.I * a.H;
  float acc0[2][4][4], acc1[2][4][4];
  zero(acc0);
  {
    const View dr = view(a.dyp, a.H, base, rows, a.H, true);
    const View v2 = view(a.w2 + (long long)e * a.H * a.I, a.I, 0, a.H, a.I, false);  // [H, I], K = H
    tile_mma<false, true, false>(sm, dr, 0, v2, v2, i0, a.H, acc0, acc0);  // dh
  }
#pragma unroll
  for (int mi = 0; mi < 2; ++mi)
#pragma unroll
    for (int ni = 0; ni < 4; ++ni)
#pragma unroll
      for (int c = 0; c < 4; ++c) stash[(mi * 4 + ni) * 4 + c][tid] = acc0[mi][ni][c];
  zero(acc0);
  zero(acc1);
  {
    const View xr = view(a.x, a.H, base, rows, a.H, false, a.sorted, a.k);
    const View v1 = view(a.w1 + wofs, a.H, 0, a.I, a.H, false);
    const View v3 = view(a.w3 + wofs, a.H, 0, a.I, a.H, false);
    tile_mma<false, false, true>(sm, xr, 0, v1, v3, i0, a.H, acc0, acc1);  // g, u
  }
  // dg = dh * u * s (1 + g (1 - s)), du = dh * g * s with s = sigmoid(g).
#pragma unroll
  for (int mi = 0; mi < 2; ++mi)
#pragma unroll
    for (int ni = 0; ni < 4; ++ni)
#pragma unroll
      for (int hh = 0; hh < 2; ++hh) {
        const int r = wm + mi * 16 + g + hh * 8;
        const int col = i0 + wn + ni * 8 + 2 * q;
        if (r < rows && col < a.I) {  // col even and I % 8 == 0: col + 1 < I too
          float dgv[2], duv[2];
#pragma unroll
          for (int c = 0; c < 2; ++c) {
            const int ci = 2 * hh + c;
            const float dh = stash[(mi * 4 + ni) * 4 + ci][tid];
            const float gv = acc0[mi][ni][ci], uv = acc1[mi][ni][ci];
            const float sg = 1.f / (1.f + expf(-gv));
            dgv[c] = dh * uv * sg * (1.f + gv * (1.f - sg));
            duv[c] = dh * gv * sg;
          }
          const long long o = (long long)(base + r) * a.I + col;
          *reinterpret_cast<__nv_bfloat162*>(a.dg + o) = __floats2bfloat162_rn(dgv[0], dgv[1]);
          *reinterpret_cast<__nv_bfloat162*>(a.du + o) = __floats2bfloat162_rn(duv[0], duv[1]);
        }
      }
}

// Stores a 64 x 64 fp32 tile C(m, n) to a bf16 matrix at dst + m * ld_m + n * ld_n, masked to
// m < M, n < N. ld_n == 1 (with N even) stores column pairs as one bf16x2.
static __device__ void store_tile(bf16* dst, long long ld_m, long long ld_n, int m0, int n0, int M, int N,
                                  const float (&acc)[2][4][4]) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int wm = (warp >> 1) * 32, wn = (warp & 1) * 32;
  const int g = lane >> 2, q = lane & 3;
#pragma unroll
  for (int mi = 0; mi < 2; ++mi)
#pragma unroll
    for (int ni = 0; ni < 4; ++ni)
#pragma unroll
      for (int hh = 0; hh < 2; ++hh) {
        const int m = m0 + wm + mi * 16 + g + hh * 8;
        const int n = n0 + wn + ni * 8 + 2 * q;
        if (m >= M) continue;
        const float v0 = acc[mi][ni][2 * hh], v1 = acc[mi][ni][2 * hh + 1];
        bf16* p = dst + m * ld_m + n * ld_n;
        if (ld_n == 1) {
          if (n < N) *reinterpret_cast<__nv_bfloat162*>(p) = __floats2bfloat162_rn(v0, v1);
        } else {
          if (n < N) p[0] = __float2bfloat16_rn(v0);
          if (n + 1 < N) p[ld_n] = __float2bfloat16_rn(v1);
        }
      }
}

// (d) dx tile: dx_pair for rows [base, base + rows) of expert e, H columns [h0, h0 + 64).
static __device__ void dx_tile(const Args& a, TileSmem& sm, int e, int base, int rows, int h0) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int wm = (warp >> 1) * 32, wn = (warp & 1) * 32;
  const int g = lane >> 2, q = lane & 3;
  const long long wofs = (long long)e * a.I * a.H;
  float acc[2][4][4];
  zero(acc);
  const View vdg = view(a.dg, a.I, base, rows, a.I, true);
  const View vdu = view(a.du, a.I, base, rows, a.I, true);
  const View v1 = view(a.w1 + wofs, a.H, 0, a.I, a.H, false);  // [I, H], K = I
  const View v3 = view(a.w3 + wofs, a.H, 0, a.I, a.H, false);
  tile_mma<false, true, false>(sm, vdg, 0, v1, v1, h0, a.I, acc, acc);
  tile_mma<false, true, false>(sm, vdu, 0, v3, v3, h0, a.I, acc, acc);
#pragma unroll
  for (int mi = 0; mi < 2; ++mi)
#pragma unroll
    for (int hh = 0; hh < 2; ++hh) {
      const int r = wm + mi * 16 + g + hh * 8;
      if (r >= rows) continue;
      const long long pair = ldcg_i(a.sorted + base + r);
#pragma unroll
      for (int ni = 0; ni < 4; ++ni) {
        const int col = h0 + wn + ni * 8 + 2 * q;
        if (col < a.H)
          *reinterpret_cast<__nv_bfloat162*>(a.dxp + pair * a.H + col) =
              __floats2bfloat162_rn(acc[mi][ni][2 * hh], acc[mi][ni][2 * hh + 1]);
      }
    }
}

// (b) dw2[e](h, i) = sum over the expert's rows s of dyp[s, h] h[s, i]; empty expert: zeros.
static __device__ void dw2_tile(const Args& a, TileSmem& sm, int e, int h0, int i0) {
  float acc[2][4][4];
  zero(acc);
  const int oe = a.off[e], ne = a.off[e + 1] - oe;
  const View vd = view(a.dyp, a.H, oe, ne, a.H, true);
  const View vh = view(a.h, a.I, oe, ne, a.I, false);
  tile_mma<true, true, false>(sm, vd, h0, vh, vh, i0, ne, acc, acc);
  store_tile(a.dw2 + (long long)e * a.H * a.I, a.I, 1, h0, i0, a.H, a.I, acc);
}

// (c) dWr(e, h) = sum over tokens t of dl[t, e] x[t, h].
static __device__ void dwr_tile(const Args& a, TileSmem& sm, int e0, int h0) {
  float acc[2][4][4];
  zero(acc);
  const View vl = view(a.dl, a.Ep, 0, a.T, a.Ep, true);
  const View vx = view(a.x, a.H, 0, a.T, a.H, false);
  tile_mma<true, true, false>(sm, vl, e0, vx, vx, h0, a.T, acc, acc);
  store_tile(a.dwr, a.H, 1, e0, h0, a.E, a.H, acc);
}

// (e) dw1[e](i, h) = sum_s dg[s, i] x[t(s), h] and dw3 with du, computed as C(m = h, n = i) so
// the gathered x rows are the shared operand; empty expert: zeros.
static __device__ void dw13_tile(const Args& a, TileSmem& sm, int e, int h0, int i0) {
  float acc0[2][4][4], acc1[2][4][4];
  zero(acc0);
  zero(acc1);
  const int oe = a.off[e], ne = a.off[e + 1] - oe;
  const View vx = view(a.x, a.H, oe, ne, a.H, false, a.sorted, a.k);
  const View vdg = view(a.dg, a.I, oe, ne, a.I, true);
  const View vdu = view(a.du, a.I, oe, ne, a.I, true);
  tile_mma<true, true, true>(sm, vx, h0, vdg, vdu, i0, ne, acc0, acc1);
  const long long wofs = (long long)e * a.I * a.H;
  store_tile(a.dw1 + wofs, 1, a.H, h0, i0, a.H, a.I, acc0);
  store_tile(a.dw3 + wofs, 1, a.H, h0, i0, a.H, a.I, acc1);
}

static __device__ __forceinline__ long long next_tile(int* tile_counter) {
  __shared__ int s_tile;
  if (threadIdx.x == 0) s_tile = atomicAdd(tile_counter, 1);
  __syncthreads();
  const long long tile = s_tile;
  __syncthreads();  // everyone has read s_tile before thread 0 may overwrite it
  return tile;
}

// Row block rb -> (expert, first sorted position, rows).
static __device__ __forceinline__ void row_block(const Args& a, int rb, int& e, int& base, int& rows) {
  const int* rbp = a.meta;
  e = expert_of_row_block(rbp, a.E, rb);
  const int rb_local = rb - ldcg_i(rbp + e);
  const int oe = a.off[e];
  rows = min(BM, a.off[e + 1] - oe - rb_local * BM);
  base = oe + rb_local * BM;
}

// Tiles come off one counter in increasing order, so a block walks the kinds in list order:
// one loop per kind (one kind's code per loop also keeps ptxas's register allocation per
// kind; a single loop over all kinds needed ~250 registers). False when the launch gave up
// waiting (see moe_tiles.cuh): the kernel returns.
static __device__ bool tiles_phase(const Args& a, TileSmem& sm, int* tile_counter) {
  const int* rbp = a.meta;
  const long long R = ldcg_i(rbp + a.E);
  const long long nI = (a.I + BN - 1) / BN, nH = (a.H + BN - 1) / BN, nE = (a.E + BM - 1) / BM;
  const long long e_mid = R * nI;
  const long long e_dw2 = e_mid + (long long)a.E * nH * nI;
  const long long e_dwr = e_dw2 + nE * nH;
  const long long e_dx = e_dwr + R * nH;
  const long long e_dw13 = e_dx + (long long)a.E * nH * nI;
  long long tile = next_tile(tile_counter);
  for (; tile < e_mid; tile = next_tile(tile_counter)) {
    const int rb = (int)(tile / nI);
    int e, base, rows;
    row_block(a, rb, e, base, rows);
    mid_tile(a, sm, e, base, rows, (int)(tile % nI) * BN);
    __threadfence();
    __syncthreads();
    if (threadIdx.x == 0) atomicAdd(a.ready + rb, 1);
  }
  for (; tile < e_dw2; tile = next_tile(tile_counter)) {
    const long long local = tile - e_mid;
    const long long rest = local % (nH * nI);
    dw2_tile(a, sm, (int)(local / (nH * nI)), (int)(rest / nI) * BM, (int)(rest % nI) * BN);
  }
  for (; tile < e_dwr; tile = next_tile(tile_counter)) {
    const long long local = tile - e_dw2;
    dwr_tile(a, sm, (int)(local / nH) * BM, (int)(local % nH) * BN);
  }
  for (; tile < e_dx; tile = next_tile(tile_counter)) {
    const long long local = tile - e_dwr;
    const int rb = (int)(local / nH);
    int e, base, rows;
    row_block(a, rb, e, base, rows);
    if (!block_wait_at_least(a.ready + rb, (int)nI, a.waits)) return false;
    dx_tile(a, sm, e, base, rows, (int)(local % nH) * BN);
  }
  for (; tile < e_dw13; tile = next_tile(tile_counter)) {
    const long long local = tile - e_dx;
    const int e = (int)(local / (nH * nI));
    const long long rest = local % (nH * nI);
    __shared__ int s_ok;
    if (threadIdx.x == 0) {
      bool ok = true;
      const int r1 = ldcg_i(rbp + e + 1);
      for (int rb = ldcg_i(rbp + e); ok && rb < r1; ++rb) ok = wait_at_least(a.ready + rb, (int)nI, a.waits);
      s_ok = ok;
      __threadfence();
    }
    __syncthreads();
    if (!s_ok) return false;  // (rewritten only after next_tile's barriers)
    dw13_tile(a, sm, e, (int)(rest / nI) * BM, (int)(rest % nI) * BN);
  }
  return true;
}

// ---------------------------------------------------------------- 3. combine

static __device__ void combine_phase(const Args& a, TileSmem& sm) {
  const int nT = (a.T + BM - 1) / BM, nH = (a.H + BN - 1) / BN;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int wm = (warp >> 1) * 32, wn = (warp & 1) * 32;
  const int g = lane >> 2, q = lane & 3;
  float acc[2][4][4];
  for (int tile = blockIdx.x; tile < nT * nH; tile += gridDim.x) {
    const int t0 = (tile / nH) * BM, h0 = (tile % nH) * BN;
    zero(acc);
    const View vl = view(a.dl, a.Ep, t0, min(BM, a.T - t0), a.Ep, true);
    const View vw = view(a.wr, a.H, 0, a.E, a.H, false);  // [E, H], K = E (dl's padding is 0)
    tile_mma<false, true, false>(sm, vl, 0, vw, vw, h0, a.Ep, acc, acc);
#pragma unroll
    for (int mi = 0; mi < 2; ++mi)
#pragma unroll
      for (int hh = 0; hh < 2; ++hh) {
        const int t = t0 + wm + mi * 16 + g + hh * 8;
        if (t >= a.T) continue;
#pragma unroll
        for (int ni = 0; ni < 4; ++ni) {
          const int col = h0 + wn + ni * 8 + 2 * q;
          if (col >= a.H) continue;
          float s0 = 0.f, s1 = 0.f;
          for (int j = 0; j < a.k; ++j) {
            const long long p = (long long)t * a.k + j;
            if (a.slot[p] < 0) continue;  // dropped: no row in dx_pair
            const unsigned raw = __ldcg(reinterpret_cast<const unsigned*>(a.dxp + p * a.H + col));
            __nv_bfloat162 v2 = *reinterpret_cast<const __nv_bfloat162*>(&raw);
            const float2 f = __bfloat1622float2(v2);
            s0 += f.x;
            s1 += f.y;
          }
          *reinterpret_cast<__nv_bfloat162*>(a.dx + (long long)t * a.H + col) =
              __floats2bfloat162_rn(s0 + acc[mi][ni][2 * hh], s1 + acc[mi][ni][2 * hh + 1]);
        }
      }
  }
}

}  // namespace flash_moe_bwd

// Requirements (checked by the Python side): H % 8 == 0, I % 8 == 0, Ep = E rounded up to 8,
// 1 <= k <= 8, E <= 256, 16-byte aligned contiguous tensors, the forward's state, zeroed
// meta (E + 4 ints) and ready[] (>= row blocks), a cooperative launch (grid from the occupancy
// query; the bounds ask ptxas for <= 168 registers, which it meets without spilling).
// status: host-visible int[3] (see moe_tiles.cuh) or null; spin_limit_ms bounds every wait.
extern "C" __global__ void __launch_bounds__(flash_moe_bwd::THREADS, 3)
horizon_flash_moe_bwd(__nv_bfloat16* dx, __nv_bfloat16* dwr, __nv_bfloat16* dw1, __nv_bfloat16* dw3,
                      __nv_bfloat16* dw2, const __nv_bfloat16* dy, const float* dlogits, const __nv_bfloat16* x,
                      const __nv_bfloat16* wr, const __nv_bfloat16* w1, const __nv_bfloat16* w3,
                      const __nv_bfloat16* w2, const float* logits, const int* tope, const float* topw,
                      const int* slot, const int* sorted, const int* off, const __nv_bfloat16* h,
                      const __nv_bfloat16* outp, __nv_bfloat16* dyp, __nv_bfloat16* dl, __nv_bfloat16* dg,
                      __nv_bfloat16* du, __nv_bfloat16* dxp, int* meta, int* ready, int* status, int T, int H,
                      int I, int E, int Ep, int k, int renorm, int spin_limit_ms) {
  namespace fb = flash_moe_bwd;  // qualified: the forward's anonymous-namespace names are visible here
  __shared__ fb::TileSmem smem;
  int* counters = meta + E + 1;  // [0] tile queue, [1] grid barrier, [2] abort
  const fb::Args a{dx, dwr, dw1, dw3, dw2, dy, dlogits, x, wr, w1, w3, w2, logits, tope, topw, slot, sorted, off, h,
                   outp, dyp, dl, dg, du, dxp, meta, ready, T, H, I, E, Ep, k, renorm,
                   fb::Waits{counters + 2, status, spin_limit_ms * 1000000LL, 2}};
  fb::pairs_phase(a);
  if (!fb::grid_barrier(counters + 1, 1, a.waits)) return;
  if (!fb::tiles_phase(a, smem, counters)) return;
  if (!fb::grid_barrier(counters + 1, 2, a.waits)) return;
  fb::combine_phase(a, smem);
}
