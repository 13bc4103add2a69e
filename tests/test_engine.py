"""The layer-major engine against HF transformers + torch.optim.AdamW (step-for-step
equivalence), and its streaming / memory invariants (docs/engine.md).

Only the equivalence tests need transformers (the GPU image may lack it); the others build
their configs as plain dicts."""

import math

import pytest
import torch

import horizon
from horizon import HorizonError

try:
    import transformers
except ImportError:  # pragma: no cover - depends on the environment
    transformers = None

needs_hf = pytest.mark.skipif(transformers is None, reason="transformers is not installed")


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    # Tiny models gain nothing from intra-op threads, and on a loaded 2-core machine OpenMP's
    # spinning makes them 10-100x slower; restored after this module.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)

SEQ = 16
VOCAB = 128


def _config(kind, layers=2, **extra):
    base = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=layers, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=64, rms_norm_eps=1e-5)
    if kind == "llama":
        cfg = transformers.LlamaConfig(**base, **extra)
    elif kind == "qwen3":
        cfg = transformers.Qwen3Config(**base, head_dim=16, **extra)
    elif kind == "mixtral":  # with HF's load-balancing loss in the trained loss
        cfg = transformers.MixtralConfig(**base, num_local_experts=4, num_experts_per_tok=2,
                                         output_router_logits=True, router_aux_loss_coef=0.05, **extra)
    elif kind == "qwen3_moe":  # layer 1 dense, layer 0 MoE; no aux loss
        base["intermediate_size"] = 48
        cfg = transformers.Qwen3MoeConfig(**base, head_dim=16, num_experts=4, num_experts_per_tok=2,
                                          moe_intermediate_size=32, mlp_only_layers=[1], norm_topk_prob=True,
                                          **extra)
    else:
        raise ValueError(kind)
    return cfg


def _save_hf(cfg, path, seed=0):
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(cfg).float()
    with torch.no_grad():  # non-trivial norms so the norm gradients matter
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.8, 1.2)
    model.save_pretrained(path)
    return path


def _batches(n_steps, rows, seed=1):
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n_steps):
        ids = torch.randint(0, VOCAB, (rows, SEQ), generator=gen)
        labels = ids.clone()
        labels[:, : SEQ // 4] = -100  # prompt tokens carry no loss
        out.append((ids, labels))
    return out


def _reference_run(path, batches, *, lr, betas, eps, weight_decay, grad_clip):
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager")
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
    losses, norms = [], []
    for ids, labels in batches:
        loss = model(input_ids=ids, labels=labels).loss
        loss.backward()
        loss = loss.detach()
        if grad_clip is not None:
            norms.append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)))
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses, norms, model


def _rel(a, b):
    return (a - b).norm().item() / max(b.norm().item(), 1e-30)


# eps 1e-6: with 1e-8, a few near-zero embedding gradients make even fp32-vs-fp64 runs of the
# reference differ by ~1e-4 (AdamW normalises noise into full-size steps); 1e-6 keeps that
# inherent noise ~50x under the tolerance, so the test measures the engine, not rounding.
HP = dict(lr=3e-3, betas=(0.9, 0.95), eps=1e-6, weight_decay=0.1)


