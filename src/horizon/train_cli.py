"""`horizon train` and `horizon export`: the training run as a product.

A run directory (`--out`) holds `metrics.jsonl` (one JSON object per step), `loss.png`,
`train_config.json` (the options of the run, the base of a `--resume`), `model_config.json`,
`tokenizer.json` (a copy, so the run is self-contained), `data-cache/` (token caches when the
data's own directory is not writable) and `checkpoints/`.
"""

from __future__ import annotations

import base64
import json
import math
import os
import shutil
import signal
import sys
import time
from pathlib import Path

from . import plan as planmod
from . import presets
from .config import TrainConfig
from .errors import HorizonError
from .io import checkpoint as ckpt

EXIT_SIGNAL = {signal.SIGINT: 130, signal.SIGTERM: 143}


# --------------------------------------------------------------------------- the model
class ModelSource:
    """Where the model comes from: a preset (random init) or a HF directory (weights)."""

    def __init__(self, config: dict, model_dir: Path | None, tokenizer: Path | None, name: str):
        self.config, self.model_dir, self.tokenizer, self.name = config, model_dir, tokenizer, name


def read_model_dir(path) -> ModelSource:
    d = Path(path).expanduser()
    if not d.exists():
        raise HorizonError(f"model directory {str(path)!r} does not exist")
    if not d.is_dir():
        raise HorizonError(f"model directory {str(path)!r} is not a directory")
    cfg_path = d / "config.json"
    try:
        config = json.loads(cfg_path.read_text())
    except FileNotFoundError:
        raise HorizonError(f"model directory {str(path)!r} has no config.json") from None
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise HorizonError(f"model directory {str(path)!r}: config.json is unreadable or not JSON ({e})") from None
    if not isinstance(config, dict):
        raise HorizonError(f"model directory {str(path)!r}: config.json is not a JSON object")
    planmod.model_shape(config)  # unknown architecture or missing sizes: one clear line
    if not any(d.glob("*.safetensors")):
        raise HorizonError(f"model directory {str(path)!r} has no *.safetensors weights")
    tok = d / "tokenizer.json"
    return ModelSource(config, d, tok if tok.is_file() else None, str(d))


def resolve_model(c: TrainConfig) -> ModelSource:
    from .data import shipped_tokenizer_path

    if c.model_dir is not None:
        src = read_model_dir(c.model_dir)
    else:
        name = c.preset or "tiny"
        cfg = presets.get(name)
        planmod.model_shape(cfg)
        src = ModelSource(cfg, None, shipped_tokenizer_path() if name in presets.USES_SHIPPED_TOKENIZER else None,
                          f"preset {name}")
    if c.tokenizer is not None:
        src.tokenizer = Path(c.tokenizer).expanduser()
    return src


# --------------------------------------------------------------------------- progress
def _fmt_time(s: float) -> str:
    if not math.isfinite(s) or s < 0:
        return "?"
    s = int(s + 0.5)
    h, rem = divmod(s, 3600)
    m, sec = divmod(rem, 60)
    return f"{h}:{m:02d}:{sec:02d}" if h else f"{m}:{sec:02d}"


def _fmt_rate(x: float) -> str:
    return f"{x / 1e3:.1f}k" if x >= 1e3 else f"{x:.0f}"


class Progress:
    """A one-line progress bar redrawn with `\\r` on a terminal; plain lines every `every` steps
    (and at the last) otherwise."""

    def __init__(self, total: int, start: int, stream, every: int):
        self.total, self.start, self.stream, self.every = total, start, stream, every
        self.tty = hasattr(stream, "isatty") and stream.isatty()
        self.t0 = time.perf_counter()
        self.drawn = False
        self.width = 0

    def update(self, step: int, loss: float, tok_s: float) -> None:
        done = step - self.start
        elapsed = time.perf_counter() - self.t0
        eta = elapsed / done * (self.total - step) if done > 0 else float("nan")
        loss_s = f"{loss:.4f}" if math.isfinite(loss) else "nan"
        if self.tty:
            width = 24
            fill = int(width * step / self.total)
            bar = "#" * fill + "." * (width - fill)
            line = f"[{bar}] {step}/{self.total} loss {loss_s} | {_fmt_rate(tok_s)} tok/s | ETA {_fmt_time(eta)}"
            # Pad over the previous line's tail when this one is shorter.
            self.stream.write("\r" + line.ljust(self.width))
            self.width = len(line)
            self.stream.flush()
            self.drawn = True
        elif step % self.every == 0 or step == self.total or done == 1:
            self.stream.write(f"step {step}/{self.total} loss {loss_s} {_fmt_rate(tok_s)} tok/s ETA {_fmt_time(eta)}\n")
            self.stream.flush()

    def close(self) -> None:
        if self.tty and self.drawn:
            self.stream.write("\n")
            self.stream.flush()
            self.drawn = False


