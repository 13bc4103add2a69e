"""Access to the compiled core, with the questions every caller asks of it."""

from __future__ import annotations

import functools
import json

from . import _native


@functools.lru_cache(maxsize=None)
def system_info() -> dict:
    """The native side's view of the machine (SIMD, NUMA, RAM, driver, GPUs, kernels)."""
    return json.loads(_native.system_info_json())


def has_kernels() -> bool:
    return bool(_native.has_kernels())


@functools.lru_cache(maxsize=None)
def kernel_names() -> frozenset:
    return frozenset(k["name"] for k in system_info()["kernels"])


def can_launch(tensor, kernel: str) -> bool:
    """True when `kernel` can run on `tensor`'s device through our fatbin."""
    return tensor.is_cuda and has_kernels() and kernel in kernel_names()


def launch(kernel: str, grid, block, args, *, shared_mem: int = 0, device=None, cooperative: bool = False) -> None:
    """Launches `kernel` on torch's current stream of `device` (no host synchronisation).
    `cooperative`: all blocks resident at once, or the launch is refused (persistent kernels
    whose blocks wait for each other)."""
    import torch

    dev = torch.device("cuda", torch.cuda.current_device()) if device is None else torch.device(device)
    stream = torch.cuda.current_stream(dev).cuda_stream
    _native.launch(kernel, grid, block, shared_mem, stream, dev.index or 0, args, cooperative=bool(cooperative))
