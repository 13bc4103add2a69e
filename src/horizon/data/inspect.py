"""`horizon data inspect`: the first samples of a run as the model will see them, as text with the
trained spans marked, plus what reading and packing the data counted."""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

import numpy as np

from .config import DataConfig
from .dataset import TrainingData, load_training_data
from .packing import IGNORE_INDEX, DocumentDataset
from .tokenizer import TextTokenizer

TRAINED_OPEN, TRAINED_CLOSE = "[[", "]]"
ANSI_TRAINED, ANSI_DIM, ANSI_RESET = "\x1b[1;32m", "\x1b[2m", "\x1b[0m"


def _marks(color: bool):
    if color:
        return ANSI_TRAINED, ANSI_RESET
    return TRAINED_OPEN, TRAINED_CLOSE


def render_tokens(tok: TextTokenizer, ids: np.ndarray, trained: np.ndarray, color: bool = False) -> str:
    """The text of `ids` with the runs of trained tokens marked (`[[...]]`, or bold green with
    `color`). Each run is decoded on its own, so the marks fall on token boundaries."""
    open_m, close_m = _marks(color)
    out = []
    i, n = 0, int(ids.shape[0])
    while i < n:
        j = i
        while j < n and bool(trained[j]) == bool(trained[i]):
            j += 1
        text = tok.decode(ids[i:j])
        out.append(f"{open_m}{text}{close_m}" if trained[i] else text)
        i = j
    return "".join(out)


def render_sample(ds: DocumentDataset, tok: TextTokenizer, position: int, color: bool = False) -> str:
    """Sample `position` of the run: each document (piece) in it, its trained tokens marked, the
    boundaries where positions restart, and the padding."""
    seq = ds.sequence_of(position)
    ids, labels, pos, real = ds.sequence(seq)
    starts = [i for i in range(real) if pos[i] == 0] + [real]
    docs = ds.pieces.doc[ds.pieces_of(seq)]
    head = (f"--- sample {position} (sequence {seq}): {len(starts) - 1} document(s), {real} tokens,"
            f" {int((labels != IGNORE_INDEX).sum())} trained, {ds.seq_len - real} padding ---")
    lines = [head]
    for k in range(len(starts) - 1):
        a, b = starts[k], starts[k + 1]
        if k:
            sep = f"--- document {int(docs[k])} (positions restart at 0) ---"
            lines.append(f"{ANSI_DIM}{sep}{ANSI_RESET}" if color else sep)
        lines.append(render_tokens(tok, ids[a:b], labels[a:b] != IGNORE_INDEX, color))
    if real < ds.seq_len:
        pad = f"[padding: {ds.seq_len - real} tokens]"
        lines.append(f"{ANSI_DIM}{pad}{ANSI_RESET}" if color else pad)
    return "\n".join(lines)


def format_counts(data: TrainingData) -> list[str]:
    lines = []
    n_src = len(data.sources)
    lines.append(f"sources: {n_src} file(s)" + (f", {data.records} records" if data.records else "")
                 + f", {data.bad_records} bad records skipped")
    for ds in (data.train, data.eval):
        if ds is None:
            continue
        c = ds.summary()
        lines.append(
            f"{ds.name}: documents {c['documents']}, pieces {c['pieces']}, sequences {c['sequences']} of"
            f" {c['seq_len']} ({'packed' if c['packing'] == 'on' else 'padded'}, {100 * c['fill']:.1f}% filled),"
            f" tokens {c['tokens']}, trained tokens {c['label_tokens']}, truncated {c['truncated']},"
            f" split {c['split']} (into {c['split_pieces']} pieces), dropped {c['dropped_long']} (too long)"
            f" + {c['dropped_untrained']} (no trained tokens)"
        )
    for line in data.bad_examples():
        lines.append(f"bad record: {line}")
    return lines


def inspect_data(cfg: DataConfig, tokenizer: TextTokenizer, seq_len: int, *, n: int = 3, seed: int = 0,
                 color: bool | None = None, stream=None, fallback_dir=None) -> str:
    """Renders the first `n` training samples of a run with these options as the model will see
    them (trained text marked: `[[...]]`, or bold green on a terminal), after the counts (documents,
    tokens, trained tokens, truncated, split, dropped, bad records). Returns the text; `color`
    defaults to whether `stream` (default stdout) is a terminal. Token caches go beside the data,
    else into `fallback_dir` (default: a directory under the system's temp dir)."""
    stream = stream or sys.stdout
    if color is None:
        color = hasattr(stream, "isatty") and stream.isatty() and os.environ.get("NO_COLOR") is None
    if fallback_dir is None:
        fallback_dir = Path(tempfile.gettempdir()) / "horizon-data-cache"
    data = load_training_data(cfg, tokenizer, seq_len, seed, fallback_dir=fallback_dir)
    parts = format_counts(data)
    for p in range(min(int(n), data.train.n_sequences)):
        parts.append(render_sample(data.train, tokenizer, p, color=bool(color)))
    return "\n".join(parts) + "\n"


def tokenizer_for(model_dir=None, tokenizer=None, chat_template=None) -> TextTokenizer:
    """The tokenizer `horizon data inspect` renders with: `tokenizer` (a tokenizer.json or its
    directory), else `model_dir`'s (its config.json's eos_token_id taken when present), else the
    shipped one; `chat_template` (`--chat-template FILE`) replaces the model's template."""
    import json

    from ..errors import HorizonError
    from .tokenizer import eos_from_config, load_tokenizer, shipped_tokenizer_path

    eos = None
    if model_dir is not None:
        d = Path(model_dir).expanduser()
        if not d.is_dir():
            raise HorizonError(f"model directory {str(model_dir)!r} does not exist or is not a directory")
        try:
            eos = eos_from_config(json.loads((d / "config.json").read_text()))
        except (OSError, ValueError, AttributeError):
            eos = None
        if tokenizer is None:
            if not (d / "tokenizer.json").is_file():
                raise HorizonError(f"model directory {str(model_dir)!r} has no tokenizer.json; pass --tokenizer PATH")
            tokenizer = d / "tokenizer.json"
    if tokenizer is None:
        tokenizer = shipped_tokenizer_path()
    return load_tokenizer(tokenizer, eos_id=eos, chat_template_file=chat_template)


__all__ = ["inspect_data", "render_sample", "render_tokens", "format_counts", "tokenizer_for"]
