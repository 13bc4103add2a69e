"""The layer-major engine against HF transformers + torch.optim.AdamW (step-for-step
equivalence), and its streaming / memory invariants (docs/engine.md).

Only the equivalence tests need transformers (the GPU image may lack it); the others build
their configs as plain dicts."""

import math
import weakref

import pytest
import torch

import horizon
from horizon import HorizonError, _native

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
    base.update(extra)
    extra = {}
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
    "kind, tie, grad_clip, rows, micro_batch_size, vocab",
    [
        ("llama", False, None, 4, None, VOCAB),
        ("llama", False, 0.05, 4, 2, VOCAB),
        ("qwen3", True, None, 3, 2, VOCAB),
        ("qwen3", False, 0.05, 4, 1, VOCAB),
        ("mixtral", False, None, 4, 2, VOCAB),
        ("qwen3_moe", True, 0.05, 4, 2, VOCAB),
        # The embedding and the head larger than a block, as in real models (a 128 K vocabulary
        # against a 4096-wide block): the gradient buffers are sized by the larger.
        ("llama", False, 0.05, 4, 2, 1024),
        ("qwen3", True, None, 3, 2, 1024),
    ],
)
def test_equivalence_with_hf_and_torch_adamw(tmp_path, kind, tie, grad_clip, rows, micro_batch_size, vocab):
    path = _save_hf(_config(kind, tie_word_embeddings=tie, vocab_size=vocab), tmp_path / "model")
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


@pytest.mark.parametrize("grad_clip", [None, 1.0])
def test_no_device_gradient_is_held_after_its_copy(monkeypatch, grad_clip):
    """Device memory must not grow by a gradient per layer: once a layer's landing copy has
    completed, nothing references that layer's device gradient any more, checked at every
    later landing of the step and after it, while the AdamW jobs may still be queued."""
    trainer = horizon.Trainer.from_config(_tiny(layers=4), device="cpu", micro_batch_size=2, grad_clip=grad_clip)
    landing = trainer.engine.landing
    landed = []  # (layer key, weak reference to its device gradient, its copy's marker)

    def spying(original):
        def spy(key, flat_grad, slab, *args, **kwargs):
            copied = [(k, ref) for k, ref, marker in landed if marker.done]
            original(key, flat_grad, slab, *args, **kwargs)
            landed.append((key, weakref.ref(flat_grad), landing.last_copy))
            for k, ref in copied:
                assert ref() is None, f"{k}: device gradient still referenced after its copy completed"
        return spy

    monkeypatch.setattr(landing, "land_and_update", spying(landing.land_and_update))
    monkeypatch.setattr(landing, "land_to_buffer", spying(landing.land_to_buffer))
    ids = torch.randint(0, VOCAB, (4, SEQ))
    for step in range(2):
        landed.clear()
        trainer.train_step(ids)
        assert len(landed) == len(trainer.model.layers)
        landing.last_copy.wait()  # the copies only: the updates may still be running
        landing.release_copied()
        assert landing.held_gradients() == []
        assert [k for k, ref, _ in landed if ref() is not None] == [], step
    trainer.synchronize()


class _FakeEvent:
    made = []

    def __init__(self, enable_timing=False, blocking=False, interprocess=False):
        self.blocking, self.cuda_event, self.recorded = blocking, 1000 + len(_FakeEvent.made), False
        _FakeEvent.made.append(self)

    def record(self, stream=None):
        self.recorded = True

    def query(self):
        return False  # a copy still in flight


class _FakeStream:
    def __init__(self, *a, **k):
        self.waits = []

    def wait_event(self, ev):
        self.waits.append(ev)


class _OnCuda(torch.Tensor):
    """A CPU tensor that says it lives on cuda:0 (for the landing's CUDA branch)."""

    @property
    def device(self):
        return torch.device("cuda", 0)

    def record_stream(self, stream):
        self.recorded_on = stream


