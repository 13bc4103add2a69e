"""Whole documents into fixed-length sequences, in the padding-free convention.

A document no longer than `seq_len` is one piece. A longer one follows `--long-documents`:
`truncate` keeps its first `seq_len` tokens, `drop` drops it, `split` cuts it into pieces of
`seq_len` tokens that overlap by one token (a piece's first token, never a target, is the previous
piece's last, which was), so every token of the document after its first is a target exactly once.
A piece with no trained target is dropped (counted).

Packing on: the pieces go into sequences by best-fit decreasing (ties broken by the seed), once;
packing off: one piece per sequence. The rest of a sequence is padding. Each sample is
`input_ids`, `labels` (the token where trained, else -100; always -100 at the first token of each
piece, so no target crosses a document boundary, and on padding) and `position_ids` (0, 1, ... per
piece, restarting at each piece: a position id of 0 starts a document; padding is a segment of its
own). Epoch `e` visits the sequences in the order of a permutation drawn from `(seed, e)`, so the
data position of a run is a single integer: samples consumed.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import HorizonError
from .cache import TokenFile

IGNORE_INDEX = -100
_PACK_SALT = 0x5EC5  # the packing's tie-breaks draw from (seed, salt); epochs from (seed, epoch)


@dataclass
class Pieces:
    """The pieces of the kept documents: file, start offset, length, and the document they come from."""

    file: np.ndarray
    start: np.ndarray
    length: np.ndarray
    doc: np.ndarray       # global document index (over all files, in order)
    labels: np.ndarray    # targets in the piece

    def __len__(self) -> int:
        return int(self.length.shape[0])


def documents_of(files: list[TokenFile]):
    """(file index, start, end) arrays of every document of `files`, in order."""
    f_idx, starts, ends = [], [], []
    for i, f in enumerate(files):
        if f.docs is None:
            d = np.asarray([0, len(f)], dtype=np.int64)
        else:
            d = np.asarray(f.docs, dtype=np.int64)
        f_idx.append(np.full(d.shape[0] - 1, i, dtype=np.int64))
        starts.append(d[:-1])
        ends.append(d[1:])
    if not f_idx:
        z = np.zeros(0, dtype=np.int64)
        return z, z, z
    return np.concatenate(f_idx), np.concatenate(starts), np.concatenate(ends)


def make_pieces(files: list[TokenFile], seq_len: int, long_documents: str, keep: np.ndarray | None = None):
    """The pieces of the documents selected by `keep` (a boolean array over all documents; None:
    all) under the long-document policy. Returns (Pieces, counts)."""
    f_idx, starts, ends = documents_of(files)
    lens = ends - starts
    sel = np.ones(lens.shape[0], dtype=bool) if keep is None else np.asarray(keep, dtype=bool)
    counts = {"documents": int(sel.sum()), "truncated": 0, "split": 0, "split_pieces": 0, "dropped_long": 0,
              "dropped_untrained": 0}
    S = seq_len
    pf, ps, pl, pd = [], [], [], []  # per group of pieces: file, start, length, document

    def add(doc, start, length):
        pf.append(f_idx[doc])
        ps.append(start)
        pl.append(length)
        pd.append(doc)

    idx = np.nonzero(sel & (lens <= S) & (lens > 0))[0]
    add(idx, starts[idx], lens[idx])
    long_idx = np.nonzero(sel & (lens > S))[0]
    if long_documents == "truncate":
        add(long_idx, starts[long_idx], np.full(long_idx.shape[0], S))
        counts["truncated"] = int(long_idx.shape[0])
    elif long_documents == "split":
        n = 1 + -(-(lens[long_idx] - S) // (S - 1))  # pieces at a stride of S - 1 until the end
        doc = np.repeat(long_idx, n)
        off = (np.arange(int(n.sum())) - np.repeat(np.cumsum(n) - n, n)) * (S - 1)
        add(doc, starts[doc] + off, np.minimum(S, lens[doc] - off))
        counts["split"] = int(long_idx.shape[0])
        counts["split_pieces"] = int(n.sum())
    elif long_documents == "drop":
        counts["dropped_long"] = int(long_idx.shape[0])
    else:
        raise HorizonError(f"--long-documents must be one of truncate, split, drop, got {long_documents!r}")
    file_a = np.concatenate(pf).astype(np.int64)
    start_a = np.concatenate(ps).astype(np.int64)
    len_a = np.concatenate(pl).astype(np.int64)
    doc_a = np.concatenate(pd).astype(np.int64)
    # Restore document order (long documents' pieces were appended after the short ones).
    order = np.lexsort((start_a, doc_a))
    file_a, start_a, len_a, doc_a = file_a[order], start_a[order], len_a[order], doc_a[order]
    # Targets per piece: trained tokens after the piece's first.
    labels = np.zeros(len_a.shape[0], dtype=np.int64)
    for i, f in enumerate(files):
        on = file_a == i
        if not on.any():
            continue
        if f.mask is None:
            labels[on] = len_a[on] - 1
        else:
            labels[on] = _range_sums(f.mask, start_a[on] + 1, start_a[on] + len_a[on])
    useful = labels > 0
    dropped = ~useful
    counts["dropped_untrained"] = int(len(np.unique(doc_a[dropped & ~np.isin(doc_a, doc_a[useful])])))
    p = Pieces(file_a[useful], start_a[useful], len_a[useful], doc_a[useful], labels[useful])
    counts["dropped_untrained_pieces"] = int(dropped.sum())
    return p, counts


def _range_sums(mask: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """sum(mask[lo[i]:hi[i]]) for disjoint ranges, without a cumulative sum over the whole
    (memory-mapped) mask: the sums between consecutive range boundaries, one reduceat."""
    out = np.zeros(lo.shape[0], dtype=np.int64)
    nonempty = hi > lo
    if not nonempty.any():
        return out
    bounds = np.unique(np.concatenate([lo[nonempty], hi[nonempty]]))
    bounds = bounds[bounds < mask.shape[0]]
    sums = np.add.reduceat(mask, bounds, dtype=np.int64)
    out[nonempty] = sums[np.searchsorted(bounds, lo[nonempty])]
    return out


def best_fit_decreasing(lengths: np.ndarray, capacity: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Bins of total length <= capacity holding every item, by best-fit decreasing: longest item
    first (ties in a seeded order), each into the open bin it fills most tightly, else a new bin.
    Returns CSR arrays (bin_ptr, items) with items in insertion order per bin."""
    n = int(lengths.shape[0])
    perm = np.random.default_rng([int(seed), _PACK_SALT]).permutation(n)
    order = perm[np.argsort(-lengths[perm], kind="stable")]
    size = 1
    while size < capacity + 1:
        size *= 2
    tree = [0] * (2 * size)  # open bins per remaining capacity (leaves), sums above
    buckets: list[list[int]] = [[] for _ in range(capacity + 1)]
    bins: list[list[int]] = []

    def add(c: int, d: int) -> None:
        i = c + size
        while i:
            tree[i] += d
            i >>= 1

    def find(lo: int) -> int:
        """The smallest remaining capacity >= lo that an open bin has, else -1."""
        i = lo + size
        if tree[i] > 0:
            return lo
        while i > 1:
            if not i & 1 and tree[i + 1] > 0:
                i += 1
                while i < size:
                    i = 2 * i if tree[2 * i] > 0 else 2 * i + 1
                return i - size
            i >>= 1
        return -1

    lens = lengths.tolist()
    for p in order.tolist():
        L = lens[p]
        c = find(L) if L < capacity else -1
        if c < 0:
            b = len(bins)
            bins.append([p])
            rem = capacity - L
        else:
            b = buckets[c].pop()
            add(c, -1)
            bins[b].append(p)
            rem = c - L
        if rem > 0:
            buckets[rem].append(b)
            add(rem, 1)
    ptr = np.zeros(len(bins) + 1, dtype=np.int64)
    ptr[1:] = np.cumsum([len(b) for b in bins])
    items = np.asarray([p for b in bins for p in b], dtype=np.int64)
    return ptr, items


