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