class _RecordingPipeline:
    """Stands in for the Rust pipeline: records the jobs instead of running them."""

    def __init__(self):
        self.jobs = []
        self.skipped_updates = 0

    def adam(self, *args, **kwargs):
        self.jobs.append(("adam", kwargs))
        return _native.Pipeline().marker("d2h")

    def marker(self, lane, cuda_event=None):
        self.jobs.append(("marker", dict(cuda_event=cuda_event)))
        return _native.Pipeline().marker(lane)


def test_cuda_landing_keeps_no_device_gradient_and_hands_workers_blocking_events(monkeypatch):
    """The landing's CUDA branch with torch.cuda's stream and event objects stood in for: the
    device gradient is not referenced once land_* returns (its copy still in flight:
    record_stream guards the memory), and every event a Rust worker thread will wait on is
    created with blocking synchronisation (so that thread sleeps instead of spinning)."""
    from horizon.engine.pipeline import GradientLanding

    _FakeEvent.made.clear()
    compute = _FakeStream()
    monkeypatch.setattr(torch.cuda, "Event", _FakeEvent)
    monkeypatch.setattr(torch.cuda, "Stream", _FakeStream)
    monkeypatch.setattr(torch.cuda, "stream", lambda s: __import__("contextlib").nullcontext())
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: compute)
    pipe = _RecordingPipeline()
    landing = GradientLanding(2, 64, "cuda:0", pipeline=pipe)

    class Slab:
        numel = 64
        master, exp_avg, exp_avg_sq, grad = (torch.zeros(64) for _ in range(4))
        weights_bf16 = torch.zeros(64, dtype=torch.bfloat16)

    refs = []
    for land in (lambda g: landing.land_and_update("a", g, Slab, step=1, hyper=_native.AdamW(1e-3, 0.9, 0.99, 1e-8, 0.0),
                                                   write_bf16=True),
                 lambda g: landing.land_to_buffer("b", g, Slab)):
        g = torch.randn(64).as_subclass(_OnCuda)
        land(g)
        assert g.recorded_on is landing._stream
        refs.append(weakref.ref(g))
        del g
    assert [r() for r in refs] == [None, None]
    assert landing.held_gradients() == []
    waited = {job[1]["cuda_event"][0] for job in pipe.jobs}

    def events_by_handle():
        return {e.cuda_event: e for e in _FakeEvent.made}

    assert len(waited) == 2 and all(events_by_handle()[h].blocking and events_by_handle()[h].recorded for h in waited)
    # Writing again into a buffer that was landed from waits for that copy on the device
    # (the compute stream waits for its event), not on the host.
    buf = torch.zeros(128).as_subclass(_OnCuda)
    landing.before_reuse(buf)
    assert compute.waits == []  # nothing copied from it yet
    landing.land_and_update("c", buf[:64], Slab, step=1, hyper=_native.AdamW(1e-3, 0.9, 0.99, 1e-8, 0.0),
                            write_bf16=True)
    landing.before_reuse(buf)
    assert compute.waits == [events_by_handle()[pipe.jobs[-1][1]["cuda_event"][0]]]


def test_tied_head_streams_the_embedding_again(tmp_path):
    cfg = _tiny()
    cfg["tie_word_embeddings"] = True
    trainer = horizon.Trainer.from_config(cfg, device="cpu", micro_batch_size=2)
    sizes, blocks = _layer_bytes(trainer)
    trainer.train_step(torch.randint(0, VOCAB, (4, SEQ)))
    assert trainer.stats["weight_bytes_h2d"] == 2 * blocks + 2 * sizes["embed"] + sizes["head"]
    assert trainer.stats["grad_bytes_d2h"] == sum(sizes.values())


