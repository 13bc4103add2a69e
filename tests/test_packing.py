"""Packing whole documents into sequences (padding-free convention) and holding out eval data.

The token files here are synthetic: every token id is unique (its global index), so each label and
input token names the document and offset it came from, and the invariants are checked against
the documents directly: positions restart at 0 at each document, no label crosses a document
boundary, every label token of every kept document appears exactly once per epoch, and the order
is a pure function of the seed and the sample position."""

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from horizon import HorizonError
from horizon.data import DataConfig, DocumentDataset, TextTokenizer, eval_split, load_training_data, shipped_tokenizer_path
from horizon.data.cache import TokenFile
from horizon.data.packing import IGNORE_INDEX, best_fit_decreasing

PAD = 10 ** 6  # outside every synthetic token id, so padding is recognisable


def synth_files(seed, n_files=3, docs_per_file=40, max_len=50, masked=True):
    rng = np.random.default_rng(seed)
    files, base = [], 0
    for f in range(n_files):
        lens = rng.integers(1, max_len, size=docs_per_file)
        n = int(lens.sum())
        ids = np.arange(base, base + n, dtype=np.uint32)
        mask = (rng.random(n) < 0.6).astype(np.uint8) if masked else None
        docs = np.concatenate([[0], np.cumsum(lens)]).astype(np.uint64)
        files.append(TokenFile(Path(f"f{f}"), Path(f"f{f}.tokens"), ids, mask, docs))
        base += n
    return files


def doc_table(files):
    """[(first id, end id, mask over the document's tokens)] for every document."""
    out = []
    for f in files:
        d = f.docs.astype(np.int64)
        for a, b in zip(d[:-1], d[1:]):
            m = np.ones(b - a, dtype=bool) if f.mask is None else f.mask[a:b].astype(bool)
            out.append((int(f.ids[a]), int(f.ids[a]) + (b - a), m))
    return out


def expected_labels(files, S, policy):
    """The label tokens a full epoch must hold, each once: every trained token after the first of
    each document (truncate: within its first S tokens; drop: none of a document longer than S)."""
    want = []
    for first, end, m in doc_table(files):
        L = end - first
        if L > S and policy == "drop":
            continue
        upto = min(L, S) if policy == "truncate" else L
        want += [first + k for k in range(1, upto) if m[k]]
    return sorted(want)


def check_epoch(ds, files, S, policy):
    """Runs one epoch of ds.batch and checks every invariant; returns the label tokens seen."""
    docs = doc_table(files)
    starts = np.asarray([d[0] for d in docs])
    seen, real_total = [], 0
    n, bs = ds.n_sequences, 5
    for p in range(0, n, bs):
        b = ds.batch(p, min(bs, n - p))
        ids, labels, pos = (t.numpy() for t in b)
        assert ids.shape == labels.shape == pos.shape == (min(bs, n - p), S)
        real = 0
        for row_ids, row_labels, row_pos in zip(ids, labels, pos):
            seg = np.flatnonzero(row_pos == 0).tolist() + [S]
            assert seg[0] == 0
            for a, e in zip(seg[:-1], seg[1:]):
                assert (row_pos[a:e] == np.arange(e - a)).all()  # positions restart per document
                toks = row_ids[a:e]
                if toks[0] == PAD:  # the padding segment: last, no labels
                    assert e == S and (toks == PAD).all() and (row_labels[a:e] == IGNORE_INDEX).all()
                    continue
                real += e - a
                assert (np.diff(toks) == 1).all()  # one contiguous piece of one document
                d = int(np.searchsorted(starts, toks[0], side="right")) - 1
                first, end, m = docs[d]
                assert toks[-1] < end  # never past the document's end
                assert row_labels[a] == IGNORE_INDEX  # no target from the previous document
                lab = row_labels[a:e]
                trained = lab != IGNORE_INDEX
                assert (lab[trained] == toks[trained]).all()
                assert (trained == m[toks - first])[1:].all()
                seen += lab[trained].tolist()
        assert b.tokens == real and b.label_tokens == int((labels != IGNORE_INDEX).sum())
        real_total += real
    assert real_total == ds.n_tokens
    assert sorted(seen) == expected_labels(files, S, policy)  # each label token exactly once
    assert len(seen) == ds.n_label_tokens
    return seen


