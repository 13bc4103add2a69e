"""The engine's accounting of the memory it holds: device bytes (weight slots, gradient
accumulators, checkpoints kept on the device, the live activations of the block being
computed) and host bytes (layer slabs, landing slots, offloaded checkpoints).

On CUDA the device peak is read from torch's caching allocator; on the CPU device it is the
sum of the tensors the engine places there, measured from the tensors themselves (their
storage sizes), not from a formula, so the depth test means the same on both."""

from __future__ import annotations

import torch


def tensor_bytes(t) -> int:
    if t is None:
        return 0
    if isinstance(t, (list, tuple)):
        return sum(tensor_bytes(x) for x in t)
    return t.untyped_storage().nbytes()


class MemoryLedger:
    """Named holdings on one side (device or host) with a running peak."""

    def __init__(self):
        self._held: dict = {}
        self.current = 0
        self.peak = 0

    def hold(self, name, nbytes: int) -> None:
        self.current += nbytes - self._held.get(name, 0)
        self._held[name] = nbytes
        self.peak = max(self.peak, self.current)

    def drop(self, name) -> None:
        self.current -= self._held.pop(name, 0)

    def transient(self, nbytes: int) -> None:
        """A short-lived allocation on top of what is held (counts toward the peak only)."""
        self.peak = max(self.peak, self.current + nbytes)


class SavedActivations:
    """Counts the bytes autograd keeps alive for one block's recompute (saved tensors),
    each storage once, excluding storages the ledger already holds (the weight slot, the
    checkpoint)."""

    def __init__(self, exclude_storages=()):
        self._seen = {int(p) for p in exclude_storages}
        self.nbytes = 0

    def _pack(self, t):
        s = t.untyped_storage()
        ptr = s.data_ptr()
        if ptr not in self._seen:
            self._seen.add(ptr)
            self.nbytes += s.nbytes()
        return t

    def hooks(self):
        return torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)
