"""llama-quantize's own mixes (Q4_K_M, ...) as configurations: the types llama.cpp's dry run names are the ones its
real quantization writes, coalora writes those files byte for byte, and the search counts them as llama.cpp's
files (a mix of coalora's must beat the largest that fits by two standard errors)."""
from __future__ import annotations

import numpy as np
import pytest

from bench.common import llama_quantize
from test_convert import gguf_tensors
from test_imatrix import text_file, tiny, tiny_f32, tiny_imatrix  # noqa: F401  (fixtures)
from converters.errors import CoaloraError
from converters.llama_mixes import mix_configurations, mix_types
from toolkit.cli import main

MIXES = ("Q4_K_M", "Q5_K_S", "Q3_K_M", "IQ4_XS", "Q2_K", "Q4_0")  # Q4_0: a single-type file (a Q6_K head)


@pytest.mark.parametrize("with_imatrix", [False, True])
def test_dry_run_types_are_what_llama_quantize_writes(tiny, tiny_f32, tiny_imatrix, tmp_path, with_imatrix):
    im = tiny_imatrix[1] if with_imatrix else None
    layout = tiny.layout()
    mixes = mix_configurations(tiny_f32, layout, MIXES, imatrix=im)
    assert set(mixes) == set(MIXES)
    histograms = set()
    for ftype in MIXES:
        theirs = tmp_path / f"{ftype}.gguf"
        llama_quantize(tiny_f32, theirs, ftype, imatrix=im)
        written = gguf_tensors(theirs)
        assert mix_types(tiny_f32, ftype, im) == {n: t for n, (t, _) in written.items()}, ftype
        cfg = mixes[ftype]
        assert layout.file_bytes(cfg) == theirs.stat().st_size, ftype
        histograms.add(tuple(cfg.histogram().items()))
        # coalora writes llama.cpp's mix with the same tensor bytes
        recipe, ours = tmp_path / f"{ftype}.json", tmp_path / f"ours-{ftype}.gguf"
        cfg.save(recipe)
        args = ["--imatrix", str(tiny_imatrix[0])] if with_imatrix else []
        assert main(["convert", str(tiny_f32), "--recipe", str(recipe), "-o", str(ours), *args]) == 0
        mine = gguf_tensors(ours)
        assert all(mine[n] == written[n] for n in layout.names()), ftype
    assert len(histograms) >= 4, "the mixes differ from each other"


def test_search_weighs_llama_cpp_single_type_files(tiny, tiny_f32):
    """llama.cpp's Q4_0, Q5_1, ... files give the output head more bits than coalora's uniform files: the search
    counts them among llama.cpp's files (training does not add them to its set)."""
    from toolkit.budget_search import llama_mixes

    layout = tiny.layout()
    run = type("R", (), {"meta": {"model": str(tiny_f32)}, "imatrix": lambda self: None})()
    searched, trained = llama_mixes(run, layout, single_type_files=True), llama_mixes(run, layout)
    assert "Q4_0" in searched and "Q4_0" not in trained and set(trained) < set(searched)
    q4_0 = searched["Q4_0"]
    assert q4_0.types["output.weight"].name == "Q6_K" and q4_0 != layout.uniform("Q4_0")
    assert layout.file_bytes(q4_0) > layout.file_bytes(layout.uniform("Q4_0"))


def test_unknown_file_type_is_an_error(tiny_f32):
    with pytest.raises(CoaloraError, match="unknown llama.cpp file type"):
        mix_types(tiny_f32, "Q9_K_XL")


def test_a_llama_mix_is_the_reference_it_must_beat(tiny, tiny_f32):
    """The largest llama.cpp file within the budget may be a mix: it is measured, and a candidate of coalora's that
    is not better by two standard errors leaves it in place."""
    from toolkit.budget_search import best_configuration
    from toolkit.sensitivity import error_table

    layout = tiny.layout()
    mixes = mix_configurations(tiny_f32, layout, ("Q4_K_M",))
    budget = layout.file_bytes(mixes["Q4_K_M"])
    assert all(layout.file_bytes(layout.uniform(t)) != budget for t in layout.menu_names)
    errors = error_table(layout, tiny.gguf_weight)
    base = np.linspace(3.0, 3.5, 16)
    noise = np.random.default_rng(0).normal(0.0, 0.01, 16)

    def evaluate(cfgs):  # every other candidate a hair better, inside the noise
        return [base if c == mixes["Q4_K_M"] else base - 0.001 + noise for c in cfgs]

    res = best_configuration(layout, None, budget, errors=errors, evaluate=evaluate, n_confirm=2, mixes=mixes)
    conf = res.confirmation
    assert conf["uniform"] == "Q4_K_M" and res.cfg == mixes["Q4_K_M"] and res.source == "llama.cpp:Q4_K_M"
    assert sum(c["uniform"] for c in conf["candidates"]) == 1
    clear = best_configuration(layout, None, budget, errors=errors, n_confirm=2, mixes=mixes,
                               evaluate=lambda cs: [base if c == mixes["Q4_K_M"] else base - 0.05 for c in cs])
    assert clear.cfg != mixes["Q4_K_M"] and clear.file_bytes <= budget
    small = best_configuration(layout, None, budget - 1, errors=errors, evaluate=evaluate, n_confirm=2, mixes=mixes)
    assert small.confirmation["uniform"] != "Q4_K_M", "a mix over the budget is no candidate"
