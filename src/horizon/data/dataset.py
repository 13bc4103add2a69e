"""Packing token files into fixed-length training sequences, shuffled deterministically.

All files' tokens form one stream (documents separated by end-of-text), cut into windows of
`seq_len` tokens. Epoch `e` visits the windows in the order of a permutation drawn from
`(seed, e)`, so the whole sample order is a pure function of the seed and the data: the data
position of a run is a single integer (samples consumed), which is what a checkpoint stores.
"""

from __future__ import annotations


import numpy as np

from ..errors import HorizonError
from .cache import TokenFile, token_file
from .sources import data_files
from .tokenizer import TextTokenizer

IGNORE_INDEX = -100


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


__all__ = ["PackedDataset", "load_dataset", "IGNORE_INDEX"]
