"""Training checkpoints: master weights and optimizer state in safetensors, plus a JSON record
of everything else a bit-identical resume needs (step, data position, RNG states, config, lr
schedule).

Layout under a run directory:

    checkpoints/step-000004/state.safetensors   every flat master / exp_avg / exp_avg_sq buffer
    checkpoints/step-000004/meta.json
    checkpoints/latest                          the name of the newest complete checkpoint

A checkpoint is written into a temporary directory beside the others, every file fsynced, then
renamed into place and the directory fsynced; `latest` is replaced the same way. A failure at any
point (a full disk) leaves the previous checkpoints and `latest` untouched. The safetensors file
is streamed tensor by tensor, so saving never holds a second copy of the model state in memory.

Integrity: meta.json records the byte count and CRC-32 of the state file (computed while it is
written) and a CRC-32 of its own content (`meta_crc32`). `verify_checkpoint` checks both;
`select_checkpoint` resumes from the newest checkpoint that verifies and says which newer ones it
passed over. Temporary directories that a killed writer left (`.tmp-step-*`, `.old-step-*`) are
removed by `clean_stale` when a run (holding the run directory's lock) starts or resumes.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
import struct
import zlib
from pathlib import Path

from ..errors import HorizonError
from .files import fsync_dir as _fsync_dir

STATE_FILE = "state.safetensors"
META_FILE = "meta.json"
LATEST = "latest"
_STEP_DIR = re.compile(r"^step-(\d+)$")
_STALE = re.compile(r"^\.(tmp|old)-step-\d+-\d+$|^\.latest\.tmp-\d+$")
_READ_CHUNK = 64 << 20


class CheckpointWriteError(HorizonError):
    """A checkpoint could not be written (a full disk, an I/O error); one line saying which
    earlier checkpoint, if any, is intact."""

_DTYPES = None


def _dtype_names():
    global _DTYPES
    if _DTYPES is None:
        import torch

        _DTYPES = {
            torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64",
            torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
            torch.uint8: "U8", torch.bool: "BOOL",
        }
    return _DTYPES


def checkpoints_dir(run_dir) -> Path:
    return Path(run_dir) / "checkpoints"


def step_dir_name(step: int) -> str:
    return f"step-{int(step):06d}"


def _write_bytes(f, data) -> None:
    """The one place checkpoint bytes hit the file (tests replace it to simulate a full disk)."""
    f.write(data)


def write_safetensors(path, tensors: dict, metadata: dict | None = None) -> dict:
    """Streams `tensors` (name -> CPU tensor) into a safetensors file and fsyncs it. Returns
    {"bytes": file size, "crc32": CRC-32 of the file}, computed as it is written."""
    import torch

    names = _dtype_names()
    entries, offset, prepared = {}, 0, []
    for name in sorted(tensors):
        t = tensors[name].detach()
        if t.device.type != "cpu":
            t = t.cpu()
        t = t.contiguous()
        if t.dtype not in names:
            raise HorizonError(f"cannot checkpoint tensor {name!r} of dtype {t.dtype}")
        nbytes = t.numel() * t.element_size()
        entries[name] = {"dtype": names[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
        prepared.append(t)
    if metadata:
        entries["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    header = json.dumps(entries, separators=(",", ":")).encode()
    header += b" " * (-len(header) % 8)  # the format wants the data aligned to 8 bytes
    crc, size = 0, 0
    with open(path, "wb") as f:
        chunks = [struct.pack("<Q", len(header)), header]
        chunks += (memoryview(t.view(-1).view(torch.uint8).numpy()) for t in prepared if t.numel())
        for data in chunks:
            _write_bytes(f, data)
            crc = zlib.crc32(data, crc)
            size += len(data) if isinstance(data, bytes) else data.nbytes
        f.flush()
        os.fsync(f.fileno())
    return {"bytes": size, "crc32": crc}


def _meta_crc(meta: dict) -> int:
    body = {k: v for k, v in meta.items() if k != "meta_crc32"}
    return zlib.crc32(json.dumps(body, sort_keys=True, separators=(",", ":")).encode())


def _write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            _write_bytes(f, text.encode())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def _describe_os_error(e: OSError) -> str:
    if e.errno == errno.ENOSPC:
        return "no space left on device"
    return e.strerror or str(e)


def save_checkpoint(run_dir, step: int, tensors: dict, meta: dict, keep: int | None = None) -> Path:
    """Writes checkpoint `step` atomically and points `latest` at it; keeps the newest `keep`
    checkpoints (all when None). Raises CheckpointWriteError (one line) when it cannot be
    written; the previous checkpoints are then intact, and the message names the newest."""
    root = checkpoints_dir(run_dir)
    final = root / step_dir_name(step)
    tmp = root / f".tmp-{final.name}-{os.getpid()}"
    try:
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
        digest = write_safetensors(tmp / STATE_FILE, tensors, {"format": "pt", "step": step})
        record = dict(meta, step=step, files={STATE_FILE: digest})
        record["meta_crc32"] = _meta_crc(record)
        with open(tmp / META_FILE, "wb") as f:
            _write_bytes(f, json.dumps(record, indent=1, sort_keys=True).encode())
            f.flush()
            os.fsync(f.fileno())
        _fsync_dir(tmp)
        old = None
        if final.exists():  # re-saving a step (after a resume): swap, then drop the old copy
            old = root / f".old-{final.name}-{os.getpid()}"
            os.replace(final, old)
        os.replace(tmp, final)
        _fsync_dir(root)
        _write_text_atomic(root / LATEST, final.name + "\n")
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        earlier = [s for s in list_checkpoints(run_dir) if s != step]
        if final.is_dir() and step in list_checkpoints(run_dir):
            earlier.append(step)  # re-saving a step: the old copy of it stands
        intact = (f"the previous checkpoint is intact ({root / step_dir_name(max(earlier))})" if earlier
                  else "no earlier checkpoint of this run exists")
        raise CheckpointWriteError(f"could not write checkpoint {final} ({_describe_os_error(e)}); {intact}") from None
    except BaseException:  # interrupted: leave no half-written directory behind
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if keep is not None and keep > 0:
        steps = sorted(list_checkpoints(run_dir))
        for s in steps[:-keep]:
            if s != step:
                shutil.rmtree(root / step_dir_name(s), ignore_errors=True)
    return final


def list_checkpoints(run_dir) -> list[int]:
    """Steps of the complete checkpoints under `run_dir` (both files present)."""
    root = checkpoints_dir(run_dir)
    out = []
    if root.is_dir():
        for d in root.iterdir():
            m = _STEP_DIR.match(d.name)
            if m and (d / STATE_FILE).is_file() and (d / META_FILE).is_file():
                out.append(int(m.group(1)))
    return sorted(out)


def latest_checkpoint(run_dir) -> Path | None:
    """The newest complete checkpoint: the one `latest` names, else the highest step found."""
    root = checkpoints_dir(run_dir)
    try:
        name = (root / LATEST).read_text().strip()
        d = root / name
        if _STEP_DIR.match(name) and (d / STATE_FILE).is_file() and (d / META_FILE).is_file():
            return d
    except OSError:
        pass
    steps = list_checkpoints(run_dir)
    return root / step_dir_name(steps[-1]) if steps else None


def clean_stale(run_dir) -> list[Path]:
    """Removes the temporary checkpoint directories and files that a killed writer left under
    `run_dir/checkpoints` (call it only while holding the run directory's lock). Returns them."""
    root = checkpoints_dir(run_dir)
    gone = []
    try:
        entries = list(root.iterdir())
    except OSError:
        return gone
    for p in entries:
        if _STALE.match(p.name):
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)
            gone.append(p)
    return gone


