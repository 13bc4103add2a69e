"""Reading training documents from files: plain text, JSONL with a `text` field, and chat JSONL
with a `messages` list (loss masked to the assistant turns).

A document is a list of segments `(text, trained)`; `trained` says whether the tokens of that
segment are learned (label) or only context (label -100).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

from ..errors import HorizonError

TEXT_SUFFIXES = {".txt", ".text", ".md"}
JSONL_SUFFIXES = {".jsonl", ".json"}
ROLES = ("system", "user", "assistant")

# Our chat layout. Role headers are the shipped tokenizer's special tokens; with another
# tokenizer they are ordinary text, which still marks turns consistently.
END_OF_TURN = "<|end|>"


def role_header(role: str) -> str:
    return f"<|{role}|>\n"


# Plain text is read in pieces of about this size, cut at line ends, so a large file never has
# to be held whole; byte-level pre-tokenisation splits at whitespace anyway.
TEXT_CHUNK_CHARS = 1 << 20


def data_files(paths) -> list[Path]:
    """Expands the `--data` paths (files or directories) into a sorted, de-duplicated file list."""
    if isinstance(paths, (str, Path)):
        paths = [paths]
    out: list[Path] = []
    for raw in paths:
        p = Path(raw).expanduser()
        if not p.exists():
            raise HorizonError(f"data path {str(raw)!r} does not exist")
        if p.is_dir():
            # Only .txt/.md/.jsonl when scanning: a stray .json (our own cache headers among
            # them) is not training data.
            found = sorted(
                f for f in _walk(p, raw)
                if f.suffix.lower() in TEXT_SUFFIXES | {".jsonl"} and not f.name.startswith(".")
            )
            if not found:
                raise HorizonError(
                    f"data directory {str(raw)!r} holds no .txt or .jsonl files"
                )
            out.extend(found)
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
    suffix = path.suffix.lower()
    if suffix in JSONL_SUFFIXES:
        return "jsonl"
    return "text"


def read_documents(path: Path) -> Iterator[tuple[list[tuple[str, bool]], bool]]:
    """Yields `(segments, ends_document)` pieces of one file: a plain-text file is one document
    read in pieces, a JSONL line is one document. Raises HorizonError naming the file (and line)
    for undecodable or malformed content."""
    if file_kind(path) == "jsonl":
        yield from _read_jsonl(path)
    else:
        yield from _read_text(path)


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
                yield [(piece, True)], False
            yield [(pending, True)], True
    except UnicodeDecodeError as e:
        raise HorizonError(f"data file {str(path)!r} is not UTF-8 text ({e.reason} at byte {e.start})") from None


def _read_jsonl(path: Path):
    try:
        with open(path, "r", encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                where = f"{path}:{lineno}"
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise HorizonError(f"{where}: invalid JSON ({e.msg})") from None
                if not isinstance(obj, dict):
                    raise HorizonError(f"{where}: expected a JSON object with 'text' or 'messages'")
                if "messages" in obj:
                    yield chat_segments(obj["messages"], where), True
                elif "text" in obj:
                    text = obj["text"]
                    if not isinstance(text, str):
                        raise HorizonError(f"{where}: 'text' must be a string")
                    yield [(_check_text(text, where), True)], True
                else:
                    raise HorizonError(f"{where}: object has neither 'text' nor 'messages'")
    except UnicodeDecodeError as e:
        raise HorizonError(f"data file {str(path)!r} is not UTF-8 ({e.reason} at byte {e.start})") from None


def chat_segments(messages, where: str = "messages") -> list[tuple[str, bool]]:
    """Renders one conversation. The assistant's content and its end-of-turn marker are trained
    (so the model learns when to stop); headers, system and user turns are context only."""
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
        trained = role == "assistant"
        segs.append((content + END_OF_TURN, trained))
        segs.append(("\n", False))
    return segs
