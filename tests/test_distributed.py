"""Data parallelism (docs/distributed.md) on this machine's CPUs with Gloo: 2 ranks against
the single-process engine (which tests/test_engine.py holds equal to HF transformers +
torch.optim.AdamW) with the same global batches and seed.

The ranks are subprocesses running this file as a script (`python test_distributed.py
worker ...`) with torchrun's environment variables; they talk over 127.0.0.1 only."""

import json
import math
import os
import socket
import subprocess
import sys

import pytest
import torch

import horizon
from horizon import HorizonError
from horizon import distributed as hdist

VOCAB = 64
SEQ = 12
STEPS = 5
RESUME_AT = 3  # the 2-rank run's checkpoint, resumed on 1 rank for the remaining steps
HP = dict(lr=3e-3, betas=(0.9, 0.95), eps=1e-6, weight_decay=0.1)  # eps: see test_engine.HP

# name -> trainer kwargs and batch shape. "split": 4 micro-batches, 2 per rank; "clip_tied":
# 3 micro-batches shared 1 / 2, tied embeddings, clipping that clips, and one compute copy per
# rank refreshed by all-gathers (shared=False) instead of the node-shared copy; "idle_rank": a
# single micro-batch, so rank 1 has no rows at all (it still joins every collective), bf16.
CASES = {
    "split": dict(tie=False, rows=4, micro_batch_size=1, grad_clip=None, compute_dtype="float32", shared=True),
    "clip_tied": dict(tie=True, rows=3, micro_batch_size=1, grad_clip=0.05, compute_dtype="float32", shared=False),
    "idle_rank": dict(tie=False, rows=2, micro_batch_size=None, grad_clip=None, compute_dtype="bfloat16",
                      shared=True),
    # Step 2's block gradients hold NaN in input_layernorm.weight (offset 0: inside rank 0's
    # shard only); a single process skips that step whole (every layer), so must both ranks.
    "nan_grad": dict(tie=False, rows=4, micro_batch_size=2, grad_clip=None, compute_dtype="float32", shared=True,
                     nan_step=2),
    # The same NaN from rank 1's micro-batches only (its forward alone is poisoned): the
    # all-reduce carries it into rank 0's shard, and both ranks still skip the step whole.
    "nan_one_rank": dict(tie=False, rows=4, micro_batch_size=2, grad_clip=None, compute_dtype="float32",
                         shared=True, nan_step=2, nan_rank=1),
    # Mixtral with HF's load-balancing loss: its routing statistics span both ranks' tokens.
    "moe_aux": dict(tie=False, rows=4, micro_batch_size=1, grad_clip=None, compute_dtype="float32", shared=True,
                    moe=True),
}


class _NanGrad(torch.autograd.Function):
    """Identity forward; a NaN gradient for its input (a parameter view) in the backward."""

    @staticmethod
    def forward(ctx, w):
        return w.view_as(w)

    @staticmethod
    def backward(ctx, g):
        return torch.full_like(g, float("nan"))


def _poisoned_forward(template):
    forward = type(template).forward

    def poisoned(params, x, cos, sin, router_stats=None):
        if torch.is_grad_enabled():
            params = dict(params)
            params["input_layernorm.weight"] = _NanGrad.apply(params["input_layernorm.weight"])
        return forward(template, params, x, cos, sin, router_stats)

    return poisoned


def _config(tie, moe=False):
    cfg = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 32,
        "intermediate_size": 48, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "vocab_size": VOCAB, "max_position_embeddings": 32, "rms_norm_eps": 1e-5,
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0}, "tie_word_embeddings": tie,
        "initializer_range": 0.02, "hidden_act": "silu",
    }
    if moe:
        cfg.update(architectures=["MixtralForCausalLM"], model_type="mixtral", num_local_experts=4,
                   num_experts_per_tok=2, output_router_logits=True, router_aux_loss_coef=0.05)
    return cfg


