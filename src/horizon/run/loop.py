"""`horizon train`: the training loop. The set-up is `session.py`, the records `metrics.py`, the
display `progress.py`, what a checkpoint holds `resume.py`.

Under torchrun (WORLD_SIZE > 1) every rank runs this same loop on the same global batches (the
trainer takes each rank's share); rank 0 alone writes the run directory."""

from __future__ import annotations

import os
import signal
import sys
import time

from .. import distributed as dp
from ..errors import HorizonError
from .config import TrainConfig
from .metrics import MetricsLog, write_plot
from .progress import Progress
from .session import Session, open_session

EXIT_SIGNAL = {signal.SIGINT: 130, signal.SIGTERM: 143}


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


def train(c: TrainConfig, *, out=None, err=None) -> int:
    """Runs `horizon train` with validated options. Returns the exit code; raises HorizonError
    (or ValueError / OSError) for bad input, which the CLI prints as one line."""
    rank, world = dp.init_from_env()
    try:
        out = (out or sys.stdout) if rank == 0 else open(os.devnull, "w")
        s = open_session(c, log=lambda m: out.write(m + "\n"), err=err or sys.stderr, rank=rank, world=world)
        return _loop(s, out, err or sys.stderr)
    finally:
        dp.shutdown()


def _loop(s: Session, out, err) -> int:
    c, trainer, steps = s.cfg, s.trainer, s.cfg.run.steps
    if s.start >= steps:
        out.write(f"{s.run_dir}: already at step {s.start} >= --steps {steps}; nothing to do\n")
        return 0
    train_data = s.data.train
    out.write(f"training {s.src.name} ({trainer.num_parameters / 1e6:.2f} M parameters) on {s.machine.device}"
              f" | {train_data.n_tokens} tokens, {train_data.n_sequences} sequences of {c.data.seq_len}"
              f" | batch {c.data.batch_size} | steps {s.start}->{steps} | out {s.run_dir}\n")
    out.flush()
    log = MetricsLog(s.run_dir / "metrics.jsonl", s.start, s.writer, trainer)
    progress = Progress(steps, s.start, out, c.run.log_every)
    step, bad_in_a_row = s.start, 0
    with StopFlag() as stop, log:
        try:
            while step < steps:
                lr = s.schedule.lr_at(step)
                trainer.set_lr(lr)
                batch = train_data.batch(s.position, c.data.batch_size)
                t0 = time.perf_counter()
                loss = float(trainer.train_step(batch.input_ids, batch.labels, position_ids=batch.position_ids))
                dt = time.perf_counter() - t0
                s.position += c.data.batch_size
                step += 1
                eval_loss = _evaluate(s, step)
                row = log.record(step, loss, lr, dt, batch.tokens, trainer, eval_loss=eval_loss)
                progress.update(step, loss, row["tokens_per_s"] or 0.0, eval_loss=eval_loss)
                bad_in_a_row = bad_in_a_row + 1 if row["skipped"] else 0
                if bad_in_a_row >= c.run.max_bad_steps:
                    progress.close()
                    raise HorizonError(
                        f"stopped at step {step}: {bad_in_a_row} steps in a row had a NaN/Inf loss or gradient"
                        f" (skipped, {row['skipped_steps'] or bad_in_a_row} in all); lower --lr or check the data")
                if dp.any_rank(stop.signum is not None):  # all ranks stop at the same step
                    break
                if c.run.save_every and step % c.run.save_every == 0 and step < steps:
                    _save(s, step, log)
        except KeyboardInterrupt:  # a second Ctrl-C: leave at once, the last checkpoint stands
            progress.close()
            err.write("horizon: interrupted twice; not writing a checkpoint\n")
            return 130
    progress.close()
    path = _save(s, step, log)
    if not s.writer:
        return 0
    if stop.signum is not None:
        name = signal.Signals(stop.signum).name
        err.write(f"horizon: {name} received: stopped after step {step}/{steps}; checkpoint {path}; "
                  f"continue with --resume --out {s.run_dir}\n")
        return EXIT_SIGNAL.get(stop.signum, 1)
    fl = f"{log.first_loss:.4f}" if log.first_loss is not None else "n/a"
    ll = f"{log.last_loss:.4f}" if log.last_loss is not None else "n/a"
    out.write(f"done: {step} steps, loss {fl} -> {ll}; metrics {log.path}, plot {s.run_dir / 'loss.png'}, "
              f"checkpoint {path}\n")
    return 0


def _evaluate(s: Session, step: int):
    """The eval loss after `step` when it is due (every --eval-every steps and at the last step
    of the run), else None. Real tokens only: padding carries no label."""
    c = s.cfg
    if s.data.eval is None or not (step == c.run.steps or (c.data.eval_every and step % c.data.eval_every == 0)):
        return None
    return s.trainer.evaluate(s.data.eval_batches(c.data.batch_size))


def _save(s: Session, step: int, log: MetricsLog):
    path = s.save(step)
    if s.writer:
        write_plot(s.run_dir, log.history)
    dp.barrier()
    return path
