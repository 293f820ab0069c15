"""bench/imatrix_quality.py's result file: budgets an invocation has not measured (not asked for, or not reached
when it was interrupted) stay whole from the previous result, with the provenance of the run that measured them."""
from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench import imatrix_quality  # noqa: E402


def _goal(stock, size, ppl):
    return {"stock": stock, "budget_bytes": size, "baseline_bpw": 5.0, "baseline_ppl": 22.0, "coalora_bytes": size,
            "coalora_bpw": 5.0, "coalora_ppl": ppl, "coalora_adapter": "shared", "other_adapter_ppl": ppl + 1,
            "coalora_vs_baseline": ppl / 22.0 - 1, "coalora_gap_to_floor": ppl / 20.0 - 1, "wins": ppl < 22.0}


def _rows(stock, size, ppl):
    return [{"stock": stock, "method": imatrix_quality.COALORA, "file_bytes": size, "bpw": 5.0, "ppl": ppl}]


def test_budgets_not_measured_yet_are_kept_with_their_provenance(tmp_path, monkeypatch):
    written = {}
    monkeypatch.setattr(imatrix_quality, "write_results", lambda name, data, md: written.update(data=data, md=md))
    old, older = {"commit": "a" * 40}, {"commit": "b" * 40}
    kept = {"goal": [_goal("Q4_0", 300, 21.5), _goal("IQ4_XS", 200, 22.1), _goal("Q8_0", 900, 20.7)],
            "rows": [{**r, "reused": True} for s, n, p in (("Q4_0", 300, 21.5), ("IQ4_XS", 200, 22.1),
                                                            ("Q8_0", 900, 20.7)) for r in _rows(s, n, p)],
            "groups": [{"stocks": ["Q8_0"], "provenance": older}, {"stocks": ["Q4_0", "IQ4_XS"], "provenance": old}]}
    o = {"steps": 50, "batch": 4, "seq_len": 128, "rank": 8}
    args = type("A", (), {"windows": 16, "note": "", "name": "imatrix_quality", "label": "Tiny", "data": "austen",
                          "hold_out": 0.0})()
    floor_row = {"method": imatrix_quality.FLOOR, "file_bytes": 1000, "bpw": 32.0, "ppl": 20.0}
    # interrupted after measuring IQ4_XS only: Q4_0 (asked for, not reached) and Q8_0 (not asked for) stay
    imatrix_quality.save(Path("run"), "f" * 64, o, args, Path("model"), 20.0, [_goal("IQ4_XS", 200, 21.4)],
                         [floor_row, *_rows("IQ4_XS", 200, 21.4)], old, kept)
    d = written["data"]
    assert d["coa_run_sha256"] == "f" * 64
    assert [(g["stock"], g["coalora_ppl"]) for g in d["goal"]] == [("Q8_0", 20.7), ("Q4_0", 21.5), ("IQ4_XS", 21.4)]
    assert [k["stocks"] for k in d["kept_budgets"]] == [["Q8_0"], ["Q4_0"]]
    assert [k["provenance"]["commit"][0] for k in d["kept_budgets"]] == ["b", "a"]
    assert sorted((r.get("stock"), r["ppl"], bool(r.get("reused"))) for r in d["rows"] if r.get("stock")) == [
        ("IQ4_XS", 21.4, False), ("Q4_0", 21.5, True), ("Q8_0", 20.7, True)]
    assert "Budgets Q4_0: kept from the result of commit aaaaaaa" in written["md"]
    assert written["md"].startswith("Tiny; CoA-LoRA run `run`") and d["model"] == "model"
    assert "of Pride and Prejudice." in written["md"] and "trained on" not in written["md"]
    json.dumps(d)  # the result file stays JSON
    args.data, args.hold_out = "persuasion", 0.15
    imatrix_quality.save(Path("run"), "f" * 64, o, args, Path("model"), 20.0, [_goal("IQ4_XS", 200, 21.4)],
                         [floor_row, *_rows("IQ4_XS", 200, 21.4)], old)
    assert "both LoRAs and the imatrix trained on persuasion without its last 15%" in written["md"]
    assert "16 x 512 tokens of the last 15% of persuasion, which the LoRAs did not train on." in written["md"]


def test_hold_out_cuts_the_texts_at_a_paragraph(tmp_path):
    paragraphs = [f"Paragraph {i}. " + "word " * 40 for i in range(20)]
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_text("\n\n".join(paragraphs[:12]))
    b.write_text("\n\n".join(paragraphs[12:]))
    (train,), held = imatrix_quality._hold_out([str(a), str(b)], 0.25, tmp_path)
    first, last = Path(train).read_text(), held.read_text()
    assert last.startswith("Paragraph ") and not first.endswith("\n")
    assert first.split("\n\n") + last.split("\n\n") == paragraphs  # every paragraph, on one side only
    assert 0.2 < len(last) / (len(first) + len(last)) < 0.3


def test_run_fingerprint_follows_the_weights_not_the_path(tmp_path):
    from bench.common import run_fingerprint

    a, b = tmp_path / "a", tmp_path / "b"
    for run, weights in ((a, b"w1"), (b, b"w1")):
        run.mkdir()
        (run / "checkpoint.safetensors").write_bytes(weights)
        (run / "imatrix.gguf").write_bytes(b"im")
    assert run_fingerprint(a) == run_fingerprint(b)
    (b / "checkpoint.safetensors").write_bytes(b"w2")  # retrained elsewhere: same path, other weights
    assert run_fingerprint(a) != run_fingerprint(b)
    (a / "imatrix.gguf").unlink()
    assert run_fingerprint(a) != run_fingerprint(tmp_path / "b")


def test_confirmation_summary_keeps_the_pick_and_the_largest_file():
    conf = {"windows": 32, "min_gain": 0.005, "fidelity_share": 0.25, "candidates": [
        {"source": "archive", "file_bytes": 10, "adapter": "shared", "measured_loss": 3.4, "vs_uniform": -0.002,
         "vs_uniform_se": 0.001, "kl": 0.002, "kl_vs_uniform": -0.003, "kl_vs_uniform_se": 0.0004, "fidelity": True,
         "uniform": False, "picked": True, "bpw": 5.0},
        {"source": "greedy", "file_bytes": 11, "adapter": "generated", "measured_loss": 3.5, "uniform": False,
         "picked": False},
        {"source": "uniform:Q8_0", "file_bytes": 12, "adapter": "shared", "measured_loss": 3.402, "vs_uniform": 0.0,
         "vs_uniform_se": 0.0, "kl": 0.005, "uniform": True, "picked": False}]}
    s = imatrix_quality.confirmation_summary(conf)
    assert s["picked"]["fidelity"] and s["picked"]["kl_vs_uniform"] == -0.003 and "bpw" not in s["picked"]
    assert s["largest_llama_file"]["source"] == "uniform:Q8_0" and s["fidelity_share"] == 0.25
    assert imatrix_quality.confirmation_summary(None) is None
