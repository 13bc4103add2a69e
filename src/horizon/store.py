"""The host store: every layer's state in host RAM, owned by Rust and seen by torch.

`LayerSlab` holds one layer's flat fp32 master, Adam moments, optional fp32 gradient buffer and
bf16 compute copy in one NUMA-placed, page-aligned mapping; `host_buffer` makes a standalone
buffer of the same kind (landing and staging slots); `SlabLayout` maps parameter names to
aligned offsets inside a slab. The tensors are torch views of the Rust memory (DLPack, no copy):
they stay valid after the slab object is gone, since each keeps the mapping alive.
"""

from __future__ import annotations

import json
import logging
import math
from typing import Dict, Mapping, Optional, Sequence, Tuple

import torch

from . import _native
from .errors import HorizonError

log = logging.getLogger(__name__)

# Offsets inside a slab are multiples of this many elements (64 bytes of fp32): whole AVX-512
# vectors for the CPU step and aligned DMA for the copies.
ALIGN = 16

_DTYPES = {
    torch.float32: "float32",
    torch.float64: "float64",
    torch.float16: "float16",
    torch.bfloat16: "bfloat16",
    torch.uint8: "uint8",
    torch.int8: "int8",
    torch.int16: "int16",
    torch.int32: "int32",
    torch.int64: "int64",
}

_noted: set = set()


def _note_once(what: str, reason: str) -> None:
    # One line per distinct reason per process: a model has hundreds of slabs.
    if reason and (what, reason) not in _noted:
        _noted.add((what, reason))
        log.info("host store: %s: %s", what, reason)


