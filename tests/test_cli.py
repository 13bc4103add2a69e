"""`horizon train` as a product: bad input gives one line on stderr and a non-zero exit (run as
`python -m horizon` subprocesses), options merge defaults < TOML < flags, the lr schedule, the
progress display, NaN/Inf steps, the plan refusal, and a short default run whose loss falls."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from horizon import HorizonError
from horizon.cli import build_parser
from horizon.cli import main as cli_main
from horizon.cli import train_config_from_args
from horizon.run.config import TrainConfig
from horizon.run.progress import Progress

TINY = ["--preset", "tiny", "--device", "cpu", "--batch-size", "2", "--seq-len", "32"]


def _model_dir(root: Path, name: str, config, weights: bytes | None = b"") -> Path:
    d = root / name
    d.mkdir()
    if config is not None:
        (d / "config.json").write_text(config if isinstance(config, str) else json.dumps(config))
    if weights is not None:
        (d / "model.safetensors").write_bytes(weights)
    return d


@pytest.fixture(scope="module")
def bad_cases(tmp_path_factory):
    from horizon.models import presets
    from horizon.data import shipped_tokenizer_path

    root = tmp_path_factory.mktemp("bad")
    tiny = presets.get("tiny")
    empty = root / "empty.txt"
    empty.write_text("")
    binary = root / "binary.txt"
    binary.write_bytes(b"\xff\xfe\xfa not utf-8")
    (root / "bad.toml").write_text("steps = [unclosed\n")
    (root / "unknown.toml").write_text("stepz = 3\n")
    (root / "neg.toml").write_text("lr = -0.5\n")
    (root / "emptyrun").mkdir()
    broken = root / "brokenrun" / "checkpoints" / "step-000002"
    broken.mkdir(parents=True)
    (broken / "state.safetensors").write_bytes(b"\0" * 16)
    (broken / "meta.json").write_text("{broken")
    header = json.dumps({"w": {"dtype": "F32", "shape": [1000], "data_offsets": [0, 4000]}}).encode()
    truncated = len(header).to_bytes(8, "little") + header + b"\0" * 10
    return [
        # (argv, expected exit code, text the one line must contain)
        (["train", "--model-dir", str(root / "missing")], 1, "does not exist"),
        (["train", "--model-dir", str(_model_dir(root, "noconfig", None))], 1, "has no config.json"),
        (["train", "--model-dir", str(_model_dir(root, "badjson", "{oops"))], 1, "not JSON"),
        (["train", "--model-path", "native",
          "--model-dir", str(_model_dir(root, "gpt2", {"architectures": ["GPT2LMHeadModel"]}))], 1,
         "unsupported architecture 'GPT2LMHeadModel'"),
        (["train", "--model-dir", str(_model_dir(root, "noweights", tiny, weights=None))], 1, "no *.safetensors"),
        (["train", "--model-dir", str(_model_dir(root, "badsize", dict(tiny, hidden_size="big")))], 1,
         "'hidden_size' must be an integer"),
        (["train", "--device", "cpu", "--tokenizer", str(root / "nope.json"),
          "--model-dir", str(_model_dir(root, "notok", tiny))], 1, "nope.json"),
        (["train", "--device", "cpu", "--tokenizer", str(shipped_tokenizer_path()), "--out", str(root / "r1"),
          "--model-dir", str(_model_dir(root, "truncweights", tiny, weights=truncated))], 1, "corrupt *.safetensors"),
        (["train", "--preset", "huge"], 1, "unknown preset 'huge'"),
        (["train", "--steps", "-3"], 2, "--steps"),
        (["train", "--batch-size", "0"], 2, "--batch-size"),
        (["train", "--lr", "nan"], 2, "--lr"),
        (["train", "--activation-memory", "lots"], 2, "--activation-memory must be a byte count"),
        (["train", "--steps", "many"], 2, "invalid integer"),
        (["train", *TINY, "--data", str(empty)], 1, "is empty"),
        (["train", *TINY, "--data", str(binary)], 1, "not UTF-8"),
        (["train", *TINY, "--data", str(root / "nodata.txt")], 1, "does not exist"),
        (["train", "--preset", "tiny", "--seq-len", "1024"], 1, "exceeds the model's max_position_embeddings 512"),
        (["train", "--config", str(root / "bad.toml")], 1, "not valid TOML"),
        (["train", "--config", str(root / "unknown.toml")], 1, "unknown option 'stepz'"),
        (["train", "--config", str(root / "neg.toml")], 1, "--lr must be a finite number > 0"),
        (["train", "--config", str(root / "missing.toml")], 1, "cannot read config file"),
        (["train", "--resume", "--out", str(root / "emptyrun")], 1, "no checkpoint found"),
        (["train", "--resume"], 1, "--resume needs --out"),
        (["train", "--resume", "--out", str(root / "brokenrun")], 1, "cannot read meta.json"),
        (["export", str(root / "brokenrun"), "--out", str(root / "hf2")], 1, "cannot read meta.json"),
        (["export", str(root / "norun"), "--out", str(root / "hf")], 1, "does not exist"),
        (["export", str(root / "emptyrun"), "--out", str(root / "hf")], 1, "no checkpoint"),
        (["plan", "--model-dir", str(root / "gpt2"), "--model-path", "native"], 1, "unsupported architecture"),
    ]


def _run_all(cases, timeout=180):
    procs = [subprocess.Popen([sys.executable, "-m", "horizon", *argv], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for argv, _, _ in cases]
    return [p.communicate(timeout=timeout) + (p.returncode,) for p in procs]


def test_bad_input_is_one_line_and_nonzero(bad_cases):
    results = []
    # A few at a time: each is a fresh interpreter.
    for i in range(0, len(bad_cases), 6):
        results += _run_all(bad_cases[i:i + 6])
    for (argv, code, needle), (out, err, rc) in zip(bad_cases, results):
        lines = err.strip().splitlines()
        assert rc == code, (argv, rc, err)
        assert "Traceback" not in err and "Traceback" not in out, (argv, err)
        assert len(lines) == 1, (argv, err)
        assert lines[0].startswith("horizon") and "error:" in lines[0], (argv, err)
        assert needle in lines[0], (argv, lines[0])


def test_refuses_up_front_when_the_run_does_not_fit(tmp_path):
    # 7B with 2M tokens per step: the activation checkpoints alone (~550 GB) fit no test machine.
    r = subprocess.run([sys.executable, "-m", "horizon", "train", "--preset", "7b", "--batch-size", "512",
                        "--seq-len", "4096", "--out", str(tmp_path / "r")], capture_output=True, text=True, timeout=180)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    lines = r.stderr.strip().splitlines()
    assert "host memory" in r.stderr and "does NOT fit" in r.stderr
    assert lines[-1].startswith("horizon: error: this run does not fit this machine")
    assert not (tmp_path / "r").exists()  # nothing allocated or written


def test_options_merge_defaults_toml_flags(tmp_path):
    cfg = tmp_path / "run.toml"
    cfg.write_text('preset = "tiny"\nsteps = 50\nlr = 1\nseq-len = 64\ndata = ["corpus.txt"]\n[train]\nbatch_size = 4\n')
    args = build_parser().parse_args(["train", "--config", str(cfg), "--steps", "7", "--grad-clip", "1.0"])
    c = train_config_from_args(args)
    assert c.run.steps == 7                           # flag beats file
    assert c.optim.lr == 1.0 and isinstance(c.optim.lr, float)  # file beats default
    assert c.data.seq_len == 64 and c.data.batch_size == 4 and c.optim.grad_clip == 1.0
    assert c.data.data == [str(tmp_path / "corpus.txt")]  # relative to the config file
    assert c.engine.micro_batch_size is None and c.run.seed == TrainConfig().run.seed  # defaults stay
    with pytest.raises(HorizonError, match="--micro-batch-size 9 exceeds --batch-size 4"):
        train_config_from_args(build_parser().parse_args(["train", "--config", str(cfg), "--micro-batch-size", "9"]))


def test_lr_schedule_warmup_then_cosine():
    c = TrainConfig.from_flat(dict(lr=1e-3, min_lr=1e-4, warmup_steps=10, decay_steps=110, steps=200)).lr_schedule()
    for step in range(0, 200):
        if step < 10:
            want = 1e-3 * (step + 1) / 10
        elif step <= 110:
            want = 1e-4 + 0.5 * (1e-3 - 1e-4) * (1 + math.cos(math.pi * (step - 10) / 100))
        else:
            want = 1e-4
        assert c.lr_at(step) == pytest.approx(want, rel=1e-12, abs=1e-18), step
    d = TrainConfig.from_flat(dict(lr=2e-3, steps=300)).lr_schedule()  # warm-up 5% of 300, min lr/10
    assert d.lr_at(14) == pytest.approx(2e-3) and d.lr_at(299) == pytest.approx(2e-4, rel=1e-3)


class _Stream:
    def __init__(self, tty):
        self.tty, self.text = tty, ""

    def isatty(self):
        return self.tty

    def write(self, s):
        self.text += s

    def flush(self):
        pass


def test_progress_bar_on_a_terminal_and_lines_otherwise():
    tty = _Stream(True)
    p = Progress(total=4, start=0, stream=tty, every=2)
    for s in range(1, 5):
        p.update(s, 5.0 - s, 1234.0)
    p.close()
    assert tty.text.count("\r") == 4 and tty.text.endswith("\n") and tty.text.count("\n") == 1
    assert "4/4" in tty.text and "loss 1.0000" in tty.text and "1.2k tok/s" in tty.text and "ETA" in tty.text
    plain = _Stream(False)
    p = Progress(total=10, start=0, stream=plain, every=4)
    for s in range(1, 11):
        p.update(s, 2.0, 10.0)
    steps = [line.split()[1] for line in plain.text.splitlines()]
    assert "\r" not in plain.text and steps == ["1/10", "4/10", "8/10", "10/10"]


def test_nan_steps_are_skipped_counted_and_stop_the_run(tmp_path, capsys):
    # An absurd learning rate blows the weights up after the first update; every later step has
    # a non-finite loss, is skipped (weights unchanged), and the run stops after 3 in a row.
    run = tmp_path / "run"
    rc = cli_main(["train", *TINY, "--lr", "1e38", "--warmup-steps", "0", "--max-bad-steps", "3", "--steps", "50",
                   "--out", str(run)])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 1 and len(err) == 1
    assert "3 steps in a row had a NaN/Inf loss" in err[0]
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 4 and rows[0]["loss"] is not None and not rows[0]["skipped"]
    assert all(r["skipped"] and r["loss"] is None for r in rows[1:])
    assert rows[-1]["skipped_steps"] == 3


def test_short_default_run_learns_and_writes_its_outputs(tmp_path, capsys):
    run = tmp_path / "run"
    # The default run at a quarter of its batch and sequence length, for a fraction of its steps.
    assert cli_main(["train", "--device", "cpu", "--steps", "25", "--batch-size", "4", "--seq-len", "64",
                     "--out", str(run), "--save-every", "10", "--log-every", "10"]) == 0
    out = capsys.readouterr().out
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 26))
    for r in rows:
        for key in ("loss", "lr", "grad_norm", "tokens_per_s", "weight_h2d_bytes", "peak_host_bytes",
                    "peak_device_bytes", "exposed_optimizer_s"):
            assert r[key] is not None, key
    # Uniform guessing over the 512-token vocabulary costs ln 512 = 6.24 nats.
    assert rows[0]["loss"] == pytest.approx(math.log(512), abs=0.3)
    last = sum(r["loss"] for r in rows[-5:]) / 5
    assert last < rows[0]["loss"] - 1.0, [r["loss"] for r in rows]
    # The weight stream moves the same bytes every step (a per-step delta, not a running total).
    assert rows[0]["weight_h2d_bytes"] > 0 and len({r["weight_h2d_bytes"] for r in rows}) == 1
    assert (run / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "done: 25 steps, loss" in out and "step 20/25" in out and "step 25/25" in out
    from horizon.io import checkpoint as ckpt

    assert ckpt.list_checkpoints(run) == [20, 25]  # every 10, the newest two kept


def test_tiny_moe_preset_trains(tmp_path, capsys):
    """The tiny-moe preset (a Mixtral) trains on the CPU: no refusal is a pass."""
    rc = cli_main(["train", "--preset", "tiny-moe", "--device", "cpu", "--batch-size", "2", "--seq-len", "32",
                   "--steps", "6", "--lr", "3e-3", "--warmup-steps", "0", "--out", str(tmp_path / "moe")])
    err = capsys.readouterr().err
    assert rc == 0, err
    rows = [json.loads(x) for x in (tmp_path / "moe" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 7))
    assert all(math.isfinite(r["loss"]) and not r["skipped"] for r in rows)
    assert rows[0]["loss"] == pytest.approx(math.log(512), abs=0.3)  # uniform over the 512-token vocabulary
    assert rows[-1]["loss"] < rows[0]["loss"]
