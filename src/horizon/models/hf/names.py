"""Checkpoint names for the hf path: the names and layouts transformers itself writes.

transformers (5.x) holds some weights in a different layout than its checkpoints (experts
fused into one tensor in memory, one tensor per expert on disk) and converts on load and
save. Which disk tensor holds which elements is found by running transformers' own reverse
conversion (`revert_weight_conversion`, what `save_pretrained` does) on tensors of element
indices: each disk tensor then says where its elements live in the layer's tensors. Almost
always that is a strided view of one tensor (a slice, a transpose), so import and export read
and write the slab in place; anything else goes through an index gather/scatter.
"""

from __future__ import annotations

import math

import torch

from ...errors import HorizonError


def _revert(model, state: dict) -> dict:
    from transformers.core_model_loading import revert_weight_conversion

    from .structure import _quiet_transformers

    with _quiet_transformers():
        out = revert_weight_conversion(model, dict(state))
    return {k: (v[0] if isinstance(v, (list, tuple)) else v) for k, v in out.items()}


def _strided(rel: torch.Tensor, n_src: int):
    """(shape, stride, offset) with arange(n_src).as_strided(...) == rel, or None."""
    shape = tuple(rel.shape)
    flat = rel.reshape(-1)
    if flat.numel() == 0:
        return None
    offset = int(flat[0])
    stride = []
    for d, size in enumerate(shape):
        if size > 1:
            idx = [0] * len(shape)
            idx[d] = 1
            stride.append(int(rel[tuple(idx)]) - offset)
        else:
            stride.append(1)
    if any(s < 0 for s in stride):
        return None
    extent = offset + sum((size - 1) * s for size, s in zip(shape, stride))
    if extent >= n_src:
        return None
    if not torch.equal(torch.arange(n_src).as_strided(shape, stride, offset), rel):
        return None
    return shape, tuple(stride), offset


class _Gathered:
    """A disk tensor whose elements are scattered over the layer's tensors: reads gather,
    writes scatter (`copy_`). Quacks enough like a tensor for import and export."""

    def __init__(self, sources: dict, pieces: list, shape: tuple):
        self._sources = sources
        self._pieces = pieces  # (source name, positions in the disk tensor, positions in the source)
        self.shape = torch.Size(shape)
        self.dtype = torch.float32

    def numel(self) -> int:
        return math.prod(self.shape)

    def materialize(self) -> torch.Tensor:
        first = next(iter(self._sources.values()))
        out = torch.empty(self.numel(), dtype=first.dtype, device=first.device)
        for name, dpos, spos in self._pieces:
            out[dpos] = self._sources[name].reshape(-1)[spos]
        return out.view(self.shape)

    def detach(self) -> torch.Tensor:
        return self.materialize()

    def to(self, *args, **kwargs) -> torch.Tensor:
        return self.materialize().to(*args, **kwargs)

    def copy_(self, src: torch.Tensor):
        src = src.reshape(-1)
        for name, dpos, spos in self._pieces:
            dst = self._sources[name]
            flat = dst.view(-1)
            flat[spos] = src[dpos].to(dst.dtype)
        return self


class DiskNames:
    """Maps one layer's tensors (full in-memory names -> shapes, plus host-held constants such
    as persistent buffers) to the names and layouts of the checkpoint transformers writes."""

    def __init__(self, model, shapes: dict, constants: dict | None = None):
        self._model = model
        self._shapes = dict(shapes)
        for name, t in (constants or {}).items():
            self._shapes[name] = tuple(t.shape)
        self._constants = dict(constants or {})
        self._plan = None

    def _make_plan(self) -> list:
        starts, at, state = {}, 0, {}
        for name, shape in self._shapes.items():
            n = math.prod(shape)
            state[name] = torch.arange(at, at + n, dtype=torch.int64).view(shape)
            starts[name] = (at, n)
            at += n
        disk = _revert(self._model, state)
        order = sorted((lo, name) for name, (lo, _n) in starts.items())
        los = torch.tensor([lo for lo, _ in order], dtype=torch.int64)
        plan, covered = [], 0
        for dname, ids in disk.items():
            if not isinstance(ids, torch.Tensor) or ids.dtype != torch.int64:
                raise HorizonError(f"checkpoint tensor {dname!r}: transformers' conversion is not a rearrangement")
            flat = ids.reshape(-1)
            covered += flat.numel()
            owner = torch.searchsorted(los, flat, right=True) - 1
            if flat.numel() and bool((owner == owner[0]).all()):
                lo, src = order[int(owner[0])]
                view = _strided(ids - lo, starts[src][1])
                if view is not None:
                    plan.append((dname, "view", src, view))
                    continue
            pieces = []
            for k in torch.unique(owner).tolist():
                lo, src = order[k]
                dpos = (owner == k).nonzero().reshape(-1)
                pieces.append((src, dpos, flat[dpos] - lo))
            plan.append((dname, "gather", pieces, tuple(ids.shape)))
        if covered != at:
            raise HorizonError(f"transformers' checkpoint layout covers {covered} of {at} elements of "
                               f"{next(iter(self._shapes), '?')}...")
        return plan

    def tensors(self, views: dict) -> dict:
        """Disk name -> tensor (a view into `views` or a constant) or a gather object."""
        if self._plan is None:
            self._plan = self._make_plan()
        sources = dict(views)
        sources.update(self._constants)
        out = {}
        for entry in self._plan:
            if entry[1] == "view":
                dname, _, src, (shape, stride, offset) = entry
                base = sources[src]
                if offset == 0 and tuple(base.shape) == shape and base.is_contiguous():
                    out[dname] = base
                else:
                    out[dname] = base.as_strided(shape, stride, base.storage_offset() + offset)
            else:
                dname, _, pieces, shape = entry
                out[dname] = _Gathered(sources, pieces, shape)
        return out
