"""Sensitivity allocation, Pareto search, budget search and `coalora search` on a synthetic layout."""
from __future__ import annotations

import json
import math
import random

import numpy as np
import pytest

from toolkit.budget_search import CONFIRM_Z, FIDELITY_SHARE, MIN_GAIN, best_configuration
from toolkit.cli import main
from converters.configuration import Configuration, ModelLayout, TensorSpec
from converters.errors import CoaloraError
from toolkit.pareto_search import (Archive, Record, hypervolume, make_candidate_pool, non_dominated,
                                   per_bin_fronts, plot_pareto, reference_point, refine, bin_of)
from toolkit.sensitivity import (allocate, byte_range, bytes_for_bpw, error_table, initial_training_set,
                                 total_error)

MENU = ("Q8_0", "Q6_K", "Q5_K", "Q5_0", "Q4_K", "Q4_0", "Q3_K", "Q2_K")
# the confirmation tests' largest file: no other type of MENU has its size (Q4_K ties Q4_0, Q5_K Q5_0)
LARGEST = "Q6_K"


def synthetic_layout(n_blocks: int = 3) -> ModelLayout:
    """Hidden 256, ffn 512: every row takes the K-quants."""
    shapes = {"attn_q": (256, 256), "attn_k": (128, 256), "attn_v": (128, 256), "attn_output": (256, 256),
              "ffn_gate": (512, 256), "ffn_up": (512, 256), "ffn_down": (256, 512)}
    ts = [TensorSpec(f"blk.{b}.{k}.weight", r, c, k, b) for b in range(n_blocks) for k, (r, c) in shapes.items()]
    ts.append(TensorSpec("token_embd.weight", 400, 256, "token_embd", -1))
    return ModelLayout(ts, fixed_bytes=4096, n_blocks=n_blocks, menu_names=MENU)


def synthetic_errors(layout: ModelLayout, seed: int = 0) -> tuple[dict, dict]:
    """(error table ~ n_weights * 4^-bpw * a type-specific factor, per-tensor sensitivity)."""
    rng = random.Random(seed)
    sens = {n: math.exp(rng.gauss(0, 1)) for n in layout.names()}
    fac = {q: 1 + 0.3 * rng.random() for q in MENU}
    errors = {n: {q.name: layout[n].n_weights * 4.0 ** -q.bits_per_weight * fac[q.name] for q in layout.menu(n)}
              for n in layout.names()}
    return errors, sens


def synthetic_loss(layout, errors, sens, noise: float = 0.002, seed: int = 1):
    """loss = 2 + sum_t sens_t * err_t(q) / n_weights_t (+ noise)."""
    rng = np.random.default_rng(seed)

    def evaluate(cfgs):
        return [2.0 + sum(sens[n] * errors[n][q.name] / layout[n].n_weights * 10 for n, q in c.types.items())
                + noise * rng.standard_normal() for c in cfgs]
    return evaluate


@pytest.fixture(scope="module")
def setup():
    layout = synthetic_layout()
    errors, sens = synthetic_errors(layout)
    return layout, errors, sens


def test_allocate_respects_budget_and_is_monotone(setup):
    layout, errors, _ = setup
    lo, hi = byte_range(layout)
    prev_err, prev_bytes = math.inf, 0
    for budget in np.linspace(lo, hi, 25).astype(int):
        cfg = allocate(layout, errors, int(budget))
        size = layout.file_bytes(cfg)
        assert size <= budget
        layout.validate(cfg)
        e = total_error(layout, errors, cfg)
        assert e <= prev_err + 1e-9 and size >= prev_bytes
        prev_err, prev_bytes = e, size
    assert allocate(layout, errors, hi) == Configuration({n: "Q8_0" for n in layout.names()})
    for bad in (lo - 1, hi + 1):
        with pytest.raises(CoaloraError, match="reachable range"):
            allocate(layout, errors, bad)


def test_initial_training_set_covers_bins(setup):
    layout, errors, _ = setup
    cfgs = initial_training_set(layout, errors, 2.75, 8.5, per_bin=2)
    bins = {bin_of(layout.bits_per_weight(c)) for c in cfgs}
    assert len(cfgs) >= 20 and len(bins) >= 18
    for c in cfgs:
        assert 2.5 <= layout.bits_per_weight(c) <= 8.5 + 1e-9


def test_per_bin_fronts_are_non_dominated():
    rng = random.Random(0)
    recs = [Record({}, 0, rng.uniform(2, 6), rng.uniform(1, 3)) for _ in range(200)]
    front = per_bin_fronts(recs)
    chosen = {id(r) for r in front}
    for r in recs:
        same_bin = [o for o in front if bin_of(o.bpw) == bin_of(r.bpw) and o is not r]
        dominated = any(o.bpw <= r.bpw and o.loss <= r.loss and (o.bpw < r.bpw or o.loss < r.loss) for o in same_bin)
        assert dominated != (id(r) in chosen)
    pts = np.array([[1, 3], [2, 2], [3, 1], [2.5, 2.5]])
    assert sorted(non_dominated(pts).tolist()) == [0, 1, 2]


def test_refine_increases_hypervolume(setup, tmp_path):
    layout, errors, sens = setup
    evaluate = synthetic_loss(layout, errors, sens)
    init = initial_training_set(layout, errors, 2.75, 8.5)
    archive = Archive()
    archive.add(layout, init, evaluate(init))
    ref = reference_point(archive.points())
    hv0 = hypervolume(archive.points(), ref)
    # the sensitivity table is deliberately not given to the search: the surrogate must learn
    archive, trainset = refine(layout, archive, evaluate, n_new=4, seed=0, pool_size=80)
    assert len(archive) == len(init) + 4 and {r.round for r in archive.records} == {0, 1}
    assert hypervolume(archive.points(), ref) > hv0
    keys = {c.key() for c in trainset}
    assert keys <= archive.keys()
    archive.save(tmp_path / "archive.json")
    again = Archive.load(tmp_path / "archive.json")
    assert again.records == archive.records
    plot_pareto(archive, trainset, tmp_path / "p.png")
    assert (tmp_path / "p.png").read_bytes()[:4] == b"\x89PNG"
    pool = make_candidate_pool(layout, archive, 50, seed=1, errors=errors)
    assert pool and not ({c.key() for c in pool} & archive.keys())


