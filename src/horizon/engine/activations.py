"""Activation checkpoints (block inputs) of the layer-major forward (not to be confused with
training checkpoints, io/checkpoint.py): kept on the device, or offloaded to
host memory (pinned, copied on a side stream ordered by events on CUDA) and brought back one
layer ahead of the backward that needs them.

On the CPU device the compute device's memory *is* host memory, so offloading is a change
of account, not a copy: the tensors stay where they are and count as host bytes."""

from __future__ import annotations

import torch

from .ledger import MemoryLedger, tensor_bytes


class ActivationStore:
    def __init__(self, device: torch.device, offload: bool, device_ledger: MemoryLedger, host_ledger: MemoryLedger):
        self.device = device
        self.offload = offload
        self._cuda = device.type == "cuda"
        self._dev = device_ledger
        self._host = host_ledger
        self._kept: dict = {}  # key -> list of tensors (device or host)
        self._incoming: dict = {}  # key -> (device tensors, ready event)
        self._stream = torch.cuda.Stream(device) if (self._cuda and offload) else None

    def put(self, key, tensors: list) -> None:
        if not self.offload:
            self._kept[key] = tensors
            self._dev.hold(("ckpt", key), tensor_bytes(tensors))
            return
        if not self._cuda:
            self._kept[key] = tensors
            self._host.hold(("ckpt", key), tensor_bytes(tensors))
            return
        ready = torch.cuda.Event()
        ready.record(torch.cuda.current_stream(self.device))
        hosts = []
        with torch.cuda.stream(self._stream):
            self._stream.wait_event(ready)
            for t in tensors:
                h = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
                h.copy_(t, non_blocking=True)
                t.record_stream(self._stream)
                hosts.append(h)
        done = torch.cuda.Event()
        done.record(self._stream)
        self._kept[key] = (hosts, done)
        self._host.hold(("ckpt", key), tensor_bytes(hosts))

    def prefetch(self, key) -> None:
        """CUDA offload: starts bringing `key` back to the device (no-op otherwise)."""
        if not (self._cuda and self.offload) or key in self._incoming or key not in self._kept:
            return
        hosts, done = self._kept[key]
        alloc = torch.cuda.Event()
        outs = [torch.empty(h.shape, dtype=h.dtype, device=self.device) for h in hosts]
        alloc.record(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self._stream):
            self._stream.wait_event(alloc)
            self._stream.wait_event(done)
            for h, o in zip(hosts, outs):
                o.copy_(h, non_blocking=True)
                o.record_stream(self._stream)
        ready = torch.cuda.Event()
        ready.record(self._stream)
        self._incoming[key] = (outs, ready)
        self._dev.hold(("ckpt-in", key), tensor_bytes(outs))

    def take(self, key) -> list:
        """The checkpoint of `key` on the device; the store forgets it."""
        if not (self._cuda and self.offload):
            tensors = self._kept.pop(key)
            return tensors
        self.prefetch(key)
        outs, ready = self._incoming.pop(key)
        torch.cuda.current_stream(self.device).wait_event(ready)
        # Dropping the pinned buffers now is safe: torch's host allocator does not reuse a
        # pinned block until the non_blocking copies that read it have completed.
        self._kept.pop(key)
        self._host.drop(("ckpt", key))
        return outs

    def release(self, key) -> None:
        """The checkpoint taken for `key` is no longer used."""
        self._dev.drop(("ckpt", key))
        self._dev.drop(("ckpt-in", key))
        self._host.drop(("ckpt", key))

    def clear(self) -> None:
        for key in list(self._kept) + list(self._incoming):
            self.release(key)
        self._kept.clear()
        self._incoming.clear()
