"""Subcommands beyond `doctor`: `train`, `plan`, `export`. Argument parsing lives here; the work
in `train_cli` (train, export) and `plan`. Every error a user can cause ends as one line on
stderr (`horizon: error: ...`) and exit code 1, never a traceback."""

from __future__ import annotations

import argparse
import json
import os
import sys

from .errors import HorizonError


def _parse_int(s: str) -> int:
    try:
        return int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid integer {s!r}") from None


def _positive_int(s: str) -> int:
    v = _parse_int(s)
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {v}")
    return v


def _nonneg_int(s: str) -> int:
    v = _parse_int(s)
    if v < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {v}")
    return v


def _finite_float(s: str) -> float:
    try:
        v = float(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid number {s!r}") from None
    if v != v or v in (float("inf"), float("-inf")):
        raise argparse.ArgumentTypeError(f"must be finite, got {s!r}")
    return v


def _add_model_args(p) -> None:
    g = p.add_mutually_exclusive_group()
    g.add_argument("--model-dir", metavar="DIR", help="a Hugging Face model directory (config.json, *.safetensors)")
    from . import presets

    g.add_argument("--preset", metavar="NAME", help=f"a built-in model config: {', '.join(presets.names())}")


def add_subcommands(sub) -> None:
    # Flags default to None so that only what the user typed overrides the --config file.
    t = sub.add_parser("train", help="train a model (with no arguments: the tiny preset on the shipped corpus)",
                       description="Train a model. Options come from defaults, then --config FILE (TOML), "
                                   "then the flags given here.")
    t.add_argument("--config", metavar="FILE", help="TOML file with any of the options below (as key = value)")
    _add_model_args(t)
    t.add_argument("--tokenizer", metavar="FILE", help="tokenizer.json (default: the model's, or the shipped one)")
    t.add_argument("--data", metavar="PATH", nargs="+",
                   help="text (.txt), JSONL with 'text', or chat JSONL with 'messages'; files or directories")
    t.add_argument("--steps", metavar="N", type=_positive_int, help="train up to this step (default 200)")
    t.add_argument("--batch-size", metavar="N", type=_positive_int, help="sequences per optimizer step (default 8)")
    t.add_argument("--seq-len", metavar="N", type=_positive_int, help="tokens per sequence (default 128)")
    t.add_argument("--micro-batch-size", metavar="N", type=_positive_int, help="sequences per forward/backward (default: the batch)")
    t.add_argument("--lr", metavar="LR", type=_finite_float, help="peak learning rate (default 2e-3)")
    t.add_argument("--min-lr", metavar="LR", type=_finite_float, help="learning rate at the end of the cosine (default lr/10)")
    t.add_argument("--warmup-steps", metavar="N", type=_nonneg_int, help="linear warm-up steps (default 5%% of the decay, <= 100)")
    t.add_argument("--decay-steps", metavar="N", type=_positive_int, help="cosine decay horizon (default --steps)")
    t.add_argument("--weight-decay", metavar="WD", type=_finite_float, help="decoupled AdamW weight decay (default 0)")
    t.add_argument("--beta1", metavar="B1", type=_finite_float, help="AdamW beta1 (default 0.9)")
    t.add_argument("--beta2", metavar="B2", type=_finite_float, help="AdamW beta2 (default 0.95)")
    t.add_argument("--grad-clip", type=_finite_float, metavar="NORM", help="clip the global gradient norm")
    t.add_argument("--device", help="auto (default), cpu, cuda or cuda:N")
    t.add_argument("--compute-dtype", choices=["float32", "bfloat16"], help="default: bfloat16 on GPU, float32 on CPU")
    t.add_argument("--seed", metavar="N", type=_nonneg_int, help="model init and data order (default 0)")
    t.add_argument("--out", metavar="DIR", help="run directory (default runs/<timestamp>)")
    t.add_argument("--save-every", type=_nonneg_int, metavar="N", help="checkpoint every N steps (0: at the end only)")
    t.add_argument("--keep-checkpoints", type=_positive_int, metavar="K", help="keep the newest K checkpoints (default 2)")
    t.add_argument("--resume", action="store_true", default=None, help="continue the run in --out from its latest checkpoint")
    t.add_argument("--max-bad-steps", type=_positive_int, metavar="N",
                   help="stop after N steps in a row with NaN/Inf loss or gradients (default 5)")
    t.add_argument("--log-every", type=_positive_int, metavar="N", help="progress line every N steps when not a terminal")

    p = sub.add_parser("plan", help="host/device memory, PCIe bytes and a step-time bound for a model; fits?")
    _add_model_args(p)
    p.add_argument("--batch-size", metavar="N", type=_positive_int, default=8, help="sequences per step (default 8)")
    p.add_argument("--seq-len", metavar="N", type=_positive_int, default=2048, help="tokens per sequence (default 2048)")
    p.add_argument("--micro-batch-size", metavar="N", type=_positive_int, help="sequences per forward/backward")
    p.add_argument("--grad-clip", action="store_true", help="plan for gradient clipping (fp32 gradient buffer)")
    p.add_argument("--device", default="auto", help="auto (default), cpu, cuda or cuda:N")
    p.add_argument("--json", action="store_true", help="print one JSON object")

    e = sub.add_parser("export", help="write a run's checkpoint as a Hugging Face model directory")
    e.add_argument("run_dir", metavar="RUN_DIR")
    e.add_argument("--out", metavar="HF_DIR", required=True, help="where to write config.json, *.safetensors, tokenizer")
    e.add_argument("--step", type=_nonneg_int, help="checkpoint step (default: the latest)")


_TRAIN_KEYS = (
    "model_dir", "preset", "tokenizer", "data", "steps", "batch_size", "seq_len", "micro_batch_size", "lr",
    "min_lr", "warmup_steps", "decay_steps", "weight_decay", "beta1", "beta2", "grad_clip", "device",
    "compute_dtype", "seed", "out", "save_every", "keep_checkpoints", "resume", "max_bad_steps", "log_every",
)


def train_config_from_args(args):
    from pathlib import Path

    from . import config as cfgmod

    file_layer = cfgmod.load_toml(args.config) if getattr(args, "config", None) else {}
    flags = {k: getattr(args, k, None) for k in _TRAIN_KEYS}
    saved = {}
    if flags.get("resume"):
        out = flags.get("out") or file_layer.get("out")
        if out:
            saved = cfgmod.saved_run_options(Path(out) / "train_config.json")
    # A model named now replaces the saved run's model.
    if any(layer.get("model_dir") or layer.get("preset") for layer in (file_layer, flags)):
        saved.pop("model_dir", None)
        saved.pop("preset", None)
    if file_layer.get("model_dir") and flags.get("preset") or file_layer.get("preset") and flags.get("model_dir"):
        file_layer.pop("model_dir", None)
        file_layer.pop("preset", None)
    return cfgmod.merge(saved, file_layer, flags)


def _run_plan(args) -> int:
    from . import plan as planmod
    from . import presets
    from .train_cli import read_model_dir

    if args.model_dir:
        config, name = read_model_dir(args.model_dir).config, args.model_dir
    else:
        name = args.preset or "tiny"
        config = presets.get(name)
    machine = planmod.this_machine(args.device)
    p = planmod.make_plan(config, batch_size=args.batch_size, seq_len=args.seq_len,
                          micro_batch_size=args.micro_batch_size, grad_clip=args.grad_clip, machine=machine)
    if args.json:
        print(json.dumps(dict(p, model=name)))
    else:
        print(planmod.format_plan(p))
    return 0


def _dispatch(args) -> int:
    if args.command == "train":
        from .train_cli import train

        return train(train_config_from_args(args))
    if args.command == "plan":
        return _run_plan(args)
    if args.command == "export":
        from .train_cli import export

        out = export(args.run_dir, args.out, step=args.step)
        print(f"wrote {out}")
        return 0
    print(f"horizon: error: unknown command {args.command!r}", file=sys.stderr)
    return 2


def _one_line(msg: str) -> str:
    return " ".join(str(msg).split()) or "unknown error"


def run(args) -> int:
    try:
        return _dispatch(args)
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
