#!/usr/bin/env python3
"""Sweeps transformers' whole causal-LM registry through Horizon's model paths.

For every model_type in `MODEL_FOR_CAUSAL_LM_MAPPING_NAMES`: a tiny config from the config
class's own defaults (sizes shrunk, structure kept), a random model transformers builds from
it, then 3 training steps of Horizon's hf path against transformers + torch.optim.AdamW on the
same batches (fp32, CPU). Each architecture ends in one of:

- trained: losses and final weights equal transformers' within the tolerance below;
- refused: Horizon refused it up front with one line naming why (the reason is reported);
- skipped: transformers itself cannot build or run the tiny model (its own error is reported);
- failed: anything else (an error while training, or results that differ). The slow test
  (tests/test_hf_path.py) holds that no architecture fails.

    python scripts/model_sweep.py                  # all, writes docs/models.md
    python scripts/model_sweep.py llama gemma2     # some model types, prints only
    python scripts/model_sweep.py --json out.json  # also the raw results
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import signal
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT / "src") not in sys.path:
    sys.path.insert(0, str(ROOT / "src"))

VOCAB = 128
SEQ = 16
ROWS = 2
STEPS = 3
TOLERANCE = 1e-4
# Weights: within TOLERANCE relative (tensor norm), or, for a tensor whose true gradient is ~0
# (a key bias under softmax, whose updates are rounding noise in any implementation), within
# TOLERANCE of the distance AdamW can move an element in STEPS steps (lr x STEPS), as an RMS.
NOISE_FACTOR = 10
HP = dict(lr=1e-3, betas=(0.9, 0.95), eps=1e-6, weight_decay=0.1)
TIMEOUT_S = 600
MAX_PARAMETERS = 30_000_000

# Generic size fields and the tiny values they get (only where the config class has them).
SHRINK = {
    "hidden_size": 64, "n_embd": 64, "d_model": 64, "model_dim": 64, "embed_dim": 64,
    "intermediate_size": 128, "ffn_dim": 128, "n_inner": 128, "ffn_hidden_size": 128, "d_ff": 128,
    "decoder_ffn_dim": 128, "encoder_ffn_dim": 128, "dense_intermediate_size": 128,
    "moe_intermediate_size": 32, "shared_expert_intermediate_size": 64, "shared_intermediate_size": 64,
    "expert_intermediate_size": 32, "moe_ffn_hidden_size": 32,
    "num_hidden_layers": 2, "n_layer": 2, "num_layers": 2, "n_layers": 2, "decoder_layers": 2,
    "encoder_layers": 2,
    "num_attention_heads": 4, "n_head": 4, "n_heads": 4, "num_heads": 4, "decoder_attention_heads": 4,
    "encoder_attention_heads": 4,
    "num_key_value_heads": 2, "num_kv_heads": 2, "n_kv_heads": 2, "multi_query_group_num": 2,
    "head_dim": 16, "kv_channels": 16, "qk_nope_head_dim": 16, "qk_rope_head_dim": 8, "v_head_dim": 16,
    "kv_lora_rank": 16, "q_lora_rank": 24,
    "vocab_size": VOCAB,
    "num_experts": 4, "num_local_experts": 4, "n_routed_experts": 4, "moe_num_experts": 4,
    "num_experts_per_tok": 2, "rotary_dim": 8, "n_group": 2, "topk_group": 1, "num_expert_group": 2,
}
KV_HEADS = ("num_key_value_heads", "num_kv_heads", "n_kv_heads", "multi_query_group_num")
HEADS = ("num_attention_heads", "n_head", "n_heads", "num_heads")
LAYER_KEYS = {"num_hidden_layers", "n_layer", "num_layers", "n_layers", "decoder_layers", "encoder_layers"}
NESTED = ("text_config", "language_config", "llm_config", "decoder_config")


def _stochastic(key: str, value) -> bool:
    """Dropout and router-noise settings: training-time randomness transformers draws with its
    own RNG calls, which no other implementation reproduces draw for draw."""
    k = key.lower()
    return (isinstance(value, float) and not isinstance(value, bool) and 0 < value < 1
            and ("dropout" in k or "pdrop" in k or "jitter" in k or k.endswith("_drop")))


def _shrunk(config_cls, sub=None, *, layers=True, derive=False):
    """Keyword overrides that shrink `config_cls()`'s defaults (and its text sub-config);
    `layers=False` keeps the layer count (for classes whose per-layer lists must match it);
    `derive` leaves a sub-config's per-layer lists (`layer_types`) to its class to derive for
    the shrunk count, as it does at the top level, where only the overrides are passed."""
    try:
        default = sub if sub is not None else config_cls()
    except Exception:  # noqa: BLE001 - some classes need arguments; shrink what we can
        return {}
    values = default.to_dict() if hasattr(default, "to_dict") else dict(default)
    out = {}
    mla = values.get("qk_rope_head_dim") is not None  # head_dim follows the rope part there
    for key, value in values.items():
        if _stochastic(key, value):
            out[key] = 0.0
        elif not layers and key in LAYER_KEYS:
            continue
        elif key == "head_dim" and mla:
            continue
        elif key in KV_HEADS and isinstance(value, int) and value > 0:
            # Keep the grouping: as many kv heads per head as the full-size model (MLA: all).
            heads = next((values[k] for k in HEADS if isinstance(values.get(k), int)), None)
            if heads:
                ratio = max(1, heads // value)
                out[key] = max(1, SHRINK["num_attention_heads"] // ratio) if value < heads else SHRINK["num_attention_heads"]
        elif key in SHRINK and isinstance(value, int) and not isinstance(value, bool) and value > SHRINK[key]:
            out[key] = SHRINK[key]
        elif key.endswith("_token_id") and isinstance(value, int) and value >= VOCAB:
            out[key] = VOCAB - 1
        elif key.endswith("_token_id") and isinstance(value, list):
            out[key] = [v if not isinstance(v, int) or v < VOCAB else VOCAB - 1 for v in value]
        elif _per_layer(value):
            # Per-layer overrides (Gemma-4's 512-wide global heads): their sizes shrunk to twice
            # the tiny ones, so those layers still differ. With the layer count shrunk their
            # indices no longer fit: `_with_per_layer` hands them on by layer type.
            if not layers:
                out[key] = _shrunk_overrides(value)
        elif key in NESTED and isinstance(value, dict):
            n_layers = next((value[k] for k in LAYER_KEYS if isinstance(value.get(k), int)), None)
            nested = {k: v for k, v in value.items()
                      if not (layers and (_per_layer(v) or (derive and isinstance(v, list) and len(v) == n_layers)))}
            nested.update(_shrunk(None, value, layers=layers))
            out[key] = nested
    return out


def _has_per_layer(d: dict) -> bool:
    return any(_per_layer(v) or (k in NESTED and isinstance(v, dict) and _has_per_layer(v)) for k, v in d.items())


def _layer_types(d: dict) -> set:
    out = set(d.get("layer_types") or [])
    for key in NESTED:
        if isinstance(d.get(key), dict):
            out |= _layer_types(d[key])
    return out


def _per_layer(value) -> bool:
    """A dict of per-layer overrides: layer index (int or digit string) -> dict of fields."""
    return (isinstance(value, dict) and bool(value) and all(isinstance(v, dict) for v in value.values())
            and all(isinstance(k, int) or (isinstance(k, str) and k.isdigit()) for k in value))


def _shrunk_overrides(value: dict) -> dict:
    return {k: {f: 2 * SHRINK[f] if (f in SHRINK and isinstance(v, int) and not isinstance(v, bool)
                                     and v > 2 * SHRINK[f]) else v for f, v in ov.items()}
            for k, ov in value.items()}


def _with_per_layer(default: dict, tiny: dict) -> dict:
    """`tiny` (a shrunk config dict, sub-configs included) with `default`'s per-layer overrides,
    shrunk, given to the tiny model's layers of the type they were given to in the default
    (e.g. every full-attention layer), where each layer type had one override."""
    out = dict(tiny)
    for key, value in default.items():
        if key in NESTED and isinstance(value, dict) and isinstance(tiny.get(key), dict):
            out[key] = _with_per_layer(value, tiny[key])
        elif _per_layer(value) and isinstance(default.get("layer_types"), list) \
                and isinstance(tiny.get("layer_types"), list):
            by_type: dict = {}
            for k, ov in _shrunk_overrides(value).items():
                i = int(k)
                if i < len(default["layer_types"]):
                    by_type.setdefault(default["layer_types"][i], []).append(ov)
            if any(any(o != ovs[0] for o in ovs) for ovs in by_type.values()):
                continue  # overrides that differ within a layer type: left to the config class
            out[key] = {i: by_type[t][0] for i, t in enumerate(tiny["layer_types"]) if t in by_type}
    return out


def tiny_config(model_type: str) -> dict:
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    cls = CONFIG_MAPPING[model_type]
    try:
        default = cls().to_dict()
    except Exception:  # noqa: BLE001 - some classes need arguments
        default = None
    try:
        cfg = cls(**_shrunk(cls))
    except Exception:  # noqa: BLE001 - per-layer lists tied to the layer count
        cfg = None
        if default is not None and _has_per_layer(default):
            # Per-layer overrides (handed on by layer type below): a sub-config's per-layer
            # lists derived for the shrunk count, if every layer type survives (structure
            # kept); else the layer count is kept.
            try:
                cfg = cls(**_shrunk(cls, derive=True))
                if _layer_types(cfg.to_dict()) != _layer_types(default):
                    cfg = None
            except Exception:  # noqa: BLE001
                cfg = None
        if cfg is None:
            cfg = cls(**_shrunk(cls, layers=False))
    d = cfg.to_dict()
    try:
        with_overrides = _with_per_layer(default, d) if default is not None else d
        if with_overrides != d:
            d = cls.from_dict(dict(with_overrides)).to_dict()
    except Exception:  # noqa: BLE001 - the config class's own per-layer overrides stay
        pass
    d["model_type"] = model_type
    return d


@contextlib.contextmanager
def _time_limit(seconds: int):
    def expire(*_):
        raise TimeoutError(f"took more than {seconds} s")

    old = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text}"[:300]


def _weight_error(got, want) -> float:
    """max(0-1 scaled) of the relative error and the RMS error in units of AdamW's reach."""
    diff = (got.double() - want.double()).norm().item()
    rel = diff / max(want.double().norm().item(), 1e-30)
    reach = diff / math.sqrt(max(want.numel(), 1)) / (HP["lr"] * STEPS)
    return min(rel, reach)