# --------------------------------------------------------------------------- metrics & plot
def _finite_or_none(x):
    if x is None:
        return None
    x = float(x)
    return x if math.isfinite(x) else None


def read_metrics(path: Path) -> list[dict]:
    out = []
    try:
        with open(path) as f:
            for line in f:
                line = line.strip()
                if line:
                    try:
                        out.append(json.loads(line))
                    except ValueError:
                        break  # a torn last line after a crash
    except FileNotFoundError:
        pass
    return out


def write_plot(run_dir: Path, rows: list[dict]) -> None:
    pts = [(r["step"], r["loss"]) for r in rows if r.get("loss") is not None]
    if not pts:
        return
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    xs, ys = zip(*pts)
    ax.plot(xs, ys, lw=1.2)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.set_title(f"{run_dir.name}: loss {ys[0]:.3f} -> {ys[-1]:.3f}")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    tmp = run_dir / ".loss.png.tmp"
    fig.savefig(tmp, format="png")
    plt.close(fig)
    os.replace(tmp, run_dir / "loss.png")


# --------------------------------------------------------------------------- RNG state
def _rng_state() -> dict:
    import random

    import numpy as np
    import torch

    st = {
        "torch_cpu": base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode(),
        "python": repr(random.getstate()),
    }
    name, key, pos, has_gauss, gauss = np.random.get_state(legacy=True)
    st["numpy"] = {"name": name, "key": base64.b64encode(np.asarray(key, dtype=np.uint32).tobytes()).decode(),
                   "pos": int(pos), "has_gauss": int(has_gauss), "gauss": float(gauss)}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        st["torch_cuda"] = [base64.b64encode(s.numpy().tobytes()).decode() for s in torch.cuda.get_rng_state_all()]
    return st


def _set_rng_state(st: dict) -> None:
    import ast
    import random

    import numpy as np
    import torch

    if "torch_cpu" in st:
        raw = np.frombuffer(base64.b64decode(st["torch_cpu"]), dtype=np.uint8).copy()
        torch.set_rng_state(torch.from_numpy(raw))
    if "python" in st:
        random.setstate(ast.literal_eval(st["python"]))
    if "numpy" in st:
        n = st["numpy"]
        key = np.frombuffer(base64.b64decode(n["key"]), dtype=np.uint32).copy()
        np.random.set_state((n["name"], key, n["pos"], n["has_gauss"], n["gauss"]))
    if "torch_cuda" in st and torch.cuda.is_available():
        states = [torch.from_numpy(np.frombuffer(base64.b64decode(s), dtype=np.uint8).copy()) for s in st["torch_cuda"]]
        if len(states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(states)


def _seed_everything(seed: int) -> None:
    import random

    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


# --------------------------------------------------------------------------- signals
class StopFlag:
    """SIGINT/SIGTERM ask the loop to stop after the step in flight; a second SIGINT aborts."""

    def __init__(self):
        self.signum = None
        self._old = {}

    def _handler(self, signum, frame):
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum

    def __enter__(self):
        for s in (signal.SIGINT, signal.SIGTERM):
            try:
                self._old[s] = signal.signal(s, self._handler)
            except ValueError:  # not the main thread: leave signals alone
                pass
        return self

    def __exit__(self, *exc):
        for s, h in self._old.items():
            signal.signal(s, h)
        return False


# --------------------------------------------------------------------------- train
def _default_out() -> Path:
    return Path("runs") / time.strftime("%Y%m%d-%H%M%S")


def _write_json_atomic(path: Path, obj) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=1, sort_keys=True))
    os.replace(tmp, path)