def verify_checkpoint(path) -> dict:
    """Reads and checks one checkpoint directory: meta.json readable and matching its own
    CRC, the state file of the recorded size and CRC (checkpoints written before checksums
    existed are checked for a readable header only). Returns the meta; HorizonError naming
    what is damaged otherwise."""
    path = Path(path)
    meta = read_meta(path)
    if "meta_crc32" in meta and meta["meta_crc32"] != _meta_crc(meta):
        raise HorizonError(f"checkpoint {path}: {META_FILE} does not match its checksum")
    state = path / STATE_FILE
    want = (meta.get("files") or {}).get(STATE_FILE) if isinstance(meta.get("files"), dict) else None
    try:
        size = state.stat().st_size
        if isinstance(want, dict):
            if size != want.get("bytes"):
                raise HorizonError(f"checkpoint {path}: {STATE_FILE} has {size} bytes, {want.get('bytes')} were written")
            crc = 0
            with open(state, "rb") as f:
                while True:
                    chunk = f.read(_READ_CHUNK)
                    if not chunk:
                        break
                    crc = zlib.crc32(chunk, crc)
            if crc != want.get("crc32"):
                raise HorizonError(f"checkpoint {path}: {STATE_FILE} does not match its checksum")
        else:
            with open(state, "rb") as f:
                head = f.read(8)
                n = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
                if n <= 0 or 8 + n > size:
                    raise HorizonError(f"checkpoint {path}: {STATE_FILE} is corrupt (bad header)")
                json.loads(f.read(n))
    except FileNotFoundError:
        raise HorizonError(f"checkpoint {path} has no {STATE_FILE}") from None
    except (OSError, ValueError) as e:
        raise HorizonError(f"checkpoint {path}: cannot read {STATE_FILE} ({_describe_os_error(e) if isinstance(e, OSError) else e})") from None
    return meta


