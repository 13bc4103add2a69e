"""Decoder-only transformers of the Llama family as layer templates (no parameters of
their own), the list of layers a model consists of, and HF-style initialisation."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .blocks import (  # noqa: F401
    DecoderBlockTemplate,
    EmbeddingTemplate,
    HeadTemplate,
    MoEBlockTemplate,
    shift_labels,
)
from .spec import ARCHITECTURES, ModelSpec  # noqa: F401


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
    """Embedding, the decoder blocks in order, then the head (final norm [+ LM head])."""
    if getattr(spec, "model_path", "native") == "hf":
        return spec.layer_defs()  # transformers' own modules (models/hf)
    dense = DecoderBlockTemplate(spec)
    moe = MoEBlockTemplate(spec) if spec.is_moe else None
    moe_layers = set(spec.moe_layers)
    return (
        [LayerDef("embed", EmbeddingTemplate(spec))]
        + [LayerDef(f"layers.{i}", moe if i in moe_layers else dense, i) for i in range(spec.num_layers)]
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


def resolve(config: dict, model_path: str = "auto"):
    """The spec to train a config.json with: native when it implements every feature the
    config uses ("auto"), else transformers' own modules (models/hf). See `models.hf.select`."""
    from .hf.select import resolve as _resolve

    return _resolve(config, model_path)


def summarize(config, model_path: str = "auto"):
    """`resolve` (of a config.json dict or a model directory) plus parameter counts (total,
    active per token, per streamed layer) for `horizon plan` and `horizon train`."""
    from .hf.select import summarize as _summarize

    return _summarize(config, model_path)
