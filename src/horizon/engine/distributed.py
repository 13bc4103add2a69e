"""Data parallelism over torch.distributed (docs/distributed.md):
the host model sharded across the ranks (`ShardedHostModel`) and the layer-major engine that
reduces each layer's gradient across the ranks as it lands (`DataParallelEngine`).

Each rank's slabs hold its contiguous shard of every layer's flat state (fp32 master, Adam m
and v, the gradient buffer with clipping), so the optimizer state of a node is one model's,
not one per rank. What the weight stream reads is a full-size compute copy per layer (fp32
for fp32 compute, bf16 for bf16), brought up to date just before the layer's next forward:
one copy in shared memory for all the ranks of a node (each rank writes its updated shard,
then a barrier), or one per rank refreshed by an all-gather of the shards.
A step: every rank runs its share of the micro-batches;
each layer's device gradient accumulator is all-reduced asynchronously as soon as the
layer's backward is done and waited one layer later, so the reduction overlaps the next
layer's backward; then each rank lands (and AdamW-updates) only its shard.
"""

from __future__ import annotations

import logging
import os
import socket
import uuid
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .. import kernels
from ..distributed import shard_range, shard_size, share
from ..errors import HorizonError
from .ledger import tensor_bytes
from .schedule import LayerMajorEngine, StepResult
from .state import HostLayer, HostModel, check_state_sources, constant_tensors, read_state_range

log = logging.getLogger(__name__)


@dataclass
class ShardedHostLayer(HostLayer):
    """A layer whose slab holds elements [lo, hi) of its flat state; `compute` is the
    full-size compute copy (world x shard elements, the tail past `numel` zero)."""

    lo: int = 0
    hi: int = 0
    shard: int = 0
    compute: torch.Tensor | None = None


def _node_id() -> str:
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
    except OSError:
        boot = ""
    return f"{socket.gethostname()}/{boot}"


class _NodeMapping:
    """One shared-memory mapping that every rank of the node maps (a /dev/shm file, unlinked
    as soon as all ranks hold it, so nothing is left behind), page-locked for the GPU's DMA
    when CUDA is there."""

    def __init__(self, tensor: torch.Tensor, pin: bool):
        self.tensor = tensor
        self.pinned = False
        if pin and torch.cuda.is_available() and tensor.numel() > 0:
            nbytes = tensor.numel() * tensor.element_size()
            code = torch.cuda.cudart().cudaHostRegister(tensor.data_ptr(), nbytes, 0)
            self.pinned = int(code) == 0
            if not self.pinned:
                log.info("data parallel: the node-shared compute copy is not page-locked (cudaHostRegister: %s)",
                         code)

    def __del__(self):
        if self.pinned:
            try:
                torch.cuda.synchronize()  # no copy may still read it once unpinned
                torch.cuda.cudart().cudaHostUnregister(self.tensor.data_ptr())
            except Exception:  # noqa: BLE001 - never raise from a finaliser
                pass


def _map_node_shared(numel: int, dtype: torch.dtype, group, pin: bool):
    """Collective on `group` (all ranks on one node): a zero-filled shared tensor, or None on
    every rank when any rank could not create or map it (the caller then keeps one copy per
    rank). Space is reserved up front, so a full /dev/shm fails here, not as SIGBUS later."""
    nbytes = numel * torch.empty((), dtype=dtype).element_size()
    name = [None]
    if dist.get_rank(group) == 0:
        path = os.path.join("/dev/shm", f"horizon-{os.getpid()}-{uuid.uuid4().hex}")
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
            try:
                os.posix_fallocate(fd, 0, max(nbytes, 1))
            finally:
                os.close(fd)
            name = [path]
        except OSError as e:
            log.info("data parallel: no node-shared compute copy (%s: %s); one per rank instead", path, e)
            try:
                os.unlink(path)
            except OSError:
                pass
    dist.broadcast_object_list(name, src=dist.get_global_rank(group, 0) if group is not None else 0, group=group)
    if name[0] is None:
        return None
    tensor = None
    try:
        tensor = torch.from_file(name[0], shared=True, size=numel, dtype=dtype)
    except RuntimeError as e:
        log.info("data parallel: could not map %s (%s); one compute copy per rank instead", name[0], e)
    ok = torch.tensor([0 if tensor is None else 1], dtype=torch.int32)
    dist.all_reduce(ok, op=dist.ReduceOp.MIN, group=group)
    if dist.get_rank(group) == 0:
        os.unlink(name[0])  # every rank has mapped it (or given up): the name is not needed
    if int(ok) == 0:
        return None
    return _NodeMapping(tensor, pin)


