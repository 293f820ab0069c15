"""The README's benchmark tables are what bench/readme_tables.py makes from bench/results, every number in them is
in a result file, results without provenance appear only as labelled legacy tables, and the generator refuses a
result file without provenance."""
from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench import readme_tables as rt  # noqa: E402


@pytest.fixture(scope="module")
def readme() -> str:
    return rt.README.read_text()


def test_readme_tables_are_generated_from_the_result_files(readme):
    assert readme == rt.generate(readme), "README tables differ from bench/results: run python bench/readme_tables.py"


def test_every_number_in_a_table_is_in_its_result_file(readme):
    found = rt.blocks(readme)
    assert {name for _, name, _, _ in found} >= {"chat", "convert", "quality", "ladder", "search"}
    for kind, name, text, _ in found:
        data = rt.load_result(name, legacy=kind == "legacy")
        assert rt.missing_numbers(text, data) == [], name


def test_legacy_tables_only_in_the_legacy_section(readme):
    start = readme.index(rt.LEGACY_HEADING)
    end = readme.find("\n## ", start)
    end = len(readme) if end < 0 else end
    for kind, name, text, at in rt.blocks(readme):
        assert (kind == "legacy") == (start < at < end), name
        if kind == "legacy":
            assert "Legacy result" in text and "no provenance" in text
        else:
            prov = json.loads((rt.RESULTS / f"{name}.json").read_text())["provenance"]
            assert prov["commit"][:10] in text and prov["command"] in text and prov["date"] in text


def _results_copy(tmp_path, name):
    for ext in ("json", "md"):
        shutil.copy(rt.RESULTS / f"{name}.{ext}", tmp_path / f"{name}.{ext}")
    return tmp_path


def test_generator_refuses_a_result_without_provenance(tmp_path):
    results = _results_copy(tmp_path, "chat")
    data = json.loads((results / "chat.json").read_text())
    block = "<!-- table:chat -->\nold\n<!-- /table -->\n"
    assert "Result `bench/results/chat.json`" in rt.generate(block, results)
    for broken in ({k: v for k, v in data.items() if k != "provenance"},
                   {**data, "provenance": {**data["provenance"], "command": ""}}):
        (results / "chat.json").write_text(json.dumps(broken))
        with pytest.raises(rt.ResultError, match="no provenance"):
            rt.generate(block, results)
    # a legacy block for a file that has provenance is refused too: it must be a regular table
    (results / "chat.json").write_text(json.dumps(data))
    with pytest.raises(rt.ResultError, match="has provenance"):
        rt.generate(block.replace("table:chat", "legacy:chat"), results)


def test_a_number_not_in_the_result_file_is_found(tmp_path):
    data = {"rows": [{"ppl": 21.0614, "bytes": 144810784, "note": "Q8_0 x211"}]}
    ok = "| a | 21.061 | 144,810,784 | Q8_0 x211 |"
    assert rt.missing_numbers(ok, data) == []
    assert rt.missing_numbers("| a | 21.071 | 144,810,784 |", data) == ["21.071"]
    assert rt.missing_numbers("| a | 21.061 | 144,810,785 |", data) == ["144,810,785"]


def test_cli_check(tmp_path, monkeypatch, capsys):
    readme = tmp_path / "README.md"
    results = _results_copy(tmp_path, "chat")
    monkeypatch.setattr(rt, "README", readme)
    monkeypatch.setattr(rt, "RESULTS", results)
    readme.write_text("# x\n\n<!-- table:chat -->\nstale\n<!-- /table -->\n")
    assert rt.main(["--check"]) == 1
    assert rt.main([]) == 0 and rt.main(["--check"]) == 0
    (results / "chat.json").write_text(json.dumps({"rows": []}))
    assert rt.main([]) == 1
    assert "readme_tables: error:" in capsys.readouterr().err
