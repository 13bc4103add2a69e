"""The fine-tuning data through the whole run (`horizon train`, `horizon export`, `horizon data
inspect`): chat data rendered by the model's own template and trained on the assistant turns,
eval loss in metrics.jsonl / the progress line, the tokenizer files and the chat template
carried byte-identical into the export, which transformers loads."""

from __future__ import annotations

import json

import pytest
import torch

import horizon
from horizon.cli import main as cli_main
from horizon.models import presets
from test_chat_data import CHATML_GEN, CONVERSATIONS, make_model_dir, write_jsonl


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory):
    """A tiny Llama with a ChatML tokenizer (generation markers) in one model directory."""
    d = make_model_dir(tmp_path_factory.mktemp("m") / "model", CHATML_GEN)
    from tokenizers import Tokenizer

    vocab = Tokenizer.from_file(str(d / "tokenizer.json")).get_vocab_size()
    cfg = dict(presets.get("tiny"), vocab_size=vocab)
    horizon.Trainer.from_config(cfg, device="cpu").save_pretrained(str(d))
    (d / "generation_config.json").write_text('{"eos_token_id": 1, "temperature": 0.7}\n')
    data = d.parent / "chat.jsonl"
    write_jsonl(data, [{"messages": c} for c in CONVERSATIONS * 6])
    return d, data


def test_chat_run_trains_evaluates_and_exports_the_template(tmp_path, chat_model, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model, data = chat_model
    run, export = tmp_path / "run", tmp_path / "export"
    argv = ["train", "--model-dir", str(model), "--data", str(data), "--device", "cpu", "--steps", "4",
            "--batch-size", "2", "--seq-len", "64", "--eval-fraction", "0.25", "--eval-every", "2",
            "--out", str(run), "--log-every", "1"]
    assert cli_main(argv) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    assert "eval" in out and "documents" in out  # the data report, and the eval loss on the progress line
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    evals = {r["step"]: r.get("eval_loss") for r in rows}
    assert evals[1] is None and evals[3] is None
    assert all(isinstance(evals[s], float) and 0 < evals[s] < 20 for s in (2, 4)), evals
    # real tokens only: a padded or packed batch never counts more than batch x seq
    assert all(0 < r["tokens_per_s"] * r["step_s"] <= 2 * 64 + 1e-6 for r in rows)

    assert cli_main(["export", str(run), "--out", str(export)]) == 0
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (export / name).read_bytes() == (model / name).read_bytes(), name
    a, b = AutoTokenizer.from_pretrained(str(model)), AutoTokenizer.from_pretrained(str(export))
    for conv in CONVERSATIONS:
        assert a.apply_chat_template(conv, tokenize=False) == b.apply_chat_template(conv, tokenize=False)
    m = AutoModelForCausalLM.from_pretrained(str(export))
    assert isinstance(m(torch.tensor([[1, 2, 3]])).logits, torch.Tensor)


def test_eval_loss_equals_the_mean_over_eval_tokens(chat_model):
    """Trainer.evaluate is the token-weighted mean loss of transformers' forward on the same
    batches (fp32, one document per row)."""
    from transformers import AutoModelForCausalLM

    model, _ = chat_model
    t = horizon.Trainer.from_pretrained(str(model), device="cpu")
    hf = AutoModelForCausalLM.from_pretrained(str(model)).float().eval()
    g = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, 300, (2, 16), generator=g), torch.randint(0, 300, (3, 16), generator=g)]
    total = count = 0.0
    for ids in batches:
        with torch.no_grad():
            logits = hf(ids).logits[:, :-1].reshape(-1, hf.config.vocab_size)
        total += torch.nn.functional.cross_entropy(logits, ids[:, 1:].reshape(-1), reduction="sum").item()
        count += ids[:, 1:].numel()
    assert t.evaluate(batches) == pytest.approx(total / count, rel=1e-5)
    before = {k: v.clone() for k, v in t.state_tensors().items()}
    t.evaluate(batches)
    assert all(torch.equal(before[k], v) for k, v in t.state_tensors().items())  # nothing changed


def test_data_inspect_marks_the_trained_spans(chat_model, capsys):
    model, data = chat_model
    assert cli_main(["data", "inspect", "--model-dir", str(model), "--data", str(data), "--n", "2",
                     "--seq-len", "64"]) == 0
    out = capsys.readouterr().out
    assert "[[" in out and "]]" in out and "trained tokens" in out
    assert out.count("--- sample") == 2
