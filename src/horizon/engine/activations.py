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
        self._held: set = set()  # keys whose holdings are counted (until released: taken or not)
        self._stream = torch.cuda.Stream(device) if (self._cuda and offload) else None
        self.bytes_moved = 0  # device <-> host copies of checkpoints (CUDA offload), both ways

    def put(self, key, tensors: list) -> None:
        self._held.add(key)
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
                if t is None:  # a kept block's micro-batch: its input lives in its graph
                    hosts.append(None)
                    continue
                h = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
                h.copy_(t, non_blocking=True)
                t.record_stream(self._stream)
                hosts.append(h)
        done = torch.cuda.Event()
        done.record(self._stream)
        self._kept[key] = (hosts, done)
        self.bytes_moved += tensor_bytes(hosts)
        self._host.hold(("ckpt", key), tensor_bytes(hosts))

    def prefetch(self, key) -> None:
        """CUDA offload: starts bringing `key` back to the device (no-op otherwise)."""
        if not (self._cuda and self.offload) or key in self._incoming or key not in self._kept:
            return
        hosts, done = self._kept[key]
        alloc = torch.cuda.Event()
        outs = [None if h is None else torch.empty(h.shape, dtype=h.dtype, device=self.device) for h in hosts]
        alloc.record(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self._stream):
            self._stream.wait_event(alloc)
            self._stream.wait_event(done)
            for h, o in zip(hosts, outs):
                if h is None:
                    continue
                o.copy_(h, non_blocking=True)
                o.record_stream(self._stream)
        ready = torch.cuda.Event()
        ready.record(self._stream)
        self._incoming[key] = (outs, ready)
        self.bytes_moved += tensor_bytes(outs)
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
        self._held.discard(key)
        self._dev.drop(("ckpt", key))
        self._dev.drop(("ckpt-in", key))
        self._host.drop(("ckpt", key))

    def clear(self) -> None:
        """Forgets every checkpoint and gives back every holding, those already taken (a step
        that failed between a block's take and its release) included."""
        for key in list(self._held):  # every key put and not released: the kept and incoming ones too
            self.release(key)
        self._kept.clear()
        self._incoming.clear()


# ----------------------------------------------------------------------------- the activation budget
class _SlotRef:
    """A saved tensor that is a view of the layer's weight slot, packed as where it lies in the
    slot (offset, shape, stride) instead of the tensor: the slot is reused by later layers, and
    the backward re-binds the view to the slot its own stream of the layer lands in."""

    __slots__ = ("offset", "size", "stride")

    def __init__(self, offset: int, size, stride):
        self.offset, self.size, self.stride = offset, size, stride


def param_leaves(layout, slot: torch.Tensor) -> dict:
    """name -> a leaf tensor (requires grad) over the parameter's place in `slot`. A block's
    gradient is asked per parameter: through views of one flat leaf, autograd would build a
    zero-filled slot-sized gradient for every view and add them up (about 2x a block's backward
    on the CPU at 12M parameters a block)."""
    return {name: v.detach().requires_grad_() for name, v in layout.views(slot).items()}


def offload_cheaper(nbytes: int, active_params: int, tokens: int, h2d_bps: float, flops_per_s: float) -> bool:
    """The cost model of placement "offload" (engine and plan alike): bringing a unit's
    `nbytes` back to the device takes less than recomputing its forward (2 FLOPs per active
    parameter and token)."""
    return nbytes / h2d_bps < 2 * active_params * tokens / flops_per_s


class _HostRef:
    """A saved tensor copied to host memory (placement "offload"): its index in the unit's list."""

    __slots__ = ("index",)

    def __init__(self, index: int):
        self.index = index


