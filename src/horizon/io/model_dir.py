"""Where a run's model comes from: a Hugging Face model directory (config.json + *.safetensors),
or a built-in preset (random initialisation). Both are read through the model layer's one
reader (`ModelSpec.from_hf_config`), so `horizon plan`, `horizon train` and `horizon export`
accept and refuse the same models with the same message."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from ..errors import HorizonError
from ..models import presets
from ..models import resolve as resolve_spec


@dataclass
class ModelSource:
    config: dict             # the config.json dict
    spec: object             # its validated reading: a native ModelSpec or an hf-path spec
    model_dir: Path | None   # weights to load, None for a random initialisation
    tokenizer: Path | None   # tokenizer.json, when known
    name: str                # how messages name the model


def read_config(path) -> dict:
    """config.json of a model directory, as a dict (one clear line for every way it can fail)."""
    d = Path(path).expanduser()
    if not d.exists():
        raise HorizonError(f"model directory {str(path)!r} does not exist")
    if not d.is_dir():
        raise HorizonError(f"model directory {str(path)!r} is not a directory")
    try:
        config = json.loads((d / "config.json").read_text())
    except FileNotFoundError:
        raise HorizonError(f"model directory {str(path)!r} has no config.json") from None
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise HorizonError(f"model directory {str(path)!r}: config.json is unreadable or not JSON ({e})") from None
    if not isinstance(config, dict):
        raise HorizonError(f"model directory {str(path)!r}: config.json is not a JSON object")
    return config


def read_model_dir(path, model_path: str = "auto") -> ModelSource:
    d = Path(path).expanduser()
    config = read_config(path)
    spec = resolve_spec(config, model_path)  # unsupported model or bad sizes: one clear line
    if not any(d.glob("*.safetensors")):
        raise HorizonError(f"model directory {str(path)!r} has no *.safetensors weights")
    tok = d / "tokenizer.json"
    return ModelSource(config, spec, d, tok if tok.is_file() else None, str(d))


def from_preset(name: str, shipped_tokenizer: Path | None, model_path: str = "auto") -> ModelSource:
    config = presets.get(name)
    tok = shipped_tokenizer if name in presets.USES_SHIPPED_TOKENIZER else None
    return ModelSource(config, resolve_spec(config, model_path), None, tok, f"preset {name}")


def from_config(config, name: str, tokenizer: Path | None = None, model_path: str = "auto") -> ModelSource:
    """A model known only by its config (a checkpoint's model_config)."""
    if not isinstance(config, dict):
        raise HorizonError(f"{name}: the model config is not a JSON object")
    return ModelSource(config, resolve_spec(config, model_path), None, tokenizer, name)


def resolve(model_dir: str | None, preset: str | None, tokenizer: str | None,
            shipped_tokenizer: Path | None, model_path: str = "auto") -> ModelSource:
    """The model a ModelConfig names: its directory, else its preset, else the tiny preset."""
    if model_dir is not None:
        src = read_model_dir(model_dir, model_path)
    else:
        src = from_preset(preset or "tiny", shipped_tokenizer, model_path)
    if tokenizer is not None:
        src.tokenizer = Path(tokenizer).expanduser()
    return src
