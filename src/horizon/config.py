"""Training options: defaults, the TOML config file (`--config`), the saved options of a run being
resumed, and command-line flags, merged in that order (later wins) and validated."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from .errors import HorizonError


@dataclass
class TrainConfig:
    model_dir: str | None = None
    preset: str | None = None
    tokenizer: str | None = None        # tokenizer.json; default: the model's, or the shipped one
    data: list = field(default_factory=list)  # files or directories; default: the shipped corpus
    steps: int = 200
    batch_size: int = 8
    seq_len: int = 128
    micro_batch_size: int | None = None
    lr: float = 2e-3
    min_lr: float | None = None         # end of the cosine; default lr / 10
    warmup_steps: int | None = None     # default: 5% of the decay horizon, at most 100
    decay_steps: int | None = None      # cosine horizon; default: steps
    weight_decay: float = 0.0
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float | None = None
    device: str = "auto"
    compute_dtype: str | None = None
    seed: int = 0
    out: str | None = None
    save_every: int = 0                 # 0: only at the end (and on SIGINT/SIGTERM)
    keep_checkpoints: int = 2
    resume: bool = False
    max_bad_steps: int = 5              # consecutive NaN/Inf steps before training stops
    log_every: int = 10                 # progress lines when stdout is not a terminal

    # -- derived values ---------------------------------------------------------------------
    def schedule_horizon(self) -> int:
        return self.decay_steps if self.decay_steps is not None else self.steps

    def warmup(self) -> int:
        if self.warmup_steps is not None:
            return self.warmup_steps
        return min(100, max(0, self.schedule_horizon() // 20))

    def final_lr(self) -> float:
        return self.min_lr if self.min_lr is not None else self.lr / 10

    def lr_at(self, step: int) -> float:
        """Learning rate for optimizer step `step` (0-based): linear warm-up to `lr`, then cosine
        decay to `min_lr` at `decay_steps`, constant after."""
        w, horizon, peak, low = self.warmup(), self.schedule_horizon(), self.lr, self.final_lr()
        if step < w:
            return peak * (step + 1) / w
        if horizon <= w:
            return peak
        t = min(1.0, (step - w) / max(1, horizon - w))
        return low + 0.5 * (peak - low) * (1.0 + math.cos(math.pi * t))

    def to_dict(self) -> dict:
        return asdict(self)


FIELDS = {f.name: f for f in fields(TrainConfig)}
# Options that describe one invocation rather than the run: never taken from a saved run.
_PER_INVOCATION = {"resume", "out"}


def _check_int(name, v, minimum, allow_none=False):
    if v is None and allow_none:
        return
    if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
        raise HorizonError(f"--{name.replace('_', '-')} must be an integer >= {minimum}, got {v!r}")


def _check_float(name, v, lo, hi=None, allow_none=False, lo_open=False):
    if v is None and allow_none:
        return
    ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
    ok = ok and (v > lo if lo_open else v >= lo) and (hi is None or v < hi)
    if not ok:
        rng = f"> {lo}" if lo_open else f">= {lo}"
        if hi is not None:
            rng += f" and < {hi}"
        raise HorizonError(f"--{name.replace('_', '-')} must be a finite number {rng}, got {v!r}")


def validate(c: TrainConfig) -> TrainConfig:
    if c.model_dir is not None and c.preset is not None:
        raise HorizonError("give either --model-dir or --preset, not both")
    _check_int("steps", c.steps, 1)
    _check_int("batch_size", c.batch_size, 1)
    _check_int("seq_len", c.seq_len, 2)
    _check_int("micro_batch_size", c.micro_batch_size, 1, allow_none=True)
    if c.micro_batch_size is not None and c.micro_batch_size > c.batch_size:
        raise HorizonError(f"--micro-batch-size {c.micro_batch_size} exceeds --batch-size {c.batch_size}")
    _check_float("lr", c.lr, 0.0, lo_open=True)
    _check_float("min_lr", c.min_lr, 0.0, allow_none=True)
    _check_int("warmup_steps", c.warmup_steps, 0, allow_none=True)
    _check_int("decay_steps", c.decay_steps, 1, allow_none=True)
    _check_float("weight_decay", c.weight_decay, 0.0)
    _check_float("beta1", c.beta1, 0.0, 1.0)
    _check_float("beta2", c.beta2, 0.0, 1.0)
    _check_float("eps", c.eps, 0.0, lo_open=True)
    _check_float("grad_clip", c.grad_clip, 0.0, allow_none=True, lo_open=True)
    _check_int("seed", c.seed, 0)
    _check_int("save_every", c.save_every, 0)
    _check_int("keep_checkpoints", c.keep_checkpoints, 1)
    _check_int("max_bad_steps", c.max_bad_steps, 1)
    _check_int("log_every", c.log_every, 1)
    if not isinstance(c.device, str) or not (c.device in ("auto", "cpu") or c.device.startswith("cuda")):
        raise HorizonError(f"--device must be auto, cpu, cuda or cuda:N, got {c.device!r}")
    if c.compute_dtype not in (None, "float32", "bfloat16", "float16"):
        raise HorizonError(f"--compute-dtype must be float32, bfloat16 or float16, got {c.compute_dtype!r}")
    if isinstance(c.data, str):
        c.data = [c.data]
    if not isinstance(c.data, list) or not all(isinstance(d, str) for d in c.data):
        raise HorizonError(f"data must be a path or a list of paths, got {c.data!r}")
    return c


def _coerce(name: str, value):
    """TOML gives ints for floats sometimes (lr = 1); accept ints where floats are expected."""
    f = FIELDS[name]
    if value is None:
        return None
    typ = str(f.type)
    if "float" in typ and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if name == "data" and isinstance(value, str):
        return [value]
    return value


def load_toml(path) -> dict:
    try:
        import tomllib
    except ImportError:  # Python < 3.11
        try:
            import tomli as tomllib
        except ImportError:
            raise HorizonError("reading a TOML --config needs Python 3.11+ or the 'tomli' package") from None
    p = Path(path)
    try:
        raw = p.read_bytes()
    except OSError as e:
        raise HorizonError(f"cannot read config file {str(path)!r}: {e.strerror or e}") from None
    try:
        doc = tomllib.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
        raise HorizonError(f"config file {str(path)!r} is not valid TOML: {e}") from None
    # Allow the options at top level or under [train].
    if isinstance(doc.get("train"), dict):
        doc = {**{k: v for k, v in doc.items() if k != "train"}, **doc["train"]}
    out = {}
    for k, v in doc.items():
        name = k.replace("-", "_")
        if name not in FIELDS or name in ("resume",):
            raise HorizonError(f"config file {str(path)!r}: unknown option {k!r}")
        out[name] = _coerce(name, v)
    # Relative paths in a config file are relative to the file.
    base = p.resolve().parent

    def anchor(x: str) -> str:
        q = Path(x).expanduser()
        return str(q if q.is_absolute() else base / q)

    for key in ("model_dir", "tokenizer", "out"):
        if isinstance(out.get(key), str):
            out[key] = anchor(out[key])
    if isinstance(out.get("data"), list) and all(isinstance(d, str) for d in out["data"]):
        out["data"] = [anchor(d) for d in out["data"]]
    return out


def saved_run_options(path) -> dict:
    try:
        d = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return {}
    return {k: v for k, v in d.items() if k in FIELDS and k not in _PER_INVOCATION}


def merge(*layers: dict) -> TrainConfig:
    """Later layers win; None in a layer means "not given"."""
    c = TrainConfig()
    for layer in layers:
        for k, v in layer.items():
            if v is not None and k in FIELDS:
                setattr(c, k, v)
    return validate(c)