class KeptUnit:
    """One block's forward on one micro-batch run with autograd on, whose saved tensors are kept
    for the backward (no recompute). Views of the forward's weight slot are packed as `_SlotRef`
    and re-bound to the backward's slot (`rebind`); everything else is kept as is and counted
    (`nbytes`, each storage once, without the storages the step holds anyway: `exclude`).

    With `host` (placement "offload", CUDA): each other saved tensor is copied to page-locked
    host memory on `host.stream` as it is saved (the device copy is then free), and brought back
    by `prefetch` ahead of the block's backward; `nbytes` counts the host copies. On the CPU
    device the copies are plain clones (the mechanism, for its tests)."""

    def __init__(self, slot: torch.Tensor, exclude=(), host: "HostPlacement | None" = None):
        self._slot_ptr = slot.untyped_storage().data_ptr()
        self._slot_offset = slot.storage_offset()
        self._seen = {int(p) for p in exclude}
        self._seen.discard(self._slot_ptr)
        self._bwd_slot = None
        self.nbytes = 0
        # The slot's storage under a tensor of its own (its own version counter, so the
        # stream's writes into the slot are not the saved views' concern); the parameters'
        # leaves are views of it (`params`).
        self._alias = torch.empty(0, dtype=slot.dtype, device=slot.device).set_(
            slot.untyped_storage(), slot.storage_offset(), slot.shape)
        self.leaves: dict = {}
        self.x = self.y = self.extra = None
        self.host = host
        self._host_copies: list = []
        self._host_index: dict = {}
        self._alive: list = []
        self._back: list | None = None
        self._back_ready = None

    def params(self, layout) -> dict:
        """name -> the unit's leaf for each parameter (requires grad), over the forward's slot."""
        self.leaves = param_leaves(layout, self._alias)
        return self.leaves

    def _pack(self, t: torch.Tensor):
        s = t.untyped_storage()
        ptr = s.data_ptr()
        if ptr == self._slot_ptr:
            return _SlotRef(t.storage_offset() - self._slot_offset, t.size(), t.stride())
        if self.host is not None and ptr not in self._seen:  # (the step's shared inputs stay)
            # One copy per distinct tensor saved more than once; its storage is held until the
            # forward ends (`end_forward`), so an address cannot be reused by another tensor
            # within the unit and mistaken for it.
            key = (ptr, t.storage_offset(), tuple(t.size()), tuple(t.stride()), t.dtype)
            index = self._host_index.get(key)
            if index is None:
                index = self._host_index[key] = len(self._host_copies)
                h = self.host.to_host(t)
                self._host_copies.append(h)
                self._alive.append(s)
                self.nbytes += h.numel() * h.element_size()
            return _HostRef(index)
        if ptr not in self._seen:
            self._seen.add(ptr)
            self.nbytes += s.nbytes()
        return t

    def _unpack(self, p):
        if isinstance(p, _SlotRef):
            b = self._bwd_slot
            if b is None:
                raise RuntimeError("a kept block's saved weights were unpacked before its backward slot was bound")
            return b.as_strided(p.size, p.stride, b.storage_offset() + p.offset)
        if isinstance(p, _HostRef):
            return self._back[p.index]
        return p

    def hooks(self):
        return torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)

    def end_forward(self) -> None:
        """The unit's forward is done: its device tensors may go (only their host copies stay)."""
        self._alive.clear()
        self._host_index.clear()

    def prefetch(self) -> int:
        """Placement "offload": starts bringing the host copies back (once); the bytes."""
        if self.host is None or self._back is not None:
            return 0
        self._back, self._back_ready = self.host.to_device(self._host_copies)
        return self.nbytes

    def rebind(self, slot: torch.Tensor) -> None:
        """The backward's slot of the same layer (the same weights, streamed again); an
        offloaded unit's copies are waited for here."""
        self._bwd_slot = slot.detach()
        if self.host is not None:
            self.prefetch()
            self.host.wait(self._back_ready)


class HostPlacement:
    """Copies of kept activations to host memory and back (placement "offload"): on CUDA into
    page-locked memory on a side stream ordered by events (as the checkpoints' ActivationStore);
    on the CPU device plain clones. Counts the bytes moved."""

    def __init__(self, device: torch.device):
        self.device = device
        self._cuda = device.type == "cuda"
        self.stream = torch.cuda.Stream(device) if self._cuda else None
        self.bytes_moved = 0

    def to_host(self, t: torch.Tensor) -> torch.Tensor:
        self.bytes_moved += t.numel() * t.element_size()
        if not self._cuda:
            return t.detach().clone()
        produced = torch.cuda.Event()
        produced.record(torch.cuda.current_stream(self.device))
        h = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
        with torch.cuda.stream(self.stream):
            self.stream.wait_event(produced)
            h.copy_(t.detach(), non_blocking=True)
            t.record_stream(self.stream)
        return h

    def to_device(self, hosts: list):
        self.bytes_moved += sum(h.numel() * h.element_size() for h in hosts)
        if not self._cuda:
            return list(hosts), None
        alloc = torch.cuda.Event()
        outs = [torch.empty(h.shape, dtype=h.dtype, device=self.device) for h in hosts]
        alloc.record(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self.stream):
            self.stream.wait_event(alloc)
            for h, o in zip(hosts, outs):
                o.copy_(h, non_blocking=True)
                o.record_stream(self.stream)
        ready = torch.cuda.Event()
        ready.record(self.stream)
        return outs, ready

    def wait(self, ready) -> None:
        if ready is not None:
            torch.cuda.current_stream(self.device).wait_event(ready)


