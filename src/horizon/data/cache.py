"""The token cache: each data source is tokenised once into a memory-mapped token file next to it.

`DATA.tokens` holds the token ids (uint16 when the vocabulary fits, else uint32), then, for data
with untrained tokens (chat, prompt/completion), one byte per token saying whether the token is
trained, then the document boundaries (n_docs + 1 uint64 offsets). `DATA.tokens.json` is the
header: format version, sizes, counts (records, bad records skipped) and the digests of the data,
the tokenizer and everything else deciding the tokens (chat template, field map, options); when
any changes the cache is rebuilt. Both files are written to temporaries, fsynced and renamed,
header last, so a reader never sees a half-written cache. When the data's directory is not
writable the cache goes to a fallback directory (the run's out dir).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import HorizonError
from .render import DocumentEncoder
from .sources import BadRecord, file_kind, hf_arrow_files, hf_split_dir, read_documents
from .tokenizer import TextTokenizer
from ..io.files import fsync_dir as _fsync_dir
from ..io.files import write_atomic

CACHE_VERSION = 3
_ENCODE_BATCH = 256
BAD_EXAMPLES = 5  # bad-record lines kept in the header for the report


@dataclass
class TokenFile:
    """One data source's tokens (memory-mapped), its trained-token mask (None: all trained) and
    its document boundaries (`docs[i]:docs[i+1]` is document i)."""

    source: Path
    path: Path
    ids: np.ndarray
    mask: np.ndarray | None
    docs: np.ndarray | None = None
    n_records: int = 0
    bad_records: int = 0
    bad_examples: list = field(default_factory=list)

    def __len__(self) -> int:
        return int(self.ids.shape[0])

    @property
    def n_docs(self) -> int:
        return 0 if self.docs is None else int(self.docs.shape[0]) - 1


def _digest_files(files, h=None) -> str:
    h = h or hashlib.sha256()
    for path in files:
        try:
            with open(path, "rb") as f:
                for block in iter(lambda: f.read(1 << 22), b""):
                    h.update(block)
        except IsADirectoryError:
            raise HorizonError(f"data path {str(path)!r} is a directory, expected a file") from None
        except OSError as e:
            raise HorizonError(f"cannot read data file {str(path)!r}: {e.strerror or e}") from None
    return h.hexdigest()


def file_digest(path: Path, purpose: str = "train") -> str:
    """The digest of a data file, or of a dataset directory's state and Arrow files."""
    path = Path(path)
    if path.is_dir():
        d = hf_split_dir(path, purpose)
        files = [d / "state.json"] + hf_arrow_files(path, purpose)
        h = hashlib.sha256(f"hf:{d.name}".encode())
        return _digest_files(files, h)
    return _digest_files([path])


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
    n_docs = header.get("n_docs")
    if not isinstance(n, int) or not isinstance(n_docs, int) or dtype not in ("uint16", "uint32"):
        return None
    item = np.dtype(dtype).itemsize
    mask_bytes = n if has_mask else 0
    want = n * item + mask_bytes + (n_docs + 1) * 8
    try:
        if tokens.stat().st_size != want:
            return None
    except OSError:
        return None
    counts = dict(n_records=int(header.get("n_records", 0)), bad_records=int(header.get("bad_records", 0)),
                  bad_examples=list(header.get("bad_examples", [])))
    docs = np.memmap(tokens, dtype=np.uint64, mode="r", offset=n * item + mask_bytes, shape=(n_docs + 1,))
    if n == 0:
        return TokenFile(Path(header.get("source", "")), tokens, np.zeros(0, dtype=dtype), None, docs, **counts)
    ids = np.memmap(tokens, dtype=dtype, mode="r", shape=(n,))
    mask = np.memmap(tokens, dtype=np.uint8, mode="r", offset=n * item, shape=(n,)) if has_mask else None
    return TokenFile(Path(header.get("source", "")), tokens, ids, mask, docs, **counts)


