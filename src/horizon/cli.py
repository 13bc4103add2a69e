"""The `horizon` command line: doctor, train, plan, export."""

from __future__ import annotations

import argparse
import sys

from . import __version__


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="horizon",
        description="Train large language models on one GPU node, host RAM as the home of the model.",
    )
    p.add_argument("--version", action="version", version=f"horizon {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    d = sub.add_parser("doctor", help="show what Horizon sees of this machine")
    d.add_argument("--json", action="store_true", help="print one JSON object")
    from . import commands

    commands.add_subcommands(sub)
    return p


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)  # unknown command or flag: usage on stderr, exit 2
    if args.command is None:
        parser.print_usage(sys.stderr)
        print("horizon: error: a command is required (doctor, train, plan, export)", file=sys.stderr)
        return 2
    if args.command == "doctor":
        from .doctor import main as doctor_main

        return doctor_main(args.json)
    from . import commands

    return commands.run(args)


if __name__ == "__main__":
    sys.exit(main())
