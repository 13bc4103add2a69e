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


RENDEZVOUS_ENV = "HORIZON_RENDEZVOUS_TIMEOUT"
DEFAULT_RENDEZVOUS_S = 600.0
_SAY_WAITING_AFTER_S = 5.0


def _rendezvous_timeout(value) -> float:
    if value is None:
        raw = os.environ.get(RENDEZVOUS_ENV)
        if raw is None:
            return DEFAULT_RENDEZVOUS_S
        try:
            value = float(raw)
        except ValueError:
            raise HorizonError(f"environment variable {RENDEZVOUS_ENV} must be a number of seconds, got {raw!r}") from None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0 or value == float("inf"):
        raise HorizonError(f"the rendezvous timeout must be a positive number of seconds, got {value!r}")
    return float(value)


def _agent_store_serves(addr: str, port: int) -> bool:
    """True under torchrun when its agent already hosts the store at MASTER_ADDR:MASTER_PORT
    (torch's own env:// rendezvous asks the same question)."""
    try:
        from torch.distributed.rendezvous import _agent_store_serves as serves
    except ImportError:
        return os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == str(True)
    try:
        return bool(serves(addr, port))
    except Exception:  # noqa: BLE001 - a private helper's signature may change; fall back to the env
        return os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == str(True)


def _join_store(rank: int, world: int, addr: str, port: int, timeout_s: float):
    """The TCP store every rank meets at (rank 0 hosts it). Waits at most `timeout_s` for all
    `world` ranks; after a few seconds of waiting it says (on stderr) what it waits for. The
    C++ layer's retry log lines are kept off stderr: a failure is one line, raised here."""
    import sys
    import threading

    what = (f"rank {rank} of {world} is waiting for {'the other ranks to join' if rank == 0 else 'rank 0'} "
            f"at {addr}:{port} (up to {timeout_s:g} s; --rendezvous-timeout or {RENDEZVOUS_ENV})")
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError):
        saved = None

    def say():
        try:
            os.write(saved if saved is not None else 2, f"horizon: {what}\n".encode())
        except OSError:
            pass

    timer = threading.Timer(_SAY_WAITING_AFTER_S, say)
    timer.daemon = True
    timer.start()
    devnull = None
    try:
        if saved is not None:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, 2)
        timeout = datetime.timedelta(seconds=timeout_s)
        if _agent_store_serves(addr, port):  # torchrun's agent hosts the store: every rank is a client
            return dist.TCPStore(addr, port, world, is_master=False, timeout=timeout)
        return dist.TCPStore(addr, port, world, is_master=(rank == 0), timeout=timeout, wait_for_workers=True,
                             multi_tenant=True)
    except (RuntimeError, OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise HorizonError(
            f"rank {rank} of {world}: the process group did not form within {timeout_s:g} s at {addr}:{port} "
            f"({first}); start every rank (e.g. torchrun --nproc-per-node {world}) or raise --rendezvous-timeout"
        ) from None
    finally:
        timer.cancel()
        if saved is not None:
            os.dup2(saved, 2)
            os.close(saved)
        if devnull is not None:
            os.close(devnull)


def init_from_env(backend: str | None = None, *, timeout_s: float = 1800.0,
                  rendezvous_timeout_s: float | None = None) -> tuple[int, int]:
    """Joins the process group torchrun describes (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR,
    MASTER_PORT) when WORLD_SIZE > 1 and returns (rank, world_size); (0, 1) for a plain run.
    Backend: NCCL when CUDA is available (each rank takes GPU LOCAL_RANK), Gloo otherwise.
    `rendezvous_timeout_s` bounds the wait for every rank to arrive (default: the environment
    variable HORIZON_RENDEZVOUS_TIMEOUT, else 600 s; a rank that waits says so on stderr after
    a few seconds, and the timeout is one HorizonError line); `timeout_s` is the collectives'.
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
    wait_s = _rendezvous_timeout(rendezvous_timeout_s)
    addr, port = os.environ["MASTER_ADDR"], _env_int("MASTER_PORT")
    store = _join_store(rank, world, addr, port, wait_s)
    store.set_timeout(datetime.timedelta(seconds=float(timeout_s)))
    dist.init_process_group(backend, store=store, rank=rank, world_size=world,
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
