"""Choosing the model path: one reader of a config for `horizon train`, `horizon plan` and
export.

- "native": Horizon's own templates (fused kernels, flash_moe) for the families they implement;
  `ModelSpec.from_hf_config` refuses any config feature they do not implement.
- "hf": transformers' own modules (`horizon.models.hf`), for any decoder-only causal LM.
- "auto" (the default): native when it accepts the config, else hf.

A model neither path trains is refused here, with one line naming the architecture and why.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from ...errors import HorizonError

MODEL_PATHS = ("auto", "native", "hf")


def _arch(cfg) -> str:
    if isinstance(cfg, dict):
        archs = cfg.get("architectures") or []
        if archs and isinstance(archs[0], str):
            return archs[0]
        return str(cfg.get("model_type", "?"))
    return "?"


def check_model_path(model_path) -> str:
    if model_path is None:
        return "auto"
    if model_path not in MODEL_PATHS:
        raise HorizonError(f"model_path must be one of {', '.join(MODEL_PATHS)}, got {model_path!r}")
    return model_path


def _hf(cfg: dict):
    try:
        import transformers  # noqa: F401
    except ImportError:
        raise HorizonError(f"{_arch(cfg)}: the hf model path needs the transformers package "
                           "(pip install 'transformers>=5')") from None
    from .spec import HFModelSpec

    return HFModelSpec.from_hf_config(cfg)


def resolve(config: dict, model_path: str = "auto"):
    """The spec to train `config` (the content of config.json) with: a native `ModelSpec` or
    an `HFModelSpec`; `layer_defs(spec)` gives its layers. Raises HorizonError (one line)."""
    from ..spec import ModelSpec

    model_path = check_model_path(model_path)
    if not isinstance(config, dict):
        raise HorizonError(f"config must be a dict (the content of config.json), got {type(config).__name__}")
    if model_path == "native":
        return ModelSpec.from_hf_config(config)
    if model_path == "hf":
        return _hf(config)
    try:
        return ModelSpec.from_hf_config(config)
    except HorizonError as native_error:
        try:
            return _hf(config)
        except HorizonError as hf_error:
            if _native_family(config):
                raise HorizonError(f"{hf_error} (native path: {native_error})") from None
            raise


def _native_family(cfg: dict) -> bool:
    from ..spec import _BY_MODEL_TYPE, ARCHITECTURES

    archs = cfg.get("architectures") or []
    return (archs and archs[0] in ARCHITECTURES) or (not archs and cfg.get("model_type") in _BY_MODEL_TYPE)


def model_path_of(spec) -> str:
    return getattr(spec, "model_path", "native")


@dataclass
class ModelSummary:
    """What `horizon plan` needs to know about a model, read the way `horizon train` reads it."""

    path: str                  # "native" or "hf"
    spec: object               # ModelSpec or HFModelSpec
    architecture: str
    num_layers: int
    hidden_size: int
    vocab_size: int
    tied: bool
    total_parameters: int      # what the slabs hold (trained parameters)
    active_parameters: int     # per token (MoE: only top-k of the experts count)
    layer_parameters: dict = field(default_factory=dict)  # layer key -> parameter count, forward order
    frozen_parameters: int = 0  # held on the host, exported, not trained (unused weights, buffers)

    @property
    def largest_layer(self) -> int:
        return max(self.layer_parameters.values()) if self.layer_parameters else 0


def summarize(config, model_path: str = "auto") -> ModelSummary:
    """Reads `config` (a config.json dict) as `resolve` does and counts
    its parameters per layer (total and active). What `horizon plan` and `horizon train` call."""
    import os

    from ..layers import layer_defs

    if isinstance(config, (str, os.PathLike)):  # io.model_dir reads directories (a layer above)
        raise HorizonError("summarize takes the content of config.json (horizon.io.model_dir.read_config reads a "
                           "model directory)")
    spec = resolve(config, model_path)
    defs = layer_defs(spec)
    sizes = {d.key: sum(math.prod(s) for s in d.shapes.values()) for d in defs}
    total = sum(sizes.values())
    active = sum(layer_active_parameters(spec, defs).values())
    frozen = 0
    path = model_path_of(spec)
    if path != "native":
        for d in defs:
            frozen += sum(c.numel() for c in getattr(d.template, "constants", {}).values())
    return ModelSummary(path=path, spec=spec, architecture=spec.architecture, num_layers=spec.num_layers,
                        hidden_size=spec.hidden_size, vocab_size=spec.vocab_size, tied=spec.tie_word_embeddings,
                        total_parameters=total, active_parameters=active, layer_parameters=sizes,
                        frozen_parameters=frozen)


def layer_active_parameters(spec, defs=None) -> dict:
    """Parameters a token uses per streamed layer (key -> count, forward order): all of them,
    less the routed experts it is not sent to (MoE: 1 - k/E of each routed expert tensor)."""
    from ..layers import layer_defs

    defs = layer_defs(spec) if defs is None else defs
    out = {}
    native = model_path_of(spec) == "native"
    for d in defs:
        n = sum(math.prod(shape) for shape in d.shapes.values())
        if native:
            if spec.is_moe and d.index is not None and d.index in spec.moe_layers:
                n -= (spec.num_experts - spec.num_experts_per_tok) * 3 * spec.hidden_size * spec.moe_intermediate_size
        else:
            n -= _inactive_expert_parameters(spec, d)
        out[d.key] = n
    return out


def _inactive_expert_parameters(spec, d) -> int:
    """Routed-expert parameters of layer `d` a token does not use: tensors under an `experts`
    module whose leading dimension is the number of experts (or one module per expert), scaled
    by 1 - k/E."""
    e, k = spec.num_experts, spec.num_experts_per_tok
    if not e or not k or k >= e or d.index is None:
        return 0
    inactive = 0
    for name, shape in d.shapes.items():
        parts = name.split(".")
        if "experts" not in parts or "shared_experts" in parts:
            continue
        after = parts[parts.index("experts") + 1]
        n = math.prod(shape)
        if after.isdigit():  # one module per expert
            inactive += n * (e - k) // e
        elif shape and shape[0] == e:
            inactive += n * (e - k) // e
    return inactive