def _make_trainer(src: ModelSource, c: TrainConfig, factory=None):
    import horizon

    Trainer = factory or horizon.Trainer
    kw = dict(device=c.device, compute_dtype=c.compute_dtype, lr=c.lr_at(0), weight_decay=c.weight_decay,
              betas=(c.beta1, c.beta2), eps=c.eps, grad_clip=c.grad_clip, micro_batch_size=c.micro_batch_size)
    try:
        if src.model_dir is not None:
            return Trainer.from_pretrained(str(src.model_dir), **kw)
        return Trainer.from_config(src.config, seed=c.seed, **kw)
    except NotImplementedError as e:
        arch = (src.config.get("architectures") or ["?"])[0]
        raise HorizonError(f"{arch} is not supported by the trainer yet: {e}") from None


def train(c: TrainConfig, *, out=None, err=None, trainer_factory=None) -> int:
    """Runs `horizon train` with validated options. Returns the exit code; raises HorizonError
    (or ValueError / OSError) for bad input, which the CLI prints as one line.

    Under torchrun (WORLD_SIZE > 1) every rank runs this same loop on the same global batches
    (the trainer takes each rank's share); rank 0 alone writes the run directory."""
    from . import distributed as dp

    rank, world = dp.init_from_env()
    try:
        return _train(c, out=out, err=err, trainer_factory=trainer_factory, rank=rank, world=world)
    finally:
        dp.shutdown()