def test_peak_device_bytes_do_not_grow_with_depth():
    # Every block recomputed (no activation budget); with one: tests/test_activation_budget.py.
    peaks = {}
    for layers in (4, 16):
        trainer = horizon.Trainer.from_config(_tiny(layers=layers), device="cpu", micro_batch_size=2,
                                              activation_memory=0)
        for _ in range(2):
            trainer.train_step(torch.randint(0, VOCAB, (4, SEQ)))
        peaks[layers] = trainer.stats["peak_device_bytes"]
        # The accounting is real: at least the two alternating gradient buffers of a block and its
        # activations (the CPU device has no weight slots: blocks compute on their host weights).
        block = trainer.model.layers[1].numel * 4
        assert peaks[layers] > 2 * block
    assert abs(peaks[16] - peaks[4]) <= 0.05 * peaks[4], peaks


@pytest.mark.parametrize("activation_memory", [0, "auto"])
def test_an_error_inside_a_step_is_raised_as_is_and_leaves_the_engine_as_before(monkeypatch, activation_memory):
    """A block that raises in the middle of a step (0: in the backward's recompute, every
    block's checkpoint alive; auto: in the forward, earlier blocks' kept activations alive):
    the caller gets that error, nothing was updated, every holding of the step is given back,
    and the next steps train as if the failed one had never been tried."""
    cfg = _tiny(layers=3)
    gen = torch.Generator().manual_seed(3)
    batches = [torch.randint(0, VOCAB, (4, SEQ), generator=gen) for _ in range(2)]
    ref = horizon.Trainer.from_config(cfg, seed=1, device="cpu", micro_batch_size=2,
                                      activation_memory=activation_memory, **HP)
    want = [ref.train_step(b) for b in batches]
    t = horizon.Trainer.from_config(cfg, seed=1, device="cpu", micro_batch_size=2,
                                    activation_memory=activation_memory, **HP)
    assert t.train_step(batches[0]) == want[0]
    e = t.engine
    held = (e.host_ledger.current, e.device_ledger.current)
    h0 = dict(e.host_ledger._held)
    before = {k: v.clone() for k, v in t.state_tensors().items()}
    template = t.model.layers[3].defn.template
    forward = type(template).forward

    def broken(*args, **kwargs):
        if torch.is_grad_enabled():
            raise RuntimeError("boom in the last block")
        return forward(template, *args, **kwargs)

    monkeypatch.setattr(template, "forward", broken, raising=False)
    with pytest.raises(RuntimeError, match="boom in the last block"):
        t.train_step(batches[1])
    monkeypatch.delattr(template, "forward")
    assert t.step == 1 and (e.host_ledger.current, e.device_ledger.current) == held, {k: v for k, v in e.host_ledger._held.items() if h0.get(k) != v}
    for k, v in t.state_tensors().items():
        assert torch.equal(v, before[k]), k
    assert t.train_step(batches[1]) == want[1]


_LEDGER_CHILD = """
import json, torch
torch.set_num_threads(1)
import horizon


def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024


cfg = dict(architectures=["LlamaForCausalLM"], model_type="llama", hidden_size=512, intermediate_size=1536,
           num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=8, vocab_size=4096,
           max_position_embeddings=128, rms_norm_eps=1e-5, tie_word_embeddings=False)
# A first small model and step, so what the process sets up once (torch's and the native
# pools' threads, lazy imports, allocator arenas) is in the baseline, not in the measurement.
w = horizon.Trainer.from_config(dict(cfg, hidden_size=64, intermediate_size=96, num_hidden_layers=1, vocab_size=256),
                                seed=0, device="cpu", micro_batch_size=2, activation_memory=0)
w.train_step(torch.randint(0, 256, (2, 16)))
del w
base = status("VmRSS")
t = horizon.Trainer.from_config(cfg, seed=0, device="cpu", lr=1e-4, micro_batch_size=2, activation_memory=0)
e = t.engine
built = dict(rss=status("VmRSS"), host=e.host_ledger.current, device=e.device_ledger.current)
t.train_step(torch.randint(0, 4096, (4, 64), generator=torch.Generator().manual_seed(0)))
t.synchronize()
print(json.dumps(dict(base=base, built=built, rss=status("VmRSS"), hwm=status("VmHWM"),
                      host=e.host_ledger.current, device=e.device_ledger.current, host_peak=e.host_ledger.peak,
                      device_peak=e.peak_device_bytes())))
"""


