"""`horizon plan` and `horizon train` read a model directory through the same code: they refuse
exactly the same directories with exactly the same one-line message, and accept the same ones.
The cases cover every refusal of the readers (models/spec.py, io/model_dir.py); a tripwire below
fails when a reader gains a refusal that no case here exercises."""

from __future__ import annotations

import ast
import json
import pathlib

import pytest

from horizon.cli import main as cli_main
from horizon.models import presets

SRC = pathlib.Path(__file__).resolve().parent.parent / "src" / "horizon"
READERS = [SRC / "models" / "spec.py", SRC / "io" / "model_dir.py"]

TINY = presets.get("tiny")
MIXTRAL = dict(TINY, architectures=["MixtralForCausalLM"], model_type="mixtral", num_local_experts=4,
               num_experts_per_tok=2)
QWEN2 = dict(TINY, architectures=["Qwen2ForCausalLM"], model_type="qwen2")
QWEN3_MOE = dict(TINY, architectures=["Qwen3MoeForCausalLM"], model_type="qwen3_moe", num_experts=4,
                 num_experts_per_tok=2, moe_intermediate_size=64)

# (name, config.json content or None for no file, write weights?)
REFUSED = [
    ("missing-dir", "MISSING", True),
    ("no-config", None, True),
    ("bad-json", "{oops", True),
    ("not-object", "[1, 2]", True),
    ("no-weights", TINY, False),
    ("unsupported-arch", dict(TINY, architectures=["GPT2LMHeadModel"]), True),
    ("unknown-model-type", {k: v for k, v in TINY.items() if k != "architectures"} | {"model_type": "nope"}, True),
    ("bad-size", dict(TINY, hidden_size="big"), True),
    ("kv-not-divisor", dict(TINY, num_key_value_heads=3), True),
    ("hidden-not-divisible", {k: v for k, v in TINY.items() if k != "head_dim"} | {"hidden_size": 130}, True),
    ("odd-head-dim", dict(TINY, head_dim=31), True),
    ("activation", dict(TINY, hidden_act="gelu"), True),
    ("rope-type", dict(TINY, rope_scaling={"rope_type": "no-such-rope", "factor": 2.0}), True),
    ("rope-theta", dict(TINY, rope_theta=-1.0), True),
    ("norm-eps", dict(TINY, rms_norm_eps=0), True),
    ("init-range", dict(TINY, initializer_range=-1), True),
    ("jitter", dict(MIXTRAL, router_jitter_noise=0.1), True),
    ("top-k", dict(MIXTRAL, num_experts_per_tok=5), True),
    ("aux-coef", dict(QWEN3_MOE, output_router_logits=True, router_aux_loss_coef=-1), True),
    ("experts", dict(MIXTRAL, num_local_experts=0), True),
    ("max-positions", dict(TINY, max_position_embeddings=0), True),
    ("transformers-rejects", dict(TINY, rope_scaling={"rope_type": "yarn"}), True),
    ("attention-dropout", dict(TINY, attention_dropout=0.1), True),
    ("rope-parameters", dict(TINY, rope_parameters=[1, 2]), True),
    ("pad-token", dict(TINY, pad_token_id=10**6), True),
    ("layer-types-length", dict(QWEN2, layer_types=["full_attention"]), True),
    ("layer-types-window", dict(QWEN2, layer_types=["sliding_attention"] * 4, sliding_window=None), True),
    ("layer-types-kind", dict(QWEN2, layer_types=["linear_attention"] * 4), True),
]


def _write(root: pathlib.Path, name: str, config, weights: bool) -> pathlib.Path:
    d = root / name
    if config == "MISSING":
        return d
    d.mkdir()
    if config is not None:
        (d / "config.json").write_text(config if isinstance(config, str) else json.dumps(config))
    if weights:
        (d / "model.safetensors").write_bytes(b"")
    return d


def _one_line(capsys, argv) -> tuple[int, str]:
    rc = cli_main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) <= 1, err
    return rc, err[0] if err else ""


@pytest.mark.parametrize("name,config,weights", REFUSED, ids=[c[0] for c in REFUSED])
def test_plan_and_train_refuse_alike(tmp_path, capsys, name, config, weights):
    """The native reader's refusals (`--model-path native`): the same one line from both."""
    d = _write(tmp_path, name, config, weights)
    common = ["--model-dir", str(d), "--device", "cpu", "--batch-size", "2", "--seq-len", "16",
              "--model-path", "native"]
    rc_plan, plan_err = _one_line(capsys, ["plan", *common])
    rc_train, train_err = _one_line(capsys, ["train", *common, "--out", str(tmp_path / "run")])
    assert rc_plan == rc_train == 1, (plan_err, train_err)
    assert plan_err.startswith("horizon: error: ") and plan_err == train_err
    assert not (tmp_path / "run").exists()  # refused before anything was written


@pytest.mark.parametrize("name,config,weights", REFUSED, ids=[c[0] for c in REFUSED])
def test_plan_and_train_agree_on_the_automatic_path(tmp_path, capsys, name, config, weights):
    """`--model-path auto` (native, else transformers' own modules): a directory plan refuses,
    train refuses with the same line; one plan accepts, train reads too (it then stops later,
    here at the missing tokenizer, or trains)."""
    d = _write(tmp_path, name, config, weights)
    common = ["--model-dir", str(d), "--device", "cpu", "--batch-size", "2", "--seq-len", "16"]
    rc_plan, plan_err = _one_line(capsys, ["plan", *common])
    rc_train, train_err = _one_line(capsys, ["train", *common, "--steps", "1", "--out", str(tmp_path / "run")])
    if rc_plan == 1:
        assert rc_train == 1 and plan_err == train_err, (plan_err, train_err)
    else:
        assert rc_plan == 0 and (rc_train == 0 or "tokenizer" in train_err), train_err


def test_plan_and_train_accept_alike(tmp_path, capsys):
    import horizon
    from horizon.data import shipped_tokenizer_path

    d = tmp_path / "tiny"
    horizon.Trainer.from_config(TINY, device="cpu").save_pretrained(str(d))
    (d / "tokenizer.json").write_bytes(shipped_tokenizer_path().read_bytes())
    for path in ("auto", "native", "hf"):
        common = ["--model-dir", str(d), "--device", "cpu", "--batch-size", "2", "--seq-len", "16",
                  "--model-path", path]
        assert cli_main(["plan", *common]) == 0
        assert cli_main(["train", *common, "--steps", "1", "--out", str(tmp_path / f"run-{path}")]) == 0
        assert (tmp_path / f"run-{path}" / "metrics.jsonl").is_file()


def test_every_refusal_of_the_readers_has_a_case():
    raises = 0
    for path in READERS:
        tree = ast.parse(path.read_text())
        raises += sum(isinstance(n, ast.Raise) and n.exc is not None for n in ast.walk(tree))
    # Two refusals cannot come from a model directory: the Python API's "config must be a dict"
    # and "reading a model config needs transformers" (an install problem).
    assert len(REFUSED) >= raises - 2, (len(REFUSED), raises)
