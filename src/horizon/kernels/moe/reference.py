"""flash_moe's torch reference: routing, deterministic placement, capacity, the expert FFNs,
the combine and the auxiliary losses. It is the CPU path and the oracle of the CUDA kernels in
cuda/moe/ (driven by `fused.py`); `__init__.py` chooses between the two.
Semantics (shared by both paths):
- logits = x @ router_weight.T in x's dtype; probabilities = softmax in fp32; top-k by
  probability with ties going to the lowest expert index; optional renormalisation of the
  k weights to sum 1.
- Pairs (token t, choice j) are placed in token order, then choice order: a pair's slot in
  its expert is the number of earlier pairs that chose the same expert. With a
  capacity_factor, capacity = ceil(capacity_factor * T * top_k / E) and pairs whose slot is at
  or beyond it are dropped (they contribute zero; weights are not renormalised again).
- expert(x) = w2 @ (act(w1 @ x) * (w3 @ x)) for "swiglu" (act = silu), or w2 @ act(w1 @ x)
  for the two-matrix "gelu" (erf form) and "relu" experts (w3 must be None).
- y[t] = sum over j, in choice order, of weight[t, j] * expert_e(x[t]), in fp32, cast to x's
  dtype at the end.
- aux_loss (fp32, 0-dim) = aux_loss_coef * E * sum_e f_e * P_e (Switch; f_e = tokens that
  picked e among their top-k / T, P_e = mean router probability, as transformers'
  load_balancing_loss_func) + z_loss_coef * mean_t logsumexp(logits_t)^2.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ...errors import HorizonError

_ACTIVATIONS = ("swiglu", "gelu", "relu")


def _acc(t):
    # fp32 routing/combine math; fp64 inputs keep fp64 (tests check formulas to fp64 precision).
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def route(x, router_weight, top_k: int, renormalize: bool):
    """Returns (logits [T, E] in x.dtype, probs fp32 [T, E], weights fp32 [T, k], experts int64 [T, k])."""
    logits = x @ router_weight.t()
    probs = torch.softmax(logits.to(_acc(x)), dim=-1)
    # A stable descending sort puts equal probabilities in expert-index order: ties go low.
    order = torch.sort(probs.detach(), dim=-1, descending=True, stable=True).indices[:, :top_k]
    weights = probs.gather(1, order)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return logits, probs, weights, order


def place(experts: torch.Tensor, num_experts: int, capacity):
    """Deterministic slots: returns (slot [T*k] int64, keep [T*k] bool, counts [E] int64)
    for the pairs flattened in (token, choice) order."""
    flat = experts.reshape(-1)
    n = flat.numel()
    counts = torch.bincount(flat, minlength=num_experts)
    order = torch.sort(flat, stable=True).indices  # token order within each expert
    starts = torch.cumsum(counts, 0) - counts
    slot = torch.empty_like(flat)
    slot[order] = torch.arange(n, device=flat.device) - starts[flat[order]]
    keep = slot < capacity if capacity is not None else torch.ones_like(flat, dtype=torch.bool)
    return slot, keep, counts


def capacity_of(capacity_factor, tokens: int, top_k: int, num_experts: int):
    if capacity_factor is None:
        return None
    return int(math.ceil(capacity_factor * tokens * top_k / num_experts))


def _act(h, activation):
    if activation == "gelu":
        return F.gelu(h)
    if activation == "relu":
        return F.relu(h)
    return F.silu(h)


def expert_forward(rows, e, w1, w3, w2, activation):
    """One expert's FFN on rows [n, H] in rows.dtype."""
    g = rows @ w1[e].t()
    h = _act(g, activation)
    if activation == "swiglu":
        h = h * (rows @ w3[e].t())
    return h @ w2[e].t()


def aux_losses(logits, probs, experts, num_experts, aux_loss_coef, z_loss_coef):
    aux = torch.zeros((), dtype=_acc(logits), device=logits.device)
    T = logits.shape[0]
    if aux_loss_coef and T:
        # scatter_add into a fixed-size buffer: unlike bincount, no host sync on CUDA.
        flat = experts.reshape(-1)
        counts = torch.zeros(num_experts, dtype=torch.int64, device=flat.device)
        counts.scatter_add_(0, flat, torch.ones_like(flat))
        f = counts.to(aux.dtype) / T
        aux = aux + aux_loss_coef * num_experts * (f * probs.mean(0)).sum()
    if z_loss_coef and T:
        aux = aux + z_loss_coef * torch.logsumexp(logits.to(aux.dtype), dim=-1).pow(2).mean()
    return aux


def router_statistics(probs, experts, num_experts):
    """(sum over tokens of the router probabilities [E] fp32, differentiable; pairs routed to
    each expert [E] fp32) from a layer's own routing: what the load-balancing loss of a whole
    model (transformers' load_balancing_loss_func) aggregates across layers."""
    counts = torch.zeros(num_experts, dtype=torch.float32, device=experts.device)
    flat = experts.reshape(-1)
    counts.scatter_add_(0, flat, torch.ones(flat.shape, dtype=counts.dtype, device=flat.device))
    return probs.float().sum(0), counts