@needs_hf
@pytest.mark.parametrize(
    "kind, tie, grad_clip, rows, micro_batch_size",
    [
        ("llama", False, None, 4, None),
        ("llama", False, 0.05, 4, 2),
        ("qwen3", True, None, 3, 2),
        ("qwen3", False, 0.05, 4, 1),
        ("mixtral", False, None, 4, 2),
        ("qwen3_moe", True, 0.05, 4, 2),
    ],
)
def test_equivalence_with_hf_and_torch_adamw(tmp_path, kind, tie, grad_clip, rows, micro_batch_size):
    path = _save_hf(_config(kind, tie_word_embeddings=tie), tmp_path / "model")
    batches = _batches(8, rows)
    ref_losses, ref_norms, ref_model = _reference_run(path, batches, grad_clip=grad_clip, **HP)
    if grad_clip is not None:
        assert min(ref_norms) > grad_clip, "the clipping case must actually clip"

    trainer = horizon.Trainer.from_pretrained(path, device="cpu", grad_clip=grad_clip,
                                              micro_batch_size=micro_batch_size, **HP)
    assert trainer.compute_dtype == torch.float32
    losses, norms = [], []
    for ids, labels in batches:
        losses.append(trainer.train_step(ids, labels))
        norms.append(trainer.last_grad_norm)
    assert trainer.step == 8 and trainer.stats["skipped_steps"] == 0
    for step, (a, b) in enumerate(zip(losses, ref_losses)):
        assert abs(a - b) <= 1e-4 * abs(b), f"step {step}: horizon {a} vs reference {b}"
    if grad_clip is not None:
        for a, b in zip(norms, ref_norms):
            assert abs(a - b) <= 1e-4 * b

    out = tmp_path / "trained"
    trainer.save_pretrained(out)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    ref_state = ref_model.state_dict()
    got_state = loaded.state_dict()
    assert set(got_state) == set(ref_state)
    moved = 0.0
    init = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).state_dict()
    for name, ref in ref_state.items():
        assert _rel(got_state[name], ref) <= 1e-4, name
        moved = max(moved, _rel(ref, init[name]))
    assert moved > 1e-2  # the weights did change, so the comparison means something


def _tiny(layers=2):
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 64,
        "intermediate_size": 96, "num_hidden_layers": layers, "num_attention_heads": 4,
        "num_key_value_heads": 2, "vocab_size": VOCAB, "max_position_embeddings": 64, "rms_norm_eps": 1e-5,
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0}, "tie_word_embeddings": False,
        "initializer_range": 0.02, "hidden_act": "silu",
    }


def _layer_bytes(trainer):
    sizes = {layer.key: layer.numel * 4 for layer in trainer.model.layers}
    blocks = sum(v for k, v in sizes.items() if k.startswith("layers."))
    return sizes, blocks


@pytest.mark.parametrize("micro_batch_size", [4, 1])
def test_weights_stream_twice_and_gradients_leave_once_per_step(micro_batch_size):
    trainer = horizon.Trainer.from_config(_tiny(layers=3), device="cpu", micro_batch_size=micro_batch_size)
    sizes, blocks = _layer_bytes(trainer)
    ids = torch.randint(0, VOCAB, (4, SEQ))
    before = dict(trainer.stats)
    trainer.train_step(ids)
    trainer.train_step(ids)
    after = trainer.stats
    # Blocks stream in twice (forward, backward recompute); the embedding once (its backward
    # is a scatter that needs no weights) and the head once (forward and backward fused).
    per_step = 2 * blocks + sizes["embed"] + sizes["head"]
    assert after["weight_bytes_h2d"] - before["weight_bytes_h2d"] == 2 * per_step
    assert after["grad_bytes_d2h"] - before["grad_bytes_d2h"] == 2 * sum(sizes.values())
    assert trainer.engine.layer_landings == {k: 1 for k in sizes}


def test_tied_head_streams_the_embedding_again(tmp_path):
    cfg = _tiny()
    cfg["tie_word_embeddings"] = True
    trainer = horizon.Trainer.from_config(cfg, device="cpu", micro_batch_size=2)
    sizes, blocks = _layer_bytes(trainer)
    trainer.train_step(torch.randint(0, VOCAB, (4, SEQ)))
    assert trainer.stats["weight_bytes_h2d"] == 2 * blocks + 2 * sizes["embed"] + sizes["head"]
    assert trainer.stats["grad_bytes_d2h"] == sum(sizes.values())


def test_peak_device_bytes_do_not_grow_with_depth():
    peaks = {}
    for layers in (4, 16):
        trainer = horizon.Trainer.from_config(_tiny(layers=layers), device="cpu", micro_batch_size=2)
        for _ in range(2):
            trainer.train_step(torch.randint(0, VOCAB, (4, SEQ)))
        peaks[layers] = trainer.stats["peak_device_bytes"]
        # The accounting is real: at least the two weight slots and one block's activations.
        block = trainer.model.layers[1].numel * 4
        assert peaks[layers] > 2 * block
    assert abs(peaks[16] - peaks[4]) <= 0.05 * peaks[4], peaks