def _archived(layout, errors, sens) -> Archive:
    """An archive of the initial training set, scored by the noise-free synthetic loss."""
    init = initial_training_set(layout, errors, 2.75, 8.5)
    archive = Archive()
    archive.add(layout, init, synthetic_loss(layout, errors, sens, noise=0.0)(init))
    return archive


def test_embedding_menu_extends_only_the_embedding(setup):
    """F16 for the token embedding (llama-quantize --token-embedding-type f16): on its menu and no other tensor's,
    kept through the layout's description and menu changes (a description without it, an older run's, has none),
    and it opens budgets above the all-Q8_0 file, where the search gives the embedding F16."""
    layout, errors, _ = setup
    wide = layout.with_embedding_menu(["F16"])
    assert [q.name for q in wide.menu("token_embd.weight")] == ["F16", *[q.name for q in layout.menu("token_embd.weight")]]
    assert wide.menu("blk.0.attn_q.weight") == layout.menu("blk.0.attn_q.weight")
    back = ModelLayout.from_description(json.loads(json.dumps(wide.describe())))
    assert back.menu("token_embd.weight") == wide.menu("token_embd.weight")
    assert back.with_menu(MENU[:3]).embedding_menu == back.with_imatrix([]).embedding_menu == ("F16",)
    assert "embedding_menu" not in layout.describe()
    assert ModelLayout.from_description(layout.describe()).embedding_menu == ()
    with pytest.raises(CoaloraError, match="needs an importance matrix"):
        layout.with_embedding_menu(["IQ2_XXS"])
    q8 = layout.file_bytes(layout.uniform("Q8_0"))
    assert byte_range(layout)[1] == q8 < byte_range(wide)[1]
    werrors = {n: {**row, **({"F16": row["Q8_0"] / 100} if n == "token_embd.weight" else {})}
               for n, row in errors.items()}
    budget = q8 + layout["token_embd.weight"].bytes("F16") - layout["token_embd.weight"].bytes("Q8_0")
    res = best_configuration(wide, None, budget, errors=werrors)
    assert res.cfg.types["token_embd.weight"].name == "F16" and res.file_bytes <= budget
    with pytest.raises(CoaloraError):
        best_configuration(layout, None, budget, errors=errors)


def test_allocation_with_fixed_types(setup):
    """allocate(fixed=...) keeps the given types, stays under the budget, never beats the free allocation's error,
    and says so when the fixed types leave nothing under the budget."""
    layout, errors, _ = setup
    lo, hi = byte_range(layout)
    budget = (lo + hi) // 2
    free = allocate(layout, errors, budget)
    for q in layout.menu("token_embd.weight"):
        fixed = allocate(layout, errors, budget, fixed={"token_embd.weight": q.name})
        assert fixed.types["token_embd.weight"] == q and layout.file_bytes(fixed) <= budget
        assert total_error(layout, errors, fixed) >= total_error(layout, errors, free) * (1 - 1e-9)
    with pytest.raises(CoaloraError, match="no configuration with token_embd.weight in Q8_0 fits"):
        allocate(layout, errors, lo + 1, fixed={"token_embd.weight": "Q8_0"})
    with pytest.raises(CoaloraError, match="not in its menu"):
        allocate(layout, errors, budget, fixed={"token_embd.weight": "F16"})


def test_search_tries_each_embedding_type_and_measures_the_least_error_candidate(setup):
    """The candidates include the allocation with the embedding fixed in each type that fits, and the confirmation
    always measures the candidate of least summed error, however the predictor ranks it."""
    from toolkit.budget_search import _embedding_variants

    layout, errors, _ = setup
    lo, hi = byte_range(layout)
    budget = lo + (hi - lo) // 3
    variants = _embedding_variants(layout, errors, budget)
    assert [c.types["token_embd.weight"].name for c, _ in variants] == [q.name for q in layout.menu("token_embd.weight")]
    assert all(layout.file_bytes(c) <= budget and label.startswith("greedy:embedding ") for c, label in variants)
    seen = []

    def evaluate(cfgs):
        seen.extend(cfgs)
        return [np.full(4, 2.0) + 0.01 * np.arange(4) for _ in cfgs]

    res = best_configuration(layout, None, budget, predict=lambda cs: [-total_error(layout, errors, c) for c in cs],
                             evaluate=evaluate, errors=errors, n_confirm=1)  # the predictor prefers the worst
    best = min(total_error(layout, errors, c) for c in [allocate(layout, errors, budget)] + [c for c, _ in variants])
    assert min(total_error(layout, errors, c) for c in seen) <= best
    assert len(res.confirmation["candidates"]) >= 2
    # with F16 on the embedding's menu, the allocation with an F16 embedding is measured too, though its weight
    # error is no smaller (a Q8_0 embedding's input is rounded to Q8_0 blocks, an F16 one's to F16: no error sees it)
    wide = layout.with_embedding_menu(["F16"])
    werrors = {n: {**row, **({"F16": row["Q8_0"]} if n == "token_embd.weight" else {})} for n, row in errors.items()}
    seen.clear()
    res = best_configuration(wide, None, budget, predict=lambda cs: [-total_error(wide, werrors, c) for c in cs],
                             evaluate=evaluate, errors=werrors, n_confirm=1)
    assert any(c.types["token_embd.weight"].name == "F16" for c in seen)
    assert any(r["source"] == "greedy:embedding F16" for r in res.confirmation["candidates"])


