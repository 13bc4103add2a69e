"""The activation budget (`activation_memory`, docs/engine.md "Keeping activations"): blocks whose
forward keeps its saved tensors skip the recompute; the rest recompute as before. Equal to
transformers + torch AdamW whatever the budget covers, and equal to each other; the weight
streams stay two per step; device memory grows by the budget, not with depth."""

import pytest
import torch

import horizon
from horizon import plan as planmod
from horizon.options import ConfigError

transformers = pytest.importorskip("transformers")

from test_engine import (HP, SEQ, VOCAB, _batches, _config, _layer_bytes, _one_torch_thread,  # noqa: E402,F401
                         _reference_run, _rel, _save_hf, _tiny)


def _run(path, batches, **kw):
    trainer = horizon.Trainer.from_pretrained(path, device="cpu", **HP, **kw)
    losses, norms = [], []
    for ids, labels in batches:
        losses.append(trainer.train_step(ids, labels))
        norms.append(trainer.last_grad_norm)
    trainer.synchronize()
    weights = torch.cat([layer.slab.master.clone() for layer in trainer.model.layers])
    return trainer, losses, norms, weights


@pytest.mark.parametrize(
    "kind, tie, grad_clip, rows, micro_batch_size",
    [
        ("llama", False, 0.05, 4, 2),      # clipping and micro-batches
        ("mixtral", False, None, 4, 2),    # MoE with HF's load-balancing loss in the trained loss
        ("qwen3_moe", True, 0.05, 4, 1),   # MoE and dense blocks, tied head, clipping, 4 micro-batches
    ],
)
def test_all_none_half_equal_transformers_and_each_other(tmp_path, kind, tie, grad_clip, rows, micro_batch_size):
    path = _save_hf(_config(kind, layers=4, tie_word_embeddings=tie), tmp_path / "model")
    batches = _batches(8, rows)
    ref_losses, ref_norms, ref_model = _reference_run(path, batches, grad_clip=grad_clip, **HP)
    ref = torch.cat([p.detach().reshape(-1) for p in ref_model.parameters()])

    runs = {}
    all_kept = None
    for name in ("all", "none", "half"):
        budget = {"all": 1 << 40, "none": 0, "half": None if all_kept is None else all_kept // 2}[name]
        trainer, losses, norms, weights = _run(path, batches, grad_clip=grad_clip, micro_batch_size=micro_batch_size,
                                               activation_memory=budget)
        decided = list(trainer.stats["activation_blocks"].values())
        if name == "all":
            all_kept = trainer.stats["activation_kept_bytes"]
            assert decided == ["keep"] * 4 and all_kept > 0
        elif name == "none":
            assert decided == ["recompute"] * 4 and trainer.stats["activation_kept_bytes"] == 0
        else:  # the first blocks keep, the last ones recompute
            assert decided[0] == "keep" and decided[-1] == "recompute", decided
            assert 0 < trainer.stats["activation_kept_bytes"] <= all_kept // 2
        assert trainer.stats["skipped_steps"] == 0
        for step, (a, b) in enumerate(zip(losses, ref_losses)):
            assert abs(a - b) <= 1e-4 * abs(b), f"{name}, step {step}: horizon {a} vs reference {b}"
        if grad_clip is not None:
            assert min(ref_norms) > grad_clip  # the clipping case clips
            for a, b in zip(norms, ref_norms):
                assert abs(a - b) <= 1e-4 * b
        runs[name] = (losses, weights)
    # Against the reference's final weights (the slabs hold them in the engine's layout: compared
    # by export below for one budget; here the runs against each other, bit for bit: the kept
    # tensors are the ones the recompute would produce, so nothing may differ).
    for name in ("none", "half"):
        assert runs[name][0] == runs["all"][0], name
        assert torch.equal(runs[name][1], runs["all"][1]), name

    out = tmp_path / "trained"
    trainer.save_pretrained(out)  # the "half" run
    got = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).state_dict()
    for name, r in ref_model.state_dict().items():
        assert _rel(got[name], r) <= 1e-4, name
    assert ref.numel() > 0


def _step_stats(layers, budget, micro_batch_size=2, steps=2):
    trainer = horizon.Trainer.from_config(_tiny(layers=layers), device="cpu", micro_batch_size=micro_batch_size,
                                          activation_memory=budget)
    for _ in range(steps):
        trainer.train_step(torch.randint(0, VOCAB, (4, SEQ)))
    return trainer


def test_weights_stream_twice_whatever_the_budget():
    for budget in (0, 1 << 40, 200_000):
        trainer = _step_stats(3, budget, steps=1)
        sizes, blocks = _layer_bytes(trainer)
        # Blocks twice (forward; backward: the kept ones re-bind their saved weight views to it),
        # the embedding and the head once.
        assert trainer.stats["weight_bytes_h2d"] == 2 * blocks + sizes["embed"] + sizes["head"], budget
        assert trainer.engine.layer_landings == {k: 1 for k in sizes}


