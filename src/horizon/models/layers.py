"""The streamed layers of a model: `LayerDef` (key, template, index) and `layer_defs(spec)`, for the
native templates and the hf path alike, and HF-style initialisation of a tensor."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .blocks import DecoderBlockTemplate, EmbeddingTemplate, HeadTemplate, MoEBlockTemplate
from .spec import ModelSpec


@dataclass
class LayerDef:
    """One streamed layer: its key, its template, and (for decoder blocks) its index."""

    key: str
    template: object
    index: int | None = None

    @property
    def shapes(self) -> dict:
        return self.template.shapes

    def hf_tensors(self, views: dict) -> dict:
        """HF checkpoint name -> tensor (a view into `views`), for import and export."""
        return self.template.hf_tensors(self.index, views)


def layer_defs(spec: ModelSpec) -> list[LayerDef]:
    """Embedding, the decoder blocks in order, then the head (final norm [+ LM head]). Blocks
    of one kind (dense / MoE) and one attention window share one template."""
    if getattr(spec, "model_path", "native") == "hf":
        return spec.layer_defs()  # transformers' own modules (models/hf)
    templates = {}
    moe_layers = set(spec.moe_layers)

    def block(i):
        kind = "moe" if i in moe_layers else "dense"
        window = spec.layer_windows[i]
        if (kind, window) not in templates:
            cls = MoEBlockTemplate if kind == "moe" else DecoderBlockTemplate
            templates[kind, window] = cls(spec, window)
        return templates[kind, window]

    return (
        [LayerDef("embed", EmbeddingTemplate(spec))]
        + [LayerDef(f"layers.{i}", block(i), i) for i in range(spec.num_layers)]
        + [LayerDef("head", HeadTemplate(spec))]
    )


def init_tensor_(name: str, tensor: torch.Tensor, std: float, generator: torch.Generator) -> None:
    """HF `_init_weights` for this family: norm weights 1, biases 0, matrices (and experts,
    routers, embeddings) N(0, std)."""
    with torch.no_grad():
        if name.endswith("norm.weight"):
            tensor.fill_(1.0)
        elif name.endswith(".bias"):
            tensor.zero_()
        else:
            # Draw in fp32 on the CPU so the result does not depend on the destination.
            tensor.copy_(torch.empty(tensor.shape, dtype=torch.float32).normal_(0.0, std, generator=generator))