def test_budget_search(setup):
    layout, errors, sens = setup
    evaluate = synthetic_loss(layout, errors, sens, noise=0.0)
    init = initial_training_set(layout, errors, 2.75, 8.5)
    archive = Archive()
    archive.add(layout, init, evaluate(init))
    lo, hi = byte_range(layout)
    for bpw in (3.0, 4.6, 6.2):
        budget = bytes_for_bpw(layout, bpw)
        res = best_configuration(layout, archive, budget, errors=errors, evaluate=evaluate)
        assert res.file_bytes == layout.file_bytes(res.cfg) <= budget and res.bpw <= bpw
        assert res.predicted_loss is not None and res.predicted_ppl == pytest.approx(math.exp(res.predicted_loss))
        # never worse than the archived members under the same budget
        under = [r.loss for r in archive.records if r.file_bytes <= budget]
        assert res.measured_loss <= min(under) + 1e-9
    res = best_configuration(layout, Archive(), lo, errors=errors)  # smallest file: cheapest types
    assert res.file_bytes <= lo and res.predicted_loss is None
    for bad in (lo - 1, hi + 1):
        with pytest.raises(CoaloraError, match=r"reachable range .* bpw"):
            best_configuration(layout, archive, bad)
    with pytest.raises(CoaloraError, match="nothing to rank"):
        best_configuration(layout, Archive(), hi)


def test_confirmation_always_measures_the_largest_uniform_file(setup):
    """With real confirmation the search never returns a configuration measured worse than the largest
    uniform file within the budget (what a user would otherwise ship), even when the GP ranks it low."""
    layout, errors, sens = setup
    archive = _archived(layout, errors, sens)
    for t in ("Q4_K", "Q6_K"):
        uniform = layout.uniform(t)
        budget = layout.file_bytes(uniform)
        seen = []

        def favour_uniform(cfgs):  # the real loss says: the uniform file is best
            seen.extend(cfgs)
            return [0.0 if c == uniform else 9.0 for c in cfgs]

        res = best_configuration(layout, archive, budget, errors=errors, evaluate=favour_uniform, n_confirm=1)
        assert uniform in seen and res.cfg == uniform and res.measured_loss == 0.0


def test_an_archived_uniform_file_keeps_its_name(setup):
    """Training keeps llama.cpp's files in the archive; the pick still says which llama.cpp file it is."""
    layout, errors, sens = setup
    evaluate = synthetic_loss(layout, errors, sens, noise=0.0)
    uniform = layout.uniform("Q6_K")
    init = initial_training_set(layout, errors, 2.75, 8.5) + [uniform]
    archive = Archive()
    archive.add(layout, init, evaluate(init))
    res = best_configuration(layout, archive, layout.file_bytes(uniform), errors=errors, n_confirm=1,
                             evaluate=lambda cfgs: [0.0 if c == uniform else 9.0 for c in cfgs])
    assert res.cfg == uniform and res.source == "uniform:Q6_K"


def test_confirmation_prefers_a_smaller_llama_cpp_file_that_measures_better(setup):
    """At some budgets a smaller llama.cpp file beats the largest that fits (uniform IQ2_S against Q2_K on
    SmolLM2): confirmation measures the best-ranked other llama.cpp file too and ships it when it is clearly
    better; a mix clearly ahead of the largest file but behind that one loses to it."""
    layout, errors, sens = setup
    archive = _archived(layout, errors, sens)
    largest = layout.uniform("Q6_K")
    others = {layout.uniform(t) for t in layout.menu_names} - {largest}
    base = np.linspace(3.0, 3.5, 32)
    noise = np.random.default_rng(0).normal(0.0, 0.02, size=32)
    seen = []

    def per_window(cfgs):  # every other llama.cpp file beats the largest by 0.2 nats, every mix by 0.1
        seen.extend(cfgs)
        return [base if c == largest else base - (0.2 if c in others else 0.1) + noise for c in cfgs]

    res = best_configuration(layout, archive, layout.file_bytes(largest), errors=errors, evaluate=per_window,
                             n_confirm=1)
    assert largest in seen and any(c in others for c in seen)
    assert res.cfg in others and res.source.startswith("uniform:") and res.file_bytes < layout.file_bytes(largest)
    picked = [c for c in res.confirmation["candidates"] if c["picked"]]
    assert len(picked) == 1 and picked[0]["vs_uniform"] < -CONFIRM_Z * picked[0]["vs_uniform_se"]


@pytest.mark.parametrize("better", ["Q4_0", "Q4_K"])
def test_confirmation_beats_the_best_of_llama_cpp_files_of_one_size(setup, better):
    """llama.cpp's files of the largest size that fits can tie (uniform Q4_0 and Q4_K here, Q4_0 and IQ4_NL on a
    real model): every one is measured and the one that measures best is the file to beat, so a mix ahead of the
    other one only is not picked."""
    layout, errors, sens = setup
    archive = _archived(layout, errors, sens)
    ties = {t: layout.uniform(t) for t in ("Q4_0", "Q4_K")}
    assert layout.file_bytes(ties["Q4_0"]) == layout.file_bytes(ties["Q4_K"])
    base = np.linspace(3.0, 3.5, 32)
    noise = np.random.default_rng(0).normal(0.0, 0.002, size=32)

    def per_window(cfgs):  # the better tied file 0.2 nats below the other one, every other candidate 0.1
        return [base - 0.2 if c == ties[better] else base if c in ties.values() else base - 0.1 + noise
                for c in cfgs]

    res = best_configuration(layout, archive, layout.file_bytes(ties["Q4_0"]), errors=errors, evaluate=per_window,
                             n_confirm=2)
    assert res.cfg == ties[better] and res.confirmation["uniform"] == better
    rows = res.confirmation["candidates"]
    assert [r["source"] for r in rows if r["uniform"]] == [f"uniform:{better}"]
    assert {f"uniform:{t}" for t in ties} <= {r["source"] for r in rows}