@pytest.mark.parametrize("grad_clip", [None, 1.0])
def test_host_bytes_within_footprint(grad_clip):
    trainer = horizon.Trainer.from_config(_tiny(layers=4), device="cpu", grad_clip=grad_clip, micro_batch_size=2)
    rows = 4
    trainer.train_step(torch.randint(0, VOCAB, (rows, SEQ)))
    p = trainer.num_parameters
    per_param = 18  # with or without clipping: every step lands in the gradient buffers (all-or-nothing)
    spec = trainer.spec
    n_tensors = sum(len(layer.defn.shapes) for layer in trainer.model.layers)
    padding = n_tensors * 16 * per_param  # each tensor's offset is aligned to 16 elements
    padding += len(trainer.model.layers) * 5 * 4096  # each slab region is whole pages
    max_layer = max(layer.numel for layer in trainer.model.layers)
    landing = 2 * max_layer * 4
    checkpoints = spec.num_layers * rows * SEQ * spec.hidden_size * 4
    peak = trainer.stats["peak_host_bytes"]
    assert p * per_param <= peak <= p * per_param + padding + landing + checkpoints


def test_non_finite_loss_skips_the_step():
    trainer = horizon.Trainer.from_config(_tiny(), device="cpu", lr=1e-2)
    ids = torch.randint(0, VOCAB, (2, SEQ))
    trainer.train_step(ids)
    state = {k: v.clone() for k, v in trainer.state_tensors().items()}
    poisoned = dict(state)
    poisoned["head.master"] = state["head.master"].clone()
    poisoned["head.master"][0] = float("nan")  # the final norm's first weight
    trainer.load_state_tensors(poisoned)
    loss = trainer.train_step(ids)
    assert math.isnan(loss)
    assert trainer.last_step_skipped and trainer.stats["skipped_steps"] == 1 and trainer.step == 1
    for k, v in trainer.state_tensors().items():
        torch.testing.assert_close(v, poisoned[k], equal_nan=True, rtol=0, atol=0)
    trainer.load_state_tensors(state)
    assert math.isfinite(trainer.train_step(ids)) and not trainer.last_step_skipped and trainer.step == 2


def test_state_tensors_round_trip_reproduces_training():
    cfg = _tiny()
    a = horizon.Trainer.from_config(cfg, device="cpu", seed=3, lr=1e-2)
    batches = [torch.randint(0, VOCAB, (2, SEQ)) for _ in range(3)]
    a.train_step(batches[0])
    b = horizon.Trainer.from_config(cfg, device="cpu", seed=4, lr=1e-2)
    b.load_state_tensors({k: v.clone() for k, v in a.state_tensors().items()})
    b.step = a.step
    for ids in batches[1:]:
        assert b.train_step(ids) == pytest.approx(a.train_step(ids), rel=1e-6)


def test_from_config_initialises_like_hf():
    cfg = _tiny()
    cfg["initializer_range"] = 0.05
    t = horizon.Trainer.from_config(cfg, device="cpu", seed=0)
    views = t.model.hf_views()
    assert torch.equal(views["model.norm.weight"], torch.ones(64))
    q = views["model.layers.0.self_attn.q_proj.weight"]
    assert abs(q.std().item() - 0.05) < 0.005 and abs(q.mean().item()) < 0.005
    t2 = horizon.Trainer.from_config(cfg, device="cpu", seed=0)
    assert torch.equal(t2.model.hf_views()["model.embed_tokens.weight"], views["model.embed_tokens.weight"])
    assert t.num_parameters == sum(v.numel() for v in views.values())


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(lr=-1.0), "lr"),
        (dict(betas=(0.9,)), "betas"),
        (dict(betas=(0.9, 1.0)), "betas"),
        (dict(eps=0.0), "eps"),
        (dict(grad_clip=0.0), "grad_clip"),
        (dict(micro_batch_size=0), "micro_batch_size"),
        (dict(compute_dtype="fp16"), "compute_dtype"),
        (dict(device="tpu"), "device"),
        (dict(n_slots=1), "n_slots"),
    ],
)
def test_trainer_rejects_bad_arguments(kwargs, message):
    with pytest.raises(HorizonError, match=message):
        horizon.Trainer.from_config(_tiny(), **({"device": "cpu"} | kwargs))