class Batch:
    """`input_ids`, `labels`, `position_ids`: int64 tensors [B, S] (unpack as a tuple), plus the
    counts a run logs: `tokens` (real, not padding) and `label_tokens` (targets)."""

    __slots__ = ("input_ids", "labels", "position_ids", "tokens", "label_tokens")

    def __init__(self, input_ids, labels, position_ids, tokens: int, label_tokens: int):
        self.input_ids, self.labels, self.position_ids = input_ids, labels, position_ids
        self.tokens, self.label_tokens = tokens, label_tokens

    def __iter__(self):
        return iter((self.input_ids, self.labels, self.position_ids))


class DocumentDataset:
    """Whole documents packed (or padded) into sequences of `seq_len`; see the module docstring.

    `keep` selects documents (a boolean array over all documents of `files`, e.g. one side of an
    eval split); `shuffle=False` visits the sequences in packing order in every epoch (eval)."""

    def __init__(self, files: list[TokenFile], seq_len: int, seed: int, *, packing: str = "on",
                 long_documents: str = "split", pad_id: int = 0, keep=None, shuffle: bool = True,
                 name: str = "training"):
        if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 2:
            raise HorizonError(f"sequence length must be an integer >= 2, got {seq_len!r}")
        if packing not in ("on", "off"):
            raise HorizonError(f"--packing must be on or off, got {packing!r}")
        self.files, self.seq_len, self.seed = files, seq_len, int(seed)
        self.packing, self.long_documents, self.pad_id, self.shuffle = packing, long_documents, int(pad_id), shuffle
        self.name = name
        self.pieces, self.counts = make_pieces(files, seq_len, long_documents, keep)
        n = len(self.pieces)
        if n == 0:
            c = self.counts
            why = []
            if c["dropped_long"]:
                why.append(f"{c['dropped_long']} longer than --seq-len {seq_len} dropped (--long-documents drop)")
            if c["dropped_untrained"]:
                why.append(f"{c['dropped_untrained']} with no trained tokens")
            raise HorizonError(
                f"the {name} data has no document to train on ({c['documents']} documents"
                + (": " + ", ".join(why) if why else "") + ")"
            )
        if packing == "on":
            self.seq_ptr, self.seq_items = best_fit_decreasing(self.pieces.length, seq_len, self.seed)
        else:
            self.seq_ptr, self.seq_items = np.arange(n + 1, dtype=np.int64), np.arange(n, dtype=np.int64)
        self.n_sequences = int(self.seq_ptr.shape[0]) - 1
        self.n_tokens = int(self.pieces.length.sum())
        self.n_label_tokens = int(self.pieces.labels.sum())
        self._perm_epoch, self._perm = -1, None

    # ------------------------------------------------------------------ order
    def permutation(self, epoch: int) -> np.ndarray:
        if not self.shuffle:
            return np.arange(self.n_sequences)
        if epoch != self._perm_epoch:
            self._perm = np.random.default_rng([self.seed, int(epoch)]).permutation(self.n_sequences)
            self._perm_epoch = epoch
        return self._perm

    def sequence_of(self, position: int) -> int:
        epoch, k = divmod(int(position), self.n_sequences)
        return int(self.permutation(epoch)[k])

    def pieces_of(self, seq: int) -> np.ndarray:
        return self.seq_items[self.seq_ptr[seq]:self.seq_ptr[seq + 1]]

    # ------------------------------------------------------------------ samples
    def sequence(self, seq: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
        """Sequence `seq` of the packing: (input_ids, labels, position_ids) int64 [S], real tokens."""
        S = self.seq_len
        ids = np.full(S, self.pad_id, dtype=np.int64)
        labels = np.full(S, IGNORE_INDEX, dtype=np.int64)
        pos = np.zeros(S, dtype=np.int64)
        at = 0
        P = self.pieces
        for p in self.pieces_of(seq).tolist():
            f = self.files[int(P.file[p])]
            a, n = int(P.start[p]), int(P.length[p])
            tok = np.asarray(f.ids[a:a + n], dtype=np.int64)
            ids[at:at + n] = tok
            if f.mask is None:
                labels[at + 1:at + n] = tok[1:]
            else:
                m = np.asarray(f.mask[a + 1:a + n]) != 0
                labels[at + 1:at + n] = np.where(m, tok[1:], IGNORE_INDEX)
            pos[at:at + n] = np.arange(n)
            at += n
        pos[at:] = np.arange(S - at)  # padding: a segment of its own
        return ids, labels, pos, at

    def sample(self, position: int):
        """The `position`-th sample of the run (counting across epochs): (input_ids, labels, position_ids)."""
        ids, labels, pos, _ = self.sequence(self.sequence_of(position))
        return ids, labels, pos

    def _batch(self, seqs) -> Batch:
        import torch

        rows = [self.sequence(s) for s in seqs]
        ids = torch.from_numpy(np.stack([r[0] for r in rows]))
        labels = torch.from_numpy(np.stack([r[1] for r in rows]))
        pos = torch.from_numpy(np.stack([r[2] for r in rows]))
        return Batch(ids, labels, pos, tokens=sum(r[3] for r in rows),
                     label_tokens=int((labels != IGNORE_INDEX).sum()))

    def batch(self, position: int, batch_size: int) -> Batch:
        """Samples `position .. position+batch_size-1` of the run: a Batch that unpacks as
        `input_ids, labels, position_ids` (int64 tensors [batch_size, seq_len])."""
        return self._batch([self.sequence_of(position + j) for j in range(batch_size)])

    def batches_in_order(self, batch_size: int):
        """Every sequence once, in packing order, in batches of `batch_size` (the last may be
        smaller): the fixed batches of an evaluation."""
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise HorizonError(f"batch size must be an integer >= 1, got {batch_size!r}")
        for lo in range(0, self.n_sequences, batch_size):
            yield self._batch(range(lo, min(lo + batch_size, self.n_sequences)))

    def __len__(self) -> int:
        return self.n_sequences

    @property
    def n_windows(self) -> int:  # the name the run loop's log line used for the sequence count
        return self.n_sequences

    def summary(self) -> dict:
        c = dict(self.counts)
        c.update(pieces=len(self.pieces), sequences=self.n_sequences, tokens=self.n_tokens,
                 label_tokens=self.n_label_tokens, seq_len=self.seq_len, packing=self.packing,
                 fill=self.n_tokens / (self.n_sequences * self.seq_len))
        return c


__all__ = ["IGNORE_INDEX", "Batch", "DocumentDataset", "Pieces", "best_fit_decreasing", "make_pieces",
           "documents_of"]
