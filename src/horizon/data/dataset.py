"""A run's data: training documents (and held-out evaluation documents) as datasets of
fixed-length sequences, shuffled deterministically by seed.

`load_training_data` is the run's entry point: it reads the `DataConfig`'s sources through the token
cache, holds out `--eval-fraction` of the documents (or reads `--eval-data`) and packs both into
`DocumentDataset`s (see packing.py: whole documents, positions restarting per document).

`PackedDataset` / `load_dataset` are the earlier layout, kept for the callers that still use it:
all files' tokens form one stream (documents separated by end-of-text) cut into windows of
`seq_len` tokens. In both, epoch `e` visits the sequences in the order of a permutation drawn from
`(seed, e)`, so the whole sample order is a pure function of the seed and the data: the data
position of a run is a single integer (samples consumed), which is what a checkpoint stores.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import numpy as np

from ..errors import HorizonError
from .cache import TokenFile, token_file
from .config import DataConfig
from .packing import IGNORE_INDEX, DocumentDataset, documents_of
from .sources import data_files
from .tokenizer import TextTokenizer, shipped_corpus_path


class PackedDataset:
    def __init__(self, files: list[TokenFile], seq_len: int, seed: int):
        if not isinstance(seq_len, int) or seq_len < 2:
            raise HorizonError(f"sequence length must be an integer >= 2, got {seq_len!r}")
        self.files = files
        self.seq_len = seq_len
        self.seed = int(seed)
        sizes = np.array([len(f) for f in files], dtype=np.int64)
        self.offsets = np.concatenate([[0], np.cumsum(sizes)])
        self.n_tokens = int(self.offsets[-1])
        self.n_windows = self.n_tokens // seq_len
        self.has_mask = any(f.mask is not None for f in files)
        if self.has_mask and not any(
            (f.mask is None and len(f) > 0) or (f.mask is not None and bool(np.any(f.mask))) for f in files
        ):
            raise HorizonError("the data has no trained tokens (chat data without assistant turns?)")
        if self.n_windows == 0:
            raise HorizonError(
                f"the data has {self.n_tokens} tokens, fewer than one sequence of --seq-len {seq_len}"
            )
        self._perm_epoch = -1
        self._perm = None

    def _slice(self, start: int, end: int) -> tuple[np.ndarray, np.ndarray]:
        ids = np.empty(end - start, dtype=np.int64)
        mask = np.ones(end - start, dtype=bool)
        i = int(np.searchsorted(self.offsets, start, side="right")) - 1
        pos = start
        while pos < end:
            f = self.files[i]
            lo = pos - int(self.offsets[i])
            hi = min(len(f), end - int(self.offsets[i]))
            n = hi - lo
            ids[pos - start: pos - start + n] = f.ids[lo:hi]
            if f.mask is not None:
                mask[pos - start: pos - start + n] = f.mask[lo:hi] != 0
            pos += n
            i += 1
        return ids, mask

    def permutation(self, epoch: int) -> np.ndarray:
        if epoch != self._perm_epoch:
            self._perm = np.random.default_rng([self.seed, epoch]).permutation(self.n_windows)
            self._perm_epoch = epoch
        return self._perm

    def sample(self, position: int) -> tuple[np.ndarray, np.ndarray]:
        """The `position`-th sample of the run (counting across epochs): (input_ids, labels)."""
        epoch, k = divmod(int(position), self.n_windows)
        w = int(self.permutation(epoch)[k])
        ids, mask = self._slice(w * self.seq_len, (w + 1) * self.seq_len)
        labels = np.where(mask, ids, IGNORE_INDEX)
        return ids, labels

    def batch(self, position: int, batch_size: int):
        """Samples `position .. position+batch_size-1` as two int64 torch tensors [B, S]; labels
        are None when every token is trained (plain text), as the trainer then uses the inputs."""
        import torch

        rows = [self.sample(position + j) for j in range(batch_size)]
        ids = torch.from_numpy(np.stack([r[0] for r in rows]))
        if not self.has_mask:
            return ids, None
        labels = torch.from_numpy(np.stack([r[1] for r in rows]))
        return ids, labels


def load_dataset(paths, tokenizer: TextTokenizer, seq_len: int, seed: int, fallback_dir=None, log=None) -> PackedDataset:
    files = [token_file(p, tokenizer, fallback_dir=fallback_dir, log=log) for p in data_files(paths)]
    return PackedDataset(files, seq_len, seed)


def eval_split(files: list[TokenFile], fraction: float, seed: int) -> np.ndarray:
    """Which documents are held out: a boolean array over all documents of `files`. A document is
    held out when a keyed hash (key: the seed) of its tokens and mask falls below `fraction`, so the
    choice depends on the document alone: stable under the seed, and unchanged for a document when
    other data is added or removed (identical documents land on the same side). At least one
    document goes to each side."""
    f_idx, starts, ends = documents_of(files)
    n = int(f_idx.shape[0])
    if n < 2:
        raise HorizonError(
            f"--eval-fraction needs at least 2 documents to hold some out, the data has {n}"
            " (a plain-text file is one document); pass --eval-data instead"
        )
    key = int(seed).to_bytes(8, "little", signed=True)
    u = np.empty(n, dtype=np.float64)
    for i in range(n):
        f = files[int(f_idx[i])]
        a, b = int(starts[i]), int(ends[i])
        h = hashlib.blake2b(digest_size=8, key=key)
        h.update(np.ascontiguousarray(f.ids[a:b]).astype(np.uint32).tobytes())
        if f.mask is not None:
            h.update(np.ascontiguousarray(f.mask[a:b]).tobytes())
        u[i] = int.from_bytes(h.digest(), "little") / 2.0 ** 64
    held = u < fraction
    if not held.any():
        held[int(np.argmin(u))] = True
    if held.all():
        held[int(np.argmax(u))] = False
    return held


@dataclass
class TrainingData:
    """The datasets of a run and what reading them counted."""

    train: DocumentDataset
    eval: DocumentDataset | None
    config: DataConfig
    sources: list = field(default_factory=list)        # TokenFiles of --data
    eval_sources: list = field(default_factory=list)   # TokenFiles of --eval-data (empty with --eval-fraction)

    @property
    def bad_records(self) -> int:
        return sum(f.bad_records for f in self.sources + self.eval_sources)

    @property
    def records(self) -> int:
        return sum(f.n_records for f in self.sources + self.eval_sources)

    def bad_examples(self) -> list[str]:
        return [line for f in self.sources + self.eval_sources for line in f.bad_examples]

    def eval_batches(self, batch_size: int):
        """The fixed evaluation batches (every held-out sequence once, same order every time);
        nothing when the run has no eval data."""
        if self.eval is None:
            return iter(())
        return self.eval.batches_in_order(batch_size)

    def report_lines(self) -> list[str]:
        """What a run prints about its data: counts of documents, tokens and what was changed."""
        out = []
        for ds in (self.train, self.eval):
            if ds is None:
                continue
            c = ds.summary()
            extra = []
            if c["truncated"]:
                extra.append(f"{c['truncated']} truncated")
            if c["split"]:
                extra.append(f"{c['split']} split into {c['split_pieces']} pieces")
            if c["dropped_long"]:
                extra.append(f"{c['dropped_long']} dropped as longer than --seq-len")
            if c["dropped_untrained"]:
                extra.append(f"{c['dropped_untrained']} dropped with no trained tokens")
            out.append(
                f"{ds.name} data: {c['documents']} documents -> {c['sequences']} sequences of {c['seq_len']}"
                f" ({'packed' if c['packing'] == 'on' else 'padded'}, {100 * c['fill']:.1f}% filled),"
                f" {c['tokens']} tokens, {c['label_tokens']} trained"
                + (f"; {', '.join(extra)}" if extra else "")
            )
        if self.bad_records:
            ex = self.bad_examples()
            out.append(f"skipped {self.bad_records} bad records of {self.records} (--skip-bad-records)"
                       + (f"; first: {ex[0]}" if ex else ""))
        return out


def _read_sources(paths, tok, cfg: DataConfig, purpose: str, fallback_dir, log) -> list[TokenFile]:
    return [
        token_file(p, tok, fallback_dir=fallback_dir, log=log, field_map=cfg.field_map,
                   skip_bad_records=cfg.skip_bad_records, purpose=purpose)
        for p in data_files(paths)
    ]


def load_training_data(cfg: DataConfig, tokenizer: TextTokenizer, seq_len: int, seed: int, *,
                       fallback_dir=None, log=None) -> TrainingData:
    """Reads `cfg.data` (default: the shipped corpus) and the eval data of `cfg` through the token
    cache and packs them into sequences of `seq_len`. `tokenizer` should carry `cfg.chat_template`
    (see `load_tokenizer`). Bad records raise one line, or are counted with `skip_bad_records`."""
    paths = cfg.data or [str(shipped_corpus_path())]
    files = _read_sources(paths, tokenizer, cfg, "train", fallback_dir, log)
    common = dict(packing=cfg.packing, long_documents=cfg.long_documents, pad_id=tokenizer.pad_id)
    eval_files: list[TokenFile] = []
    eval_ds = None
    keep = None
    if cfg.eval_fraction is not None:
        held = eval_split(files, cfg.eval_fraction, seed)
        keep = ~held
        eval_ds = DocumentDataset(files, seq_len, seed, keep=held, shuffle=False, name="eval", **common)
    elif cfg.eval_data:
        eval_files = _read_sources(cfg.eval_data, tokenizer, cfg, "eval", fallback_dir, log)
        eval_ds = DocumentDataset(eval_files, seq_len, seed, shuffle=False, name="eval", **common)
    train = DocumentDataset(files, seq_len, seed, keep=keep, name="training", **common)
    return TrainingData(train, eval_ds, cfg, files, eval_files)


__all__ = ["PackedDataset", "load_dataset", "IGNORE_INDEX", "TrainingData", "load_training_data", "eval_split",
           "DocumentDataset"]
