"""The disk tier (`offload_dir`, docs/engine.md "The disk tier"): training with the optimizer state
in files equals training without it bit for bit (with and without clipping, with micro-batches);
a checkpoint of a tiered run resumes to the uninterrupted run, also after a kill -9 in the middle
of a step; the peak RSS (read from the OS) stays within the stated formula for a model whose full
footprint is over 3x that peak; bad directories are refused with one line and leave nothing;
`horizon plan` / `horizon doctor --disk` report the tier."""

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import horizon
from horizon import HorizonError, plan
from horizon.engine import offload
from horizon.io import checkpoint as ckpt

ROOT = Path(__file__).resolve().parents[1]
VOCAB = 128
SEQ = 16


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    # As in test_engine: tiny models gain nothing from intra-op threads on a loaded machine.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _config(layers=3, tie=False, **extra):
    return dict(architectures=["LlamaForCausalLM"], model_type="llama", hidden_size=64, intermediate_size=96,
                num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2, vocab_size=VOCAB,
                max_position_embeddings=64, rms_norm_eps=1e-5, tie_word_embeddings=tie, **extra)


def _batches(n, rows, seed=1):
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(0, VOCAB, (rows, SEQ), generator=gen)
        labels = ids.clone()
        labels[:, : SEQ // 4] = -100
        out.append((ids, labels))
    return out


HP = dict(lr=3e-3, betas=(0.9, 0.95), eps=1e-6, weight_decay=0.1)


def _train(cfg, batches, **kw):
    t = horizon.Trainer.from_config(cfg, seed=0, device="cpu", **HP, **kw)
    losses = [t.train_step(ids, lab) for ids, lab in batches]
    norms = t.last_grad_norm
    state = {k: v.clone() for k, v in t.state_tensors().items()}
    return t, losses, norms, state


def _identical(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _compute_copies(t):
    return [layer.slab.weights_bf16 if t.compute_dtype == torch.bfloat16 else layer.slab.master
            for layer in t.model.layers]


@pytest.mark.parametrize("grad_clip, micro_batch_size, tie, dtype", [
    (None, None, False, "float32"),
    (None, 2, True, "float32"),
    (0.05, None, False, "float32"),
    (0.05, 2, True, "float32"),
    (None, 2, False, "bfloat16"),
    (0.05, 1, False, "bfloat16"),
])
def test_eight_steps_with_the_tier_equal_eight_steps_without_it(tmp_path, grad_clip, micro_batch_size, tie, dtype):
    cfg = _config(tie=tie)
    batches = _batches(8, 4)
    kw = dict(grad_clip=grad_clip, micro_batch_size=micro_batch_size, compute_dtype=dtype)
    ram, ram_losses, ram_norm, ram_state = _train(cfg, batches, **kw)
    tier, losses, norm, state = _train(cfg, batches, offload_dir=str(tmp_path), **kw)
    assert losses == ram_losses  # exactly, step by step
    assert norm == ram_norm
    assert _identical(state, ram_state)
    for a, b in zip(_compute_copies(tier), _compute_copies(ram)):
        assert torch.equal(a, b)  # the copy the device streams
    # Disk traffic, counted by the tier: init writes each master part and reads it back for the
    # compute copies; each step reads and writes every layer's state once and writes and reads
    # its gradient part once (every step lands its gradients before the step's verdict: a step
    # updates all layers or none, docs/engine.md).
    parts = [offload.part_bytes(layer.numel) for layer in tier.model.layers]
    per_step = sum(parts) * 4
    s = tier.stats
    assert s["disk_bytes_written"] == sum(parts) + 8 * per_step
    assert s["disk_bytes_read"] == sum(parts) + 8 * per_step
    assert s["disk_updates"] == 8 * len(parts)
    assert s["disk_skipped_updates"] == 0
    assert s["skipped_layer_updates"] == 0
    files = list((tmp_path / offload.SUBDIR).glob("layer-*.state"))
    assert len(files) == len(parts)
    tier.model.close()
    assert list(tmp_path.iterdir()) == [], "the tier's files outlive it"


def test_a_child_process_inherits_no_tier_file(tmp_path):
    """The tier's files are opened close-on-exec: a process the run starts (a data loader, a
    shell hook; here one started without Python's own fd closing) holds none of them open, so
    it cannot keep a finished run's disk space alive or write into the state."""
    import subprocess
    import sys

    t = horizon.Trainer.from_config(_config(), seed=0, device="cpu", offload_dir=str(tmp_path))
    tier_dir = str((tmp_path / offload.SUBDIR).resolve())
    mine = [os.readlink(f"/proc/self/fd/{fd}") for fd in os.listdir("/proc/self/fd")
            if os.path.exists(f"/proc/self/fd/{fd}")]
    assert any(p.startswith(tier_dir) for p in mine), "the tier holds its files open: the check would be empty"
    child = subprocess.run(
        [sys.executable, "-c", "import os; print('\\n'.join(os.readlink('/proc/self/fd/' + f) for f in "
         "os.listdir('/proc/self/fd') if os.path.exists('/proc/self/fd/' + f)))"],
        close_fds=False, capture_output=True, text=True, timeout=60)
    assert child.returncode == 0, child.stderr
    assert not [p for p in child.stdout.splitlines() if p.startswith(tier_dir)]
    t.model.close()


def test_a_ticket_is_done_once_its_work_is_and_a_step_leaves_every_landing_done(tmp_path):
    """DiskTicket.done: what the landing polls to let go of landed gradients and to reap
    finished write-backs without waiting (a ticket that never reported done would keep every
    step's gradients alive until the next step)."""
    t = horizon.Trainer.from_config(_config(), seed=0, device="cpu", offload_dir=str(tmp_path), micro_batch_size=2)
    for ids, labels in _batches(2, 4):
        t.train_step(ids, labels)
    landing = t.engine.landing
    pending = list(landing._io)  # this step's write-backs, not waited for
    tk = landing._tier.flush()
    assert tk.wait(30.0) is True and tk.done
    assert pending and all(x.done for x in pending)
    landing._drop_landed()
    assert all(keep == () for jobs in landing._jobs.values() for _, keep in jobs)
    t.model.close()


@pytest.mark.parametrize("sync, io", [("step", "threads"), ("layer", "uring")])
def test_durability_and_io_back_ends_do_not_change_a_bit(tmp_path, monkeypatch, sync, io):
    if io == "uring" and offload.disk_io_info()["backend"] != "io_uring":
        pytest.skip(f"io_uring unavailable here: {offload.disk_io_info()['note']}")
    monkeypatch.setenv("HORIZON_OFFLOAD_SYNC", sync)
    monkeypatch.setenv("HORIZON_OFFLOAD_IO", io)
    # the least staging (one layer at a time) as well
    monkeypatch.setenv("HORIZON_OFFLOAD_STAGING_BYTES", "1")
    cfg, batches = _config(), _batches(4, 4)
    with pytest.raises(HorizonError, match="staging"):
        horizon.Trainer.from_config(cfg, device="cpu", offload_dir=str(tmp_path), grad_clip=0.05)
    assert list(tmp_path.iterdir()) == []
    biggest = max(offload.part_bytes(n) for _, n in plan.layer_parameters(cfg)) * 4
    monkeypatch.setenv("HORIZON_OFFLOAD_STAGING_BYTES", str(biggest + offload.ALIGN))
    _, ram_losses, _, ram_state = _train(cfg, batches, grad_clip=0.05)
    t, losses, _, state = _train(cfg, batches, grad_clip=0.05, offload_dir=str(tmp_path))
    assert losses == ram_losses and _identical(state, ram_state)
    assert t.model.info["backend"] == ("threads" if io == "threads" else "io_uring")
    assert t.model.info["durability"] == sync.capitalize()
    assert t.stats["disk_syncs"] > 0
    if sync == "step":
        assert t.stats["disk_steps_synced"] >= 1


def test_resume_from_a_checkpoint_of_a_tiered_run_equals_the_uninterrupted_run(tmp_path):
    cfg, batches = _config(tie=True), _batches(8, 4)
    kw = dict(grad_clip=0.05, micro_batch_size=2)
    _, full_losses, _, full_state = _train(cfg, batches, **kw)

    (tmp_path / "a").mkdir()
    a = horizon.Trainer.from_config(cfg, seed=0, device="cpu", offload_dir=str(tmp_path / "a"), **HP, **kw)
    first = [a.train_step(ids, lab) for ids, lab in batches[:4]]
    saved = ckpt.save_checkpoint(tmp_path / "run", 4, a.state_tensors(), {"trainer_step": a.step})
    a.model.close()

    (tmp_path / "b").mkdir()
    b = horizon.Trainer.from_config(cfg, seed=123, device="cpu", offload_dir=str(tmp_path / "b"), **HP, **kw)
    with ckpt.open_checkpoint(saved) as (tensors, meta):
        b.load_state_tensors(tensors)  # lazy file slices, one layer at a time into the files
    b.step = meta["trainer_step"]
    rest = [b.train_step(ids, lab) for ids, lab in batches[4:]]
    assert first + rest == full_losses
    assert _identical({k: v.clone() for k, v in b.state_tensors().items()}, full_state)


def test_hf_import_and_export_through_the_files_equal_the_ram_store(tmp_path):
    # The import writes into file views (page cache) that the tier then reads with direct I/O;
    # the export reads the files the tier wrote with direct I/O through the page cache.
    cfg, batches = _config(tie=True), _batches(3, 4)
    src, _, _, _ = _train(cfg, batches[:1])
    src.save_pretrained(tmp_path / "hf")
    ram = horizon.Trainer.from_pretrained(str(tmp_path / "hf"), device="cpu", **HP)
    (tmp_path / "d").mkdir()
    tier = horizon.Trainer.from_pretrained(str(tmp_path / "hf"), device="cpu", offload_dir=str(tmp_path / "d"), **HP)
    assert [tier.train_step(i, lab) for i, lab in batches] == [ram.train_step(i, lab) for i, lab in batches]
    ram.save_pretrained(tmp_path / "hf_ram")
    tier.save_pretrained(tmp_path / "hf_tier")
    from safetensors.torch import load_file

    a = load_file(str(tmp_path / "hf_ram" / "model.safetensors"))
    b = load_file(str(tmp_path / "hf_tier" / "model.safetensors"))
    assert _identical(a, b)


_KILLER = textwrap.dedent("""
    import os, signal, sys
    from horizon.engine import schedule

    count, kill_at = [0], int(os.environ["HORIZON_TEST_KILL_AT_LANDING"])
    land = schedule.LayerMajorEngine._land

    def landing_then_kill(self, *args, **kwargs):
        count[0] += 1
        out = land(self, *args, **kwargs)
        if count[0] == kill_at:  # mid-step: some layers updated on disk, the others not yet
            self.landing._tier.flush().wait()
            os.kill(os.getpid(), signal.SIGKILL)
        return out

    schedule.LayerMajorEngine._land = landing_then_kill
    from horizon.cli import main
    sys.exit(main(sys.argv[1:]))
""")


def _horizon(args, env=None, script=None, timeout=300):
    e = dict(os.environ, PYTHONPATH=str(ROOT / "src"), **(env or {}))
    cmd = [sys.executable, "-c", script] if script else [sys.executable, "-m", "horizon"]
    return subprocess.run(cmd + args, capture_output=True, text=True, env=e, timeout=timeout, cwd=ROOT)


def _final_state(run: Path, step: int) -> dict:
    tensors, _ = ckpt.load_checkpoint(run / "checkpoints" / ckpt.step_dir_name(step))
    return tensors


def _losses(run: Path) -> dict:
    return {r["step"]: r["loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())}


@pytest.mark.slow
def test_kill_9_in_the_middle_of_a_step_then_resume_equals_the_uninterrupted_run(tmp_path):
    common = ["train", "--preset", "tiny", "--device", "cpu", "--steps", "8", "--save-every", "2",
              "--batch-size", "4", "--seq-len", "32", "--log-every", "1"]
    (tmp_path / "d_ref").mkdir()
    (tmp_path / "d").mkdir()
    ref = _horizon(common + ["--out", str(tmp_path / "ref"), "--offload-dir", str(tmp_path / "d_ref")])
    assert ref.returncode == 0, ref.stderr

    # tiny: embedding, 4 blocks, head = 6 landings a step, each followed by its update (no
    # clipping); die after the 3rd of step 6 once its update is on disk: head and blocks 3, 2 at
    # step 6 in the files, the others at step 5
    run = tmp_path / "run"
    killed = _horizon(common + ["--out", str(run), "--offload-dir", str(tmp_path / "d")],
                      env={"HORIZON_TEST_KILL_AT_LANDING": str(5 * 6 + 3)}, script=_KILLER)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert sorted(ckpt.list_checkpoints(run)) == [2, 4]
    assert (tmp_path / "d" / offload.SUBDIR).is_dir(), "the killed run's files are still there"

    resumed = _horizon(["train", "--resume", "--out", str(run)])
    assert resumed.returncode == 0, resumed.stderr
    ref_state, state = _final_state(tmp_path / "ref", 8), _final_state(run, 8)
    assert _identical(state, ref_state)
    want, got = _losses(tmp_path / "ref"), _losses(run)
    assert [got[s] for s in range(1, 9)] == [want[s] for s in range(1, 9)]
    for d in ("d", "d_ref"):  # nothing left behind once a run ends
        assert list((tmp_path / d).iterdir()) == []


_MEMORY_CHILD = textwrap.dedent("""
    import json, sys
    import torch
    torch.set_num_threads(1)
    import horizon

    def status(key):
        for line in open("/proc/self/status"):
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024

    base = status("VmRSS")  # Python, torch and the native module, before any model
    cfg = json.loads(sys.argv[1])
    t = horizon.Trainer.from_config(cfg, seed=0, device="cpu", compute_dtype="bfloat16", lr=1e-4,
                                    offload_dir=sys.argv[2])
    ids = torch.randint(0, cfg["vocab_size"], (1, 8), generator=torch.Generator().manual_seed(0))
    loss = t.train_step(ids)
    t.synchronize()
    m = t.model
    print(json.dumps(dict(
        base=base, hwm=status("VmHWM"), params=t.num_parameters, loss=loss,
        compute=sum(layer.slab.nbytes for layer in m.layers), staging=m.info["staging_bytes"],
        landing=t.engine.landing.host_bytes, device_ledger=t.engine.peak_device_bytes(),
        lmax=max(layer.numel for layer in m.layers), tensors=max(len(layer.layout) for layer in m.layers),
        updates=t.stats["disk_updates"], layers=len(m.layers), malloc_note=m.malloc_note)))
""")


@pytest.mark.slow
def test_a_model_three_times_the_peak_rss_trains_and_the_rss_is_within_the_formula(tmp_path):
    # 410 M parameters: 14 B/param = 5.7 GB; with the tier about 1.6 GB resident. Small blocks
    # keep the per-layer terms (staging, landing, one layer's backward) small.
    cfg = dict(architectures=["LlamaForCausalLM"], model_type="llama", hidden_size=512, intermediate_size=1536,
               num_hidden_layers=120, num_attention_heads=8, num_key_value_heads=8, vocab_size=512,
               max_position_embeddings=64, rms_norm_eps=1e-5, tie_word_embeddings=False)
    r = _horizon([json.dumps(cfg), str(tmp_path)], script=_MEMORY_CHILD, timeout=900)
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout.strip().splitlines()[-1])
    assert d["updates"] == d["layers"] and d["loss"] == d["loss"]  # one full step, finite loss
    c = 2  # bf16 compute copy
    full = 14 * d["params"]
    assert full >= 3 * d["hwm"], f"14 B/param = {full / 2**30:.2f} GiB vs peak RSS {d['hwm'] / 2**30:.2f} GiB"
    # docs/engine.md: c x P + staging + landing slots + the CPU device's bytes (the engine's
    # ledger, plus one layer's backward: autograd's per-tensor gradients, their sum and the fp32
    # accumulator) + a constant (the process before any model, and 64 MiB).
    one_backward = (d["tensors"] + 2) * d["lmax"] * c + 4 * d["lmax"]
    bound = d["compute"] + d["staging"] + d["landing"] + d["device_ledger"] + one_backward + d["base"] + (64 << 20)
    assert d["hwm"] <= bound, {k: v for k, v in d.items()}
    assert d["hwm"] >= d["base"] + d["compute"], "the compute copy must be resident: the measurement is off"
    assert d["compute"] >= c * d["params"]


# ----------------------------------------------------------------------------- bad input
def test_a_missing_dir_a_file_and_an_unwritable_dir_are_one_line(tmp_path):
    cfg = _config()
    with pytest.raises(HorizonError, match=r"offload dir .*nope does not exist"):
        horizon.Trainer.from_config(cfg, device="cpu", offload_dir=str(tmp_path / "nope"))
    (tmp_path / "f").write_text("x")
    with pytest.raises(HorizonError, match="is not a directory"):
        horizon.Trainer.from_config(cfg, device="cpu", offload_dir=str(tmp_path / "f"))
    if os.geteuid() == 0:
        ro = Path("/sys")  # refuses file creation even to root
    else:
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o500)
    with pytest.raises(HorizonError, match="is not writable"):
        horizon.Trainer.from_config(cfg, device="cpu", offload_dir=str(ro))
    assert [p.name for p in tmp_path.iterdir()] == ["f"] + (["ro"] if os.geteuid() else [])


def test_a_dir_without_space_is_refused_before_anything_is_written(tmp_path, monkeypatch):
    real = os.statvfs

    def tiny(path):
        s = real(path)
        return os.statvfs_result((s.f_bsize, s.f_frsize, s.f_blocks, 10, 10, s.f_files, s.f_ffree, s.f_favail,
                                  s.f_flag, s.f_namemax))

    monkeypatch.setattr(offload, "_statvfs", tiny)
    with pytest.raises(HorizonError, match=r"has 0\.00 GiB free, the disk tier needs"):
        horizon.Trainer.from_config(_config(), device="cpu", offload_dir=str(tmp_path))
    assert list(tmp_path.iterdir()) == []
    # `horizon train` refuses up front too (the plan decides), before the run directory exists
    from horizon.cli import main

    rc = main(["train", "--preset", "tiny", "--device", "cpu", "--steps", "1", "--out", str(tmp_path / "run"),
               "--offload-dir", str(tmp_path)])
    assert rc == 1
    assert not (tmp_path / "run").exists() and list(tmp_path.iterdir()) == []


def test_a_dead_runs_tier_files_count_as_free_space(tmp_path, monkeypatch):
    """The tier files of a run that is gone are replaced by the new run's, so their bytes count
    as free: a disk that holds the old tier holds the new one of the same size."""
    block = 4096
    monkeypatch.setattr(offload, "_statvfs", lambda path: os.statvfs_result(
        (block, block, 1 << 20, 100, 100, 1000, 1000, 1000, 0, 255)))  # 100 blocks free
    monkeypatch.setattr(offload, "_fs_info", lambda path: {"fs_type": "ext4", "in_memory": False})
    need = 300 * block
    assert "the disk tier needs" in offload.dir_problem(tmp_path, need)
    old = tmp_path / offload.SUBDIR
    old.mkdir()
    (old / "layer-0.state").write_bytes(b"\0" * (150 * block))
    (old / "layer-1.state").write_bytes(b"\0" * (60 * block))
    (old / "notes.txt").write_bytes(b"\0" * (500 * block))  # not a tier file: not ours to count
    assert offload.dir_problem(tmp_path, need) is None  # 100 + 150 + 60 blocks
    assert "the disk tier needs" in offload.dir_problem(tmp_path, need + 11 * block)


def test_tmpfs_is_refused_and_a_file_system_without_o_direct_falls_back(tmp_path, monkeypatch, caplog):
    shm = Path("/dev/shm")
    if shm.is_dir() and os.access(shm, os.W_OK):
        before = set(shm.iterdir())
        with pytest.raises(HorizonError, match=r"/dev/shm is on tmpfs \(memory\)"):
            horizon.Trainer.from_config(_config(), device="cpu", offload_dir=str(shm))
        assert set(shm.iterdir()) == before
    # O_DIRECT refused (as by some network and FUSE file systems): buffered I/O, said once
    monkeypatch.setattr(offload, "_probe_direct", lambda path: "open with O_DIRECT failed: Invalid argument")
    cfg, batches = _config(), _batches(3, 4)
    _, ram_losses, _, ram_state = _train(cfg, batches)
    with caplog.at_level("WARNING", logger="horizon.engine.offload"):
        t, losses, _, state = _train(cfg, batches, offload_dir=str(tmp_path))
    assert "no direct I/O" in caplog.text and "buffered I/O" in caplog.text
    assert t.model.info["direct_io"] is False
    assert losses == ram_losses and _identical(state, ram_state)


def test_a_second_run_on_the_same_dir_is_refused(tmp_path):
    a = horizon.Trainer.from_config(_config(), device="cpu", offload_dir=str(tmp_path))
    with pytest.raises(HorizonError, match="in use by another run"):
        horizon.Trainer.from_config(_config(), device="cpu", offload_dir=str(tmp_path))
    a.train_step(_batches(1, 2)[0][0])  # the first run is unharmed
    a.model.close()
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------- plan, doctor
def test_plan_with_the_tier_moves_the_state_to_disk_and_bounds_the_step_by_it(tmp_path, monkeypatch):
    cfg = horizon.models.presets.get("7b")
    machine = plan.Machine("cuda", "NVIDIA H100 80GB HBM3", 128 << 30, 80 << 30, 32)
    n = plan.count_parameters(cfg)
    layers = plan.layer_parameters(cfg)
    for clip in (False, True):
        p = plan.make_plan(cfg, batch_size=8, seq_len=1024, grad_clip=clip, machine=machine)
        t = plan.make_plan(cfg, batch_size=8, seq_len=1024, grad_clip=clip, machine=machine,
                           offload_dir=str(tmp_path))
        assert t["host_bytes_without_tier"] == p["host_bytes"]
        # master, m, v and the step's gradient (every step lands its gradients before its
        # verdict, with or without clipping): four parts per layer on the disk
        parts = sum(offload.part_bytes(-(-x // 16) * 16) for _, x in layers)
        assert t["disk_bytes"] == 4 * parts
        assert t["disk_read_bytes_per_step"] == t["disk_write_bytes_per_step"] == t["disk_bytes"]
        staging = 2 * max(4 * offload.part_bytes(-(-x // 16) * 16) for _, x in layers)
        assert t["host_breakdown"]["compute_copy"] == 2 * n
        rest = sum(v for k, v in p["host_breakdown"].items()
                   if k not in ("master_fp32", "adam_moments_fp32", "grad_buffer_fp32", "compute_copy_bf16"))
        assert t["host_bytes"] == 2 * n + staging + rest
        assert t["host_bytes"] < p["host_bytes"] / 4
        bw = t["disk_bandwidth"]
        want = t["disk_read_bytes_per_step"] / (bw["read_gbps"] * 1e9) + t["disk_write_bytes_per_step"] / (bw["write_gbps"] * 1e9)
        assert t["step_time_terms_s"]["disk_s"] == pytest.approx(want)
        assert t["step_time_lower_bound_s"] == max(t["step_time_terms_s"].values())
        assert "assumed" in bw["source"]
    # no room on the disk: does not fit, and says why
    monkeypatch.setattr(offload, "_statvfs", lambda path: os.statvfs_result((4096, 4096, 10, 10, 10, 0, 0, 0, 0, 255)))
    t = plan.make_plan(cfg, batch_size=8, seq_len=1024, machine=machine, offload_dir=str(tmp_path))
    assert not t["fits_disk"] and not t["fits"]
    assert "the disk tier needs" in plan.format_plan(t)
    t = plan.make_plan(cfg, batch_size=8, seq_len=1024, machine=machine, offload_dir=str(tmp_path / "nope"))
    assert not t["fits"] and "nope does not exist" in plan.format_plan(t)


def test_doctor_measures_the_disk_and_plan_uses_the_measurement(tmp_path, capsys):
    d = offload.doctor_disk(tmp_path, nbytes=32 << 20)
    assert d["read_gbps"] > 0 and d["write_gbps"] > 0 and d["bytes"] >= 32 << 20
    assert d["backend"] in ("io_uring", "threads")
    saved = json.loads((tmp_path / offload.ROOF_FILE).read_text())
    assert saved["read_gbps"] == d["read_gbps"]
    t = plan.make_plan(horizon.models.presets.get("tiny"), batch_size=2, seq_len=64, offload_dir=str(tmp_path),
                       machine=plan.Machine("cpu", "CPU", 8 << 30, 0, 2))
    assert "measured" in t["disk_bandwidth"]["source"] and t["disk_bandwidth"]["read_gbps"] == d["read_gbps"]
    from horizon.cli import main

    assert main(["doctor"]) == 0
    assert "disk tier I/O" in capsys.readouterr().out
    assert main(["doctor", "--disk", str(tmp_path / "missing")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "does not exist" in err
    assert main(["plan", "--preset", "tiny", "--device", "cpu", "--offload-dir", str(tmp_path)]) == 0
    assert "disk tier" in capsys.readouterr().out
