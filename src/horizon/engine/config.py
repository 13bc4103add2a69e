"""Where and how the engine computes: the device, the compute dtype, the micro-batch, and the
engine's Python-API-only knobs. The rules for a device and a dtype live here once; `Trainer`
resolves them against the machine (`resolve_device`, `resolve_dtype`)."""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from ..errors import HorizonError
from ..options import ConfigError, check_fields, option, parse_bytes

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
_DTYPE_ALIASES = {"fp32": "float32", "torch.float32": "float32", "bf16": "bfloat16", "torch.bfloat16": "bfloat16"}
_DEVICE = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")


def dtype_name(dtype) -> str | None:
    """The option value of a dtype given as a string alias or a torch.dtype; None stays None."""
    if dtype is None:
        return None
    if isinstance(dtype, torch.dtype):
        for name, d in DTYPES.items():
            if d == dtype:
                return name
        raise ConfigError(f"--compute-dtype must be one of {', '.join(DTYPES)}, got {dtype}", "compute_dtype")
    if isinstance(dtype, str):
        return _DTYPE_ALIASES.get(dtype.lower(), dtype.lower())
    return dtype


@dataclass
class EngineConfig:
    device: str = option("auto", "auto, cpu, cuda or cuda:N")
    compute_dtype: str | None = option(None, "the dtype of the device's compute", choices=tuple(DTYPES),
                                       default_help="bfloat16 on a GPU, float32 on the CPU")
    micro_batch_size: int | None = option(None, "sequences per forward/backward", ge=1, metavar="N",
                                          default_help="the batch")
    n_slots: int = option(2, "weight slots on the device (>= 2: one computing, one loading)", ge=2, cli=False)
    offload_checkpoints: bool | None = option(None, "activation checkpoints in host memory (None: when they "
                                              "do not fit the device)", cli=False)
    track_grad_norm: bool = option(True, "compute the global gradient norm every step", cli=False)
    activation_memory: str = option(
        "auto", "bytes of block activations kept from the forward for the backward (those blocks run "
        "forward once: no recompute): a count such as 8GiB, 0 to recompute every block, or auto: what "
        "the device has left after the step's other needs, less a margin", metavar="BYTES|auto")
    offload_dir: str | None = option(None, "keep the fp32 master and Adam state in files under DIR, streamed "
                                     "each step (the disk tier; docs/engine.md)", metavar="DIR", path=True)

    def __post_init__(self):
        if isinstance(self.device, torch.device):
            self.device = str(self.device)
        self.compute_dtype = dtype_name(self.compute_dtype)
        if isinstance(self.activation_memory, int) and not isinstance(self.activation_memory, bool):
            self.activation_memory = str(self.activation_memory)
        check_fields(self)
        self.activation_budget()  # the rule of its value
        if not _DEVICE.match(self.device):
            raise ConfigError(f"--device must be auto, cpu, cuda or cuda:N, got {self.device!r}", "device")


    def activation_budget(self) -> int | None:
        """`activation_memory` in bytes; None for auto."""
        if self.activation_memory.strip().lower() == "auto":
            return None
        return parse_bytes("activation_memory", self.activation_memory)


def check_micro_batch(micro_batch_size: int | None, batch_size: int) -> int:
    """The micro-batch of a step of `batch_size` sequences (None: the whole batch)."""
    if micro_batch_size is not None and micro_batch_size > batch_size:
        raise ConfigError(f"--micro-batch-size {micro_batch_size} exceeds --batch-size {batch_size}",
                          "micro_batch_size")
    return batch_size if micro_batch_size is None else micro_batch_size


def resolve_device(device: str) -> torch.device:
    """The torch device an `EngineConfig.device` names on this machine."""
    if device == "auto":
        return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    dev = torch.device(device)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise HorizonError(f"device {device!r} asked for, but there is no CUDA GPU")
        index = dev.index if dev.index is not None else torch.cuda.current_device()
        if index >= torch.cuda.device_count():
            raise HorizonError(f"device {device!r} does not exist ({torch.cuda.device_count()} GPUs)")
        return torch.device("cuda", index)
    return dev


def resolve_dtype(name: str | None, device: torch.device) -> torch.dtype:
    if name is None:
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return DTYPES[name]
