"""Reading training documents from data as users have it.

Files: plain text (`.txt`, `.md`: one document per file, read in pieces), JSON lines and JSON arrays
(`.jsonl`, `.json`), Parquet (`.parquet`, read with pyarrow) and Hugging Face `datasets` directories
written by `save_to_disk` (their Arrow files, read with pyarrow).

Records: `messages` (OpenAI style), `conversations` with `from`/`value` (ShareGPT),
`instruction`/`input`/`output` (Alpaca), `prompt`/`completion` (strings, or message lists as TRL
has them) and plain `text`. `--field-map` renames a data set's own fields to these. A record that
cannot be read raises `BadRecord` with one line naming the file, the record and the field.

A document is either text, a list of segments `(text, trained)` (a plain-text file arrives in
several pieces, the last with `ends=True`), or a chat: messages (and tools) for a chat template,
with the assistant messages from index `train_from` on being trained.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from ..errors import HorizonError

TEXT_SUFFIXES = {".txt", ".text", ".md"}
JSONL_SUFFIXES = {".jsonl", ".json"}
PARQUET_SUFFIXES = {".parquet"}
ROLES = ("system", "user", "assistant")

# Our chat layout, used only with the shipped tokenizer (which has no chat template). Role headers
# are its special tokens.
END_OF_TURN = "<|end|>"

# ShareGPT's speaker names -> chat roles.
SHAREGPT_ROLES = {
    "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "chatgpt": "assistant",
    "model": "assistant", "bot": "assistant", "system": "system", "observation": "tool", "tool": "tool",
    "function": "tool", "function_call": "assistant",
}

# Hugging Face `save_to_disk` layouts: one split, or a dict of splits.
HF_DATASET_FILES = ("state.json", "dataset_info.json")
HF_DATASET_DICT = "dataset_dict.json"
EVAL_SPLITS = ("validation", "valid", "eval", "test")


def role_header(role: str) -> str:
    return f"<|{role}|>\n"


# Plain text is read in pieces of about this size, cut at line ends, so a large file never has
# to be held whole; byte-level pre-tokenisation splits at whitespace anyway.
TEXT_CHUNK_CHARS = 1 << 20


class BadRecord(Exception):
    """One record that cannot be read; `str()` is the one-line message."""


@dataclass
class Document:
    segments: list = field(default_factory=list)   # [(text, trained)] for text documents
    ends: bool = True                               # the last piece of its document
    messages: list | None = None                    # a chat, rendered by a chat template
    tools: list | None = None
    train_from: int = 0                             # assistant messages before this index: context
    field: str = "messages"                         # the record's field the chat came from
    layout_chat: bool = False                       # a chat in our own layout, as text segments

    @property
    def is_chat(self) -> bool:
        return self.messages is not None


def is_hf_dataset_dir(p: Path) -> bool:
    return p.is_dir() and ((p / HF_DATASET_DICT).is_file() or all((p / f).is_file() for f in HF_DATASET_FILES))


def data_files(paths) -> list[Path]:
    """Expands `--data` paths into a sorted, de-duplicated list of sources: files, and Hugging Face
    dataset directories (taken whole). Other directories are scanned for .txt/.md/.jsonl/.parquet
    files and dataset directories."""
    if isinstance(paths, (str, Path)):
        paths = [paths]
    out: list[Path] = []
    for raw in paths:
        p = Path(raw).expanduser()
        if not p.exists():
            raise HorizonError(f"data path {str(raw)!r} does not exist")
        if p.is_dir() and not is_hf_dataset_dir(p):
            # Only .txt/.md/.jsonl/.parquet when scanning: a stray .json (our own cache headers
            # among them) is not training data.
            found = sorted(
                f for f in _walk(p, raw)
                if f.suffix.lower() in TEXT_SUFFIXES | {".jsonl"} | PARQUET_SUFFIXES
                and not f.name.startswith(".") and not _inside_hf_dataset(f, p)
            )
            found += sorted(d for d in p.rglob("*") if is_hf_dataset_dir(d) and not _inside_hf_dataset(d, p))
            if not found:
                raise HorizonError(
                    f"data directory {str(raw)!r} holds no .txt or .jsonl files (nor .parquet files or datasets)"
                )
            out.extend(sorted(found))
        else:
            out.append(p)
    seen, unique = set(), []
    for f in out:
        key = f.resolve()
        if key not in seen:
            seen.add(key)
            unique.append(f)
    if not unique:
        raise HorizonError("no data files given")
    return unique


def _inside_hf_dataset(f: Path, root: Path) -> bool:
    return any(is_hf_dataset_dir(parent) for parent in f.parents if parent != root and root in parent.parents)


def _walk(root: Path, raw) -> list[Path]:
    """Every file under a data directory; a directory that cannot be listed is an error naming
    it (not an empty directory)."""
    import os

    def refuse(e: OSError):
        where = e.filename or str(root)
        raise HorizonError(f"data directory {str(raw)!r}: cannot read {where!s} ({e.strerror or e})")

    out = []
    for d, _dirs, files in os.walk(root, onerror=refuse, followlinks=True):
        out += [Path(d) / f for f in files if (Path(d) / f).is_file()]
    return out


def _check_text(text: str, where: str) -> str:
    """JSON may escape a lone UTF-16 surrogate ("\\ud800"), which is no Unicode text."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise HorizonError(f"{where}: the text holds an unpaired surrogate {text[e.start]!a} at character "
                           f"{e.start}, which is not valid Unicode") from None
    return text


