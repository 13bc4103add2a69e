"""`horizon.Trainer`: the user-facing training object. It owns the model's host home
(`HostModel`), the layer-major engine, the optimizer hyper-parameters and the counters;
HF import/export goes through `horizon.io.hf`."""

from __future__ import annotations

import math

import torch

from .errors import HorizonError

_DTYPES = {
    "float32": torch.float32, "fp32": torch.float32, "torch.float32": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "torch.bfloat16": torch.bfloat16,
}


def _resolve_device(device) -> torch.device:
    if device is None or device == "auto":
        return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise HorizonError(f"device must be 'auto', 'cpu' or 'cuda[:i]', got {device!r}") from e
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise HorizonError(f"device {device!r} asked for, but there is no CUDA GPU")
        return torch.device("cuda", dev.index if dev.index is not None else torch.cuda.current_device())
    if dev.type != "cpu":
        raise HorizonError(f"device must be 'auto', 'cpu' or 'cuda[:i]', got {device!r}")
    return dev


def _resolve_dtype(dtype, device: torch.device) -> torch.dtype:
    if dtype is None:
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if isinstance(dtype, torch.dtype):
        resolved = dtype
    elif isinstance(dtype, str) and dtype.lower() in _DTYPES:
        resolved = _DTYPES[dtype.lower()]
    else:
        raise HorizonError(f"compute_dtype must be float32 or bfloat16, got {dtype!r}")
    if resolved not in (torch.float32, torch.bfloat16):
        raise HorizonError(f"compute_dtype must be float32 or bfloat16, got {dtype!r}")
    return resolved


