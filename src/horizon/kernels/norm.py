"""RMSNorm (HF LlamaRMSNorm semantics, fp32 statistics) with its backward: the torch
reference (CPU path and oracle) and the CUDA kernels `horizon_rmsnorm_fwd/bwd` (bf16)."""

from __future__ import annotations

import functools

import torch

from .. import native
from ..errors import HorizonError
from ._common import acc_dtype, check_tensor, device_sms, out_empty, out_empty_like, ptr, same_device, use_kernel

_FWD = "horizon_rmsnorm_fwd"
_BWD = "horizon_rmsnorm_bwd"
_THREADS = 256
# The backward kernel keeps one fp32 row of dW partial sums per block in shared memory.
_MAX_SMEM_H = 24576
# Rows per backward block at least (fewer blocks than the occupancy allows for small inputs:
# each block adds an H-row of partials to sum).
_MIN_ROWS_PER_BLOCK = 4


@functools.lru_cache(maxsize=None)
def _bwd_blocks_per_sm(H: int, index: int) -> int:
    """Backward blocks resident per SM with 4 H bytes of dynamic shared memory each (the
    driver's occupancy query): the grid fills the GPU (the fixed 2 per SM gave 25%)."""
    return max(1, int(native.max_active_blocks_per_sm(_BWD, _THREADS, 4 * H, index)))


def bwd_grid(x: torch.Tensor, rows: int, H: int) -> int:
    index = x.device.index if x.device.index is not None else torch.cuda.current_device()
    full = device_sms(x) * _bwd_blocks_per_sm(H, index)
    return max(1, min(full, -(-rows // _MIN_ROWS_PER_BLOCK)))


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """weight * (x.float() * rsqrt(mean(x.float()^2) + eps)).to(x.dtype), returned in x.dtype."""
    h = x.to(acc_dtype(x))
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return (weight * h.to(x.dtype)).to(x.dtype)


def rms_norm_backward_reference(dy, x, weight, rstd):
    """Explicit gradients (dx, dweight) of rms_norm_reference given rstd = rsqrt(mean(x^2)+eps)
    per row (fp32, shape x.shape[:-1]). The formulas the CUDA backward implements."""
    f = acc_dtype(x)
    xf = x.to(f)
    r = rstd.to(f).unsqueeze(-1)
    xhat = xf * r
    g = dy.to(f) * weight.to(f)
    dx = r * (g - xhat * (g * xhat).mean(-1, keepdim=True))
    dw = (dy.to(f) * xhat.to(x.dtype).to(f)).reshape(-1, x.shape[-1]).sum(0)
    return dx.to(x.dtype), dw.to(weight.dtype)


class RMSNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps):
        H = x.shape[-1]
        rows = x.numel() // H if H else 0
        if use_kernel(_FWD, x, weight) and rows > 0:
            y = out_empty_like(x)
            rstd = out_empty(x.shape[:-1], dtype=torch.float32, device=x.device)
            grid = max(1, min(rows, device_sms(x) * 8))
            native.launch(
                _FWD,
                (grid,),
                (_THREADS,),
                [ptr(y), ptr(rstd), ptr(x), ptr(weight), ("i64", rows), ("i32", H), ("f32", float(eps))],
                device=x.device,
            )
        else:  # rms_norm_reference's operations, rstd computed once and kept
            h = x.to(acc_dtype(x))
            rstd = torch.rsqrt(h.pow(2).mean(-1) + eps)
            y = (weight * (h * rstd.unsqueeze(-1)).to(x.dtype)).to(x.dtype)
        ctx.save_for_backward(x, weight, rstd)
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, rstd = ctx.saved_tensors
        H = x.shape[-1]
        rows = x.numel() // H if H else 0
        dy = dy.contiguous()
        if use_kernel(_BWD, dy, x, weight) and 0 < H <= _MAX_SMEM_H and rows > 0:
            grid = bwd_grid(x, rows, H)
            dx = out_empty_like(x)
            dw_part = out_empty((grid, H), dtype=torch.float32, device=x.device)
            native.launch(
                _BWD,
                (grid,),
                (_THREADS,),
                [ptr(dx), ptr(dw_part), ptr(dy), ptr(x), ptr(weight), ptr(rstd), ("i64", rows), ("i32", H)],
                shared_mem=4 * H,
                device=x.device,
            )
            # A fixed-order sum over blocks keeps dW deterministic.
            return dx, dw_part.sum(0).to(weight.dtype), None
        dx, dw = rms_norm_backward_reference(dy, x, weight, rstd)
        return dx, dw, None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last dimension (x [..., H], weight [H]); output in x.dtype."""
    check_tensor("rms_norm: x", x)
    check_tensor("rms_norm: weight", weight, dims=1)
    if x.dim() < 1 or x.shape[-1] != weight.shape[0]:
        raise HorizonError(f"rms_norm: x last dim {tuple(x.shape)} does not match weight {tuple(weight.shape)}")
    if not isinstance(eps, (int, float)) or not eps >= 0:
        raise HorizonError(f"rms_norm: eps must be a non-negative number, got {eps!r}")
    same_device("rms_norm", x, weight)
    return RMSNormFunction.apply(x.contiguous(), weight.contiguous(), float(eps))