def file_kind(path: Path) -> str:
    if path.is_dir():
        return "hf"
    suffix = path.suffix.lower()
    if suffix in JSONL_SUFFIXES:
        return "jsonl"
    if suffix in PARQUET_SUFFIXES:
        return "parquet"
    return "text"


# --------------------------------------------------------------------------- raw records
def _pyarrow(path: Path, what: str):
    try:
        import pyarrow  # noqa: F401
    except ImportError:
        raise HorizonError(f"reading {what} {str(path)!r} needs pyarrow (pip install pyarrow)") from None
    import pyarrow as pa

    return pa


def _jsonl_records(path: Path):
    try:
        with open(path, "r", encoding="utf-8-sig") as f:  # -sig: a byte-order mark is not data
            head = f.read(4096).lstrip(" \t\r\n")
            f.seek(0)
            if head.startswith("["):
                try:
                    arr = json.load(f)
                except json.JSONDecodeError as e:
                    raise HorizonError(f"{path}: invalid JSON array ({e.msg} at line {e.lineno})") from None
                if not isinstance(arr, list):
                    raise HorizonError(f"{path}: expected a JSON array of records")
                for i, obj in enumerate(arr, 1):
                    yield f"{path}: record {i}", obj
                return
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                where = f"{path}:{lineno}"  # the line is the record
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    yield where, BadRecord(f"invalid JSON ({e.msg})")
                    continue
                yield where, obj
    except UnicodeDecodeError as e:
        raise HorizonError(f"data file {str(path)!r} is not UTF-8 ({e.reason} at byte {e.start})") from None


def _drop_nulls(v):
    """Arrow gives every record every field of its column's type (the union over all records),
    null where the record had none: those nulls are not the data's, so they go, at every depth."""
    if isinstance(v, dict):
        return {k: _drop_nulls(x) for k, x in v.items() if x is not None}
    if isinstance(v, list):
        return [_drop_nulls(x) for x in v]
    return v


def _arrow_rows(path: Path, tables):
    n = 0
    for batch in tables:
        for row in batch.to_pylist():
            n += 1
            yield f"{path}: record {n}", _drop_nulls(row)


def _parquet_records(path: Path):
    pa = _pyarrow(path, "Parquet file")
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
        yield from _arrow_rows(path, pf.iter_batches(batch_size=1024))
    except (pa.ArrowException, OSError) as e:
        raise HorizonError(f"cannot read Parquet file {str(path)!r}: {e}") from None


def hf_split_dir(path: Path, purpose: str) -> Path:
    """The directory of one split: the path itself, or for a DatasetDict its `train` split (training)
    or its validation/test split (evaluation), or its only split."""
    dd = path / HF_DATASET_DICT
    if not dd.is_file():
        return path
    try:
        splits = json.loads(dd.read_text()).get("splits")
    except (OSError, ValueError, AttributeError):
        splits = None
    if not isinstance(splits, list) or not splits:
        raise HorizonError(f"data directory {str(path)!r}: {HF_DATASET_DICT} lists no splits")
    want = ("train",) if purpose == "train" else EVAL_SPLITS
    pick = next((s for s in want if s in splits), None)
    if pick is None and len(splits) == 1:
        pick = splits[0]
    if pick is None:
        raise HorizonError(
            f"data directory {str(path)!r} has splits {', '.join(map(str, splits))} and none for"
            f" {'training (train)' if purpose == 'train' else 'evaluation (' + ', '.join(EVAL_SPLITS) + ')'};"
            " point at the split's directory"
        )
    return path / pick


