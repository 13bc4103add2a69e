"""Causal self-attention with a deterministic backward on CUDA (docs/determinism.md).

torch's scaled_dot_product_attention picks a backend per call; the fused ones' backwards
accumulate dQ (FlashAttention-2) or split the keys (memory-efficient) with float atomics, so
their gradients change in the last bits from run to run unless torch's deterministic mode is
on while they run. Switching that mode on for the whole process would also make every other
op check it (and refuse the ones without a deterministic version), so here it is switched on
for the attention backward call alone:

- CUDA, bf16/fp16, head dim <= 256 (multiple of 8): torch's FlashAttention forward and
  backward ops, called directly; the backward with the deterministic flag set for that call
  only (FlashAttention-2's deterministic backward, which serialises the dQ accumulation).
- Other CUDA inputs: SDPA restricted to the math backend (plain matmuls and softmax:
  deterministic; memory quadratic in the sequence length).
- CPU: SDPA as it is (the CPU kernels have no atomics).
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

# Looked up through these names so the tests can stand in for them on the CPU.
_flash_fwd = torch.ops.aten._scaled_dot_product_flash_attention
_flash_bwd = torch.ops.aten._scaled_dot_product_flash_attention_backward


@contextlib.contextmanager
def deterministic_algorithms():
    """torch's deterministic mode (not warn-only) for the enclosed calls, restored after."""
    was, warn = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(was, warn_only=warn)


def _expand_kv(t: torch.Tensor, groups: int) -> torch.Tensor:
    return t if groups == 1 else t.repeat_interleave(groups, dim=1)


class _FlashAttention(torch.autograd.Function):
    """Causal attention over [B, heads, T, D] (k, v may have fewer heads: grouped queries)."""

    @staticmethod
    def forward(ctx, q, k, v):
        groups = q.shape[1] // k.shape[1]
        try:
            res = _flash_fwd(q, k, v, 0.0, True, False)
        except RuntimeError:
            if groups == 1:
                raise
            # A torch whose flash kernels want as many key/value heads as query heads.
            groups_done = groups
            k, v = _expand_kv(k, groups), _expand_kv(v, groups)
            res = _flash_fwd(q, k, v, 0.0, True, False)
        else:
            groups_done = 1
        out, lse, cum_q, cum_k, max_q, max_k, seed, offset = res[:8]
        ctx.save_for_backward(q, k, v, out, lse, cum_q, cum_k, seed, offset)
        ctx.sizes = (max_q, max_k)
        ctx.groups_done = groups_done
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse, cum_q, cum_k, seed, offset = ctx.saved_tensors
        max_q, max_k = ctx.sizes
        with deterministic_algorithms():
            dq, dk, dv = _flash_bwd(dout, q, k, v, out, lse, cum_q, cum_k, max_q, max_k, 0.0, True, seed, offset)
        g = ctx.groups_done
        if g > 1:  # the expanded heads' gradients summed per key/value head, in a fixed order
            b, h, t, d = dk.shape
            dk = dk.view(b, h // g, g, t, d).sum(2)
            dv = dv.view(b, h // g, g, t, d).sum(2)
        return dq, dk, dv


def flash_supported(q: torch.Tensor, k: torch.Tensor) -> bool:
    d = q.shape[-1]
    return (q.is_cuda and q.dtype in (torch.float16, torch.bfloat16) and k.dtype == q.dtype and d <= 256
            and d % 8 == 0 and q.shape[1] % k.shape[1] == 0)


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """softmax(q k^T / sqrt(D) + causal mask) v for q [B, Hq, T, D], k and v [B, Hkv, T, D]
    (Hq a multiple of Hkv); deterministic on CUDA as the module doc says. `mask`: a boolean
    [B or 1, 1, T, T] "may attend" mask that already holds the causal rule (sliding windows,
    packed documents); on CUDA it runs on the math backend (deterministic; a varlen kernel for
    packed documents is future work)."""
    gqa = q.shape[1] != k.shape[1]
    if mask is not None:
        if q.is_cuda:
            from torch.nn.attention import SDPBackend, sdpa_kernel

            with sdpa_kernel([SDPBackend.MATH]):
                return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
    if q.is_cuda:
        if flash_supported(q, k):
            return _FlashAttention.apply(q, k, v)
        from torch.nn.attention import SDPBackend, sdpa_kernel

        with sdpa_kernel([SDPBackend.MATH]):
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
