"""`horizon export`: a run's checkpoint as a Hugging Face model directory (config.json,
safetensors, the run's tokenizer)."""

from __future__ import annotations

import shutil
from pathlib import Path

from ..data import TextTokenizer
from ..errors import HorizonError
from ..io import checkpoint as ckpt
from ..io import model_dir
from ..trainer import Trainer
from .session import write_json_atomic


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
    tok = run_dir / "tokenizer.json"
    if tok.is_file():
        shutil.copyfile(tok, out_dir / "tokenizer.json")
        _write_tokenizer_config(out_dir, src.config)
    return out_dir


def _write_tokenizer_config(out_dir: Path, config: dict) -> None:
    try:
        t = TextTokenizer(out_dir / "tokenizer.json", eos_id=None)
        eos = t.tok.id_to_token(t.eos_id)
    except HorizonError:
        eos = None
    cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": config.get("max_position_embeddings")}
    if eos is not None:
        cfg.update(eos_token=eos, bos_token=eos, pad_token=eos)
    write_json_atomic(out_dir / "tokenizer_config.json", cfg)