def hf_arrow_files(path: Path, purpose: str = "train") -> list[Path]:
    d = hf_split_dir(path, purpose)
    try:
        state = json.loads((d / "state.json").read_text())
        names = [f["filename"] for f in state["_data_files"]]
    except (OSError, ValueError, KeyError, TypeError):
        raise HorizonError(
            f"data directory {str(d)!r} is not a Hugging Face dataset saved with save_to_disk"
            " (no readable state.json)"
        ) from None
    files = [d / n for n in names]
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise HorizonError(f"data directory {str(d)!r}: missing {missing[0]}")
    return files


def _hf_records(path: Path, purpose: str):
    pa = _pyarrow(path, "Hugging Face dataset")
    files = hf_arrow_files(path, purpose)

    def batches():
        for f in files:
            try:
                with pa.memory_map(str(f), "r") as src:
                    reader = pa.ipc.open_stream(src)
                    for b in reader:
                        yield b
            except (pa.ArrowException, OSError) as e:
                raise HorizonError(f"cannot read {str(f)!r}: {e}") from None

    yield from _arrow_rows(path, batches())


def raw_records(path: Path, purpose: str = "train") -> Iterator[tuple[str, object]]:
    """`(where, record)` for every record of a JSON/Parquet/dataset source, `where` naming the file
    and the record (`file:LINE` for JSON lines, `file: record N` otherwise); `record` is a
    BadRecord when the record itself could not be parsed."""
    kind = file_kind(path)
    if kind == "jsonl":
        return _jsonl_records(path)
    if kind == "parquet":
        return _parquet_records(path)
    if kind == "hf":
        return _hf_records(path, purpose)
    raise HorizonError(f"{path}: not a record file")


# --------------------------------------------------------------------------- records -> documents
class Fields:
    """Looks fields up by our name through `--field-map`; a value of None counts as absent
    (Parquet and Arrow fill missing fields with null)."""

    def __init__(self, field_map: dict | None):
        self.map = dict(field_map or {})

    def name(self, ours: str) -> str:
        return self.map.get(ours, ours)

    def get(self, obj: dict, ours: str):
        return obj.get(self.name(ours))

    def has(self, obj: dict, ours: str) -> bool:
        return obj.get(self.name(ours)) is not None


def _str_field(obj, fm: Fields, ours: str, required=True, allow_empty=True):
    v = fm.get(obj, ours)
    if v is None:
        if required:
            raise BadRecord(f"field {fm.name(ours)!r}: missing")
        return None
    if not isinstance(v, str):
        raise BadRecord(f"field {fm.name(ours)!r}: must be a string, got {type(v).__name__}")
    if not allow_empty and not v.strip():
        raise BadRecord(f"field {fm.name(ours)!r}: is empty")
    try:  # JSON may escape a lone UTF-16 surrogate ("\ud800"), which is no Unicode text
        v.encode("utf-8")
    except UnicodeEncodeError as e:
        raise BadRecord(f"field {fm.name(ours)!r}: holds an unpaired surrogate {v[e.start]!a} at character "
                        f"{e.start}, which is not valid Unicode") from None
    return v


def _tools(obj, fm: Fields):
    v = fm.get(obj, "tools")
    if v is None:
        return None
    if isinstance(v, str):
        # ShareGPT / LlamaFactory data keeps tools as a JSON string.
        if not v.strip():
            return None
        try:
            v = json.loads(v)
        except json.JSONDecodeError as e:
            raise BadRecord(f"field {fm.name('tools')!r}: not valid JSON ({e.msg})") from None
    if not isinstance(v, list) or not all(isinstance(t, dict) for t in v):
        raise BadRecord(f"field {fm.name('tools')!r}: must be a list of tool (JSON schema) objects")
    return v or None


def _clean(m: dict) -> dict:
    # As transformers does: keys whose value is None are dropped (OpenAI exports and Arrow rows
    # carry `tool_calls: null` and friends).
    return {k: v for k, v in m.items() if v is not None}