def test_train_step_rejects_bad_batches():
    t = horizon.Trainer.from_config(_tiny(), device="cpu")
    with pytest.raises(HorizonError, match="input_ids"):
        t.train_step(torch.zeros(SEQ, dtype=torch.long))
    with pytest.raises(HorizonError, match="vocabulary"):
        t.train_step(torch.full((2, SEQ), VOCAB))
    with pytest.raises(HorizonError, match="labels"):
        t.train_step(torch.zeros(2, SEQ, dtype=torch.long), torch.full((2, SEQ), 1000))
    with pytest.raises(HorizonError, match="no label tokens"):
        t.train_step(torch.zeros(2, SEQ, dtype=torch.long), torch.full((2, SEQ), -100))
    with pytest.raises(HorizonError, match="input_ids"):
        t.train_step(torch.zeros(2, SEQ))
    # A rejected batch leaves the trainer usable.
    assert math.isfinite(t.train_step(torch.zeros(2, SEQ, dtype=torch.long)))
    assert t.step == 1


def _bf16_against_fp32_reference(tmp_path, kind, device):
    """bf16 compute (fp32 master) against the fp32 HF + AdamW run. bf16 tolerance: losses
    within 5e-3 relative; each tensor's total update within 0.3 relative of the reference's
    (AdamW turns bf16 rounding of near-zero gradients into sign flips of full-size steps; on
    the CPU bf16 path the worst tensor, the embedding, lands near 0.1)."""
    path = _save_hf(_config(kind), tmp_path / "model")
    batches = _batches(8, 4)
    ref_losses, _, ref_model = _reference_run(path, batches, grad_clip=None, **HP)
    trainer = horizon.Trainer.from_pretrained(path, device=device, compute_dtype="bf16", micro_batch_size=2, **HP)
    assert trainer.compute_dtype == torch.bfloat16
    losses = [trainer.train_step(ids, labels) for ids, labels in batches]
    for a, b in zip(losses, ref_losses):
        assert abs(a - b) <= 5e-3 * abs(b)
    out = tmp_path / "trained"
    trainer.save_pretrained(out)
    got = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).state_dict()
    init = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).state_dict()
    for name, ref in ref_model.state_dict().items():
        assert _rel(got[name] - init[name], ref - init[name]) <= 0.3, name
    # The bf16 copy that streams is the rounded fp32 master (written in the AdamW pass).
    for layer in trainer.model.layers:
        assert torch.equal(layer.slab.weights_bf16, layer.slab.master.to(torch.bfloat16))


@needs_hf
def test_cpu_bf16_compute_against_reference(tmp_path):
    _bf16_against_fp32_reference(tmp_path, "qwen3", "cpu")


