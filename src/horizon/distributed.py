"""Scale-out on torch.distributed (docs/distributed.md): joining the process group that
torchrun describes in the environment, and the small helpers the trainer and the CLI share
(who is rank 0, which micro-batches are this rank's, how the ranks split a layer's state).

The data-parallel engine itself lives in `horizon.engine.distributed`; `horizon.Trainer`
switches to it whenever a process group is initialised."""

from __future__ import annotations

import datetime
import os

import torch
import torch.distributed as dist

from .errors import HorizonError

# Shard boundaries are multiples of this many elements, like the slab offsets
# (horizon.store.ALIGN): whole vectors for the CPU AdamW, aligned copies.
SHARD_ALIGN = 16


def _env_int(name: str, default=None) -> int:
    raw = os.environ.get(name)
    if raw is None:
        if default is None:
            raise HorizonError(f"environment variable {name} is not set (launch with torchrun)")
        return default
    try:
        value = int(raw)
    except ValueError:
        raise HorizonError(f"environment variable {name} must be an int, got {raw!r}") from None
    if value < 0:
        raise HorizonError(f"environment variable {name} must be >= 0, got {value}")
    return value


def init_from_env(backend: str | None = None, *, timeout_s: float = 1800.0) -> tuple[int, int]:
    """Joins the process group torchrun describes (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR,
    MASTER_PORT) when WORLD_SIZE > 1 and returns (rank, world_size); (0, 1) for a plain run.
    Backend: NCCL when CUDA is available (each rank takes GPU LOCAL_RANK), Gloo otherwise.
    Idempotent: an already initialised group is returned as it is."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    world = _env_int("WORLD_SIZE", 1)
    if world == 0:
        raise HorizonError("environment variable WORLD_SIZE must be >= 1, got 0")
    if world == 1:
        return 0, 1
    if not dist.is_available():
        raise HorizonError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
    rank = _env_int("RANK")
    local_rank = _env_int("LOCAL_RANK", rank)
    if rank >= world:
        raise HorizonError(f"RANK {rank} is not below WORLD_SIZE {world}")
    for name in ("MASTER_ADDR", "MASTER_PORT"):
        if not os.environ.get(name):
            raise HorizonError(f"environment variable {name} is not set (launch with torchrun)")
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend not in ("nccl", "gloo"):
        raise HorizonError(f"backend must be 'nccl' or 'gloo', got {backend!r}")
    if backend == "nccl":
        if not torch.cuda.is_available():
            raise HorizonError("backend 'nccl' needs CUDA GPUs; use 'gloo' on CPUs")
        n = torch.cuda.device_count()
        if local_rank >= n:
            raise HorizonError(f"LOCAL_RANK {local_rank} but this node has {n} GPU(s)")
        torch.cuda.set_device(local_rank)
    if isinstance(timeout_s, bool) or not isinstance(timeout_s, (int, float)) or timeout_s <= 0:
        raise HorizonError(f"timeout_s must be a positive number, got {timeout_s!r}")
    dist.init_process_group(backend, rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=float(timeout_s)))
    return rank, world


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    """This process's rank (0 without a process group)."""
    return dist.get_rank() if is_initialized() else 0


def world_size() -> int:
    """The number of ranks (1 without a process group)."""
    return dist.get_world_size() if is_initialized() else 1


def is_rank0() -> bool:
    """True on the rank that writes metrics and checkpoints (and in a plain run)."""
    return rank() == 0


def barrier() -> None:
    """Waits for every rank (no-op without a process group)."""
    if is_initialized():
        dist.barrier()


def shutdown() -> None:
    """Leaves the process group, if one was joined."""
    if is_initialized():
        dist.destroy_process_group()


def backend() -> str | None:
    return dist.get_backend() if is_initialized() else None


def _flag_device() -> torch.device:
    # NCCL reduces device memory only.
    if backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def any_rank(flag: bool) -> bool:
    """Collective: True on every rank when `flag` is true on any rank (e.g. a stop signal
    that reached one rank between steps: all ranks must leave the loop at the same step)."""
    if not is_initialized():
        return bool(flag)
    t = torch.tensor([1 if flag else 0], dtype=torch.int32, device=_flag_device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def from_rank0(obj):
    """Collective: rank 0's `obj` (picklable) on every rank; `obj` itself without a group."""
    if not is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def share(n: int, rank: int, world: int) -> tuple[int, int]:
    """[lo, hi): the contiguous part of n items (micro-batches) that `rank` of `world` takes;
    shares differ by at most one item, and a rank may get none when n < world."""
    for name, v in (("n", n), ("rank", rank), ("world", world)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise HorizonError(f"{name} must be a non-negative int, got {v!r}")
    if world == 0 or rank >= world:
        raise HorizonError(f"rank {rank} is not in a world of {world}")
    return n * rank // world, n * (rank + 1) // world


def shard_size(numel: int, world: int) -> int:
    """Elements per rank of a flat layer state of `numel` elements: ceil(numel / world)
    rounded up to SHARD_ALIGN, so every rank's shard starts on an aligned element. The last
    ranks' shards may be shorter (or empty); gathers pad them to this size."""
    if isinstance(numel, bool) or not isinstance(numel, int) or numel < 0:
        raise HorizonError(f"numel must be a non-negative int, got {numel!r}")
    if isinstance(world, bool) or not isinstance(world, int) or world < 1:
        raise HorizonError(f"world must be a positive int, got {world!r}")
    per = -(-numel // world)
    return -(-per // SHARD_ALIGN) * SHARD_ALIGN


def shard_range(numel: int, rank: int, world: int) -> tuple[int, int]:
    """[lo, hi) of `rank`'s shard of a flat state of `numel` elements."""
    s = shard_size(numel, world)
    if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < world:
        raise HorizonError(f"rank {rank!r} is not in a world of {world}")
    lo = min(rank * s, numel)
    return lo, min(lo + s, numel)