def _check_messages(msgs, fname: str, fm: Fields) -> list[dict]:
    if not isinstance(msgs, list) or not msgs:
        raise BadRecord(f"field {fname!r}: must be a non-empty list of messages")
    rk, ck = fm.name("role"), fm.name("content")
    out = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict):
            raise BadRecord(f"field {fname!r}: message {i} is not an object")
        m = _clean(m)
        role = m.get(rk)
        if not isinstance(role, str) or not role:
            raise BadRecord(f"field {fname!r}: message {i} has no {rk!r}")
        content = m.get(ck)
        if content is None and not m.get("tool_calls"):
            raise BadRecord(f"field {fname!r}: message {i} has no {ck!r}")
        if content is not None and not isinstance(content, (str, list)):
            raise BadRecord(
                f"field {fname!r}: message {i} {ck!r} must be a string or a list of parts, got {type(content).__name__}"
            )
        if "tool_calls" in m and not isinstance(m["tool_calls"], list):
            raise BadRecord(f"field {fname!r}: message {i} 'tool_calls' must be a list")
        m = {("role" if k == rk else "content" if k == ck else k): v for k, v in m.items()}
        out.append(m)
    return out


def _sharegpt(conv, fname: str, fm: Fields) -> list[dict]:
    if not isinstance(conv, list) or not conv:
        raise BadRecord(f"field {fname!r}: must be a non-empty list of turns")
    fk, vk = fm.name("from"), fm.name("value")
    out = []
    for i, t in enumerate(conv):
        if not isinstance(t, dict):
            raise BadRecord(f"field {fname!r}: turn {i} is not an object")
        who, value = t.get(fk), t.get(vk)
        if not isinstance(who, str):
            raise BadRecord(f"field {fname!r}: turn {i} has no {fk!r}")
        role = SHAREGPT_ROLES.get(who.lower())
        if role is None:
            raise BadRecord(
                f"field {fname!r}: turn {i} has unknown speaker {who!r} (known: {', '.join(SHAREGPT_ROLES)})"
            )
        if not isinstance(value, str):
            raise BadRecord(f"field {fname!r}: turn {i} {vk!r} must be a string")
        if who.lower() == "function_call":
            try:
                call = json.loads(value)
            except json.JSONDecodeError as e:
                raise BadRecord(f"field {fname!r}: turn {i} function_call is not JSON ({e.msg})") from None
            calls = call if isinstance(call, list) else [call]
            if not all(isinstance(c, dict) and isinstance(c.get("name"), str) for c in calls):
                raise BadRecord(f"field {fname!r}: turn {i} function_call needs a 'name'")
            out.append({"role": "assistant", "tool_calls": [
                {"type": "function", "function": {"name": c["name"], "arguments": c.get("arguments", {})}}
                for c in calls
            ]})
        else:
            out.append({"role": role, "content": value})
    return out


