"""The weight stream (host layer state -> device slots) and the gradient landing (device
gradients -> host landing slots -> AdamW), over the Rust pipeline (`horizon._native.Pipeline`).

On CUDA the copies run on their own H2D and D2H streams, ordered against torch's compute
stream by events only; Rust worker threads wait on the D2H events (that thread alone; the
events use blocking synchronisation, so the wait sleeps) before they run AdamW. On the CPU
device the Rust lanes make the copies, so the same ordering logic runs in every test.
"""

from __future__ import annotations

import collections
import threading
import time

import torch

from .. import _native
from ..errors import HorizonError

# How long a caller may wait for a free slot before we call it a schedule bug, not a stall.
_SLOT_TIMEOUT_S = 600.0

_default = None
_default_lock = threading.Lock()


def default_pipeline() -> "_native.Pipeline":
    """The process-wide Rust pipeline (three lanes: h2d, d2h, optimizer)."""
    global _default
    with _default_lock:
        if _default is None:
            _default = _native.Pipeline()
        return _default


def _check_flat(t: torch.Tensor, what: str) -> None:
    if t.dim() != 1 or not t.is_contiguous():
        raise HorizonError(f"{what} must be a contiguous 1-D tensor, got shape {tuple(t.shape)}")


class WeightStream:
    """S >= 2 device slots that layers' weights stream into, one layer at a time.

    Protocol per layer: `prefetch(key, src)` (takes a free slot, queues the copy),
    `acquire(key)` (waits for the copy; returns the slot view), `release(key)` (the slot may be
    overwritten once the compute queued so far has used it).
    """

    def __init__(self, n_slots: int, slot_numel: int, device, dtype: torch.dtype, *, pipeline=None,
                 alias_host: bool = False):
        if n_slots < 2:
            raise HorizonError(f"WeightStream needs at least 2 slots, got {n_slots}")
        if slot_numel <= 0:
            raise HorizonError(f"slot_numel must be positive, got {slot_numel}")
        self.device = torch.device(device)
        self.dtype = dtype
        self.slot_numel = int(slot_numel)
        self._cuda = self.device.type == "cuda"
        self._pipe = pipeline or default_pipeline()
        # The CPU device, when the caller guarantees the sources are not written while a layer
        # is in a slot (the engine: updates wait for the step's verdict, and a layer's next read
        # waits for its update): the "slot" is the source itself, no copy, and no slot memory
        # is allocated. The slot protocol and the byte count (the stream's logical traffic)
        # stay as they are.
        self.alias_host = bool(alias_host) and not self._cuda
        numel = 0 if self.alias_host else self.slot_numel
        self._slots = [torch.empty(numel, dtype=dtype, device=self.device) for _ in range(n_slots)]
        self._ring = _native.SlotRing(n_slots)
        self._pending: dict = {}
        self._release_events = [None] * n_slots
        self._stream = torch.cuda.Stream(self.device) if self._cuda else None
        self.bytes_h2d = 0
        self.wait_seconds = 0.0

    @property
    def n_slots(self) -> int:
        return len(self._slots)

    @property
    def device_bytes(self) -> int:
        """Bytes of the device slots (allocated once; none when aliasing the host weights)."""
        return sum(s.numel() * s.element_size() for s in self._slots)

    def prefetch(self, key, src: torch.Tensor) -> None:
        _check_flat(src, "weight source")
        if src.dtype != self.dtype:
            raise HorizonError(f"weight source dtype {src.dtype} != stream dtype {self.dtype}")
        if src.numel() > self.slot_numel:
            raise HorizonError(f"layer of {src.numel()} elements does not fit a slot of {self.slot_numel}")
        if src.device.type != "cpu":
            raise HorizonError(f"weight sources live in host memory, got a tensor on {src.device}")
        if key in self._pending:
            raise HorizonError(f"layer {key!r} is already in a slot")
        # Only this stream's own release() frees a slot, so waiting here could never end.
        slot = self._ring.try_acquire()
        if slot is None:
            raise HorizonError(f"no free weight slot: all {self.n_slots} hold layers; release one before prefetching")
        n = src.numel()
        dst = self._slots[slot][:n]
        if self._cuda:
            with torch.cuda.stream(self._stream):
                if self._release_events[slot] is not None:
                    self._stream.wait_event(self._release_events[slot])
                dst.copy_(src, non_blocking=True)
                done = torch.cuda.Event()
                done.record(self._stream)
        elif self.alias_host:
            done = None
        else:
            done = self._pipe.copy("h2d", dst.data_ptr(), src.data_ptr(), n * src.element_size())
        self._pending[key] = [slot, done, src, n, False]
        self.bytes_h2d += n * src.element_size()

    def acquire(self, key) -> torch.Tensor:
        entry = self._pending.get(key)
        if entry is None:
            raise HorizonError(f"layer {key!r} was not prefetched")
        slot, done, src, n, _ = entry
        if self._cuda:
            torch.cuda.current_stream(self.device).wait_event(done)
        elif done is None:  # alias_host
            entry[4] = True
            return src
        else:
            t0 = time.perf_counter()
            done.wait()
            self.wait_seconds += time.perf_counter() - t0
        entry[4] = True
        return self._slots[slot][:n]

    def release(self, key) -> None:
        entry = self._pending.pop(key, None)
        if entry is None:
            raise HorizonError(f"layer {key!r} holds no slot")
        slot, done, _src, _n, acquired = entry
        if not acquired and not self._cuda and done is not None:
            done.wait()  # never hand out a slot a copy is still writing
        if self._cuda:
            ev = torch.cuda.Event()
            ev.record(torch.cuda.current_stream(self.device))
            self._release_events[slot] = ev
        self._ring.release(slot)

    def release_all(self) -> None:
        for key in list(self._pending):
            self.release(key)