def _batches(rows, seed=7):
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(STEPS):
        ids = torch.randint(0, VOCAB, (rows, SEQ), generator=gen)
        labels = ids.clone()
        labels[:, : SEQ // 3] = -100
        out.append((ids, labels))
    return out


def _trainer(case, **extra):
    c = CASES[case]
    return horizon.Trainer.from_config(_config(c["tie"], c.get("moe", False)), seed=1, device="cpu",
                                       grad_clip=c["grad_clip"], micro_batch_size=c["micro_batch_size"],
                                       compute_dtype=c["compute_dtype"], **HP, **extra)


def _run(trainer, batches, case=None, after_step=None, rank=None):
    """rank: this process's rank under data parallelism (a case's `nan_rank` poisons that rank
    only); None for the single process, which poisons its whole step."""
    losses, norms = [], []
    nan_step = CASES[case].get("nan_step") if case else None
    poisons = rank is None or CASES[case].get("nan_rank", rank) == rank
    template = trainer.model.layers[1].defn.template
    for i, (ids, labels) in enumerate(batches):
        if i + 1 == nan_step and poisons:
            template.forward = _poisoned_forward(template)  # this instance only, this step only
        try:
            losses.append(trainer.train_step(ids, labels))
        finally:
            template.__dict__.pop("forward", None)
        norms.append(trainer.last_grad_norm)
        if after_step is not None:
            after_step(i + 1)
    return losses, norms


# ---------------------------------------------------------------------- the rank processes
def _worker(out_dir: str) -> None:
    torch.set_num_threads(1)
    rank, world = hdist.init_from_env()
    assert world == 2 and torch.distributed.get_backend() == "gloo"
    result = {}
    try:
        for case in CASES:
            os.environ["HORIZON_DP_SHARED_COPY"] = "1" if CASES[case]["shared"] else "0"
            trainer = _trainer(case)
            assert trainer.data_parallel and trainer.world_size == 2
            assert trainer.model.node_shared == CASES[case]["shared"]

            def checkpoint(step):
                if case == "split" and step == RESUME_AT:
                    tensors = trainer.state_tensors(rank0_only=True)  # collective: rank 0 receives
                    assert bool(tensors) == hdist.is_rank0()
                    if hdist.is_rank0():
                        from safetensors.torch import save_file

                        save_file(tensors, os.path.join(out_dir, "resume.safetensors"))

            losses, norms = _run(trainer, _batches(CASES[case]["rows"]), case, checkpoint, rank=rank)
            final = {k: v for k, v in trainer.state_tensors().items() if k.endswith(".master")}
            if hdist.is_rank0():
                torch.save(final, os.path.join(out_dir, f"final-{case}.pt"))
            trainer.save_pretrained(os.path.join(out_dir, f"hf-{case}"))  # collective; rank 0 writes
            result[case] = dict(losses=losses, norms=norms, state_bytes=trainer.optimizer_state_bytes,
                                skipped=trainer.stats["skipped_steps"], host_bytes=trainer.model.host_bytes,
                                skipped_layers=trainer.stats["skipped_layer_updates"])
        # 1 -> 2 ranks: the single process's step-3 state, read lazily (each rank reads its
        # shard of the file), continues steps 4-5; with the node-shared copy and without.
        from safetensors import safe_open

        for shared in (True, False):
            os.environ["HORIZON_DP_SHARED_COPY"] = "1" if shared else "0"
            resumed = _trainer("split")
            with safe_open(os.path.join(out_dir, "single.safetensors"), "pt") as f:
                resumed.load_state_tensors({k: f.get_slice(k) for k in f.keys()})
            resumed.step = RESUME_AT
            result[f"resumed_on_2_shared={shared}"] = _run(resumed, _batches(CASES["split"]["rows"])[RESUME_AT:])[0]

        # Ranks fed different batches are refused on every rank, and the engine stays usable.
        ids, labels = _batches(2)[rank]
        try:
            trainer.train_step(ids, labels)
            result["mismatch"] = "accepted"
        except HorizonError as e:
            result["mismatch"] = str(e)
        result["after_mismatch"] = trainer.train_step(*_batches(2)[0])
        result["any_rank"] = [hdist.any_rank(rank == 1), hdist.any_rank(False)]
        result["from_rank0"] = hdist.from_rank0({"rank": rank})
        hdist.barrier()
    finally:
        hdist.shutdown()
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(result, f)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory, one_rank):
    from safetensors.torch import save_file

    out = tmp_path_factory.mktemp("ranks")
    # The single process's state after step 3, for the ranks to resume on 2 (1 -> 2 ranks).
    save_file(one_rank["split"]["at_resume"], str(out / "single.safetensors"))
    env = dict(os.environ, WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()),
               OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME=os.environ.get("GLOO_SOCKET_IFNAME", "lo"))
    procs = []
    for r in range(2):
        procs.append(subprocess.Popen(
            [sys.executable, __file__, "worker", str(out)],
            env=dict(env, RANK=str(r), LOCAL_RANK=str(r)), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        ))
    logs = []
    for p in procs:
        try:
            logs.append(p.communicate(timeout=240)[0].decode(errors="replace"))
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            pytest.fail("the 2-rank run did not finish in 240 s")
    for r, p in enumerate(procs):
        assert p.returncode == 0, f"rank {r} failed:\n{logs[r][-4000:]}"
    return out, [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]


