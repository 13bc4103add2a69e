"""Gradient handling ops: bf16 -> fp32 accumulation."""

from __future__ import annotations

import torch

from .. import _native, native
from ..errors import HorizonError
from . import _common

_ACC = "horizon_acc_bf16_to_f32"
_THREADS = 256


def accumulate_grad_reference(acc: torch.Tensor, grad: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """acc += scale * grad in fp32 (the CPU path and the oracle)."""
    return acc.add_(grad.to(torch.float32), alpha=scale)


def accumulate_grad_(acc: torch.Tensor, grad: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """In place: acc (fp32) += scale * grad (bf16 or fp32). Returns acc."""
    if acc.dtype != torch.float32:
        raise HorizonError(f"accumulate_grad_: acc must be float32, got {acc.dtype}")
    if acc.shape != grad.shape:
        raise HorizonError(f"accumulate_grad_: shapes differ: acc {tuple(acc.shape)} vs grad {tuple(grad.shape)}")
    if acc.device != grad.device:
        raise HorizonError(f"accumulate_grad_: devices differ: {acc.device} vs {grad.device}")
    if (
        grad.dtype == torch.bfloat16
        and acc.is_contiguous()
        and grad.is_contiguous()
        and native.can_launch(acc, _ACC)
    ):
        n = acc.numel()
        if n == 0:
            return acc
        sms = torch.cuda.get_device_properties(acc.device).multi_processor_count
        blocks = max(1, min(sms * 8, (n // 8 + _THREADS - 1) // _THREADS + 1))
        native.launch(
            _ACC,
            (blocks,),
            (_THREADS,),
            [("ptr", acc.data_ptr()), ("ptr", grad.data_ptr()), ("f32", float(scale)), ("i64", n)],
            device=acc.device,
        )
        return acc
    return accumulate_grad_reference(acc, grad, scale)


_SQ = {torch.bfloat16: "horizon_sq_norm_partial_bf16", torch.float32: "horizon_sq_norm_partial_f32"}
_FIN = {torch.bfloat16: "horizon_nonfinite_bf16", torch.float32: "horizon_nonfinite_f32"}


def _tensors(what: str, t) -> list:
    ts = [t] if isinstance(t, torch.Tensor) else list(t) if isinstance(t, (list, tuple)) else None
    if ts is None or not all(isinstance(x, torch.Tensor) for x in ts):
        raise HorizonError(f"{what}: expected a tensor or a list/tuple of tensors, got {type(t).__name__}")
    for x in ts:
        if not x.is_floating_point():
            raise HorizonError(f"{what}: tensors must be floating point, got {x.dtype}")
    return ts


def _blocks(t: torch.Tensor) -> int:
    sms = torch.cuda.get_device_properties(t.device).multi_processor_count
    return max(1, min(sms * 4, (t.numel() // 8 + _THREADS - 1) // _THREADS + 1))


def _sq_norm_one(t: torch.Tensor) -> torch.Tensor:
    kernel = _SQ.get(t.dtype)
    if kernel is not None and t.is_contiguous() and t.numel() > 0 and native.can_launch(t, kernel):
        blocks = _blocks(t)
        part = _common.out_empty(blocks, dtype=torch.float32, device=t.device)
        native.launch(kernel, (blocks,), (_THREADS,), [("ptr", part.data_ptr()), ("ptr", t.data_ptr()), ("i64", t.numel())], device=t.device)
        # Per-block partials summed in a fixed order: deterministic.
        return part.sum()
    if _host_f32(t):  # the native SIMD pass: f64 accumulation in a fixed order, ~10x torch's pow + sum
        return torch.tensor(_native.grad_sq_norm_raw(t.data_ptr(), t.numel()), dtype=torch.float32)
    return t.detach().float().pow(2).sum()


def _host_f32(t: torch.Tensor) -> bool:
    return t.device.type == "cpu" and t.dtype == torch.float32 and t.is_contiguous()


def grad_sq_norm(t) -> torch.Tensor:
    """Sum of squares (fp32, 0-dim tensor on the tensors' device) of a tensor or a list of
    tensors; computed on the device, no host synchronisation."""
    ts = _tensors("grad_sq_norm", t)
    if not ts:
        return torch.zeros((), dtype=torch.float32)
    parts = [_sq_norm_one(x) for x in ts]
    dev = parts[0].device
    return torch.stack([p.to(dev) for p in parts]).sum()


def all_finite_tensor(t) -> torch.Tensor:
    """0-dim bool tensor on the device: no NaN/Inf in t (a tensor or a list); no host sync."""
    ts = _tensors("all_finite", t)
    if not ts:
        return torch.ones((), dtype=torch.bool)
    flags = []
    for x in ts:
        kernel = _FIN.get(x.dtype)
        if kernel is not None and x.is_contiguous() and x.numel() > 0 and native.can_launch(x, kernel):
            flag = torch.zeros((), dtype=torch.int32, device=x.device)
            native.launch(kernel, (_blocks(x),), (_THREADS,), [("ptr", flag.data_ptr()), ("ptr", x.data_ptr()), ("i64", x.numel())], device=x.device)
            flags.append(flag == 0)
        elif _host_f32(x):  # the native SIMD pass (torch's isfinite + all: ~30x slower here)
            flags.append(torch.tensor(_native.all_finite_raw(x.data_ptr(), x.numel())))
        else:
            flags.append(torch.isfinite(x.detach()).all())
    dev = flags[0].device
    return torch.stack([f.to(dev) for f in flags]).all()


def all_finite(t) -> bool:
    """True when t (a tensor or a list of tensors) has no NaN/Inf; one host sync for the answer."""
    return bool(all_finite_tensor(t))
