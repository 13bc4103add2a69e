"""SwiGLU, silu(a) * b, with its backward: the torch reference (CPU path and oracle) and the
CUDA kernels `horizon_swiglu_fwd/bwd` (bf16 in and out, fp32 math)."""

from __future__ import annotations

import torch

from .. import native
from ..errors import HorizonError
from ._common import acc_dtype, check_tensor, device_sms, out_empty_like, ptr, same_device, use_kernel

_FWD = "horizon_swiglu_fwd"
_BWD = "horizon_swiglu_bwd"
_THREADS = 256


def swiglu_reference(a, b):
    af = a.to(acc_dtype(a))
    return (torch.nn.functional.silu(af) * b.to(af.dtype)).to(a.dtype)


def swiglu_backward_reference(dy, a, b):
    """(da, db) of silu(a) * b in fp32: da = dy*b*s*(1 + a*(1 - s)), db = dy*silu(a), s =
    sigmoid(a); torch's fused silu and silu_backward (the derivative above) do the elementwise
    work in two passes where the spelled-out formula took eight."""
    f = acc_dtype(a)
    af, bf, g = a.to(f), b.to(f), dy.to(f)
    return (torch.ops.aten.silu_backward(g * bf, af).to(a.dtype),
            (g * torch.nn.functional.silu(af)).to(b.dtype))


def _grid(t: torch.Tensor) -> int:
    return max(1, min(device_sms(t) * 16, (t.numel() // 8 + _THREADS) // _THREADS + 1))


class SwiGLUFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a, b):
        ctx.save_for_backward(a, b)
        if use_kernel(_FWD, a, b) and a.numel() > 0:
            y = out_empty_like(a)
            native.launch(_FWD, (_grid(a),), (_THREADS,), [ptr(y), ptr(a), ptr(b), ("i64", a.numel())], device=a.device)
            return y
        return swiglu_reference(a, b)

    @staticmethod
    def backward(ctx, dy):
        a, b = ctx.saved_tensors
        dy = dy.contiguous()
        if use_kernel(_BWD, dy, a, b) and a.numel() > 0:
            da, db = out_empty_like(a), out_empty_like(b)
            native.launch(
                _BWD, (_grid(a),), (_THREADS,),
                [ptr(da), ptr(db), ptr(dy), ptr(a), ptr(b), ("i64", a.numel())], device=a.device,
            )
            return da, db
        return swiglu_backward_reference(dy, a, b)


def swiglu(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """silu(a) * b elementwise (a, b same shape and dtype); fp32 math, output in a.dtype."""
    check_tensor("swiglu: a", a)
    check_tensor("swiglu: b", b)
    if a.shape != b.shape:
        raise HorizonError(f"swiglu: shapes differ: a {tuple(a.shape)} vs b {tuple(b.shape)}")
    if a.dtype != b.dtype:
        raise HorizonError(f"swiglu: dtypes differ: a {a.dtype} vs b {b.dtype}")
    same_device("swiglu", a, b)
    return SwiGLUFunction.apply(a.contiguous(), b.contiguous())