def test_confirmation_picks_the_other_llama_cpp_file_by_quantization_error(setup):
    """The second llama.cpp file confirmation measures is the one of least error in the sensitivity table, even
    when the predictor ranks the worst one first (the GP does so where the archive has no data: uniform IQ1_S at
    4 bpw on SmolLM2)."""
    from toolkit.sensitivity import total_error

    layout, errors, sens = setup
    archive = _archived(layout, errors, sens)
    largest = layout.uniform("Q6_K")
    budget = layout.file_bytes(largest)
    files = {layout.uniform(t) for t in layout.menu_names if layout.file_bytes(layout.uniform(t)) <= budget}
    best_other = min(files - {largest}, key=lambda c: total_error(layout, errors, c))
    seen = []

    def measure(cfgs):
        seen.extend(cfgs)
        return [3.0] * len(cfgs)

    best_configuration(layout, archive, budget, errors=errors, n_confirm=1, evaluate=measure,
                       predict=lambda cs: [-total_error(layout, errors, c) for c in cs])  # worst first
    assert largest in seen and best_other in seen


@pytest.mark.parametrize("gain, keeps_uniform", [(0.001, True), (0.05, False)])
def test_confirmation_keeps_the_uniform_file_unless_a_mix_is_clearly_better(setup, gain, keeps_uniform):
    """Per-window confirmation: a mix replaces the largest uniform file that fits only when its paired
    advantage exceeds CONFIRM_Z standard errors; a lower mean inside the noise keeps the uniform file."""
    layout, errors, sens = setup
    archive = _archived(layout, errors, sens)
    uniform = layout.uniform(LARGEST)
    noise = np.random.default_rng(0).normal(0.0, 0.02, size=32)  # per-window differences, se ~ 0.0035

    def per_window(cfgs):
        base = np.linspace(3.0, 3.5, 32)
        return [base if c == uniform else base - gain + noise for c in cfgs]

    res = best_configuration(layout, archive, layout.file_bytes(uniform), errors=errors, evaluate=per_window,
                             n_confirm=2)
    assert (res.cfg == uniform) == keeps_uniform
    if not keeps_uniform:
        assert res.measured_loss < float(np.linspace(3.0, 3.5, 32).mean())


def _centred_noise(seed: int, scale: float, n: int = 32):
    """Per-window differences of mean zero and their standard error."""
    noise = np.random.default_rng(seed).normal(0.0, scale, size=n)
    noise -= noise.mean()
    return noise, noise.std(ddof=1) / math.sqrt(n)


def _measure_vs(uniform, noise, gain, asked, n):
    """Per-window losses on ``n`` windows: ``uniform`` on a ramp, every other candidate ``gain()`` nats lower plus
    ``noise`` (repeated to ``n`` windows); ``asked`` records each call's window count."""
    def measure(cfgs):
        asked.append(n)
        base, d = np.linspace(3.0, 3.5, n), np.resize(noise, n)
        return [base if c == uniform else base - gain() + d for c in cfgs]
    return measure


@pytest.mark.parametrize("gain, keeps_uniform", [(0.004, True), (0.0075, False)])
def test_confirmation_needs_a_minimum_gain_over_the_uniform_file(setup, gain, keeps_uniform):
    """A mix ahead of the largest llama.cpp file by many standard errors but less than MIN_GAIN nats does not
    replace it (the demo's jetson pick, 0.0029 +- 0.0013 nats ahead of Q8_0 on the training text, was behind it on
    Pride and Prejudice); a gain above MIN_GAIN with the same noise does."""
    layout, errors, sens = setup
    archive = _archived(layout, errors, sens)
    uniform = layout.uniform(LARGEST)
    noise, _ = _centred_noise(3, 0.0005)  # se ~ 0.0001: tens of standard errors
    asked = []

    def per_window(n):
        return _measure_vs(uniform, noise, lambda: gain, asked, n)

    res = best_configuration(layout, archive, layout.file_bytes(uniform), errors=errors, evaluate=per_window(32),
                             n_confirm=2, evaluate_more=per_window(64))
    assert (res.cfg == uniform) == keeps_uniform
    # tens of standard errors: more windows cannot move the gain across MIN_GAIN
    assert asked == [32] and res.confirmation["min_gain"] == MIN_GAIN


def test_confirmation_measures_more_windows_for_a_gain_just_below_the_minimum(setup):
    """A candidate 1.4 standard errors ahead with a gain just under MIN_GAIN on 32 windows is measured again (the
    pure-IQ4_NL budget of the 200-step imatrix_quality run: 0.0049 +- 0.0034 nats on 32 windows, 0.0081 +- 0.0023
    on 64, and 1.4% better on Pride and Prejudice than the uniform file)."""
    layout, errors, sens = setup
    archive = _archived(layout, errors, sens)
    uniform = layout.uniform(LARGEST)
    noise, se32 = _centred_noise(0, 0.02)
    gain = {32: 0.0045, 64: 0.008}
    assert se32 < gain[32] < MIN_GAIN < gain[32] + se32
    asked = []

    def per_window(n):
        return _measure_vs(uniform, noise, lambda: gain[n], asked, n)

    res = best_configuration(layout, archive, layout.file_bytes(uniform), errors=errors, evaluate=per_window(32),
                             n_confirm=2, evaluate_more=per_window(64))
    assert asked == [32, 64] and res.cfg != uniform and res.confirmation["extended_from_windows"] == 32


