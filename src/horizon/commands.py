"""Subcommands beyond `doctor` (train, plan, export). Owned by the trainer-as-product work."""

from __future__ import annotations

import sys


def add_subcommands(sub) -> None:
    t = sub.add_parser("train", help="train a model (the tiny preset on the CPU by default)")
    t.add_argument("--steps", type=int, default=None)


def run(args) -> int:
    print(f"horizon: '{args.command}' is not available yet", file=sys.stderr)
    return 2