def _check_number(name, value, *, low=None, low_open=False, high=None, high_open=False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise HorizonError(f"{name} must be a finite number, got {value!r}")
    if low is not None and (value <= low if low_open else value < low):
        raise HorizonError(f"{name} must be {'>' if low_open else '>='} {low}, got {value!r}")
    if high is not None and (value >= high if high_open else value > high):
        raise HorizonError(f"{name} must be {'<' if high_open else '<='} {high}, got {value!r}")
    return float(value)


class Trainer:
    """Trains a Llama-family model whose home is host RAM (fp32 master + AdamW state in
    Rust-owned slabs); the device streams layers in and gradients out, one layer at a time.

    Build with `Trainer.from_pretrained(dir)` or `Trainer.from_config(config_dict)`. Inside an
    initialised torch.distributed process group it trains data parallel, with the optimizer
    state sharded across the ranks (`data_parallel`; docs/distributed.md).
    """

    def __init__(self, spec, *, device="auto", compute_dtype=None, lr=1e-4, weight_decay=0.0,
                 betas=(0.9, 0.999), eps=1e-8, grad_clip=None, micro_batch_size=None,
                 track_grad_norm=True, n_slots=2, offload_checkpoints=None, data_parallel=None, model_path=None,
                 _init=None):
        from . import distributed as hdist
        from .engine import HostModel, LayerMajorEngine
        from .models import resolve
        from .models.hf.select import check_model_path, model_path_of

        # `spec` may be a config dict, read by the one reader train and plan share ("auto":
        # native when it implements the config, else the hf path).
        if isinstance(spec, dict):
            spec = resolve(spec, check_model_path(model_path))
        elif model_path not in (None, "auto") and check_model_path(model_path) != model_path_of(spec):
            raise HorizonError(f"model_path {model_path!r} asked for, but the spec is of the "
                               f"{model_path_of(spec)!r} path")

        self.device = _resolve_device(device)
        self.compute_dtype = _resolve_dtype(compute_dtype, self.device)
        self.lr = _check_number("lr", lr, low=0.0)
        self.weight_decay = _check_number("weight_decay", weight_decay, low=0.0)
        if not isinstance(betas, (tuple, list)) or len(betas) != 2:
            raise HorizonError(f"betas must be a pair (beta1, beta2), got {betas!r}")
        self.betas = (
            _check_number("betas[0]", betas[0], low=0.0, high=1.0, high_open=True),
            _check_number("betas[1]", betas[1], low=0.0, high=1.0, high_open=True),
        )
        self.eps = _check_number("eps", eps, low=0.0, low_open=True)
        self.grad_clip = None if grad_clip is None else _check_number("grad_clip", grad_clip, low=0.0, low_open=True)
        if micro_batch_size is not None and (
            isinstance(micro_batch_size, bool) or not isinstance(micro_batch_size, int) or micro_batch_size <= 0
        ):
            raise HorizonError(f"micro_batch_size must be a positive int or None, got {micro_batch_size!r}")
        self.micro_batch_size = micro_batch_size
        if isinstance(n_slots, bool) or not isinstance(n_slots, int) or n_slots < 2:
            raise HorizonError(f"n_slots must be an int >= 2, got {n_slots!r}")
        if offload_checkpoints not in (None, True, False):
            raise HorizonError(f"offload_checkpoints must be None, True or False, got {offload_checkpoints!r}")

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
        with_grad, pin = self.grad_clip is not None, self.device.type == "cuda"
        engine_kwargs = dict(grad_clip=self.grad_clip, track_grad_norm=bool(track_grad_norm), n_slots=n_slots,
                             offload_checkpoints=offload_checkpoints)
        if self.data_parallel:
            # docs/distributed.md: each rank holds its shard of the optimizer state.
            from .engine.distributed import DataParallelEngine, ShardedHostModel

            if hdist.backend() == "nccl" and self.device.type != "cuda":
                raise HorizonError(f"the process group uses NCCL, which needs a CUDA device; got device {device!r}")
            self.model = ShardedHostModel(spec, with_grad=with_grad, pin=pin, compute_dtype=self.compute_dtype)
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
        self._tokens = 0

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_pretrained(cls, model_dir, *, device="auto", compute_dtype=None, lr=1e-4, weight_decay=0.0,
                        betas=(0.9, 0.999), eps=1e-8, grad_clip=None, micro_batch_size=None, model_path="auto",
                        **engine_kwargs):
        """Loads a local HF model directory (config.json + *.safetensors); never the network.
        `model_path`: "auto" (native when it implements the config, else hf), "native" or "hf"."""
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

        return cls(spec, device=device, compute_dtype=compute_dtype, lr=lr, weight_decay=weight_decay, betas=betas,
                   eps=eps, grad_clip=grad_clip, micro_batch_size=micro_batch_size, _init=load, **engine_kwargs)

    @classmethod
    def from_config(cls, config: dict, *, seed: int = 0, device="auto", compute_dtype=None, lr=1e-4,
                    weight_decay=0.0, betas=(0.9, 0.999), eps=1e-8, grad_clip=None, micro_batch_size=None,
                    model_path="auto", **engine_kwargs):
        """A randomly initialised model (HF's scheme: N(0, initializer_range), norms 1, biases 0;
        on the hf path the model's own `_init_weights`)."""
        from .models import resolve

        spec = resolve(config, model_path)
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise HorizonError(f"seed must be an int, got {seed!r}")
        return cls(spec, device=device, compute_dtype=compute_dtype, lr=lr, weight_decay=weight_decay, betas=betas,
                   eps=eps, grad_clip=grad_clip, micro_batch_size=micro_batch_size,
                   _init=lambda model: model.init_random_(seed), **engine_kwargs)

    # ------------------------------------------------------------------ training
    def _check_batch(self, input_ids, labels):
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
        window = self.spec.sliding_window
        if window is not None and seq > window:
            raise HorizonError(f"sequence length {seq} exceeds the model's sliding window {window} (not supported)")
        return ids, lab

    def train_step(self, input_ids, labels=None) -> float:
        """One optimizer step on the whole batch `input_ids` [N, T] (split into micro-batches
        of `micro_batch_size` rows). Labels default to input_ids (HF convention: shifted
        inside, -100 ignored). Returns the mean loss over the step's label tokens; a step
        whose loss (or, with clipping, gradient norm) is not finite changes nothing and sets
        `last_step_skipped`."""
        ids, lab = self._check_batch(input_ids, labels)
        mbs = self.micro_batch_size or ids.shape[0]
        result = self.engine.step(ids, lab, mbs, step=self.step + 1, lr=self.lr, betas=self.betas, eps=self.eps,
                                  weight_decay=self.weight_decay)
        self.last_loss = result.loss
        self.last_grad_norm = result.grad_norm
        self.last_step_skipped = result.skipped
        self._tokens += result.tokens
        if result.skipped:
            self._skipped_steps += 1
        else:
            self.step += 1

        return result.loss

    def set_lr(self, lr) -> None:
        self.lr = _check_number("lr", lr, low=0.0)

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
            # Counted by the Rust workers as they run: wait for the queued updates first.
            "skipped_layer_updates": self._landed_skips(),
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
        self.engine.wait_all()
        self.model.load_state_tensors_(tensors)

    def save_pretrained(self, model_dir, *, dtype=torch.float32, max_shard_bytes: int = 4 << 30) -> None:
        """Writes config.json + safetensors that `transformers` loads (fp32 by default)."""
        from .io import hf

        if isinstance(dtype, str):
            dtype = _DTYPES.get(dtype.lower(), dtype)
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