class ShardedHostModel(HostModel):
    """`HostModel` whose slabs hold this rank's shard of every layer.

    Compute copies: when every rank is on one node (the case Horizon is built for) one copy
    per layer serves them all, in shared memory; a rank publishes its updated shard into it
    and a barrier says all shards are in. Otherwise (or with HORIZON_DP_SHARED_COPY=0) each
    rank keeps its own full copy, refreshed by an all-gather of the shards.

    Collective methods (every rank calls them, in the same order): `refresh_`, `hf_views`,
    `sync_bf16_`, `state_tensors`, `load_state_tensors_`."""

    def __init__(self, spec, *, with_grad: bool, pin: bool, compute_dtype: torch.dtype, group=None,
                 node_shared: bool | None = None):
        if not (dist.is_available() and dist.is_initialized()):
            raise HorizonError("ShardedHostModel needs an initialised torch.distributed process group")
        if compute_dtype not in (torch.float32, torch.bfloat16):
            raise HorizonError(f"compute_dtype must be float32 or bfloat16, got {compute_dtype}")
        if node_shared not in (None, True, False):
            raise HorizonError(f"node_shared must be None (auto), True or False, got {node_shared!r}")
        self.group = group
        self.rank = dist.get_rank(group)
        self.world = dist.get_world_size(group)
        self.compute_dtype = compute_dtype
        self._nccl = dist.get_backend(group) == "nccl"
        # Host-side agreement (object broadcasts, barriers) needs a CPU backend.
        self._host_group = dist.new_group(backend="gloo") if self._nccl else group
        self._pin = pin
        self._stale: set = set()  # layers whose compute copy predates their last update
        self._staging: dict = {}  # full fp32 masters for import / export
        self._has_state = False  # before the first commit there is nothing to gather
        if node_shared is None:
            env = os.environ.get("HORIZON_DP_SHARED_COPY", "1").strip().lower()
            if env not in ("0", "1", "false", "true", "no", "yes"):
                raise HorizonError(f"HORIZON_DP_SHARED_COPY must be 0 or 1, got {env!r}")
            node_shared = env in ("1", "true", "yes")
        if node_shared:
            ids = [None] * self.world
            dist.all_gather_object(ids, _node_id(), group=self._host_group)
            node_shared = len(set(ids)) == 1
        self._mapping = None
        super().__init__(spec, with_grad=with_grad, pin=pin)
        if node_shared:
            total = sum(layer.shard * self.world for layer in self.layers)
            self._mapping = _map_node_shared(total, compute_dtype, self._host_group, pin)
        at = 0
        for layer in self.layers:
            n = layer.shard * self.world
            if self._mapping is not None:
                layer.compute = self._mapping.tensor[at: at + n]
            else:
                from ..store import host_buffer

                layer.compute = host_buffer(n, compute_dtype, pin=pin)
            at += n

    @property
    def node_shared(self) -> bool:
        """True when one compute copy serves every rank of the node."""
        return self._mapping is not None

    def _make_layer(self, defn, layout, *, with_grad: bool, pin: bool) -> ShardedHostLayer:
        from ..store import LayerSlab

        s = shard_size(layout.numel, self.world)
        lo, hi = shard_range(layout.numel, self.rank, self.world)
        slab = LayerSlab(hi - lo, with_grad=with_grad, pin=pin)
        return ShardedHostLayer(defn, layout, slab, lo=lo, hi=hi, shard=s)  # compute: set after

    # ------------------------------------------------------------------ accounting
    @property
    def host_bytes(self) -> int:
        """This rank's bytes: its slabs, plus its compute copies (the node-shared copy is
        counted 1/world on each rank, so the ranks' figures add up to the node's)."""
        copies = sum(layer.compute.numel() * layer.compute.element_size() for layer in self.layers)
        return super().host_bytes + (copies // self.world if self.node_shared else copies)

    # ------------------------------------------------------------------ collectives
    def _all_gather_flat(self, out: torch.Tensor, src: torch.Tensor, s: int) -> None:
        """out[r*s : r*s+len] = rank r's src, for every r (src padded to s elements)."""
        if src.numel() < s:
            padded = torch.zeros(s, dtype=src.dtype)
            padded[: src.numel()].copy_(src)
            src = padded
        if self._nccl:
            # NCCL moves device memory only: stage the shard in and the gathered layer out.
            dev = torch.device("cuda", torch.cuda.current_device())
            gathered = torch.empty(out.numel(), dtype=out.dtype, device=dev)
            dist.all_gather_into_tensor(gathered, src.to(dev), group=self.group)
            out.copy_(gathered)
        else:
            dist.all_gather(list(out.split(s)), src, group=self.group)

    def _compute_source(self, layer: ShardedHostLayer) -> torch.Tensor:
        s = layer.slab
        return s.master if self.compute_dtype == torch.float32 else s.weights_bf16

    def gather_compute_(self, layer: ShardedHostLayer) -> None:
        """Collective: brings the layer's full compute copy up to date with every shard."""
        if self.node_shared:
            # Each rank writes only its own range; the barrier is the "all shards are in".
            layer.compute[layer.lo: layer.hi].copy_(self._compute_source(layer))
            dist.barrier(group=self._host_group)
        else:
            self._all_gather_flat(layer.compute, self._compute_source(layer), layer.shard)
        self._stale.discard(layer.key)

    def mark_stale_(self) -> None:
        """Every layer's shard is (being) updated: refresh the compute copies before use."""
        self._stale = {layer.key for layer in self.layers}

    def is_stale(self, key) -> bool:
        return key in self._stale

    def refresh_(self) -> None:
        """Collective: brings every stale compute copy up to date (forward order)."""
        for layer in self.layers:
            if layer.key in self._stale:
                self.gather_compute_(layer)

    def _gather_flat_to_rank0(self, out, src: torch.Tensor, s: int) -> None:
        """Like `_all_gather_flat`, but only rank 0 receives (`out` is None elsewhere)."""
        root = dist.get_global_rank(self.group, 0) if self.group is not None else 0
        if self._nccl:
            dev = torch.device("cuda", torch.cuda.current_device())
            parts = None
            if out is not None:
                parts = [torch.empty(s, dtype=src.dtype, device=dev) for _ in range(self.world)]
            dist.gather(src.to(dev), gather_list=parts, dst=root, group=self.group)
            if out is not None:
                out.copy_(torch.cat(parts))
        else:
            dist.gather(src, gather_list=list(out.split(s)) if out is not None else None, dst=root, group=self.group)

    def _gather_full(self, layer: ShardedHostLayer, parts, *, rank0_only: bool = False):
        """Collective: the full flat tensors (fp32) of the named slab parts, one gather
        (None on ranks other than 0 with `rank0_only`)."""
        n = len(parts)
        src = torch.zeros(n * layer.shard, dtype=torch.float32)
        for i, part in enumerate(parts):
            src[i * layer.shard: i * layer.shard + (layer.hi - layer.lo)].copy_(getattr(layer.slab, part))
        receives = not rank0_only or self.rank == 0
        out = torch.empty(self.world * n * layer.shard, dtype=torch.float32) if receives else None
        if rank0_only:
            self._gather_flat_to_rank0(out, src, n * layer.shard)
        else:
            self._all_gather_flat(out, src, n * layer.shard)
        if out is None:
            return None
        per_rank = out.view(self.world, n, layer.shard)
        return [per_rank[:, i, :].reshape(-1)[: layer.numel].clone() for i in range(n)]

    # ------------------------------------------------------------------ the full model
    def _private_full_master(self) -> bool:
        # fp32 compute with one copy per rank: that copy is a full master replica, usable as
        # the import / export buffer without another full-size allocation.
        return self.compute_dtype == torch.float32 and not self.node_shared

    def _full_master(self, layer: ShardedHostLayer) -> torch.Tensor:
        if self._private_full_master():
            if layer.key in self._stale:
                self.gather_compute_(layer)
            return layer.compute
        full = self._staging.get(layer.key)
        if full is None:
            if self._has_state:
                full = self._gather_full(layer, ("master",))[0]
            else:
                full = torch.zeros(layer.numel, dtype=torch.float32)
            self._staging[layer.key] = full
        return full

    def hf_views(self, *, rank0_only: bool = False) -> dict:
        """HF name -> a view of the full fp32 master (fp32 compute, one copy per rank: the
        compute copy itself; otherwise a gathered private staging copy). Collective.
        Writes into them take effect at `sync_bf16_()`. With `rank0_only` (export) the
        other ranks only send their shards and get {}."""
        out = {}
        for layer in self.layers:
            if rank0_only and self._has_state and not self._private_full_master():
                fulls = self._gather_full(layer, ("master",), rank0_only=True)
                if fulls is None:
                    continue  # not rank 0: it only sent its shard
                full = fulls[0]  # read-only export: no staging kept
            else:
                full = self._full_master(layer)
            out.update(layer.defn.hf_tensors(layer.layout.views(full)))
        return out

    def drop_staging_(self) -> None:
        self._staging.clear()

    def sync_bf16_(self) -> None:
        """Collective: commits the full masters (after an import into `hf_views()`; every
        rank holds the same full model there) to this rank's shards and the compute copies."""
        for layer in self.layers:
            if self._private_full_master():
                full = self._full_master(layer)
            else:
                full = self._staging.get(layer.key)
                if full is None:
                    continue
            layer.slab.master.copy_(full[layer.lo: layer.hi])
            layer.slab.sync_weights_bf16()
            if not self._private_full_master():
                if self.node_shared:
                    layer.compute[layer.lo: layer.hi].copy_(full[layer.lo: layer.hi])
                else:
                    layer.compute[: layer.numel].copy_(full[: layer.numel])
        if self.node_shared:
            dist.barrier(group=self._host_group)
        self._staging.clear()
        self._has_state = True

    # ------------------------------------------------------------------ optimizer state
    def state_tensors(self, *, rank0_only: bool = False) -> dict:
        """Collective: every layer's FULL master / exp_avg / exp_avg_sq (fresh tensors, the
        same on every rank), so a checkpoint does not depend on the number of ranks. With
        `rank0_only` only rank 0 receives them (the others return {}): a checkpoint then
        costs one full copy on the node instead of one per rank."""
        out = {}
        for layer in self.layers:
            parts = ("master", "exp_avg", "exp_avg_sq")
            fulls = self._gather_full(layer, parts, rank0_only=rank0_only)
            if fulls is not None:
                for part, full in zip(parts, fulls):
                    out[f"{layer.key}.{part}"] = full
        if not rank0_only or self.rank == 0:
            out.update(constant_tensors(self.layers))  # replicated on every rank
        return out

    def load_state_tensors_(self, tensors: dict) -> None:
        """Collective (a barrier with the node-shared copy): takes this rank's shard of each
        full tensor (as `state_tensors` returns them, from any number of ranks) and rebuilds
        the compute copies. The sources may be lazy file slices
        (`safe_open(...).get_slice(name)`): then each rank reads only its shard (and, with one
        compute copy per rank, the full master)."""
        want = {f"{layer.key}.{p}": layer.numel for layer in self.layers for p in ("master", "exp_avg", "exp_avg_sq")}
        constants = constant_tensors(self.layers)
        want.update({name: t.numel() for name, t in constants.items()})
        check_state_sources(tensors, want)
        for name, t in constants.items():
            t.view(-1).copy_(read_state_range(tensors[name], 0, t.numel()))
        for layer in self.layers:
            for part in ("master", "exp_avg", "exp_avg_sq"):
                src = tensors[f"{layer.key}.{part}"]
                getattr(layer.slab, part).copy_(read_state_range(src, layer.lo, layer.hi))
            layer.slab.sync_weights_bf16()
            if self.node_shared:
                layer.compute[layer.lo: layer.hi].copy_(layer.slab.master)
            else:
                layer.compute[: layer.numel].copy_(read_state_range(tensors[f"{layer.key}.master"], 0, layer.numel))
        if self.node_shared:
            dist.barrier(group=self._host_group)
        self._stale.clear()
        self._staging.clear()
        self._has_state = True


class DataParallelEngine(LayerMajorEngine):
    """The layer-major engine on one rank of a data-parallel group (see the module doc)."""

    # The node-shared weight copy is refreshed by the ranks' updates: streamed as copies.
    alias_host_weights = False

    def __init__(self, model: ShardedHostModel, device, compute_dtype, **kwargs):
        if not isinstance(model, ShardedHostModel):
            raise HorizonError("DataParallelEngine needs a ShardedHostModel")
        if model.compute_dtype != compute_dtype:
            raise HorizonError(
                f"the model's compute copies are {model.compute_dtype}, the engine computes in {compute_dtype}"
            )
        if model._nccl and torch.device(device).type != "cuda":
            raise HorizonError(f"the NCCL backend needs a CUDA device, got {device}")
        super().__init__(model, device, compute_dtype, **kwargs)
        self.group = model.group
        self.rank = model.rank
        self.world = model.world
        self._pending = None  # (layer, acc, work, norms, hyper-parameters): reduced, not landed

    def weight_source(self, layer: ShardedHostLayer) -> torch.Tensor:
        return layer.compute[: layer.numel]

    def step(self, input_ids: torch.Tensor, labels: torch.Tensor, *args, **kwargs) -> StepResult:
        self._check_same_batch(input_ids, labels, kwargs.get("position_ids"))
        result = super().step(input_ids, labels, *args, **kwargs)
        if not result.skipped:
            self.model.mark_stale_()
        return result

    def _check_same_batch(self, input_ids: torch.Tensor, labels: torch.Tensor, position_ids=None) -> None:
        """One small collective: every rank must pass the same global batch. Feeding each
        rank its own data (the DistributedSampler habit) would otherwise train silently on
        the wrong rows, so it is refused on every rank alike."""
        def digest(x):
            flat = x.reshape(-1).to(torch.int64)
            weights = torch.arange(flat.numel(), dtype=torch.int64) % 1000003 + 1
            return int((flat * weights).sum())  # int64 wraps alike on every rank

        pos = digest(position_ids) if position_ids is not None else -1
        mine = torch.tensor([digest(input_ids), digest(labels), pos, *input_ids.shape], dtype=torch.int64)
        both = torch.cat([mine, -mine])
        # On the host group (Gloo): no device work, no wait for the device.
        dist.all_reduce(both, op=dist.ReduceOp.MAX, group=self.model._host_group)
        hi, neg_lo = both.split(mine.numel())
        if not torch.equal(hi, -neg_lo):
            raise HorizonError(
                "the ranks were given different batches: with horizon's data parallelism every rank passes "
                "the whole global batch (same data, same seed) and trains on its share of it"
            )

    # ------------------------------------------------------------------ the hooks
    def _micro_batch_share(self, n_micro_batches: int) -> tuple:
        return share(n_micro_batches, self.rank, self.world)

    def _sum_across_ranks_(self, tensors: list) -> None:
        flat = torch.cat([t.reshape(-1).to(torch.float32) for t in tensors])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=self.group)
        at = 0
        for t in tensors:
            t.copy_(flat[at: at + t.numel()].view_as(t))
            at += t.numel()

    def _sum_sq_norms(self, sq: torch.Tensor) -> torch.Tensor:
        # Each rank summed the squares of its own shards: the sum over ranks is the square of
        # the full reduced gradient's norm, and the same number on every rank.
        dist.all_reduce(sq, op=dist.ReduceOp.SUM, group=self.group)
        return sq

    def _before_forward_read(self, layer: ShardedHostLayer) -> None:
        self.landing.wait(layer.key)
        if self.model.is_stale(layer.key):
            self.model.gather_compute_(layer)

    def _land(self, layer, acc, norms, **hp) -> int:
        work = dist.all_reduce(acc, op=dist.ReduceOp.SUM, group=self.group, async_op=True)
        prev, self._pending = self._pending, (layer, acc, work, norms, hp)
        # This accumulator outlives the schedule's "layer-acc" by one layer (until it lands),
        # which is when the previous one is still alive next to the current: the blocks' are
        # all one size, so counting this one from now on counts that pair exactly.
        self.device_ledger.hold("reducing-acc", tensor_bytes(acc))
        if prev is not None:
            self._land_reduced(*prev)
        return 0

    def _flush_landings(self) -> None:
        prev, self._pending = self._pending, None
        if prev is not None:
            self._land_reduced(*prev)
        self.device_ledger.drop("reducing-acc")

    def _abort_landings(self) -> None:
        prev, self._pending = self._pending, None
        self.device_ledger.drop("reducing-acc")
        if prev is not None:
            try:
                prev[2].wait()
            except Exception:  # noqa: BLE001 - already unwinding from the first error
                pass

    def _land_reduced(self, layer: ShardedHostLayer, acc, work, norms, hp) -> None:
        work.wait()
        self.layer_landings[layer.key] = self.layer_landings.get(layer.key, 0) + 1
        shard = acc.narrow(0, layer.lo, layer.hi - layer.lo)
        # The finiteness of the whole reduced (identical) layer gradient, so every rank's
        # verdict on the step is the same.
        self._finite.append(kernels.all_finite_tensor(acc))
        if self.grad_clip is not None or self.track_grad_norm:
            norms.append(kernels.grad_sq_norm(shard) if shard.numel() else torch.zeros((), device=acc.device))
        if layer.hi == layer.lo:
            return  # a layer smaller than one shard per rank: nothing of it lives here
        self.landing.land_to_buffer(layer.key, shard, layer.slab)
