"""The fused flash_moe path: the forward is one persistent CUDA launch
(`horizon_flash_moe_fwd`, cuda/moe/flash_moe.cu), and so is the backward
(`horizon_flash_moe_bwd`, cuda/moe/flash_moe_bwd.cu), driven by the routing state the forward
left behind. The previous backward, a short fixed sequence of device-side torch grouped GEMMs
(`backward_torch`, no host synchronisation when `torch._grouped_mm` is available), stays as
the fallback and the comparison point: `backward="torch"` or HORIZON_MOE_BWD=torch.

`forward_torch` produces exactly the state the kernel writes (same routing, same placement,
same layouts) with torch ops: it is the CPU path of this module, the oracle of the kernel's
intermediate outputs, and lets the explicit backwards be tested without a GPU.
`backward_emulate` is the backward kernel transcribed to torch: the same phases, the same tile
list in the same order, the same index arithmetic on flat buffers and the same bf16 rounding
points, in fp32 — it proves the kernel's decomposition on the CPU.

Semantics are the reference's (reference.py), except that router logits are computed in fp32 from the
bf16 operands (the reference rounds them to the input dtype first), so top-k ties go by the
fp32 logits.

Both kernels are persistent: their blocks wait for each other (grid barriers, tile
dependencies), so they are launched cooperatively (all blocks resident at once, or the driver
refuses; a refused grid is halved until it fits) with SMs x the occupancy query's blocks per
SM. Every wait inside gives up after HORIZON_MOE_SPIN_LIMIT_MS (60 s) and the next launch, or
`check_status()`, raises a HorizonError saying so: a misconfigured GPU stops a run, it does not
hang it.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ... import native
from ...errors import HorizonError
from .._common import device_sms, out_empty
from . import reference as _moe

KERNEL = "horizon_flash_moe_fwd"
BWD_KERNEL = "horizon_flash_moe_bwd"
_BACKWARDS = ("kernel", "torch", "emulate")  # emulate: backward_emulate (CPU, slow; tests)
_THREADS = {"horizon_flash_moe_fwd": 256, "horizon_flash_moe_bwd": 128}  # (kernel constants)
_CHUNK = 256  # pairs per placement chunk (kernel constant CHUNK)
_BM = 64  # rows per tile of the backward (kernel constant BM); the forward's are 128
_MAX_E = 256
_MAX_K = 8
# Every wait inside the persistent kernels (grid barriers, tile dependencies) gives up after
# this long, and the launch then reports it (see `check_status`) instead of hanging: generous,
# since a legitimate wait lasts one phase of one launch.
_SPIN_LIMIT_MS = int(os.environ.get("HORIZON_MOE_SPIN_LIMIT_MS", "60000"))


@functools.lru_cache(maxsize=None)
def _occupancy(kernel: str, index: int) -> int:
    return int(native.max_active_blocks_per_sm(kernel, _THREADS[kernel], 0, index))


def blocks_per_sm(kernel: str, x: torch.Tensor) -> int:
    """Blocks of `kernel` that fit on one SM at once (the driver's occupancy query for its
    registers and shared memory): the persistent grid is SMs x this, launched cooperatively,
    so the driver refuses a grid that cannot be resident at once instead of letting its grid
    barriers wait for blocks that never start."""
    index = x.device.index if x.device.index is not None else torch.cuda.current_device()
    n = _occupancy(kernel, index)
    if n < 1:
        raise HorizonError(f"{kernel}: the occupancy query says no block fits on an SM ({n})")
    return n


def persistent_grid(kernel: str, x: torch.Tensor) -> int:
    return device_sms(x) * blocks_per_sm(kernel, x)


_STATUS: dict = {}
_KERNEL_IDS = {1: KERNEL, 2: BWD_KERNEL}


def _status_word(x: torch.Tensor) -> torch.Tensor:
    """int32[3] in page-locked host memory (device-visible) where a launch that gave up waiting
    leaves (code, block, kernel); one per device, cleared when reported."""
    key = str(x.device)
    t = _STATUS.get(key)
    if t is None:
        t = _STATUS[key] = torch.zeros(3, dtype=torch.int32, pin_memory=x.device.type == "cuda")
    return t


def check_status() -> None:
    """Raises if an earlier flash_moe launch gave up at one of its waits (read from host memory:
    no synchronisation; a launch still running is seen at a later check)."""
    for key, t in _STATUS.items():
        code, block, kernel = (int(v) for v in t.tolist())
        if code:
            t.zero_()
            raise HorizonError(
                f"{_KERNEL_IDS.get(kernel, 'flash_moe')} on {key}: block {block} waited over {_SPIN_LIMIT_MS} ms for "
                "other blocks of its grid and the launch gave up: its blocks were not all resident at once (another "
                "persistent kernel, e.g. NCCL's, MPS or green contexts limiting the SMs?). Its outputs are invalid; "
                "HORIZON_MOE_SPIN_LIMIT_MS sets the limit"
            )


@dataclass
class MoeState:
    """What the forward leaves for the backward. P = T * k pairs, pair p = t * k + j."""

    logits: torch.Tensor  # [T, E] fp32
    tope: torch.Tensor  # [P] int32, expert of each pair
    topw: torch.Tensor  # [P] fp32, routing weight of each pair
    slot: torch.Tensor  # [P] int32, slot in its expert, -1 when dropped by the capacity
    sorted: torch.Tensor  # [P] int32, pair at each sorted position (kept pairs first, expert-major)
    off: torch.Tensor  # [E + 1] int32, first sorted position of each expert; off[E] = kept pairs
    h: torch.Tensor  # [P, I] silu(g) * u by sorted position (rows >= off[E] unused)
    outp: torch.Tensor  # [P, H] unscaled expert output by pair (dropped pairs unused)
    y: torch.Tensor  # [T, H]


def can_run(x, router_weight, w1, w3, w2, *, top_k, activation) -> bool:
    """True when the fused CUDA kernel handles this call."""
    if activation != "swiglu" or w3 is None or not x.is_cuda:
        return False
    ts = (x, router_weight, w1, w3, w2)
    if not all(t.dtype == torch.bfloat16 and t.is_contiguous() and t.data_ptr() % 16 == 0 for t in ts):
        return False
    T, H = x.shape
    E, I = w1.shape[0], w1.shape[1]
    if H % 8 or I % 8 or E > _MAX_E or top_k > _MAX_K or T * top_k >= 2**31 - 1:
        return False
    return native.can_launch(x, KERNEL)


def _capacity(cap, P):
    return P if cap is None else min(int(cap), P)


def _gmm(a, b, offs):
    """Grouped matmul: torch._grouped_mm where it runs, else a per-group loop (which needs the
    group sizes on the host: one synchronisation)."""
    if hasattr(torch, "_grouped_mm"):
        try:
            return torch._grouped_mm(a, b, offs=offs)
        except (RuntimeError, NotImplementedError):
            pass
    ends = offs.tolist()
    starts = [0] + ends[:-1]
    if a.dim() == 2 and b.dim() == 3:  # [M, K] x [G, K, N] -> [M, N], groups over rows
        out = torch.zeros(a.shape[0], b.shape[2], dtype=a.dtype, device=a.device)
        for g, (s, e) in enumerate(zip(starts, ends)):
            if e > s:
                out[s:e] = a[s:e] @ b[g]
        return out
    # [M, K] x [K, N] -> [G, M, N], groups over K
    out = torch.zeros(len(ends), a.shape[0], b.shape[1], dtype=a.dtype, device=a.device)
    for g, (s, e) in enumerate(zip(starts, ends)):
        if e > s:
            out[g] = a[:, s:e] @ b[s:e]
    return out


def _masked(t, mask):
    return torch.where(mask, t, torch.zeros((), dtype=t.dtype, device=t.device))


def _valid_rows(off, P, device):
    return torch.arange(P, device=device) < off[-1]


def forward_torch(x, wr, w1, w3, w2, top_k, renormalize, cap) -> MoeState:
    """The kernel's forward written with torch ops (same routing, placement and layouts)."""
    T, H = x.shape
    E = w1.shape[0]
    P = T * top_k
    dev = x.device
    logits = x.float() @ wr.float().t()
    probs = torch.softmax(logits, dim=-1)
    top = torch.sort(logits, dim=-1, descending=True, stable=True).indices[:, :top_k]
    w = probs.gather(1, top)
    if renormalize:
        w = w / w.sum(-1, keepdim=True)
    capacity = _capacity(cap, P)
    slot, keep, counts = _moe.place(top, E, capacity)
    kept = counts.clamp(max=capacity)
    off = torch.zeros(E + 1, dtype=torch.int64, device=dev)
    off[1:] = torch.cumsum(kept, 0)
    flat = top.reshape(-1)
    pos = torch.where(keep, off[flat] + slot, torch.full_like(slot, P))  # dropped -> parked at P
    sorted_ = torch.zeros(P + 1, dtype=torch.int64, device=dev)
    sorted_[pos] = torch.arange(P, device=dev)
    sorted_ = sorted_[:P]
    valid = _valid_rows(off, P, dev)
    sorted_ = torch.where(valid, sorted_, torch.zeros_like(sorted_))
    offs = off[1:].to(torch.int32)
    xs = x.index_select(0, sorted_ // top_k)
    vcol = valid.unsqueeze(1)
    # Rows past the kept count are padding: grouped GEMMs leave them undefined, so mask them.
    g = _masked(_gmm(xs, w1.transpose(1, 2), offs), vcol)
    u = _masked(_gmm(xs, w3.transpose(1, 2), offs), vcol)
    h = (F.silu(g.float()) * u.float()).to(x.dtype)
    out_sorted = _gmm(h, w2.transpose(1, 2), offs)
    outp = torch.zeros(P, H, dtype=x.dtype, device=dev)
    outp[sorted_[valid]] = out_sorted[valid]
    slot_k = torch.where(keep, slot, torch.full_like(slot, -1))
    wk = w.reshape(-1) * keep.to(w.dtype)
    y = (outp.float() * wk.unsqueeze(1)).view(T, top_k, H).sum(1).to(x.dtype)
    return MoeState(logits, flat.to(torch.int32), w.reshape(-1).float(), slot_k.to(torch.int32),
                    sorted_.to(torch.int32), off.to(torch.int32), h, outp, y)


def forward_kernel(x, wr, w1, w3, w2, top_k, renormalize, cap) -> MoeState:
    """One launch of horizon_flash_moe_fwd on torch's current stream; scratch from torch."""
    T, H = x.shape
    E, I = w1.shape[0], w1.shape[1]
    P = T * top_k
    dev = x.device
    nchunks = (P + _CHUNK - 1) // _CHUNK
    max_row_blocks = (P + _BM - 1) // _BM + E
    i32 = dict(dtype=torch.int32, device=dev)
    logits = out_empty(T, E, dtype=torch.float32, device=dev)
    tope = out_empty(P, **i32)
    topw = out_empty(P, dtype=torch.float32, device=dev)
    slot = out_empty(P, **i32)
    sorted_ = torch.zeros(P, **i32)  # rows past the kept count stay 0 (a valid pair index)
    hist = out_empty(max(nchunks, 1) * E, **i32)
    meta = torch.zeros(3 * E + 2 + 3, **i32)  # off[E+1], rbp[E+1], kept[E], tile ctr, barrier ctr, abort
    ready = torch.zeros(max_row_blocks, **i32)
    h = out_empty(P, I, dtype=x.dtype, device=dev)
    outp = out_empty(P, H, dtype=x.dtype, device=dev)
    y = out_empty(T, H, dtype=x.dtype, device=dev)
    check_status()
    status = _status_word(x)
    native.launch(
        KERNEL,
        (persistent_grid(KERNEL, x),),
        (_THREADS[KERNEL],),
        [("ptr", t.data_ptr()) for t in (y, x, wr, w1, w3, w2, logits, tope, topw, slot, sorted_, hist, meta, ready, h,
                                         outp, status)]
        + [("i32", v) for v in (T, H, I, E, top_k, _capacity(cap, P), 1 if renormalize else 0, _SPIN_LIMIT_MS)],
        device=dev,
        cooperative=True,
    )
    return MoeState(logits, tope, topw, slot, sorted_, meta[: E + 1], h, outp, y)


def backward_torch(st: MoeState, dy, dlogits, x, wr, w1, w3, w2, top_k, renormalize):
    """Gradients (dx, dwr, dw1, dw3, dw2) from the forward's state; device-side torch ops.

    dy_pair = w * dy[t]; dw_pair = <dy[t], out_pair>; dh = dy_pair . w2; dW2 = dy_pair^T h;
    g, u recomputed from x (cheaper than storing); dg = dh u silu'(g), du = dh silu(g);
    dx_pair = dg w1 + du w3; dW1 = dg^T x, dW3 = du^T x; tokens sum their pairs in choice
    order (deterministic, no atomics); the router gradient goes through the (renormalised)
    softmax of the fp32 logits, plus the logits' own gradient (aux losses)."""
    T, H = x.shape
    E = w1.shape[0]
    P = T * top_k
    dev = x.device
    off = st.off.long()
    offs = st.off[1:].contiguous()
    valid = _valid_rows(off, P, dev)
    vcol = valid.unsqueeze(1)
    pair = st.sorted.long()
    tok = pair // top_k
    keep = st.slot >= 0
    dy = dy.to(x.dtype)
    # Routing-weight gradient of every kept pair (dropped pairs: 0).
    # (Rows of dropped pairs in outp were never written: mask, do not multiply by 0.)
    dw_pair = _masked((st.outp.view(T, top_k, H).float() * dy.float().unsqueeze(1)).sum(-1).reshape(-1), keep)
    ws = _masked(st.topw[pair], valid)
    dys = dy.index_select(0, tok)
    dyp = (dys.float() * ws.unsqueeze(1)).to(x.dtype)  # padding rows are 0
    dh = _gmm(dyp, w2, offs)  # [P, I]
    dw2 = _gmm(dyp.t(), _masked(st.h, vcol), offs)  # [E, H, I]
    xs = x.index_select(0, tok)
    xs = _masked(xs, vcol)
    g = _masked(_gmm(xs, w1.transpose(1, 2), offs).float(), vcol)
    u = _masked(_gmm(xs, w3.transpose(1, 2), offs).float(), vcol)
    sg = torch.sigmoid(g)
    dhf = _masked(dh.float(), vcol)
    dg = (dhf * u * sg * (1 + g * (1 - sg))).to(x.dtype)
    du = (dhf * g * sg).to(x.dtype)
    dxs = _gmm(dg, w1, offs).float() + _gmm(du, w3, offs).float()  # [P, H]
    dw1 = _gmm(dg.t(), xs, offs)  # [E, I, H]
    dw3 = _gmm(du.t(), xs, offs)
    # An expert with no rows is an empty group: make its weight gradient 0 whatever the
    # grouped GEMM leaves there.
    has_rows = ((off[1:] - off[:-1]) > 0).view(E, 1, 1)
    dw1, dw2, dw3 = _masked(dw1, has_rows), _masked(dw2, has_rows), _masked(dw3, has_rows)
    # Back to pair order: pair p sits at sorted position off[e] + slot.
    spos = torch.where(keep, off[st.tope.long()] + st.slot.long(), torch.zeros_like(off[st.tope.long()]))
    dx_pair = _masked(dxs[spos], keep.unsqueeze(1))
    dx = dx_pair.view(T, top_k, H).sum(1)
    # Router: weights = softmax(logits)[tope] (renormalised); a small autograd graph.
    with torch.enable_grad():
        lg = st.logits.detach().requires_grad_()
        w = torch.softmax(lg, -1).gather(1, st.tope.long().view(T, top_k))
        if renormalize:
            w = w / w.sum(-1, keepdim=True)
        (dl,) = torch.autograd.grad(w, lg, dw_pair.view(T, top_k))
    if dlogits is not None:
        dl = dl + dlogits.float()
    dwr = dl.t() @ x.float()
    dx = dx + dl @ wr.float()
    return dx.to(x.dtype), dwr.to(wr.dtype), dw1.to(w1.dtype), dw3.to(w3.dtype), dw2.to(w2.dtype)


def _round_up(v, m):
    return (v + m - 1) // m * m


def backward_kernel(st: MoeState, dy, dlogits, x, wr, w1, w3, w2, top_k, renormalize):
    """One launch of horizon_flash_moe_bwd on torch's current stream (no host synchronisation);
    scratch from torch. Same contract as `backward_torch`; the state must come from a bf16
    forward (either forward)."""
    if not (can_run(x, wr, w1, w3, w2, top_k=top_k, activation="swiglu") and native.can_launch(x, BWD_KERNEL)):
        raise HorizonError("flash_moe backward kernel: needs contiguous, 16-byte aligned bf16 CUDA tensors, hidden "
                           "and intermediate sizes multiples of 8, top_k <= 8, <= 256 experts, and a build with "
                           f"{BWD_KERNEL}")
    T, H = x.shape
    E, I = w1.shape[0], w1.shape[1]
    if tuple(dy.shape) != (T, H) or (dlogits is not None and tuple(dlogits.shape) != (T, E)):
        raise HorizonError(f"flash_moe backward kernel: dy must be [{T}, {H}] and dlogits [{T}, {E}], got "
                           f"{tuple(dy.shape)} and {None if dlogits is None else tuple(dlogits.shape)}")
    P = T * top_k
    Ep = _round_up(E, 8)  # dl's row stride: 16-byte rows for the transposed tile loads
    dev = x.device
    bf = dict(dtype=x.dtype, device=dev)
    i32 = dict(dtype=torch.int32, device=dev)
    dy = dy.to(x.dtype).contiguous()
    dlogits = None if dlogits is None else dlogits.float().contiguous()
    dx = out_empty(T, H, **bf)
    dwr = out_empty(E, H, **bf)
    dw1 = out_empty(E, I, H, **bf)
    dw3 = out_empty(E, I, H, **bf)
    dw2 = out_empty(E, H, I, **bf)
    dyp = out_empty(P, H, **bf)
    dl = out_empty(T, Ep, **bf)
    dg = out_empty(P, I, **bf)
    du = out_empty(P, I, **bf)
    dxp = out_empty(P, H, **bf)
    meta = torch.zeros(E + 4, **i32)  # rbp[E+1], tile counter, barrier counter, abort
    ready = torch.zeros((P + _BM - 1) // _BM + E, **i32)
    state = [st.logits, st.tope, st.topw, st.slot, st.sorted, st.off, st.h, st.outp]
    for t in state:
        if not t.is_contiguous():
            raise HorizonError("flash_moe backward: the forward state must be contiguous")
    check_status()
    ptrs = ([dx, dwr, dw1, dw3, dw2, dy] + [dlogits] + [x, wr, w1, w3, w2] + state
            + [dyp, dl, dg, du, dxp, meta, ready, _status_word(x)])
    native.launch(
        BWD_KERNEL,
        (persistent_grid(BWD_KERNEL, x),),
        (_THREADS[BWD_KERNEL],),
        [("ptr", 0 if t is None else t.data_ptr()) for t in ptrs]
        + [("i32", v) for v in (T, H, I, E, Ep, top_k, 1 if renormalize else 0, _SPIN_LIMIT_MS)],
        device=dev,
        cooperative=True,
    )
    return dx, dwr, dw1, dw3, dw2


# ---------------------------------------------------------------- the backward kernel, in torch


class _View:
    """The kernel's `View`: a row-major matrix M [nrows, ncols] over a flat buffer whose row j
    starts at base + (gather[first + j] // gdiv if gather else first + j) * ld."""

    def __init__(self, buf, base, ld, first, nrows, ncols, gather=None, gdiv=1):
        self.buf, self.base, self.ld, self.first = buf, base, ld, first
        self.nrows, self.ncols, self.gather, self.gdiv = nrows, ncols, gather, gdiv

    def _row_start(self, j):
        ok = (j >= 0) & (j < self.nrows)
        jj = torch.where(ok, j, torch.zeros_like(j))
        r = self.gather[self.first + jj].long() // self.gdiv if self.gather is not None else self.first + jj
        return self.base + r * self.ld, ok

    def tile(self, t0, K, trans, rows):
        """[rows, K]: tile(m, k) = M(t0 + m, k), or M(k, t0 + m) when trans; zeros out of range
        (never read, as the kernel's load16 of a null pointer)."""
        m = torch.arange(rows) + t0
        k = torch.arange(K)
        if trans:
            start, ok = self._row_start(k)  # K runs down the rows
            idx = start.view(1, K) + m.view(rows, 1)
            ok = ok.view(1, K) & (m < self.ncols).view(rows, 1)
        else:
            start, ok = self._row_start(m)
            idx = start.view(rows, 1) + k.view(1, K)
            ok = ok.view(rows, 1) & (k < self.ncols).view(1, K)
        idx = torch.where(ok, idx, torch.zeros_like(idx))
        return torch.where(ok, self.buf[idx], torch.zeros((), dtype=self.buf.dtype))


def _tile_mma(A, at0, ta, B, bt0, tb, K, bm, bn):
    """The kernel's tile_mma: C [bm, bn] = tileA . tileB^T over k in [0, K), fp32."""
    return A.tile(at0, K, ta, bm) @ B.tile(bt0, K, tb, bn).t()


def _store_tile(buf, base, ld_m, ld_n, m0, n0, M, N, C, rnd):
    """The kernel's store_tile: C(m, n) -> buf[base + m * ld_m + n * ld_n] for m < M, n < N."""
    m = torch.arange(C.shape[0]) + m0
    n = torch.arange(C.shape[1]) + n0
    ok = (m < M).view(-1, 1) & (n < N).view(1, -1)
    idx = base + m.view(-1, 1) * ld_m + n.view(1, -1) * ld_n
    buf[idx[ok]] = rnd(C[ok])


def backward_emulate(st: MoeState, dy, dlogits, x, wr, w1, w3, w2, top_k, renormalize, *, bm=_BM, bn=_BM):
    """`horizon_flash_moe_bwd` transcribed to torch (CPU): phase 1 per token, then the tile list
    in the kernel's order (mid, dw2, dwr, dx, dw13; a consumer asserts that what it waits for
    is done), then the combine, on flat fp32 buffers with the kernel's index arithmetic, bf16
    rounding where the kernel stores bf16 (none for fp32 inputs), NaN in every scratch element
    the kernel does not write. bm: row block and M tile, bn: N tile (the kernel: 64, 64)."""
    for name, v in (("bm", bm), ("bn", bn)):
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise HorizonError(f"backward_emulate: {name} must be a positive int, got {v!r}")
    T, H = x.shape
    E, I = w1.shape[0], w1.shape[1]
    k = top_k
    P = T * k
    Ep = _round_up(E, 8)
    f32 = torch.float32

    def rnd(t):
        return t.to(x.dtype).to(f32)

    def flat(t):
        return t.detach().to(f32).reshape(-1).cpu()

    def nan(n):
        return torch.full((n,), float("nan"), dtype=f32)

    xf, wrf, w1f, w3f, w2f = (flat(t) for t in (x, wr, w1, w3, w2))
    dyf, hf, outpf = flat(dy.to(x.dtype)), flat(st.h), flat(st.outp)
    tope, slot, sorted_, off = (t.long().cpu() for t in (st.tope, st.slot, st.sorted, st.off))
    topw, logits = st.topw.float().cpu(), st.logits.float().cpu()
    dyp, dl, dg, du, dxp = nan(P * H), nan(T * Ep), nan(P * I), nan(P * I), nan(P * H)
    dx, dwr, dw1, dw3, dw2 = nan(T * H), nan(E * H), nan(E * I * H), nan(E * I * H), nan(E * H * I)

    # 1. pairs and router, per token.
    rbp = [0]
    for e in range(E):
        rbp.append(rbp[-1] + (int(off[e + 1] - off[e]) + bm - 1) // bm)
    for t in range(T):
        lg = logits[t]
        p = torch.exp(lg - lg.max()) / torch.exp(lg - lg.max()).sum()
        dyr = dyf[t * H : (t + 1) * H]
        dw, pj = torch.zeros(k), torch.zeros(k)
        for j in range(k):
            q = t * k + j
            e = int(tope[q])
            pj[j] = p[e]
            if slot[q] >= 0:
                dw[j] = (dyr * outpf[q * H : (q + 1) * H]).sum()
                pos = int(off[e] + slot[q])
                dyp[pos * H : (pos + 1) * H] = rnd(topw[q] * dyr)
        psum = pj.sum()
        dp = (dw - (dw * pj).sum() / psum) / psum if renormalize else dw
        c = (dp * pj).sum()
        sel = torch.zeros(E).index_add_(0, tope[t * k : (t + 1) * k], dp)
        row = p * (sel - c)
        if dlogits is not None:
            row = row + dlogits[t].float().cpu()
        dl[t * Ep : (t + 1) * Ep] = rnd(torch.cat([row, torch.zeros(Ep - E)]))

    # 2. tiles, in list order.
    R = rbp[E]
    nI, nH, nE = -(-I // bn), -(-H // bn), -(-E // bm)
    ready = [0] * R

    def row_block(rb):
        e = max(i for i in range(E) if rbp[i] <= rb)  # expert_of_row_block
        oe = int(off[e])
        rows = min(bm, int(off[e + 1]) - oe - (rb - rbp[e]) * bm)
        return e, oe + (rb - rbp[e]) * bm, rows

    for rb in range(R):  # mid tiles
        for it in range(nI):
            e, base, rows = row_block(rb)
            i0 = it * bn
            dh = _tile_mma(_View(dyp, 0, H, base, rows, H), 0, False, _View(w2f, e * H * I, I, 0, H, I), i0, True,
                           H, bm, bn)
            xr = _View(xf, 0, H, base, rows, H, sorted_, k)
            g = _tile_mma(xr, 0, False, _View(w1f, e * I * H, H, 0, I, H), i0, False, H, bm, bn)
            u = _tile_mma(xr, 0, False, _View(w3f, e * I * H, H, 0, I, H), i0, False, H, bm, bn)
            sg = torch.sigmoid(g)
            _store_tile(dg, base * I, I, 1, 0, i0, rows, I, dh * u * sg * (1 + g * (1 - sg)), rnd)
            _store_tile(du, base * I, I, 1, 0, i0, rows, I, dh * g * sg, rnd)
            ready[rb] += 1
    for e in range(E):  # dw2 tiles (an empty expert reduces over nothing: zeros)
        oe, ne = int(off[e]), int(off[e + 1] - off[e])
        for ht in range(nH):
            for it in range(nI):
                C = _tile_mma(_View(dyp, 0, H, oe, ne, H), ht * bm, True, _View(hf, 0, I, oe, ne, I), it * bn, True,
                              ne, bm, bn)
                _store_tile(dw2, e * H * I, I, 1, ht * bm, it * bn, H, I, C, rnd)
    for et in range(nE):  # dwr tiles
        for ht in range(nH):
            C = _tile_mma(_View(dl, 0, Ep, 0, T, Ep), et * bm, True, _View(xf, 0, H, 0, T, H), ht * bn, True, T, bm, bn)
            _store_tile(dwr, 0, H, 1, et * bm, ht * bn, E, H, C, rnd)
    for rb in range(R):  # dx tiles
        for ht in range(nH):
            assert ready[rb] == nI, "dx tile before its row block's mid tiles"
            e, base, rows = row_block(rb)
            h0 = ht * bn
            C = _tile_mma(_View(dg, 0, I, base, rows, I), 0, False, _View(w1f, e * I * H, H, 0, I, H), h0, True,
                          I, bm, bn)
            C = C + _tile_mma(_View(du, 0, I, base, rows, I), 0, False, _View(w3f, e * I * H, H, 0, I, H), h0, True,
                              I, bm, bn)
            for r in range(rows):
                q = int(sorted_[base + r])
                _store_tile(dxp, q * H, 0, 1, 0, h0, 1, H, C[r : r + 1], rnd)
    for e in range(E):  # dw13 tiles
        oe, ne = int(off[e]), int(off[e + 1] - off[e])
        assert all(ready[rb] == nI for rb in range(rbp[e], rbp[e + 1])), "dw13 tile before its mid tiles"
        for ht in range(nH):
            for it in range(nI):
                xv = _View(xf, 0, H, oe, ne, H, sorted_, k)
                C1 = _tile_mma(xv, ht * bm, True, _View(dg, 0, I, oe, ne, I), it * bn, True, ne, bm, bn)
                C3 = _tile_mma(xv, ht * bm, True, _View(du, 0, I, oe, ne, I), it * bn, True, ne, bm, bn)
                _store_tile(dw1, e * I * H, 1, H, ht * bm, it * bn, H, I, C1, rnd)
                _store_tile(dw3, e * I * H, 1, H, ht * bm, it * bn, H, I, C3, rnd)

    # 3. combine: pairs in choice order, then the router term.
    for tb in range(-(-T // bm)):
        t0 = tb * bm
        for ht in range(nH):
            h0 = ht * bn
            C = _tile_mma(_View(dl, 0, Ep, t0, min(bm, T - t0), Ep), 0, False, _View(wrf, 0, H, 0, E, H), h0, True,
                          Ep, bm, bn)
            for r in range(min(bm, T - t0)):
                t = t0 + r
                cols = torch.arange(h0, min(h0 + bn, H))
                acc = torch.zeros(len(cols))
                for j in range(k):
                    q = t * k + j
                    if slot[q] >= 0:
                        acc = acc + dxp[q * H + cols]
                dx[t * H + cols] = rnd(acc + C[r, : len(cols)])

    dev = x.device
    out = [dx.view(T, H), dwr.view(E, H), dw1.view(E, I, H), dw3.view(E, I, H), dw2.view(E, H, I)]
    return tuple(o.to(device=dev, dtype=x.dtype) for o in out)


def _backward_choice(backward):
    b = os.environ.get("HORIZON_MOE_BWD", "kernel") if backward is None else backward
    if b not in _BACKWARDS:
        src = "HORIZON_MOE_BWD" if backward is None else "backward"
        raise HorizonError(f"flash_moe: {src} must be one of {_BACKWARDS}, got {b!r}")
    return b


class FlashMoEFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, wr, w1, w3, w2, top_k, renormalize, cap, use_kernel, backward):
        fwd = forward_kernel if use_kernel else forward_torch
        st = fwd(x, wr, w1, w3, w2, top_k, renormalize, cap)
        ctx.top_k, ctx.renormalize = top_k, renormalize
        if backward == "emulate":
            ctx.bwd = backward_emulate
        elif backward == "kernel" and use_kernel and native.can_launch(x, BWD_KERNEL):
            ctx.bwd = backward_kernel
        else:
            ctx.bwd = backward_torch
        ctx.save_for_backward(x, wr, w1, w3, w2, st.logits, st.tope, st.topw, st.slot, st.sorted, st.off, st.h, st.outp)
        tope = st.tope.long().view(x.shape[0], top_k)
        ctx.mark_non_differentiable(tope)
        return st.y, st.logits, tope

    @staticmethod
    def backward(ctx, dy, dlogits, _dtope):
        x, wr, w1, w3, w2, logits, tope, topw, slot, sorted_, off, h, outp = ctx.saved_tensors
        st = MoeState(logits, tope, topw, slot, sorted_, off, h, outp, None)
        if dy is None:
            dy = torch.zeros(x.shape, dtype=x.dtype, device=x.device)
        grads = ctx.bwd(st, dy, dlogits, x, wr, w1, w3, w2, ctx.top_k, ctx.renormalize)
        return (*grads, None, None, None, None, None)


def flash_moe_fused(x, router_weight, w1, w3, w2, *, top_k, renormalize=True, capacity_factor=None,
                    activation="swiglu", aux_loss_coef=0.0, z_loss_coef=0.0, use_kernel=None, backward=None,
                    router_stats=False):
    """flash_moe through the fused path (inputs already validated by `flash_moe`).
    use_kernel=None picks the CUDA kernel when `can_run`, else the torch version of it.
    backward: "kernel" (the backward kernel after a kernel forward; otherwise the torch
    backward), "torch" (the grouped-GEMM backward), "emulate" (backward_emulate); None reads
    HORIZON_MOE_BWD (default "kernel")."""
    if activation != "swiglu":
        raise ValueError(f"flash_moe_fused: only swiglu experts, got {activation!r}")
    backward = _backward_choice(backward)
    T = x.shape[0]
    E = router_weight.shape[0]
    if use_kernel is None:
        use_kernel = can_run(x, router_weight, w1, w3, w2, top_k=top_k, activation=activation)
    if T == 0:
        return _moe.flash_moe_reference(x, router_weight, w1, w3, w2, top_k=top_k, renormalize=renormalize,
                                        capacity_factor=capacity_factor, activation=activation,
                                        aux_loss_coef=aux_loss_coef, z_loss_coef=z_loss_coef,
                                        router_stats=router_stats)
    cap = _moe.capacity_of(capacity_factor, T, top_k, E)
    y, logits, tope = FlashMoEFunction.apply(x, router_weight, w1, w3, w2, top_k, bool(renormalize), cap,
                                             bool(use_kernel), backward)
    probs = torch.softmax(logits, -1)
    aux = _moe.aux_losses(logits, probs, tope, E, aux_loss_coef, z_loss_coef)
    if router_stats:
        return y, aux, _moe.router_statistics(probs, tope, E)
    return y, aux
