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
from ..data.dataset import IGNORE_INDEX
from ..errors import HorizonError
from ..io import checkpoint as ckpt
from ..io.checkpoint import CheckpointWriteError
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
    rank, world = dp.init_from_env(rendezvous_timeout_s=c.run.rendezvous_timeout)
    s = None
    try:
        out = (out or sys.stdout) if rank == 0 else open(os.devnull, "w")
        s = open_session(c, log=lambda m: out.write(m + "\n"), err=err or sys.stderr, rank=rank, world=world)
        return _loop(s, out, err or sys.stderr)
    finally:
        if s is not None:
            s.close()
        dp.shutdown()


class _TooManyBadSteps(Exception):
    pass


def has_label_tokens(ids, labels) -> bool:
    """Whether a batch trains anything: some label is not -100 after the shift (labels None:
    every token is a label)."""
    if labels is None:
        return ids.shape[1] > 1
    return bool((labels[:, 1:] != IGNORE_INDEX).any())


def _loop(s: Session, out, err) -> int:
    c, trainer, steps = s.cfg, s.trainer, s.cfg.run.steps
    if s.start >= steps:
        out.write(f"{s.run_dir}: already at step {s.start} >= --steps {steps}; nothing to do\n")
        return 0
    train_data = s.data.train
    horizon = s.schedule.horizon
    extends = s.start > 0 and steps > horizon
    out.write(f"training {s.src.name} ({trainer.num_parameters / 1e6:.2f} M parameters) on {s.machine.device}"
              f" | {train_data.n_tokens} tokens, {train_data.n_sequences} sequences of {c.data.seq_len}"
              f" | batch {c.data.batch_size} | steps {s.start}->{steps} | out {s.run_dir}\n")
    if extends:
        out.write(f"the run's schedule ends at step {horizon}: steps {max(s.start, horizon)}->{steps} keep the "
                  f"final learning rate {s.schedule.final:g} (to plan a new schedule: --decay-steps N --override)\n")
    out.flush()
    log = MetricsLog(s.run_dir / "metrics.jsonl", s.start, s.writer, trainer)
    progress = Progress(steps, s.start, out, c.run.log_every)
    step, bad_in_a_row = s.start, 0
    with StopFlag() as stop, log:
        try:
            while step < steps:
                lr = s.schedule.lr_at(step)
                batch = train_data.batch(s.position, c.data.batch_size)
                if not has_label_tokens(batch.input_ids, batch.labels):
                    # Nothing to learn from (e.g. chat turns whose answers fall outside the
                    # window): consumed, counted, not a bad step.
                    s.position += c.data.batch_size
                    step += 1
                    log.record_skipped_batch(step, lr, trainer)
                    progress.update(step, float("nan"), 0.0, note="the batch has no label tokens")
                else:
                    trainer.set_lr(lr)
                    t0 = time.perf_counter()
                    loss = float(trainer.train_step(batch.input_ids, batch.labels, position_ids=batch.position_ids))
                    dt = time.perf_counter() - t0
                    s.position += c.data.batch_size
                    step += 1
                    eval_loss = _evaluate(s, step)
                    row = log.record(step, loss, lr, dt, batch.tokens, trainer, eval_loss=eval_loss)
                    progress.update(step, loss, row["tokens_per_s"] or 0.0, eval_loss=eval_loss,
                                    note=row["skip_reason"])
                    bad_in_a_row = bad_in_a_row + 1 if row["skipped"] else 0
                    if bad_in_a_row >= c.run.max_bad_steps:
                        raise _TooManyBadSteps(
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
        except _TooManyBadSteps as e:  # every rank stops here together
            progress.close()
            raise HorizonError(f"{e}; {_save_on_stop(s, step, log)}") from None
        except CheckpointWriteError:  # the disk refused a checkpoint: trying again would not help
            progress.close()
            raise
        except Exception as e:
            progress.close()
            where = (_save_on_stop(s, step, log) if s.world == 1 else
                     "not saving (another rank may be gone); the last checkpoint stands")
            if isinstance(e, (HorizonError, ValueError, OSError, MemoryError)):
                raise HorizonError(f"stopped at step {step}: {_describe(e)}; {where}") from None
            err.write(f"horizon: stopped at step {step} by an internal error; {where}\n")
            raise
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
    skipped = trainer.stats.get("skipped_steps") or 0
    notes = []
    if skipped:
        notes.append(f"{skipped} skipped for a NaN/Inf loss or gradient")
    if log.skipped_batches:
        notes.append(f"{log.skipped_batches} batches without label tokens skipped")
    out.write(f"done: {step} steps{' (' + '; '.join(notes) + ')' if notes else ''}, loss {fl} -> {ll}; "
              f"metrics {log.path}, plot {s.run_dir / 'loss.png'}, checkpoint {path}\n")
    return 0


def _evaluate(s: Session, step: int):
    """The eval loss after `step` when it is due (every --eval-every steps and at the last step
    of the run), else None. Real tokens only: padding carries no label."""
    c = s.cfg
    if s.data.eval is None or not (step == c.run.steps or (c.data.eval_every and step % c.data.eval_every == 0)):
        return None
    return s.trainer.evaluate(s.data.eval_batches(c.data.batch_size))


def _describe(e: BaseException) -> str:
    if isinstance(e, MemoryError):
        return "out of memory"
    if isinstance(e, OSError) and not isinstance(e, HorizonError):
        where = f" ({e.filename})" if getattr(e, "filename", None) else ""
        return f"{e.strerror or e}{where}"
    return " ".join(str(e).split()) or type(e).__name__


def _weights_finite(trainer) -> bool:
    import torch

    trainer.synchronize()
    ok = all(bool(torch.isfinite(layer.slab.master).all()) for layer in trainer.model.layers)
    return not dp.any_rank(not ok)


def _save_on_stop(s: Session, step: int, log: MetricsLog) -> str:
    """Saves the last good state when a run stops inside the loop (every rank calls it);
    returns what happened, for the one-line message."""
    resume_hint = f"continue with --resume --out {s.run_dir}"
    latest = ckpt.latest_checkpoint(s.run_dir) if s.writer else None
    stands = f"the checkpoint {latest} stands" if latest is not None else "the run has no checkpoint"
    if step == s.start:
        return f"no step completed since the start; {stands}"
    try:
        if not _weights_finite(s.trainer):
            return f"the weights are not finite, so not saved; {stands}"
        path = _save(s, step, log)
    except HorizonError as e:
        return f"the last good state could not be saved ({_describe(e)})"
    except Exception as e:  # noqa: BLE001 - already stopping for another reason: say it, keep that one
        return f"the last good state could not be saved ({type(e).__name__}: {_describe(e)}); {stands}"
    return f"saved the last good state (step {step}) to {path}; {resume_hint}"


def _save(s: Session, step: int, log: MetricsLog):
    path = s.save(step)
    if s.writer:
        write_plot(s.run_dir, log.history)
    dp.barrier()
    return path
