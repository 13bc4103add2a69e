"""Small file-system helpers shared by the writers that must not lose data on a crash."""

from __future__ import annotations

import os
from pathlib import Path


def fsync_dir(d: Path) -> None:
    """Makes a rename inside `d` durable. Some filesystems refuse fsync on directories: that
    is not an error worth stopping for."""
    try:
        fd = os.open(d, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def fsync_file(path: Path) -> None:
    """Flushes one file's data to the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


LOCK_FILE = ".horizon.lock"


class DirLock:
    """An exclusive lock on a directory (`flock` on `DIR/.horizon.lock`), so two processes never
    write one run directory at once. The kernel drops the lock when the holder exits or dies
    (SIGKILL included), so a stale lock never blocks a later run. The file records the holder
    (pid, host, start time) for the refusal message; it is left in place."""

    def __init__(self, directory):
        self.path = Path(directory) / LOCK_FILE
        self.fd = None

    def acquire(self) -> "DirLock":
        import fcntl
        import json
        import socket
        import time

        from ..errors import HorizonError

        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise HorizonError(f"cannot lock {self.path.parent}: {e.strerror or e}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            try:
                holder = json.loads(os.pread(fd, 4096, 0).decode() or "{}")
            except (OSError, ValueError):
                holder = {}
            os.close(fd)
            who = (f"pid {holder.get('pid', '?')} on {holder.get('host', '?')}, started {holder.get('started', '?')}"
                   if isinstance(holder, dict) else "another process")
            raise HorizonError(f"{self.path.parent} is in use by another horizon run ({who}); wait for it to "
                               "finish or choose another --out") from None
        except OSError as e:
            os.close(fd)
            raise HorizonError(f"cannot lock {self.path.parent}: {e.strerror or e}") from None
        info = json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                           "started": time.strftime("%Y-%m-%d %H:%M:%S")}).encode()
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, info, 0)
        except OSError:
            pass  # the lock holds without the note
        self.fd = fd
        return self

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing the descriptor drops the flock
            self.fd = None

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()
        return False


def write_atomic(path: Path, chunks) -> None:
    """Writes `chunks` (bytes-like pieces) to `path` through a temporary sibling, fsynced and
    renamed into place: a reader sees the old file or the whole new one, never a torn one."""
    path = Path(path)
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
