"""The `horizon` command line: doctor, train, plan, export."""

from __future__ import annotations

import argparse
import sys

from . import __version__


class _Parser(argparse.ArgumentParser):
    """An unknown command or flag prints the usage and the error (exit 2); a bad value for a
    known option is one line (exit 2), the full usage staying behind --help."""

    _USAGE_ERRORS = ("unrecognized arguments", "invalid choice", "the following arguments are required")

    def error(self, message):
        if any(e in message for e in self._USAGE_ERRORS):
            self.print_usage(sys.stderr)
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
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
