"""`horizon plan`: parameter counts against Hugging Face transformers' own models, the footprint
and step-time formulas of docs/engine.md recomputed here by hand, the fits verdict, and the CLI."""

import json
import subprocess
import sys

import pytest

from horizon import HorizonError, plan
from horizon.models import presets

GIB = 1 << 30

SMALL = {
    "LlamaForCausalLM": dict(model_type="llama", attention_bias=True, mlp_bias=True),
    "MistralForCausalLM": dict(model_type="mistral", sliding_window=None),
    "Qwen2ForCausalLM": dict(model_type="qwen2"),
    "Qwen3ForCausalLM": dict(model_type="qwen3"),
    "MixtralForCausalLM": dict(model_type="mixtral", num_local_experts=4, num_experts_per_tok=2),
    "Qwen3MoeForCausalLM": dict(model_type="qwen3_moe", num_experts=4, num_experts_per_tok=2,
                                moe_intermediate_size=24, decoder_sparse_step=2, mlp_only_layers=[2]),
}


def _hf_numel(cfg: dict) -> int:
    transformers = pytest.importorskip("transformers")
    c = transformers.AutoConfig.for_model(cfg["model_type"], **{k: v for k, v in cfg.items() if k != "model_type"})
    m = transformers.AutoModelForCausalLM.from_config(c)
    return sum(p.numel() for p in m.parameters())


@pytest.mark.parametrize("arch", sorted(SMALL))
@pytest.mark.parametrize("tied", [False, True])
def test_parameter_count_matches_transformers(arch, tied):
    cfg = dict(architectures=[arch], vocab_size=97, hidden_size=32, intermediate_size=40, num_hidden_layers=4,
               num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=64,
               tie_word_embeddings=tied, **SMALL[arch])
    assert plan.count_parameters(cfg) == _hf_numel(cfg)


@pytest.mark.parametrize("name", ["tiny", "tiny-moe"])
def test_preset_parameter_counts_match_transformers(name):
    assert plan.count_parameters(presets.get(name)) == _hf_numel(presets.get(name))


def test_real_size_presets_have_their_published_sizes():
    assert plan.count_parameters(presets.get("7b")) == 6_738_415_616   # Llama-2-7B
    assert plan.count_parameters(presets.get("1b")) == 1_235_814_400   # Llama-3.2-1B


def _gpu(host_gib=256, dev_gib=80, name="NVIDIA H100 80GB HBM3"):
    return plan.Machine("cuda", name, host_gib * GIB, dev_gib * GIB, 16)


def test_footprint_follows_the_design_formula():
    cfg = presets.get("7b")
    n = plan.count_parameters(cfg)
    H, I, V = 4096, 11008, 32000
    block = 4 * H * H + 3 * H * I + 2 * H  # q, k, v, o + gate, up, down + two norms
    assert n == V * H + 32 * block + H + V * H
    largest_layer = block  # larger than the embedding or the head
    B, S, mb = 8, 1024, 2
    for clip in (False, True):
        # No activation budget: every block recomputed (the budget's own formula below).
        p = plan.make_plan(cfg, batch_size=B, seq_len=S, micro_batch_size=mb, grad_clip=clip, machine=_gpu(),
                           activation_memory=0)
        # 18 B/param with or without clipping: every step lands in the fp32 gradient buffer
        # (a step updates all layers or none), plus the process itself and one layer's load buffer.
        per_param = 18
        assert p["largest_layer_parameters"] == largest_layer
        assert p["host_bytes"] == (per_param * n + plan.LANDING_SLOTS * 4 * largest_layer
                                   + plan.PROCESS_BASELINE_BYTES + 4 * largest_layer)
        ckpts = 32 * (B * S) * 4096 * 2
        assert p["device_breakdown"]["activation_checkpoints"] == ckpts
        assert p["device_breakdown"]["hidden_states"] == 2 * (B * S) * 4096 * 2
        assert p["device_breakdown"]["weight_slots"] == 2 * 2 * largest_layer
        # two alternating buffers of the largest layer and one of the embedding's size
        assert p["device_breakdown"]["grad_accumulator_fp32"] == 4 * (2 * largest_layer + V * H)
        assert p["device_bytes"] == sum(p["device_breakdown"].values())
        assert p["pcie_bytes_per_step"] == 2 * 2 * n + 4 * n
        # H100 assumptions: 600 TFLOP/s, 50 GB/s each way, 50 GB/s host memory for 30 B/param.
        # FLOPs: 6 per parameter and token (the embedding is a lookup) + 2 more for each block's
        # recompute.
        flops = 6 * (n - V * H) * B * S + 2 * 32 * block * B * S
        assert p["activations"]["flops_per_step"] == flops
        want = max(flops / 600e12, 4 * n / 50e9, 4 * n / 50e9, 30 * n / 50e9)
        assert p["step_time_lower_bound_s"] == pytest.approx(want, rel=1e-12)
        assert p["fits"]
    # A budget of 5 block micro-batches (4 per block): the first block keeps all four, the second
    # one; their inputs are no checkpoints, and their forward runs once.
    unit = p["activations"]["unit_bytes"]
    p = plan.make_plan(cfg, batch_size=B, seq_len=S, micro_batch_size=mb, machine=_gpu(), activation_memory=5 * unit)
    a = p["activations"]
    assert a["blocks"] == {"keep": 1, "offload": 0, "partial": 1, "recompute": 30}
    assert a["kept_bytes"] == 5 * unit == p["device_breakdown"]["kept_activations"]
    assert p["device_breakdown"]["activation_checkpoints"] == ckpts - 5 * (mb * S) * 4096 * 2
    assert a["flops_per_step"] == flops - 5 * 2 * block * mb * S


