"""Decoder-only transformers of the Llama family as layer templates (no parameters of
their own), the list of layers a model consists of, and HF-style initialisation."""

from __future__ import annotations

from .blocks import (  # noqa: F401
    DecoderBlockTemplate,
    EmbeddingTemplate,
    HeadTemplate,
    MoEBlockTemplate,
    shift_labels,
)
from .positions import check_position_ids, micro_batch_inputs  # noqa: F401
from .spec import ARCHITECTURES, ModelSpec  # noqa: F401
from .layers import LayerDef, init_tensor_, layer_defs  # noqa: F401,E402


def resolve(config: dict, model_path: str = "auto"):
    """The spec to train a config.json with: native when it implements every feature the
    config uses ("auto"), else transformers' own modules (models/hf). See `models.hf.select`."""
    from .hf.select import resolve as _resolve

    return _resolve(config, model_path)


def layer_active_parameters(spec) -> dict:
    """Parameters a token uses per streamed layer of `spec` (MoE: only its top-k experts)."""
    from .hf.select import layer_active_parameters as _active

    return _active(spec)


def summarize(config, model_path: str = "auto"):
    """`resolve` (of a config.json dict) plus parameter counts (total,
    active per token, per streamed layer) for `horizon plan` and `horizon train`."""
    from .hf.select import summarize as _summarize

    return _summarize(config, model_path)
