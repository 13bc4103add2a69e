"""`horizon export`: a run's checkpoint as a Hugging Face model directory (config.json,
safetensors, the run's tokenizer files byte-identical, generation_config.json)."""

from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path

from safetensors import SafetensorError

from ..errors import HorizonError
from ..io import checkpoint as ckpt
from ..io import model_dir
from ..io.files import fsync_dir, fsync_file
from ..io.tokenizer_files import export_tokenizer_files
from ..trainer import Trainer


def export(run_dir, out_dir, step: int | None = None) -> Path:
    """Writes the run's latest (or `step`) checkpoint as a Hugging Face model directory.

    Atomic: everything is written into a temporary sibling of `out_dir`, then renamed into
    place (an earlier export there is replaced as a whole), so a failure (a full disk) leaves
    no partial directory. Refuses an empty path, the run directory itself (or a directory
    holding it) and an existing directory that is neither empty nor a model directory."""
    if out_dir is None or not str(out_dir).strip():
        raise HorizonError("export needs a non-empty --out directory")
    run_dir = Path(run_dir).expanduser()
    if not run_dir.exists():
        raise HorizonError(f"run directory {str(run_dir)!r} does not exist")
    if not run_dir.is_dir():
        raise HorizonError(f"run directory {str(run_dir)!r} is not a directory")
    out_dir = Path(out_dir).expanduser()
    target, run = out_dir.resolve(), run_dir.resolve()
    if target == run or target in run.parents:
        raise HorizonError(f"--out {str(out_dir)!r} is the run directory {str(run_dir)!r} or holds it; "
                           "export into a directory of its own")
    if target.exists():
        if not target.is_dir():
            raise HorizonError(f"--out {str(out_dir)!r} exists and is not a directory")
        names = {p.name for p in target.iterdir()}
        if names and not ({"config.json"} <= names and any(n.endswith(".safetensors") for n in names)):
            raise HorizonError(f"--out {str(out_dir)!r} is a directory that holds other files than an exported "
                               "model; choose an empty or new directory")
    if step is None:
        cp = ckpt.latest_checkpoint(run_dir)
        if cp is None:
            raise HorizonError(f"{run_dir} holds no checkpoint to export")
    else:
        cp = ckpt.checkpoints_dir(run_dir) / ckpt.step_dir_name(step)
        if not cp.is_dir():
            raise HorizonError(f"{run_dir} has no checkpoint for step {step} (have {ckpt.list_checkpoints(run_dir)})")
    tensors, meta = ckpt.load_checkpoint(cp)
    # the model path the run trained with (its state tensors are that path's layers)
    path = (meta.get("train_config") or {}).get("model_path", "auto")
    src = model_dir.from_config(meta.get("model_config"), f"checkpoint {cp}", model_path=path)
    trainer = Trainer.from_config(src.config, seed=0, device="cpu", model_path=path)
    trainer.load_state_tensors(tensors)
    del tensors

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    old = target.with_name(f".{target.name}.old-{os.getpid()}")
    try:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
        trainer.save_pretrained(str(tmp))
        if (run_dir / "tokenizer.json").is_file():
            # byte-identical tokenizer files (chat template included) and generation_config.json
            export_tokenizer_files(run_dir, tmp, src.config)
        _readable_files(tmp)
        for f in tmp.iterdir():
            fsync_file(f)
        fsync_dir(tmp)
        if target.exists():
            os.replace(target, old)
        os.replace(tmp, target)
        fsync_dir(target.parent)
    except (OSError, SafetensorError) as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if old.exists() and not target.exists():
            os.replace(old, target)  # put the earlier export back
        text = " ".join(str(e).split())
        full = getattr(e, "errno", None) == errno.ENOSPC or "os error 28" in text.lower() or "no space left" in text.lower()
        why = "no space left on device" if full else (getattr(e, "strerror", None) or text)
        raise HorizonError(f"could not export to {str(out_dir)!r} ({why}); nothing was written there") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(old, ignore_errors=True)
    return out_dir


def _readable_files(d: Path) -> None:
    """Gives every exported file the mode a new file gets here (the umask's), whatever mode a
    writer library chose (safetensors writes 0600)."""
    umask = os.umask(0)
    os.umask(umask)
    for f in d.iterdir():
        if f.is_file():
            os.chmod(f, 0o666 & ~umask)