def test_fits_verdicts():
    cfg = presets.get("7b")
    # 7B at 18 B/param needs ~113 GiB of host memory (plus the process, ~0.8 GiB).
    assert not plan.make_plan(cfg, batch_size=1, seq_len=512, machine=_gpu(host_gib=64))["fits_host"]
    assert plan.make_plan(cfg, batch_size=1, seq_len=512, machine=_gpu(host_gib=128))["fits_host"]
    # Checkpoints that do not fit the GPU are offloaded to the host.
    p = plan.make_plan(cfg, batch_size=64, seq_len=4096, micro_batch_size=1, machine=_gpu(host_gib=1024, dev_gib=16),
                       activation_memory=0)
    assert p["checkpoints_offloaded"] and p["device_breakdown"]["activation_checkpoints"] == 0
    assert p["host_breakdown"]["offloaded_checkpoints"] == 32 * 64 * 4096 * 4096 * 2
    # On the CPU device, device bytes come out of host memory too.
    cpu = plan.Machine("cpu", "CPU", 150 * GIB, 0, 4)
    p = plan.make_plan(cfg, batch_size=64, seq_len=4096, micro_batch_size=1, machine=cpu)
    assert p["host_bytes"] < 150 * GIB - p["machine"]["host_margin_bytes"] < p["host_bytes"] + p["device_bytes"]
    assert not p["fits"] and p["pcie_bytes_per_step"] == 0


@pytest.mark.parametrize(
    "cfg,needle",
    [
        ({"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"}, "unsupported architecture 'GPT2LMHeadModel'"),
        # One reader with the trainer: no 'architectures' falls back to model_type, as transformers does.
        ({"model_type": "no-such-model"}, "model_type 'no-such-model' not supported"),
        (dict(presets.get("tiny"), hidden_size=-4), "'hidden_size' must be an integer >= 1"),
        (dict(presets.get("tiny"), num_key_value_heads=3), "not a multiple"),
    ],
)
def test_bad_model_configs(cfg, needle):
    with pytest.raises(HorizonError) as e:
        plan.make_plan(cfg, batch_size=1, seq_len=8, machine=_gpu(), model_path="native")
    assert needle in str(e.value)


def test_bad_sizes():
    for kw in (dict(batch_size=0, seq_len=8), dict(batch_size=2, seq_len=-1), dict(batch_size=2, seq_len=8, micro_batch_size=3)):
        with pytest.raises(HorizonError):
            plan.make_plan(presets.get("tiny"), machine=_gpu(), **kw)


def test_plan_cli_json_and_table():
    r = subprocess.run([sys.executable, "-m", "horizon", "plan", "--preset", "7b", "--device", "cpu", "--json",
                        "--batch-size", "4", "--seq-len", "256", "--grad-clip", "1.0"], capture_output=True, text=True, timeout=120)
    p = json.loads(r.stdout)
    n = 6_738_415_616
    assert r.returncode == (0 if p["fits"] else 1), r.stderr  # does not fit: the plan, then exit 1
    assert p["parameters"] == n and p["tokens_per_step"] == 1024
    assert p["host_breakdown"]["master_fp32"] == 4 * n and p["host_breakdown"]["grad_buffer_fp32"] == 4 * n
    assert isinstance(p["fits"], bool) and p["assumptions"]
    r = subprocess.run([sys.executable, "-m", "horizon", "plan", "--preset", "tiny", "--device", "cpu"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "host memory" in r.stdout and "step time >=" in r.stdout and "fits" in r.stdout
