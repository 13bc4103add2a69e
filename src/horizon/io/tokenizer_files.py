"""Tokenizer files travel unchanged: from the source model's directory into the run directory, and
from there into every export, byte for byte (tokenizer.json, tokenizer_config.json,
special_tokens_map.json, chat templates, SentencePiece models, vocab/merges files, added tokens,
whichever the source had), plus the model's `generation_config.json` (the source's when it had
one, else one built from the model config's bos/eos/pad ids)."""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import HorizonError
from .files import fsync_dir, write_atomic

TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
    "chat_template.jinja", "chat_template.json", "tokenizer.model", "spiece.model",
    "sentencepiece.bpe.model", "vocab.json", "merges.txt", "vocab.txt",
)
CHAT_TEMPLATE_DIR = "additional_chat_templates"
GENERATION_CONFIG = "generation_config.json"


def _copy_atomic(src: Path, dst: Path) -> None:
    write_atomic(dst, [Path(src).read_bytes()])


def _write_atomic(dst: Path, data: bytes) -> None:
    write_atomic(dst, [data])


def tokenizer_files(source) -> dict[str, Path]:
    """The tokenizer files of `source` (a model/run directory, or a tokenizer.json path, whose
    directory's files then come along) as {name in the destination: path}. A tokenizer file not
    named tokenizer.json is taken as the tokenizer.json."""
    p = Path(source).expanduser()
    if p.is_file():
        out = {"tokenizer.json": p}
        d = p.parent
        if p.name != "tokenizer.json":
            return out  # a lone tokenizer file: its directory's other files are not its own
    elif p.is_dir():
        d, out = p, {}
    else:
        raise HorizonError(f"tokenizer source {str(source)!r} does not exist")
    for name in TOKENIZER_FILES:
        f = d / name
        if f.is_file() and name not in out:
            out[name] = f
    tdir = d / CHAT_TEMPLATE_DIR
    if tdir.is_dir():
        for f in sorted(tdir.glob("*.jinja")):
            out[f"{CHAT_TEMPLATE_DIR}/{f.name}"] = f
    return out


def copy_tokenizer_files(source, dest_dir, *, generation_config: bool = True, chat_template: str | None = None) -> list[str]:
    """Copies the tokenizer files of `source` (a model directory or its tokenizer.json; a tokenizer
    file of another name alone) byte-identical into `dest_dir` (and the directory's
    generation_config.json with `generation_config`); with `chat_template` (the text of a
    `--chat-template` file) that template is written as chat_template.jinja, which transformers
    prefers to the one in tokenizer_config.json. Returns the names written, sorted. Files the
    source lacks are left alone in `dest_dir` unless they are stale tokenizer files, which are
    removed so the destination holds exactly the source's set."""
    files = tokenizer_files(source)
    if "tokenizer.json" not in files:
        raise HorizonError(f"{str(source)!r} has no tokenizer.json")
    src = Path(source).expanduser()
    src_dir = src if src.is_dir() else src.parent
    # A model directory, or its tokenizer.json: the directory's generation config comes along.
    own_dir = src.is_dir() or src.name == "tokenizer.json"
    if generation_config and own_dir and (src_dir / GENERATION_CONFIG).is_file():
        files[GENERATION_CONFIG] = src_dir / GENERATION_CONFIG
    dest = Path(dest_dir).expanduser()
    dest.mkdir(parents=True, exist_ok=True)
    try:
        same = dest.resolve() == src_dir.resolve()
    except OSError:
        same = False
    written = []
    for name, src in files.items():
        dst = dest / name
        if same and dst.resolve() == src.resolve():
            written.append(name)
            continue
        dst.parent.mkdir(parents=True, exist_ok=True)
        _copy_atomic(src, dst)
        written.append(name)
    if chat_template is not None:
        _write_atomic(dest / "chat_template.jinja", chat_template.encode("utf-8"))
        if "chat_template.jinja" not in written:
            written.append("chat_template.jinja")
    if not same:
        for name in TOKENIZER_FILES:
            if name not in written and (dest / name).is_file():
                (dest / name).unlink()
    fsync_dir(dest)
    return sorted(written)


def generation_config_from_model_config(config: dict) -> dict:
    """The generation config transformers derives from a model config: its bos/eos/pad (and
    decoder start) token ids, marked as taken from the model config."""
    out = {"_from_model_config": True}
    for key in ("bos_token_id", "eos_token_id", "pad_token_id", "decoder_start_token_id"):
        v = config.get(key)
        if v is not None:
            out[key] = v
    return out


def write_generation_config(dest_dir, model_config: dict, source_dir=None) -> Path:
    """Writes `dest_dir/generation_config.json`: a byte copy of `source_dir`'s when it has one,
    else one built from `model_config`'s token ids."""
    dest = Path(dest_dir).expanduser()
    dest.mkdir(parents=True, exist_ok=True)
    out = dest / GENERATION_CONFIG
    if source_dir is not None:
        src = Path(source_dir).expanduser() / GENERATION_CONFIG
        if src.is_file():
            if src.resolve() != out.resolve():
                _copy_atomic(src, out)
            return out
    _write_atomic(out, (json.dumps(generation_config_from_model_config(model_config), indent=2) + "\n").encode())
    return out


def write_minimal_tokenizer_config(dest_dir, model_config: dict, eos_token: str | None) -> Path | None:
    """For a tokenizer that came without a tokenizer_config.json (the shipped one): a minimal one
    so transformers can load the export. Leaves an existing tokenizer_config.json alone."""
    out = Path(dest_dir) / "tokenizer_config.json"
    if out.is_file():
        return None
    cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": model_config.get("max_position_embeddings")}
    if eos_token is not None:
        cfg.update(eos_token=eos_token, bos_token=eos_token, pad_token=eos_token)
    _write_atomic(out, (json.dumps(cfg, indent=2) + "\n").encode())
    return out


def export_tokenizer_files(run_dir, export_dir, model_config: dict) -> list[str]:
    """An export's tokenizer side: the run's tokenizer files byte-identical, a minimal
    tokenizer_config.json when the run has none, and generation_config.json (the run's copy of the
    source's, else built from `model_config`). Returns the names written."""
    run_dir, export_dir = Path(run_dir).expanduser(), Path(export_dir).expanduser()
    written = copy_tokenizer_files(run_dir, export_dir, generation_config=False)
    if "tokenizer_config.json" not in written:
        eos = None
        try:
            from ..data.tokenizer import TextTokenizer

            t = TextTokenizer(export_dir / "tokenizer.json", eos_id=None)
            eos = t.tok.id_to_token(t.eos_id)
        except HorizonError:
            pass
        if write_minimal_tokenizer_config(export_dir, model_config, eos) is not None:
            written.append("tokenizer_config.json")
    write_generation_config(export_dir, model_config, source_dir=run_dir)
    written.append(GENERATION_CONFIG)
    return sorted(written)


__all__ = ["TOKENIZER_FILES", "tokenizer_files", "copy_tokenizer_files", "write_generation_config",
           "generation_config_from_model_config", "write_minimal_tokenizer_config", "export_tokenizer_files"]