def _tokenise(data: Path, tok: TextTokenizer, field_map=None, skip_bad_records=False, purpose="train"):
    """Returns (ids uint32, mask uint8 or None, doc offsets uint64, content token count, counts)."""
    enc = DocumentEncoder(tok)
    parts: list = []          # per piece, in order: [ids, mask, document index]
    pending: list = []        # text pieces waiting for a batched encode: (index into parts, doc, starts)
    state = {"doc": 0, "starts": True, "content": 0}
    counts = {"n_records": 0, "bad_records": 0, "bad_examples": []}
    text_file = file_kind(data) == "text"

    def flush():
        if not pending:
            return
        got = enc.encode_text_pieces([(d, s) for _, d, s in pending])
        for (idx, _, _), (ids, mask, content) in zip(pending, got):
            parts[idx][0], parts[idx][1] = ids, mask
            state["content"] += content
        pending.clear()

    def bad(where: str, err: BadRecord):
        line = f"{where}: {err}"
        if not skip_bad_records:
            raise HorizonError(line + " (--skip-bad-records skips such records)")
        counts["bad_records"] += 1
        if len(counts["bad_examples"]) < BAD_EXAMPLES:
            counts["bad_examples"].append(line)

    n_texts = 0
    for where, doc in read_documents(data, field_map, purpose):
        if not text_file:
            counts["n_records"] += 1
        if isinstance(doc, BadRecord):
            bad(where, doc)
            continue
        try:
            if doc.is_chat and enc.template:
                ids, mask = enc.encode_chat(doc)
                parts.append([ids, mask, state["doc"]])
                state["doc"] += 1
                state["content"] += int(ids.shape[0])
                continue
            if doc.is_chat:
                doc = enc.chat_document(doc, where)
        except BadRecord as e:
            bad(where, e)
            continue
        parts.append([None, None, state["doc"]])
        pending.append((len(parts) - 1, doc, state["starts"]))
        state["starts"] = doc.ends
        if doc.ends:
            state["doc"] += 1
        n_texts += len(doc.segments)
        if n_texts >= _ENCODE_BATCH:
            flush()
            n_texts = 0
    flush()

    n_docs = state["doc"]
    if parts:
        ids = np.concatenate([p[0] for p in parts])
        mask = np.concatenate([p[1] for p in parts])
        piece_len = np.asarray([p[0].shape[0] for p in parts], dtype=np.int64)
        piece_doc = np.asarray([p[2] for p in parts], dtype=np.int64)
        lens = np.bincount(piece_doc, weights=piece_len, minlength=n_docs).astype(np.uint64)
    else:
        ids, mask, lens = np.zeros(0, dtype=np.uint32), np.zeros(0, dtype=np.uint8), np.zeros(0, dtype=np.uint64)
    docs = np.concatenate([np.zeros(1, dtype=np.uint64), np.cumsum(lens, dtype=np.uint64)])
    if bool(mask.all()):
        mask = None
    return ids, mask, docs, state["content"], counts


def _store(tokens: Path, header: dict, ids: np.ndarray, mask: np.ndarray | None, docs: np.ndarray) -> None:
    tokens.parent.mkdir(parents=True, exist_ok=True)
    chunks = [ids.tobytes()] + ([mask.tobytes()] if mask is not None else []) + [docs.astype(np.uint64).tobytes()]
    write_atomic(tokens, chunks)
    write_atomic(_header_path(tokens), [json.dumps(header, indent=1).encode()])
    _fsync_dir(tokens.parent)


def options_key(tok: TextTokenizer, field_map=None, skip_bad_records=False, purpose="train") -> str:
    """The digest of everything besides the data that decides a source's tokens."""
    fm = json.dumps(sorted((field_map or {}).items()))
    return hashlib.sha256(
        f"{tok.render_key()}|fields={fm}|skip={bool(skip_bad_records)}|purpose={purpose}".encode()
    ).hexdigest()


def token_file(data, tok: TextTokenizer, fallback_dir=None, log=None, *, field_map=None,
               skip_bad_records: bool = False, purpose: str = "train") -> TokenFile:
    """The tokens of one data source (a file or a dataset directory), from the cache when it is
    current, else tokenised now. `purpose` ("train" or "eval") picks a DatasetDict's split. Raises
    HorizonError with one line naming the file and record for a bad record, unless
    `skip_bad_records` (then they are counted in the TokenFile)."""
    data = Path(data)
    if not data.is_file() and not (data.is_dir() and file_kind(data) == "hf"):
        raise HorizonError(f"data file {str(data)!r} does not exist or is not a file")
    if data.is_dir():
        from .sources import is_hf_dataset_dir

        if not is_hf_dataset_dir(data):
            raise HorizonError(f"data path {str(data)!r} is a directory, expected a file")
    digest = file_digest(data, purpose)
    expect = {
        "version": CACHE_VERSION,
        "source": str(data),
        "data_sha256": digest,
        "tokenizer_sha256": tok.digest,
        "eos_id": tok.eos_id,
        "options_sha256": options_key(tok, field_map, skip_bad_records, purpose),
    }
    # The source path is informative; the digests decide whether the cache is current.
    match = {k: v for k, v in expect.items() if k != "source"}
    candidates = _cache_paths(data, digest, fallback_dir)
    if purpose != "train" and data.is_dir():
        candidates = [c.with_name(c.name.replace(".tokens", f".{purpose}.tokens")) for c in candidates]
    for c in candidates:
        got = _load(c, match)
        if got is not None:
            got.source = data
            return got
    if log:
        log(f"tokenising {data} ...")
    ids, mask, docs, content, counts = _tokenise(data, tok, field_map, skip_bad_records, purpose)
    if content == 0:
        if counts["bad_records"]:
            raise HorizonError(
                f"data file {str(data)!r} has no readable records ({counts['bad_records']} bad;"
                f" first: {counts['bad_examples'][0]})"
            )
        raise HorizonError(f"data file {str(data)!r} is empty (no text to train on)")
    if ids.max(initial=0) >= tok.vocab_size:
        raise HorizonError(f"tokenizer produced id {int(ids.max())} outside its vocabulary")
    dtype = "uint16" if tok.vocab_size <= 65536 else "uint32"
    ids = ids.astype(dtype)
    header = dict(expect, n_tokens=int(ids.shape[0]), dtype=dtype, has_mask=mask is not None,
                  n_docs=int(docs.shape[0]) - 1, **counts)
    last_err = None
    for c in candidates:
        try:
            _store(c, header, ids, mask, docs)
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
