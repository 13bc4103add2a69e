"""Everything a run sets up before its first step, in the order that refuses bad input before
anything is allocated or written: the run directory and the checkpoint to resume, the model, the
plan (does it fit?), the tokenizer and the data, the trainer and its restored state.

A run directory (`--out`) holds `metrics.jsonl`, `loss.png`, `train_config.json` (the options of
the run and the history of its `--override`s, for reading: a `--resume` takes them from the
checkpoint), `model_config.json`, the model's tokenizer files (byte-identical copies,
so the run is self-contained),
`data-cache/` (token caches when the data's own directory is not writable), `checkpoints/` and
`.horizon.lock` (held by the run writing it: a second run into the same directory is refused,
naming the holder; the kernel releases it when the holder exits or is killed).

On `--resume` the options are the checkpoint's (`config.from_layers`); an option that changes
the trajectory is refused unless `--override` (then recorded in the checkpoints' `history`), the
model and tokenizer never change, and data that is not the run's (another token count or
tokenizer) is refused the same way.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

from .. import distributed as dp
from .. import plan as planmod
from ..data import TrainingData, eos_from_config, load_tokenizer, load_training_data, shipped_tokenizer_path
from ..errors import HorizonError
from ..io import checkpoint as ckpt
from ..io import model_dir
from ..io.files import DirLock
from ..io.model_dir import ModelSource
from ..io.tokenizer_files import copy_tokenizer_files
from ..options import flag
from ..models.hf.select import model_path_of
from ..trainer import Trainer
from . import resume
from .config import RESUME_FIXED, TrainConfig, resume_changes
from .schedule import LRSchedule


@dataclass
class Session:
    cfg: TrainConfig
    run_dir: Path
    src: ModelSource
    schedule: LRSchedule
    data: TrainingData  # .train (batches), .eval (or None)
    trainer: Trainer
    machine: object
    start: int          # the step the run starts from (0, or the resumed checkpoint's)
    position: int       # sequences of the data consumed so far
    writer: bool        # rank 0: writes the run directory
    world: int
    lock: object = None       # the run directory's DirLock (rank 0)
    data_record: dict = None  # what the data was (recorded in checkpoints, compared on resume)
    history: list = None      # option changes accepted with --override, in order

    def save(self, step: int):
        path = resume.save(self.run_dir, self.trainer, step=step, position=self.position, cfg=self.cfg,
                           schedule=self.schedule, model_config=self.src.config, writer=self.writer,
                           world=self.world, data=self.data_record, history=self.history)
        return path

    def close(self) -> None:
        if self.lock is not None:
            self.lock.release()
            self.lock = None


def default_out() -> Path:
    return Path("runs") / time.strftime("%Y%m%d-%H%M%S")


def make_default_run_dir() -> Path:
    """Creates a fresh `runs/<timestamp>` (`-2`, `-3`, ... when a run started in the same
    second already took it): two runs never share a default directory."""
    base = default_out()
    base.parent.mkdir(parents=True, exist_ok=True)
    for i in range(1, 10000):
        d = base if i == 1 else base.with_name(f"{base.name}-{i}")
        try:
            d.mkdir()
            return d
        except FileExistsError:
            continue
    raise HorizonError(f"cannot find a free run directory name beside {base}")


def write_json_atomic(path: Path, obj) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=1, sort_keys=True))
    os.replace(tmp, path)


def make_trainer(src: ModelSource, c: TrainConfig) -> Trainer:
    kw = dict(optim=c.optim, engine=c.engine)
    try:
        if src.model_dir is not None:
            return Trainer.from_pretrained(str(src.model_dir), model_path=model_path_of(src.spec), **kw)
        return Trainer.from_config(src.config, seed=c.run.seed, model_path=model_path_of(src.spec), **kw)
    except NotImplementedError as e:
        arch = (src.config.get("architectures") or ["?"])[0]
        raise HorizonError(f"{arch} is not supported by the trainer yet: {e}") from None


def _show(v) -> str:
    if isinstance(v, list):
        return " ".join(map(str, v))
    return "(default)" if v is None else f"{v:g}" if isinstance(v, float) else str(v)


def check_resume_changes(c: TrainConfig, meta: dict, cp) -> list:
    """The options this invocation changes in the resumed run: refused when they change what
    the checkpoint belongs to (the model, the tokenizer), or the trajectory without
    --override; returned (for the run's history) when accepted."""
    changes = resume_changes(c, meta)
    fixed = {k: v for k, v in changes.items() if k in RESUME_FIXED}
    if fixed:
        k, (was, now) = next(iter(fixed.items()))
        raise HorizonError(f"--resume continues the model and tokenizer of its checkpoint ({cp}): {flag(k)} "
                           f"{_show(now)} differs from the run's {_show(was)}; start a new run (another --out) "
                           "to train another model")
    if changes and not c.run.override:
        what = ", ".join(f"{flag(k)} {_show(now)} (the run has {_show(was)})" for k, (was, now) in changes.items())
        raise HorizonError(f"--resume: {what} would change the run's trajectory; drop the option to continue the "
                           "run as it was, or add --override to change it (recorded in the run's history)")
    return [{k: [was, now] for k, (was, now) in changes.items()}] if changes else []


def data_record(ds, tok) -> dict:
    return {"n_tokens": int(ds.n_tokens), "n_windows": int(ds.n_windows), "tokenizer_sha256": tok.digest}


def open_session(c: TrainConfig, *, log, err, rank: int, world: int) -> Session:
    """Sets the run up; `log` receives rank 0's messages, `err` the plan of a run that does not fit."""
    writer = rank == 0
    if c.run.resume and not c.run.out:
        raise HorizonError("--resume needs --out RUN_DIR (the run to continue)")
    if c.run.override and not c.run.resume:
        raise HorizonError("--override only applies with --resume (it accepts changed options of a resumed run)")
    run_dir = Path(c.run.out).expanduser() if c.run.out else None
    if run_dir is not None and run_dir.exists() and not run_dir.is_dir():
        raise HorizonError(f"--out {str(run_dir)!r} exists and is not a directory")
    lock = None
    try:
        # The lock first: a directory another run is writing is neither read nor written.
        if writer and run_dir is not None and run_dir.is_dir():
            lock = DirLock(run_dir).acquire()
        cp, meta, notes = resume.find_resume_point(run_dir, c.run.resume) if run_dir is not None else (None, None, [])
        history = []
        if cp is not None:
            history = list(meta.get("history") or [])
            changes = check_resume_changes(c, meta, cp)
            if changes:
                history.append(dict(step=int(meta["step"]), changed=changes[0]))

        # The model: on resume, the checkpoint's own config and the run's tokenizer copy.
        if cp is not None:
            src = model_dir.from_config(meta["model_config"], f"run {run_dir}", run_dir / "tokenizer.json",
                                        c.model.model_path)
        else:
            m = c.model
            src = model_dir.resolve(m.model_dir, m.preset, m.tokenizer, shipped_tokenizer_path(), m.model_path)
        # Refuse up front when it will not fit (or the sequence exceeds the model), before allocating anything.
        machine = planmod.this_machine(c.engine.device)
        p = planmod.make_plan(src.spec, batch_size=c.data.batch_size, seq_len=c.data.seq_len,
                              micro_batch_size=c.engine.micro_batch_size, grad_clip=c.optim.grad_clip is not None,
                              machine=machine, compute_dtype=c.engine.compute_dtype,
                              offload_dir=c.engine.offload_dir, activation_memory=c.engine.activation_memory)
        if not p["fits"]:
            err.write(planmod.format_plan(p) + "\n")
            raise HorizonError(f"this run does not fit this machine ({src.name}); see the plan above")

        if src.tokenizer is None:
            raise HorizonError(f"{src.name} has no tokenizer.json; pass --tokenizer PATH")
        # The model's own chat template renders chat data (a resumed run reads the run's copy of
        # the tokenizer files, which hold a --chat-template given at the start as chat_template.jinja).
        tok = load_tokenizer(src.tokenizer, eos_id=eos_from_config(src.config),
                             chat_template_file=c.data.chat_template if cp is None else None)
        if tok.vocab_size > src.spec.vocab_size:
            raise HorizonError(f"tokenizer {src.tokenizer} has {tok.vocab_size} tokens, more than the model's "
                               f"vocab_size {src.spec.vocab_size}")

        if writer:
            if run_dir is None:
                run_dir = make_default_run_dir()
            else:
                run_dir.mkdir(parents=True, exist_ok=True)
            if lock is None:
                lock = DirLock(run_dir).acquire()
            for stale in ckpt.clean_stale(run_dir):
                log(f"removed {stale.name}, left in {stale.parent} by a checkpoint write that was killed")
        run_dir = Path(dp.from_rank0(str(run_dir)))
        if writer:
            # rank 0 tokenises (once, into the cache); the other ranks then map the cache
            ds = load_training_data(c.data, tok, c.data.seq_len, c.run.seed, fallback_dir=run_dir / "data-cache",
                                    log=log)
            for line in ds.report_lines():
                log(line)
        dp.barrier()
        if not writer:
            ds = load_training_data(c.data, tok, c.data.seq_len, c.run.seed, fallback_dir=run_dir / "data-cache")
        record = data_record(ds.train, tok)
        if cp is not None and isinstance(meta.get("data"), dict) and meta["data"]:
            was = {k: meta["data"].get(k) for k in record}
            if was != record:
                what = ", ".join(f"{k} {record[k]} (the run had {was[k]})" for k in record if was[k] != record[k])
                if not c.run.override:
                    raise HorizonError(f"--resume: the data is not the run's: {what}; the samples would differ "
                                       "from the run's order. Restore the data, or add --override to go on with it")
                history.append(dict(step=int(meta["step"]), changed={"data": [was, record]}))
        if writer:
            for note in notes:
                log(note)
            if cp is None:
                # byte-identical, so an export carries the model's tokenizer and chat template on
                copy_tokenizer_files(src.tokenizer, run_dir, chat_template=tok.template_override)
                write_json_atomic(run_dir / "model_config.json", src.config)
            write_json_atomic(run_dir / "train_config.json",
                              dict(c.to_flat(), resume=False, override=False, out=str(run_dir), history=history))

        resume.seed_everything(c.run.seed)
        trainer = make_trainer(src, c)
        start = position = 0
        if cp is not None:
            start, position = resume.restore(trainer, cp)
        return Session(c, run_dir, src, c.lr_schedule(), ds, trainer, machine, start, position, writer, world,
                       lock=lock, data_record=record, history=history)
    except BaseException:
        if lock is not None:
            lock.release()
        raise
