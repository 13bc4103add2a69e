"""`horizon.Trainer`: the user-facing training object. It owns the model's host home
(`HostModel`), the layer-major engine, the optimizer hyper-parameters and the counters;
HF import/export goes through `horizon.io.hf`."""

from __future__ import annotations

import torch

from .errors import HorizonError

_UNSET = object()


def _configs(optim, engine, kw: dict):
    """The trainer's optimizer and engine configs: `optim` / `engine` (defaults when None) with
    the keyword arguments given (torch-style `betas`) applied on top; validated once, there."""
    from dataclasses import replace

    from .engine.config import EngineConfig
    from .optim import OptimizerConfig
    from .options import ConfigError, flag

    optim = optim if optim is not None else OptimizerConfig()
    engine = engine if engine is not None else EngineConfig()
    betas = kw.pop("betas", _UNSET)
    if betas is not _UNSET:
        if not isinstance(betas, (tuple, list)) or len(betas) != 2:
            raise HorizonError(f"betas must be a pair (beta1, beta2), got {betas!r}")
        kw["beta1"], kw["beta2"] = betas
    o = {k: v for k, v in kw.items() if k in OptimizerConfig.__dataclass_fields__ and v is not _UNSET}
    e = {k: v for k, v in kw.items() if k in EngineConfig.__dataclass_fields__ and v is not _UNSET}
    try:
        return replace(optim, **o), replace(engine, **e)
    except ConfigError as err:
        # The same rule as the command line's, named as this API spells the argument.
        name = err.option or ""
        shown = {"beta1": "betas[0]", "beta2": "betas[1]"}.get(name, name) if betas is not _UNSET else name
        raise ConfigError(str(err).replace(flag(name), shown), err.option) from None


def _hyper(make, *args):
    """AdamW hyper-parameters from `make` (`_native.AdamW` or `with_lr`, the one rule); a bad
    value is reported as the Trainer reports bad arguments: a HorizonError, AdamW's one line."""
    try:
        return make(*args)
    except ValueError as e:
        raise HorizonError(str(e)) from None