def test_confirmation_measures_more_windows_when_undecided(setup):
    """A candidate ahead of the largest llama.cpp file by between one and two standard errors is not dismissed on
    the windows at hand: every candidate is measured again on more windows and the rule applied to those (the
    IQ4_XS budget of bench/results/imatrix_quality-session22.md kept llama.cpp's file on 1.9 standard errors)."""
    layout, errors, sens = setup
    archive = _archived(layout, errors, sens)
    uniform = layout.uniform(LARGEST)
    noise, se32 = _centred_noise(0, 0.02)
    gain = 1.8 * se32  # 1.8 standard errors on 32 windows; about 2.5 on the same differences twice over
    asked = []

    def per_window(n):
        return _measure_vs(uniform, noise, lambda: gain, asked, n)

    budget = layout.file_bytes(uniform)
    res = best_configuration(layout, archive, budget, errors=errors, evaluate=per_window(32), n_confirm=2,
                             evaluate_more=per_window(64))
    assert asked == [32, 64] and res.cfg != uniform
    assert res.confirmation["windows"] == 64 and res.confirmation["extended_from_windows"] == 32
    without = best_configuration(layout, archive, budget, errors=errors, evaluate=per_window(32), n_confirm=2)
    assert without.cfg == uniform and "extended_from_windows" not in without.confirmation
    asked.clear()  # no more windows to give (a short held-out text): the first measurement decides
    res = best_configuration(layout, archive, budget, errors=errors, evaluate=per_window(32), n_confirm=2,
                             evaluate_more=per_window(32))
    assert asked == [32, 32] and res.cfg == uniform and "extended_from_windows" not in res.confirmation
    from rich.console import Console

    from toolkit.cmd_search import confirmation_table

    console = Console(width=400, record=True)
    console.print(confirmation_table(dict(without.confirmation, windows=64, extended_from_windows=32)))
    assert "confirmation on 64 held-out windows (measured again after 32" in console.export_text()
    asked.clear()  # clearly ahead, or clearly not: no second measurement
    for g in (0.05, 0.0):
        gain = g
        best_configuration(layout, archive, budget, errors=errors, evaluate=per_window(32), n_confirm=2,
                           evaluate_more=per_window(64))
    assert asked == [32, 32]


@pytest.mark.parametrize("gain, kl_gap, picked", [(0.002, 0.001, True), (0.002, 0.0, False), (-0.001, 0.001, False),
                                                   (0.002, 0.0006, False)])
def test_fidelity_rule_trusts_a_small_gain_of_bytes_closer_to_the_unquantized_model(setup, gain, kl_gap, picked):
    """A gain below MIN_GAIN replaces the largest llama.cpp file when, with the shared LoRA on both, the candidate
    is also clearly closer to the unquantized model: KL divergence lower by CONFIRM_Z standard errors and by
    FIDELITY_SHARE of the file's (SmolLM2, 200-step run, Q5_K_M budget: a mix with KL 0.0027 against Q5_K_M's
    0.0061, 0.0011 nats ahead on the training text and 0.08% on Pride and Prejudice). Not without the KL gap,
    nor with a higher loss, nor with a gap of many standard errors but a fifth of the file's divergence (the Q4_K_M
    budget: 0.0202 against 0.0227, and 0.6% behind on Pride and Prejudice)."""
    layout, errors, sens = setup
    archive = _archived(layout, errors, sens)
    uniform = layout.uniform(LARGEST)
    noise, _ = _centred_noise(3, 0.0005)
    kl_noise, kl_se = _centred_noise(4, 0.0005)
    assert abs(gain) < MIN_GAIN and (kl_gap == 0 or kl_gap > CONFIRM_Z * kl_se)
    assert (kl_gap >= FIDELITY_SHARE * 0.003) == (kl_gap == 0.001)
    asked = []
    loss = _measure_vs(uniform, noise, lambda: gain, asked, 32)

    def divergence(cfgs, adjusted):
        return [np.full(32, 0.003) if c == uniform else 0.003 - kl_gap + kl_noise for c in cfgs]

    res = best_configuration(layout, archive, layout.file_bytes(uniform), errors=errors, evaluate=loss,
                             n_confirm=2, evaluate_shared=loss, divergence=divergence)
    assert (res.cfg != uniform) == picked and not res.adjusted
    rows = res.confirmation["candidates"]
    assert all(r["kl"] == pytest.approx(0.003 if r["uniform"] else 0.003 - kl_gap) for r in rows)
    assert any(r.get("fidelity") for r in rows) == picked
    from rich.console import Console

    from toolkit.cmd_search import confirmation_table

    console = Console(width=400, record=True)
    console.print(confirmation_table(res.confirmation))
    text = console.export_text()
    assert "KL from F32" in text and ("yes (fidelity)" in text) == picked
    without = best_configuration(layout, archive, layout.file_bytes(uniform), errors=errors, evaluate=loss,
                                 n_confirm=2, evaluate_shared=loss)
    assert without.cfg == uniform and "kl" not in without.confirmation["candidates"][0]  # below MIN_GAIN