def _check_count(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise HorizonError(f"{name} must be a non-negative int, got {value!r}")
    return value


def _check_node(numa_node) -> Optional[int]:
    if numa_node is None:
        return None
    if isinstance(numa_node, bool) or not isinstance(numa_node, int) or numa_node < 0:
        raise HorizonError(f"numa_node must be None or a non-negative int, got {numa_node!r}")
    return numa_node


def gpu_numa_node() -> Optional[int]:
    """The NUMA node of torch's current CUDA device, or None (no GPU, or the kernel does not say)."""
    if not torch.cuda.is_available():
        return None
    from . import native

    ordinal = torch.cuda.current_device()
    for g in native.system_info().get("gpus", []):
        if g.get("ordinal") == ordinal:
            return g.get("numa_node")
    return None


def _placement(handle) -> dict:
    p = json.loads(handle.placement_json())
    _note_once("NUMA binding", "" if p["bound"] else p["bind_note"])
    _note_once("huge pages", p["huge_pages_note"])
    _note_once("pinning", p["pin_note"])
    return p


class LayerSlab:
    """One layer's host state: flat fp32 master, exp_avg, exp_avg_sq, optional fp32 grad,
    bf16 compute copy, all NUMA-placed (node chosen by numa_node or the GPU's), page-aligned.

    With `pin`, the bf16 copy and the gradient buffer (the parts that cross PCIe) are
    page-locked with cuMemHostRegister when a CUDA driver exists; `placement` says what
    happened (node binding, huge pages, pinned bytes, and why not where not)."""

    master: torch.Tensor
    exp_avg: torch.Tensor
    exp_avg_sq: torch.Tensor
    grad: Optional[torch.Tensor]
    weights_bf16: torch.Tensor
    numel: int
    nbytes: int

    def __init__(self, numel: int, *, with_grad: bool = False, numa_node: Optional[int] = None, pin: bool = True):
        _check_count("numel", numel)
        node = _check_node(numa_node)
        if node is None:
            node = gpu_numa_node()
        self._native = _native.LayerSlab(numel, bool(with_grad), node, bool(pin))
        view = lambda part: torch.from_dlpack(self._native.dlpack(part))  # noqa: E731
        self.master = view("master")
        self.exp_avg = view("exp_avg")
        self.exp_avg_sq = view("exp_avg_sq")
        self.grad = view("grad") if with_grad else None
        self.weights_bf16 = view("weights_bf16")
        self.numel = numel
        self.nbytes = self._native.nbytes
        self.placement = _placement(self._native)

    def sync_weights_bf16(self) -> None:
        """Rewrites the bf16 copy from the master (round to nearest even), e.g. after loading."""
        self._native.sync_weights_bf16()

    def __repr__(self) -> str:
        p = self.placement
        return (
            f"LayerSlab(numel={self.numel}, grad={self.grad is not None}, nbytes={self.nbytes}, "
            f"node={p['numa_node']}, bound={p['bound']}, pinned_bytes={p['pinned_bytes']})"
        )


def host_buffer(
    numel: int, dtype: torch.dtype = torch.float32, *, numa_node: Optional[int] = None, pin: bool = True
) -> torch.Tensor:
    """A standalone page-aligned, NUMA-placed 1-D host tensor of `numel` zeros, page-locked
    when `pin` and a CUDA driver exists (landing and staging slots). The tensor owns its
    mapping: it is unmapped when the tensor is freed."""
    _check_count("numel", numel)
    node = _check_node(numa_node)
    if dtype not in _DTYPES:
        raise HorizonError(f"host_buffer: unsupported dtype {dtype} (supported: {sorted(map(str, _DTYPES))})")
    if node is None:
        node = gpu_numa_node()
    nbytes = numel * torch.empty((), dtype=dtype).element_size()
    region = _native.HostRegion(nbytes, node)
    if pin and nbytes > 0:
        region.pin(0, nbytes)
    _placement(region)
    return torch.from_dlpack(region.dlpack(0, numel, _DTYPES[dtype]))


def numa_pages(tensor: torch.Tensor) -> Optional[Tuple[Dict[int, int], int]]:
    """Where the pages of the mapping holding `tensor` live, from /proc/self/numa_maps:
    ({node: pages}, page size in KiB), or None where the kernel does not say."""
    r = _native.numa_pages(tensor.data_ptr())
    if r is None:
        return None
    nodes, kib = r
    return dict(nodes), kib


def probe(numa_node: Optional[int] = None) -> dict:
    """What the host store does on this machine, for `horizon doctor`: maps a small region the
    way a slab is mapped (bound to `numa_node`, else the GPU's node, else node 0; huge pages;
    pinned when a driver exists) and returns its placement with the pages seen per node."""
    node = _check_node(numa_node)
    if node is None:
        node = gpu_numa_node()
    if node is None:
        node = 0
    region = _native.HostRegion(4 << 20, node)
    region.pin(0, region.nbytes)
    p = json.loads(region.placement_json())
    found = _native.numa_pages(region.address)
    p["pages_per_node"] = None if found is None else {int(n): c for n, c in found[0]}
    return p


class SlabLayout:
    """Where each parameter of a layer lives inside its slab: name -> (offset, shape), offsets
    in elements, each a multiple of `align`. One layout serves every layer of a block type."""

    def __init__(self, offsets: Mapping[str, int], shapes: Mapping[str, Sequence[int]], numel: int, align: int = ALIGN):
        self.offsets: Dict[str, int] = dict(offsets)
        self.shapes: Dict[str, Tuple[int, ...]] = {k: tuple(v) for k, v in shapes.items()}
        self.numel = numel
        self.align = align

    @classmethod
    def from_shapes(cls, shapes: Mapping[str, Sequence[int]], *, align: int = ALIGN) -> "SlabLayout":
        """Packs the parameters in the given order, each offset rounded up to `align` elements."""
        if isinstance(align, bool) or not isinstance(align, int) or align < 1:
            raise HorizonError(f"align must be a positive int, got {align!r}")
        offsets, clean, at = {}, {}, 0
        for name, shape in shapes.items():
            if not isinstance(name, str) or not name:
                raise HorizonError(f"parameter names must be non-empty strings, got {name!r}")
            try:
                dims = tuple(shape)
            except TypeError:
                raise HorizonError(f"shape of {name!r} must be a sequence of ints, got {shape!r}") from None
            if any(isinstance(d, bool) or not isinstance(d, int) or d < 0 for d in dims):
                raise HorizonError(f"shape of {name!r} must hold non-negative ints, got {shape!r}")
            at = -(-at // align) * align
            offsets[name], clean[name] = at, dims
            at += math.prod(dims)
        return cls(offsets, clean, -(-at // align) * align, align)

    def __len__(self) -> int:
        return len(self.offsets)

    def __contains__(self, name) -> bool:
        return name in self.offsets

    def span(self, name: str) -> Tuple[int, int]:
        """(offset, numel) of one parameter."""
        if name not in self.offsets:
            raise HorizonError(f"no parameter {name!r} in this layout (have {list(self.offsets)})")
        return self.offsets[name], math.prod(self.shapes[name])

    def views(self, flat: torch.Tensor) -> Dict[str, torch.Tensor]:
        """name -> a view of `flat` (1-D, at least `numel` elements) with the parameter's shape."""
        if not isinstance(flat, torch.Tensor) or flat.dim() != 1:
            raise HorizonError(f"views need a 1-D tensor, got {getattr(flat, 'shape', type(flat))}")
        if flat.numel() < self.numel:
            raise HorizonError(f"views need at least {self.numel} elements, the tensor has {flat.numel()}")
        return {
            name: flat.narrow(0, off, math.prod(self.shapes[name])).view(self.shapes[name])
            for name, off in self.offsets.items()
        }

    def gaps(self) -> Tuple[Tuple[int, int], ...]:
        """(start, end) element ranges no parameter covers (the alignment padding), in order."""
        out, at = [], 0
        for name, off in sorted(self.offsets.items(), key=lambda kv: kv[1]):
            if off > at:
                out.append((at, off))
            at = max(at, off + math.prod(self.shapes[name]))
        if self.numel > at:
            out.append((at, self.numel))
        return tuple(out)

    def __repr__(self) -> str:
        return f"SlabLayout({len(self)} parameters, numel={self.numel}, align={self.align})"