def test_device_bytes_grow_by_the_budget_not_with_depth():
    unit = _step_stats(2, 1 << 40).stats["activation_kept_bytes"] // 4  # 2 blocks x 2 micro-batches
    budget = 3 * unit  # three block micro-batches, fewer than the 4-layer model has
    peaks = {}
    for layers in (4, 16):
        none = _step_stats(layers, 0).stats["peak_device_bytes"]
        t = _step_stats(layers, budget)
        kept = t.stats["activation_kept_bytes"]
        assert kept == 3 * unit
        # What the budget keeps adds to the peak, and nothing else does (the kept blocks' inputs
        # are not checkpointed a second time: their bytes count once, in the kept ones).
        assert 0 < t.stats["peak_device_bytes"] - none <= budget, (layers, t.stats["peak_device_bytes"], none)
        peaks[layers] = t.stats["peak_device_bytes"]
    assert abs(peaks[16] - peaks[4]) <= 0.05 * peaks[4], peaks


@pytest.mark.parametrize("kind", ["llama", "qwen3", "mixtral", "qwen3_moe"])
def test_plan_estimate_covers_the_measured_bytes_and_flops_agree(tmp_path, kind):
    path = _save_hf(_config(kind, layers=2), tmp_path / "model")
    trainer = horizon.Trainer.from_pretrained(path, device="cpu", micro_batch_size=2, activation_memory=1 << 40)
    trainer.train_step(torch.randint(0, VOCAB, (4, SEQ)))
    measured_unit = trainer.stats["activation_kept_bytes"] / 4
    cfg = trainer.spec
    machine = planmod.Machine("cpu", "CPU", 64 << 30, 0, 2)
    p = planmod.make_plan(cfg, batch_size=4, seq_len=SEQ, micro_batch_size=2, machine=machine,
                          activation_memory=1 << 40)
    a = p["activations"]
    assert a["blocks"] == {"keep": 2, "offload": 0, "partial": 0, "recompute": 0}
    assert measured_unit <= a["unit_bytes"] <= 2 * measured_unit, (measured_unit, a["unit_bytes"])
    assert a["flops_per_step"] == trainer.stats["flops_per_step"]
    # No budget: every block's forward runs twice, 2 FLOPs per active parameter and token more.
    p0 = planmod.make_plan(cfg, batch_size=4, seq_len=SEQ, micro_batch_size=2, machine=machine,
                           activation_memory=0)
    blocks = sum(v for k, v in planmod.layer_active_parameters(cfg).items() if k.startswith("layers."))
    assert p0["activations"]["flops_per_step"] - a["flops_per_step"] == 2 * blocks * 4 * SEQ
    assert p0["device_breakdown"]["kept_activations"] == 0 and p0["activations"]["blocks"]["recompute"] == 2


def test_auto_keeps_what_fits_and_the_plan_says_so():
    # auto on the CPU device: the host's available memory less a margin; a tiny model fits whole.
    trainer = _step_stats(2, "auto")
    assert trainer.engine_config.activation_memory == "auto"
    assert set(trainer.stats["activation_blocks"].values()) == {"keep"}
    p = planmod.make_plan(_tiny(layers=2), batch_size=4, seq_len=SEQ, micro_batch_size=2,
                          machine=planmod.Machine("cpu", "CPU", 64 << 30, 0, 2))
    assert p["activations"]["blocks"]["keep"] == 2
    # ... and on a machine with nothing to spare, nothing is kept (and the plan says why it fails).
    p = planmod.make_plan(_tiny(layers=2), batch_size=4, seq_len=SEQ, micro_batch_size=2,
                          machine=planmod.Machine("cpu", "CPU", 512 << 20, 0, 2))
    assert p["activations"]["blocks"]["keep"] == 0 and "recompute 2" in planmod.format_plan(p)


@pytest.mark.parametrize("value, message", [
    ("lots", "activation_memory must be a byte count"),
    ("-5", "activation_memory must be >= 0 bytes"),
    (True, "activation_memory must be a string"),
])
def test_bad_budgets_are_one_line(value, message):
    with pytest.raises(ConfigError, match=message):
        horizon.Trainer.from_config(_tiny(), device="cpu", activation_memory=value)


def test_budget_units_parse():
    from horizon.engine.config import EngineConfig

    assert EngineConfig(activation_memory="8GiB").activation_budget() == 8 << 30
    assert EngineConfig(activation_memory="512MB").activation_budget() == 512 * 10**6
    assert EngineConfig(activation_memory=1234).activation_budget() == 1234
    assert EngineConfig(activation_memory="0").activation_budget() == 0
    assert EngineConfig().activation_budget() is None  # auto