def _reference(src: Path, *, micro_batches: bool):
    """transformers' model + torch.optim.AdamW on the sweep's batches: the causal-LM
    cross-entropy (labels shifted inside, -100 ignored, the mean over the step's label tokens)
    of the model's own logits; with `micro_batches`, the gradient summed over one-row passes."""
    import torch
    import torch.nn.functional as F
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    # Parameters the model creates untrainable (fixed sinusoidal position tables) stay so, as
    # in the model transformers builds from the config (its from_pretrained makes them trainable).
    fresh = transformers.AutoModelForCausalLM.from_config(model.config)
    frozen = {n for n, p in fresh.named_parameters() if not p.requires_grad}
    for n, p in model.named_parameters():
        p.requires_grad_(n not in frozen)
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], **HP)
    losses = []
    for ids, labels in _batches():
        shifted = F.pad(labels, (0, 1), value=-100)[:, 1:]
        n_tokens = int((shifted != -100).sum())
        parts = [(ids[i:i + 1], shifted[i:i + 1]) for i in range(ids.shape[0])] if micro_batches else [(ids, shifted)]
        total = 0.0
        for x, y in parts:
            logits = model(input_ids=x, use_cache=False).logits.float()
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1), ignore_index=-100,
                                   reduction="sum") / n_tokens
            loss.backward()
            total += float(loss.detach())
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(total)
    return model, losses