@pytest.mark.parametrize("clear_gain", [None, 0.02])
def test_fidelity_rule_picks_the_candidate_closest_to_the_unquantized_model(setup, clear_gain):
    """Of candidates the fidelity rule accepts, none better on loss alone, the one of least KL divergence is picked,
    not the one of least loss: their losses differ by less than the windows resolve (SmolLM2, 200-step run of
    a86774f, Q6_K budget: llama.cpp's Q5_1 file, 0.0013 nats lower than an F16-embedding allocation on the training
    text but KL 0.0026 against 0.0020, was 0.03% behind stock Q6_K + full-precision LoRA on Pride and Prejudice).
    With a candidate clearly better on loss, the lowest loss is picked as before."""
    layout, errors, sens = setup
    archive = _archived(layout, errors, sens)
    uniform = layout.uniform(LARGEST)
    noise, _ = _centred_noise(3, 0.0005)
    order = []  # the candidates in the order first measured: gains rise and divergences rise along it

    def rank(c):
        if str(c) not in order:
            order.append(str(c))
        return order.index(str(c))

    def loss(cfgs):
        base = np.linspace(3.0, 3.5, 32)
        return [base if c == uniform else base - 0.001 - 0.0002 * rank(c) + noise for c in cfgs]

    def divergence(cfgs, adjusted):
        return [np.full(32, 0.003) if c == uniform else np.full(32, 0.001 + 0.0001 * rank(c)) for c in cfgs]

    res = best_configuration(layout, archive, layout.file_bytes(uniform), errors=errors, evaluate=loss,
                             n_confirm=2, evaluate_shared=loss, divergence=divergence)
    rows = res.confirmation["candidates"]
    faithful = [r for r in rows if r.get("fidelity")]
    assert len(faithful) >= 2
    picked = next(r for r in rows if r["picked"])
    assert picked["kl"] == min(r["kl"] for r in faithful)
    assert picked["measured_loss"] > min(r["measured_loss"] for r in faithful)
    if clear_gain is None:
        return

    def loss_with_a_clear_gain(cfgs):  # the candidate measured last: ahead by far more than MIN_GAIN
        out = loss(cfgs)
        return [o - clear_gain if c != uniform and rank(c) == len(order) - 1 else o for c, o in zip(cfgs, out)]

    order.clear()
    res = best_configuration(layout, archive, layout.file_bytes(uniform), errors=errors,
                             evaluate=loss_with_a_clear_gain, n_confirm=2, evaluate_shared=loss_with_a_clear_gain,
                             divergence=divergence)
    rows = res.confirmation["candidates"]
    picked = next(r for r in rows if r["picked"])
    assert picked["measured_loss"] == min(r["measured_loss"] for r in rows)
    assert picked["kl"] > min(r["kl"] for r in rows if r.get("fidelity"))


def test_fidelity_rule_measures_more_windows_when_undecided(setup):
    """A candidate with a lower loss whose divergence is lower by FIDELITY_SHARE of the file's but by only 1.5
    standard errors is measured again on twice the windows, where it is clear."""
    layout, errors, sens = setup
    archive = _archived(layout, errors, sens)
    uniform = layout.uniform(LARGEST)
    noise, _ = _centred_noise(3, 0.0005)
    kl_noise, kl_se = _centred_noise(5, 0.06)
    gap = {32: 1.5 * kl_se, 64: 0.03}
    assert gap[32] > FIDELITY_SHARE * 0.05
    asked = []

    def divergence(n):
        return lambda cfgs, adjusted: [np.full(n, 0.05) if c == uniform else 0.05 - gap[n] + np.resize(kl_noise, n)
                                       for c in cfgs]

    loss = {n: _measure_vs(uniform, noise, lambda: 0.002, asked, n) for n in (32, 64)}
    res = best_configuration(layout, archive, layout.file_bytes(uniform), errors=errors, evaluate=loss[32],
                             n_confirm=2, evaluate_more=loss[64], divergence=divergence(32),
                             divergence_more=divergence(64))
    assert asked == [32, 64] and res.cfg != uniform and res.confirmation["extended_from_windows"] == 32
    assert res.confirmation["fidelity_share"] == FIDELITY_SHARE


@pytest.mark.parametrize("closer_with", [None, "generated", "shared"])
def test_fidelity_rule_judges_each_candidate_with_the_adapter_it_ships(setup, closer_with):
    """The divergence of a candidate that ships its generated adapter is measured with that adapter: a candidate
    ahead by less than MIN_GAIN and closer to the full-precision fine-tune with its generated adapter replaces the
    file; one closer only with the shared LoRA, which it does not ship, does not."""
    layout, errors, sens = setup
    archive = _archived(layout, errors, sens)
    uniform = layout.uniform(LARGEST)
    base = np.linspace(3.0, 3.5, 32)
    noise, _ = _centred_noise(3, 0.0005)
    asked = set()

    def generated(cfgs):  # every other candidate clearly better with its generated adapter, by less than MIN_GAIN
        return [base if c == uniform else base - 0.004 + noise for c in cfgs]

    def shared(cfgs):
        return [base + 0.01 if c != uniform else base for c in cfgs]

    def divergence(cfgs, adjusted):
        asked.add(adjusted)
        closer = closer_with == ("generated" if adjusted else "shared")
        return [np.full(32, 0.001 if closer and c != uniform else 0.003) for c in cfgs]

    res = best_configuration(layout, archive, layout.file_bytes(uniform), errors=errors, evaluate=generated,
                             n_confirm=2, evaluate_shared=shared, divergence=divergence)
    rows = res.confirmation["candidates"]
    assert True in asked and all(r["adapter"] == "generated" for r in rows if r["kl"] == 0.001)
    assert (res.cfg != uniform) == (closer_with == "generated")
    assert any(r.get("fidelity") for r in rows) == (closer_with == "generated")
    if closer_with == "generated":
        assert res.adjusted and next(r for r in rows if r["picked"])["kl"] == 0.001


@pytest.mark.parametrize("kl_gap, picked", [(0.006, True), (0.004, False)])
def test_fidelity_rule_asks_at_most_min_gain_of_divergence(setup, kl_gap, picked):
    """Far from full precision a quarter of the file's divergence is several times MIN_GAIN: a divergence lower
    by MIN_GAIN (and CONFIRM_Z standard errors) suffices there (SmolLM2, 200-step run of a86774f, pure IQ4_NL
    budget: a mix 0.0017 +- 0.0038 nats ahead on the training text, KL 0.0807 against the file's 0.0865 with their
    generated adapters, 1.0% ahead on Pride and Prejudice)."""
    layout, errors, sens = setup
    archive = _archived(layout, errors, sens)
    uniform = layout.uniform(LARGEST)
    noise, _ = _centred_noise(3, 0.0005)
    kl_noise, kl_se = _centred_noise(4, 0.0005)
    assert kl_gap < FIDELITY_SHARE * 0.09 and (kl_gap > MIN_GAIN + CONFIRM_Z * kl_se) == picked
    loss = _measure_vs(uniform, noise, lambda: 0.002, [], 32)

    def divergence(cfgs, adjusted):
        return [np.full(32, 0.09) if c == uniform else 0.09 - kl_gap + kl_noise for c in cfgs]

    res = best_configuration(layout, archive, layout.file_bytes(uniform), errors=errors, evaluate=loss,
                             n_confirm=2, evaluate_shared=loss, divergence=divergence)
    assert (res.cfg != uniform) == picked


