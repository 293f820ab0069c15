"""Per-tensor quantization sensitivity and greedy bit allocation under an exact byte budget.

``error_table`` measures, for every tensor and every type of its menu, the (optionally
importance-weighted) squared Frobenius error of a real ggml round trip. ``allocate`` picks one type
per tensor that minimizes the summed error subject to ``layout.file_bytes(cfg) <= budget_bytes``,
and ``initial_training_set`` spreads such allocations over a bit range, one or more per 0.25-bit bin
(LQ-LoRA style); it seeds the Pareto configuration search.
"""
from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Callable

import numpy as np

from converters.ggml_quant import roundtrip
from converters.quant_types import get
from converters.configuration import Configuration, ModelLayout, pad
from converters.errors import CoaloraError
from converters.fileio import write_json

# errors[tensor name][type name] = quantization error of that tensor in that type
ErrorTable = dict[str, dict[str, float]]


def tensor_errors(weight: np.ndarray, types, importance: np.ndarray | None = None,
                  max_rows: int | None = 2048, seed: int = 0, quant_weights: np.ndarray | None = None,
                  threads: int = 1) -> dict[str, float]:
    """Squared Frobenius error ``sum_ij imp_j (W - deq(q(W)))_ij^2`` of ``weight`` for each type.

    ``importance`` weights the input columns (llama.cpp's imatrix: mean squared activation per
    column). ``quant_weights``: the imatrix weights ggml quantizes with (for the types that take them), so
    the error is that of the bytes coalora writes. Tall tensors (embeddings) are estimated on ``max_rows``
    random rows, scaled back up. ``threads``: ggml quantizes each type on that many threads (same bytes).
    """
    w = np.ascontiguousarray(weight, dtype=np.float32).reshape(-1, weight.shape[-1])
    scale = 1.0
    if max_rows and w.shape[0] > max_rows:
        rows = np.sort(np.random.default_rng(seed).choice(w.shape[0], max_rows, replace=False))
        scale = w.shape[0] / max_rows
        w = np.ascontiguousarray(w[rows])
    imp = None if importance is None else np.asarray(importance, dtype=np.float64).reshape(1, -1)
    out = {}
    for q in types:
        _, deq = roundtrip(w, q, quant_weights if get(q).takes_imatrix else None, threads=threads)
        d = (w.astype(np.float64) - deq) ** 2
        out[getattr(q, "name", str(q))] = float(scale * (d.sum() if imp is None else (d * imp).sum()))
    return out


def _layout_key(layout: ModelLayout, extra: str = "") -> str:
    return hashlib.sha256((json.dumps(layout.describe()) + extra).encode()).hexdigest()[:16]


def error_table(layout: ModelLayout, weight: Callable[[str], np.ndarray],
                importance: dict[str, np.ndarray] | None = None, cache: str | Path | None = None,
                max_rows: int | None = 2048, progress: bool = False, imatrix=None, threads: int = 1) -> ErrorTable:
    """Error of every tensor in every menu type, from real ggml round trips; cached in ``cache`` (JSON).

    ``weight(name)`` returns the float32 (rows, n_per_row) weight; ``importance`` maps tensor names to
    per-column importance vectors; ``imatrix`` (a :class:`converters.imatrix.Imatrix`) is what ggml quantizes
    with. The cache is keyed on the layout, menu, whether importance is used and the imatrix's values.
    ``threads``: ggml's quantization threads (the errors do not depend on them).
    """
    key = _layout_key(layout, f"imp={importance is not None};rows={max_rows}"
                              + (f";imatrix={imatrix.values_sha256()}" if imatrix is not None else ""))
    if cache is not None and Path(cache).exists():
        d = _read_table_file(cache)
        if d is not None and d.get("key") == key and _covers(d["errors"], layout):
            return d["errors"]
        # a stale or broken cache is recomputed
    names = layout.names()
    it = names
    if progress:
        from tqdm import tqdm
        it = tqdm(names, desc="sensitivity", unit="tensor")
    table: ErrorTable = {}
    for n in it:
        imp = None if importance is None else importance.get(n)
        qw = None if imatrix is None else imatrix.weights(n)
        table[n] = tensor_errors(weight(n), layout.menu(n), imp, max_rows=max_rows, quant_weights=qw,
                                 threads=threads)
    if cache is not None:
        write_json(cache, {"key": key, "errors": table})
    return table


