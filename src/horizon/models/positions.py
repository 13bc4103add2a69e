"""Positions and attention masks of the native blocks: one document per row by default, or
packed documents described by `position_ids`.

Packed sequences follow the padding-free convention (transformers' DataCollatorWithFlattening):
`position_ids` [batch, seq] counts 0, 1, 2, ... within each document and a position id of 0
starts a new document. Given position ids, a block applies the rotary embedding at those
positions and attends block-diagonally: a token sees the earlier tokens of its own document
only (and, in a sliding-window layer, only the last `window` of them, itself included); the
label of each document's first token is ignored (it would be the previous document's last
prediction). A packed row then trains exactly as its documents would one by one, and as
transformers trains the same row given the same position_ids and use_cache=False (it finds
the documents from the ids where a position does not follow its predecessor; with a cache it
does not look for them and only the rotary positions restart). Without position ids every
row is one document at positions 0..seq-1, and a full-attention layer takes SDPA's causal
path with no mask tensor at all.

The masks are explicit boolean tensors for SDPA, on the CPU and on CUDA alike; a
variable-length (document-indexed) attention kernel on CUDA is future work.
"""

from __future__ import annotations

import torch

from ..errors import HorizonError


def check_position_ids(position_ids, shape) -> torch.Tensor:
    """Validates packed-sequence position ids against input_ids' `shape`; returns them as a
    CPU int64 tensor. Each row must start at 0 and each id be 0 (a new document) or the
    previous id + 1."""
    if not isinstance(position_ids, torch.Tensor):
        try:
            position_ids = torch.as_tensor(position_ids)
        except (TypeError, ValueError, RuntimeError) as e:
            raise HorizonError(f"position_ids must be a 2-D integer tensor [batch, seq]: {e}") from e
    pos = position_ids
    if pos.is_floating_point() or pos.is_complex() or pos.dtype == torch.bool:
        raise HorizonError(f"position_ids must hold integers, got {pos.dtype}")
    if tuple(pos.shape) != tuple(shape):
        raise HorizonError(f"position_ids shape {tuple(pos.shape)} != input_ids shape {tuple(shape)}")
    pos = pos.detach().to("cpu", torch.int64)
    if bool((pos < 0).any()):
        raise HorizonError(f"position_ids must be >= 0, got {int(pos.min())}")
    if bool((pos[:, 0] != 0).any()):
        row = int((pos[:, 0] != 0).nonzero()[0, 0])
        raise HorizonError(f"position_ids row {row} starts at {int(pos[row, 0])}, not 0 (each row starts a document)")
    ok = (pos[:, 1:] == 0) | (pos[:, 1:] == pos[:, :-1] + 1)
    if not bool(ok.all()):
        row, col = (int(v) for v in (~ok).nonzero()[0])
        raise HorizonError(
            f"position_ids[{row}, {col + 1}] is {int(pos[row, col + 1])} after {int(pos[row, col])}: "
            "within a document ids count up by 1, and 0 starts the next document"
        )
    return pos


def is_one_document_per_row(position_ids: torch.Tensor) -> bool:
    """True when every row is 0, 1, ..., seq-1 (nothing packed)."""
    seq = position_ids.shape[-1]
    return bool((position_ids == torch.arange(seq, device=position_ids.device)).all())


def document_ids(position_ids: torch.Tensor) -> torch.Tensor:
    """[B, T] -> [B, T] int: the index of each token's document within its row."""
    return (position_ids == 0).cumsum(-1)


def attention_mask(seq: int, window: int | None, doc_ids: torch.Tensor | None, device) -> torch.Tensor | None:
    """The boolean mask SDPA takes (True: attend) for causal attention over `seq` tokens,
    within `window` (a query sees itself and the window - 1 tokens before it; transformers'
    `kv_idx > q_idx - sliding_window`) and within documents (`doc_ids` [B, T]). None when
    it is plain causal attention (SDPA's is_causal path)."""
    windowed = window is not None and window < seq
    if doc_ids is None and not windowed:
        return None
    q = torch.arange(seq, device=device).unsqueeze(1)
    k = torch.arange(seq, device=device).unsqueeze(0)
    mask = k <= q
    if windowed:
        mask = mask & (q - k < window)
    mask = mask.view(1, 1, seq, seq)
    if doc_ids is not None:
        d = doc_ids.to(device)
        mask = mask & (d.unsqueeze(-1) == d.unsqueeze(-2)).unsqueeze(1)
    return mask


def micro_batch_inputs(rotary, position_ids, seq: int, micro_batch_size: int, lo: int, hi: int, dtype, device) -> list:
    """Per micro-batch lo..hi-1 of a step: (cos, sin, block keyword arguments).

    Without position ids (or with one document per row), one table [1, seq, D] serves every
    micro-batch and the blocks get no extra argument; packed rows get their own tables
    [rows, seq, D] and their document ids. The rotary state (dynamic / longrope) follows
    the step's longest position, as transformers' forward over the whole batch."""
    if position_ids is not None and is_one_document_per_row(position_ids):
        position_ids = None
    if position_ids is None:
        rotary.update(seq)
        cos, sin = rotary.cos_sin(torch.arange(seq).unsqueeze(0), dtype=dtype, device=device)
        return [(cos, sin, {})] * (hi - lo)
    rotary.update(int(position_ids.max()) + 1)
    out = []
    for pos in position_ids.split(micro_batch_size)[lo:hi]:
        cos, sin = rotary.cos_sin(pos, dtype=dtype, device=device)
        out.append((cos, sin, {"doc_ids": document_ids(pos).to(device, non_blocking=True)}))
    return out
