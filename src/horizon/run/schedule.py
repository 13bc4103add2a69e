"""The learning-rate schedule: linear warm-up to the peak, cosine decay to `min_lr` at the decay
horizon, constant after. `ScheduleConfig` holds the options; `LRSchedule` is the schedule of one
run, fixed when the run starts and recorded in its checkpoints."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from ..options import check_fields, option


@dataclass
class ScheduleConfig:
    min_lr: float | None = option(None, "learning rate at the end of the cosine", ge=0.0, metavar="LR",
                                  default_help="lr / 10")
    warmup_steps: int | None = option(None, "linear warm-up steps", ge=0, metavar="N",
                                      default_help="5% of the decay horizon, at most 100")
    decay_steps: int | None = option(None, "cosine decay horizon in steps", ge=1, metavar="N",
                                     default_help="--steps")

    def __post_init__(self):
        check_fields(self)

    def schedule(self, lr: float, steps: int) -> "LRSchedule":
        """The schedule of a run whose peak is `lr` and whose length is `steps`."""
        horizon = self.decay_steps if self.decay_steps is not None else steps
        warmup = self.warmup_steps if self.warmup_steps is not None else min(100, max(0, horizon // 20))
        low = self.min_lr if self.min_lr is not None else lr / 10
        return LRSchedule(peak=lr, final=low, warmup=warmup, horizon=horizon)


@dataclass(frozen=True)
class LRSchedule:
    peak: float
    final: float
    warmup: int
    horizon: int

    def lr_at(self, step: int) -> float:
        """Learning rate for optimizer step `step` (0-based)."""
        if step < self.warmup:
            return self.peak * (step + 1) / self.warmup
        if self.horizon <= self.warmup:
            return self.peak
        t = min(1.0, (step - self.warmup) / max(1, self.horizon - self.warmup))
        return self.final + 0.5 * (self.peak - self.final) * (1.0 + math.cos(math.pi * t))

    def to_dict(self) -> dict:
        return asdict(self)
