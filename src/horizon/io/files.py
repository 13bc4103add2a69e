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
