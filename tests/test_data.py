"""Data pipeline: text / JSONL / chat JSONL reading, the memory-mapped token cache, packing and
deterministic shuffling, the shipped corpus and tokenizer. References: the `tokenizers` library
called directly, and the windows cut from the token stream by hand."""

import json

import numpy as np
import pytest

from horizon import HorizonError
from horizon.data import (
    IGNORE_INDEX, PackedDataset, TextTokenizer, load_dataset, shipped_corpus_path, shipped_tokenizer_path,
    token_file,
)
from horizon.data import cache as cache_mod


@pytest.fixture(scope="module")
def tok():
    return TextTokenizer(shipped_tokenizer_path())


def _ref_ids(tok, text):
    from tokenizers import Tokenizer

    t = Tokenizer.from_file(str(shipped_tokenizer_path()))
    return t.encode(text, add_special_tokens=False).ids


def test_shipped_tokenizer_round_trips_the_corpus(tok):
    text = shipped_corpus_path().read_text(encoding="utf-8")
    assert 50_000 < len(text.encode()) < 400_000
    assert tok.vocab_size == 512
    ids = _ref_ids(tok, text)
    assert tok.decode(ids) == text
    # Byte-level: any UTF-8 string survives, not only the corpus' alphabet.
    odd = "naïve café — 漢字 🙂\ttab"
    assert tok.decode(_ref_ids(tok, odd)) == odd
    for special in ("<|endoftext|>", "<|user|>", "<|assistant|>", "<|end|>"):
        assert tok.tok.token_to_id(special) is not None
    assert tok.eos_id == tok.tok.token_to_id("<|endoftext|>")


def test_shipped_assets_rebuild_identically(tmp_path):
    from horizon.assets import make_assets

    assert make_assets.build_corpus() == shipped_corpus_path().read_text(encoding="utf-8")
    make_assets.build_tokenizer(shipped_corpus_path(), tmp_path / "tokenizer.json")
    assert json.loads((tmp_path / "tokenizer.json").read_text()) == json.loads(shipped_tokenizer_path().read_text())


def test_text_file_tokens_equal_direct_encoding(tmp_path, tok):
    text = "Hello world.\nA second line of plain text.\n\nAnd a third paragraph."
    f = tmp_path / "a.txt"
    f.write_text(text)
    tf = token_file(f, tok)
    assert tf.mask is None
    assert tf.ids.tolist() == _ref_ids(tok, text) + [tok.eos_id]
    assert f.with_name("a.txt.tokens").is_file() and f.with_name("a.txt.tokens.json").is_file()


def test_text_file_read_in_pieces_still_matches(tmp_path, tok, monkeypatch):
    from horizon.data import sources

    # Pieces cut at line ends; byte-level BPE never merges across a newline + word start here.
    monkeypatch.setattr(sources, "TEXT_CHUNK_CHARS", 64)
    lines = [f"line {i} says the fox ran to the river." for i in range(40)]
    text = "\n".join(lines) + "\n"
    f = tmp_path / "b.txt"
    f.write_text(text)
    ids = token_file(f, tok).ids.tolist()
    assert ids[-1] == tok.eos_id and ids.count(tok.eos_id) == 1
    assert tok.decode(ids[:-1]) == text


def test_jsonl_text_documents_are_separated_by_eos(tmp_path, tok):
    docs = ["first document", "second one, longer than the first", "third"]
    f = tmp_path / "d.jsonl"
    f.write_text("\n".join(json.dumps({"text": d}) for d in docs) + "\n\n")
    want = []
    for d in docs:
        want += _ref_ids(tok, d) + [tok.eos_id]
    assert token_file(f, tok).ids.tolist() == want


