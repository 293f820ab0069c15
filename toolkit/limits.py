"""Ranges of the numeric options: the command line's (out of range is a usage error) and the run.json
schema's (a run whose options are out of range is refused), one table for both."""
from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class Limit:
    lo: float
    hi: float
    integer: bool = True
    lo_open: bool = False  # lo itself excluded (learning rates, alpha)

    def check(self, value) -> str | None:
        """None when ``value`` is within range, else what is wrong (without echoing a huge value)."""
        if isinstance(value, bool) or not isinstance(value, (int, float)) or (self.integer and not isinstance(value, int)):
            return f"must be {'an integer' if self.integer else 'a number'}"
        if isinstance(value, float) and not math.isfinite(value):  # (a huge int is simply out of range)
            return "must be a finite number"
        if value < self.lo or value > self.hi or (self.lo_open and value == self.lo):
            return f"must be in {self.describe()}"
        return None

    def describe(self) -> str:
        fmt = (lambda x: f"{int(x)}") if self.integer else (lambda x: f"{x:g}")
        return f"{'(' if self.lo_open else '['}{fmt(self.lo)}, {fmt(self.hi)}]"


def _i(lo, hi) -> Limit:
    return Limit(lo, hi)


def _f(lo, hi, lo_open=False) -> Limit:
    return Limit(lo, hi, integer=False, lo_open=lo_open)


# Training options (run.json "options" and the train / finetune options).
TRAIN = {
    "rank": _i(1, 1024), "alpha": _f(0, 1e6, lo_open=True), "steps": _i(1, 10**7), "seq_len": _i(2, 1 << 17),
    "batch": _i(1, 4096), "lr": _f(0, 10, lo_open=True), "cam_lr": _f(0, 10), "weight_decay": _f(0, 10),
    "clip": _f(0, 1e6), "warmup": _i(0, 10**7), "seed": _i(0, 2**32 - 1), "rounds": _i(1, 1000),
    "search_candidates": _i(1, 10_000), "checkpoint_every": _i(1, 10**7), "calib_windows": _i(1, 10**6),
    "top_share": _f(0, 1), "low_share": _f(0, 1), "configs_per_step": _i(1, 1024), "anchor_lora_weight": _f(0, 1e6),
    "delta_lr": _f(0, 10), "delta_error_power": _f(0, 100),
}

# Deployment and search options.
WINDOWS = _i(1, 100_000)          # evaluation windows
THREADS = _i(1, 512)              # llama.cpp threads (ggml's GGML_MAX_N_THREADS)
TOKENS = _i(1, 1 << 20)           # prompt tokens of a measurement
BUDGET_BYTES = _i(1, 1 << 50)
BPW = _f(0, 32, lo_open=True)
CONFIRM = _i(0, 1000)
