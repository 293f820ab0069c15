"""bench/quality.py's report over several seeds: per-row mean, spread and per-seed values, and the per-seed win
counts under the table (each rival, the per-configuration gap, where the confirmation kept the generated adapter)."""
from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench import quality  # noqa: E402


def _rows() -> list[dict]:
    rows = [{"seed": None, "budget": None, "row": "0", "method": "F32, no adapter", "file_bytes": 100, "bpw": 32.0,
             "ppl": 25.0, "finetune_s": 0.0}]
    for seed, coa in ((0, 21.0), (1, 21.4), (2, 20.9)):
        def add(row, method, ppl, budget=None, **extra):
            rows.append({"seed": seed, "budget": budget, "row": row, "method": method, "file_bytes": 10 + seed,
                         "bpw": 5.0 + seed / 10, "ppl": ppl, "finetune_s": 100.0 + seed, **extra})
        add("1", "F32 + full-precision LoRA (floor)", 20.0)
        add("2", "stock Q4_0 + full-precision LoRA", 22.0)
        add("2i", "stock Q4_0 + imatrix + full-precision LoRA", 21.2)
        add("3", "searched mix, no adapter", 24.0, "<= Q4_0 size")
        add("4", "searched mix + shared LoRA", 21.3, "<= Q4_0 size")
        add("5", "searched mix + per-configuration LoRA", 21.1, "<= Q4_0 size")
        add("6", "searched mix + CoA-LoRA adapter", coa, "<= Q4_0 size", kept_by_confirmation=seed != 1)
    for r in rows:
        if r["seed"] is not None:
            r["gap_to_floor_pct"] = round(100 * (r["ppl"] / 20.0 - 1), 2)
    return rows


def test_summary_mean_spread_and_seeds():
    table = {(r["row"], r["method"]): r for r in quality.summary(_rows())}
    coa = table[("6", "searched mix + CoA-LoRA adapter")]
    assert coa["n"] == 3 and coa["ppl"] == round((21.0 + 21.4 + 20.9) / 3, 4)
    assert coa["ppl_sd"] == round(0.26457513110645864, 4) and coa["ppl_seeds"] == "21.000 / 21.400 / 20.900"
    assert coa["file_bytes"] == 12 and coa["bpw"] == 5.1
    f32 = table[("0", "F32, no adapter")]
    assert f32["n"] == 1 and f32["ppl_sd"] is None and f32["gap_to_floor_pct"] is None


def test_orderings_count_wins_per_rival():
    text = quality.orderings(_rows(), ["Q4_0"])
    # CoA 21.0 / 21.4 / 20.9 against shared 21.3, stock 22.0, stock + imatrix 21.2, per-configuration 21.1
    assert "the shared LoRA in 2" in text and "stock Q4_0 + full-precision LoRA in 3" in text
    assert "stock Q4_0 + imatrix + full-precision LoRA in 2" in text
    assert "-0.47%, +1.42%, -0.95% from the per-configuration LoRA" in text
    assert text.endswith("kept it over the shared LoRA in 2.")


def test_plot_of_the_summary(tmp_path):
    quality.plot(quality.summary(_rows()), tmp_path / "quality.png")
    assert (tmp_path / "quality.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_evaluator_cache_resumes_by_content(tmp_path, monkeypatch):
    import os
    import types

    import numpy as np

    measured = []

    class Model:
        def close(self):
            pass

    rt = types.SimpleNamespace(open_model=lambda *a, **k: Model(), set_adapter=lambda *a: None,
                               load_adapter=lambda *a: types.SimpleNamespace(close=lambda: None))
    model, adapter = tmp_path / "m.gguf", tmp_path / "a.gguf"
    model.write_bytes(b"model"), adapter.write_bytes(b"adapter")

    def evaluator():
        ev = quality.Evaluator(None, 1, 512, windows=[np.arange(4)], cache=tmp_path / "ppl.json")
        ev.rt = rt
        ev._ppl = lambda llm: measured.append(1) or 20.0 + len(measured)
        return ev

    assert evaluator().ppl(model, [None, adapter]) == [21.0, 22.0] and len(measured) == 2
    again = evaluator()  # a new process: read back from the file
    assert again.ppl(model, [None, adapter]) == [21.0, 22.0] and again.cache_hits == 2 and len(measured) == 2
    st = adapter.stat()
    adapter.write_bytes(b"adapted")  # written again, with other bytes
    os.utime(adapter, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert again.ppl(model, [None, adapter]) == [21.0, 23.0] and again.cache_hits == 3
    copy = tmp_path / "seed-1" / "m.gguf"  # the same bytes elsewhere: read back
    copy.parent.mkdir(), copy.write_bytes(b"model")
    assert again.ppl(copy, [None]) == [21.0] and again.cache_hits == 4 and len(measured) == 3
    other = quality.Evaluator(None, 1, 512, windows=[np.arange(5)], cache=tmp_path / "ppl.json")
    other.rt, other._ppl = rt, lambda llm: 30.0
    assert other.ppl(model, [None]) == [30.0]  # other windows: measured, not read back


def test_runs_trained_by_other_code_are_named():
    now = "c" * 40
    assert quality.trained_elsewhere({"fp seed 0": now}, now) == ""
    text = quality.trained_elsewhere({"fp seed 0": "a" * 40, "coa seed 0": "a" * 40, "fp seed 1": now,
                                      "shared seed 0": "not recorded"}, now)
    assert text == (" Trained by commit aaaaaaaaaa (kept from an earlier invocation): fp seed 0, coa seed 0."
                    " Trained by an unrecorded commit (kept from an earlier invocation): shared seed 0.")
