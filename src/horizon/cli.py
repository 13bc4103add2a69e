"""The `horizon` command line: every parser and the one error mapping of all commands (doctor,
train, plan, data inspect, export). The options of `train` and `plan` are generated from the fields of the
run's config (`horizon.run.config.TrainConfig`): their names, help, defaults and rules are
written there once. Every error a user can cause ends as one line on stderr, never a traceback:
a flag whose value breaks its rule exits 2 (with the usage hint), any other bad input exits 1."""

from __future__ import annotations

import argparse
import json
import os
import sys

from . import __version__
from .errors import HorizonError
from .options import ConfigError, check_value, default_text, flag, kind_of, option_name


class _Parser(argparse.ArgumentParser):
    """An unknown command or flag prints the usage and the error (exit 2); a bad value for a
    known option is one line (exit 2), the full usage staying behind --help."""

    _USAGE_ERRORS = ("unrecognized arguments", "invalid choice", "the following arguments are required")

    def error(self, message):
        if any(e in message for e in self._USAGE_ERRORS):
            self.print_usage(sys.stderr)
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


def _parse_int(s: str) -> int:
    try:
        return int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid integer {s!r}") from None


def _parse_float(s: str) -> float:
    try:
        return float(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid number {s!r}") from None


def _value_type(name: str, kind: str, optional: bool, meta: dict):
    """argparse `type` for one option: parses the text, then applies the field's own rule."""
    parse = {"int": _parse_int, "float": _parse_float}.get(kind, str)

    def convert(text: str):
        try:
            return check_value(name, parse(text), kind, optional, meta)
        except ConfigError as e:  # "--steps must be ..." -> "must be ..." after argparse's "argument --steps:"
            raise argparse.ArgumentTypeError(str(e).replace(flag(name) + " ", "", 1)) from None

    return convert


def add_config_options(parser, config_cls, only=None) -> None:
    """One flag per option of `config_cls` (a composite config), generated from its fields
    (`only(section, name)`: a filter). Flags default to "not given" (absent from the namespace),
    so only what the user typed overrides the --config file and the saved run."""
    groups = {}
    for name, (section, f, owner) in config_cls.options().items():
        if not f.metadata.get("cli", True) or (only is not None and not only(section, name)):
            continue
        if section not in groups:
            groups[section] = parser.add_argument_group(f"{section} options")
        kind, optional = kind_of(f, owner)
        help_text = f.metadata.get("help", "")
        default = default_text(f)
        if default is not None:
            help_text += f" (default: {default})"
        kw = dict(dest=name, default=argparse.SUPPRESS, help=help_text.replace("%", "%%"))
        if kind == "bool":
            kw["action"] = "store_true"
        else:
            choices = f.metadata.get("choices")
            kw["metavar"] = f.metadata.get("metavar") or ("|".join(choices) if choices else name.upper())
            if kind == "list":
                kw["nargs"] = f.metadata.get("nargs") or "+"
                kw["type"] = _value_type(name, "str", optional, {})
            elif kind == "dict":  # its text form; the owning config parses and checks it
                kw["type"] = str
            else:
                kw["type"] = _value_type(name, kind, optional, f.metadata)
        groups[section].add_argument(flag(option_name(f)), **kw)


def build_parser() -> argparse.ArgumentParser:
    from .run.config import TrainConfig

    p = _Parser(prog="horizon",
                description="Train large language models on one GPU node, host RAM as the home of the model.")
    p.add_argument("--version", action="version", version=f"horizon {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    d = sub.add_parser("doctor", help="show what Horizon sees of this machine")
    d.add_argument("--json", action="store_true", help="print one JSON object")
    d.add_argument("--disk", metavar="DIR", help="measure DIR's sequential direct read/write bandwidth "
                   "(for --offload-dir; saved in DIR for `horizon plan`)")

    t = sub.add_parser("train", help="train a model (with no arguments: the tiny preset on the shipped corpus)",
                       description="Train a model. Options come from defaults, then --config FILE (TOML), "
                                   "then the flags given here.")
    t.add_argument("--config", metavar="FILE", help="TOML file with any of the options below (as key = value)")
    add_config_options(t, TrainConfig)

    pl = sub.add_parser("plan", help="host/device memory, PCIe bytes and a step-time bound for a run; fits?",
                        description="The footprint of `horizon train` with the same options, on this machine.")
    pl.add_argument("--config", metavar="FILE", help="TOML file with any of the options below (as key = value)")
    pl.add_argument("--json", action="store_true", help="print one JSON object")
    add_config_options(pl, TrainConfig)

    dt = sub.add_parser("data", help="look at training data as a run will see it")
    dsub = dt.add_subparsers(dest="data_command", metavar="DATA_COMMAND", required=True)
    di = dsub.add_parser("inspect", help="print the first samples with the trained spans marked, and the counts",
                         description="The first samples of --data as the model will see them (trained text "
                                     "marked), and the counts: documents, tokens, trained tokens, truncated, "
                                     "dropped, bad records. Run it before a long job.")
    di.add_argument("--n", type=_value_type("n", "int", False, {"ge": 0}), default=3, metavar="N",
                    help="samples to print (default: 3)")
    add_config_options(di, TrainConfig, only=lambda section, name: section in ("model", "data") or name == "seed")

    e = sub.add_parser("export", help="write a run's checkpoint as a Hugging Face model directory")
    e.add_argument("run_dir", metavar="RUN_DIR")
    e.add_argument("--out", metavar="HF_DIR", required=True, help="where to write config.json, *.safetensors, tokenizer")
    e.add_argument("--step", type=_value_type("step", "int", False, {"ge": 0}),
                   help="checkpoint step (default: the latest)")
    return p


def flags_of(args) -> dict:
    """The options the user typed, by flat name."""
    from .run.config import TrainConfig

    return {k: v for k, v in vars(args).items() if k in TrainConfig.options()}


def train_config_from_args(args):
    from .run.config import from_layers, load_toml

    file_layer = load_toml(args.config) if getattr(args, "config", None) else {}
    return from_layers(file_layer, flags_of(args))


def _plan(args) -> int:
    from . import plan as planmod
    from .data import shipped_tokenizer_path
    from .io import model_dir

    c = train_config_from_args(args)
    m = c.model
    src = model_dir.resolve(m.model_dir, m.preset, m.tokenizer, shipped_tokenizer_path(), m.model_path)
    p = planmod.make_plan(src.spec, batch_size=c.data.batch_size, seq_len=c.data.seq_len,
                          micro_batch_size=c.engine.micro_batch_size, grad_clip=c.optim.grad_clip is not None,
                          machine=planmod.this_machine(c.engine.device), compute_dtype=c.engine.compute_dtype,
                          offload_dir=c.engine.offload_dir, activation_memory=c.engine.activation_memory)
    print(json.dumps(dict(p, model=src.name if src.model_dir is None else str(m.model_dir)))
          if args.json else planmod.format_plan(p))
    return 0 if p["fits"] else 1  # scripts can ask `horizon plan ... && horizon train ...`


def _inspect(args) -> int:
    from .data import inspect_data
    from .data.inspect import tokenizer_for

    c = train_config_from_args(args)
    tok = tokenizer_for(model_dir=c.model.model_dir, tokenizer=c.model.tokenizer, chat_template=c.data.chat_template)
    sys.stdout.write(inspect_data(c.data, tok, c.data.seq_len, n=args.n, seed=c.run.seed))
    return 0


def _dispatch(args) -> int:
    if args.command == "doctor":
        from .doctor import main as doctor_main

        return doctor_main(args.json, disk=args.disk)
    if args.command == "train":
        from .run import train

        return train(train_config_from_args(args))
    if args.command == "plan":
        return _plan(args)
    if args.command == "data":
        return _inspect(args)
    if args.command == "export":
        from .run import export

        print(f"wrote {export(args.run_dir, args.out, step=args.step)}")
        return 0
    raise AssertionError(args.command)


def _one_line(msg) -> str:
    return " ".join(str(msg).split()) or "unknown error"


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)  # unknown command or flag: usage on stderr, exit 2
    if args.command is None:
        parser.print_usage(sys.stderr)
        print("horizon: error: a command is required (doctor, train, plan, data, export)", file=sys.stderr)
        return 2
    try:
        return _dispatch(args)
    except ConfigError as e:
        if e.option is not None and e.option in flags_of(args):
            # the flag's value breaks a rule (one that its own parser could not see: a rule
            # across options): a usage error, as for a value its parser refused
            print(f"horizon {args.command}: error: {_one_line(e)} (see `horizon {args.command} --help`)",
                  file=sys.stderr)
            return 2
        print(f"horizon: error: {_one_line(e)}", file=sys.stderr)
    except BrokenPipeError:  # `horizon plan | head`: the reader left; nothing to report
        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())  # so the final flush at exit does not fail again
        except (OSError, ValueError):
            pass
        return 141
    except (HorizonError, ValueError) as e:
        print(f"horizon: error: {_one_line(e)}", file=sys.stderr)
    except OSError as e:
        where = f" ({e.filename})" if getattr(e, "filename", None) else ""
        print(f"horizon: error: {_one_line(e.strerror or e)}{where}", file=sys.stderr)
    except MemoryError:
        print("horizon: error: out of memory (try `horizon plan` with the same options)", file=sys.stderr)
    except KeyboardInterrupt:
        print("horizon: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # a bug, not bad input: still one line, the traceback on request
        if os.environ.get("HORIZON_DEBUG"):
            raise
        print(f"horizon: internal error: {type(e).__name__}: {_one_line(e)} (set HORIZON_DEBUG=1 for the traceback)",
              file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