def test_chat_jsonl_masks_everything_but_assistant_turns(tmp_path, tok):
    convs = [
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is two plus two?"},
         {"role": "assistant", "content": "Four."}],
        [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Blue."},
         {"role": "user", "content": "Another?"}, {"role": "assistant", "content": "Green."}],
    ]
    f = tmp_path / "chat.jsonl"
    f.write_text("".join(json.dumps({"messages": c}) + "\n" for c in convs))
    tf = token_file(f, tok)
    assert tf.mask is not None and tf.mask.shape == tf.ids.shape
    # Independent reconstruction: encode each rendered piece with tokenizers directly.
    want_ids, want_mask = [], []
    for c in convs:
        for m in c:
            for piece, trained in ((f"<|{m['role']}|>\n", 0), (m["content"] + "<|end|>", int(m["role"] == "assistant")),
                                   ("\n", 0)):
                e = _ref_ids(tok, piece)
                want_ids += e
                want_mask += [trained] * len(e)
        want_ids.append(tok.eos_id)
        want_mask.append(0)  # a chat ends with the assistant's end-of-turn; the separator is context
    assert tf.ids.tolist() == want_ids
    assert tf.mask.tolist() == want_mask
    trained_text = tok.decode([i for i, m in zip(want_ids, want_mask) if m])
    assert trained_text == "Four.<|end|>Blue.<|end|>Green.<|end|>"

    ds = PackedDataset([tf], seq_len=8, seed=0)
    for pos in range(ds.n_windows):
        ids, labels = ds.sample(pos)
        w = int(ds.permutation(0)[pos])
        ref_ids = np.asarray(want_ids[w * 8:(w + 1) * 8])
        ref_mask = np.asarray(want_mask[w * 8:(w + 1) * 8], dtype=bool)
        assert (ids == ref_ids).all()
        assert (labels == np.where(ref_mask, ref_ids, IGNORE_INDEX)).all()
    # What the trainer gets: the batch carries these labels (None would train every token).
    ids_b, labels_b = ds.batch(0, 2)
    assert labels_b is not None and (labels_b.numpy() == np.stack([ds.sample(0)[1], ds.sample(1)[1]])).all()
    assert (labels_b == IGNORE_INDEX).any()


def test_cache_is_reused_and_rebuilt_when_data_or_tokenizer_change(tmp_path, tok, monkeypatch):
    f = tmp_path / "c.txt"
    f.write_text("the cat sat on the mat\n")
    first = token_file(f, tok).ids.tolist()

    def boom(*a, **k):
        raise AssertionError("re-tokenised although the cache is current")

    with monkeypatch.context() as m:
        m.setattr(cache_mod, "_tokenise", boom)
        assert token_file(f, tok).ids.tolist() == first

    f.write_text("the dog sat on the log\n")
    second = token_file(f, tok).ids.tolist()
    assert second == _ref_ids(tok, "the dog sat on the log\n") + [tok.eos_id]
    assert second != first

    # Another tokenizer file (different bytes) must not reuse the cache.
    other = tmp_path / "tokenizer.json"
    data = json.loads(shipped_tokenizer_path().read_text())
    data["added_tokens"].append({"id": 512, "content": "<|extra|>", "single_word": False, "lstrip": False,
                                 "rstrip": False, "normalized": False, "special": True})
    other.write_text(json.dumps(data))
    tok2 = TextTokenizer(other)
    header = json.loads(f.with_name("c.txt.tokens.json").read_text())
    token_file(f, tok2)
    assert json.loads(f.with_name("c.txt.tokens.json").read_text())["tokenizer_sha256"] != header["tokenizer_sha256"]


def test_cache_falls_back_when_data_dir_is_not_writable(tmp_path, tok, monkeypatch):
    data_dir = tmp_path / "ro"
    data_dir.mkdir()
    f = data_dir / "t.txt"
    f.write_text("read only data\n")
    real_store = cache_mod._store

    def store(tokens, *a):
        if tokens.parent == data_dir:
            raise PermissionError(13, "Permission denied", str(tokens))
        return real_store(tokens, *a)

    monkeypatch.setattr(cache_mod, "_store", store)
    fallback = tmp_path / "run" / "data-cache"
    tf = token_file(f, tok, fallback_dir=fallback)
    assert tf.path.parent == fallback
    assert not list(data_dir.glob("*.tokens*"))
    assert tf.ids.tolist() == _ref_ids(tok, "read only data\n") + [tok.eos_id]