def test_the_cpu_ledgers_match_the_process_memory():
    """The host and CPU-device ledgers against what the kernel says the process holds (VmRSS,
    VmHWM of a fresh process after a warm-up; 31 M parameters, 620 MiB of host state). Built:
    the host ledger's holdings (slabs, landing slots) are resident, and the process holds
    little beyond them (measured 16-22 MiB over; the device ledger's gradient buffers, 34 MiB,
    are allocated but not yet touched): a ledger that counted memory nobody allocated, or missed
    a slab part or the slots, fails. After a step everything held is resident, and the peak is
    within the ledgers' peaks (the CPU device's counting autograd's per-tensor weight gradients
    of the block in its backward) and 64 MiB (measured 30-35 MiB over)."""
    import json
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-c", _LEDGER_CHILD], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    d = json.loads(r.stdout.strip().splitlines()[-1])
    mib = 1 << 20
    b = d["built"]
    assert b["host"] >= 18 * 31_000_000  # the state is what is measured, not noise
    assert b["host"] <= b["rss"] - d["base"] <= b["host"] + b["device"] + 32 * mib, (b, d["base"])
    assert d["host"] + d["device"] <= d["rss"] - d["base"], d
    assert d["hwm"] - d["base"] <= d["host_peak"] + d["device_peak"] + 64 * mib, d


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


def test_a_clip_threshold_above_the_norm_changes_nothing():
    # The clip scale is min(1, clip / norm): a threshold the norm stays under leaves every update
    # exactly as without clipping (a scale without the min would blow small gradients up to it).
    ids = [torch.randint(0, VOCAB, (2, SEQ), generator=torch.Generator().manual_seed(s)) for s in range(3)]
    runs = {}
    for clip in (None, 1e6):
        trainer = horizon.Trainer.from_config(_tiny(), device="cpu", lr=1e-2, grad_clip=clip)
        losses = [trainer.train_step(x) for x in ids]
        trainer.synchronize()
        runs[clip] = (losses, {k: v.clone() for k, v in trainer.state_tensors().items()}, trainer.last_grad_norm)
    assert runs[1e6][2] < 1e6
    assert runs[1e6][0] == runs[None][0]
    for k, v in runs[None][1].items():
        assert torch.equal(runs[1e6][1][k], v), k


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


@pytest.mark.parametrize("grad_clip", [None, 1.0])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_loss_with_finite_gradients_changes_nothing(monkeypatch, grad_clip, bad):
    """The loss is read once, at the end of the step; without clipping the layers' AdamW jobs
    run before that, and a gate voids them: here the loss alone is NaN (a constant added
    to it), every gradient finite, so only the gate can keep the state unchanged."""
    trainer = horizon.Trainer.from_config(_tiny(), device="cpu", lr=1e-2, grad_clip=grad_clip)
    ids = torch.randint(0, VOCAB, (2, SEQ))
    trainer.train_step(ids)
    state = {k: v.clone() for k, v in trainer.state_tensors().items()}
    head = trainer.model.layers[-1].defn.template
    loss_sum = head.loss_sum
    monkeypatch.setattr(head, "loss_sum", lambda *a, **k: loss_sum(*a, **k) + bad)
    assert not math.isfinite(trainer.train_step(ids))  # NaN, +Inf and -Inf alike
    assert trainer.last_step_skipped and trainer.step == 1 and math.isfinite(trainer.last_grad_norm)
    for k, v in trainer.state_tensors().items():
        assert torch.equal(v, state[k]), k
    assert trainer.stats["skipped_layer_updates"] == 0  # voided, not skipped for their gradients
    monkeypatch.setattr(head, "loss_sum", loss_sum)
    assert math.isfinite(trainer.train_step(ids)) and trainer.step == 2
    assert not torch.equal(trainer.state_tensors()["layers.0.master"], state["layers.0.master"])


