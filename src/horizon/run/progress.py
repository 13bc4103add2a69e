"""The progress display of a run: a bar redrawn in place on a terminal, plain lines otherwise."""

from __future__ import annotations

import math
import time


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
        self.eval_s = ""  # the latest eval loss, shown from then on

    def update(self, step: int, loss: float, tok_s: float, eval_loss: float | None = None,
               note: str | None = None) -> None:
        """`eval_loss`: shown from then on; `note`: why the step was skipped (a plain line is then
        always written)."""
        done = step - self.start
        elapsed = time.perf_counter() - self.t0
        eta = elapsed / done * (self.total - step) if done > 0 else float("nan")
        loss_s = f"{loss:.4f}" if math.isfinite(loss) else "nan"
        if eval_loss is not None:
            self.eval_s = f" eval {eval_loss:.4f}" if math.isfinite(eval_loss) else " eval nan"
        loss_s += self.eval_s
        if self.tty:
            width = 24
            fill = int(width * step / self.total)
            bar = "#" * fill + "." * (width - fill)
            line = f"[{bar}] {step}/{self.total} loss {loss_s} | {_fmt_rate(tok_s)} tok/s | ETA {_fmt_time(eta)}"
            if note:
                line += f" | skipped: {note}"
            # Pad over the previous line's tail when this one is shorter.
            self.stream.write("\r" + line.ljust(self.width))
            self.width = len(line)
            self.stream.flush()
            self.drawn = True
        elif note or step % self.every == 0 or step == self.total or done == 1:
            tail = f" skipped: {note}" if note else ""
            self.stream.write(f"step {step}/{self.total} loss {loss_s} {_fmt_rate(tok_s)} tok/s ETA {_fmt_time(eta)}"
                              f"{tail}\n")
            self.stream.flush()

    def close(self) -> None:
        if self.tty and self.drawn:
            self.stream.write("\n")
            self.stream.flush()
            self.drawn = False
