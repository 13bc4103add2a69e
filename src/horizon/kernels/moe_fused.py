"""The fused flash_moe path: the forward is one persistent CUDA launch
(`horizon_flash_moe_fwd`, cuda/moe/flash_moe.cu); the backward is a short, fixed sequence of
device-side torch grouped GEMMs driven by the routing state the forward left behind (no host
synchronisation when `torch._grouped_mm` is available).

`forward_torch` produces exactly the state the kernel writes (same routing, same placement,
same layouts) with torch ops: it is the CPU path of this module, the oracle of the kernel's
intermediate outputs, and lets the explicit backward be tested without a GPU.

Semantics are horizon.moe's, except that router logits are computed in fp32 from the
bf16 operands (the reference rounds them to the input dtype first), so top-k ties go by the
fp32 logits.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .. import native
from .. import moe as _moe
from ._common import device_sms, out_empty

KERNEL = "horizon_flash_moe_fwd"
_THREADS = 128
_CHUNK = 256  # pairs per placement chunk (kernel constant CHUNK)
_BM = 64  # rows per tile (kernel constant BM)
_MAX_E = 256
_MAX_K = 8
# Blocks per SM for the persistent grid: the grid barrier needs every block co-resident.
# The kernel uses <= 128 registers x 128 threads and ~15 KiB of shared memory, so 2 per SM
# always fit (4 would on sm_80/sm_90); 2 is the conservative choice without an occupancy query.
_BLOCKS_PER_SM = 2


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
    E, I = w1.shape[0], w1.shape[1]
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
    meta = torch.zeros(3 * E + 2 + 2, **i32)  # off[E+1], rbp[E+1], kept[E], tile ctr, barrier ctr
    ready = torch.zeros(max_row_blocks, **i32)
    h = out_empty(P, I, dtype=x.dtype, device=dev)
    outp = out_empty(P, H, dtype=x.dtype, device=dev)
    y = out_empty(T, H, dtype=x.dtype, device=dev)
    grid = device_sms(x) * _BLOCKS_PER_SM
    native.launch(
        KERNEL,
        (grid,),
        (_THREADS,),
        [("ptr", t.data_ptr()) for t in (y, x, wr, w1, w3, w2, logits, tope, topw, slot, sorted_, hist, meta, ready, h, outp)]
        + [("i32", v) for v in (T, H, I, E, top_k, _capacity(cap, P), 1 if renormalize else 0)],
        device=dev,
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
    E, I = w1.shape[0], w1.shape[1]
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


class FlashMoEFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, wr, w1, w3, w2, top_k, renormalize, cap, use_kernel):
        fwd = forward_kernel if use_kernel else forward_torch
        st = fwd(x, wr, w1, w3, w2, top_k, renormalize, cap)
        ctx.top_k, ctx.renormalize = top_k, renormalize
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
        grads = backward_torch(st, dy, dlogits, x, wr, w1, w3, w2, ctx.top_k, ctx.renormalize)
        return (*grads, None, None, None, None)


def flash_moe_fused(x, router_weight, w1, w3, w2, *, top_k, renormalize=True, capacity_factor=None,
                    activation="swiglu", aux_loss_coef=0.0, z_loss_coef=0.0, use_kernel=None):
    """flash_moe through the fused path (inputs already validated by horizon.moe.flash_moe).
    use_kernel=None picks the CUDA kernel when `can_run`, else the torch version of it."""
    if activation != "swiglu":
        raise ValueError(f"flash_moe_fused: only swiglu experts, got {activation!r}")
    T = x.shape[0]
    E = router_weight.shape[0]
    if use_kernel is None:
        use_kernel = can_run(x, router_weight, w1, w3, w2, top_k=top_k, activation=activation)
    if T == 0:
        return _moe.flash_moe_reference(x, router_weight, w1, w3, w2, top_k=top_k, renormalize=renormalize,
                                        capacity_factor=capacity_factor, activation=activation,
                                        aux_loss_coef=aux_loss_coef, z_loss_coef=z_loss_coef)
    cap = _moe.capacity_of(capacity_factor, T, top_k, E)
    y, logits, tope = FlashMoEFunction.apply(x, router_weight, w1, w3, w2, top_k, bool(renormalize), cap, bool(use_kernel))
    aux = _moe.aux_losses(logits, torch.softmax(logits, -1), tope, E, aux_loss_coef, z_loss_coef)
    return y, aux