@pytest.mark.parametrize("grad_clip, track", [(None, True), (None, False), (0.5, True)])
def test_one_host_read_per_step_and_persistent_buffers(monkeypatch, grad_clip, track):
    """The step reads the device once (loss and norm together), accumulates every layer's
    gradient in the same three persistent buffers, and computes the RoPE tables and the
    checkpoint store once."""
    trainer = horizon.Trainer.from_config(_tiny(layers=3), device="cpu", micro_batch_size=2, grad_clip=grad_clip,
                                          track_grad_norm=track)
    engine = trainer.engine
    storages = set()
    for name in ("land_and_update", "land_to_buffer"):
        original = getattr(engine.landing, name)

        def spy(key, flat_grad, *a, _original=original, **k):
            storages.add(flat_grad.untyped_storage().data_ptr())
            return _original(key, flat_grad, *a, **k)

        monkeypatch.setattr(engine.landing, name, spy)
    made = []
    rope = engine.rotary.cos_sin
    monkeypatch.setattr(engine.rotary, "cos_sin", lambda *a, **k: made.append(1) or rope(*a, **k))
    for _ in range(4):
        trainer.train_step(torch.randint(0, VOCAB, (4, SEQ)))
        assert (trainer.last_grad_norm is not None) == (track or grad_clip is not None)
    assert trainer.stats["host_syncs"] == 4
    assert storages == {b.untyped_storage().data_ptr() for b in engine._grad_bufs.values()}
    assert len(made) == 1 and len(engine._ckpt_stores) == 1


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


def _assert_bf16_updates_close(got: dict, ref: dict, init: dict) -> None:
    """Each tensor's total update under bf16 compute against the fp32 reference's. bf16 rounding
    of near-zero gradients flips the sign of some full-size AdamW steps, so elementwise the
    updates differ by a noise of ~5-12% relative (the CPU bf16 path, 8 steps of a 2-layer Qwen3:
    0.048-0.118 per tensor, the embedding worst; 0.074 over all). That noise has no direction
    and no scale: per tensor the update's norm is the reference's within 1.3% and its cosine
    with it >= 0.993. The bounds below hold those with room and catch a scale error of 5%
    or a 20% error of any direction that the elementwise figure alone would let through."""
    gs, rs = [], []
    for name, r in ref.items():
        g, r = (got[name] - init[name]).double().flatten(), (r - init[name]).double().flatten()
        ratio = float(g.norm() / r.norm())
        cos = float(g @ r / (g.norm() * r.norm()))
        assert 0.95 <= ratio <= 1.05 and cos >= 0.97 and _rel(g, r) <= 0.2, (name, ratio, cos, _rel(g, r))
        gs.append(g)
        rs.append(r)
    assert _rel(torch.cat(gs), torch.cat(rs)) <= 0.12


def _bf16_against_fp32_reference(tmp_path, kind, device):
    """bf16 compute (fp32 master) against the fp32 HF + AdamW run. bf16 tolerance: losses
    within 5e-3 relative; each tensor's total update as `_assert_bf16_updates_close` states."""
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
    _assert_bf16_updates_close(got, ref_model.state_dict(), init)
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
    _assert_bf16_updates_close(runs["cuda"][1], runs["cpu"][1], init)


