"""Rotary position embedding (HF layout and rotate_half convention) with its backward: the
torch reference (CPU path and oracle) and the CUDA kernel `horizon_rope` (bf16)."""

from __future__ import annotations

import torch

from .. import native
from ..errors import HorizonError
from ._common import check_tensor, device_sms, out_empty, ptr, same_device, use_kernel

_ROPE = "horizon_rope"
_THREADS = 256


def rope_cos_sin(positions, head_dim: int, theta: float, dtype=torch.float32, device=None):
    """HF default rope tables: (cos, sin), each [1, S, head_dim] for 1-D positions [S], or
    [B, S, head_dim] for 2-D positions [B, S]."""
    if not isinstance(head_dim, int) or head_dim <= 0 or head_dim % 2:
        raise HorizonError(f"rope_cos_sin: head_dim must be a positive even int, got {head_dim!r}")
    if not isinstance(theta, (int, float)) or not theta > 0:
        raise HorizonError(f"rope_cos_sin: theta must be positive, got {theta!r}")
    pos = torch.as_tensor(positions, device=device)
    if pos.dim() not in (1, 2):
        raise HorizonError(f"rope_cos_sin: positions must be 1-D [S] or 2-D [B, S], got shape {tuple(pos.shape)}")
    if pos.dim() == 1:
        pos = pos.unsqueeze(0)
    dev = pos.device
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64, device=dev).float() / head_dim))
    freqs = pos.float().unsqueeze(-1) * inv_freq  # [B, S, D/2], fp32 as HF (autocast off)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def _rotate_half(x):
    h = x.shape[-1] // 2
    return torch.cat((-x[..., h:], x[..., :h]), dim=-1)


def _rotate_half_t(x):
    # The transpose of rotate_half: (z1, z2) -> (z2, -z1).
    h = x.shape[-1] // 2
    return torch.cat((x[..., h:], -x[..., :h]), dim=-1)


def rope_reference(x, cos, sin):
    """x [B, nh, S, D]; cos/sin [B or 1, S, D] -> x*cos + rotate_half(x)*sin (HF)."""
    c, s = cos.unsqueeze(1), sin.unsqueeze(1)
    return x * c + _rotate_half(x) * s


def rope_backward_reference(g, cos, sin):
    """The transpose of rope_reference applied to g (valid for any cos/sin, not only HF's
    duplicated halves). The formula the CUDA kernel's backward mode implements."""
    c, s = cos.unsqueeze(1), sin.unsqueeze(1)
    return g * c + _rotate_half_t(g * s)


def _rope_launch(x, cos, sin, backward: bool):
    """One launch: out (new, contiguous) = rope(x) or its transpose. x may be a strided view
    whose last dim is contiguous (e.g. [B, S, nh, D].transpose(1, 2))."""
    B, NH, S, D = x.shape
    out = out_empty((B, NH, S, D), dtype=x.dtype, device=x.device)
    rows = B * NH * S
    if rows == 0:
        return out
    cos_sb = 0 if cos.shape[0] == 1 else S * D
    work = rows * (D // 2 + 7) // 8
    grid = max(1, min(device_sms(x) * 16, (work + _THREADS - 1) // _THREADS))
    native.launch(
        _ROPE,
        (grid,),
        (_THREADS,),
        [
            ptr(out), ptr(x), ptr(cos), ptr(sin),
            ("i32", B), ("i32", NH), ("i32", S), ("i32", D),
            ("i64", x.stride(0)), ("i64", x.stride(1)), ("i64", x.stride(2)),
            ("i64", cos_sb), ("i32", 1 if backward else 0),
        ],
        device=x.device,
    )
    return out


def _fast(x, cos, sin) -> bool:
    return (
        x.is_cuda and x.dtype == torch.bfloat16 and x.stride(-1) == 1
        and use_kernel(_ROPE, cos, sin)
    )


class RoPEFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, cos, sin):
        ctx.save_for_backward(cos, sin)
        outs = []
        for x in (q, k):
            outs.append(_rope_launch(x, cos, sin, False) if _fast(x, cos, sin) else rope_reference(x, cos, sin))
        return tuple(outs)

    @staticmethod
    def backward(ctx, dq, dk):
        cos, sin = ctx.saved_tensors
        grads = []
        for g in (dq, dk):
            if g is None:
                grads.append(None)
            elif _fast(g, cos, sin):
                grads.append(_rope_launch(g, cos, sin, True))
            else:
                grads.append(rope_backward_reference(g, cos, sin))
        return grads[0], grads[1], None, None


def apply_rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """HF apply_rotary_pos_emb with unsqueeze_dim=1: q [B, nq, S, D], k [B, nk, S, D],
    cos/sin [B or 1, S, D]. Returns new (q, k); differentiable in q and k (not cos/sin)."""
    for name, t in (("q", q), ("k", k)):
        check_tensor(f"apply_rope: {name}", t, dims=4)
    for name, t in (("cos", cos), ("sin", sin)):
        check_tensor(f"apply_rope: {name}", t, dims=3)
    B, _, S, D = q.shape
    if k.shape[0] != B or k.shape[2] != S or k.shape[3] != D:
        raise HorizonError(f"apply_rope: k shape {tuple(k.shape)} does not match q {tuple(q.shape)}")
    if D % 2:
        raise HorizonError(f"apply_rope: head dim must be even, got {D}")
    if cos.shape != sin.shape or cos.shape[1:] != (S, D) or cos.shape[0] not in (1, B):
        raise HorizonError(
            f"apply_rope: cos {tuple(cos.shape)} / sin {tuple(sin.shape)} must be [1 or {B}, {S}, {D}]"
        )
    same_device("apply_rope", q, k, cos, sin)
    if cos.dtype != q.dtype:
        cos, sin = cos.to(q.dtype), sin.to(q.dtype)
    return RoPEFunction.apply(q, k, cos.contiguous(), sin.contiguous())