@pytest.fixture(scope="module")
def one_rank():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        runs = {}
        for case in CASES:
            t = _trainer(case)
            assert not t.data_parallel
            at_resume = {}

            def keep(step):
                if step == RESUME_AT:
                    at_resume.update({k: v.clone() for k, v in t.state_tensors().items()})

            losses, norms = _run(t, _batches(CASES[case]["rows"]), case, keep)
            masters = {k: v.clone() for k, v in t.state_tensors().items() if k.endswith(".master")}
            hf = {k: v.clone() for k, v in t.model.hf_views().items()}
            runs[case] = dict(losses=losses, norms=norms, state_bytes=t.optimizer_state_bytes, masters=masters,
                              layers=len(t.model.layers), hf=hf, skipped_layers=t.stats["skipped_layer_updates"],
                              at_resume=at_resume)
        return runs
    finally:
        torch.set_num_threads(n)


def _close(a, b, rel):
    return abs(a - b) <= rel * abs(b)


# ---------------------------------------------------------------------- the criteria
@pytest.mark.parametrize("case", list(CASES))
def test_two_ranks_train_the_single_rank_losses(two_ranks, one_rank, case):
    out, ranks = two_ranks
    ref = one_rank[case]
    # bf16 compute: rank 0 computes exactly the single process's micro-batch and rank 1 adds
    # zeros, so the same 1e-5 holds there too.
    for r in range(2):
        got = ranks[r][case]
        assert got["skipped"] == (1 if "nan_step" in CASES[case] else 0)
        for step, (a, b) in enumerate(zip(got["losses"], ref["losses"])):
            assert _close(a, b, 1e-5), f"{case} rank {r} step {step + 1}: {a} vs single rank {b}"
        for a, b in zip(got["norms"], ref["norms"]):
            assert _close(a, b, 1e-5) or (math.isnan(a) and math.isnan(b)), f"{case} rank {r} grad norm {a} vs {b}"
    if "nan_step" in CASES[case]:
        block = _trainer(case).model.layers[1]
        off, n = block.layout.span("input_layernorm.weight")
        assert off + n <= hdist.shard_range(block.numel, 0, 2)[1], "the NaN must lie in rank 0's shard only"
        n_layers = ref["layers"]
        assert ref["skipped_layers"] == n_layers and math.isnan(ref["norms"][CASES[case]["nan_step"] - 1])
        # each rank skipped the whole step: its shard of every layer
        assert [ranks[r][case]["skipped_layers"] for r in range(2)] == [n_layers, n_layers]
    if CASES[case]["grad_clip"] is not None:
        assert min(ref["norms"]) > CASES[case]["grad_clip"], "the clipping case must actually clip"
    # The final weights (gathered from both ranks' shards) are the single process's.
    final = torch.load(out / f"final-{case}.pt")
    moved = 0.0
    init = _trainer(case).state_tensors()
    for name, ref_w in ref["masters"].items():
        diff = (final[name] - ref_w).norm() / (ref_w - init[name]).norm()
        assert diff <= 1e-4, f"{case} {name}: relative to its update {float(diff)}"
        moved = max(moved, float((ref_w - init[name]).norm() / init[name].norm()))
    assert moved > 1e-2
    # save_pretrained from 2 ranks: one HF checkpoint with the single process's weights.
    from safetensors.torch import load_file

    saved = load_file(str(out / f"hf-{case}" / "model.safetensors"))
    assert set(saved) == set(ref["hf"])
    for name, w in ref["hf"].items():
        assert float((saved[name] - w).norm()) <= 1e-4 * float(w.norm()), name


@pytest.mark.parametrize("case", list(CASES))
def test_each_rank_holds_half_the_optimizer_state(two_ranks, one_rank, case):
    _, ranks = two_ranks
    single = one_rank[case]["state_bytes"]
    per_rank = [ranks[r][case]["state_bytes"] for r in range(2)]
    assert sum(per_rank) == single  # the shards tile every layer exactly
    # Shard boundaries are multiples of 16 elements: each layer's shard is at most 16
    # elements (x 3 fp32 tensors) off an exact half.
    bound = one_rank[case]["layers"] * 16 * 3 * 4
    for b in per_rank:
        assert abs(b - single / 2) < bound, (per_rank, single, bound)
    assert bound < 0.01 * single  # so "half" is what was measured