def record_document(obj, fm: Fields) -> Document:
    """One record -> one Document. Raises BadRecord for a record that cannot be read."""
    if isinstance(obj, BadRecord):
        raise obj
    if not isinstance(obj, dict):
        raise BadRecord(f"expected a JSON object, got {type(obj).__name__}")
    system = _str_field(obj, fm, "system", required=False)
    if fm.has(obj, "messages"):
        fname = fm.name("messages")
        msgs = _check_messages(fm.get(obj, "messages"), fname, fm)
        if system is not None and msgs[0]["role"] != "system":
            msgs = [{"role": "system", "content": system}] + msgs
        return Document(messages=msgs, tools=_tools(obj, fm), field=fname)
    if fm.has(obj, "conversations"):
        fname = fm.name("conversations")
        msgs = _sharegpt(fm.get(obj, "conversations"), fname, fm)
        if system is not None and msgs[0]["role"] != "system":
            msgs = [{"role": "system", "content": system}] + msgs
        return Document(messages=msgs, tools=_tools(obj, fm), field=fname)
    if fm.has(obj, "instruction") or (fm.has(obj, "output") and not fm.has(obj, "completion")):
        instruction = _str_field(obj, fm, "instruction")
        inp = _str_field(obj, fm, "input", required=False)
        output = _str_field(obj, fm, "output")
        user = instruction if not inp else f"{instruction}\n{inp}"
        msgs = [{"role": "system", "content": system}] if system is not None else []
        hist = fm.get(obj, "history")
        if hist is not None:
            hname = fm.name("history")
            if not isinstance(hist, list) or not all(
                isinstance(h, (list, tuple)) and len(h) == 2 and all(isinstance(x, str) for x in h) for h in hist
            ):
                raise BadRecord(f"field {hname!r}: must be a list of [instruction, response] pairs")
            for q, a in hist:
                msgs += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
        msgs += [{"role": "user", "content": user}, {"role": "assistant", "content": output}]
        return Document(messages=msgs, field=fm.name("instruction"))
    if fm.has(obj, "prompt") or fm.has(obj, "completion"):
        p, c = fm.get(obj, "prompt"), fm.get(obj, "completion")
        pname, cname = fm.name("prompt"), fm.name("completion")
        if p is None:
            raise BadRecord(f"field {pname!r}: missing (a record with {cname!r} needs a prompt)")
        if c is None:
            raise BadRecord(f"field {cname!r}: missing (a record with {pname!r} needs a completion)")
        if isinstance(p, list) or isinstance(c, list):
            # Conversational prompt/completion (TRL): only the completion's turns are trained.
            pm = _check_messages(p, pname, fm)
            cm = _check_messages(c, cname, fm)
            msgs = pm + cm
            return Document(messages=msgs, tools=_tools(obj, fm), train_from=len(pm), field=cname)
        if not isinstance(p, str):
            raise BadRecord(f"field {pname!r}: must be a string or a list of messages, got {type(p).__name__}")
        if not isinstance(c, str):
            raise BadRecord(f"field {cname!r}: must be a string or a list of messages, got {type(c).__name__}")
        if not c:
            raise BadRecord(f"field {cname!r}: is empty")
        return Document(segments=[(p, False), (c, True)])
    if fm.has(obj, "text"):
        text = _str_field(obj, fm, "text", allow_empty=False)
        return Document(segments=[(text, True)])
    have = ", ".join([repr(k) for k, v in obj.items() if v is not None][:8]) or "no fields"
    raise BadRecord(
        f"object has neither 'text' nor 'messages' nor conversations, instruction/output or"
        f" prompt/completion (it has {have}; map other names with --field-map)"
    )


# --------------------------------------------------------------------------- documents of a source
def read_documents(path: Path, field_map: dict | None = None, purpose: str = "train") -> Iterator:
    """Yields `(where, document)` for the documents of one source in order: a plain-text file is
    one document read in pieces; each record of a record file is one document, or a BadRecord in
    its place for a record that cannot be read (the caller stops or counts). `where` names the file
    and record. Raises HorizonError naming the file for content unreadable as a whole."""
    if file_kind(path) == "text":
        for doc in _read_text(path):
            yield str(path), doc
        return
    fm = Fields(field_map)
    for where, obj in raw_records(path, purpose):
        try:
            yield where, record_document(obj, fm)
        except BadRecord as e:
            yield where, e


def bad_record_line(where: str, err: BadRecord) -> str:
    return f"{where}: {err}"


def _read_text(path: Path):
    try:
        with open(path, "r", encoding="utf-8") as f:
            pending = ""
            while True:
                block = f.read(TEXT_CHUNK_CHARS)
                if not block:
                    break
                pending += block
                cut = pending.rfind("\n")
                if cut < 0:
                    continue
                piece, pending = pending[: cut + 1], pending[cut + 1:]
                yield Document(segments=[(piece, True)], ends=False)
            yield Document(segments=[(pending, True)], ends=True)
    except UnicodeDecodeError as e:
        raise HorizonError(f"data file {str(path)!r} is not UTF-8 text ({e.reason} at byte {e.start})") from None


def chat_segments(messages, where: str = "messages", train_from: int = 0) -> list[tuple[str, bool]]:
    """Renders one conversation in our own layout (the shipped tokenizer, which has no chat
    template). The assistant's content and its end-of-turn marker are trained (so the model learns
    when to stop); headers, system and user turns are context only."""
    if not isinstance(messages, list) or not messages:
        raise HorizonError(f"{where}: 'messages' must be a non-empty list")
    segs: list[tuple[str, bool]] = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise HorizonError(f"{where}: message {i} needs 'role' and 'content'")
        role, content = m["role"], m["content"]
        if role not in ROLES:
            raise HorizonError(f"{where}: message {i} has unknown role {role!r} (use {', '.join(ROLES)})")
        if not isinstance(content, str):
            raise HorizonError(f"{where}: message {i} 'content' must be a string")
        _check_text(content, f"{where}: message {i}")
        segs.append((role_header(role), False))
        trained = role == "assistant" and i >= train_from
        segs.append((content + END_OF_TURN, trained))
        segs.append(("\n", False))
    return segs
