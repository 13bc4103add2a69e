"""Hugging Face model directories: read `config.json` + `*.safetensors` (one file or shards
with `model.safetensors.index.json`) into destination tensors, and write them back in the
same format so `transformers` loads the result. Local files only; never the network."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterable

import torch

from safetensors import SafetensorError

from ..errors import HorizonError

CONFIG = "config.json"
SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"
# The safetensors dtypes a weight may have (converted to the model's fp32 master on load).
_WEIGHT_DTYPES = ("F32", "F16", "BF16", "F64")
_INT_DTYPES = {torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
               torch.bool: "BOOL"}
# Buffers some exporters write that are not parameters.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def _model_dir(model_dir) -> Path:
    if not isinstance(model_dir, (str, os.PathLike)):
        raise HorizonError(f"model_dir must be a path, got {type(model_dir).__name__}")
    path = Path(model_dir)
    if not path.is_dir():
        raise HorizonError(f"model directory {str(path)!r} does not exist or is not a directory")
    return path


def read_config(model_dir) -> dict:
    path = _model_dir(model_dir) / CONFIG
    if not path.is_file():
        raise HorizonError(f"{str(path)!r} not found: a Hugging Face model directory needs a config.json")
    try:
        cfg = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise HorizonError(f"cannot read {str(path)!r}: {e}") from e
    if not isinstance(cfg, dict):
        raise HorizonError(f"{str(path)!r} does not hold a JSON object")
    return cfg


def weight_files(model_dir) -> list[Path]:
    """The safetensors files of a model directory, in a stable order."""
    root = _model_dir(model_dir)
    index = root / INDEX
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise HorizonError(f"cannot read the shard index {str(index)!r}: {e}") from e
        files = sorted({root / f for f in weight_map.values()})
    elif (root / SINGLE).is_file():
        files = [root / SINGLE]
    else:
        files = sorted(root.glob("*.safetensors"))
    if not files:
        raise HorizonError(f"no *.safetensors weights in {str(root)!r}")
    for f in files:
        if f.is_dir():
            raise HorizonError(f"{str(f)!r} is a directory, not a safetensors file")
    missing = [str(f) for f in files if not f.exists()]
    if missing:
        raise HorizonError(f"shard(s) named by the index are missing: {missing}")
    for f in files:
        try:
            with open(f, "rb"):
                pass
        except OSError as e:
            raise HorizonError(f"cannot read weights {str(f)!r}: {e.strerror or e}") from None
    return files


def load_tensors(model_dir, destinations: dict[str, torch.Tensor], *, optional: Iterable[str] = (),
                 ignore: Iterable[str] = ()) -> None:
    """Copies every tensor of the checkpoint into `destinations[name]` (converting dtype).

    Every destination must be found (except the names in `optional`), with the same shape;
    a checkpoint tensor without a destination is an error, so a mismatched architecture
    cannot load silently. `ignore`: regular expressions of checkpoint names the model does not
    use (transformers' `_keys_to_ignore_on_load_unexpected`, e.g. multi-token-prediction layers).
    """
    import re

    optional = set(optional)
    ignore = [re.compile(p) for p in ignore]
    seen = set()
    for file in weight_files(model_dir):
        try:
            _load_file(file, destinations, seen, ignore)
        except SafetensorError as e:
            raise HorizonError(f"model directory {str(model_dir)!r}: corrupt *.safetensors weights in {file.name} ({e})") from None
    missing = sorted(set(destinations) - seen - optional)
    if missing:
        raise HorizonError(f"checkpoint in {str(model_dir)!r} lacks tensors: {missing[:8]}{' ...' if len(missing) > 8 else ''}")


def _load_file(file: Path, destinations: dict, seen: set, ignore=()) -> None:
    from safetensors import safe_open

    with safe_open(str(file), framework="pt", device="cpu") as f:
        for name in f.keys():
            if name.endswith(_IGNORED_SUFFIXES) or (name not in destinations and any(p.search(name) for p in ignore)):
                continue
            if name not in destinations:
                raise HorizonError(f"{file.name}: unexpected tensor {name!r} for this architecture")
            dtype = f.get_slice(name).get_dtype()
            dst = destinations[name]
            # An integer buffer of the model (DeepSeek-V4's token-to-expert table) is read as
            # the integers it is; everything trained is floating point.
            if not dst.is_floating_point():
                if dtype != _INT_DTYPES.get(dst.dtype):
                    raise HorizonError(f"{file.name}: tensor {name!r} is {dtype}; this model's {name} is "
                                       f"{_INT_DTYPES.get(dst.dtype, dst.dtype)}")
            elif dtype not in _WEIGHT_DTYPES:
                raise HorizonError(f"{file.name}: tensor {name!r} is {dtype}; model weights must be floating point "
                                   f"({', '.join(_WEIGHT_DTYPES)})")
            src = f.get_tensor(name)
            if tuple(src.shape) != tuple(dst.shape):
                raise HorizonError(
                    f"{file.name}: tensor {name!r} has shape {tuple(src.shape)}, expected {tuple(dst.shape)}"
                )
            with torch.no_grad():
                dst.copy_(src)
            seen.add(name)


def save(model_dir, config: dict, tensors: dict[str, torch.Tensor], *, dtype: torch.dtype = torch.float32,
         max_shard_bytes: int = 4 << 30) -> list[Path]:
    """Writes config.json and the tensors as safetensors (sharded with an index past
    `max_shard_bytes`). Tensors are converted to `dtype` one at a time."""
    from safetensors.torch import save_file

    if not isinstance(max_shard_bytes, int) or max_shard_bytes <= 0:
        raise HorizonError(f"max_shard_bytes must be a positive integer, got {max_shard_bytes!r}")
    if dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise HorizonError(f"export dtype must be float32, bfloat16 or float16, got {dtype}")
    root = Path(model_dir)
    if root.exists() and not root.is_dir():
        raise HorizonError(f"{str(root)!r} exists and is not a directory")
    root.mkdir(parents=True, exist_ok=True)

    cfg = dict(config)
    cfg["torch_dtype"] = cfg["dtype"] = str(dtype).removeprefix("torch.")
    (root / CONFIG).write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")

    # Group into shards by size, keeping the order stable.
    shards: list[list[str]] = [[]]
    size = 0
    itemsize = torch.empty((), dtype=dtype).element_size()
    for name, t in tensors.items():
        nbytes = t.numel() * itemsize
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes

    for stale in list(root.glob("model*.safetensors")) + [root / INDEX]:
        if stale.exists():
            stale.unlink()
    written = []
    weight_map = {}
    for i, names in enumerate(shards):
        fname = SINGLE if len(shards) == 1 else f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        # safetensors refuses aliased storage, so each tensor is materialised on its own.
        # (an integer buffer stays integer: the export dtype is the weights')
        part = {n: tensors[n].detach().to(device="cpu", dtype=dtype if tensors[n].dtype.is_floating_point
                                          else tensors[n].dtype).contiguous().clone() for n in names}
        save_file(part, str(root / fname), metadata={"format": "pt"})
        written.append(root / fname)
        weight_map.update({n: fname for n in names})
        del part
    if len(shards) > 1:
        total = sum(t.numel() * itemsize for t in tensors.values())
        (root / INDEX).write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2) + "\n"
        )
    return written