@pytest.mark.parametrize("lazy", [False, True])
def test_two_rank_checkpoint_resumes_on_one_rank(two_ranks, one_rank, lazy):
    from safetensors import safe_open
    from safetensors.torch import load_file

    out, _ = two_ranks
    path = str(out / "resume.safetensors")
    torch.set_num_threads(1)
    trainer = horizon.Trainer.from_config(_config(False), seed=99, device="cpu", grad_clip=None,
                                          micro_batch_size=1, **HP)
    if lazy:  # file slices, as a rank reads them
        with safe_open(path, "pt") as f:
            trainer.load_state_tensors({k: f.get_slice(k) for k in f.keys()})
    else:
        trainer.load_state_tensors(load_file(path))
    trainer.step = RESUME_AT
    batches = _batches(CASES["split"]["rows"])[RESUME_AT:]
    losses, _ = _run(trainer, batches)
    for step, (a, b) in enumerate(zip(losses, one_rank["split"]["losses"][RESUME_AT:])):
        assert _close(a, b, 1e-5), f"resumed step {RESUME_AT + step + 1}: {a} vs uninterrupted {b}"


def test_one_rank_checkpoint_resumes_on_two_ranks(two_ranks, one_rank):
    _, ranks = two_ranks
    ref = one_rank["split"]["losses"][RESUME_AT:]
    for r in range(2):
        for shared in (True, False):
            got = ranks[r][f"resumed_on_2_shared={shared}"]
            assert len(got) == len(ref)
            for a, b in zip(got, ref):
                assert _close(a, b, 1e-5), (r, shared, a, b)


def test_load_state_tensors_validates():
    t = _trainer("split")
    good = t.state_tensors()
    with pytest.raises(HorizonError, match="missing"):
        t.load_state_tensors({k: v for k, v in good.items() if k != "head.master"})
    with pytest.raises(HorizonError, match="head.master"):
        t.load_state_tensors(dict(good, **{"head.master": torch.zeros(3)}))
    with pytest.raises(HorizonError, match="head.master"):
        t.load_state_tensors(dict(good, **{"head.master": [0.0] * 3}))


def test_ranks_must_share_the_batch_and_agree(two_ranks):
    _, ranks = two_ranks
    for r in range(2):
        assert "different batches" in ranks[r]["mismatch"]
        assert math.isfinite(ranks[r]["after_mismatch"])
        assert ranks[r]["any_rank"] == [True, False]
        assert ranks[r]["from_rank0"] == {"rank": 0}
    assert ranks[0]["after_mismatch"] == ranks[1]["after_mismatch"]


# ---------------------------------------------------------------------- helpers, validation
def test_share_and_shard_ranges():
    assert [hdist.share(3, r, 2) for r in range(2)] == [(0, 1), (1, 3)]
    assert [hdist.share(1, r, 2) for r in range(2)] == [(0, 0), (0, 1)]
    for numel in (16, 48, 1008, 4096 + 16):
        for world in (1, 2, 3, 8):
            ranges = [hdist.shard_range(numel, r, world) for r in range(world)]
            assert ranges[0][0] == 0 and ranges[-1][1] == numel
            assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
            assert all(lo % 16 == 0 for lo, _ in ranges)
            assert max(hi - lo for lo, hi in ranges) == hdist.shard_size(numel, world) or numel < world * 16
    with pytest.raises(HorizonError, match="rank 2"):
        hdist.share(4, 2, 2)
    with pytest.raises(HorizonError, match="world"):
        hdist.shard_size(16, 0)


def test_init_from_env_validates(monkeypatch):
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    assert hdist.init_from_env() == (0, 1)  # a plain run joins nothing
    assert not hdist.is_initialized() and hdist.is_rank0() and hdist.world_size() == 1
    monkeypatch.setenv("WORLD_SIZE", "two")
    with pytest.raises(HorizonError, match="WORLD_SIZE"):
        hdist.init_from_env()
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(HorizonError, match="RANK"):
        hdist.init_from_env()
    monkeypatch.setenv("RANK", "3")
    with pytest.raises(HorizonError, match="RANK 3"):
        hdist.init_from_env()
    monkeypatch.setenv("RANK", "1")
    with pytest.raises(HorizonError, match="MASTER_ADDR"):
        hdist.init_from_env()
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "1")
    with pytest.raises(HorizonError, match="backend"):
        hdist.init_from_env(backend="mpi")
    assert not hdist.is_initialized()


