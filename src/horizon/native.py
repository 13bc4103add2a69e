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


def launch_counts() -> dict:
    """{kernel name: launches the driver accepted} in this process (the tests' proof that our
    kernel ran, not a torch fallback)."""
    return dict(_native.kernel_launch_counts())


class LaunchCounter:
    """Launches per kernel since this object was made: `counter.since()["horizon_rope"]`."""

    def __init__(self):
        self._start = launch_counts()

    def since(self) -> dict:
        now = launch_counts()
        return {k: n - self._start.get(k, 0) for k, n in now.items() if n > self._start.get(k, 0)}