@pytest.mark.parametrize("packing", ["on", "off"])
@pytest.mark.parametrize("policy", ["split", "truncate", "drop"])
def test_batches_are_well_formed_and_cover_every_label_once(packing, policy):
    files = synth_files(0)
    S = 32  # shorter than many documents
    ds = DocumentDataset(files, S, seed=3, packing=packing, long_documents=policy, pad_id=PAD)
    check_epoch(ds, files, S, policy)
    c = ds.counts
    long_docs = sum(1 for first, end, _ in doc_table(files) if end - first > S)
    assert long_docs > 0
    assert c[{"split": "split", "truncate": "truncated", "drop": "dropped_long"}[policy]] == long_docs
    if packing == "off":
        assert ds.n_sequences == len(ds.pieces)
    else:
        assert ds.n_sequences < len(ds.pieces) and ds.summary()["fill"] > 0.9


def test_plain_text_documents_train_every_token_but_each_documents_first():
    files = synth_files(1, masked=False)
    ds = DocumentDataset(files, 16, seed=0, pad_id=PAD)
    seen = check_epoch(ds, files, 16, "split")
    n_docs = sum(f.n_docs for f in files)
    assert len(seen) == sum(len(f) for f in files) - n_docs


def test_documents_without_targets_are_dropped_and_counted():
    ids = np.arange(10, dtype=np.uint32)
    mask = np.asarray([1, 0, 0, 0, 1, 1, 0, 0, 0, 1], dtype=np.uint8)
    # docs: [0,1) one token; [1,4) nothing trained; [4,6) trained; [6,10) only its last trained
    docs = np.asarray([0, 1, 4, 6, 10], dtype=np.uint64)
    tf = TokenFile(Path("x"), Path("x"), ids, mask, docs)
    ds = DocumentDataset([tf], 8, seed=0, pad_id=PAD)
    assert ds.counts == {"documents": 4, "truncated": 0, "split": 0, "split_pieces": 0, "dropped_long": 0,
                         "dropped_untrained": 2, "dropped_untrained_pieces": 2}  # every counter: none starts off zero
    assert sorted(check_epoch(ds, [tf], 8, "split")) == [5, 9]
    with pytest.raises(HorizonError, match="has no document to train on .*2 with no trained tokens"):
        DocumentDataset([tf], 8, seed=0, keep=np.asarray([True, True, False, False]))


def test_split_pieces_overlap_by_one_token_so_no_target_is_lost():
    ids = np.arange(20, dtype=np.uint32)
    tf = TokenFile(Path("x"), Path("x"), ids, None, np.asarray([0, 20], dtype=np.uint64))
    ds = DocumentDataset([tf], 8, seed=0, long_documents="split", packing="off", pad_id=PAD)
    assert [(int(a), int(n)) for a, n in zip(ds.pieces.start, ds.pieces.length)] == [(0, 8), (7, 8), (14, 6)]
    assert sorted(check_epoch(ds, [tf], 8, "split")) == list(range(1, 20))


def test_order_is_a_pure_function_of_seed_and_position():
    files = synth_files(2)
    a = DocumentDataset(files, 40, seed=11, pad_id=PAD)
    b = DocumentDataset(files, 40, seed=11, pad_id=PAD)
    n = a.n_sequences
    # resuming at any position gives the same batches as running through
    run = [a.batch(p, 4) for p in range(0, 3 * n, 4)]
    for k, p in enumerate(range(0, 3 * n, 4)):
        got = b.batch(p, 4)
        for x, y in zip(got, run[k]):
            assert (x == y).all()
    # each epoch visits every sequence once, in a different order
    for epoch in range(3):
        order = [a.sequence_of(epoch * n + k) for k in range(n)]
        assert sorted(order) == list(range(n))
    assert [a.sequence_of(k) for k in range(n)] != [a.sequence_of(n + k) for k in range(n)]
    c = DocumentDataset(files, 40, seed=12, pad_id=PAD)
    assert [c.sequence_of(k) for k in range(n)] != [a.sequence_of(k) for k in range(n)]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_best_fit_decreasing_packs_every_item_once_within_capacity(seed):
    rng = np.random.default_rng(seed)
    S = 100
    lengths = np.concatenate([rng.integers(1, S + 1, size=300), rng.integers(1, 8, size=300)])
    ptr, items = best_fit_decreasing(lengths, S, seed)
    assert sorted(items.tolist()) == list(range(lengths.shape[0]))
    loads = [int(lengths[items[a:b]].sum()) for a, b in zip(ptr[:-1], ptr[1:])]
    assert max(loads) <= S and min(loads) > 0
    # First/best-fit decreasing uses at most 11/9 OPT + 6/9 bins, and OPT >= total / S.
    assert len(loads) <= math.floor(11 / 9 * math.ceil(lengths.sum() / S) + 6 / 9)
    again = best_fit_decreasing(lengths, S, seed)
    assert (again[0] == ptr).all() and (again[1] == items).all()


