"""The disk tier (`offload_dir`): every layer's fp32 master and Adam m, v live in files under
DIR; host RAM keeps the compute copy (bf16, or the fp32 master image when the compute is fp32),
the gradient landing slots and a budget of staging memory. Each step the Rust tier
(`horizon._native.DiskTier`, rust/offload/) reads the layers' state ahead in the order the
engine updates them, runs the fused CPU AdamW on the staging buffers (the same kernel call as
the RAM-only path, so the same bits), writes the compute copy, and writes the state back with
direct I/O, overlapped with the device's work and the other layers' I/O. With gradient clipping
the step's gradients wait in the layer files until the global norm is known.

What lives here:
- `TieredHostModel`: a `HostModel` whose layers keep only the compute copy in RAM; random init,
  HF import / export, state tensors (checkpoints) and their loading go through the files.
- `TierLanding`: the `GradientLanding` of a tiered model (same protocol, the tier behind it).
- the checks of DIR (`check_offload_dir`: missing, not writable, in memory, too small, no
  O_DIRECT), the tier's sizes (`tier_sizes`), its part of `horizon plan` (`apply_disk_tier`,
  `tier_plan_lines`) and of `horizon doctor` (`disk_io_info`, `doctor_disk`, `doctor_lines`).

Host memory with the tier (docs/engine.md, "The disk tier"):

    peak RSS <= c x P                      (compute copy: c = 2 bf16, 4 fp32)
              + staging                    (default 2 x the largest layer file)
              + landing_slots x Lmax x 4   (rounded up to whole pages)
              + [the CPU device's own bytes: weight slots, accumulators, activations]
              + a constant                 (the process: Python, torch, the native module)

Tuning knobs (environment, like HORIZON_ADAM_THREADS): HORIZON_OFFLOAD_STAGING_BYTES,
HORIZON_OFFLOAD_SYNC (layer | step), HORIZON_OFFLOAD_IO (auto | uring | threads).
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
import weakref
from pathlib import Path

import torch

from .. import _native
from ..errors import HorizonError
from ..models import init_tensor_
from .ledger import set_malloc_policy
from .pipeline import _SLOT_TIMEOUT_S, GradientLanding
from .state import HostLayer, HostModel, check_state_sources, read_state_range

log = logging.getLogger(__name__)

ALIGN = 4096                 # bytes: direct-I/O alignment of every offset, length and buffer
PARTS = ("master", "exp_avg", "exp_avg_sq")
SUBDIR = "horizon-offload"   # the tier's files under DIR (rust/offload/files.rs)
ROOF_FILE = "horizon-disk.json"  # `horizon doctor --disk DIR` leaves its measurement here
# Assumed when DIR was never measured (a PCIe Gen4 NVMe drive, sustained, direct I/O).
ASSUMED_READ_GBPS = 3.0
ASSUMED_WRITE_GBPS = 2.0
GIB = 1 << 30

# Hooks for the tests: the file-system queries go through these names.
_statvfs = os.statvfs
_probe_direct = _native.offload_probe_direct


# ----------------------------------------------------------------------------- sizes
def part_bytes(numel: int) -> int:
    """Bytes of one part (master, exp_avg, exp_avg_sq, gradient) of a layer in its file."""
    return -(-max(int(numel), 1) * 4 // ALIGN) * ALIGN


def tier_sizes(numels, *, grad_clip: bool, staging_bytes: int | None = None) -> dict:
    """The tier's bytes for layers of `numels` elements: files on disk, per-step disk traffic
    (read and written), the staging budget (default or HORIZON_OFFLOAD_STAGING_BYTES or
    `staging_bytes`) and the least staging that works (one layer file)."""
    parts = [part_bytes(n) for n in numels]
    per_file = [(4 if grad_clip else 3) * p for p in parts]
    largest = max(per_file) if per_file else 0
    if staging_bytes is None:
        env = os.environ.get("HORIZON_OFFLOAD_STAGING_BYTES")
        if env:
            try:
                staging_bytes = int(env)
            except ValueError:
                raise HorizonError(f"HORIZON_OFFLOAD_STAGING_BYTES must be an integer, got {env!r}") from None
    if staging_bytes is None:
        staging_bytes = 2 * largest  # one layer in AdamW / write-back while the next is read
    state = sum(3 * p for p in parts)
    grad = sum(parts) if grad_clip else 0
    return {
        "disk_bytes": sum(per_file),
        "read_bytes_per_step": state + grad,
        "write_bytes_per_step": state + grad,
        "staging_bytes": int(staging_bytes),
        "min_staging_bytes": largest,
    }


def _env_choice(name: str, allowed: tuple, default: str) -> str:
    v = os.environ.get(name, default).strip().lower() or default
    if v not in allowed:
        raise HorizonError(f"{name} must be one of {', '.join(allowed)}, got {v!r}")
    return v


# ----------------------------------------------------------------------------- DIR checks
def _fs_info(path: Path) -> dict:
    try:
        return json.loads(_native.offload_fs_info_json(str(path)))
    except _native.HorizonError as e:
        raise HorizonError(f"offload dir {path}: {e}") from None


def _old_tier_bytes(path: Path) -> int:
    """Bytes of a dead run's tier files in DIR: they are replaced, so they count as free."""
    sub = path / SUBDIR
    try:
        return sum(f.stat().st_size for f in sub.iterdir() if f.name.endswith(".state"))
    except OSError:
        return 0


