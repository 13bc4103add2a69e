"""Fused linear + cross-entropy: loss of softmax(hidden @ weight.T) against labels, with
dL/dhidden and dL/dweight computed chunk by chunk over tokens in the forward, so the [N, V]
logits never exist at once. The per-row softmax/loss/gradient step runs as the CUDA kernel
`horizon_ce_rows_{bf16,f32}` on GPUs (in place on the chunk's logits) and in torch elsewhere."""

from __future__ import annotations

import torch

from .. import native
from ..errors import HorizonError
from ._common import acc_dtype, check_tensor, out_empty, ptr, same_device, use_kernel

_ROWS = {torch.bfloat16: "horizon_ce_rows_bf16", torch.float32: "horizon_ce_rows_f32"}
_THREADS = 256
# Logit elements per chunk (fp32: 256 MiB) unless the caller picks a chunk size.
_CHUNK_ELEMS = 1 << 26


def _rows_reference(logits, labels, ignore_index, scale):
    """Per row: loss = logsumexp - logit[label] (0 when ignored); returns (loss [C] fp32,
    dlogits = (softmax - onehot) * scale, zero on ignored rows, in fp32)."""
    lf = logits.to(acc_dtype(logits))
    valid = labels != ignore_index
    safe = torch.where(valid, labels, torch.zeros_like(labels))
    lse = torch.logsumexp(lf, dim=-1)
    picked = lf.gather(1, safe.unsqueeze(1)).squeeze(1)
    loss = torch.where(valid, lse - picked, torch.zeros_like(lse))
    grad = torch.softmax(lf, dim=-1)
    grad.scatter_add_(1, safe.unsqueeze(1), -torch.ones_like(picked).unsqueeze(1))
    grad = grad * (valid.to(lf.dtype) * scale.to(lf.dtype)).unsqueeze(1)
    return loss, grad


def _rows(logits, labels, ignore_index, scale):
    """Returns (loss [C] fp32, dlogits in logits.dtype). `scale` is a 0-dim fp32 tensor."""
    kernel = _ROWS.get(logits.dtype)
    if kernel is not None and use_kernel(kernel, logits, dtype=logits.dtype) and labels.is_contiguous():
        C, V = logits.shape
        loss = out_empty(C, dtype=torch.float32, device=logits.device)
        native.launch(
            kernel, (C,), (_THREADS,),
            [ptr(logits), ptr(loss), ptr(labels), ptr(scale), ("i32", V), ("i64", ignore_index)],
            device=logits.device,
        )
        return loss, logits
    loss, grad = _rows_reference(logits, labels, ignore_index, scale)
    return loss, grad.to(logits.dtype)


class FusedLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, labels, ignore_index, chunk, reduction):
        N, _ = hidden.shape
        valid = labels != ignore_index
        count = valid.sum().to(torch.float32)
        # Gradient scale of each row's loss: 1/count for the mean (guarded so that an all-ignored
        # batch gives zero gradients; its loss is nan as in torch), 1 for the sum.
        scale = (1.0 / count.clamp(min=1.0)) if reduction == "mean" else torch.ones((), device=hidden.device)
        scale = scale.to(torch.float32).contiguous()
        need_grad = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        dh = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        dw = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if ctx.needs_input_grad[1] else None
        for s in range(0, N, chunk):
            h = hidden[s : s + chunk]
            lab = labels[s : s + chunk]
            logits = h @ weight.t()
            loss, dlog = _rows(logits, lab, ignore_index, scale)
            total += loss.sum()
            if need_grad:
                dlog = dlog.to(hidden.dtype)
                if dh is not None:
                    dh[s : s + chunk] = dlog @ weight
                if dw is not None:
                    dw += (dlog.t() @ h).float()
        ctx.save_for_backward(dh, None if dw is None else dw)
        ctx.weight_dtype = weight.dtype
        return total / count if reduction == "mean" else total

    @staticmethod
    def backward(ctx, g):
        dh, dw = ctx.saved_tensors
        gh = None if dh is None else (dh * g.to(dh.dtype))
        gw = None if dw is None else (dw * g).to(ctx.weight_dtype)
        return gh, gw, None, None, None, None


def fused_linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    ignore_index: int = -100,
    chunk_size=None,
    reduction: str = "mean",
) -> torch.Tensor:
    """cross_entropy(hidden @ weight.T, labels) without materialising all logits.

    hidden [N, H], weight [V, H] (no bias), labels [N] int (already shifted). reduction "mean"
    (over non-ignored labels) or "sum". chunk_size = tokens per chunk (default: ~64M logits)."""
    check_tensor("fused_linear_cross_entropy: hidden", hidden, dims=2)
    check_tensor("fused_linear_cross_entropy: weight", weight, dims=2)
    if not isinstance(labels, torch.Tensor) or labels.dim() != 1 or labels.is_floating_point():
        raise HorizonError("fused_linear_cross_entropy: labels must be a 1-D integer tensor")
    if labels.shape[0] != hidden.shape[0]:
        raise HorizonError(
            f"fused_linear_cross_entropy: labels {tuple(labels.shape)} do not match hidden {tuple(hidden.shape)}"
        )
    if weight.shape[1] != hidden.shape[1]:
        raise HorizonError(
            f"fused_linear_cross_entropy: weight {tuple(weight.shape)} does not match hidden {tuple(hidden.shape)}"
        )
    if hidden.dtype != weight.dtype:
        raise HorizonError(f"fused_linear_cross_entropy: dtypes differ: hidden {hidden.dtype} vs weight {weight.dtype}")
    if reduction not in ("mean", "sum"):
        raise HorizonError(f"fused_linear_cross_entropy: reduction must be 'mean' or 'sum', got {reduction!r}")
    if not isinstance(ignore_index, int):
        raise HorizonError(f"fused_linear_cross_entropy: ignore_index must be an int, got {ignore_index!r}")
    same_device("fused_linear_cross_entropy", hidden, weight, labels)
    N, V = hidden.shape[0], weight.shape[0]
    if chunk_size is None:
        chunk = max(1, min(max(N, 1), _CHUNK_ELEMS // max(V, 1)))
    elif isinstance(chunk_size, int) and not isinstance(chunk_size, bool) and chunk_size > 0:
        chunk = chunk_size
    else:
        raise HorizonError(f"fused_linear_cross_entropy: chunk_size must be a positive int, got {chunk_size!r}")
    labels = labels.to(torch.int64).contiguous()
    if not torch.compiler.is_compiling() and labels.numel() and hidden.device.type == "cpu":
        bad = (labels != ignore_index) & ((labels < 0) | (labels >= V))
        if bool(bad.any()):
            raise HorizonError(f"fused_linear_cross_entropy: label {int(labels[bad][0])} out of range [0, {V})")
    return FusedLinearCrossEntropy.apply(hidden.contiguous(), weight.contiguous(), labels, ignore_index, chunk, reduction)
