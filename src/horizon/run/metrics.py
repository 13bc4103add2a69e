"""A run's records: `metrics.jsonl` (one JSON object per step) and `loss.png`."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path


def finite_or_none(x):
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
    ax.plot(xs, ys, lw=1.2, label="train")
    title = f"{run_dir.name}: loss {ys[0]:.3f} -> {ys[-1]:.3f}"
    evals = [(r["step"], r["eval_loss"]) for r in rows if r.get("eval_loss") is not None]
    if evals:
        ex, ey = zip(*evals)
        ax.plot(ex, ey, "o-", lw=1.2, ms=3, label="eval")
        ax.legend()
        title += f", eval {ey[-1]:.3f}"
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    tmp = run_dir / ".loss.png.tmp"
    fig.savefig(tmp, format="png")
    plt.close(fig)
    os.replace(tmp, run_dir / "loss.png")


class MetricsLog:
    """`metrics.jsonl` of a run: the rows of earlier steps kept up to the resume point, then one
    row per step appended (flushed at once, so a crash loses at most the step in flight)."""

    def __init__(self, path: Path, start: int, writer: bool, trainer):
        self.path = path
        self.history = [r for r in read_metrics(path) if isinstance(r.get("step"), int) and r["step"] <= start]
        if writer:
            # Steps past the checkpoint never happened: rewrite the history up to the resume point.
            tmp = path.with_name(".metrics.jsonl.tmp")
            tmp.write_text("".join(json.dumps(r) + "\n" for r in self.history))
            os.replace(tmp, path)
        self.file = open(path, "a") if writer else open(os.devnull, "w")
        self.prev = dict(trainer.stats)
        self.tokens = self.history[-1].get("tokens", 0) if self.history else 0
        self.first_loss = next((r["loss"] for r in self.history if r.get("loss") is not None), None)
        self.last_loss = None

    def record(self, step: int, loss: float, lr: float, dt: float, tokens: int, trainer, eval_loss=None) -> dict:
        """The row of `step`; `tokens`: the real (not padding) tokens of its batch."""
        st = dict(trainer.stats)
        prev = self.prev
        self.tokens += tokens
        skipped = bool(getattr(trainer, "last_step_skipped", False)) or not math.isfinite(loss)
        row = {
            "step": step, "loss": finite_or_none(loss), "lr": lr,
            "grad_norm": finite_or_none(getattr(trainer, "last_grad_norm", None)),
            "tokens_per_s": tokens / dt if dt > 0 else None,
            "step_s": dt, "tokens": self.tokens,
            "weight_h2d_bytes": st.get("weight_bytes_h2d", 0) - prev.get("weight_bytes_h2d", 0),
            "grad_d2h_bytes": st.get("grad_bytes_d2h", 0) - prev.get("grad_bytes_d2h", 0),
            "peak_host_bytes": st.get("peak_host_bytes"),
            "peak_device_bytes": st.get("peak_device_bytes"),
            "exposed_optimizer_s": (st.get("exposed_optimizer_seconds", 0.0) or 0.0)
            - (prev.get("exposed_optimizer_seconds", 0.0) or 0.0),
            "skipped": skipped,
            "skipped_steps": st.get("skipped_steps"),
        }
        if eval_loss is not None:
            row["eval_loss"] = finite_or_none(eval_loss)
        self.prev = st
        self.file.write(json.dumps(row) + "\n")
        self.file.flush()
        self.history.append(row)
        if not skipped:
            self.last_loss = loss
            if self.first_loss is None:
                self.first_loss = loss
        return row

    def close(self) -> None:
        self.file.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False
