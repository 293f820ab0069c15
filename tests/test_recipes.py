"""Training recipes: the default is the benchmarked recipe, explicit switches override it, bad files are one line."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from converters.configuration import DEFAULT_MENU
from converters.errors import CoaloraError
from toolkit import cmd_train
from toolkit.cli import main
from toolkit.recipes import DEFAULT, KEYS, load_recipe, recipe_names, train_options

ROOT = Path(__file__).resolve().parents[1]


def _switches(options: list[str]) -> dict:
    """--name value pairs as recipe keys."""
    return {options[i][2:].replace("-", "_"): options[i + 1] for i in range(0, len(options), 2)}


def test_default_recipe_is_what_the_quality_benchmark_measured():
    measured = _switches(json.loads((ROOT / "bench/results/quality.json").read_text())["protocol"]["coa_options"])
    recipe = load_recipe(DEFAULT)
    assert DEFAULT == "anchored" and set(measured) <= set(recipe)
    for k, v in measured.items():
        assert (recipe[k] == v if isinstance(recipe[k], str) else recipe[k] == pytest.approx(float(v))), k


def test_shipped_recipes_load_and_differ():
    names = recipe_names()
    assert {"anchored", "plain"} <= set(names)
    recipes = {n: load_recipe(n) for n in names}
    assert recipes["plain"]["anchor"] == "" and recipes["plain"]["type_deltas"] == ""
    assert train_options("anchored", DEFAULT_MENU)["type_deltas"] == DEFAULT_MENU
    assert len({json.dumps(r, sort_keys=True) for r in recipes.values()}) == len(names)


@pytest.fixture
def captured(monkeypatch):
    got = {}

    def fake(model, data, out, mode, fixed, **kw):
        got.update(kw, mode=mode)
    monkeypatch.setattr(cmd_train, "_run_training", fake)
    return got


def test_train_defaults_to_the_recipe_and_switches_override_it(captured, tmp_path):
    assert main(["train", "smollm2", "-o", str(tmp_path / "a")]) == 0
    assert captured["anchor"] == "F32" and captured["anchor_lora_weight"] == 0.0 and captured["cam_lr"] == 5e-3
    assert captured["type_deltas"] == DEFAULT_MENU and captured["delta_error_power"] == 0.5
    captured.clear()
    assert main(["train", "smollm2", "-o", str(tmp_path / "b"), "--recipe", "plain", "--cam-lr", "2e-3"]) == 0
    assert captured["cam_lr"] == 2e-3 and captured["anchor"] == "" and captured["type_deltas"] == ()
    assert "anchor_lora_weight" not in captured  # TrainOptions' own default
    captured.clear()
    own = tmp_path / "mine.toml"
    own.write_text('description = "x"\ntype_deltas = ["Q4_0", "q4_k"]\ntop_share = 0.25\n')
    assert main(["train", "smollm2", "-o", str(tmp_path / "c"), "--recipe", str(own)]) == 0
    assert captured["type_deltas"] == ("Q4_0", "Q4_K") and captured["top_share"] == 0.25
    captured.clear()
    assert main(["train", "smollm2", "-o", str(tmp_path / "d"), "--mode", "shared"]) == 0  # CoA-only parts dropped
    assert captured["mode"] == "shared" and "anchor" not in captured and captured["type_deltas"] == ()
    captured.clear()
    assert main(["train", "smollm2", "-o", str(tmp_path / "e"), "--mode", "shared", "--anchor", "F32"]) == 0
    assert captured["anchor"] == "F32"  # an explicit switch is never dropped


def test_resume_keeps_the_runs_own_options(captured, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    opts = {"mode": "coa", "cam_lr": 1e-3, "anchor": "", "type_deltas": ["Q4_0"], "anchor_lora_weight": 1.0,
            "rank": 8, "alpha": 16.0, "seed": 0, "seq_len": 256, "calib_windows": 4}
    layout = {"tensors": [["blk.0.attn_q.weight", 64, 64, "attn_q", 0]], "fixed_bytes": 0, "n_blocks": 1,
              "menu": ["Q8_0", "Q4_0"]}  # what run.json's schema requires of a run folder
    (run / "run.json").write_text(json.dumps({"status": "training", "model": "unused", "model_sha256": "0" * 64,
                                              "step": 1, "layout": layout, "options": opts}))
    assert main(["train", "smollm2", "-o", str(run), "--resume"]) == 0
    assert captured["cam_lr"] == 1e-3 and captured["anchor"] == "" and captured["type_deltas"] == ("Q4_0",)


@pytest.mark.parametrize("text, message", [
    ("cam_lr = 1e-3\nlearning_rate = 2\n", "unknown key 'learning_rate'"),
    ('cam_lr = "fast"\n', "cam_lr must be a number"),
    ("top_share = 2.0\n", "top_share must be in"),
    ('anchor = "Q9"\n', "unknown quant type"),
    ('config_batch = "half"\n', "config_batch must be one of"),
    ("configs_per_step = 1.5\n", "must be an integer"),
    ("cam_lr = \n", "bad.toml is unreadable"),
])
def test_bad_recipe_file_is_one_line(tmp_path, capsys, text, message):
    bad = tmp_path / "bad.toml"
    bad.write_text(text)
    with pytest.raises(CoaloraError, match=re.escape(message)):
        load_recipe(bad)
    assert main(["train", "smollm2", "-o", str(tmp_path / "run"), "--recipe", str(bad)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("coalora: error:") and err.count("\n") == 1 and message in err
    assert not (tmp_path / "run").exists()


def test_unknown_recipe_name(capsys, tmp_path):
    assert main(["train", "smollm2", "-o", str(tmp_path / "r"), "--recipe", "turbo"]) == 1
    assert "unknown recipe 'turbo'; known: anchored" in capsys.readouterr().err
    assert main(["demo", "-o", str(tmp_path / "demo"), "--recipe", "turbo"]) == 1
    assert not (tmp_path / "demo").exists()


def test_experiment_switches_hidden_from_help_and_documented_once(capsys):
    assert main(["train", "--help"]) == 0
    helptext = capsys.readouterr().out
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Training recipes", 1)[1].split("\n## ", 1)[0]
    assert "--recipe" in helptext
    for key in KEYS:
        switch = "--" + key.replace("_", "-")
        assert switch not in helptext and f"`{switch}" in section, switch