def flash_moe_reference(x, router_weight, w1, w3, w2, *, top_k, renormalize=True, capacity_factor=None,
                        activation="swiglu", aux_loss_coef=0.0, z_loss_coef=0.0, router_stats=False):
    """The torch implementation (autograd through plain ops); see the module docstring.
    `router_stats`: also return `router_statistics` of this routing as a third value."""
    T, H = x.shape
    E = router_weight.shape[0]
    logits, probs, weights, experts = route(x, router_weight, top_k, renormalize)
    slot, keep, _ = place(experts, E, capacity_of(capacity_factor, T, top_k, E))
    flat_e = experts.reshape(-1)
    tok = torch.arange(T, device=x.device).repeat_interleave(top_k)
    # Kept pairs grouped by expert, token order inside each group (stable sort).
    kept_idx = torch.nonzero(keep).squeeze(1)
    kept_idx = kept_idx[torch.sort(flat_e[kept_idx], stable=True).indices]
    counts = torch.bincount(flat_e[kept_idx], minlength=E).tolist()
    outs = []
    start = 0
    for e, c in enumerate(counts):
        if c == 0:
            continue
        pairs = kept_idx[start : start + c]
        start += c
        outs.append(expert_forward(x.index_select(0, tok[pairs]), e, w1, w3, w2, activation))
    y_pairs = torch.zeros((T * top_k, H), dtype=_acc(x), device=x.device)
    if outs:
        contrib = torch.cat(outs, 0).to(y_pairs.dtype) * weights.reshape(-1)[kept_idx].unsqueeze(1)
        y_pairs = y_pairs.index_copy(0, kept_idx, contrib)
    y = y_pairs.view(T, top_k, H).sum(1).to(x.dtype)
    aux = aux_losses(logits, probs, experts, E, aux_loss_coef, z_loss_coef)
    if router_stats:
        return y, aux, router_statistics(probs, experts, E)
    return y, aux


def _validate(x, router_weight, w1, w3, w2, top_k, capacity_factor, activation, aux_loss_coef, z_loss_coef):
    def is_t(t):
        return isinstance(t, torch.Tensor)

    if not is_t(x) or x.dim() != 2 or not x.is_floating_point():
        raise HorizonError(f"flash_moe: x must be a floating [tokens, hidden] tensor, got {getattr(x, 'shape', x)!r}")
    T, H = x.shape
    if not is_t(router_weight) or router_weight.dim() != 2 or router_weight.shape[1] != H:
        raise HorizonError(f"flash_moe: router_weight must be [experts, {H}], got {getattr(router_weight, 'shape', router_weight)!r}")
    E = router_weight.shape[0]
    if E < 1:
        raise HorizonError("flash_moe: need at least one expert")
    if activation not in _ACTIVATIONS:
        raise HorizonError(f"flash_moe: activation must be one of {_ACTIVATIONS}, got {activation!r}")
    if not is_t(w1) or w1.dim() != 3 or w1.shape[0] != E or w1.shape[2] != H:
        raise HorizonError(f"flash_moe: w1 must be [{E}, intermediate, {H}], got {getattr(w1, 'shape', w1)!r}")
    inter = w1.shape[1]
    if activation == "swiglu":
        if not is_t(w3) or w3.shape != w1.shape:
            raise HorizonError(f"flash_moe: w3 must be [{E}, {inter}, {H}] for swiglu, got {getattr(w3, 'shape', w3)!r}")
    elif w3 is not None:
        raise HorizonError(f"flash_moe: activation {activation!r} uses two-matrix experts; w3 must be None")
    if not is_t(w2) or tuple(w2.shape) != (E, H, inter):
        raise HorizonError(f"flash_moe: w2 must be [{E}, {H}, {inter}], got {getattr(w2, 'shape', w2)!r}")
    ts = [t for t in (x, router_weight, w1, w3, w2) if t is not None]
    if len({t.dtype for t in ts}) != 1:
        raise HorizonError(f"flash_moe: all tensors must share one dtype, got {[str(t.dtype) for t in ts]}")
    if len({t.device for t in ts}) != 1:
        raise HorizonError(f"flash_moe: all tensors must be on one device, got {[str(t.device) for t in ts]}")
    if not isinstance(top_k, int) or isinstance(top_k, bool) or not 1 <= top_k <= E:
        raise HorizonError(f"flash_moe: top_k must be an int in [1, {E}], got {top_k!r}")
    if capacity_factor is not None and (not isinstance(capacity_factor, (int, float)) or not capacity_factor > 0):
        raise HorizonError(f"flash_moe: capacity_factor must be None or > 0, got {capacity_factor!r}")
    for name, v in (("aux_loss_coef", aux_loss_coef), ("z_loss_coef", z_loss_coef)):
        if not isinstance(v, (int, float)) or not v >= 0:
            raise HorizonError(f"flash_moe: {name} must be a number >= 0, got {v!r}")
