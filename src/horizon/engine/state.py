"""The model's home in host memory: one `LayerSlab` per streamed layer (fp32 master, Adam
m and v, the bf16 compute copy, and the fp32 gradient buffer when clipping), with the
per-layer layout that turns a flat buffer into named parameter views."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import HorizonError
from ..models import LayerDef, ModelSpec, init_tensor_, layer_defs


def state_numel(src):
    """Elements of a state-tensor source: a tensor, or a lazy slice of one in a file
    (`safetensors.safe_open(...).get_slice(name)`, so a rank can read just its shard).
    None for anything else."""
    if isinstance(src, torch.Tensor):
        return src.numel()
    shape = getattr(src, "get_shape", None)
    if callable(shape):
        n = 1
        for d in shape():
            n *= int(d)
        return n
    return None


def read_state_range(src, lo: int, hi: int) -> torch.Tensor:
    """Elements [lo, hi) of a state-tensor source (see `state_numel`), flattened."""
    if isinstance(src, torch.Tensor):
        return src.reshape(-1)[lo:hi]
    if len(src.get_shape()) == 1:
        return src[lo:hi]  # reads only these bytes of the file
    return src[:].reshape(-1)[lo:hi]


def check_state_sources(tensors, want: dict) -> None:
    """`want`: name -> expected element count. Raises HorizonError naming what differs."""
    if not isinstance(tensors, dict):
        raise HorizonError(f"state tensors must be a dict, got {type(tensors).__name__}")
    missing = sorted(set(want) - set(tensors))
    extra = sorted(set(tensors) - set(want))
    if missing or extra:
        raise HorizonError(f"state tensors do not match this model: missing {missing[:4]}, unexpected {extra[:4]}")
    for name, numel in want.items():
        src = tensors[name]
        got = state_numel(src)
        if got != numel:
            what = tuple(src.shape) if isinstance(src, torch.Tensor) else type(src).__name__ if got is None else got
            raise HorizonError(f"state tensor {name!r}: expected {numel} elements, got {what}")


@dataclass
class HostLayer:
    defn: LayerDef
    layout: object  # horizon.store.SlabLayout
    slab: object  # horizon.store.LayerSlab

    @property
    def key(self) -> str:
        return self.defn.key

    @property
    def numel(self) -> int:
        return self.layout.numel

    def master_views(self) -> dict:
        return self.layout.views(self.slab.master)


class HostModel:
    """All layers' slabs, in forward order: embedding, blocks, head."""

    # The host allocator's policy on the CPU device (engine/ledger.py MALLOC_POLICIES): keep a
    # step's freed blocks for the next step. The disk tier's model asks for the opposite.
    malloc_policy = "retain"

    def __init__(self, spec: ModelSpec, *, with_grad: bool, pin: bool):
        from ..store import SlabLayout

        self.spec = spec
        self.layers: list[HostLayer] = []
        layouts = {}
        for d in layer_defs(spec):
            # Decoder blocks share one template and therefore one layout.
            layout = layouts.get(id(d.template))
            if layout is None:
                layout = layouts[id(d.template)] = SlabLayout.from_shapes(dict(d.shapes))
            self.layers.append(self._make_layer(d, layout, with_grad=with_grad, pin=pin))
        self.by_key = {layer.key: layer for layer in self.layers}

    def _make_layer(self, defn: LayerDef, layout, *, with_grad: bool, pin: bool) -> HostLayer:
        # The one place a layer's slab is sized: `engine.distributed.ShardedHostModel`
        # overrides it to hold one rank's shard only.
        from ..store import LayerSlab

        # Fresh slabs are zero-filled (anonymous mappings), so the padding between the
        # aligned tensors stays zero for norms and AdamW.
        return HostLayer(defn, layout, LayerSlab(layout.numel, with_grad=with_grad, pin=pin))

    @property
    def num_parameters(self) -> int:
        return sum(
            int(torch.Size(shape).numel()) for layer in self.layers for shape in layer.defn.shapes.values()
        )

    @property
    def host_bytes(self) -> int:
        """Bytes the slabs map (each state region rounded up to whole pages)."""
        total = 0
        for layer in self.layers:
            s = layer.slab
            mapped = getattr(s, "nbytes", None)
            if mapped is None:
                mapped = sum(t.numel() * t.element_size()
                             for t in (s.master, s.exp_avg, s.exp_avg_sq, s.weights_bf16, s.grad) if t is not None)
            total += mapped
        return total

    def hf_views(self) -> dict:
        """HF tensor name -> view of the fp32 master (the import destinations / export sources)."""
        out = {}
        for layer in self.layers:
            out.update(layer.defn.hf_tensors(layer.master_views()))
        return out

    def init_random_(self, seed: int) -> None:
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise HorizonError(f"seed must be an int, got {seed!r}")
        own = getattr(self.spec, "init_host_model_", None)
        if own is not None:  # the hf path: the model's own `_init_weights`
            own(self, seed)
            return
        gen = torch.Generator().manual_seed(seed)
        std = self.spec.initializer_range
        for name, view in self.hf_views().items():
            init_tensor_(name, view, std, gen)

    def sync_bf16_(self) -> None:
        """Refreshes every bf16 compute copy from the master (after import or a state load)."""
        for layer in self.layers:
            sync = getattr(layer.slab, "sync_weights_bf16", None)
            if sync is not None:
                sync()
            else:
                layer.slab.weights_bf16.copy_(layer.slab.master)

    def state_tensors(self) -> dict:
        out = {}
        for layer in self.layers:
            s = layer.slab
            out[f"{layer.key}.master"] = s.master
            out[f"{layer.key}.exp_avg"] = s.exp_avg
            out[f"{layer.key}.exp_avg_sq"] = s.exp_avg_sq
        out.update(constant_tensors(self.layers))
        return out

    def load_state_tensors_(self, tensors: dict) -> None:
        """Copies full flat tensors (or lazy file slices, see `state_numel`) into the slabs."""
        own = self.state_tensors()
        check_state_sources(tensors, {name: dst.numel() for name, dst in own.items()})
        for name, dst in own.items():
            dst.view(-1).copy_(read_state_range(tensors[name], 0, dst.numel()))
        self.sync_bf16_()


def constant_tensors(layers) -> dict:
    """`<layer>.const.<name>` -> the host tensors a layer keeps but does not train (the hf
    path's persistent buffers, e.g. a router's expert biases), so checkpoints hold them too."""
    out = {}
    for layer in layers:
        for name, t in getattr(layer.defn.template, "constants", {}).items():
            out[f"{layer.key}.const.{name}"] = t
    return out