@pytest.mark.gpu
def test_cuda_stream_accounting_and_depth():
    import gc

    peaks = {}
    trainer = None
    for layers in (4, 16):
        # The previous trainer is freed before the next one exists, so nothing of it is alive
        # when the next one's baseline is read (the engine also excludes whatever is).
        del trainer
        gc.collect()
        torch.cuda.empty_cache()
        trainer = horizon.Trainer.from_config(_tiny(layers=layers), device="cuda", micro_batch_size=2,
                                              offload_checkpoints=True)
        sizes = {layer.key: layer.numel * 2 for layer in trainer.model.layers}
        for _ in range(2):
            trainer.train_step(torch.randint(0, VOCAB, (4, SEQ)))
        blocks = sum(v for k, v in sizes.items() if k.startswith("layers."))
        assert trainer.stats["weight_bytes_h2d"] == 2 * (2 * blocks + sizes["embed"] + sizes["head"])
        peaks[layers] = trainer.stats["peak_device_bytes"]
    assert abs(peaks[16] - peaks[4]) <= 0.05 * peaks[4], peaks


def test_cuda_peak_baseline_excludes_what_is_not_the_engines(monkeypatch):
    """The CUDA peak's bookkeeping against a scripted allocator (the counters torch.cuda
    keeps): a previous trainer's memory, alive when this engine is built and freed before or
    during its step, must neither hide this step's memory nor count as this engine's."""
    trainer = horizon.Trainer.from_config(_tiny(), device="cpu")
    engine = trainer.engine
    own = engine.device_ledger.current
    assert own > 0
    alloc = {"now": 0, "peak": 0}

    def allocate(n):
        alloc["now"] += n
        alloc["peak"] = max(alloc["peak"], alloc["now"])

    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: alloc["now"])
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: alloc["peak"])
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda device=None: alloc.update(peak=alloc["now"]))
    monkeypatch.setattr(engine, "_cuda", True)
    old, step_bytes = 50 * own, 3 * own
    allocate(old + own)  # the previous trainer, then this engine's persistent buffers
    assert engine.peak_device_bytes() == own
    allocate(-old)  # the previous trainer is freed before the first step
    engine._begin_device_peak()
    allocate(step_bytes)
    allocate(-step_bytes)
    engine._end_device_peak()
    assert engine.peak_device_bytes() == own + step_bytes
    allocate(old)  # someone else's memory, alive when the next step starts and freed during it
    engine._begin_device_peak()
    allocate(step_bytes // 3)
    allocate(-old)
    allocate(step_bytes // 3)
    assert engine.peak_device_bytes() == own + step_bytes  # (mid-step: the running maximum)
    allocate(-2 * (step_bytes // 3))
    engine._end_device_peak()
    assert engine.peak_device_bytes() == own + step_bytes
    engine._begin_device_peak()
    allocate(2 * step_bytes)
    allocate(-2 * step_bytes)
    engine._end_device_peak()
    assert engine.peak_device_bytes() == own + 2 * step_bytes


@pytest.mark.gpu
@pytest.mark.parametrize("grad_clip", [None, 0.05])
def test_cuda_step_synchronises_once(grad_clip):
    """torch's own detector of synchronising CUDA calls: a step after the warm-up makes
    exactly one (the loss and norm read), as `stats['host_syncs']` counts."""
    import warnings

    trainer = horizon.Trainer.from_config(_tiny(layers=3), device="cuda", micro_batch_size=2, grad_clip=grad_clip)
    ids = torch.randint(0, VOCAB, (4, SEQ))
    trainer.train_step(ids)
    before = trainer.engine.host_syncs
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            trainer.train_step(ids)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    syncs = [str(w.message) for w in caught if "synchroniz" in str(w.message).lower()]
    assert len(syncs) == 1, syncs
    assert trainer.engine.host_syncs - before == 1


# ---------------------------------------------------------------- determinism (docs/determinism.md)


def _pairwise(vals):
    """Sum of a list of tensors as a binary tree in list order (1+2, 3+4, ..., then pairs)."""
    while len(vals) > 1:
        vals = [vals[i] + vals[i + 1] if i + 1 < len(vals) else vals[i] for i in range(0, len(vals), 2)]
    return vals[0]


def test_sorted_segment_sum_is_a_fixed_pairwise_tree_per_row():
    from horizon.models.blocks import sorted_segment_sum_

    g = torch.Generator().manual_seed(0)
    V, H, n = 40, 5, 333
    rows = torch.randint(0, V, (n,), generator=g)
    rows[:37] = 7  # one row with many tokens (an odd count: uneven tree)
    rows[-1] = V - 1  # one with one token
    vals = torch.randn(n, H, generator=g)
    acc = torch.randn(V, H, generator=g)
    got = sorted_segment_sum_(acc.clone(), rows, vals)
    want = acc.clone()
    for r in rows.unique().tolist():
        want[r] = acc[r] + _pairwise([vals[i] for i in range(n) if rows[i] == r])
    assert torch.equal(got, want)  # bit for bit: the summation order is the documented one
    ref = acc.double().index_add_(0, rows, vals.double())
    assert _rel(got.double(), ref) < 1e-6
    assert torch.equal(sorted_segment_sum_(acc.clone(), rows[:0], vals[:0]), acc)


def test_embedding_gradient_on_cuda_is_the_segment_sum():
    from horizon.models.blocks import EmbeddingTemplate, sorted_segment_sum_

    class OnCuda(torch.Tensor):
        @property
        def is_cuda(self):
            return True

    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 9, (3, 11), generator=g)
    gy = torch.randn(3, 11, 4, generator=g).bfloat16()
    acc = torch.zeros(9, 4)
    EmbeddingTemplate.weight_grad_(acc.as_subclass(OnCuda), ids, gy)
    want = sorted_segment_sum_(torch.zeros(9, 4), ids.reshape(-1), gy.reshape(-1, 4).float())
    assert torch.equal(acc, want)
    cpu = EmbeddingTemplate.weight_grad_(torch.zeros(9, 4), ids, gy)  # the CPU keeps index_add_
    assert _rel(cpu, want) < 1e-6


def _math_attention(q, k, v):
    g = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
    return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)


@pytest.mark.parametrize("heads, kv_heads, native_gqa", [(4, 4, True), (4, 2, True), (6, 2, False)])
def test_attention_backward_runs_in_deterministic_mode_only(monkeypatch, heads, kv_heads, native_gqa):
    """The CUDA flash path's wiring, with the aten flash ops stood in for by a CPU version:
    the backward op runs with torch's deterministic mode on and only then; grouped queries
    go to the op as they are, or (a torch whose op refuses them) expanded and summed back."""
    from horizon.kernels import attention

    seen = {"bwd_det": [], "fwd_heads": []}

    def fwd(q, k, v, dropout, causal, debug):
        seen["fwd_heads"].append(k.shape[1])
        if k.shape[1] != q.shape[1] and not native_gqa:
            raise RuntimeError("number of heads in key/value must equal the query's")
        out = _math_attention(q, k, v)
        z = torch.zeros(())
        return out, z, z, z, q.shape[2], k.shape[2], z, z, z

    def bwd(dout, q, k, v, out, lse, cq, ck, mq, mk, dropout, causal, seed, offset):
        seen["bwd_det"].append(torch.are_deterministic_algorithms_enabled())
        qq, kk, vv = (t.detach().requires_grad_() for t in (q, k, v))
        with torch.enable_grad():
            return torch.autograd.grad(_math_attention(qq, kk, vv), (qq, kk, vv), dout)

    monkeypatch.setattr(attention, "_flash_fwd", fwd)
    monkeypatch.setattr(attention, "_flash_bwd", bwd)
    monkeypatch.setattr(attention, "flash_supported", lambda q, k: True)

    class OnCuda(torch.Tensor):
        @property
        def is_cuda(self):
            return True

    g = torch.Generator().manual_seed(heads + kv_heads)
    q, k, v = (torch.randn(2, h, 9, 16, generator=g) for h in (heads, kv_heads, kv_heads))
    qs, ks, vs = (t.clone().as_subclass(OnCuda).requires_grad_() for t in (q, k, v))
    out = attention.causal_attention(qs, ks, vs)
    dout = torch.randn(out.shape, generator=g)
    got = torch.autograd.grad(out, (qs, ks, vs), dout)
    assert seen["bwd_det"] == [True] and not torch.are_deterministic_algorithms_enabled()
    assert seen["fwd_heads"] == ([kv_heads] if native_gqa or heads == kv_heads else [kv_heads, heads])
    qr, kr, vr = (t.clone().requires_grad_() for t in (q, k, v))
    ref = torch.nn.functional.scaled_dot_product_attention(qr, kr, vr, is_causal=True, enable_gqa=heads != kv_heads)
    want = torch.autograd.grad(ref, (qr, kr, vr), dout)
    assert _rel(out.detach(), ref.detach()) < 1e-5
    for a, b in zip(got, want):
        assert a.shape == b.shape and _rel(a, b) < 1e-5


@pytest.mark.gpu
def test_cuda_attention_backward_is_bitwise_repeatable():
    from horizon.kernels.attention import causal_attention

    g = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(2, 8, 1024, 128, device="cuda", generator=g).bfloat16()
    k, v = (torch.randn(2, 2, 1024, 128, device="cuda", generator=g).bfloat16() for _ in range(2))
    dout = torch.randn(2, 8, 1024, 128, device="cuda", generator=g).bfloat16()
    runs = []
    for _ in range(3):
        qs, ks, vs = (t.clone().requires_grad_() for t in (q, k, v))
        runs.append(torch.autograd.grad(causal_attention(qs, ks, vs), (qs, ks, vs), dout))
    for other in runs[1:]:
        for a, b in zip(runs[0], other):
            assert torch.equal(a, b)
    qf, kf, vf = (t.float().requires_grad_() for t in (q, k, v))
    ref = torch.autograd.grad(_math_attention(qf, kf, vf), (qf, kf, vf), dout.float())
    for a, b in zip(runs[0], ref):
        assert _rel(a.float(), b) < 2e-2


def _tiny_moe():
    cfg = _tiny(layers=2)
    cfg.update(architectures=["Qwen3MoeForCausalLM"], model_type="qwen3_moe", head_dim=16, num_experts=4,
               num_experts_per_tok=2, moe_intermediate_size=32, mlp_only_layers=[1], norm_topk_prob=True,
               decoder_sparse_step=1, intermediate_size=48)
    return cfg


@pytest.mark.gpu
@pytest.mark.parametrize("cfg", [_tiny(layers=3), _tiny_moe()], ids=["llama", "qwen3_moe"])
def test_cuda_training_and_resume_are_bit_identical(cfg):
    """Two CUDA runs from the same seed, and a run resumed from its state tensors, end in
    the same bits (docs/determinism.md)."""
    gen = torch.Generator().manual_seed(9)
    batches = [torch.randint(0, VOCAB, (4, SEQ), generator=gen) for _ in range(4)]

    def run(steps, start=None):
        t = horizon.Trainer.from_config(cfg, seed=2, device="cuda", micro_batch_size=2, **HP)
        if start is not None:
            t.load_state_tensors({k: v.clone() for k, v in start[0].items()})
            t.step = start[1]
        losses = [t.train_step(ids) for ids in steps]
        return losses, {k: v.clone() for k, v in t.state_tensors().items()}, t.step

    full = run(batches)
    again = run(batches)
    half = run(batches[:2])
    resumed = run(batches[2:], start=(half[1], half[2]))
    assert full[0] == again[0] and full[0][2:] == resumed[0]
    for k, v in full[1].items():
        assert torch.equal(v, again[1][k]), k
        assert torch.equal(v, resumed[1][k]), k


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