def _read_table_file(path) -> dict | None:
    """A sensitivity JSON file ({"key", "errors": {tensor: {type: error}}}) whose errors are finite and not
    negative, or None when it is missing, unreadable or damaged."""
    try:
        d = json.loads(Path(path).read_text())
    except (OSError, ValueError, RecursionError):
        return None
    errors = d.get("errors") if isinstance(d, dict) else None
    if not isinstance(errors, dict) or not all(
            isinstance(row, dict) and row and all(
                isinstance(q, str) and isinstance(e, (int, float)) and not isinstance(e, bool)
                and math.isfinite(e) and e >= 0 for q, e in row.items())
            for row in errors.values()):
        return None
    return d


def _covers(errors: ErrorTable, layout: ModelLayout) -> bool:
    """Whether ``errors`` has every tensor of the layout in every type of its menu."""
    return all(n in errors and all(q.name in errors[n] for q in layout.menu(n)) for n in layout.names())


def load_error_table(path, layout: ModelLayout | None = None) -> ErrorTable | None:
    """The table cached at ``path`` by :func:`error_table` (covering ``layout`` when given), or None when there is
    none or it is damaged."""
    d = _read_table_file(path)
    if d is None or (layout is not None and not _covers(d["errors"], layout)):
        return None
    return d["errors"]


# ---------------------------------------------------------------- allocation