def _free_bytes(path: Path) -> int:
    st = _statvfs(str(path))
    return st.f_bavail * st.f_frsize + _old_tier_bytes(path)


def dir_problem(offload_dir, need_bytes: int, *, write_probe: bool = False) -> str | None:
    """Why DIR cannot hold a tier of `need_bytes` (one line naming it), or None: missing, not a
    directory, not writable (`write_probe`: by creating and removing a file; else by its
    permissions), in memory (tmpfs: the tier would hold the state in RAM), or too small."""
    if offload_dir is None or str(offload_dir) == "":
        return "offload_dir must name a directory"
    path = Path(offload_dir).expanduser()
    if not path.exists():
        return f"offload dir {path} does not exist"
    if not path.is_dir():
        return f"offload dir {path} is not a directory"
    if write_probe:
        probe = path / f".horizon-write-probe-{os.getpid()}"
        try:
            fd = os.open(probe, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
            os.close(fd)
            os.unlink(probe)
        except OSError as e:
            return f"offload dir {path} is not writable: {e.strerror or e}"
    elif not os.access(path, os.W_OK | os.X_OK):
        return f"offload dir {path} is not writable"
    try:
        info = _fs_info(path)
        free = _free_bytes(path)
    except (HorizonError, OSError) as e:
        return f"offload dir {path}: {getattr(e, 'strerror', None) or e}"
    if info.get("in_memory"):
        return (f"offload dir {path} is on {info.get('fs_type', 'tmpfs')} (memory): the disk tier would keep the "
                "optimizer state in RAM; choose a directory on a local disk")
    if free < need_bytes:
        return f"offload dir {path} has {free / GIB:.2f} GiB free, the disk tier needs {need_bytes / GIB:.2f} GiB"
    return None


def check_offload_dir(offload_dir, need_bytes: int) -> tuple[Path, bool, str]:
    """Refuses DIR with the one line of `dir_problem`. Returns (path, direct I/O possible,
    note): without O_DIRECT the tier falls back to buffered I/O, and the note says so. Writes
    nothing that outlives the call."""
    problem = dir_problem(offload_dir, need_bytes, write_probe=True)
    if problem:
        raise HorizonError(problem)
    path = Path(offload_dir).expanduser()
    why = _probe_direct(str(path))
    if why is None:
        return path, True, ""
    note = f"offload dir {path}: no direct I/O ({why}); using buffered I/O (the page cache holds recent state)"
    log.warning("%s", note)
    return path, False, note


# ----------------------------------------------------------------------------- the model


class TierSlab:
    """A tiered layer's host part: the compute copy only. `weights_bf16` with bf16 compute;
    with fp32 compute `master`, the master's RAM image (refreshed by every update), which is
    what the fp32 path streams. The fp32 master and Adam m, v are in the layer's file."""

    grad = None

    def __init__(self, numel: int, compute_dtype: torch.dtype, pin: bool):
        from ..store import host_buffer

        self.numel = int(numel)
        buf = host_buffer(self.numel, compute_dtype, pin=pin)
        self.master = buf if compute_dtype == torch.float32 else None
        self.weights_bf16 = buf if compute_dtype == torch.bfloat16 else None
        if self.master is None and self.weights_bf16 is None:
            raise HorizonError(f"the disk tier computes in float32 or bfloat16, not {compute_dtype}")
        self.nbytes = -(-buf.numel() * buf.element_size() // ALIGN) * ALIGN

    @property
    def compute(self) -> torch.Tensor:
        return self.master if self.master is not None else self.weights_bf16

    def pointers(self) -> tuple[int, int]:
        """(w_bf16, p_copy) addresses for the tier's updates and refreshes."""
        w = self.weights_bf16.data_ptr() if self.weights_bf16 is not None and self.numel else 0
        p = self.master.data_ptr() if self.master is not None and self.numel else 0
        return w, p


def _wait(tickets) -> None:
    for t in tickets:
        t.wait()


class TieredHostModel(HostModel):
    """A model whose optimizer state lives in files under `offload_dir` (see the module)."""

    malloc_policy = "return"  # engine/ledger.py MALLOC_POLICIES: a small resident size

    def __init__(self, spec, offload_dir, *, with_grad: bool, pin: bool, compute_dtype: torch.dtype,
                 staging_bytes: int | None = None, durability: str | None = None, io: str | None = None,
                 landing_slots: int = 2):
        from ..models import layer_defs
        from ..store import SlabLayout

        if compute_dtype not in (torch.float32, torch.bfloat16):
            raise HorizonError(f"the disk tier computes in float32 or bfloat16, not {compute_dtype}")
        self.compute_dtype = compute_dtype
        self.with_grad = bool(with_grad)
        # The layouts first: DIR is checked (space included) before anything is allocated.
        layouts = {}
        numels = []
        for d in layer_defs(spec):
            lay = layouts.get(id(d.template))
            if lay is None:
                lay = layouts[id(d.template)] = SlabLayout.from_shapes(dict(d.shapes))
            numels.append(lay.numel)
        sizes = tier_sizes(numels, grad_clip=self.with_grad, staging_bytes=staging_bytes)
        if sizes["staging_bytes"] < sizes["min_staging_bytes"]:
            raise HorizonError(f"disk tier staging of {sizes['staging_bytes']} bytes is below the largest layer's "
                               f"{sizes['min_staging_bytes']} bytes")
        path, direct, self.direct_note = check_offload_dir(offload_dir, sizes["disk_bytes"])
        self.offload_dir = path
        self.sizes = sizes
        self.malloc_note = set_malloc_policy(self.malloc_policy)
        super().__init__(spec, with_grad=False, pin=pin)
        durability = durability or _env_choice("HORIZON_OFFLOAD_SYNC", ("layer", "step"), "layer")
        io = io or _env_choice("HORIZON_OFFLOAD_IO", ("auto", "uring", "threads"), "auto")
        try:
            self.tier = _native.DiskTier(str(path), [layer.numel for layer in self.layers], with_grad=self.with_grad,
                                         direct=direct, staging_bytes=sizes["staging_bytes"], durability=durability,
                                         io=io, landing_slots=landing_slots)
        except _native.HorizonError as e:
            raise HorizonError(str(e)) from None
        self.info = json.loads(self.tier.info_json())
        if self.info.get("backend_note"):
            log.info("disk tier: %s", self.info["backend_note"])
        self._index = {layer.key: i for i, layer in enumerate(self.layers)}
        # The files go when the model goes (or at exit), after the I/O in flight.
        self._finalizer = weakref.finalize(self, self.tier.close)

    def _make_layer(self, defn, layout, *, with_grad: bool, pin: bool) -> HostLayer:
        return HostLayer(defn, layout, TierSlab(layout.numel, self.compute_dtype, pin))

    # -- what the engine asks of a model ---------------------------------------------
    def index(self, key: str) -> int:
        return self._index[key]

    @property
    def host_bytes(self) -> int:
        """Compute copies + staging (the landing slots are the engine's)."""
        return sum(layer.slab.nbytes for layer in self.layers) + int(self.info["staging_bytes"])

    def make_landing(self, n_slots: int, slot_numel: int, device, *, pipeline=None) -> "TierLanding":
        return TierLanding(self, n_slots, slot_numel, device, pipeline=pipeline)

    def close(self) -> None:
        """Removes the files now (they also go with the model)."""
        self._finalizer()

    def tier_stats(self) -> dict:
        s = json.loads(self.tier.stats_json())
        return {f"disk_{k}": v for k, v in s.items()}

    def _quiesce(self) -> None:
        """Nothing in flight, nothing read ahead, every write durable."""
        self.tier.cancel()
        self.tier.flush().wait()

    # -- init, import, export ---------------------------------------------------------
    def _file_view(self, i: int, part: int, mode: str) -> torch.Tensor:
        """A file-backed view of part `part` of layer `i` (np.memmap: through the page cache;
        'r+' writes into the file, 'c' is a private copy-on-write view)."""
        import numpy as np

        path, numel, pbytes, _ = self.tier.layer_file(i)
        if numel == 0:
            return torch.zeros(0)
        mm = np.memmap(path, dtype=np.float32, mode=mode, offset=part * pbytes, shape=(numel,))
        return torch.from_numpy(mm)

    def hf_views(self) -> dict:
        """HF tensor name -> a view of the master in its file (writes reach the file; the tier
        reads it back with direct I/O, which the kernel keeps coherent). Call `sync_bf16_()`
        after writing into them, as with the RAM store."""
        self._quiesce()
        out = {}
        for i, layer in enumerate(self.layers):
            out.update(layer.defn.hf_tensors(layer.layout.views(self._file_view(i, 0, "r+"))))
        return out

    def init_random_(self, seed: int) -> None:
        """HF's init, drawn layer by layer in the RAM store's order (the same numbers), each
        layer's master staged in a temporary buffer and written to its file."""
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise HorizonError(f"seed must be an int, got {seed!r}")
        gen = torch.Generator().manual_seed(seed)
        std = self.spec.initializer_range
        self._quiesce()
        # One staging buffer for every layer (many layer-sized allocations would fragment the
        # heap, which then stays resident).
        whole = torch.empty(max(layer.numel for layer in self.layers), dtype=torch.float32)
        for i, layer in enumerate(self.layers):
            buf = whole[: layer.numel]
            buf.zero_()  # the padding between tensors stays zero, as in a fresh slab
            for name, view in layer.defn.hf_tensors(layer.layout.views(buf)).items():
                init_tensor_(name, view, std, gen)
            # the files are fresh (preallocated: zeros), so m and v stay as they are
            self.tier.write_state(i, buf.data_ptr() if layer.numel else 0, None, None).wait()
        del whole

    def sync_bf16_(self) -> None:
        """Rewrites every compute copy from the master in the files."""
        self._quiesce()
        tickets = []
        for i, layer in enumerate(self.layers):
            w, p = layer.slab.pointers()
            tickets.append(self.tier.refresh(i, w, p))
        _wait(tickets)

    def state_tensors(self) -> dict:
        """`<layer>.master|exp_avg|exp_avg_sq` -> copy-on-write views of the files (read through
        the page cache when used; a checkpoint writer streams them). Consistent: taken with
        nothing in flight; like the RAM store's views they follow the files afterwards."""
        self._quiesce()
        out = {}
        for i, layer in enumerate(self.layers):
            for k, part in enumerate(PARTS):
                out[f"{layer.key}.{part}"] = self._file_view(i, k, "c")
        return out

    def load_state_tensors_(self, tensors: dict) -> None:
        """Writes full flat tensors (or lazy file slices) into the files, one layer at a time
        (host memory: one layer's state), then refreshes the compute copies."""
        check_state_sources(tensors, {f"{layer.key}.{part}": layer.numel for layer in self.layers for part in PARTS})
        self._quiesce()
        for i, layer in enumerate(self.layers):
            srcs = [read_state_range(tensors[f"{layer.key}.{part}"], 0, layer.numel).to(torch.float32).contiguous()
                    for part in PARTS]
            ptrs = [t.data_ptr() if layer.numel else 0 for t in srcs]
            self.tier.write_state(i, *ptrs).wait()
            del srcs
        self.tier.flush().wait()
        self.sync_bf16_()


# ----------------------------------------------------------------------------- landing
class TierLanding(GradientLanding):
    """`GradientLanding` for a tiered model: the same calls from the engine; gradients land in
    page-aligned slots, the tier does the AdamW (from the slot, or, with clipping, from the
    gradient part the slot was written to) and the write-back."""

    def __init__(self, model: TieredHostModel, n_slots: int, slot_numel: int, device, *, pipeline=None):
        # Whole pages per slot: a clipping landing is written to disk from the slot directly.
        padded = -(-int(slot_numel) * 4 // ALIGN) * ALIGN // 4
        super().__init__(n_slots, padded, device, pipeline=pipeline)
        self._model = model
        self._tier = model.tier
        self._clip = model.with_grad
        self._io: list = []

    @property
    def skipped_updates(self) -> int:
        return int(json.loads(self._tier.stats_json())["skipped_updates"]) + super().skipped_updates

    def begin_step(self) -> None:
        """Announces the step's update order, so the tier reads ahead while the device computes:
        without clipping the order gradients land in (head, blocks from the top, embedding),
        with clipping the update order (embedding first)."""
        done = [t for t in self._io if t.done]
        self._io = [t for t in self._io if not t.done]
        for t in done:
            t.wait()  # raises a write-back error of an earlier step here
        n = len(self._model.layers)
        order = list(range(n)) if self._clip else list(range(n - 1, -1, -1))
        self._tier.begin_step(order, self._clip)

    def _drop_landed(self) -> None:
        """Lets go of gradients already copied into a landing slot: the engine's per-layer
        accumulators must not pile up until the next step (host memory on the CPU device,
        device memory on CUDA). The tickets stay, to be waited for."""
        for jobs in self._jobs.values():
            for k, (t, keep) in enumerate(jobs):
                if keep and t.done:
                    jobs[k] = (t, ())

    def _slot(self) -> int:
        self._drop_landed()
        t0 = time.perf_counter()
        slot = self._tier.acquire_landing(_SLOT_TIMEOUT_S)
        self.wait_seconds += time.perf_counter() - t0
        if slot is None:
            raise HorizonError("no free gradient landing slot (the disk tier stalled?)")
        return slot

    def _into_slot(self, flat_grad: torch.Tensor, slot: int):
        """Starts flat_grad -> landing slot: (copy_from, cuda_event, keepalive). On CUDA the D2H
        copy is queued on the landing stream; on the CPU the tier copies."""
        n = flat_grad.numel()
        if self._cuda:
            _t, ev, keep = self._copy_out(flat_grad, self._slots[slot][:n])  # counts bytes_d2h
            return 0, self._event_arg(ev), keep
        self.bytes_d2h += n * 4
        return flat_grad.data_ptr() if n else 0, None, (flat_grad,)

    def land_and_update(self, key, flat_grad, slab, *, hyper, step, write_bf16, skip_nonfinite: bool = False) -> None:
        self._check(flat_grad, slab)
        slot = self._slot()
        copy_from, ev, keep = self._into_slot(flat_grad, slot)
        w, p = slab.pointers()
        adam, io = self._tier.update(
            self._model.index(key), step=int(step), lr=hyper.lr, beta1=hyper.beta1, beta2=hyper.beta2,
            eps=hyper.eps, weight_decay=hyper.weight_decay, grad_ptr=self._slots[slot].data_ptr(),
            copy_from=copy_from, cuda_event=ev, landing_slot=slot, skip_nonfinite=bool(skip_nonfinite),
            w_bf16=w if write_bf16 else 0, p_copy=p)
        self._jobs.setdefault(key, []).append((adam, keep + (slab,)))
        self._io.append(io)

    def land_to_buffer(self, key, flat_grad, slab) -> None:
        self._check(flat_grad, slab)
        slot = self._slot()
        copy_from, ev, keep = self._into_slot(flat_grad, slot)
        t = self._tier.land(self._model.index(key), self._slots[slot].data_ptr(), copy_from=copy_from,
                            cuda_event=ev, landing_slot=slot)
        self._jobs.setdefault(key, []).append((t, keep + (slab,)))

    def update_from_buffer(self, key, slab, *, hyper, step, grad_scale, write_bf16) -> None:
        w, p = slab.pointers()
        adam, io = self._tier.update(
            self._model.index(key), step=int(step), lr=hyper.lr, beta1=hyper.beta1, beta2=hyper.beta2,
            eps=hyper.eps, weight_decay=hyper.weight_decay, grad_scale=float(grad_scale), from_disk=True,
            w_bf16=w if write_bf16 else 0, p_copy=p)
        self._jobs.setdefault(key, []).append((adam, (slab,)))
        self._io.append(io)

    def before_reuse(self, buf: torch.Tensor) -> None:
        """The engine writes into a gradient buffer it landed from: wait for the tier's jobs that
        still read it (on the CPU device the tier copies straight from that buffer)."""
        ptr = buf.untyped_storage().data_ptr()
        for jobs in self._jobs.values():
            for ticket, keep in jobs:
                if any(isinstance(k, torch.Tensor) and k.untyped_storage().data_ptr() == ptr for k in keep):
                    ticket.wait()
        super().before_reuse(buf)

    def wait_all(self) -> None:
        """Every queued update applied and durable; the read-ahead of a step that stopped early
        dropped."""
        try:
            super().wait_all()
        finally:
            io, self._io = self._io, []
            self._tier.cancel()
        _wait(io)
        self._tier.flush().wait()


# ----------------------------------------------------------------------------- plan
def read_roof(offload_dir) -> dict | None:
    """The measurement `horizon doctor --disk DIR` left in DIR, or None."""
    if not offload_dir:
        return None
    try:
        r = json.loads((Path(offload_dir).expanduser() / ROOF_FILE).read_text())
        if r.get("read_gbps", 0) > 0 and r.get("write_gbps", 0) > 0:
            return r
    except (OSError, ValueError, AttributeError):
        pass
    return None


def apply_disk_tier(p: dict, layers, offload_dir, *, compute_bytes: int | None = None) -> dict:
    """Turns a `horizon plan` dict (plan.make_plan) into the plan of the same run with the disk
    tier in `offload_dir`: the master and Adam state move from host to disk; the host keeps the
    compute copy, the staging and the landing slots; the disk's bytes, its traffic per step and
    its bound on the step time join, and "fits" also asks the disk. `layers`: (key, parameters)
    per streamed layer. Returns `p`, changed in place."""
    from ..store import ALIGN as SLAB_ALIGN

    # Every step lands its gradients (in the tier: the layer file's gradient part) before the
    # step's verdict, with or without clipping (a step updates all layers or none).
    grad_clip = True
    # a layer's slab numel: each tensor padded to 16 elements; the plan knows only the totals
    numels = [-(-int(n) // SLAB_ALIGN) * SLAB_ALIGN for _, n in layers]
    n = sum(int(x) for _, x in layers)
    sizes = tier_sizes(numels, grad_clip=grad_clip)
    m = p["machine"]
    if compute_bytes is None:
        compute_bytes = 2 if m["device"] == "cuda" else 4  # the default compute dtype per device
    before = dict(p["host_breakdown"])
    host = {k: v for k, v in before.items() if k not in ("master_fp32", "adam_moments_fp32", "grad_buffer_fp32",
                                                          "compute_copy_bf16")}
    host = {"compute_copy": compute_bytes * n, "disk_tier_staging": sizes["staging_bytes"], **host}
    disk = {"master_fp32": sum(part_bytes(x) for x in numels),
            "adam_moments_fp32": 2 * sum(part_bytes(x) for x in numels),
            "grad_fp32": sum(part_bytes(x) for x in numels) if grad_clip else 0}
    roof = read_roof(offload_dir)
    measured = roof is not None
    rd = roof["read_gbps"] if measured else ASSUMED_READ_GBPS
    wr = roof["write_gbps"] if measured else ASSUMED_WRITE_GBPS
    disk_s = sizes["read_bytes_per_step"] / (rd * 1e9) + sizes["write_bytes_per_step"] / (wr * 1e9)
    terms = dict(p["step_time_terms_s"], disk_s=disk_s)
    step_s = max(terms.values())
    host_total = sum(host.values())
    margin = m["host_margin_bytes"]
    if m["device"] == "cuda":
        fits_host = host_total <= m["host_available_bytes"] - margin
    else:
        fits_host = host_total + p["device_bytes"] <= m["host_available_bytes"] - margin
    problem = dir_problem(offload_dir, sizes["disk_bytes"])
    try:
        free = _free_bytes(Path(offload_dir).expanduser())
    except (OSError, TypeError, ValueError):
        free = None
    fits_disk = problem is None
    p.update({
        "offload_dir": str(offload_dir),
        "host_bytes_without_tier": p["host_bytes"],
        "host_breakdown_without_tier": before,
        "host_bytes": host_total, "host_breakdown": host,
        "disk_bytes": sizes["disk_bytes"], "disk_breakdown": disk,
        "disk_free_bytes": free, "disk_problem": problem,
        "disk_read_bytes_per_step": sizes["read_bytes_per_step"],
        "disk_write_bytes_per_step": sizes["write_bytes_per_step"],
        "disk_bandwidth": {"read_gbps": rd, "write_gbps": wr,
                           "source": f"measured by horizon doctor --disk ({ROOF_FILE})" if measured else
                           f"assumed (run `horizon doctor --disk {offload_dir}` to measure)"},
        "host_formula": f"{compute_bytes} B/param compute copy + staging + landing slots"
                        + (" + the CPU device's bytes" if m["device"] == "cpu" else "") + " + a constant",
        "step_time_terms_s": terms, "step_time_lower_bound_s": step_s,
        "tokens_per_s_upper_bound": p["tokens_per_step"] / step_s if step_s > 0 else math.inf,
        "fits_host": fits_host, "fits_disk": fits_disk,
        "fits": fits_host and p["fits_device"] and fits_disk,
    })
    return p


def _b(x) -> str:
    for unit, div in (("GiB", GIB), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if x >= div:
            return f"{x / div:.2f} {unit}"
    return f"{x} B"


def tier_plan_lines(p: dict) -> list[str]:
    """The disk tier's lines of `horizon plan` (empty without the tier)."""
    if "disk_bytes" not in p:
        return []
    bw = p["disk_bandwidth"]
    lines = [f"disk tier     {_b(p['disk_bytes']):>12}   (in {p['offload_dir']}; "
             f"{_b(p['disk_free_bytes']) if p['disk_free_bytes'] is not None else 'unknown'} free)"]
    lines += [f"  {k:<24}{_b(v):>12}" for k, v in p["disk_breakdown"].items() if v]
    lines.append(f"  disk per step: read {_b(p['disk_read_bytes_per_step'])}, write {_b(p['disk_write_bytes_per_step'])}"
                 f" at {bw['read_gbps']:.2f} / {bw['write_gbps']:.2f} GB/s ({bw['source']})")
    lines.append(f"  host memory {_b(p['host_bytes'])} with the tier, {_b(p['host_bytes_without_tier'])} without"
                 f" ({p['host_formula']})")
    return lines


def tier_plan_why(p: dict) -> list[str]:
    """Reasons the tier does not fit (for the verdict line)."""
    if "disk_bytes" in p and not p.get("fits_disk", True):
        return [p.get("disk_problem") or f"the disk tier needs {_b(p['disk_bytes'])} in {p['offload_dir']}"]
    return []


# ----------------------------------------------------------------------------- doctor
def disk_io_info() -> dict:
    """Which I/O back end the tier uses on this machine (io_uring or threads) and why."""
    backend, why = _native.offload_io_probe()
    return {"backend": backend, "note": why}


def doctor_disk(offload_dir, *, nbytes: int | None = None) -> dict:
    """`horizon doctor --disk DIR`: the directory's file system, free space and direct-I/O
    support, and its sequential direct read / write bandwidth through the tier's I/O path
    (`nbytes`, default 1 GiB or a quarter of the free space), saved in DIR for `horizon plan`."""
    path = Path(offload_dir).expanduser()
    _, direct, note = check_offload_dir(path, 0)
    info = _fs_info(path)
    st = _statvfs(str(path))
    free = st.f_bavail * st.f_frsize
    if nbytes is None:
        nbytes = max(64 << 20, min(GIB, free // 4))
    if nbytes > free // 2:
        raise HorizonError(f"offload dir {path} has {free / GIB:.2f} GiB free: too little to measure "
                           f"{nbytes / GIB:.2f} GiB")
    try:
        roof = json.loads(_native.offload_roof_json(str(path), int(nbytes), direct=direct))
    except _native.HorizonError as e:
        raise HorizonError(f"measuring {path}: {e}") from None
    out = dict(roof, dir=str(path), fs_type=info["fs_type"], available_bytes=free, direct_note=note,
               measured_at=time.strftime("%Y-%m-%dT%H:%M:%S"))
    try:
        tmp = path / f".{ROOF_FILE}.tmp"
        tmp.write_text(json.dumps(out, indent=1))
        os.replace(tmp, path / ROOF_FILE)
    except OSError as e:
        out["save_error"] = e.strerror or str(e)
    return out


def doctor_lines(info: dict) -> list[str]:
    """`horizon doctor`'s disk lines: the I/O back end, and DIR's measurement when asked."""
    lines = []
    io = info.get("disk_io")
    if io:
        lines.append(f"disk tier I/O  {io['backend']}" + (f" ({io['note']})" if io.get("note") else ""))
    d = info.get("disk")
    if d:
        if "error" in d:
            lines.append(f"disk           {d['error']}")
        else:
            direct = "direct I/O" if d["direct_io"] else f"buffered I/O ({d.get('direct_note')})"
            lines.append(f"disk           {d['dir']}: {d['fs_type']}, {_b(d['available_bytes'])} free, {direct}, "
                         f"{d['backend']}")
            lines.append(f"  sequential   read {d['read_gbps']:.2f} GB/s, write {d['write_gbps']:.2f} GB/s "
                         f"(first write {d['first_write_gbps']:.2f} GB/s), {_b(d['bytes'])} in "
                         f"{_b(d['chunk_bytes'])} requests x {d['queue_depth']}")
    return lines