def test_plan_command_reports_the_activation_plan(capsys):
    from horizon.cli import main

    assert main(["plan", "--preset", "tiny", "--device", "cpu", "--activation-memory", "0"]) == 0
    out = capsys.readouterr().out
    assert "recompute 4" in out and "TFLOP per step" in out
    # (a bad value: tests/test_cli.py, one line and exit 2)


def test_offload_placement_mechanism_is_exact_on_the_cpu(monkeypatch):
    # Placement "offload" is for CUDA (page-locked host copies streamed back ahead of the block's
    # backward, chosen by a measured cost model). Its mechanism (saved tensors copied out as they
    # are saved, the weight views re-bound, the copies brought back one block ahead) runs on the
    # CPU device with plain clones when forced, and must change no bit against the recompute.
    ids = [torch.randint(0, VOCAB, (4, SEQ), generator=torch.Generator().manual_seed(s)) for s in range(3)]
    results = {}
    for mode in ("recompute", "offload", "mixed"):
        trainer = horizon.Trainer.from_config(_tiny(layers=3), device="cpu", micro_batch_size=2, grad_clip=0.5,
                                              activation_memory=0 if mode != "mixed" else 150_000)
        e = trainer.engine
        if mode != "recompute":
            monkeypatch.setattr(e.activations, "cheaper", lambda key, nbytes: True)
            monkeypatch.setattr(e, "_host_activation_budget", lambda tokens: 1 << 40)
        losses = [trainer.train_step(x) for x in ids]
        st = trainer.stats
        placed = set(st["activation_blocks"].values())
        if mode == "recompute":
            assert placed == {"recompute"} and st["activation_bytes_moved"] == 0
        elif mode == "offload":
            assert placed == {"offload"}
            # out and back, every step
            assert st["activation_bytes_moved"] > 0 and st["activation_bytes_moved"] % 2 == 0
            assert st["flops_per_step"] < results["recompute"][2]
        else:
            assert "keep" in e.activations.last[next(iter(e.activations.last))]
            assert "offload" in sum(e.activations.last.values(), [])
        results[mode] = (losses, torch.cat([layer.slab.master.clone() for layer in trainer.model.layers]),
                         st["flops_per_step"])
        assert not any(isinstance(k, tuple) and k[0] in ("kept", "kept-in", "kept-host")
                       for k in list(e.device_ledger._held) + list(e.host_ledger._held))
    for mode in ("offload", "mixed"):
        assert results[mode][0] == results["recompute"][0]
        assert torch.equal(results[mode][1], results["recompute"][1])


def test_plan_offloads_where_the_copies_beat_the_recompute():
    # A 70B-class block (hidden 8192, MLP 28672) on a generic GPU (assumed 100 TFLOP/s, 24 GB/s):
    # bringing a token's saved tensors back (~0.29 MB, 12 us) costs less than recomputing its
    # forward (2 x 0.86 G FLOPs, 17 us); with a 7B-class block (hidden 4096) it is the other way.
    def cfg(h, i, heads, layers=8):
        return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": h,
                "intermediate_size": i, "num_hidden_layers": layers, "num_attention_heads": heads,
                "num_key_value_heads": 8, "vocab_size": 32000, "max_position_embeddings": 4096,
                "rms_norm_eps": 1e-5, "tie_word_embeddings": False}
    gpu = planmod.Machine("cuda", "Some GPU", 4096 << 30, 40 << 30, 32)
    big = planmod.make_plan(cfg(8192, 28672, 64), batch_size=8, seq_len=4096, micro_batch_size=1, machine=gpu)
    a = big["activations"]
    assert a["blocks"]["offload"] > 0 and a["offloaded_bytes"] > 0
    assert big["device_bytes"] <= gpu.device_bytes  # the blocks brought back ahead have room
    assert a["bytes_moved"] == 2 * a["offloaded_bytes"] + 2 * big["host_breakdown"].get("offloaded_checkpoints", 0)
    assert big["host_breakdown"]["offloaded_activations"] == a["offloaded_bytes"]
    assert "offload " + str(a["blocks"]["offload"]) in planmod.format_plan(big)
    small = planmod.make_plan(cfg(4096, 11008, 32, layers=32), batch_size=8, seq_len=4096, micro_batch_size=1, machine=gpu)
    assert small["activations"]["blocks"]["offload"] == 0 and small["activations"]["blocks"]["recompute"] > 0
    # A fixed budget is the whole budget: no host placement.
    fixed = planmod.make_plan(cfg(8192, 28672, 64), batch_size=8, seq_len=4096, micro_batch_size=1, machine=gpu,
                              activation_memory="1GiB")
    assert fixed["activations"]["blocks"]["offload"] == 0