@pytest.mark.gpu
@needs_hf
@pytest.mark.parametrize("kind", ["llama", "qwen3"])
def test_cuda_bf16_equivalence(tmp_path, kind):
    _bf16_against_fp32_reference(tmp_path, kind, "cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("grad_clip", [None, 0.05])
def test_cuda_bf16_matches_cpu_fp32_engine(grad_clip):
    """Without transformers: CUDA bf16 against the CPU fp32 engine (which the tests above hold
    equal to HF), same tolerances as the bf16 equivalence."""
    cfg = _tiny(layers=3)
    gen = torch.Generator().manual_seed(5)
    batches = [torch.randint(0, VOCAB, (4, SEQ), generator=gen) for _ in range(8)]
    runs = {}
    for device in ("cpu", "cuda"):
        t = horizon.Trainer.from_config(cfg, seed=1, device=device, micro_batch_size=2, grad_clip=grad_clip, **HP)
        losses = [t.train_step(ids) for ids in batches]
        t.synchronize()
        runs[device] = (losses, {k: v.clone() for k, v in t.model.hf_views().items()}, t)
    init = horizon.Trainer.from_config(cfg, seed=1, device="cpu").model.hf_views()
    assert runs["cuda"][2].compute_dtype == torch.bfloat16
    for a, b in zip(runs["cuda"][0], runs["cpu"][0]):
        assert abs(a - b) <= 5e-3 * abs(b)
    for name, ref in runs["cpu"][1].items():
        assert _rel(runs["cuda"][1][name] - init[name], ref - init[name]) <= 0.3, name


@pytest.mark.gpu
def test_cuda_stream_accounting_and_depth():
    peaks = {}
    for layers in (4, 16):
        trainer = horizon.Trainer.from_config(_tiny(layers=layers), device="cuda", micro_batch_size=2,
                                              offload_checkpoints=True)
        sizes = {layer.key: layer.numel * 2 for layer in trainer.model.layers}
        for _ in range(2):
            trainer.train_step(torch.randint(0, VOCAB, (4, SEQ)))
        blocks = sum(v for k, v in sizes.items() if k.startswith("layers."))
        assert trainer.stats["weight_bytes_h2d"] == 2 * (2 * blocks + sizes["embed"] + sizes["head"])
        peaks[layers] = trainer.stats["peak_device_bytes"]
    assert abs(peaks[16] - peaks[4]) <= 0.05 * peaks[4], peaks


class _NanGrad(torch.autograd.Function):
    """Identity forward; a NaN gradient for its input (a parameter view) in the backward."""

    @staticmethod
    def forward(ctx, w):
        return w.view_as(w)

    @staticmethod
    def backward(ctx, g):
        return torch.full_like(g, float("nan"))


def _poison_block_grads(trainer, monkeypatch):
    # Every decoder block shares one template: make each block's norm-weight gradient NaN
    # while the loss and the gradients passed down stay finite.
    template = trainer.model.layers[1].defn.template
    forward = template.forward

    def poisoned(params, x, cos, sin, router_stats=None):
        if torch.is_grad_enabled():
            params = dict(params)
            params["post_attention_layernorm.weight"] = _NanGrad.apply(params["post_attention_layernorm.weight"])
        return forward(params, x, cos, sin, router_stats)

    monkeypatch.setattr(template, "forward", poisoned)


def test_non_finite_layer_gradients_skip_the_whole_step(monkeypatch):
    # Without clipping too: a NaN in two blocks' gradients (the loss and the head's and the
    # embedding's gradients finite) skips the step as a whole, never some layers updated and
    # others not (issue 15, point 1); the next clean step trains every layer.
    trainer = horizon.Trainer.from_config(_tiny(layers=2), device="cpu", lr=1e-2)
    before = {k: v.clone() for k, v in trainer.state_tensors().items()}
    ids = torch.randint(0, VOCAB, (2, SEQ))
    with monkeypatch.context() as m:
        _poison_block_grads(trainer, m)
        loss = trainer.train_step(ids)
    assert math.isfinite(loss) and trainer.last_step_skipped and trainer.step == 0
    assert trainer.stats["skipped_steps"] == 1 and trainer.stats["skipped_layer_updates"] == 4
    after = trainer.state_tensors()
    for k, v in after.items():
        assert torch.equal(v, before[k]), k
    trainer.train_step(ids)
    assert not trainer.last_step_skipped and trainer.step == 1
    after = trainer.state_tensors()
    for key in ("embed", "layers.0", "layers.1", "head"):
        assert not torch.equal(after[f"{key}.master"], before[f"{key}.master"]), key


def test_non_finite_norm_with_clipping_skips_the_step(monkeypatch):
    trainer = horizon.Trainer.from_config(_tiny(layers=2), device="cpu", lr=1e-2, grad_clip=1.0)
    before = {k: v.clone() for k, v in trainer.state_tensors().items()}
    _poison_block_grads(trainer, monkeypatch)
    trainer.train_step(torch.randint(0, VOCAB, (2, SEQ)))
    assert trainer.last_step_skipped and trainer.step == 0 and trainer.stats["skipped_steps"] == 1
    assert math.isnan(trainer.last_grad_norm)
    for k, v in trainer.state_tensors().items():
        assert torch.equal(v, before[k]), k