@pytest.mark.parametrize("gain, scale, generated", [(0.001, 0.02, False), (-0.01, 0.02, False), (0.05, 0.02, True),
                                                    (0.004, 0.0005, False), (0.0075, 0.0005, True)])
def test_confirmation_keeps_the_generated_adapter_only_when_clearly_better(setup, gain, scale, generated):
    """Every candidate's generated adapter competes with the shared LoRA on the same windows: it is kept only
    when better by CONFIRM_Z standard errors and by MIN_GAIN nats (at Q6_K and Q8_0 a 200-step run's adapters
    were 0.0024 +- 0.0011 nats ahead on the training text and behind on Pride and Prejudice); otherwise the
    result says "shared" and reports the shared loss."""
    layout, errors, sens = setup
    archive = _archived(layout, errors, sens)
    base = np.linspace(3.0, 3.5, 32)
    noise = np.random.default_rng(1).normal(0.0, scale, size=32)
    asked = []

    def shared(cfgs):
        asked.extend(cfgs)
        return [base + gain + noise for _ in cfgs]

    budget = layout.file_bytes(layout.uniform("Q4_K"))
    res = best_configuration(layout, archive, budget, errors=errors, evaluate=lambda cs: [base for _ in cs],
                             n_confirm=2, evaluate_shared=shared)
    a, rows = res.confirmation["adapter"], res.confirmation["candidates"]
    assert len(asked) == len(rows) >= 3 and res.cfg in asked  # every candidate, once
    assert res.adjusted == generated == a["generated"]
    assert {r["adapter"] for r in rows} == {"generated" if generated else "shared"}
    assert a["vs_shared"] == pytest.approx(-gain - noise.mean())
    assert res.measured_loss == pytest.approx(base.mean() if generated else (base + gain + noise).mean())
    assert res.extra()["adapter"] == ("generated" if generated else "shared")
    plain = best_configuration(layout, archive, budget, errors=errors, evaluate=lambda cs: [base for _ in cs],
                               n_confirm=2)
    assert plain.adjusted and "adapter" not in plain.confirmation  # nothing to compare with: generated


@pytest.mark.parametrize("loss_gain, kl_gain, generated", [(0.001, 3.0, True), (0.001, 1.0, False),
                                                             (-0.001, 5.0, False), (0.001, -3.0, False)])
def test_generated_adapter_kept_when_clearly_closer_to_the_full_precision_fine_tune(setup, loss_gain, kl_gain,
                                                                                    generated):
    """A generated adapter ahead of the shared LoRA by less than MIN_GAIN is kept when its loss is lower and its
    KL divergence from the full-precision fine-tune lower by CONFIRM_Z standard errors (a 5.2M float Llama's
    IQ4_XS file: 0.0021 nats ahead, KL lower by 2.9 standard errors, 0.37% ahead on held-out text); not when the
    divergence is lower by less, or higher, or its loss is not lower."""
    layout, errors, sens = setup
    archive = _archived(layout, errors, sens)
    base = np.linspace(3.0, 3.5, 32)
    noise, _ = _centred_noise(3, 0.0005)
    kl_noise, kl_se = _centred_noise(4, 0.0002)

    def shared(cfgs):
        return [base + loss_gain + noise for _ in cfgs]

    def divergence(cfgs, adjusted):
        return [np.full(32, 0.01) - (kl_gain * kl_se + kl_noise if adjusted else 0.0) for _ in cfgs]

    budget = layout.file_bytes(layout.uniform("Q4_K"))
    res = best_configuration(layout, archive, budget, errors=errors, evaluate=lambda cs: [base for _ in cs],
                             n_confirm=2, evaluate_shared=shared, divergence=divergence)
    a = res.confirmation["adapter"]
    assert res.adjusted == generated == a["generated"] == a["fidelity"]
    assert a["kl_vs_shared"] == pytest.approx(-kl_gain * kl_se) and a["kl_vs_shared_se"] == pytest.approx(kl_se)
    assert {r["adapter"] for r in res.confirmation["candidates"]} == {"generated" if generated else "shared"}


def test_confirmation_compares_each_file_with_the_adapter_it_ships_with(setup):
    """A file that beats the largest llama.cpp file only with its generated adapter, while both are better with
    the shared LoRA and equal there (demo phone-8gb, session 20: Q5_K_S chosen over Q5_K_M on generated adapters,
    then shipped with the shared LoRA, 0.03% behind Q5_K_M + shared LoRA), does not replace it."""
    layout, errors, sens = setup
    archive = _archived(layout, errors, sens)
    largest = layout.uniform("Q6_K")
    base = np.linspace(3.0, 3.5, 32)
    noise = np.random.default_rng(2).normal(0.0, 0.02, size=32)

    def generated(cfgs):  # with generated adapters every other candidate is clearly ahead of the largest file ...
        return [base + 0.2 if c == largest else base + 0.1 + noise for c in cfgs]

    def shared(cfgs):  # ... but every candidate is better still with the shared LoRA, and there all are equal
        return [base + noise * (c != largest) for c in cfgs]

    res = best_configuration(layout, archive, layout.file_bytes(largest), errors=errors, n_confirm=2,
                             evaluate=generated, evaluate_shared=shared)
    assert res.cfg == largest and not res.adjusted and res.measured_loss == pytest.approx(base.mean())
    rows = res.confirmation["candidates"]
    assert all(r["adapter"] == "shared" for r in rows) and sum(r["picked"] for r in rows) == 1
    assert all(r["measured_loss"] == pytest.approx(r["shared_loss"]) for r in rows)


