"""Checkpoints: the streamed safetensors writer against the `safetensors` library's reader,
atomic replacement, a full disk midway (the previous checkpoint stays intact), corrupt files, a
bit-identical resume (8 steps straight == 4 steps + resume to 8), SIGINT/SIGTERM, and `horizon export`
loaded back with transformers."""

import errno
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from horizon import HorizonError
from horizon.cli import main as cli_main
from horizon.io import checkpoint as ckpt

TINY = ["--preset", "tiny", "--device", "cpu", "--batch-size", "2", "--seq-len", "32", "--lr", "3e-3",
        "--warmup-steps", "2"]


def _tensors(seed=0):
    g = torch.Generator().manual_seed(seed)
    return {
        "a.master": torch.randn(5, 7, generator=g),
        "b.bf16": torch.randn(33, generator=g).to(torch.bfloat16),
        "c.int": torch.randint(-5, 5, (4, 3), generator=g, dtype=torch.int64),
        "d.strided": torch.randn(6, 4, generator=g).t(),  # non-contiguous
        "e.empty": torch.zeros(0, 3),
    }


def test_safetensors_writer_matches_the_reference_reader(tmp_path):
    from safetensors.torch import load_file

    t = _tensors()
    ckpt.write_safetensors(tmp_path / "x.safetensors", t, {"step": 3})
    back = load_file(str(tmp_path / "x.safetensors"))
    assert set(back) == set(t)
    for k in t:
        assert back[k].dtype == t[k].dtype and torch.equal(back[k], t[k]), k


def test_save_latest_and_keep(tmp_path):
    for step in (2, 4, 6):
        ckpt.save_checkpoint(tmp_path, step, _tensors(step), {"data_position": step * 10}, keep=2)
    assert ckpt.list_checkpoints(tmp_path) == [4, 6]
    latest = ckpt.latest_checkpoint(tmp_path)
    assert latest.name == "step-000006"
    tensors, meta = ckpt.load_checkpoint(latest)
    assert meta["step"] == 6 and meta["data_position"] == 60
    assert all(torch.equal(tensors[k], v) for k, v in _tensors(6).items())
    # Re-saving an existing step replaces it atomically.
    ckpt.save_checkpoint(tmp_path, 6, _tensors(99), {"data_position": 1}, keep=2)
    tensors, meta = ckpt.load_checkpoint(ckpt.latest_checkpoint(tmp_path))
    assert meta["data_position"] == 1 and torch.equal(tensors["a.master"], _tensors(99)["a.master"])
    assert not [p for p in ckpt.checkpoints_dir(tmp_path).iterdir() if p.name.startswith(".")]


