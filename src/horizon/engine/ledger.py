"""The engine's accounting of the memory it holds: device bytes (weight slots, gradient
accumulators, checkpoints kept on the device, the live activations of the block being
computed and the gradients its backward hands back) and host bytes (layer slabs, landing
slots, offloaded checkpoints).

On CUDA the device peak is read from torch's caching allocator; on the CPU device it is the
sum of the tensors the engine places there, measured from the tensors themselves (their
storage sizes), not from a formula, so the depth test means the same on both."""

from __future__ import annotations

import os

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


def host_memory() -> tuple[int, int]:
    """(available, total) bytes of host memory for this process: MemAvailable and MemTotal,
    bounded by a cgroup memory limit when there is one."""
    avail = total = None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    avail = int(line.split()[1]) * 1024
                elif line.startswith("MemTotal:"):
                    total = int(line.split()[1]) * 1024
    except OSError:
        pass
    if avail is None:
        try:
            avail = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
        except (ValueError, OSError):
            avail = 0
    if total is None:
        try:
            total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        except (ValueError, OSError):
            total = avail
    for p in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            raw = open(p).read().strip()
        except OSError:
            continue
        if raw.isdigit() and int(raw) < (1 << 60):
            used = 0
            for q in ("/sys/fs/cgroup/memory.current", "/sys/fs/cgroup/memory/memory.usage_in_bytes"):
                try:
                    used = int(open(q).read().strip())
                    break
                except (OSError, ValueError):
                    continue
            avail = min(avail, max(0, int(raw) - used))
            total = min(total, int(raw))
    return avail, total


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
# glibc malloc settings per policy: (mmap threshold, trim threshold or None for the default)
MALLOC_POLICIES = {
    # The RAM-resident model on the CPU device: every activation is a fresh host allocation, and
    # with glibc's default (a dynamic mmap threshold; free memory above the heap's top returned
    # at once) a step's tensors are page-faulted in again each step, ~5-10% of a small model's
    # step (benches/cpu_engine.py, HORIZON_MALLOC_TUNING=0 against 1). Blocks up to 32 MiB come
    # from the heap and freed memory stays for the next step.
    "retain": (32 << 20, 1 << 30),
    # The disk tier (engine/offload.py), whose point is a small resident size: every buffer of
    # 1 MiB or more is its own mapping and goes back to the OS when freed. With glibc's dynamic
    # threshold layer-sized buffers come from the heap, whose fragments stay resident, and the
    # peak RSS grows with the depth instead of staying one layer's worth.
    "return": (1 << 20, None),
}
_policy = None


def set_malloc_policy(policy: str) -> str:
    """Applies a `MALLOC_POLICIES` entry to this process's glibc allocator (the host slabs are
    our own mappings, not malloc's). Returns "" when applied, else why not: not glibc, or left
    alone (MALLOC_MMAP_THRESHOLD_ set, or HORIZON_MALLOC_TUNING=0). The last call wins."""
    global _policy
    if os.environ.get("MALLOC_MMAP_THRESHOLD_"):
        return "MALLOC_MMAP_THRESHOLD_ is set: left as it is"
    if os.environ.get("HORIZON_MALLOC_TUNING", "1") == "0":
        return "HORIZON_MALLOC_TUNING=0: left as it is"
    if _policy == policy:
        return ""
    mmap_threshold, trim = MALLOC_POLICIES[policy]
    try:
        import ctypes

        libc = ctypes.CDLL(None)
        if not hasattr(libc, "mallopt") or not hasattr(libc, "gnu_get_libc_version"):
            return "not glibc"
        ok = libc.mallopt(_M_MMAP_THRESHOLD, mmap_threshold) == 1
        if ok and trim is not None:
            ok = libc.mallopt(_M_TRIM_THRESHOLD, trim) == 1
    except (OSError, AttributeError) as e:
        return f"mallopt unavailable: {e}"
    if not ok:
        return "mallopt refused"
    _policy = policy
    return ""