def test_packing_and_shuffle_are_deterministic_permutations(tmp_path, tok):
    files = []
    for i in range(3):
        f = tmp_path / f"p{i}.txt"
        f.write_text(" ".join(f"word{i}_{j}" for j in range(60)) + "\n")
        files.append(token_file(f, tok))
    stream = np.concatenate([np.asarray(t.ids, dtype=np.int64) for t in files])
    S = 16
    ds = PackedDataset(files, seq_len=S, seed=7)
    n = len(stream) // S
    assert ds.n_windows == n
    windows = {tuple(stream[w * S:(w + 1) * S]) for w in range(n)}
    for epoch in range(2):
        seen = [tuple(ds.sample(epoch * n + k)[0]) for k in range(n)]
        assert set(seen) == windows and len(seen) == n  # every window exactly once per epoch
    again = PackedDataset(files, seq_len=S, seed=7)
    assert all((again.sample(k)[0] == ds.sample(k)[0]).all() for k in range(2 * n))
    other = PackedDataset(files, seq_len=S, seed=8)
    assert [int(x) for x in other.permutation(0)] != [int(x) for x in ds.permutation(0)]
    # Each epoch its own order (drawn from (seed, epoch)), not the first one repeated.
    orders = {tuple(int(x) for x in ds.permutation(e)) for e in range(4)}
    assert len(orders) == 4
    ids, labels = ds.batch(3, 4)
    assert tuple(ids.shape) == (4, S) and labels is None
    assert (ids[1].numpy() == ds.sample(4)[0]).all()


@pytest.mark.parametrize(
    "name,content,needle",
    [
        ("empty.txt", "", "is empty"),
        ("bad.jsonl", '{"text": "ok"}\n{not json\n', "bad.jsonl:2: invalid JSON"),
        ("nofield.jsonl", '{"body": "x"}\n', "neither 'text' nor 'messages'"),
        ("role.jsonl", '{"messages": [{"role": "robot", "content": "hi"}]}\n', "unknown role 'robot'"),
        ("noassist.jsonl", '{"messages": [{"role": "user", "content": "hi"}]}\n', "no trained tokens"),
        ("short.txt", "hi\n", "fewer than one sequence"),
    ],
)
def test_bad_data_raises_one_clear_error(tmp_path, tok, name, content, needle):
    f = tmp_path / name
    f.write_text(content)
    with pytest.raises(HorizonError) as e:
        load_dataset(str(f), tok, seq_len=64, seed=0)
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_non_utf8_and_missing_paths(tmp_path, tok):
    f = tmp_path / "bin.txt"
    f.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(HorizonError, match="not UTF-8"):
        load_dataset(str(f), tok, seq_len=4, seed=0)
    with pytest.raises(HorizonError, match="does not exist"):
        load_dataset(str(tmp_path / "nope.txt"), tok, seq_len=4, seed=0)
    (tmp_path / "emptydir").mkdir()
    with pytest.raises(HorizonError, match="no .txt or .jsonl"):
        load_dataset(str(tmp_path / "emptydir"), tok, seq_len=4, seed=0)


def test_a_directory_is_read_with_its_own_caches_beside_it(tmp_path, tok):
    (tmp_path / "a.txt").write_text("alpha beta gamma\n")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.jsonl").write_text(json.dumps({"text": "delta epsilon"}) + "\n")
    (tmp_path / "notes.json").write_text("{}")  # not data when scanning a directory
    want = _ref_ids(tok, "alpha beta gamma\n") + [tok.eos_id] + _ref_ids(tok, "delta epsilon") + [tok.eos_id]
    for _ in range(2):  # the second time the cache files sit in the directory
        ds = load_dataset(str(tmp_path), tok, seq_len=2, seed=0)
        assert [len(f) for f in ds.files] == [len(want) - len(_ref_ids(tok, "delta epsilon")) - 1,
                                              len(_ref_ids(tok, "delta epsilon")) + 1]
        assert np.concatenate([f.ids for f in ds.files]).tolist() == want
