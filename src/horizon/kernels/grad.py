"""Gradient handling ops: bf16 -> fp32 accumulation."""

from __future__ import annotations

import torch

from .. import native
from ..errors import HorizonError

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
