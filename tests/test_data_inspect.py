"""`inspect_data`: the first samples as the model sees them, trained spans marked, and the counts.
Reference: the texts and the trained parts written out by hand, and the dataset's own batches."""

import io
import json

import pytest

from horizon import HorizonError

from horizon.data import DataConfig, TextTokenizer, inspect_data, load_training_data, shipped_tokenizer_path


@pytest.fixture(scope="module")
def tok():
    return TextTokenizer(shipped_tokenizer_path())


def _data(tmp_path):
    f = tmp_path / "d.jsonl"
    recs = [
        {"messages": [{"role": "user", "content": "What is two plus two?"}, {"role": "assistant", "content": "Four."}]},
        {"prompt": "The sky is", "completion": " blue."},
        {"text": "the fox ran to the river"},
        {"text": " ".join(["word"] * 200)},  # longer than the sequence: truncated
        {"messages": [{"role": "user", "content": "hi"}]},  # nothing to train on: dropped
        {"text": 7},  # a bad record, skipped
    ]
    f.write_text("".join(json.dumps(r) + "\n" for r in recs))
    return f


def test_inspect_marks_trained_text_and_counts(tmp_path, tok):
    f = _data(tmp_path)
    cfg = DataConfig(data=[str(f)], long_documents="truncate", skip_bad_records=True)
    out = inspect_data(cfg, tok, seq_len=48, n=10, color=False, fallback_dir=tmp_path / "c")
    lines = out.splitlines()
    assert lines[0] == "sources: 1 file(s), 6 records, 1 bad records skipped"
    assert lines[1].startswith("training: documents 5, pieces 4, ")
    assert "truncated 1" in lines[1] and "+ 1 (no trained tokens)" in lines[1]
    assert lines[2].startswith(f"bad record: {f}:6: field 'text': must be a string")
    # Trained spans in double brackets: the assistant's reply, the completion, text after its first token.
    assert "[[Four.<|end|>]]" in out
    assert "What is two plus two?<|end|>" in out and "[[What" not in out
    assert "The sky is[[ blue.<|endoftext|>]]" in out
    ids = tok.encode_many(["the fox ran to the river"])[0]
    assert f"{tok.decode(ids[:1])}[[{tok.decode(ids[1:])}<|endoftext|>]]" in out
    td = load_training_data(cfg, tok, seq_len=48, seed=0, fallback_dir=tmp_path / "c")
    assert out.count("--- sample ") == td.train.n_sequences
    # what the header of each sample says agrees with the batch the run gets
    for p in range(td.train.n_sequences):
        ids, labels, pos = td.train.batch(p, 1)
        real = int(td.train.sequence(td.train.sequence_of(p))[3])
        head = f"--- sample {p} (sequence {td.train.sequence_of(p)}): {int((pos[0, :real] == 0).sum())} document(s),"
        assert head in out
        assert f"{int((labels != -100).sum())} trained, {48 - real} padding ---" in out


def test_inspect_uses_ansi_on_a_terminal(tmp_path, tok):
    class Tty(io.StringIO):
        def isatty(self):
            return True

    f = _data(tmp_path)
    cfg = DataConfig(data=[str(f)], skip_bad_records=True)
    out = inspect_data(cfg, tok, seq_len=64, n=2, stream=Tty(), fallback_dir=tmp_path / "c")
    assert "\x1b[1;32m" in out and "[[" not in out
    plain = inspect_data(cfg, tok, seq_len=64, n=2, stream=io.StringIO(), fallback_dir=tmp_path / "c")
    assert "\x1b[" not in plain and "[[" in plain


def test_inspect_with_a_model_directorys_chat_template(tmp_path):
    pytest.importorskip("transformers")
    from test_chat_data import CHATML_GEN, CONVERSATIONS, make_model_dir

    from horizon.data.inspect import tokenizer_for

    d = make_model_dir(tmp_path / "model", CHATML_GEN)
    (d / "config.json").write_text(json.dumps({"eos_token_id": 2}))
    f = tmp_path / "c.jsonl"
    f.write_text("".join(json.dumps({"messages": c}) + "\n" for c in CONVERSATIONS[:2]))
    tok = tokenizer_for(model_dir=d)
    assert tok.eos_id == 2 and tok.has_chat_template
    out = inspect_data(DataConfig(data=[str(f)]), tok, seq_len=256, n=1, color=False, fallback_dir=tmp_path / "c")
    assert "<|im_start|>assistant\n[[Four.<|im_end|>]]\n" in out
    assert "<|im_start|>assistant\n[[Blue.<|im_end|>]]\n<|im_start|>user\nAnother?<|im_end|>\n" in out
    with pytest.raises(HorizonError, match="has no tokenizer.json"):
        tokenizer_for(model_dir=tmp_path)
