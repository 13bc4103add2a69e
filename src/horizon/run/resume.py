"""What a run saves to continue bit-identically and how it reads it back: the training
checkpoint (state tensors through io/checkpoint.py, plus meta.json: step, data position,
schedule, RNG states, model and run options) and the random seeds."""

from __future__ import annotations

import base64
import binascii
from pathlib import Path

from ..errors import HorizonError
from ..io import checkpoint as ckpt


def seed_everything(seed: int) -> None:
    import random

    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def rng_state() -> dict:
    import random

    import numpy as np
    import torch

    st = {
        "torch_cpu": base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode(),
        "python": repr(random.getstate()),
    }
    name, key, pos, has_gauss, gauss = np.random.get_state(legacy=True)
    st["numpy"] = {"name": name, "key": base64.b64encode(np.asarray(key, dtype=np.uint32).tobytes()).decode(),
                   "pos": int(pos), "has_gauss": int(has_gauss), "gauss": float(gauss)}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        st["torch_cuda"] = [base64.b64encode(s.numpy().tobytes()).decode() for s in torch.cuda.get_rng_state_all()]
    return st


def set_rng_state(st: dict) -> None:
    """Restores the RNG states `rng_state` recorded; HorizonError (one line) when they are not
    what it wrote."""
    import ast
    import random

    import numpy as np
    import torch

    if not isinstance(st, dict):
        raise HorizonError("the RNG state is not a JSON object")
    try:
        if "torch_cpu" in st:
            raw = np.frombuffer(base64.b64decode(st["torch_cpu"], validate=True), dtype=np.uint8).copy()
            torch.set_rng_state(torch.from_numpy(raw))
        if "python" in st:
            random.setstate(ast.literal_eval(st["python"]))
        if "numpy" in st:
            n = st["numpy"]
            key = np.frombuffer(base64.b64decode(n["key"], validate=True), dtype=np.uint32).copy()
            np.random.set_state((n["name"], key, n["pos"], n["has_gauss"], n["gauss"]))
        if "torch_cuda" in st and torch.cuda.is_available():
            states = [torch.from_numpy(np.frombuffer(base64.b64decode(s, validate=True), dtype=np.uint8).copy())
                      for s in st["torch_cuda"]]
            if len(states) == torch.cuda.device_count():
                torch.cuda.set_rng_state_all(states)
    except (TypeError, ValueError, KeyError, IndexError, SyntaxError, RuntimeError, MemoryError,
            RecursionError, binascii.Error) as e:
        raise HorizonError(f"the RNG state is unreadable ({type(e).__name__}: {str(e)[:80]})") from None


# ----------------------------------------------------------------------------- choosing the checkpoint
_SELECTED: dict = {}


def _signature(run_dir: Path) -> tuple:
    root = ckpt.checkpoints_dir(run_dir)
    sig = []
    for s in ckpt.list_checkpoints(run_dir):
        d = root / ckpt.step_dir_name(s)
        try:
            a, b = (d / ckpt.STATE_FILE).stat(), (d / ckpt.META_FILE).stat()
            sig.append((s, a.st_size, a.st_mtime_ns, b.st_size, b.st_mtime_ns))
        except OSError:
            sig.append((s,))
    try:
        sig.append((root / ckpt.LATEST).read_text())
    except OSError:
        pass
    return tuple(sig)


def select(run_dir) -> tuple:
    """(checkpoint, meta, notes): the newest intact checkpoint of a run (io/checkpoint.py's
    `select_checkpoint`), checked once per process while the run directory is unchanged (the
    options and the set-up of one invocation both ask)."""
    run_dir = Path(run_dir)
    key = str(run_dir.resolve())
    sig = _signature(run_dir)
    hit = _SELECTED.get(key)
    if hit is not None and hit[0] == sig:
        return hit[1]
    cp, meta, notes = ckpt.select_checkpoint(run_dir)
    if cp is not None:
        _check_meta(cp, meta)
    _SELECTED[key] = (sig, (cp, meta, notes))
    return cp, meta, notes


