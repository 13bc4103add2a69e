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
    resume: bool = option(False, "continue the run in --out from its latest checkpoint")
    max_bad_steps: int = option(5, "stop after N steps in a row with NaN/Inf loss or gradients", ge=1, metavar="N")
    log_every: int = option(10, "progress line every N steps when stdout is not a terminal", ge=1, metavar="N")

    def __post_init__(self):
        check_fields(self)


# Options that describe one invocation rather than the run: never taken from a saved run.
PER_INVOCATION = ("resume", "out")


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
        out = {}
        for section, f, owner in leaf_fields(cls):
            name = option_name(f)
            assert name not in out, f"option {name!r} defined twice"
            out[name] = (section, f, owner)
        return out

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
    if not isinstance(d, dict):
        return {}
    opts = TrainConfig.options()
    return {k: v for k, v in d.items() if k in opts and k not in PER_INVOCATION}


def from_layers(file_layer: dict, flags: dict) -> TrainConfig:
    """The config of an invocation: a resumed run's saved options, then the file, then flags.
    A model named now (by the file or the flags) replaces the saved run's model; a flag's
    model replaces the file's."""
    saved = {}
    if flags.get("resume"):
        out = flags.get("out") or file_layer.get("out")
        if out:
            saved = saved_run_options(Path(out) / "train_config.json")
    model_keys = ("model_dir", "preset")
    if any(layer.get(k) for layer in (file_layer, flags) for k in model_keys):
        for k in model_keys:
            saved.pop(k, None)
    if any(flags.get(k) for k in model_keys):
        file_layer = {k: v for k, v in file_layer.items() if k not in model_keys}
    return merge(saved, file_layer, flags)