class ActivationBudget:
    """Which (block, micro-batch) forwards keep their saved tensors this step: greedily, in
    forward order, while the kept bytes stay within the budget. A unit is tried when the room
    left is at least the smallest unit measured so far (a unit that turns out larger than the
    room is dropped at once, its output kept: it is recomputed like any other); the kept ones
    are held in the device ledger until their backward."""

    def __init__(self, ledger: MemoryLedger, host_ledger: MemoryLedger | None = None):
        self._ledger = ledger
        self._host_ledger = host_ledger
        self._budget = 0
        # Placement "offload" (CUDA): units beyond the device budget whose copies to host memory
        # and back cost less than their recompute (`cheaper(key, nbytes)`), within `host_budget`.
        self.host_budget = 0
        self._host_held = 0
        self.cheaper = None
        self._units: dict = {}
        self._held = 0
        self._smallest = None
        self._largest = 0
        # auto: room is left for the backward's live activations, this many times the largest unit
        self.reserve_factor = 0
        self.last = {}  # the last step's decisions: block key -> list of "keep" / "recompute"
        self.last_kept_peak = 0

    def begin_step(self, budget: int, host_budget: int = 0) -> None:
        self._budget = max(0, int(budget))
        self.host_budget = max(0, int(host_budget))
        self._units.clear()
        self._held = 0
        self._host_held = 0
        self.last = {}
        self.last_kept_peak = 0

    def _room(self) -> int:
        return self._budget - self._held - self.reserve_factor * self._largest

    def want(self) -> bool:
        room = self._room()
        return room > 0 and (self._smallest is None or room >= self._smallest)

    def commit(self, key, j: int, unit: KeptUnit) -> bool:
        """Keeps `unit` when it fits the room left; False (the caller drops it) otherwise."""
        self._smallest = unit.nbytes if self._smallest is None else min(self._smallest, unit.nbytes)
        self._largest = max(self._largest, unit.nbytes)
        if unit.nbytes > self._room():
            return False
        self._units[(key, j)] = unit
        self._held += unit.nbytes
        self._ledger.hold(("kept", key, j), unit.nbytes)
        self.last_kept_peak = max(self.last_kept_peak, self._held)
        return True

    def want_host(self, key) -> bool:
        """Whether the next unit of block `key` should be tried in host memory (placement
        "offload"): the device budget is spent, host room is left, and by the size of the
        smallest unit seen (none yet: try one) the copies cost less than the recompute."""
        room = self.host_budget - self._host_held
        if self.cheaper is None or room <= 0:
            return False
        if self._smallest is not None and room < self._smallest:
            return False
        return self._smallest is None or self.cheaper(key, self._smallest)

    def commit_host(self, key, j: int, unit: KeptUnit) -> bool:
        self._smallest = unit.nbytes if self._smallest is None else min(self._smallest, unit.nbytes)
        if self._host_held + unit.nbytes > self.host_budget or not self.cheaper(key, unit.nbytes):
            return False
        self._units[(key, j)] = unit
        self._host_held += unit.nbytes
        if self._host_ledger is not None:
            self._host_ledger.hold(("kept-host", key, j), unit.nbytes)
        return True

    def note(self, key, j: int, unit: KeptUnit | None) -> None:
        what = "recompute" if unit is None else ("offload" if unit.host is not None else "keep")
        self.last.setdefault(key, []).append(what)

    def take(self, key, j: int) -> KeptUnit | None:
        return self._units.pop((key, j), None)

    def prefetch(self, key, n_micro_batches: int) -> None:
        """Starts bringing block `key`'s offloaded units back (one block ahead of its backward)."""
        for j in range(n_micro_batches):
            unit = self._units.get((key, j))
            if unit is not None and unit.host is not None and unit.prefetch():
                self._ledger.hold(("kept-in", key, j), unit.nbytes)

    def release(self, key, j: int, unit: KeptUnit) -> None:
        if unit.host is not None:
            self._host_held -= unit.nbytes
            self._ledger.drop(("kept-in", key, j))
            if self._host_ledger is not None:
                self._host_ledger.drop(("kept-host", key, j))
        else:
            self._held -= unit.nbytes
            self._ledger.drop(("kept", key, j))

    def clear(self) -> None:
        for (key, j), unit in list(self._units.items()):
            self.release(key, j, unit)
        self._units.clear()
        self._held = self._host_held = 0


def step_flops(active: dict, tied: bool, tokens: int, recomputed_tokens: dict) -> int:
    """A step's matmul FLOPs by the parameter count: 2 per active parameter and token forward, 4
    backward, 2 more per token of each block's recomputed forward (`recomputed_tokens`: block
    key -> tokens). `active`: layer key -> active parameters, forward order (embedding first: a
    lookup, counted only as a tied head). Attention's sequence-squared work is not counted."""
    keys = list(active)
    dense = sum(active[k] for k in keys[1:]) + (active[keys[0]] if tied else 0)
    return int(6 * dense * tokens + sum(2 * active[k] * t for k, t in recomputed_tokens.items()))


def tensor_storages(obj, out=None) -> set:
    """The storage addresses of every tensor in `obj` (tensors, lists, tuples, dicts and the
    hf path's prologue runs, whose `calls` hold what each layer is handed)."""
    out = set() if out is None else out
    if isinstance(obj, torch.Tensor):
        out.add(obj.untyped_storage().data_ptr())
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            tensor_storages(v, out)
    elif isinstance(obj, dict):
        for v in obj.values():
            tensor_storages(v, out)
    elif hasattr(obj, "calls"):
        for c in obj.calls:
            tensor_storages((getattr(c, "args", ()), getattr(c, "kwargs", {})), out)
    return out