class Trainer:
    """Trains a Llama-family model whose home is host RAM (fp32 master + AdamW state in
    Rust-owned slabs); the device streams layers in and gradients out, one layer at a time.

    Build with `Trainer.from_pretrained(dir)` or `Trainer.from_config(config_dict)`. Inside an
    initialised torch.distributed process group it trains data parallel, with the optimizer
    state sharded across the ranks (`data_parallel`; docs/distributed.md).
    """

    def __init__(self, spec, *, optim=None, engine=None, device=_UNSET, compute_dtype=_UNSET, lr=_UNSET,
                 weight_decay=_UNSET, betas=_UNSET, eps=_UNSET, grad_clip=_UNSET, micro_batch_size=_UNSET,
                 track_grad_norm=_UNSET, n_slots=_UNSET, offload_checkpoints=_UNSET, offload_dir=_UNSET,
                 activation_memory=_UNSET,
                 data_parallel=None, model_path=None, _init=None):
        """`optim` (OptimizerConfig) and `engine` (EngineConfig) give the options whole; the
        keyword arguments override single fields (defaults: those of the configs, the same as
        `horizon train`'s). `spec`: a ModelSpec / hf-path spec, or a config.json dict read with
        `model_path` ("auto": native when it implements the config, else the hf path)."""
        from . import distributed as hdist
        from .engine import HostModel, LayerMajorEngine
        from .engine.config import resolve_device, resolve_dtype
        from .models import resolve
        from .models.hf.select import check_model_path, model_path_of

        if isinstance(spec, dict):
            spec = resolve(spec, check_model_path(model_path))
        elif model_path not in (None, "auto") and check_model_path(model_path) != model_path_of(spec):
            raise HorizonError(f"model_path {model_path!r} asked for, but the spec is of the "
                               f"{model_path_of(spec)!r} path")

        self.optim_config, self.engine_config = _configs(optim, engine, dict(
            device=device, compute_dtype=compute_dtype, lr=lr, weight_decay=weight_decay, betas=betas, eps=eps,
            grad_clip=grad_clip, micro_batch_size=micro_batch_size, track_grad_norm=track_grad_norm,
            n_slots=n_slots, offload_checkpoints=offload_checkpoints, offload_dir=offload_dir,
            activation_memory=activation_memory))
        oc, ec = self.optim_config, self.engine_config
        self.device = resolve_device(ec.device)
        self.compute_dtype = resolve_dtype(ec.compute_dtype, self.device)
        self.adamw = oc.adamw()  # the one AdamW hyper-parameter object, carried whole to the Rust workers
        self.grad_clip = oc.grad_clip
        self.micro_batch_size = ec.micro_batch_size

        if data_parallel not in (None, True, False):
            raise HorizonError(f"data_parallel must be None (auto), True or False, got {data_parallel!r}")
        if data_parallel is None:  # auto: data parallel inside an initialised process group
            data_parallel = hdist.is_initialized()
        if data_parallel and not hdist.is_initialized():
            raise HorizonError("data_parallel=True needs an initialised torch.distributed process group "
                               "(call horizon.distributed.init_from_env() under torchrun)")
        self.data_parallel = bool(data_parallel)
        self.rank = hdist.rank() if self.data_parallel else 0
        self.world_size = hdist.world_size() if self.data_parallel else 1

        self.spec = spec
        # Every step's gradients land in the slabs' buffers, so a step is updated all or nothing.
        with_grad, pin = True, self.device.type == "cuda"
        engine_kwargs = dict(grad_clip=self.grad_clip, track_grad_norm=ec.track_grad_norm, n_slots=ec.n_slots,
                             offload_checkpoints=ec.offload_checkpoints,
                             activation_memory=ec.activation_budget())
        if self.data_parallel:
            # docs/distributed.md: each rank holds its shard of the optimizer state.
            from .engine.distributed import DataParallelEngine, ShardedHostModel

            if ec.offload_dir is not None:
                raise HorizonError("offload_dir (the disk tier) does not run data parallel yet")
            if hdist.backend() == "nccl" and self.device.type != "cuda":
                raise HorizonError(f"the process group uses NCCL, which needs a CUDA device; got device {device!r}")
            self.model = ShardedHostModel(spec, with_grad=with_grad, pin=pin, compute_dtype=self.compute_dtype)
        elif ec.offload_dir is not None:
            # docs/engine.md "The disk tier": master and Adam state in files under offload_dir.
            from .engine.offload import TieredHostModel

            self.model = TieredHostModel(spec, ec.offload_dir, with_grad=with_grad, pin=pin,
                                         compute_dtype=self.compute_dtype)
        else:
            self.model = HostModel(spec, with_grad=with_grad, pin=pin)
        if _init is not None:
            _init(self.model)
        self.model.sync_bf16_()
        engine_cls = DataParallelEngine if self.data_parallel else LayerMajorEngine
        self.engine = engine_cls(self.model, self.device, self.compute_dtype, **engine_kwargs)
        self.step = 0
        self.last_grad_norm = None
        self.last_loss = None
        self.last_step_skipped = False
        self._skipped_steps = 0
        self._skipped_layers = 0
        self._tokens = 0

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_pretrained(cls, model_dir, *, model_path="auto", **kwargs):
        """Loads a local HF model directory (config.json + *.safetensors); never the network.
        `model_path`: "auto" (native when it implements the config, else hf), "native" or "hf";
        other keyword arguments: those of the constructor."""
        from .io import hf
        from .models import resolve

        cfg = hf.read_config(model_dir)
        spec = resolve(cfg, model_path)
        ignore = ()
        if getattr(spec, "model_path", "native") == "hf":
            extra = spec.optional_checkpoint_tensors()
            ignore = spec.ignored_checkpoint_patterns()
        else:
            extra = {"lm_head.weight": (spec.vocab_size, spec.hidden_size)} if spec.tie_word_embeddings else {}
        optional = tuple(extra)

        def load(model):
            dests = model.hf_views()
            # A tied checkpoint may still carry lm_head.weight; it is the embedding.
            dests.update({name: torch.empty(shape) for name, shape in extra.items()})
            hf.load_tensors(model_dir, dests, optional=optional, ignore=ignore)

        return cls(spec, _init=load, **kwargs)

    @classmethod
    def from_config(cls, config: dict, *, seed: int = 0, model_path="auto", **kwargs):
        """A randomly initialised model (HF's scheme: N(0, initializer_range), norms 1, biases 0;
        on the hf path the model's own `_init_weights`). Keyword arguments: those of the
        constructor."""
        from .models import resolve
        from .options import check_value

        spec = resolve(config, model_path)
        seed = check_value("seed", seed, "int", False, {"ge": 0, "le": 2**63 - 1})
        return cls(spec, _init=lambda model: model.init_random_(seed), **kwargs)

    # ------------------------------------------------------------------ training
    def _check_batch(self, input_ids, labels, position_ids=None):
        def as_ids(x, what):
            if not isinstance(x, torch.Tensor):
                try:
                    x = torch.as_tensor(x)
                except (TypeError, ValueError, RuntimeError) as e:
                    raise HorizonError(f"{what} must be a 2-D integer tensor [batch, seq]: {e}") from e
            if x.dim() != 2 or x.is_floating_point() or x.is_complex() or x.dtype == torch.bool:
                raise HorizonError(f"{what} must be a 2-D integer tensor [batch, seq], got {x.dtype} {tuple(x.shape)}")
            if x.shape[0] == 0 or x.shape[1] == 0:
                raise HorizonError(f"{what} is empty: shape {tuple(x.shape)}")
            if x.device.type == "meta":
                raise HorizonError(f"{what} is on the meta device (shapes only, no values)")
            return x.detach().to("cpu", torch.int64)

        ids = as_ids(input_ids, "input_ids")
        v = self.spec.vocab_size
        lo, hi = int(ids.min()), int(ids.max())
        if lo < 0 or hi >= v:
            raise HorizonError(f"input_ids hold token {lo if lo < 0 else hi}, outside the vocabulary [0, {v})")
        if labels is None:
            lab = ids
        else:
            lab = as_ids(labels, "labels")
            if lab.shape != ids.shape:
                raise HorizonError(f"labels shape {tuple(lab.shape)} != input_ids shape {tuple(ids.shape)}")
            bad = (lab != -100) & ((lab < 0) | (lab >= v))
            if bool(bad.any()):
                raise HorizonError(f"labels hold {int(lab[bad][0])}, neither -100 nor in [0, {v})")
        seq = ids.shape[1]
        if seq > self.spec.max_positions:
            raise HorizonError(f"sequence length {seq} exceeds the model's max_position_embeddings "
                               f"{self.spec.max_positions}")
        pos = None
        if position_ids is not None:
            from .models import check_position_ids

            pos = check_position_ids(position_ids, ids.shape)
        return ids, lab, pos

    def train_step(self, input_ids, labels=None, *, position_ids=None) -> float:
        """One optimizer step on the whole batch `input_ids` [N, T] (split into micro-batches
        of `micro_batch_size` rows). Labels default to input_ids (HF convention: shifted
        inside, -100 ignored). Returns the mean loss over the step's label tokens; a step
        whose loss (or, with clipping, gradient norm) is not finite changes nothing and sets
        `last_step_skipped`.

        `position_ids` [N, T]: packed documents in the padding-free convention (ids count 0, 1,
        2, ... within a document, 0 starts the next one; every row starts at 0). Each document
        then attends only to itself, takes the rotary embedding at its own positions, and its
        first token is no label of the document before it: a packed row trains as its
        documents would one by one (`horizon.models.positions`). None: one document per row."""
        ids, lab, pos = self._check_batch(input_ids, labels, position_ids)
        mbs = self.micro_batch_size or ids.shape[0]
        result = self.engine.step(ids, lab, mbs, step=self.step + 1, hyper=self.adamw, position_ids=pos)
        self.last_loss = result.loss
        self.last_grad_norm = result.grad_norm
        self.last_step_skipped = result.skipped
        self._skipped_layers += result.skipped_layer_updates
        self._tokens += result.tokens
        if result.skipped:
            self._skipped_steps += 1
        else:
            self.step += 1

        return result.loss

    def evaluate(self, batches) -> float:
        """The mean loss over every label token of `batches`, an iterable of `input_ids`,
        `(input_ids, labels)`, `(input_ids, labels, position_ids)` or `horizon.data.Batch`; forward only (each
        layer's weights stream in once per batch), nothing changes. NaN when there are no
        label tokens."""
        if isinstance(batches, torch.Tensor):
            batches = [batches]
        total, count = 0.0, 0
        for batch in batches:
            parts = (batch,) if isinstance(batch, torch.Tensor) else tuple(batch)  # also data.Batch
            ids, labels, pos = (parts + (None, None))[:3]
            ids, lab, pos = self._check_batch(ids, labels, pos)
            s, n = self.engine.evaluate(ids, lab, self.micro_batch_size or ids.shape[0], position_ids=pos)
            total, count = total + s, count + n
        return total / count if count else float("nan")

    def set_lr(self, lr) -> None:
        """The learning rate of the next steps (a schedule may reach 0)."""
        self.adamw = _hyper(self.adamw.with_lr, lr)

    def _landed_skips(self) -> int:
        self.engine.wait_all()
        return self.engine.landing.skipped_updates

    def synchronize(self) -> None:
        """Waits for every queued optimizer update (the slabs are then current). Data
        parallel: collective (every rank calls it), and it refreshes the full compute copies."""
        self.engine.wait_all()
        if self.data_parallel:
            self.model.refresh_()

    # ------------------------------------------------------------------ state
    @property
    def config(self) -> dict:
        return self.spec.hf_config()

    @property
    def num_parameters(self) -> int:
        return self.model.num_parameters

    @property
    def optimizer_state_bytes(self) -> int:
        """Bytes of fp32 master + exp_avg + exp_avg_sq this process holds (its shard when
        data parallel; alignment padding inside a layer counted, page rounding not)."""
        return sum(3 * 4 * layer.slab.numel for layer in self.model.layers)

    @property
    def stats(self) -> dict:
        e = self.engine
        return {
            "steps": self.step,
            "tokens": self._tokens,
            "weight_bytes_h2d": e.stream.bytes_h2d,
            "grad_bytes_d2h": e.landing.bytes_d2h,
            "peak_host_bytes": e.peak_host_bytes(),
            "peak_device_bytes": e.peak_device_bytes(),
            "exposed_optimizer_seconds": e.exposed_optimizer_seconds,
            "exposed_weight_stream_seconds": float(getattr(e.stream, "wait_seconds", 0.0)),
            "skipped_steps": self._skipped_steps,
            # Device -> host reads that wait for the device: one per step by design.
            "host_syncs": e.host_syncs,
            "landing_slots": e.landing.n_slots,
            # The activation budget, last step: block micro-batches kept from the forward and
            # recomputed, the kept bytes at their peak, the matmul FLOPs, activation bytes moved
            # between device and host (offloaded checkpoints).
            **e.activation_stats(),
            # Layer updates a step skipped for a non-finite gradient (the whole step's), plus any
            # the Rust workers skipped as they ran (wait for the queued updates first).
            "skipped_layer_updates": self._landed_skips() + self._skipped_layers,
            **(self.model.tier_stats() if hasattr(self.model, "tier_stats") else {}),  # disk_* of the disk tier
        }

    def state_tensors(self, *, rank0_only: bool = False) -> dict:
        """Every master / exp_avg / exp_avg_sq flat buffer by name (views, not copies).
        Data parallel: collective; the FULL tensors gathered from the shards (copies, the same
        on every rank), so a checkpoint from N ranks resumes on M. `rank0_only`: only rank 0
        gathers them (the other ranks get {}), which is all a checkpoint writer needs."""
        if rank0_only not in (True, False):
            raise HorizonError(f"rank0_only must be True or False, got {rank0_only!r}")
        self.engine.wait_all()
        if self.data_parallel:
            return self.model.state_tensors(rank0_only=rank0_only)
        return self.model.state_tensors()

    def load_state_tensors(self, tensors: dict) -> None:
        """Loads full flat tensors as `state_tensors` returns them, or lazy file slices
        (`safetensors.safe_open(...).get_slice(name)`). Data parallel: each rank keeps (and,
        from slices, reads) only its shard; collective."""
        if isinstance(tensors, dict):
            for name, src in tensors.items():
                dt = src.dtype if isinstance(src, torch.Tensor) else getattr(src, "get_dtype", lambda: None)()
                if dt not in (torch.float32, "F32", None):
                    raise HorizonError(f"state tensor {name!r} is {dt}, not float32: the optimizer state is "
                                       "loaded as saved, never converted")
        self.engine.wait_all()
        self.model.load_state_tensors_(tensors)

    def save_pretrained(self, model_dir, *, dtype=torch.float32, max_shard_bytes: int = 4 << 30) -> None:
        """Writes config.json + safetensors that `transformers` loads (fp32 by default)."""
        from .io import hf

        if isinstance(dtype, str):
            from .engine.config import DTYPES, dtype_name

            dtype = DTYPES.get(dtype_name(dtype), dtype)
        self.synchronize()
        if not self.data_parallel:
            hf.save(model_dir, self.config, self.model.hf_views(), dtype=dtype, max_shard_bytes=max_shard_bytes)
            return
        from . import distributed as hdist

        # Collective: gathered on rank 0 (the writer) only.
        tensors = self.model.hf_views(rank0_only=True)
        failure = None
        try:
            if self.rank == 0:
                hf.save(model_dir, self.config, tensors, dtype=dtype, max_shard_bytes=max_shard_bytes)
        except Exception as e:  # noqa: BLE001 - re-raised below, after the other ranks know
            failure = e
        finally:
            del tensors
            self.model.drop_staging_()
        # Every rank returns once the files exist, or raises when rank 0 could not write them
        # (instead of waiting for it forever).
        if hdist.any_rank(failure is not None):
            if failure is not None:
                raise failure
            raise HorizonError(f"save_pretrained({str(model_dir)!r}) failed on rank 0")
