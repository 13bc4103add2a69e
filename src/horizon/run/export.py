"""`horizon export`: a run's checkpoint as a Hugging Face model directory (config.json,
safetensors, the run's tokenizer files byte-identical, generation_config.json)."""

from __future__ import annotations

from pathlib import Path

from ..errors import HorizonError
from ..io import checkpoint as ckpt
from ..io import model_dir
from ..io.tokenizer_files import export_tokenizer_files
from ..trainer import Trainer


def export(run_dir, out_dir, step: int | None = None) -> Path:
    """Writes the run's latest (or `step`) checkpoint as a Hugging Face model directory."""
    run_dir = Path(run_dir).expanduser()
    if not run_dir.is_dir():
        raise HorizonError(f"run directory {str(run_dir)!r} does not exist")
    if step is None:
        cp = ckpt.latest_checkpoint(run_dir)
        if cp is None:
            raise HorizonError(f"{run_dir} holds no checkpoint to export")
    else:
        cp = ckpt.checkpoints_dir(run_dir) / ckpt.step_dir_name(step)
        if not cp.is_dir():
            raise HorizonError(f"{run_dir} has no checkpoint for step {step} (have {ckpt.list_checkpoints(run_dir)})")
    tensors, meta = ckpt.load_checkpoint(cp)
    src = model_dir.from_config(meta.get("model_config"), f"checkpoint {cp}")
    trainer = Trainer.from_config(src.config, seed=0, device="cpu")
    trainer.load_state_tensors(tensors)
    del tensors
    out_dir = Path(out_dir).expanduser()
    out_dir.mkdir(parents=True, exist_ok=True)
    trainer.save_pretrained(str(out_dir))
    if (run_dir / "tokenizer.json").is_file():
        # byte-identical tokenizer files (chat template included) and generation_config.json
        export_tokenizer_files(run_dir, out_dir, src.config)
    return out_dir
