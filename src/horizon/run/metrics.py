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


def _read_lines(path: Path) -> list[tuple[str, dict | None]]:
    """Every line of a metrics file with its row (None for a line that is not a JSON object)."""
    out = []
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            for line in f:
                text = line.rstrip("\n")
                if not text.strip():
                    continue
                try:
                    row = json.loads(text)
                except ValueError:
                    row = None
                out.append((text, row if isinstance(row, dict) else None))
    except FileNotFoundError:
        pass
    return out


def read_metrics(path: Path) -> list[dict]:
    """The readable rows of a metrics file; a damaged line (a torn last line after a crash, an
    edit) is passed over, never the rows after it."""
    return [row for _, row in _read_lines(path) if row is not None]


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
    row per step appended (flushed at once, so a crash loses at most the step in flight).

    On resume the rows of steps past the checkpoint (they are trained again) and a torn last
    line are dropped; every other line, readable or not, is kept where it is."""

    def __init__(self, path: Path, start: int, writer: bool, trainer):
        self.path = path
        lines = _read_lines(path)
        keep = []
        for i, (text, row) in enumerate(lines):
            if row is None:
                if i < len(lines) - 1:
                    keep.append((text, None))  # not ours to delete; readers pass over it
            elif isinstance(row.get("step"), int) and row["step"] <= start:
                keep.append((text, row))
        self.history = [row for _, row in keep if row is not None]
        if writer and len(keep) != len(lines):
            tmp = path.with_name(".metrics.jsonl.tmp")
            tmp.write_text("".join(text + "\n" for text, _ in keep))
            os.replace(tmp, path)
        self.file = open(path, "a") if writer else open(os.devnull, "w")
        self.prev = dict(trainer.stats)
        self.tokens = self.history[-1].get("tokens", 0) if self.history else 0
        last = self.history[-1] if self.history else {}
        self.skipped_batches = last.get("skipped_batches") or 0
        self.first_loss = next((r["loss"] for r in self.history if r.get("loss") is not None), None)
        self.last_loss = None

    def _write(self, row: dict) -> dict:
        self.file.write(json.dumps(row) + "\n")
        self.file.flush()
        self.history.append(row)
        return row

    def record_skipped_batch(self, step: int, lr: float, trainer) -> dict:
        """A batch without label tokens: consumed and counted, nothing trained."""
        self.skipped_batches += 1
        return self._write({
            "step": step, "loss": None, "lr": lr, "grad_norm": None, "tokens_per_s": None, "step_s": 0.0,
            "tokens": self.tokens, "skipped": True, "skip_reason": "no label tokens",
            "skipped_steps": trainer.stats.get("skipped_steps"), "skipped_batches": self.skipped_batches,
        })

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
            "skip_reason": (None if not skipped else "non-finite loss" if not math.isfinite(loss)
                            else "non-finite gradients"),
            "skipped_steps": st.get("skipped_steps"),
            "skipped_batches": self.skipped_batches,
        }
        if eval_loss is not None:
            row["eval_loss"] = finite_or_none(eval_loss)
        self.prev = st
        self._write(row)
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
