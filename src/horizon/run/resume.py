"""What a run saves to continue bit-identically and how it reads it back: the training
checkpoint (state tensors through io/checkpoint.py, plus meta.json: step, data position,
schedule, RNG states, model and run options) and the random seeds."""

from __future__ import annotations

import base64

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
    import ast
    import random

    import numpy as np
    import torch

    if "torch_cpu" in st:
        raw = np.frombuffer(base64.b64decode(st["torch_cpu"]), dtype=np.uint8).copy()
        torch.set_rng_state(torch.from_numpy(raw))
    if "python" in st:
        random.setstate(ast.literal_eval(st["python"]))
    if "numpy" in st:
        n = st["numpy"]
        key = np.frombuffer(base64.b64decode(n["key"]), dtype=np.uint32).copy()
        np.random.set_state((n["name"], key, n["pos"], n["has_gauss"], n["gauss"]))
    if "torch_cuda" in st and torch.cuda.is_available():
        states = [torch.from_numpy(np.frombuffer(base64.b64decode(s), dtype=np.uint8).copy()) for s in st["torch_cuda"]]
        if len(states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(states)




def find_resume_point(run_dir, resume: bool):
    """The checkpoint a run continues from (None for a fresh run); refuses a fresh run into a
    directory that already holds one."""
    if resume:
        cp = ckpt.latest_checkpoint(run_dir)
        if cp is None:
            raise HorizonError(f"--resume: no checkpoint found under {run_dir}")
        meta = ckpt.read_meta(cp)
        for key in ("model_config", "data_position"):
            if key not in meta:
                raise HorizonError(f"checkpoint {cp}: meta.json has no {key!r}; cannot resume from it")
        return cp, meta
    if ckpt.list_checkpoints(run_dir):
        raise HorizonError(f"{run_dir} already holds checkpoints of a run; continue it with --resume or choose another --out")
    return None, None


def restore(trainer, cp) -> tuple[int, int]:
    """Loads a checkpoint into the trainer and the RNGs; returns (step, data position)."""
    with ckpt.open_checkpoint(cp) as (tensors, meta):
        trainer.load_state_tensors(tensors)
    trainer.step = int(meta.get("trainer_step", meta["step"]))
    set_rng_state(meta.get("rng", {}))
    return int(meta["step"]), int(meta["data_position"])


def save(run_dir, trainer, *, step: int, position: int, cfg, schedule, model_config: dict, writer: bool,
         world: int):
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
        "stats": {k: (float(v) if isinstance(v, float) else v) for k, v in dict(trainer.stats).items()},
    }
    return ckpt.save_checkpoint(run_dir, step, tensors, meta, keep=cfg.run.keep_checkpoints)
