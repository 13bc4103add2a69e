"""flash_moe: the fused mixture-of-experts layer (router, top-k, dispatch, expert FFNs, weighted
combine, auxiliary losses) as one differentiable op. One op, its paths together: `reference.py`
(torch; the CPU path and the oracle; the semantics are in its docstring) and `fused.py` (the
persistent CUDA kernels of cuda/moe/ and their torch twins); `flash_moe` below validates once
and picks the path."""

from __future__ import annotations

from . import fused
from .reference import _validate, flash_moe_reference, router_statistics  # noqa: F401


def flash_moe(x, router_weight, w1, w3, w2, *, top_k, renormalize=True, capacity_factor=None,
              activation="swiglu", aux_loss_coef=0.0, z_loss_coef=0.0, router_stats=False):
    """The MoE layer: x [T, H]; router_weight [E, H]; w1, w3 [E, I, H]; w2 [E, H, I] (HF
    layout). Returns (y [T, H] in x.dtype, aux_loss 0-dim, fp32 (fp64 for fp64 inputs)). Differentiable in every
    tensor. On CUDA (bf16, swiglu, top_k <= 8, E <= 256, H and I multiples of 8) it runs the
    fused persistent forward kernel and, in the backward, the persistent backward kernel
    (`fused.py`; router logits in fp32 there; HORIZON_MOE_BWD=torch selects the grouped-GEMM
    backward) when available. `router_stats=True` adds a third value, (router probability sum
    [E], pairs per expert [E]) of this very routing, for a model-wide load-balancing loss."""
    _validate(x, router_weight, w1, w3, w2, top_k, capacity_factor, activation, aux_loss_coef, z_loss_coef)
    kw = dict(top_k=top_k, renormalize=bool(renormalize), capacity_factor=capacity_factor,
              activation=activation, aux_loss_coef=float(aux_loss_coef), z_loss_coef=float(z_loss_coef),
              router_stats=bool(router_stats))
    if fused.can_run(x, router_weight, w1, w3, w2, top_k=top_k, activation=activation):
        return fused.flash_moe_fused(x, router_weight, w1, w3, w2, **kw)
    return flash_moe_reference(x, router_weight, w1, w3, w2, **kw)