def _train(c: TrainConfig, *, out, err, trainer_factory, rank: int, world: int) -> int:
    from . import distributed as dp
    from .data import TextTokenizer, eos_from_config, load_dataset

    writer = rank == 0  # metrics, plots, checkpoints and messages come from rank 0 only
    out = (out or sys.stdout) if writer else open(os.devnull, "w")
    err = err or sys.stderr
    run_dir = Path(c.out).expanduser() if c.out else Path(dp.from_rank0(str(_default_out())))
    resume_from = None
    if c.resume:
        if not c.out:
            raise HorizonError("--resume needs --out RUN_DIR (the run to continue)")
        resume_from = ckpt.latest_checkpoint(run_dir)
        if resume_from is None:
            raise HorizonError(f"--resume: no checkpoint found under {run_dir}")
    elif ckpt.list_checkpoints(run_dir):
        raise HorizonError(f"{run_dir} already holds checkpoints of a run; continue it with --resume or choose another --out")

    # The model: on resume, the checkpoint's own config and the run's tokenizer copy.
    if resume_from is not None:
        meta = ckpt.read_meta(resume_from)
        for key in ("model_config", "data_position"):
            if key not in meta:
                raise HorizonError(f"checkpoint {resume_from}: meta.json has no {key!r}; cannot resume from it")
        src = ModelSource(meta["model_config"], None, run_dir / "tokenizer.json", f"run {run_dir}")
        planmod.model_shape(src.config)
    else:
        meta = None
        src = resolve_model(c)
    shape = planmod.model_shape(src.config)
    if c.seq_len > shape.max_positions:
        raise HorizonError(
            f"--seq-len {c.seq_len} exceeds the model's max_position_embeddings {shape.max_positions}"
        )
    # Refuse up front when it will not fit, before allocating anything.
    machine = planmod.this_machine(c.device)
    p = planmod.make_plan(src.config, batch_size=c.batch_size, seq_len=c.seq_len,
                          micro_batch_size=c.micro_batch_size, grad_clip=c.grad_clip is not None, machine=machine)
    if not p["fits"]:
        err.write(planmod.format_plan(p) + "\n")
        raise HorizonError(f"this run does not fit this machine ({src.name}); see the plan above")

    if src.tokenizer is None:
        raise HorizonError(f"{src.name} has no tokenizer.json; pass --tokenizer PATH")
    tok = TextTokenizer(src.tokenizer, eos_id=eos_from_config(src.config))
    if tok.vocab_size > shape.vocab:
        raise HorizonError(
            f"tokenizer {src.tokenizer} has {tok.vocab_size} tokens, more than the model's vocab_size {shape.vocab}"
        )

    data_paths = c.data or [str(_shipped_corpus())]
    if writer:
        run_dir.mkdir(parents=True, exist_ok=True)
        # rank 0 tokenises (once, into the cache); the other ranks then map the cache
        ds = load_dataset(data_paths, tok, c.seq_len, c.seed, fallback_dir=run_dir / "data-cache",
                          log=lambda m: out.write(m + "\n"))
        if resume_from is None:
            if src.tokenizer.resolve() != (run_dir / "tokenizer.json").resolve():
                shutil.copyfile(src.tokenizer, run_dir / "tokenizer.json")
            _write_json_atomic(run_dir / "model_config.json", src.config)
        _write_json_atomic(run_dir / "train_config.json", dict(c.to_dict(), resume=False, out=str(run_dir)))
    dp.barrier()
    if not writer:
        ds = load_dataset(data_paths, tok, c.seq_len, c.seed, fallback_dir=run_dir / "data-cache")

    _seed_everything(c.seed)
    trainer = _make_trainer(src, c, trainer_factory)
    start, position = 0, 0
    if resume_from is not None:
        with ckpt.open_checkpoint(resume_from) as (tensors, meta):
            trainer.load_state_tensors(tensors)
        start, position = int(meta["step"]), int(meta["data_position"])
        trainer.step = int(meta.get("trainer_step", start))
        _set_rng_state(meta.get("rng", {}))
        if start >= c.steps:
            out.write(f"{run_dir}: already at step {start} >= --steps {c.steps}; nothing to do\n")
            return 0

    metrics_path = run_dir / "metrics.jsonl"
    history = [r for r in read_metrics(metrics_path) if isinstance(r.get("step"), int) and r["step"] <= start]
    if writer:
        # Rewrite the history up to the resume point: steps past the checkpoint never happened.
        tmp = metrics_path.with_name(".metrics.jsonl.tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in history))
        os.replace(tmp, metrics_path)

    def save(step):
        # every rank takes part in gathering the sharded state; rank 0 writes it
        tensors = trainer.state_tensors(rank0_only=True) if world > 1 else trainer.state_tensors()
        if not writer:
            dp.barrier()
            return None
        meta_out = {
            "step": step, "trainer_step": int(trainer.step), "data_position": position,
            "seq_len": c.seq_len, "batch_size": c.batch_size, "seed": c.seed,
            "lr_schedule": {"lr": c.lr, "min_lr": c.final_lr(), "warmup_steps": c.warmup(),
                            "decay_steps": c.schedule_horizon(), "next_lr": c.lr_at(step)},
            "rng": _rng_state(), "model_config": src.config, "train_config": c.to_dict(),
            "stats": {k: (float(v) if isinstance(v, float) else v) for k, v in dict(trainer.stats).items()},
        }
        path = ckpt.save_checkpoint(run_dir, step, tensors, meta_out, keep=c.keep_checkpoints)
        write_plot(run_dir, history)
        dp.barrier()
        return path

    out.write(
        f"training {src.name} ({trainer.num_parameters / 1e6:.2f} M parameters) on {machine.device}"
        f" | {ds.n_tokens} tokens, {ds.n_windows} sequences of {c.seq_len} | batch {c.batch_size}"
        f" | steps {start}->{c.steps} | out {run_dir}\n"
    )
    out.flush()
    progress = Progress(c.steps, start, out, c.log_every)
    bad_in_a_row = 0
    prev = dict(trainer.stats)
    tokens_per_step = c.batch_size * c.seq_len
    first_loss = next((r["loss"] for r in history if r.get("loss") is not None), None)
    last_loss = None
    tokens_seen = history[-1].get("tokens", 0) if history else 0
    step = start
    with StopFlag() as stop, (open(metrics_path, "a") if writer else open(os.devnull, "w")) as mf:
        try:
            while step < c.steps:
                lr = c.lr_at(step)
                trainer.set_lr(lr)
                ids, labels = ds.batch(position, c.batch_size)
                t0 = time.perf_counter()
                loss = float(trainer.train_step(ids, labels))
                dt = time.perf_counter() - t0
                position += c.batch_size
                step += 1
                tokens_seen += tokens_per_step
                st = dict(trainer.stats)
                skipped = bool(getattr(trainer, "last_step_skipped", False)) or not math.isfinite(loss)
                row = {
                    "step": step, "loss": _finite_or_none(loss), "lr": lr,
                    "grad_norm": _finite_or_none(getattr(trainer, "last_grad_norm", None)),
                    "tokens_per_s": tokens_per_step / dt if dt > 0 else None,
                    "step_s": dt, "tokens": tokens_seen,
                    "weight_h2d_bytes": st.get("weight_bytes_h2d", 0) - prev.get("weight_bytes_h2d", 0),
                    "grad_d2h_bytes": st.get("grad_bytes_d2h", 0) - prev.get("grad_bytes_d2h", 0),
                    "peak_host_bytes": st.get("peak_host_bytes"),
                    "peak_device_bytes": st.get("peak_device_bytes"),
                    "exposed_optimizer_s": (st.get("exposed_optimizer_seconds", 0.0) or 0.0)
                    - (prev.get("exposed_optimizer_seconds", 0.0) or 0.0),
                    "skipped": skipped,
                    "skipped_steps": st.get("skipped_steps"),
                }
                prev = st
                mf.write(json.dumps(row) + "\n")
                mf.flush()
                history.append(row)
                if not skipped:
                    last_loss = loss
                    if first_loss is None:
                        first_loss = loss
                progress.update(step, loss, row["tokens_per_s"] or 0.0)
                if skipped:
                    bad_in_a_row += 1
                    if bad_in_a_row >= c.max_bad_steps:
                        progress.close()
                        raise HorizonError(
                            f"stopped at step {step}: {bad_in_a_row} steps in a row had a NaN/Inf loss or gradient"
                            f" (skipped, {st.get('skipped_steps', bad_in_a_row)} in all); lower --lr or check the data"
                        )
                else:
                    bad_in_a_row = 0
                # all ranks stop at the same step (a signal may reach only some of them)
                if dp.any_rank(stop.signum is not None):
                    break
                if c.save_every and step % c.save_every == 0 and step < c.steps:
                    save(step)
        except KeyboardInterrupt:  # a second Ctrl-C: leave at once, the last checkpoint stands
            progress.close()
            err.write("horizon: interrupted twice; not writing a checkpoint\n")
            return 130
    progress.close()

    path = save(step)
    if not writer:
        return 0
    if stop.signum is not None:
        name = signal.Signals(stop.signum).name
        err.write(f"horizon: {name} received: stopped after step {step}/{c.steps}; checkpoint {path}; "
                  f"continue with --resume --out {run_dir}\n")
        return EXIT_SIGNAL.get(stop.signum, 1)
    fl = f"{first_loss:.4f}" if first_loss is not None else "n/a"
    ll = f"{last_loss:.4f}" if last_loss is not None else "n/a"
    out.write(f"done: {step} steps, loss {fl} -> {ll}; metrics {metrics_path}, plot {run_dir / 'loss.png'}, "
              f"checkpoint {path}\n")
    return 0


def _shipped_corpus() -> Path:
    from .data import shipped_corpus_path

    return shipped_corpus_path()


# --------------------------------------------------------------------------- export
def export(run_dir, out_dir, step: int | None = None, trainer_factory=None) -> Path:
    """Writes the run's latest (or `step`) checkpoint as a Hugging Face model directory."""
    import horizon

    run_dir = Path(run_dir).expanduser()
    if not run_dir.is_dir():
        raise HorizonError(f"run directory {str(run_dir)!r} does not exist")
    if step is None:
        cp = ckpt.latest_checkpoint(run_dir)
        if cp is None:
            raise HorizonError(f"{run_dir} holds no checkpoint to export")
    else:
        cp = ckpt.checkpoints_dir(run_dir) / ckpt.step_dir_name(step)
        if not cp.is_dir():
            raise HorizonError(f"{run_dir} has no checkpoint for step {step} (have {ckpt.list_checkpoints(run_dir)})")
    tensors, meta = ckpt.load_checkpoint(cp)
    config = meta.get("model_config")
    if not isinstance(config, dict):
        raise HorizonError(f"checkpoint {cp} has no model config")
    planmod.model_shape(config)
    Trainer = trainer_factory or horizon.Trainer
    trainer = Trainer.from_config(config, seed=0, device="cpu")
    trainer.load_state_tensors(tensors)
    del tensors
    out_dir = Path(out_dir).expanduser()
    out_dir.mkdir(parents=True, exist_ok=True)
    trainer.save_pretrained(str(out_dir))
    tok = run_dir / "tokenizer.json"
    if tok.is_file():
        shutil.copyfile(tok, out_dir / "tokenizer.json")
        _write_tokenizer_config(out_dir, config)
    return out_dir


def _write_tokenizer_config(out_dir: Path, config: dict) -> None:
    from .data import TextTokenizer

    try:
        t = TextTokenizer(out_dir / "tokenizer.json", eos_id=None)
        eos = t.tok.id_to_token(t.eos_id)
    except HorizonError:
        eos = None
    cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": config.get("max_position_embeddings")}
    if eos is not None:
        cfg.update(eos_token=eos, bos_token=eos, pad_token=eos)
    _write_json_atomic(out_dir / "tokenizer_config.json", cfg)
