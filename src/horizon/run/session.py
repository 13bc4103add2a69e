"""Everything a run sets up before its first step, in the order that refuses bad input before
anything is allocated or written: the run directory and the checkpoint to resume, the model, the
plan (does it fit?), the tokenizer and the data, the trainer and its restored state.

A run directory (`--out`) holds `metrics.jsonl`, `loss.png`, `train_config.json` (the options of
the run, the base of a `--resume`), `model_config.json`, `tokenizer.json` (a copy, so the run is
self-contained), `data-cache/` (token caches when the data's own directory is not writable) and
`checkpoints/`.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from .. import distributed as dp
from .. import plan as planmod
from ..data import TextTokenizer, eos_from_config, load_dataset, shipped_corpus_path, shipped_tokenizer_path
from ..errors import HorizonError
from ..io import model_dir
from ..io.model_dir import ModelSource
from ..trainer import Trainer
from . import resume
from .config import TrainConfig
from .schedule import LRSchedule


@dataclass
class Session:
    cfg: TrainConfig
    run_dir: Path
    src: ModelSource
    schedule: LRSchedule
    dataset: object
    trainer: Trainer
    machine: object
    start: int          # the step the run starts from (0, or the resumed checkpoint's)
    position: int       # sequences of the data consumed so far
    writer: bool        # rank 0: writes the run directory
    world: int

    def save(self, step: int):
        path = resume.save(self.run_dir, self.trainer, step=step, position=self.position, cfg=self.cfg,
                           schedule=self.schedule, model_config=self.src.config, writer=self.writer,
                           world=self.world)
        return path


def default_out() -> Path:
    return Path("runs") / time.strftime("%Y%m%d-%H%M%S")


def write_json_atomic(path: Path, obj) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=1, sort_keys=True))
    os.replace(tmp, path)


def make_trainer(src: ModelSource, c: TrainConfig) -> Trainer:
    kw = dict(optim=c.optim, engine=c.engine)
    try:
        if src.model_dir is not None:
            return Trainer.from_pretrained(str(src.model_dir), **kw)
        return Trainer.from_config(src.config, seed=c.run.seed, **kw)
    except NotImplementedError as e:
        arch = (src.config.get("architectures") or ["?"])[0]
        raise HorizonError(f"{arch} is not supported by the trainer yet: {e}") from None


def open_session(c: TrainConfig, *, log, err, rank: int, world: int) -> Session:
    """Sets the run up; `log` receives rank 0's messages, `err` the plan of a run that does not fit."""
    writer = rank == 0
    run_dir = Path(c.run.out).expanduser() if c.run.out else Path(dp.from_rank0(str(default_out())))
    if c.run.resume and not c.run.out:
        raise HorizonError("--resume needs --out RUN_DIR (the run to continue)")
    cp, meta = resume.find_resume_point(run_dir, c.run.resume)

    # The model: on resume, the checkpoint's own config and the run's tokenizer copy.
    if cp is not None:
        src = model_dir.from_config(meta["model_config"], f"run {run_dir}", run_dir / "tokenizer.json")
    else:
        m = c.model
        src = model_dir.resolve(m.model_dir, m.preset, m.tokenizer, shipped_tokenizer_path())
    # Refuse up front when it will not fit (or the sequence exceeds the model), before allocating anything.
    machine = planmod.this_machine(c.engine.device)
    p = planmod.make_plan(src.spec, batch_size=c.data.batch_size, seq_len=c.data.seq_len,
                          micro_batch_size=c.engine.micro_batch_size, grad_clip=c.optim.grad_clip is not None,
                          machine=machine, offload_dir=c.engine.offload_dir)
    if not p["fits"]:
        err.write(planmod.format_plan(p) + "\n")
        raise HorizonError(f"this run does not fit this machine ({src.name}); see the plan above")

    if src.tokenizer is None:
        raise HorizonError(f"{src.name} has no tokenizer.json; pass --tokenizer PATH")
    tok = TextTokenizer(src.tokenizer, eos_id=eos_from_config(src.config))
    if tok.vocab_size > src.spec.vocab_size:
        raise HorizonError(f"tokenizer {src.tokenizer} has {tok.vocab_size} tokens, more than the model's "
                           f"vocab_size {src.spec.vocab_size}")

    paths = c.data.paths or [str(shipped_corpus_path())]
    if writer:
        run_dir.mkdir(parents=True, exist_ok=True)
        # rank 0 tokenises (once, into the cache); the other ranks then map the cache
        ds = load_dataset(paths, tok, c.data.seq_len, c.run.seed, fallback_dir=run_dir / "data-cache", log=log)
        if cp is None:
            if src.tokenizer.resolve() != (run_dir / "tokenizer.json").resolve():
                shutil.copyfile(src.tokenizer, run_dir / "tokenizer.json")
            write_json_atomic(run_dir / "model_config.json", src.config)
        write_json_atomic(run_dir / "train_config.json", dict(c.to_flat(), resume=False, out=str(run_dir)))
    dp.barrier()
    if not writer:
        ds = load_dataset(paths, tok, c.data.seq_len, c.run.seed, fallback_dir=run_dir / "data-cache")

    resume.seed_everything(c.run.seed)
    trainer = make_trainer(src, c)
    start = position = 0
    if cp is not None:
        start, position = resume.restore(trainer, cp)
    return Session(c, run_dir, src, c.lr_schedule(), ds, trainer, machine, start, position, writer, world)