def test_calibration_batch_sizes():
    import torch

    from toolkit.text_data import TokenStream

    s = TokenStream(np.arange(100_000, dtype=np.int32), seq_len=16, calib_windows=4)
    assert s.calibration_batch().shape == (4, 16)
    assert s.calibration_batch(32).shape == (32, 16)
    assert torch.equal(s.calibration_batch(32)[:4], s.calibration_batch())
    assert len(s.calibration_batch(10_000)) == len(s.calib) // 16  # capped at the held-out tail


def test_real_ggml_sensitivity(tmp_path):
    layout = ModelLayout([TensorSpec("blk.0.attn_q.weight", 32, 256, "attn_q", 0),
                          TensorSpec("blk.0.ffn_down.weight", 16, 512, "ffn_down", 0)], 0, 1,
                         menu_names=("Q8_0", "Q6_K", "Q4_0", "Q2_K"))
    rng = np.random.default_rng(0)
    w = {n: rng.standard_normal((layout[n].n_rows, layout[n].n_per_row)).astype(np.float32) for n in layout.names()}
    calls = []
    table = error_table(layout, lambda n: calls.append(n) or w[n], cache=tmp_path / "sens.json")
    for row in table.values():
        assert row["Q8_0"] < row["Q6_K"] < row["Q4_0"] < row["Q2_K"]
    again = error_table(layout, lambda n: calls.append(n) or w[n], cache=tmp_path / "sens.json")
    assert again == table and len(calls) == 2  # second call came from the cache
    imp = {n: np.r_[np.full(128, 10.0), np.zeros(layout[n].n_per_row - 128)] for n in layout.names()}
    weighted = error_table(layout, lambda n: w[n], importance=imp)
    assert weighted["blk.0.attn_q.weight"]["Q4_0"] != pytest.approx(table["blk.0.attn_q.weight"]["Q4_0"])


def test_sensitivity_on_threads_is_the_same(tmp_path):
    """ggml quantizes large tensors in row chunks on several threads: the same bytes, hence the same errors
    (with and without importance weights)."""
    layout = ModelLayout([TensorSpec("blk.0.ffn_down.weight", 512, 512, "ffn_down", 0)], 0, 1,
                         menu_names=("Q8_0", "Q4_K", "IQ4_NL", "Q2_K"))
    rng = np.random.default_rng(1)
    w = rng.standard_normal((512, 512)).astype(np.float32)

    class Imatrix:  # what error_table asks of converters.imatrix.Imatrix
        def weights(self, name):
            return np.linspace(0.5, 2.0, 512, dtype=np.float32)

        def values_sha256(self):
            return "0" * 64

    one = error_table(layout, lambda n: w, imatrix=Imatrix())
    two = error_table(layout, lambda n: w, imatrix=Imatrix(), threads=2)
    assert one == two and set(one["blk.0.ffn_down.weight"]) == {"Q8_0", "Q4_K", "IQ4_NL", "Q2_K"}


def test_cli_errors(tmp_path, capsys):
    assert main(["search", str(tmp_path / "nope"), "--bpw", "4"]) == 1
    assert "error" in capsys.readouterr().err
    assert main(["search", str(tmp_path), "--bpw", "4", "--budget-bytes", "10"]) == 1
    assert "exactly one" in capsys.readouterr().err
    assert main(["search", str(tmp_path)]) == 1
    assert "exactly one" in capsys.readouterr().err
    assert main(["search", str(tmp_path), "--bpw", "4"]) == 1  # a folder that is no run
    err = capsys.readouterr().err
    assert err.startswith("coalora: error:") and len(err.strip().splitlines()) == 1


def test_cli_search_on_a_run_folder(setup, tmp_path, capsys):
    """A run folder as the trainer leaves it (run.json with the layout, archive.json, sensitivity.json)."""
    layout, errors, sens = setup
    archive = _archived(layout, errors, sens)
    run = tmp_path / "run"
    run.mkdir()
    (run / "run.json").write_text(json.dumps({
        "status": "trained", "layout": layout.describe(), "model": "unused", "model_sha256": "0" * 64, "step": 1,
        "options": {"mode": "coa", "rank": 8, "alpha": 16.0, "seed": 0, "seq_len": 256, "calib_windows": 4}}))
    archive.save(run / "archive.json")
    (run / "sensitivity.json").write_text(json.dumps({"key": "x", "errors": errors}))
    out = tmp_path / "cfg.json"
    assert main(["search", str(run), "--bpw", "4.5", "-o", str(out), "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    saved = json.loads(out.read_text())
    cfg = Configuration.from_json(saved)
    assert layout.file_bytes(cfg) == saved["file_bytes"] == res["file_bytes"] <= bytes_for_bpw(layout, 4.5)
    assert saved["bpw"] <= 4.5 and saved["predicted_ppl"] == pytest.approx(math.exp(saved["predicted_loss"]))
    lo, _ = byte_range(layout)
    assert main(["search", str(run), "--budget-bytes", str(lo - 1)]) == 1
    assert "reachable range" in capsys.readouterr().err
    assert main(["search", str(run), "--budget-bytes", str(lo + 5000)]) == 0
    assert "file bytes" in capsys.readouterr().out


def test_search_compiles_no_torch_extension(tmp_path, monkeypatch):
    """The search keeps botorch's pure-PyTorch qLogEHVI: nothing is JIT-compiled (a compile lock left by a killed
    process made every later search wait forever)."""
    from botorch.acquisition.multi_objective import logei

    from toolkit import pareto_search

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    monkeypatch.setattr(logei, "_load_attempted", False, raising=False)
    monkeypatch.setattr(logei, "_C", None, raising=False)
    pareto_search._without_jit_kernels()
    if hasattr(logei, "_try_load_fused_kernel"):
        logei._try_load_fused_kernel()
    assert getattr(logei, "_C", None) is None and not any(tmp_path.iterdir())