def _check_meta(cp, meta: dict) -> None:
    for key in ("model_config", "data_position"):
        if key not in meta:
            raise HorizonError(f"checkpoint {cp}: meta.json has no {key!r}; cannot resume from it")
    for key in ("step", "data_position", "trainer_step"):
        v = meta.get(key, 0)
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise HorizonError(f"checkpoint {cp}: meta.json has {key} {v!r}, not a non-negative integer")
    if not isinstance(meta.get("rng", {}), dict):
        raise HorizonError(f"checkpoint {cp}: meta.json has an RNG state that is not a JSON object")
    if "train_config" in meta and not isinstance(meta["train_config"], dict):
        raise HorizonError(f"checkpoint {cp}: meta.json has train_config that is not a JSON object")


def find_resume_point(run_dir, resume: bool):
    """(checkpoint, meta, notes) a run continues from ((None, None, []) for a fresh run);
    refuses a fresh run into a directory that already holds checkpoints. On resume the newest
    intact checkpoint is taken; `notes` say which damaged newer ones were passed over."""
    if resume:
        cp, meta, notes = select(run_dir)
        if cp is None:
            raise HorizonError(f"--resume: no checkpoint found under {run_dir}")
        return cp, meta, notes
    if ckpt.list_checkpoints(run_dir):
        raise HorizonError(f"{run_dir} already holds checkpoints of a run; continue it with --resume or choose another --out")
    return None, None, []


def saved_options(meta: dict) -> dict:
    """The options a checkpoint was written with (flat names), with the decay horizon of the
    recorded schedule made explicit: it is the one value of the schedule that followed --steps,
    so a resumed run keeps its schedule whatever --steps now says. (The final learning rate and
    the warm-up, when they were derived, derive again from the same --lr and horizon.)"""
    out = dict(meta.get("train_config") or {})
    sched = meta.get("lr_schedule")
    if isinstance(sched, dict) and isinstance(sched.get("decay_steps"), int):
        out["decay_steps"] = sched["decay_steps"]
    return out


def restore(trainer, cp, meta: dict | None = None) -> tuple[int, int]:
    """Loads a checkpoint into the trainer and the RNGs; returns (step, data position)."""
    with ckpt.open_checkpoint(cp) as (tensors, m):
        trainer.load_state_tensors(tensors)
    meta = meta or m
    trainer.step = int(meta.get("trainer_step", meta["step"]))
    try:
        set_rng_state(meta.get("rng", {}))
    except HorizonError as e:
        raise HorizonError(f"checkpoint {cp}: meta.json: {e}") from None
    return int(meta["step"]), int(meta["data_position"])


def save(run_dir, trainer, *, step: int, position: int, cfg, schedule, model_config: dict, writer: bool,
         world: int, data: dict | None = None, history: list | None = None):
    """Writes the checkpoint of `step` (rank 0 writes; every rank takes part in gathering a
    sharded state). Returns its path on the writer, None elsewhere."""
    tensors = trainer.state_tensors(rank0_only=True) if world > 1 else trainer.state_tensors()
    if not writer:
        return None
    meta = {
        "step": step, "trainer_step": int(trainer.step), "data_position": position,
        "seq_len": cfg.data.seq_len, "batch_size": cfg.data.batch_size, "seed": cfg.run.seed,
        "lr_schedule": dict(lr=schedule.peak, min_lr=schedule.final, warmup_steps=schedule.warmup,
                            decay_steps=schedule.horizon, next_lr=schedule.lr_at(step)),
        "rng": rng_state(), "model_config": model_config, "train_config": cfg.to_flat(),
        "data": data or {}, "history": history or [],
        "stats": {k: (float(v) if isinstance(v, float) else v) for k, v in dict(trainer.stats).items()},
    }
    return ckpt.save_checkpoint(run_dir, step, tensors, meta, keep=cfg.run.keep_checkpoints)