def _meta_parameter_count(model_type: str, cfg: dict) -> int:
    import torch
    import transformers
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(CONFIG_MAPPING[model_type].from_dict(dict(cfg)))
    return sum(p.numel() for p in model.parameters())


def _names(path: Path) -> set:
    from safetensors import safe_open

    names = set()
    for f in path.glob("*.safetensors"):
        with safe_open(str(f), "pt") as st:
            names |= set(st.keys())
    return names


def _batches():
    import torch

    gen = torch.Generator().manual_seed(1)
    out = []
    for _ in range(STEPS):
        ids = torch.randint(0, VOCAB, (ROWS, SEQ), generator=gen)
        labels = ids.clone()
        labels[:, : SEQ // 4] = -100
        out.append((ids, labels))
    return out


def run_one(model_type: str, class_name: str) -> dict:
    """Trains one architecture both ways; returns {status, detail, ...}."""
    import torch
    import transformers

    import horizon
    from horizon import HorizonError
    from horizon.models import resolve

    row = {"model_type": model_type, "class": class_name}
    try:
        cfg = tiny_config(model_type)
    except Exception as e:  # noqa: BLE001
        return dict(row, status="skipped", detail=f"transformers cannot make its default config ({_one_line(e)})")
    cfg.setdefault("architectures", [class_name])
    try:
        n_params = _meta_parameter_count(model_type, cfg)
    except Exception as e:  # noqa: BLE001
        return dict(row, status="skipped", detail=f"transformers cannot build it from its default config ({_one_line(e)})")
    if n_params > MAX_PARAMETERS:
        return dict(row, status="skipped", detail=f"not tiny after shrinking: {n_params / 1e6:.0f} M parameters "
                                                  "(sub-models the generic shrink does not reach)")
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "model"
        try:
            from transformers.models.auto.configuration_auto import CONFIG_MAPPING

            torch.manual_seed(0)
            model = transformers.AutoModelForCausalLM.from_config(CONFIG_MAPPING[model_type].from_dict(dict(cfg)))
            model.float().save_pretrained(src)
            del model
            ref, ref_losses = _reference(src, micro_batches=False)
            # The same run with the gradient summed over micro-batches of one row, as Horizon
            # computes it: how far fp32 rounding alone moves this model (the noise floor).
            alt, alt_losses = _reference(src, micro_batches=True)
        except Exception as e:  # noqa: BLE001 - transformers' own model does not train here
            return dict(row, status="skipped", detail=f"transformers' own model does not train ({_one_line(e)})")
        try:
            spec = resolve(json.loads((src / "config.json").read_text()), "hf")
        except HorizonError as e:
            return dict(row, status="refused", detail=str(e))
        row["layers"] = spec.num_layers
        if not all(math.isfinite(x) for x in ref_losses):
            return dict(row, status="skipped", detail="transformers' own loss is not finite on the tiny model")
        try:
            trainer = horizon.Trainer.from_pretrained(src, device="cpu", micro_batch_size=1, model_path="hf", **HP)
            losses = [trainer.train_step(ids, labels) for ids, labels in _batches()]
            out = Path(tmp) / "out"
            trainer.save_pretrained(out)
            got = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).state_dict()
        except Exception as e:  # noqa: BLE001
            return dict(row, status="failed", detail=f"training: {_one_line(e)}",
                        trace=traceback.format_exc(limit=6))
        loss_err = max(abs(a - b) / max(abs(b), 1e-30) for a, b in zip(losses, ref_losses))
        loss_floor = max(abs(a - b) / max(abs(b), 1e-30) for a, b in zip(alt_losses, ref_losses))
        want = ref.state_dict()
        floor = alt.state_dict()
        if _names(out) != _names(src):
            return dict(row, status="failed", detail="the export's tensor names differ from transformers' checkpoint")
        if set(got) != set(want):
            return dict(row, status="failed", detail=f"export names differ: {sorted(set(got) ^ set(want))[:3]}")
        # Each tensor within TOLERANCE, or within NOISE_FACTOR x transformers' own micro-batched
        # run's distance from the full-batch one (the model amplifies fp32 rounding that much).
        # A tensor transformers never gave a gradient (a module the forward skips, e.g. the
        # cross-attention of a decoder run without an encoder) is left alone by torch's AdamW;
        # Horizon's AdamW steps it with a zero gradient, i.e. decoupled weight decay only.
        init = transformers.AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).state_dict()
        decay = (1.0 - HP["lr"] * HP["weight_decay"]) ** STEPS
        no_grad = []
        excess = {}
        params = {n for n, _ in ref.named_parameters(remove_duplicate=False)}
        for n, w in want.items():
            if w.is_floating_point():
                if (n in params and torch.equal(w, init[n]) and torch.equal(floor[n], init[n])
                        and w.abs().sum() > 0):
                    # In a slab it steps with a zero gradient; held as an untrained constant
                    # (a weight outside the layers the forward never uses) it stays as it was.
                    no_grad.append(n)
                    decayed = init[n] * decay
                    w = decayed if _weight_error(got[n], decayed) < _weight_error(got[n], init[n]) else init[n]
                allowed = max(TOLERANCE, NOISE_FACTOR * _weight_error(floor[n], want[n]))
                excess[n] = _weight_error(got[n], w) / allowed
        worst = max(excess, key=excess.get) if excess else None
        weight_err = 0.0
        if worst:
            weight_err = _weight_error(got[worst], want[worst])
            if worst in no_grad:
                weight_err = min(_weight_error(got[worst], init[worst] * decay), _weight_error(got[worst], init[worst]))
        loss_ok = loss_err <= max(TOLERANCE, NOISE_FACTOR * loss_floor)
        row.update(loss_error=loss_err, weight_error=weight_err, worst=worst, loss_floor=loss_floor,
                   weight_floor=_weight_error(floor[worst], want[worst]) if worst else 0.0)
        note = "" if weight_err <= TOLERANCE else f" (fp32 floor of this tensor {row['weight_floor']:.1e})"
        if no_grad:
            note += f"; {len(no_grad)} tensor(s) without a gradient decayed only (torch's AdamW skips them)"
            row["no_grad"] = no_grad
        if loss_ok and (not excess or excess[worst] <= 1.0):
            return dict(row, status="trained",
                        detail=f"max rel. error: loss {loss_err:.1e}, weights {weight_err:.1e}{note}")
        return dict(row, status="failed", detail=f"differs: loss {loss_err:.1e} (floor {loss_floor:.1e}), "
                                                  f"weights {weight_err:.1e}{note} ({worst})")