# --------------------------------------------------------------------------- eval data
def test_eval_split_is_by_document_seed_stable_and_independent_of_other_data():
    files = synth_files(4, n_files=2, docs_per_file=1000, max_len=20)
    held = eval_split(files, 0.2, seed=5)
    assert 0.15 < held.mean() < 0.25
    assert (eval_split(files, 0.2, seed=5) == held).all()
    assert (eval_split(files, 0.2, seed=6) != held).any()
    # A document's side depends on the document only: adding data leaves it where it was.
    more = files + synth_files(9, n_files=1, docs_per_file=300, max_len=20)
    assert (eval_split(more, 0.2, seed=5)[: held.shape[0]] == held).all()
    assert (eval_split(files[:1], 0.2, seed=5) == held[:1000]).all()


def test_eval_split_keeps_both_sides_non_empty():
    files = synth_files(5, n_files=1, docs_per_file=2, max_len=10)
    for f in (0.001, 0.999):
        held = eval_split(files, f, seed=0)
        assert held.sum() == 1
    one = synth_files(5, n_files=1, docs_per_file=1, max_len=10)
    with pytest.raises(HorizonError, match="--eval-fraction needs at least 2 documents"):
        eval_split(one, 0.5, seed=0)


def test_training_data_with_eval_fraction_holds_out_whole_documents(tmp_path):
    import json

    tok = TextTokenizer(shipped_tokenizer_path())
    docs = [f"document number {i} says the fox ran {i % 7} times." for i in range(60)]
    f = tmp_path / "d.jsonl"
    f.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    cfg = DataConfig(data=[str(f)], eval_fraction=0.25)
    td = load_training_data(cfg, tok, seq_len=64, seed=1)
    tr, ev = td.train, td.eval
    assert ev is not None and ev.counts["documents"] + tr.counts["documents"] == 60
    assert set(tr.pieces.doc.tolist()).isdisjoint(ev.pieces.doc.tolist())
    assert set(tr.pieces.doc.tolist()) | set(ev.pieces.doc.tolist()) == set(range(60))
    # fixed eval batches: every eval sequence once, the same every time
    first = [tuple(t.clone() for t in b) for b in td.eval_batches(3)]
    second = list(td.eval_batches(3))
    assert sum(b[0].shape[0] for b in first) == ev.n_sequences
    for x, y in zip(first, second):
        assert all((p == q).all() for p, q in zip(x, y))
    # one sequence a batch is a batch size like any other: every sequence once, in the same order
    ones = [tuple(b) for b in td.eval_batches(1)]
    assert len(ones) == ev.n_sequences and all(b[0].shape[0] == 1 for b in ones)
    assert torch.equal(torch.cat([b[0] for b in ones]), torch.cat([b[0] for b in first]))
    for bad in (0, -1, True, 2.5, "3"):
        with pytest.raises(HorizonError, match="batch size must be an integer >= 1"):
            next(iter(td.eval_batches(bad)))
    texts = [tok.decode(row.tolist()) for b in first for row in b[0]]
    assert all(any(docs[i] in t for t in texts) for i in ev.pieces.doc.tolist())
    # the same seed holds out the same documents; the report says what was read
    again = load_training_data(cfg, tok, seq_len=64, seed=1)
    assert again.eval.pieces.doc.tolist() == ev.pieces.doc.tolist()
    assert [line.split(":")[0] for line in td.report_lines()] == ["training data", "eval data"]


def test_no_eval_data_means_no_eval_batches(tmp_path):
    tok = TextTokenizer(shipped_tokenizer_path())
    f = tmp_path / "a.txt"
    f.write_text("the quick brown fox jumps over the lazy dog\n" * 20)
    td = load_training_data(DataConfig(data=[str(f)]), tok, seq_len=32, seed=0)
    assert td.eval is None and list(td.eval_batches(4)) == []


def test_each_epoch_visits_the_sequences_in_its_own_order():
    from horizon.data.packing import DocumentDataset

    ds = DocumentDataset(synth_files(3), seq_len=64, seed=5)
    orders = [tuple(int(x) for x in ds.permutation(e)) for e in range(4)]
    assert len(set(orders)) == 4  # drawn from (seed, epoch), not one order repeated
    assert all(sorted(o) == list(range(ds.n_sequences)) for o in orders)
