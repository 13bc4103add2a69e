"""The token cache: each data file is tokenised once into a memory-mapped token file next to it.

`DATA.tokens` holds the token ids (uint16 when the vocabulary fits, else uint32), followed, for
files with chat data, by one byte per token saying whether the token is trained. `DATA.tokens.json`
is the header: format version, sizes, and the digests of the data file and tokenizer it was built
from; when either changes the cache is rebuilt. Both files are written to temporaries, fsynced and
renamed, header last, so a reader never sees a half-written cache. When the data's directory is
not writable the cache goes to a fallback directory (the run's out dir).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import HorizonError
from .sources import read_documents
from .tokenizer import TextTokenizer
from ..io.files import fsync_dir as _fsync_dir

CACHE_VERSION = 2
_ENCODE_BATCH = 256


@dataclass
class TokenFile:
    """One data file's tokens (memory-mapped) and, for chat data, its trained-token mask."""

    source: Path
    path: Path
    ids: np.ndarray
    mask: np.ndarray | None

    def __len__(self) -> int:
        return int(self.ids.shape[0])


def file_digest(path: Path) -> str:
    h = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 22), b""):
                h.update(block)
    except IsADirectoryError:
        raise HorizonError(f"data path {str(path)!r} is a directory, expected a file") from None
    except OSError as e:
        raise HorizonError(f"cannot read data file {str(path)!r}: {e.strerror or e}") from None
    return h.hexdigest()


def _cache_paths(data: Path, digest: str, fallback_dir: Path | None) -> list[Path]:
    """Candidate locations for the cache, in order of preference."""
    out = [data.with_name(data.name + ".tokens")]
    if fallback_dir is not None:
        out.append(Path(fallback_dir) / f"{data.name}-{digest[:16]}.tokens")
    return out


def _header_path(tokens: Path) -> Path:
    return tokens.with_name(tokens.name + ".json")


def _load(tokens: Path, expect: dict) -> TokenFile | None:
    hp = _header_path(tokens)
    try:
        header = json.loads(hp.read_text())
    except (OSError, ValueError):
        return None
    if any(header.get(k) != v for k, v in expect.items()):
        return None
    n, dtype, has_mask = header.get("n_tokens"), header.get("dtype"), header.get("has_mask")
    if not isinstance(n, int) or dtype not in ("uint16", "uint32"):
        return None
    item = np.dtype(dtype).itemsize
    want = n * item + (n if has_mask else 0)
    try:
        if tokens.stat().st_size != want:
            return None
    except OSError:
        return None
    if n == 0:
        return TokenFile(Path(header.get("source", "")), tokens, np.zeros(0, dtype=dtype), None)
    ids = np.memmap(tokens, dtype=dtype, mode="r", shape=(n,))
    mask = np.memmap(tokens, dtype=np.uint8, mode="r", offset=n * item, shape=(n,)) if has_mask else None
    return TokenFile(Path(header.get("source", "")), tokens, ids, mask)


def _tokenise(data: Path, tok: TextTokenizer):
    """Returns (ids uint32 array, mask uint8 array or None)."""
    ids_parts: list[np.ndarray] = []
    mask_parts: list[np.ndarray] = []
    any_masked = False
    pending: list[tuple[list[tuple[str, bool]], bool]] = []
    content = [0]  # tokens other than the end-of-text separators

    def flush():
        nonlocal any_masked
        texts = [t for segs, _ in pending for t, _ in segs]
        encoded = tok.encode_many(texts) if texts else []
        k = 0
        for segs, ends in pending:
            for _, trained in segs:
                e = np.asarray(encoded[k], dtype=np.uint32)
                k += 1
                content[0] += e.shape[0]
                ids_parts.append(e)
                mask_parts.append(np.full(e.shape[0], 1 if trained else 0, dtype=np.uint8))
                any_masked |= not trained and e.shape[0] > 0
            if ends:
                # After plain text, end-of-text is a target (the model learns where documents
                # end); a chat ends with the assistant's end-of-turn, so its separator is context.
                chat = not all(trained for _, trained in segs)
                ids_parts.append(np.asarray([tok.eos_id], dtype=np.uint32))
                mask_parts.append(np.full(1, 0 if chat else 1, dtype=np.uint8))
        pending.clear()

    n_texts = 0
    for segs, ends in read_documents(data):
        pending.append((segs, ends))
        n_texts += len(segs)
        if n_texts >= _ENCODE_BATCH:
            flush()
            n_texts = 0
    flush()
    ids = np.concatenate(ids_parts) if ids_parts else np.zeros(0, dtype=np.uint32)
    mask = np.concatenate(mask_parts) if any_masked else None
    return ids, mask, content[0]


def _write_atomic(path: Path, chunks) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            for c in chunks:
                f.write(c)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            tmp.unlink()
        except OSError:
            pass
        raise


def _store(tokens: Path, header: dict, ids: np.ndarray, mask: np.ndarray | None) -> None:
    tokens.parent.mkdir(parents=True, exist_ok=True)
    chunks = [ids.tobytes()] + ([mask.tobytes()] if mask is not None else [])
    _write_atomic(tokens, chunks)
    _write_atomic(_header_path(tokens), [json.dumps(header, indent=1).encode()])
    _fsync_dir(tokens.parent)


def token_file(data, tok: TextTokenizer, fallback_dir=None, log=None) -> TokenFile:
    """The tokens of one data file, from the cache when it is current, else tokenised now."""
    data = Path(data)
    if not data.is_file():
        raise HorizonError(f"data file {str(data)!r} does not exist or is not a file")
    digest = file_digest(data)
    expect = {
        "version": CACHE_VERSION,
        "source": str(data),
        "data_sha256": digest,
        "tokenizer_sha256": tok.digest,
        "eos_id": tok.eos_id,
    }
    # The source path is informative; the digests decide whether the cache is current.
    match = {k: v for k, v in expect.items() if k != "source"}
    candidates = _cache_paths(data, digest, fallback_dir)
    for c in candidates:
        got = _load(c, match)
        if got is not None:
            got.source = data
            return got
    if log:
        log(f"tokenising {data} ...")
    ids, mask, content = _tokenise(data, tok)
    if content == 0:
        raise HorizonError(f"data file {str(data)!r} is empty (no text to train on)")
    if ids.max(initial=0) >= tok.vocab_size:
        raise HorizonError(f"tokenizer produced id {int(ids.max())} outside its vocabulary")
    dtype = "uint16" if tok.vocab_size <= 65536 else "uint32"
    ids = ids.astype(dtype)
    header = dict(expect, n_tokens=int(ids.shape[0]), dtype=dtype, has_mask=mask is not None)
    last_err = None
    for c in candidates:
        try:
            _store(c, header, ids, mask)
        except OSError as e:
            last_err = e
            continue
        got = _load(c, match)
        if got is not None:
            got.source = data
            return got
    where = ", ".join(str(c.parent) for c in candidates)
    raise HorizonError(
        f"cannot write the token cache for {str(data)!r} (tried {where}): "
        f"{getattr(last_err, 'strerror', None) or last_err}"
    )