def select_checkpoint(run_dir) -> tuple[Path | None, dict | None, list[str]]:
    """The newest checkpoint of `run_dir` that verifies: (path, meta, notes), notes saying
    which newer checkpoints were damaged and passed over. (None, None, []) when the run has
    no checkpoint; HorizonError when it has some and none is intact."""
    root = checkpoints_dir(run_dir)
    candidates = sorted(list_checkpoints(run_dir), reverse=True)
    latest = latest_checkpoint(run_dir)
    if latest is not None:
        s = int(_STEP_DIR.match(latest.name).group(1))
        candidates = [s] + [c for c in candidates if c != s]
    notes, reasons = [], []
    for s in candidates:
        d = root / step_dir_name(s)
        try:
            meta = verify_checkpoint(d)
        except HorizonError as e:
            reasons.append(str(e))
            continue
        if reasons:
            notes.append(f"{'; '.join(reasons)}: resuming from the newest intact checkpoint, {d}")
        return d, meta, notes
    if reasons:
        raise HorizonError(f"no intact checkpoint under {run_dir}: {'; '.join(reasons)}")
    return None, None, []


def read_meta(path) -> dict:
    """The JSON record of one checkpoint directory. HorizonError when missing or corrupt."""
    path = Path(path)
    try:
        meta = json.loads((path / META_FILE).read_text())
    except FileNotFoundError:
        raise HorizonError(f"checkpoint {path} has no {META_FILE}") from None
    except (OSError, ValueError) as e:
        raise HorizonError(f"checkpoint {path}: cannot read {META_FILE} ({e})") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("step"), int):
        raise HorizonError(f"checkpoint {path}: {META_FILE} is not a Horizon checkpoint record")
    return meta


@contextlib.contextmanager
def open_checkpoint(path):
    """(lazy tensors, meta) of one checkpoint directory, as a context manager: the tensors are
    `safe_open(...).get_slice(name)` views of the file, so a data-parallel rank reads only its
    shard (and a single process reads each tensor straight into the store, with no second
    full copy in memory). HorizonError when missing or corrupt."""
    path = Path(path)
    meta = read_meta(path)
    from safetensors import SafetensorError, safe_open

    try:
        f = safe_open(str(path / STATE_FILE), framework="pt", device="cpu")
    except FileNotFoundError:
        raise HorizonError(f"checkpoint {path} has no {STATE_FILE}") from None
    except (SafetensorError, OSError, ValueError) as e:
        raise HorizonError(f"checkpoint {path}: {STATE_FILE} is corrupt ({e})") from None
    with f:
        try:
            yield {k: f.get_slice(k) for k in f.keys()}, meta
        except SafetensorError as e:
            raise HorizonError(f"checkpoint {path}: {STATE_FILE} is corrupt ({e})") from None


def load_checkpoint(path) -> tuple[dict, dict]:
    """(tensors, meta) of one checkpoint directory. HorizonError when missing or corrupt."""
    path = Path(path)
    meta = read_meta(path)
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        tensors = load_file(str(path / STATE_FILE))
    except FileNotFoundError:
        raise HorizonError(f"checkpoint {path} has no {STATE_FILE}") from None
    except (SafetensorError, OSError, ValueError) as e:
        raise HorizonError(f"checkpoint {path}: {STATE_FILE} is corrupt ({e})") from None
    return tensors, meta
