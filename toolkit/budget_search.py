"""The best configuration for a device: lowest predicted loss within a budget in exact file bytes.

Starting points: archived configurations under the budget, the greedy sensitivity allocation at the
budget (also with the embedding / head fixed in each of their types), and uniform types that fit. Each of the best few is improved by steepest descent over
single-tensor type changes that keep ``layout.file_bytes(cfg) <= budget_bytes`` (the surrogate
decides which upgrade spends the leftover bytes best). Optionally the top few are measured with
``evaluate`` and the best measured one wins.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from converters.configuration import EMBEDDING_KINDS, Configuration, ModelLayout, pad
from converters.errors import CoaloraError
from toolkit.pareto_search import Archive, Surrogate
from toolkit.sensitivity import allocate, check_budget, total_error

Predict = Callable[[Sequence[Configuration]], Sequence[float]]


@dataclass
class SearchResult:
    cfg: Configuration
    file_bytes: int
    bpw: float
    predicted_loss: float | None      # None when only an error table ranked the candidates
    measured_loss: float | None = None
    budget_bytes: int = 0
    source: str = ""                  # archive | greedy | uniform:<T> | cheapest, plus "+local"
    confirmation: dict | None = None  # what the confirmation measured (see best_configuration)
    adjusted: bool = True             # the adapter generated for the configuration, or (False) the shared LoRA

    @property
    def predicted_ppl(self) -> float | None:
        return None if self.predicted_loss is None else math.exp(self.predicted_loss)

    def extra(self) -> dict:
        return {"file_bytes": self.file_bytes, "bpw": self.bpw, "budget_bytes": self.budget_bytes,
                "predicted_loss": self.predicted_loss, "predicted_ppl": self.predicted_ppl,
                "measured_loss": self.measured_loss, "source": self.source, "confirmation": self.confirmation,
                "adapter": "generated" if self.adjusted else "shared"}


def _local_search(layout: ModelLayout, sur: Surrogate, cfg: Configuration, budget: int,
                  max_steps: int = 24, kappa: float = 1.0) -> Configuration:
    """Spend the bytes left under the budget on single-tensor upgrades, steepest descent of the GP's
    pessimistic loss (mean + ``kappa`` std, so it does not wander where the surrogate knows nothing)."""
    import torch

    enc = sur.encode
    names = layout.names()
    menus = [list(layout.menu(n)) for n in names]
    types = dict(cfg.types)
    bits, err = enc.sums(cfg)
    size = layout.file_bytes(cfg)
    mu, sd = sur.predict([cfg])
    best = float(mu[0] + kappa * sd[0])
    for _ in range(max_steps):
        moves, dbits, derr, dsize = [], [], [], []
        for n, menu in zip(names, menus):
            cur, spec = types[n], layout[n]
            cb = pad(spec.bytes(cur))
            for q in menu:
                nb = pad(spec.bytes(q))
                if nb <= cb or size - cb + nb > budget:  # upgrades that fit only
                    continue
                d = np.zeros(enc.n_bits)
                d[enc.cols[n]] = 8.0 * (spec.bytes(q) - spec.bytes(cur))
                moves.append((n, q))
                dbits.append(d)
                dsize.append(nb - cb)
                if enc.errors is not None:
                    row = enc.errors[n]
                    derr.append(row[q.name] - row.get(cur.name, max(row.values())))
        if not moves:
            break
        X = enc.features(bits + np.array(dbits), err + np.array(derr) if derr else None)
        with torch.no_grad():
            post = sur.gp.posterior(X)
            score = (post.mean + kappa * post.variance.clamp_min(0).sqrt()).squeeze(-1).numpy()
        k = int(np.argmin(score))
        if score[k] >= best - 1e-9:
            break
        n, q = moves[k]
        types[n] = q
        bits, size, best = bits + dbits[k], size + dsize[k], float(score[k])
        if derr:
            err += derr[k]
    return Configuration(types)


def _pessimistic(sur: Surrogate, cfgs: Sequence[Configuration], kappa: float = 1.0) -> np.ndarray:
    mu, sd = sur.predict(cfgs)
    return mu + kappa * sd


CONFIRM_Z = 2.0  # standard errors by which a confirmed candidate must beat the largest llama.cpp file that fits
# Nats per token (about 0.5% perplexity) by which it must beat it too, and a generated adapter the shared LoRA:
# a smaller gain, however many standard errors on the training text, did not carry over to held-out text.
MIN_GAIN = 0.005
# A smaller gain is trusted when the candidate, with the adapter it ships, is also clearly closer to the
# full-precision fine-tune (F32 with the shared LoRA): its KL divergence from it lower by CONFIRM_Z standard errors
# and by FIDELITY_SHARE of the file's or by MIN_GAIN nats, whichever is less. That divergence is the excess loss
# expected on text the fine-tune would write, free of the windows' own fit: near full precision it ranks files by
# held-out perplexity better than the training-text loss, and a smaller share did not carry over there; at low
# bits, where a quarter of the file's divergence is several times MIN_GAIN, MIN_GAIN is the gain the loss rule asks
# for (bench results, README).
FIDELITY_SHARE = 0.25


def _clearly_better(mean: float, se: float | None) -> bool:
    """Whether a paired difference (candidate minus reference, nats) is a gain by ``CONFIRM_Z`` standard errors
    and by at least ``MIN_GAIN``."""
    return mean < -max(MIN_GAIN, CONFIRM_Z * (se or 0.0))


def best_configuration(layout: ModelLayout, archive: Archive | None, budget_bytes: int,
                       predict: Predict | None = None, evaluate: Callable | None = None,
                       errors: dict | None = None, n_confirm: int = 3, n_starts: int = 3,
                       evaluate_shared: Callable | None = None, mixes: dict | None = None,
                       evaluate_more: Callable | None = None,
                       evaluate_shared_more: Callable | None = None,
                       divergence: Callable | None = None,
                       divergence_more: Callable | None = None) -> SearchResult:
    """Lowest-loss configuration with ``layout.file_bytes(cfg) <= budget_bytes``.

    ``predict`` overrides the archive's GP surrogate; with neither (fewer than 3 archived records)
    the error table ranks candidates and ``predicted_loss`` is None. ``evaluate`` (real loss of a
    list of configurations; a float, or an array of per-window losses, each) confirms the ``n_confirm``
    best; ``mixes`` (file type -> configuration: llama-quantize's own mixes such as Q4_K_M) join the candidates
    and, like the uniform files, count as llama.cpp's files. With per-window losses another candidate (a mix of
    coalora's, or another llama.cpp file) replaces the largest llama.cpp file that fits (of several that size, the
    one measuring best) only when it is better by ``CONFIRM_Z`` standard errors of the paired difference and by
    ``MIN_GAIN``; of those, the best measured is kept.
    The other llama.cpp file measured is the one of least error in ``errors`` (the best-ranked without them), and
    with ``errors`` the candidate of least summed error and the allocation with the finest embedding / head that
    fits (unless a finalist has that head) are measured too.
    ``evaluate_shared`` (the same with the shared LoRA instead of each configuration's generated adapter)
    measures every candidate once more: each keeps its generated adapter only when it is better than the shared
    LoRA by ``CONFIRM_Z`` standard errors and ``MIN_GAIN`` (at high bits the configuration's adjustment is about
    zero and its noise did not carry over to other text) or, with ``divergence``, when its loss is lower and its
    divergence from the full-precision fine-tune lower by ``CONFIRM_Z`` standard errors; the candidates are
    compared with the adapters they keep, so that a file is never chosen on one adapter and shipped with the
    other.
    ``evaluate_more`` / ``evaluate_shared_more``: the same on more windows (whose first ones are the windows
    measured before). When a candidate is ahead of the largest llama.cpp file by between one and ``CONFIRM_Z``
    standard errors, and its gain is within one standard error of ``MIN_GAIN`` or above it, every candidate is
    measured again on those windows and the rule applied to them (once).
    ``divergence`` / ``divergence_more`` (``(configurations, adjusted)`` -> per-window KL divergence of each,
    with the shared LoRA or, ``adjusted``, its generated adapter, from the unquantized model with the shared LoRA):
    a candidate replaces the largest llama.cpp file also when its loss is lower (by any amount) and its divergence,
    each with the adapter it ships, is lower by ``CONFIRM_Z`` standard errors of the paired difference and by
    ``FIDELITY_SHARE`` of the file's or ``MIN_GAIN``, whichever is less ("fidelity" in the confirmation's rows);
    when no candidate is clearly better on loss, the one of those with the lowest divergence is picked.
    Budgets outside the reachable range raise CoaloraError with that range.
    """
    budget_bytes = int(budget_bytes)
    check_budget(layout, budget_bytes)
    archive = archive or Archive()
    sur = Surrogate(layout, archive, errors) if len(archive) >= 3 else None
    if predict is None and sur is not None:
        predict = _gp_mean = lambda cs: sur.predict(cs)[0]  # noqa: E731
    else:
        _gp_mean = None
    if predict is None and errors is None:
        raise CoaloraError("nothing to rank configurations with: the archive has fewer than 3 evaluated "
                           "configurations and there is no sensitivity table")

    uniforms, names = {}, {}  # llama.cpp's files that fit (uniform types, llama-quantize's mixes), by file type:
    for t in layout.menu_names:  # the largest always reaches confirmation
        c = layout.uniform(t)
        if layout.on_menu(c) and layout.file_bytes(c) <= budget_bytes and c not in uniforms:
            uniforms[c], names[c] = t, f"uniform:{t}"
    for t, c in (mixes or {}).items():
        if layout.on_menu(c) and layout.file_bytes(c) <= budget_bytes and c not in uniforms:
            uniforms[c], names[c] = t, f"llama.cpp:{t}"
    cands: dict[Configuration, str] = {}
    for r in archive.records:  # an archived llama.cpp file keeps its llama.cpp name; sized by the layout, the
        c = r.config()         # truth the search keeps to, not by the size the record was written with
        if layout.on_menu(c) and layout.file_bytes(c) <= budget_bytes:
            cands.setdefault(c, names.get(c, "archive"))
    variants = []
    if errors is not None:
        greedy = allocate(layout, errors, budget_bytes)
        cands.setdefault(greedy, names.get(greedy, "greedy"))
        variants = _embedding_variants(layout, errors, budget_bytes)
        for c, label in variants:
            cands.setdefault(c, names.get(c, label))
    for c, name in names.items():
        cands.setdefault(c, name)
    cheapest = Configuration({n: min(layout.menu(n), key=lambda q: layout[n].bytes(q)) for n in layout.names()})
    cands.setdefault(cheapest, "cheapest")

    if sur is not None and predict is not None:  # GP-guided upgrades from the best few starts
        first = list(cands)
        for i in np.argsort(_pessimistic(sur, first), kind="stable")[:n_starts]:
            c = first[i]
            cands.setdefault(_local_search(layout, sur, c, budget_bytes), cands[c] + "+local")

    pool = list(cands)
    if predict is not None:
        scores = np.asarray(predict(pool), dtype=float)
        # rank by a pessimistic estimate when the GP is the predictor: trust measured neighbourhoods
        rank = _pessimistic(sur, pool) if predict is _gp_mean else scores
    else:
        scores = rank = np.array([total_error(layout, errors, c) for c in pool])
    ranked = [(pool[i], cands[pool[i]], float(scores[i])) for i in np.argsort(rank, kind="stable")]

    measured = confirmation = None
    adjusted = True
    best_cfg, best_src, best_score = ranked[0]
    if evaluate is not None and n_confirm > 0:
        top = ranked[:n_confirm]
        # The best archived configuration, the largest llama.cpp file that fits (uniform or llama-quantize's mix:
        # what a user would otherwise ship) and the other llama.cpp file of least quantization error always
        # compete: at some budgets a smaller file beats the largest (uniform IQ2_S against Q2_K, IQ4_XS against
        # Q4_0). The error table ranks llama.cpp's files, not the GP, which reverts to its mean where the archive
        # has no data (IQ1-IQ3 files are not trained on) and so ranks uniform IQ1_S first at 4 bpw.
        arch = [x for x in ranked if x[1] == "archive"][:1]
        # of llama.cpp's files of the largest size that fits (Q4_0 and IQ4_NL are one size), every one: the one that
        # measures best is the file to beat
        largest = max((layout.file_bytes(c) for c in uniforms), default=None)
        uni = [x for x in ranked if x[0] in uniforms and layout.file_bytes(x[0]) == largest]
        tied = {x[0] for x in uni}
        others = [x for x in ranked if x[0] in uniforms and x[0] not in tied]
        if errors is not None:
            others.sort(key=lambda x: total_error(layout, errors, x[0]))
        # and the candidate of least quantization error: the GP ranks poorly what the archive has not sampled
        # (at the 200-step run's Q4_K_M size a Q8_0 embedding with cheaper ffn_down, under Q5_1 everywhere else)
        least = [min(ranked, key=lambda x: total_error(layout, errors, x[0]))] if errors is not None else []
        for x in arch + uni + others[:1] + least:
            if x[0] not in {c for c, _, _ in top}:
                top.append(x)
        # and the allocation with the finest embedding / head that fits, unless a finalist has that head already:
        # its type also sets how ggml rounds the head's input (F16, not Q8_0 blocks), which no weight error sees
        if variants:
            finest = max((c for c, _ in variants),
                         key=lambda c: sum(layout[n].bytes(q) for n, q in _head(layout, c).items()))
            if _head(layout, finest) not in [_head(layout, c) for c, _, _ in top]:
                top.append(next(x for x in ranked if x[0] == finest))
        us = [i for i, (c, _, _) in enumerate(top) if c in tied]
        real, adapters, rows, k, undecided = _confirm(layout, top, us, evaluate, evaluate_shared, divergence)
        extended_from = None
        if undecided and evaluate_more is not None:  # measure more windows rather than guess
            more = _confirm(layout, top, us, evaluate_more, evaluate_shared_more if evaluate_shared else None,
                            divergence_more if divergence else None)
            if len(more[0][0]) > len(real[0]):  # the held-out text had more windows to give
                extended_from = len(real[0])
                real, adapters, rows, k, _ = more
        best_cfg, best_src, best_score = top[k]
        measured = float(real[k].mean())
        u = next((i for i, row in enumerate(rows) if row["uniform"]), None)
        confirmation = {"windows": int(len(real[0])), "z": CONFIRM_Z, "min_gain": MIN_GAIN, "candidates": rows,
                        **({"fidelity_share": FIDELITY_SHARE} if divergence is not None else {}),
                        "uniform": uniforms[top[u][0]] if u is not None else None}
        if extended_from is not None:
            confirmation["extended_from_windows"] = extended_from
        if adapters is not None:
            confirmation["adapter"] = adapters[k]
            adjusted = adapters[k]["generated"]
    size = layout.file_bytes(best_cfg)
    assert size <= budget_bytes, "internal error: the search left the byte budget"
    return SearchResult(best_cfg, size, layout.bits_per_weight(best_cfg),
                        best_score if predict is not None else None, measured, budget_bytes, best_src, confirmation,
                        adjusted)


def _head(layout: ModelLayout, cfg: Configuration) -> dict:
    """The types of the token embedding and output head in ``cfg``."""
    return {n: q for n, q in cfg.types.items() if layout[n].kind in EMBEDDING_KINDS}


def _embedding_variants(layout: ModelLayout, errors: dict, budget_bytes: int) -> list[tuple[Configuration, str]]:
    """The error table's allocation with the token embedding and output head fixed in each type of their menus
    (as llama-quantize's --token-embedding-type / --output-tensor-type), where it fits the budget: the summed error
    weighs them like any tensor, though they act on the logits directly, so one allocation may miss the type
    that matters most."""
    emb = [t.name for t in layout.tensors if t.kind in EMBEDDING_KINDS]
    out = []
    for q in dict.fromkeys(q.name for n in emb for q in layout.menu(n)):
        fixed = {n: q for n in emb if q in {m.name for m in layout.menu(n)}}
        try:
            out.append((allocate(layout, errors, budget_bytes, fixed=fixed), f"greedy:embedding {q}"))
        except CoaloraError:  # that type leaves no configuration under the budget
            continue
    return out


def _confirm(layout: ModelLayout, top: list, us: list[int], evaluate: Callable, evaluate_shared: Callable | None,
             divergence: Callable | None = None):
    """Measure the candidates ``top`` (``us``: the indices of the largest llama.cpp files, of which the one measuring
    best is the file to beat, its row marked "uniform") and apply the confirmation rule: (per-candidate loss
    arrays, adapter choices or None, table rows, index picked, whether a candidate is ahead of the largest file by
    between one and ``CONFIRM_Z`` standard errors, with a gain not clearly below ``MIN_GAIN``, or, on the fidelity
    rule, closer to the unquantized model by between one and ``CONFIRM_Z``)."""
    cfgs = [c for c, _, _ in top]
    real = [np.atleast_1d(np.asarray(r, dtype=float)) for r in evaluate(cfgs)]
    adapters = None
    if evaluate_shared is not None:  # each candidate with the adapter it would ship with
        shared = [np.atleast_1d(np.asarray(r, dtype=float)) for r in evaluate_shared(cfgs)]
        # the divergences with either adapter come from the passes that measured these losses
        kls = (list(zip(divergence(cfgs, True), divergence(cfgs, False))) if divergence is not None
               else [(None, None)] * len(cfgs))
        adapters = [_generated_or_shared(g, s, *kl) for g, s, kl in zip(real, shared, kls)]
        real = [g if a["generated"] else s for g, s, a in zip(real, shared, adapters)]
    k = int(np.argmin([r.mean() for r in real]))
    u = min(us, key=lambda i: real[i].mean()) if us else None
    rows = [{"source": src, "file_bytes": layout.file_bytes(c), "bpw": round(layout.bits_per_weight(c), 4),
             "measured_loss": float(r.mean()), "uniform": i == u}
            for i, ((c, src, _), r) in enumerate(zip(top, real))]
    for row, a in zip(rows, adapters or []):
        row.update(adapter="generated" if a["generated"] else "shared", generated_loss=a["generated_loss"],
                   shared_loss=a["shared_loss"])
    undecided = False
    if u is not None:
        for row, r in zip(rows, real):
            row["vs_uniform"], row["vs_uniform_se"] = _paired(r, real[u])
        faithful, kl_undecided = _fidelity(rows, u, cfgs, divergence) if divergence is not None else (set(), False)
        # Per-window losses: leave the largest llama.cpp file only for a candidate clearly better (smaller
        # differences did not carry over to other text); of those (and the faithful ones), the best measured.
        # With none clearly better, the faithful candidate closest to the unquantized model: their losses differ
        # by less than the windows resolve, their divergences by many standard errors. Undecided: a candidate
        # ahead by more than one standard error whose gain is within one standard error of MIN_GAIN or above it
        # (more windows may confirm it; with a gain clearly below MIN_GAIN they cannot).
        clear = [i for i, row in enumerate(rows)
                 if i != u and _clearly_better(row["vs_uniform"], row["vs_uniform_se"])]
        ahead = [u, *clear, *faithful]
        if clear or not faithful:
            k = min(ahead, key=lambda i: real[i].mean())
        else:
            k = min(faithful, key=lambda i: rows[i]["kl"])
        undecided = kl_undecided or any(
            i not in ahead and row["vs_uniform_se"] and row["vs_uniform"] < -row["vs_uniform_se"]
            and row["vs_uniform"] - row["vs_uniform_se"] < -MIN_GAIN for i, row in enumerate(rows))
    for i, row in enumerate(rows):
        row["picked"] = i == k
    return real, adapters, rows, k, undecided


def _fidelity(rows: list, u: int, cfgs: list, divergence: Callable) -> tuple[set, bool]:
    """The candidates the fidelity rule accepts against the largest llama.cpp file ``u`` (the candidate's loss is
    lower and its KL divergence from the full-precision fine-tune, each with the adapter it ships, is lower by
    ``CONFIRM_Z`` standard errors and by ``FIDELITY_SHARE`` of ``u``'s or ``MIN_GAIN``, whichever is less), and
    whether one has that gap and a lower loss but only between one and ``CONFIRM_Z`` standard errors (more windows
    may decide). Adds each row's divergence and its paired difference to ``u``'s."""
    kls = {}
    for adjusted in (False, True):
        group = [i for i, row in enumerate(rows) if (row.get("adapter", "shared") == "generated") == adjusted]
        if group:
            measured = divergence([cfgs[i] for i in group], adjusted)
            kls.update(zip(group, (np.atleast_1d(np.asarray(d, dtype=float)) for d in measured)))
    gap = min(FIDELITY_SHARE * float(kls[u].mean()), MIN_GAIN)
    accepted, undecided = set(), False
    for i, row in enumerate(rows):
        row["kl"] = float(kls[i].mean())
        row["kl_vs_uniform"], row["kl_vs_uniform_se"] = d, se = _paired(kls[i], kls[u])
        if i == u or row["vs_uniform"] >= 0 or d > -gap:
            continue
        if d < -CONFIRM_Z * (se or 0.0):
            row["fidelity"] = True
            accepted.add(i)
        elif se and d < -se:
            undecided = True
    return accepted, undecided


def _generated_or_shared(generated, shared, kl_generated=None, kl_shared=None) -> dict:
    """The paired comparison of a configuration's generated adapter with the shared LoRA on the same windows;
    ``generated``: whether the generated adapter is better by ``CONFIRM_Z`` standard errors and ``MIN_GAIN`` or,
    given each one's per-window KL divergence from the full-precision fine-tune, its loss is lower (by any amount)
    and its divergence by ``CONFIRM_Z`` standard errors ("fidelity"). Both adapters run on the same bytes, so
    the divergence measures the adapter alone: on SmolLM2's 200-step run and two float models, every generated
    adapter so chosen was ahead on held-out text, and 11 of the 13 whose divergence was higher by as much were
    behind there (README)."""
    generated = np.atleast_1d(np.asarray(generated, dtype=float))
    shared = np.atleast_1d(np.asarray(shared, dtype=float))
    mean, se = _paired(generated, shared)
    out = {"generated_loss": float(generated.mean()), "shared_loss": float(shared.mean()),
           "vs_shared": mean, "vs_shared_se": se, "generated": _clearly_better(mean, se)}
    if kl_generated is not None:
        d, dse = _paired(np.atleast_1d(np.asarray(kl_generated, dtype=float)),
                         np.atleast_1d(np.asarray(kl_shared, dtype=float)))
        faithful = dse is not None and mean < 0 and d < -CONFIRM_Z * dse
        out.update(kl_vs_shared=d, kl_vs_shared_se=dse, fidelity=faithful, generated=out["generated"] or faithful)
    return out


def _paired(a: np.ndarray, b: np.ndarray) -> tuple[float, float | None]:
    """Mean and standard error of the per-window difference ``a - b`` (no error from a single window)."""
    d = a - b
    return float(d.mean()), (float(d.std(ddof=1) / math.sqrt(len(d))) if len(d) > 1 else None)


def search_run(run, layout: ModelLayout, budget_bytes: int, confirm: int = 0, confirm_windows: int = 16) -> SearchResult:
    """:func:`best_configuration` for a trained run (its archive and sensitivity table); ``confirm`` > 0 measures
    that many of the best candidates, the best archived one and two llama.cpp files that fit (the largest and the
    other of least quantization error) on ``confirm_windows`` held-out windows of the training data
    (``run.calibration_loss``), each with its generated adapter and with the shared LoRA (when the run has
    adjustments) and, each with the adapter it would ship, by its KL divergence from the unquantized model with the
    shared LoRA (the fidelity rule), and all of them again on twice the windows when one is ahead of the largest
    llama.cpp file by between one and two standard errors. ``coalora search`` and ``coalora emit`` both choose through this."""
    from toolkit.sensitivity import load_error_table

    check_budget(layout, budget_bytes)
    source = run.check_layout_with_model()
    archive = Archive.load(run.archive_path) if Path(run.archive_path).exists() else Archive()
    table = Path(run.path) / "sensitivity.json"
    errors = load_error_table(table, layout)
    if errors is None and table.exists():
        raise CoaloraError(f"{table} is damaged or does not cover the run's tensors; train the run again")
    mixes = llama_mixes(run, layout, single_type_files=True, source=source)
    measure = shared = more = shared_more = kl = kl_more = None
    if confirm > 0:
        def per_window(n: int, adjusted: bool = True) -> Callable:
            return lambda cs: run.calibration_loss(cs, n, per_window=True, adjusted=adjusted)

        measure, more = per_window(confirm_windows), per_window(2 * confirm_windows)
        if run.has_adjustments():
            shared, shared_more = per_window(confirm_windows, False), per_window(2 * confirm_windows, False)

        def kl_on(n: int) -> Callable:
            return lambda cs, adjusted: run.calibration_divergence(cs, n, adjusted=adjusted)

        kl, kl_more = kl_on(confirm_windows), kl_on(2 * confirm_windows)
    return best_configuration(layout, archive, budget_bytes, errors=errors, evaluate=measure, n_confirm=confirm,
                              evaluate_shared=shared, mixes=mixes, evaluate_more=more,
                              evaluate_shared_more=shared_more, divergence=kl, divergence_more=kl_more)


def llama_mixes(run, layout: ModelLayout, single_type_files: bool = False, source=None) -> dict:
    """llama-quantize's mixed file types (Q4_K_M, ...) for the run's model, as llama.cpp's dry run assigns them
    (with the run's importance matrix when it has one), on ``layout``'s tensors; none when the model is not at hand
    (a search without confirmation needs only the run folder). ``single_type_files``: also its Q4_0, Q5_1, ...
    files, which give the output head more bits than the uniform ones. ``source``: the model's GGUF source when
    the caller has opened it already (its header is read once)."""
    from converters.gguf_source import open_source
    from converters.llama_mixes import MIXES, SINGLE_TYPE_FILES, mix_configurations

    model = Path(run.meta["model"])
    if not model.exists():
        return {}
    ftypes = MIXES + SINGLE_TYPE_FILES if single_type_files else MIXES
    return mix_configurations((source or open_source(model)).path, layout, ftypes, imatrix=run.imatrix())
