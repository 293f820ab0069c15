"""Training text as one token stream, sampled into fixed-length windows reproducibly.

Batches depend only on (seed, step), so a resumed run sees exactly the batches an uninterrupted
one would. The last ``calib_fraction`` of the stream is kept out of training: the calibration
batch the configuration search scores configurations on.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from converters.errors import CoaloraError


def tokenize_files(tokenizer, paths) -> np.ndarray:
    ids: list[int] = []
    eos = tokenizer.eos_token_id
    for p in paths:
        try:
            text = Path(p).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise CoaloraError(f"cannot read training text {p}: {e}") from None
        ids.extend(tokenizer(text, add_special_tokens=False)["input_ids"])
        if eos is not None:
            ids.append(eos)
    return np.asarray(ids, dtype=np.int64)


class TokenStream:
    def __init__(self, tokens: np.ndarray, seq_len: int, calib_fraction: float = 0.02, calib_windows: int = 4):
        self.seq_len = seq_len
        n_calib = max(int(len(tokens) * calib_fraction), calib_windows * (seq_len + 1))
        if len(tokens) < n_calib + 4 * (seq_len + 1):
            raise CoaloraError(f"training text too short: {len(tokens)} tokens, need at least "
                               f"{n_calib + 4 * (seq_len + 1)} for sequence length {seq_len}")
        self.train = torch.from_numpy(tokens[:-n_calib])
        self.calib = torch.from_numpy(tokens[-n_calib:])
        self.calib_windows = calib_windows

    def batch(self, seed: int, step: int, batch_size: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(seed * 1_000_003 + step)
        starts = torch.randint(0, len(self.train) - self.seq_len, (batch_size,), generator=g)
        return torch.stack([self.train[s:s + self.seq_len] for s in starts.tolist()])

    def calibration_batch(self, n_windows: int | None = None) -> torch.Tensor:
        """The first ``n_windows`` (default: the run's ``calib_windows``) held-out windows, at most as many as
        the held-out tail holds."""
        n = self.seq_len
        k = min(n_windows or self.calib_windows, len(self.calib) // n)
        return torch.stack([self.calib[i * n:(i + 1) * n] for i in range(k)])

    # the same windows with their labels: every token is a target in running text
    def labelled_batch(self, seed: int, step: int, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        b = self.batch(seed, step, batch_size)
        return b, b

    def labelled_calibration(self, n_windows: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        b = self.calibration_batch(n_windows)
        return b, b


class RecordStream:
    """Padded record windows (:mod:`toolkit.records`), sampled reproducibly from (seed, step). Labels are
    -100 where a token is no target (prompts, padding). The held-out tail is made of whole records (at least
    ``calib_fraction`` of the windows and ``calib_windows`` windows), unless ``calib`` gives held-out windows."""

    def __init__(self, ids: np.ndarray, mask: np.ndarray, record: np.ndarray, calib_fraction: float = 0.02,
                 calib_windows: int = 4, calib: tuple[np.ndarray, np.ndarray] | None = None):
        labels = np.where(mask, ids, -100)
        if calib is None:
            n = len(ids)
            cut = n - max(int(np.ceil(n * calib_fraction)), calib_windows)
            while 0 < cut < n and record[cut - 1] == record[cut]:  # never split a record
                cut -= 1
            if cut < 4:
                raise CoaloraError(f"training data too small: {n} windows of {ids.shape[1]} tokens, need at least "
                                   f"{4 + max(int(np.ceil(n * calib_fraction)), calib_windows)} (4 to train on and a "
                                   f"held-out part of whole records)")
            train, held = slice(0, cut), slice(cut, n)
            self.train_ids, self.train_labels = torch.from_numpy(ids[train]), torch.from_numpy(labels[train])
            self.calib_ids, self.calib_labels = torch.from_numpy(ids[held]), torch.from_numpy(labels[held])
        else:
            if len(ids) < 4:
                raise CoaloraError(f"training data too small: {len(ids)} windows, need at least 4")
            self.train_ids, self.train_labels = torch.from_numpy(ids), torch.from_numpy(labels)
            self.calib_ids = torch.from_numpy(calib[0])
            self.calib_labels = torch.from_numpy(np.where(calib[1], calib[0], -100))
        self.seq_len = ids.shape[1]
        self.calib_windows = calib_windows

    def labelled_batch(self, seed: int, step: int, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        g = torch.Generator().manual_seed(seed * 1_000_003 + step)
        idx = torch.randint(0, len(self.train_ids), (batch_size,), generator=g)
        return self.train_ids[idx], self.train_labels[idx]

    def labelled_calibration(self, n_windows: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        k = min(n_windows or self.calib_windows, len(self.calib_ids))
        return self.calib_ids[:k], self.calib_labels[:k]
