"""The model options of a run: where the model comes from and its tokenizer."""

from __future__ import annotations

from dataclasses import dataclass

from ..options import ConfigError, check_fields, option
from . import presets


@dataclass
class ModelConfig:
    model_dir: str | None = option(None, "a Hugging Face model directory (config.json, *.safetensors)",
                                   metavar="DIR", path=True)
    preset: str | None = option(None, f"a built-in model config: {', '.join(presets.names())}", metavar="NAME",
                                default_help="tiny, when no --model-dir")
    tokenizer: str | None = option(None, "tokenizer.json", metavar="FILE", path=True,
                                   default_help="the model's, or the shipped one")
    model_path: str = option("auto", "native: our fused templates; hf: transformers' own modules, streamed; "
                             "auto: native when it implements the model's config, else hf",
                             choices=("auto", "native", "hf"))

    def __post_init__(self):
        check_fields(self)
        if self.model_dir is not None and self.preset is not None:
            raise ConfigError("give either --model-dir or --preset, not both")
