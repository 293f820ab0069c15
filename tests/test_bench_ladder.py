"""bench/ladder.py --merge: a ladder measured in parts keeps each earlier rung with the provenance that measured it,
and refuses a previous result of another run or protocol."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench import ladder  # noqa: E402

PROTOCOL = {"run": "/runs/coa", "imatrix_sha256": "ab" * 32, "windows": 8, "confirm": 2, "confirm_windows": 16}
FIRST = {"commit": "1" * 40, "dirty": False, "date": "2026-12-01T00:00:00+00:00"}
SECOND = {"commit": "2" * 40, "dirty": False, "date": "2026-12-02T00:00:00+00:00"}


def _row(rung: str, size: int, **extra) -> dict:
    return {"rung": rung, "budget_bytes": size, "uniform_bpw": 4.0, "uniform_generated_ppl": 21.0,
            "uniform_shared_ppl": 22.0, "uniform_coa_ppl": 21.0, "searched_bytes": size, "searched_bpw": 4.0,
            "searched_source": "greedy", "searched_adapter": "generated", "searched_same_as_uniform": False,
            "searched_coa_ppl": 20.0, "coa_gain_pct": 4.76, "search_s": 1.0, **extra}


@pytest.fixture
def results(tmp_path, monkeypatch):
    monkeypatch.setattr(ladder, "RESULTS", tmp_path)
    (tmp_path / "ladder.json").write_text(json.dumps({
        "provenance": SECOND, **PROTOCOL,
        "rows": [_row("Q2_K", 100), _row("Q4_0", 200, kept_from=FIRST), _row("Q5_0", 300)]}))
    return tmp_path


def test_merge_keeps_the_rungs_not_measured_with_their_provenance(results):
    kept = ladder.previous_rows(PROTOCOL, measuring={"Q2_K"})
    assert [r["rung"] for r in kept] == ["Q4_0", "Q5_0"]
    assert kept[0]["kept_from"] == FIRST  # measured two results ago: its own provenance stays
    assert kept[1]["kept_from"] == SECOND


@pytest.mark.parametrize("key,value", [("run", "/runs/other"), ("windows", 16), ("imatrix_sha256", None),
                                       ("confirm", 3), ("confirm_windows", 4)])
def test_merge_refuses_another_run_or_protocol(results, key, value):
    with pytest.raises(SystemExit, match="another run or protocol"):
        ladder.previous_rows({**PROTOCOL, key: value}, measuring=set())


def test_merge_without_a_previous_result_keeps_nothing(tmp_path, monkeypatch):
    monkeypatch.setattr(ladder, "RESULTS", tmp_path)
    assert ladder.previous_rows(PROTOCOL, measuring=set()) == []
