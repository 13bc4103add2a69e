"""The data options of a run: what to train on and the shape of a step's batch."""

from __future__ import annotations

from dataclasses import dataclass

from ..options import check_fields, option


@dataclass
class DataConfig:
    paths: list[str] = option(help="text (.txt), JSONL with 'text', or chat JSONL with 'messages'; files or "
                                  "directories", factory=list, metavar="PATH", path=True, nargs="+",
                             default_help="the shipped corpus", name="data")
    seq_len: int = option(128, "tokens per sequence", ge=2, metavar="N")
    batch_size: int = option(8, "sequences per optimizer step", ge=1, metavar="N")

    def __post_init__(self):
        check_fields(self)