@pytest.mark.parametrize("fail_at", [1, 3, 6])
def test_full_disk_midway_keeps_the_previous_checkpoint(tmp_path, monkeypatch, fail_at):
    ckpt.save_checkpoint(tmp_path, 4, _tensors(4), {"data_position": 8})
    before = {p.name: p.read_bytes() for p in (ckpt.checkpoints_dir(tmp_path) / "step-000004").iterdir()}
    calls = {"n": 0}
    real = ckpt._write_bytes

    def writer(f, data):
        calls["n"] += 1
        if calls["n"] == fail_at:
            real(f, bytes(memoryview(data))[: max(1, len(memoryview(data).cast("B")) // 2)])
            raise OSError(errno.ENOSPC, "No space left on device")
        real(f, data)

    monkeypatch.setattr(ckpt, "_write_bytes", writer)
    with pytest.raises(HorizonError) as e:
        ckpt.save_checkpoint(tmp_path, 8, _tensors(8), {"data_position": 16})
    msg = str(e.value)
    assert "no space left on device" in msg and "previous checkpoint is intact" in msg and "\n" not in msg
    assert ckpt.list_checkpoints(tmp_path) == [4]
    assert ckpt.latest_checkpoint(tmp_path).name == "step-000004"
    after = {p.name: p.read_bytes() for p in (ckpt.checkpoints_dir(tmp_path) / "step-000004").iterdir()}
    assert after == before
    assert [p.name for p in ckpt.checkpoints_dir(tmp_path).iterdir() if p.name.startswith(".tmp")] == []


def test_corrupt_checkpoint_is_a_clear_error(tmp_path):
    d = ckpt.save_checkpoint(tmp_path, 1, _tensors(), {})
    raw = (d / ckpt.STATE_FILE).read_bytes()
    (d / ckpt.STATE_FILE).write_bytes(raw[: len(raw) // 2])
    with pytest.raises(HorizonError, match="corrupt"):
        ckpt.load_checkpoint(d)
    (d / ckpt.META_FILE).write_text("{nope")
    with pytest.raises(HorizonError, match="cannot read meta.json"):
        ckpt.load_checkpoint(d)


def _losses(run_dir):
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["step"] for r in rows], [r["loss"] for r in rows]


def _state(run_dir):
    return ckpt.load_checkpoint(ckpt.latest_checkpoint(run_dir))[0]


def test_resume_is_bit_identical(tmp_path, capsys):
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert cli_main(["train", *TINY, "--steps", "8", "--out", str(straight)]) == 0
    assert cli_main(["train", *TINY, "--steps", "4", "--decay-steps", "8", "--out", str(split)]) == 0
    assert ckpt.list_checkpoints(split) == [4]
    # Resume takes the run's saved options; only --steps changes.
    assert cli_main(["train", "--resume", "--out", str(split), "--steps", "8"]) == 0
    s_steps, s_loss = _losses(straight)
    r_steps, r_loss = _losses(split)
    assert s_steps == r_steps == list(range(1, 9))
    assert r_loss == s_loss  # to the last bit
    a, b = _state(straight), _state(split)
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    _, meta = ckpt.load_checkpoint(ckpt.latest_checkpoint(split))
    assert meta["step"] == 8 and meta["data_position"] == 16
    assert (split / "loss.png").stat().st_size > 0
    # Resuming past the end is a no-op, not an error.
    assert cli_main(["train", "--resume", "--out", str(split), "--steps", "8"]) == 0


def test_full_disk_during_training_is_one_line_and_keeps_the_checkpoint(tmp_path, monkeypatch, capsys):
    run = tmp_path / "run"
    assert cli_main(["train", *TINY, "--steps", "2", "--out", str(run)]) == 0
    capsys.readouterr()

    def full(f, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ckpt, "_write_bytes", full)
    assert cli_main(["train", "--resume", "--out", str(run), "--steps", "3"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("horizon: error:") and "no space left" in err[0]
    assert ckpt.list_checkpoints(run) == [2]
    ckpt.load_checkpoint(ckpt.latest_checkpoint(run))


@pytest.mark.parametrize("signum,code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_signal_writes_a_checkpoint_and_resume_continues(tmp_path, signum, code):
    run = tmp_path / "run"
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen([sys.executable, "-m", "horizon", "train", *TINY, "--steps", "100000", "--out", str(run)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    metrics = run / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 2:
            break
        time.sleep(0.2)
    proc.send_signal(signum)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == code, err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and signal.Signals(signum).name in lines[0] and "--resume" in lines[0]
    steps = ckpt.list_checkpoints(run)
    assert len(steps) == 1 and steps[0] >= 2
    done = len(metrics.read_text().splitlines())
    assert done == steps[0]
    assert cli_main(["train", "--resume", "--out", str(run), "--steps", str(steps[0] + 1)]) == 0
    assert ckpt.list_checkpoints(run)[-1] == steps[0] + 1


def test_export_loads_in_transformers_and_matches_the_next_step_loss(tmp_path, capsys):
    transformers = pytest.importorskip("transformers")
    from horizon.data import DataConfig, load_tokenizer, load_training_data

    run, hf_dir = tmp_path / "run", tmp_path / "hf"
    assert cli_main(["train", *TINY, "--steps", "4", "--out", str(run)]) == 0
    assert cli_main(["export", str(run), "--out", str(hf_dir)]) == 0
    assert cli_main(["train", "--resume", "--out", str(run), "--steps", "5"]) == 0
    model = transformers.AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32)
    tok = transformers.PreTrainedTokenizerFast.from_pretrained(str(hf_dir))
    assert tok.eos_token == "<|endoftext|>"
    # The loss HF computes on step 5's batch with the step-4 weights is what the trainer
    # reported for step 5 (its loss is taken before that step's update).
    data = load_training_data(DataConfig(), load_tokenizer(run / "tokenizer.json", eos_id=0), 32, 0,
                              fallback_dir=tmp_path / "cache")
    ids, labels, pos = data.train.batch(4 * 2, 2)
    with torch.no_grad():
        hf_loss = model(input_ids=ids, labels=labels, position_ids=pos).loss.item()
    _, losses = _losses(run)
    assert hf_loss == pytest.approx(losses[4], rel=1e-5, abs=1e-5)

    # The exported directory is also a `--model-dir` to train from: its first loss is HF's loss
    # on the first batch.
    ids0, labels0, pos0 = data.train.batch(0, 2)
    with torch.no_grad():
        hf_first = model(input_ids=ids0, labels=labels0, position_ids=pos0).loss.item()
    again = tmp_path / "again"
    assert cli_main(["train", "--model-dir", str(hf_dir), "--device", "cpu", "--batch-size", "2", "--seq-len", "32",
                     "--steps", "1", "--out", str(again)]) == 0
    assert _losses(again)[1][0] == pytest.approx(hf_first, rel=1e-5, abs=1e-5)


@pytest.mark.gpu
def test_training_on_the_gpu_streams_weights_and_resumes_bit_identically(tmp_path):
    straight, split = tmp_path / "straight", tmp_path / "split"
    gpu = ["--preset", "tiny", "--device", "cuda", "--batch-size", "4", "--seq-len", "64", "--warmup-steps", "1"]
    assert cli_main(["train", *gpu, "--steps", "4", "--out", str(straight)]) == 0
    assert cli_main(["train", *gpu, "--steps", "2", "--decay-steps", "4", "--out", str(split)]) == 0
    assert cli_main(["train", "--resume", "--out", str(split), "--steps", "4"]) == 0
    rows = [json.loads(x) for x in (straight / "metrics.jsonl").read_text().splitlines()]
    assert all(r["weight_h2d_bytes"] > 0 and r["peak_device_bytes"] > 0 for r in rows)
    assert _losses(split)[1] == _losses(straight)[1]
