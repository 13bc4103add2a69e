"""The model's home in host memory: one `LayerSlab` per streamed layer (fp32 master, Adam
m and v, the bf16 compute copy, and the fp32 gradient buffer when clipping), with the
per-layer layout that turns a flat buffer into named parameter views."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import HorizonError
from ..models import LayerDef, ModelSpec, init_tensor_, layer_defs


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

    def __init__(self, spec: ModelSpec, *, with_grad: bool, pin: bool):
        from ..store import LayerSlab, SlabLayout

        self.spec = spec
        self.layers: list[HostLayer] = []
        layouts = {}
        for d in layer_defs(spec):
            # Decoder blocks share one template and therefore one layout.
            layout = layouts.get(id(d.template))
            if layout is None:
                layout = layouts[id(d.template)] = SlabLayout.from_shapes(dict(d.shapes))
            # Fresh slabs are zero-filled (anonymous mappings), so the padding between the
            # aligned tensors stays zero for norms and AdamW.
            slab = LayerSlab(layout.numel, with_grad=with_grad, pin=pin)
            self.layers.append(HostLayer(d, layout, slab))
        self.by_key = {layer.key: layer for layer in self.layers}

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
        return out

    def load_state_tensors_(self, tensors: dict) -> None:
        if not isinstance(tensors, dict):
            raise HorizonError(f"state tensors must be a dict, got {type(tensors).__name__}")
        own = self.state_tensors()
        missing = sorted(set(own) - set(tensors))
        extra = sorted(set(tensors) - set(own))
        if missing or extra:
            raise HorizonError(f"state tensors do not match this model: missing {missing[:4]}, unexpected {extra[:4]}")
        for name, dst in own.items():
            src = tensors[name]
            if not isinstance(src, torch.Tensor) or src.numel() != dst.numel():
                got = tuple(src.shape) if isinstance(src, torch.Tensor) else type(src).__name__
                raise HorizonError(f"state tensor {name!r}: expected {dst.numel()} elements, got {got}")
        for name, dst in own.items():
            dst.copy_(tensors[name].reshape(-1))
        self.sync_bf16_()