def sweep(model_types=None, *, log=sys.stderr, json_path=None) -> list:
    import torch
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    torch.set_num_threads(1)
    registry = dict(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)
    chosen = model_types or sorted(registry)
    rows = []
    for mt in chosen:
        if mt not in registry:
            raise SystemExit(f"{mt!r} is not in transformers' causal-LM registry")
        t0 = time.time()
        try:
            with _time_limit(TIMEOUT_S):
                row = run_one(mt, registry[mt])
        except TimeoutError as e:
            row = {"model_type": mt, "class": registry[mt], "status": "failed", "detail": str(e)}
        except Exception as e:  # noqa: BLE001 - one architecture never stops the sweep
            row = {"model_type": mt, "class": registry[mt], "status": "failed", "detail": _one_line(e),
                   "trace": traceback.format_exc(limit=6)}
        row["seconds"] = round(time.time() - t0, 1)
        rows.append(row)
        print(f"{mt:32s} {row['status']:8s} {row['detail']}", file=log, flush=True)
        if json_path:  # after every model, so a crash loses nothing already measured
            Path(json_path).write_text(json.dumps(rows, indent=1))
    return rows


def write_markdown(rows: list, path: Path) -> None:
    import torch
    import transformers

    counts = {s: sum(r["status"] == s for r in rows) for s in ("trained", "refused", "skipped", "failed")}
    lines = [
        "# Models",
        "",
        "Which architectures Horizon trains, and how. Two model paths behind one reader,",
        "`horizon.models.resolve(config, model_path)` (`model_path=\"auto\"|\"native\"|\"hf\"`, also a",
        "keyword of `Trainer(...)`, `Trainer.from_pretrained` and `Trainer.from_config`);",
        "`horizon.models.summarize(config, model_path)` reads a model the same way and",
        "counts its parameters (total, active per token for MoE, per streamed layer) for `horizon plan`.",
        "",
        "- **native**: Horizon's own layer templates, fused kernels and `flash_moe`, for Llama, Mistral,",
        "  Qwen2, Qwen3, Mixtral and Qwen3-MoE configs whose every feature the templates implement.",
        "- **hf**: any decoder-only causal LM of transformers' registry, trained through transformers'",
        "  own modules (`src/horizon/models/hf/`). The model is built on the meta device; each decoder",
        "  layer is a parameterless template called with views of the streamed weight slot",
        "  (`torch.func.functional_call`, nothing copied into a module). The prologue (embedding and",
        "  its scaling, position ids, rotary tables, the mask of each layer type) and the epilogue",
        "  (final norm, head, soft-capping, final scaling) are the causal LM's own forward, run with",
        "  shims in place of its layers: a capture shim records what the forward hands each layer",
        "  (with the keyword names of the installed transformers release), a replay shim hands the",
        "  last block's output to the epilogue. MoE layers, MLA, attention sinks, sliding windows and",
        "  self-contained hybrid layers (Mamba, linear attention) are the model's own code. The",
        "  engine's invariants hold as on the native path: blocks stream in twice per step, embedding",
        "  and head once (the embedding's backward keeps a small graph from the prologue instead of a",
        "  second stream), each layer's gradient lands once, device memory is flat in depth, the host",
        "  holds 14 (18 with clipping) bytes per trained parameter. Checkpoint names and layouts are",
        "  transformers' own (`save_pretrained`'s, found by running its reverse weight conversion on",
        "  index tensors), so an export loads with `AutoModelForCausalLM.from_pretrained`.",
        "- `auto` (the default) takes native when it accepts the config, else hf.",
        "",
        "The objective on both paths is the causal-LM cross-entropy of the model's logits (labels",
        "shifted inside, -100 ignored, the mean over the step's label tokens).",
        "",
        "A model neither path trains is refused before anything is allocated, with one line naming",
        "the architecture and the reason: encoder-decoders; models whose layers are handed another",
        "layer's output (recurrent state across layers), run more than once per forward (recurrent",
        "depth), are handed tensors computed from weights besides their hidden states, or need a",
        "cache to run; models that run weights between their layers; models without a discoverable",
        "layer list; and, on the hf path, `output_router_logits` with a load-balancing coefficient",
        "(that loss couples the layers; the native path implements it for Mixtral and Qwen3-MoE). A",
        "layer that writes into an object handed to every layer (shared KV) is refused at its first",
        "forward.",
        "",
        "Limits of the hf path: dropout and router noise are replayed (a block's recompute sees the",
        "random numbers of its forward), but are not the same draws as transformers'; a parameter",
        "that gets no gradient in a step (a module the forward skips) still gets AdamW's decoupled",
        "weight decay, where torch's AdamW skips a parameter whose `.grad` is None.",
        "",
        "## The registry sweep",
        "",
        f"`python scripts/model_sweep.py` (transformers {transformers.__version__}, torch {torch.__version__}):",
        "every model type of the causal-LM registry; a tiny config from its config class's own",
        f"defaults (width 64, 2 layers, 4 heads with the full-size grouping of kv heads, vocabulary {VOCAB},",
        "4 experts; per-layer overrides such as Gemma-4's wider global heads at twice the tiny sizes,",
        "given to the tiny model's layers of the same type; dropout and router noise off); transformers",
        "builds and saves a random model;",
        f"{STEPS} steps of {ROWS} x {SEQ} tokens in micro-batches of one row on the CPU in fp32 against",
        "transformers + `torch.optim.AdamW` on the same batches.",
        "",
        f"- *trained*: losses and every final tensor within {TOLERANCE:g} relative (tensor norm; or within",
        f"  {TOLERANCE:g} of AdamW's reach lr x steps as an RMS, for tensors whose true gradient is ~0), or",
        f"  within {NOISE_FACTOR}x transformers' own distance between its full-batch run and the same run",
        "  with the gradient summed over one-row micro-batches (how far fp32 rounding alone moves that",
        "  model); tensors transformers never gives a gradient are held to AdamW's zero-gradient step.",
        "- *refused*: Horizon's one-line reason. *skipped*: transformers' own tiny model does not build",
        "  or train from its config class's defaults. *failed*: anything else.",
        "",
        f"Totals: {counts['trained']} trained, {counts['refused']} refused, {counts['skipped']} skipped, "
        f"{counts['failed']} failed, of {len(rows)}.",
        "",
        "| model_type | class | result | detail |",
        "| --- | --- | --- | --- |",
    ]
    for r in sorted(rows, key=lambda r: r["model_type"]):
        detail = r["detail"].replace("|", "\\|").replace("\n", " ")
        lines.append(f"| {r['model_type']} | {r['class']} | {r['status']} | {detail} |")
    path.write_text("\n".join(lines) + "\n")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model_types", nargs="*", help="model types to run (default: the whole registry)")
    ap.add_argument("--json", help="also write the raw results here")
    ap.add_argument("--from-json", nargs="+", help="no sweep: write the table from these raw results")
    ap.add_argument("--part", default=None, help="K/N: only the K-th of N slices of the registry (1-based)")
    ap.add_argument("--markdown", default=None,
                    help="write the table here (default: docs/models.md when sweeping the whole registry)")
    args = ap.parse_args(argv)
    if args.from_json:
        rows = [r for f in args.from_json for r in json.loads(Path(f).read_text())]
    else:
        chosen = args.model_types or None
        if args.part:
            from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

            k, n = (int(x) for x in args.part.split("/"))
            chosen = sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)[k - 1::n]
        rows = sweep(chosen, json_path=args.json)
    whole = not args.model_types and not args.part
    md = args.markdown or (str(ROOT / "docs" / "models.md") if whole else None)
    if md:
        write_markdown(rows, Path(md))
    counts = {s: sum(r["status"] == s for r in rows) for s in ("trained", "refused", "skipped", "failed")}
    print(" ".join(f"{k}={v}" for k, v in counts.items()))
    return 1 if counts["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
