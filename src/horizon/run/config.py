"""The options of a training run: `TrainConfig` composes each component's own config (model, data,
optimizer, schedule, engine, run), and is built from layers merged in order, later winning:
defaults, the saved options of a run being resumed, a TOML file (`--config`), command-line flags.
Each option has one flat name (its flag without the dashes), unique across the sections: that
name is the TOML key and the key of the saved `train_config.json`."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from ..data.config import DataConfig
from ..engine.config import EngineConfig, check_micro_batch
from ..errors import HorizonError
from ..models.config import ModelConfig
from ..optim import OptimizerConfig
from ..options import ConfigError, check_fields, leaf_fields, option, option_name, sections
from .schedule import LRSchedule, ScheduleConfig


@dataclass
class RunConfig:
    steps: int = option(200, "train up to this step", ge=1, metavar="N")
    seed: int = option(0, "model init and data order", ge=0, le=2**32 - 1, metavar="N")
    out: str | None = option(None, "run directory", metavar="DIR", path=True, default_help="runs/<timestamp>")
    save_every: int = option(0, "checkpoint every N steps (0: at the end only)", ge=0, metavar="N")
    keep_checkpoints: int = option(2, "keep the newest K checkpoints", ge=1, metavar="K")
    resume: bool = option(False, "continue the run in --out from its newest intact checkpoint, with its own options")
    max_bad_steps: int = option(5, "stop after N steps in a row with NaN/Inf loss or gradients", ge=1, metavar="N")
    log_every: int = option(10, "progress line every N steps when stdout is not a terminal", ge=1, metavar="N")
    override: bool = option(False, "with --resume: accept options that change the run's trajectory (recorded in "
                                   "the run's history)")
    rendezvous_timeout: float | None = option(None, "under torchrun: seconds to wait for every rank to join", gt=0,
                                              metavar="SECONDS", default_help="$HORIZON_RENDEZVOUS_TIMEOUT or 600")

    def __post_init__(self):
        check_fields(self)


# Options that describe one invocation rather than the run: never taken from a saved run.
PER_INVOCATION = ("resume", "out", "override")
# Options a resumed run may change without --override: how long it runs, how it reports and
# saves, where it runs. Every other option changes the trajectory (the model, the data and its
# order, the optimizer, the schedule, the numerics) and is refused unless --override is given.
RESUME_FREE = PER_INVOCATION + ("steps", "log_every", "save_every", "keep_checkpoints", "max_bad_steps", "device",
                                "rendezvous_timeout")
# What a checkpoint's state belongs to: never changed on resume, even with --override.
RESUME_FIXED = ("model_dir", "preset", "tokenizer")


_OPTIONS: dict = {}


@dataclass
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimizerConfig = field(default_factory=OptimizerConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def __post_init__(self):
        check_micro_batch(self.engine.micro_batch_size, self.data.batch_size)
        low = self.schedule.min_lr
        if low is not None and low > self.optim.lr:
            raise ConfigError(f"--min-lr {low:g} is above --lr {self.optim.lr:g}: the decay would raise the "
                              "learning rate", "min_lr")

    # -- flat names ---------------------------------------------------------------------
    @classmethod
    def options(cls) -> dict:
        """flat name -> (section, field, section class), for every option."""
        cached = _OPTIONS.get(cls)
        if cached is not None:
            return dict(cached)
        out = {}
        for section, f, owner in leaf_fields(cls):
            name = option_name(f)
            assert name not in out, f"option {name!r} defined twice"
            out[name] = (section, f, owner)
        _OPTIONS[cls] = out  # the fields of a class never change: read their type hints once
        return dict(out)

    @classmethod
    def from_flat(cls, values: dict) -> "TrainConfig":
        """Builds (and so validates) a config from flat option names; unknown names refused."""
        opts = cls.options()
        per_section: dict = {}
        for name, value in values.items():
            if name not in opts:
                raise ConfigError(f"unknown option {name!r}", name)
            section, f, _ = opts[name]
            per_section.setdefault(section, {})[f.name] = value
        return cls(**{name: owner(**per_section.get(name, {})) for name, owner in sections(cls)})

    def to_flat(self) -> dict:
        out = {}
        for name, (section, f, _) in self.options().items():
            out[name] = getattr(getattr(self, section), f.name)
        return out

    def lr_schedule(self) -> LRSchedule:
        return self.schedule.schedule(self.optim.lr, self.run.steps)


def merge(*layers: dict) -> TrainConfig:
    """Later layers win; a None value in a layer means "not given"."""
    values: dict = {}
    for layer in layers:
        values.update({k: v for k, v in layer.items() if v is not None})
    return TrainConfig.from_flat(values)


# ----------------------------------------------------------------------------- layers
def load_toml(path) -> dict:
    """The options of a TOML file, at top level, under [train] or under section tables
    ([optim], [data], ...); flat names with '-' or '_'. Relative paths are relative to the file."""
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
    flat: dict = {}
    for k, v in doc.items():
        if isinstance(v, dict):  # [train] or a section table
            flat.update(v)
        else:
            flat[k] = v
    opts = TrainConfig.options()
    out = {}
    for k, v in flat.items():
        name = k.replace("-", "_")
        if name not in opts or name == "resume":
            raise HorizonError(f"config file {str(path)!r}: unknown option {k!r}")
        out[name] = v
    base = p.resolve().parent

    def anchor(x):
        if not isinstance(x, str):
            return x
        q = Path(x).expanduser()
        return str(q if q.is_absolute() else base / q)

    for name, v in out.items():
        if opts[name][1].metadata.get("path"):
            out[name] = [anchor(x) for x in v] if isinstance(v, list) else anchor(v)
    return out


def saved_run_options(path) -> dict:
    """The options a run saved (train_config.json), less the per-invocation ones."""
    try:
        d = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return {}
    return _known(d)


def _known(d) -> dict:
    if not isinstance(d, dict):
        return {}
    opts = TrainConfig.options()
    return {k: v for k, v in d.items() if k in opts and k not in PER_INVOCATION}


def checkpoint_options(run_dir) -> dict:
    """The options of the run in `run_dir` as its newest intact checkpoint recorded them (the
    learning-rate schedule made explicit); train_config.json only for a checkpoint that does
    not record them. {} when there is no readable checkpoint (the set-up then says why)."""
    from . import resume

    try:
        cp, meta, _ = resume.select(run_dir)
    except HorizonError:
        return {}
    if cp is None:
        return {}
    if not isinstance(meta.get("train_config"), dict):
        return dict(saved_run_options(Path(run_dir) / "train_config.json"), **_known(resume.saved_options(meta)))
    return _known(resume.saved_options(meta))


def from_layers(file_layer: dict, flags: dict) -> TrainConfig:
    """The config of an invocation: a resumed run's recorded options (from its checkpoint),
    then the file, then flags. What a resumed run may change is checked when it starts
    (`resume_changes`)."""
    saved = {}
    if flags.get("resume"):
        out = flags.get("out") or file_layer.get("out")
        if out:
            saved = checkpoint_options(Path(out).expanduser())
    return merge(saved, file_layer, flags)


def _same(name: str, a, b) -> bool:
    opts = TrainConfig.options()
    if name in opts and opts[name][1].metadata.get("path") and a is not None and b is not None:
        def norm(x):
            return [str(Path(p).expanduser().resolve()) for p in (x if isinstance(x, list) else [x])]
        return norm(a) == norm(b)
    return a == b


def resume_changes(cfg: TrainConfig, meta: dict) -> dict:
    """{option: (recorded, now)} for every option of `cfg` that differs from what the
    checkpoint recorded and that a resumed run may not change freely."""
    from . import resume

    saved = resume.saved_options(meta)
    if not isinstance(meta.get("train_config"), dict):
        return {}  # a checkpoint from before options were recorded: nothing to compare with
    try:
        recorded = merge(_known(saved)).to_flat()
    except HorizonError:
        recorded = {k: v for k, v in saved.items()}
    now = cfg.to_flat()
    return {k: (recorded.get(k), now[k]) for k in now
            if k not in RESUME_FREE and not _same(k, recorded.get(k), now[k])}
