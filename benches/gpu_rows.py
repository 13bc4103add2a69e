"""Row-by-row results for the GPU benchmarks: each figure is appended to a JSON Lines file the
moment it is measured (flushed and synced), so a benchmark ended by its time limit still leaves
every figure it had. Imported by the benches/gpu_*.py scripts."""

from __future__ import annotations

import json
import os
import time


class Rows:
    def __init__(self, path, bench: str):
        self.path = path
        self.bench = bench
        self.t0 = time.monotonic()
        if path:
            os.makedirs(os.path.dirname(os.path.abspath(path)) or ".", exist_ok=True)
            open(path, "w").close()

    def add(self, row: dict) -> dict:
        row = {"bench": self.bench, "elapsed_s": round(time.monotonic() - self.t0, 2), **row}
        print(json.dumps(row), flush=True)
        if self.path:
            with open(self.path, "a") as f:
                f.write(json.dumps(row) + "\n")
                f.flush()
                os.fsync(f.fileno())
        return row


def read_rows(path) -> list:
    """The rows of a JSON Lines file (a partial last line, from a killed writer, is dropped)."""
    out = []
    with open(path) as f:
        for line in f:
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                break
    return out