class _Problem:
    """Dense arrays of a layout's menus: padded bytes and errors per (tensor, menu slot)."""

    def __init__(self, layout: ModelLayout, errors: ErrorTable):
        self.layout = layout
        self.names = layout.names()
        self.menus = [[q.name for q in layout.menu(n)] for n in self.names]
        for n, m in zip(self.names, self.menus):
            if not m:
                raise CoaloraError(f"{n}: no type of the menu fits its rows")
            missing = [q for q in m if q not in errors.get(n, {})]
            if missing:
                raise CoaloraError(f"error table has no {missing[0]} error for {n}; recompute it")
        k = max(len(m) for m in self.menus)
        self.bytes = np.full((len(self.names), k), np.iinfo(np.int64).max // 4, dtype=np.int64)
        self.err = np.full((len(self.names), k), np.inf)
        for i, (n, m) in enumerate(zip(self.names, self.menus)):
            for j, q in enumerate(m):
                self.bytes[i, j] = pad(layout[n].bytes(q))
                self.err[i, j] = errors[n][q]
        self.cheapest = np.array([int(np.argmin(self.bytes[i, :len(m)])) for i, m in enumerate(self.menus)])
        self.dearest = np.array([int(np.argmax(self.bytes[i, :len(m)])) for i, m in enumerate(self.menus)])

    def total_bytes(self, choice: np.ndarray) -> int:
        return self.layout.fixed_bytes + int(self.bytes[np.arange(len(choice)), choice].sum())

    def config(self, choice) -> Configuration:
        return Configuration({n: self.menus[i][j] for i, (n, j) in enumerate(zip(self.names, choice))})


def byte_range(layout: ModelLayout) -> tuple[int, int]:
    """Smallest and largest file bytes a configuration of ``layout`` can have (cheapest / dearest menu types)."""
    lo = hi = layout.fixed_bytes
    for n in layout.names():
        b = [pad(layout[n].bytes(q)) for q in layout.menu(n)]
        if not b:
            raise CoaloraError(f"{n}: no type of the menu fits its rows")
        lo += min(b)
        hi += max(b)
    return lo, hi


def bpw_of_bytes(layout: ModelLayout, file_bytes: int) -> float:
    """Approximate bits per weight of a file of ``file_bytes`` (padding counted as weights)."""
    return 8.0 * (file_bytes - layout.fixed_bytes) / layout.n_weights()


def bytes_for_bpw(layout: ModelLayout, bpw: float) -> int:
    """A file budget whose configurations all have at most ``bpw`` bits per weight."""
    return layout.fixed_bytes + int(math.floor(bpw * layout.n_weights() / 8.0))


def check_budget(layout: ModelLayout, budget_bytes: int) -> None:
    lo, hi = byte_range(layout)
    if not lo <= budget_bytes <= hi:
        raise CoaloraError(
            f"budget {budget_bytes:,} bytes is outside the reachable range {lo:,}..{hi:,} bytes "
            f"({bpw_of_bytes(layout, lo):.3f}..{bpw_of_bytes(layout, hi):.3f} bpw)")


def allocate(layout: ModelLayout, errors: ErrorTable, budget_bytes: int, resolution: int = 16384,
             fixed: dict[str, str] | None = None) -> Configuration:
    """Types minimizing the summed error with ``layout.file_bytes(cfg) <= budget_bytes`` (exact bytes).

    A multiple-choice knapsack solved by dynamic programming over the bytes above the cheapest
    configuration, in ``resolution`` units with every tensor's cost rounded UP (so the answer is
    always within the exact budget, and its error never rises with the budget), then a fill pass
    that spends the bytes the rounding left on the best single-tensor changes. ``fixed``: tensors whose type
    is given (a type of their menu). Raises CoaloraError when the budget is outside the reachable range (with
    ``fixed``, when no configuration with those types fits it).
    """
    check_budget(layout, budget_bytes)
    p = _Problem(layout, errors)
    for n, q in (fixed or {}).items():  # the other types of a fixed tensor are never chosen
        i = p.names.index(n)
        if q not in p.menus[i]:
            raise CoaloraError(f"{n}: {q} is not in its menu ({', '.join(p.menus[i])})")
        p.err[i, [j for j, m in enumerate(p.menus[i]) if m != q]] = np.inf
    base = p.total_bytes(p.cheapest)
    lo, hi = byte_range(layout)
    unit = max(1, -(-(hi - lo) // resolution))
    cap = (budget_bytes - base) // unit
    rows = np.arange(len(p.names))
    extra = p.bytes - p.bytes[rows, p.cheapest][:, None]          # >= 0 on the menu, huge off it
    w = np.where(extra < np.iinfo(np.int64).max // 8, -(-extra // unit), cap + 1)
    best = np.zeros(cap + 1)                                       # best[c]: least error within c units
    arg = np.zeros((len(p.names), cap + 1), dtype=np.int8)
    for i in rows:
        new = np.full(cap + 1, np.inf)
        for j in range(len(p.menus[i])):
            if w[i, j] > cap:
                continue
            cand = np.full(cap + 1, np.inf)
            cand[w[i, j]:] = best[:cap + 1 - w[i, j]] + p.err[i, j]
            better = cand < new
            new[better] = cand[better]
            arg[i, better] = j
        best = new
    if not np.isfinite(best).any():
        raise CoaloraError(f"no configuration with {', '.join(f'{n} in {q}' for n, q in fixed.items())} fits "
                           f"{budget_bytes:,} bytes")
    choice = np.zeros(len(p.names), dtype=np.int64)
    c = int(np.argmin(best))  # best is non-increasing in c up to float ties; take the least-capacity optimum
    for i in rows[::-1]:
        choice[i] = arg[i, c]
        c -= int(w[i, choice[i]])
    left = budget_bytes - p.total_bytes(choice)
    return p.config(_fill(p, choice, left))


def _fill(p: _Problem, choice: np.ndarray, left: int) -> np.ndarray:
    """Spend ``left`` bytes on single-tensor type changes, largest error drop per byte first."""
    rows = np.arange(len(choice))
    while True:
        cur_b = p.bytes[rows, choice][:, None]
        cur_e = p.err[rows, choice][:, None]
        db = p.bytes - cur_b
        de = cur_e - p.err
        ok = (db <= left) & (de > 0)
        if not ok.any():
            return choice
        score = np.where(ok, de / np.maximum(db, 1), -np.inf)
        i, j = np.unravel_index(int(np.argmax(score)), score.shape)
        left -= int(db[i, j])
        choice = choice.copy()
        choice[i] = j


def total_error(layout: ModelLayout, errors: ErrorTable, cfg: Configuration) -> float:
    return float(sum(errors[n][q.name] for n, q in cfg.types.items()))


def initial_training_set(layout: ModelLayout, errors: ErrorTable, bpw_lo: float, bpw_hi: float,
                         bin_width: float = 0.25, per_bin: int = 1) -> list[Configuration]:
    """Greedy allocations at budgets spread over ``[bpw_lo, bpw_hi]``: ``per_bin`` per ``bin_width``-bit bin.

    Budgets are clipped to the reachable range; duplicates are dropped, so a bin the menus cannot
    reach (e.g. between two types no tensor mixes) may stay empty.
    """
    if bpw_hi <= bpw_lo or bin_width <= 0 or per_bin < 1:
        raise CoaloraError("need bpw_lo < bpw_hi, bin_width > 0 and per_bin >= 1")
    lo, hi = byte_range(layout)
    out: dict[Configuration, None] = {}
    n_bins = max(1, int(math.ceil((bpw_hi - bpw_lo) / bin_width - 1e-9)))
    for k in range(n_bins):
        for s in range(per_bin):
            bpw = bpw_lo + bin_width * (k + (s + 1) / (per_bin + 1))
            budget = min(max(bytes_for_bpw(layout, bpw), lo), hi)
            out.setdefault(allocate(layout, errors, budget), None)
    return list(out)