class GradientLanding:
    """Moves each layer's flat gradient off the device into a host landing slot and hands
    it to a Rust worker: AdamW straight from the slot, or into the slab's gradient buffer.

    A device gradient is referenced here only until its copy has read it: on CUDA not at all
    (`record_stream` keeps the caching allocator from reusing its memory before the copy
    stream is past it), on the CPU device until the d2h lane's copy ticket is done (the lane
    reads it through a raw pointer). What the AdamW jobs need until they have run (the
    slab, the copy's CUDA event) is held per layer key until `wait(key)`."""

    def __init__(self, n_slots: int, slot_numel: int, device, *, pipeline=None):
        if n_slots < 1:
            raise HorizonError(f"GradientLanding needs at least 1 slot, got {n_slots}")
        from ..store import host_buffer

        self.device = torch.device(device)
        self.slot_numel = int(slot_numel)
        self._cuda = self.device.type == "cuda"
        self._pipe = pipeline or default_pipeline()
        self._slots = [host_buffer(self.slot_numel, torch.float32) for _ in range(n_slots)]
        self._ring = _native.SlotRing(n_slots)
        self._jobs: dict = {}  # key -> [(ticket, host-side objects the job needs)]
        # Copies not known to be done, oldest first: [storage address, ticket or CUDA event,
        # the device tensor (CPU device only; None on CUDA)].
        self._inflight: collections.deque = collections.deque()
        self._stream = torch.cuda.Stream(self.device) if self._cuda else None
        self.bytes_d2h = 0
        self.wait_seconds = 0.0
        self.adam_elements = 0  # elements handed to AdamW from the landing slots
        # A 1-element int32 host tensor (or None): AdamW jobs queued while it is set read it
        # when they run and change nothing if it holds 0 (see LayerMajorEngine._open_gate).
        self.gate = None

    @property
    def n_slots(self) -> int:
        return len(self._slots)

    @property
    def host_bytes(self) -> int:
        return sum(s.numel() * 4 for s in self._slots)

    @property
    def skipped_updates(self) -> int:
        """AdamW updates the workers skipped for non-finite gradients (process-wide pipeline)."""
        return int(self._pipe.skipped_updates)

    @staticmethod
    def _copied(marker) -> bool:
        return marker.done if isinstance(marker, _native.Ticket) else marker.query()

    def release_copied(self) -> None:
        """Drops the references to device gradients whose copy has completed (the copies
        complete in order: the d2h lane and the copy stream are FIFO)."""
        while self._inflight and self._copied(self._inflight[0][1]):
            self._inflight.popleft()

    @property
    def last_copy(self):
        """The newest copy's completion marker (a Ticket on the CPU device, a CUDA event), or
        None when every copy is known done."""
        return self._inflight[-1][1] if self._inflight else None

    def held_gradients(self) -> list:
        """The device gradients this landing still references (their copies not yet seen done)."""
        return [t for _, _, t in self._inflight if t is not None]

    def before_reuse(self, buf: torch.Tensor) -> None:
        """Orders a write into `buf` (a device buffer that was landed from) after the copy that
        read it: on CUDA the current stream waits for the copy's event (no host wait); on the
        CPU device the caller waits for the copy ticket."""
        ptr = buf.untyped_storage().data_ptr()
        marker = None
        for p, m, _ in self._inflight:
            if p == ptr:
                marker = m  # the newest copy from this storage
        if marker is None:
            return
        if self._cuda:
            torch.cuda.current_stream(self.device).wait_event(marker)
        else:
            marker.wait()
        self.release_copied()

    def begin_step(self) -> None:
        """A step starts (the disk tier's landing starts its reads ahead here)."""

    def _copy_out(self, flat_grad: torch.Tensor, dst: torch.Tensor):
        """Queues flat_grad -> dst (host). Returns (ticket, None) on the CPU device, (None,
        cuda_event) on CUDA."""
        self.release_copied()
        nbytes = flat_grad.numel() * 4
        self.bytes_d2h += nbytes
        ptr = flat_grad.untyped_storage().data_ptr()
        if self._cuda:
            ready = torch.cuda.Event()
            ready.record(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(self._stream):
                self._stream.wait_event(ready)
                dst.copy_(flat_grad, non_blocking=True)
                # A Rust worker thread waits on this event (cuEventSynchronize): with blocking
                # synchronisation it sleeps instead of spinning a core that AdamW needs.
                done = torch.cuda.Event(blocking=True)
                done.record(self._stream)
            # The compute stream may reuse flat_grad's memory only after the copy has read it;
            # nothing here keeps the tensor itself.
            flat_grad.record_stream(self._stream)
            self._inflight.append([ptr, done, None])
            return None, done
        t = self._pipe.copy("d2h", dst.data_ptr(), flat_grad.data_ptr(), nbytes)
        self._inflight.append([ptr, t, flat_grad])
        return t, None

    def _check(self, flat_grad: torch.Tensor, slab) -> None:
        _check_flat(flat_grad, "flat gradient")
        if flat_grad.dtype != torch.float32:
            raise HorizonError(f"flat gradient must be float32, got {flat_grad.dtype}")
        if flat_grad.device != self.device:
            raise HorizonError(f"flat gradient on {flat_grad.device}, landing expects {self.device}")
        if flat_grad.numel() != slab.numel:
            raise HorizonError(f"gradient of {flat_grad.numel()} elements for a layer of {slab.numel}")
        if flat_grad.numel() > self.slot_numel:
            raise HorizonError(f"gradient of {flat_grad.numel()} elements exceeds the landing slot")

    def _event_arg(self, ev):
        return None if ev is None else (int(ev.cuda_event), self.device.index or 0)

    def land_and_update(self, key, flat_grad, slab, *, hyper, step, write_bf16, skip_nonfinite: bool = False) -> None:
        """Async: gradient -> landing slot -> AdamW on `slab` (and its bf16 copy if asked).
        With `skip_nonfinite` the worker leaves the layer untouched when the landed gradient
        holds NaN/Inf (counted in `skipped_updates`), so no host read of the device is needed."""
        self._check(flat_grad, slab)
        t0 = time.perf_counter()
        slot = self._ring.acquire(_SLOT_TIMEOUT_S)
        self.wait_seconds += time.perf_counter() - t0
        if slot is None:
            raise HorizonError("no free gradient landing slot (optimizer stalled?)")
        landing = self._slots[slot][: flat_grad.numel()]
        ticket, ev = self._copy_out(flat_grad, landing)
        t = self._pipe.adam(
            slab.master.data_ptr(), landing.data_ptr(), slab.exp_avg.data_ptr(), slab.exp_avg_sq.data_ptr(),
            slab.weights_bf16.data_ptr() if write_bf16 else 0, slab.numel,
            hyper=hyper, step=int(step), grad_scale=1.0, skip_nonfinite=bool(skip_nonfinite),
            after=[ticket] if ticket is not None else None, cuda_event=self._event_arg(ev),
            release=(self._ring, slot), gate=0 if self.gate is None else self.gate.data_ptr(),
        )
        self.adam_elements += slab.numel
        # The job writes into the slab through raw pointers, syncs on the event and reads the
        # gate: all stay alive until waited.
        self._jobs.setdefault(key, []).append((t, (ev, slab, self.gate)))

    def land_to_buffer(self, key, flat_grad, slab) -> None:
        """Async: gradient -> the slab's host gradient buffer (the clipping schedule)."""
        self._check(flat_grad, slab)
        if slab.grad is None:
            raise HorizonError("this layer's slab has no gradient buffer (created without with_grad)")
        ticket, ev = self._copy_out(flat_grad, slab.grad)
        if ticket is None:  # CUDA: a marker job on the d2h lane that waits for the copy's event
            ticket = self._pipe.marker("d2h", cuda_event=self._event_arg(ev))
        self._jobs.setdefault(key, []).append((ticket, (ev, slab)))

    def update_from_buffer(self, key, slab, *, hyper, step, grad_scale, write_bf16) -> None:
        """Async AdamW from the slab's gradient buffer, after its landing, scaled by grad_scale."""
        after = [t for t, _ in self._jobs.get(key, [])]
        t = self._pipe.adam(
            slab.master.data_ptr(), slab.grad.data_ptr(), slab.exp_avg.data_ptr(), slab.exp_avg_sq.data_ptr(),
            slab.weights_bf16.data_ptr() if write_bf16 else 0, slab.numel,
            hyper=hyper, step=int(step), grad_scale=float(grad_scale), after=after or None,
        )
        self._jobs.setdefault(key, []).append((t, (slab,)))

    def wait(self, key) -> None:
        jobs = self._jobs.pop(key, [])
        if not jobs:
            return
        t0 = time.perf_counter()
        try:
            for t, _keep in jobs:
                t.wait()
        finally:
            self.wait_seconds += time.perf_counter() - t0
            self.release_copied()

    def wait_all(self) -> None:
        for key in list(self._jobs):
            self.wait(key)
        # Every copy is done once the job after it is: nothing device-side is held now.
        self.release_copied()
