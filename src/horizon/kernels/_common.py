"""Helpers shared by the kernel ops: when to take the CUDA path, and launch geometry."""

from __future__ import annotations

import functools

import torch

from .. import native
from ..errors import HorizonError


def use_kernel(kernel: str, *tensors: torch.Tensor, dtype=torch.bfloat16) -> bool:
    """True when every tensor is a contiguous CUDA tensor of `dtype` and `kernel` is in our
    fatbin (the fast path); otherwise the caller runs its torch reference."""
    for t in tensors:
        if not (t.is_cuda and t.dtype == dtype and t.is_contiguous()):
            return False
    return bool(tensors) and native.can_launch(tensors[0], kernel)


@functools.lru_cache(maxsize=None)
def sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def device_sms(t: torch.Tensor) -> int:
    return sm_count(t.device.index if t.device.index is not None else torch.cuda.current_device())


def ptr(t: torch.Tensor):
    return ("ptr", t.data_ptr())


def check_tensor(what: str, t, *, dims=None, floating=True) -> None:
    if not isinstance(t, torch.Tensor):
        raise HorizonError(f"{what} must be a torch.Tensor, got {type(t).__name__}")
    if floating and not t.is_floating_point():
        raise HorizonError(f"{what} must be a floating-point tensor, got {t.dtype}")
    if dims is not None and t.dim() not in (dims if isinstance(dims, tuple) else (dims,)):
        raise HorizonError(f"{what} must have {dims} dimensions, got shape {tuple(t.shape)}")


def same_device(what: str, *tensors: torch.Tensor) -> None:
    devs = {t.device for t in tensors}
    if len(devs) > 1:
        raise HorizonError(f"{what}: tensors are on different devices: {sorted(str(d) for d in devs)}")


def acc_dtype(t: torch.Tensor) -> torch.dtype:
    """The math dtype of a reference: fp32, or fp64 for fp64 inputs (so tests can check the
    formulas to fp64 precision)."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


# Tests set this to NaN-fill every output buffer before a kernel writes it, so an element a
# kernel fails to write shows up as NaN instead of as whatever memory held.
POISON = False


def out_empty(*shape, dtype, device) -> torch.Tensor:
    t = torch.empty(*shape, dtype=dtype, device=device)
    if POISON:
        t.fill_(float("nan") if t.is_floating_point() else -(2**31) + 1 if t.dtype == torch.int32 else -1)
    return t


def out_empty_like(t: torch.Tensor) -> torch.Tensor:
    return out_empty(t.shape, dtype=t.dtype, device=t.device)