def test_data_parallel_needs_a_process_group():
    with pytest.raises(HorizonError, match="process group"):
        horizon.Trainer.from_config(_config(False), device="cpu", data_parallel=True)
    with pytest.raises(HorizonError, match="data_parallel"):
        horizon.Trainer.from_config(_config(False), device="cpu", data_parallel="yes")


# ---------------------------------------------------------------------- world size 1 (NCCL when lent a GPU)
@pytest.mark.parametrize("backend, device, compute_dtype", [
    ("gloo", "cpu", "float32"),
    pytest.param("nccl", "cuda", "bfloat16", marks=pytest.mark.gpu),
])
def test_world_size_one_gives_the_single_process_result(backend, device, compute_dtype):
    """The data-parallel engine with one rank (every collective runs: on the GPU for NCCL)
    against the plain single-process engine, same batches and seed, with clipping."""
    import torch.distributed as dist

    cfg = _config(False)
    batches = _batches(4)
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1)
    try:
        runs = {}
        for dp in (False, True):
            t = horizon.Trainer.from_config(cfg, seed=1, device=device, micro_batch_size=2, grad_clip=0.05,
                                            compute_dtype=compute_dtype, data_parallel=dp, **HP)
            assert t.data_parallel == dp
            losses, norms = _run(t, batches)
            masters = {k: v.clone() for k, v in t.state_tensors().items() if k.endswith(".master")}
            runs[dp] = (losses, norms, masters, t.optimizer_state_bytes)
        assert runs[True][3] == runs[False][3]
        for a, b in zip(runs[True][0] + runs[True][1], runs[False][0] + runs[False][1]):
            assert _close(a, b, 1e-5), (a, b)
        for name, w in runs[False][2].items():
            assert float((runs[True][2][name] - w).norm()) <= 1e-5 * float(w.norm()), name
    finally:
        dist.destroy_process_group()
        torch.set_num_threads(n)


if __name__ == "__main__" and len(sys.argv) == 3 and sys.argv[1] == "worker":
    _worker(sys.argv[2])


def test_torchrun_cli_trains_like_one_process_and_writes_once(tmp_path):
    """`torchrun --nproc-per-node 2 -m horizon train` equals the single-process run step for
    step (1e-5 relative), and only rank 0 writes metrics and checkpoints."""
    import json
    import os
    import subprocess
    import sys

    args = ["train", "--preset", "tiny", "--steps", "3", "--batch-size", "4", "--seq-len", "32",
            "--device", "cpu", "--seed", "3"]
    env = dict(os.environ, OMP_NUM_THREADS="1", HORIZON_ADAM_THREADS="1")
    one = subprocess.run([sys.executable, "-m", "horizon", *args, "--out", str(tmp_path / "one")],
                         capture_output=True, text=True, env=env, timeout=300)
    assert one.returncode == 0, one.stderr
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                          "-m", "horizon", *args, "--out", str(tmp_path / "two")],
                         capture_output=True, text=True, env=env, timeout=300)
    assert two.returncode == 0, two.stderr[-3000:]

    def losses(run):
        rows = [json.loads(line) for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
        return [r["loss"] for r in rows]

    a, b = losses("one"), losses("two")
    assert len(a) == len(b) == 3
    for x, y in zip(a, b):
        assert abs(x - y) <= 1e-5 * abs(x), (a, b)
    ckpts = sorted(p.name for p in (tmp_path / "two" / "checkpoints").iterdir() if p.name.startswith("step-"))
    assert ckpts == ["step-000003"]
    assert two.stdout.count("done: 3 steps") == 1  # one rank reports

    # resume both runs to 5 steps (each rank reads its shard of the checkpoint lazily): the
    # 2-rank run continues with the same losses as the 1-process run
    more = [*args[:4], "5", *args[5:], "--resume"]
    r1 = subprocess.run([sys.executable, "-m", "horizon", *more, "--out", str(tmp_path / "one")],
                        capture_output=True, text=True, env=env, timeout=300)
    assert r1.returncode == 0, r1.stderr
    r2 = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                         "-m", "horizon", *more, "--out", str(tmp_path / "two")],
                        capture_output=True, text=True, env=env, timeout=300)
    assert r2.returncode == 0, r2.stderr[-3000:]
    a, b = losses("one"), losses("two")
    assert len(a) == len(b) == 5
    for x, y in zip(a, b):
        assert abs(x - y) <= 1e-5 * abs(x), (a, b)
