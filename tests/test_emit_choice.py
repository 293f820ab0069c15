"""One budget and one choice: `search --profile` and `emit` plan the same model budget for every shipped profile,
and emit's pick goes through the same confirmation as `search --confirm` (the largest uniform file that fits is
kept unless a mix measures better)."""
from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import tiny_corpus
from test_deploy import TINY_PROFILE, TinyRun
from converters.configuration import DEFAULT_MENU, ModelLayout, TensorSpec
from converters.errors import CoaloraError
from toolkit.cli import main


def smollm2_shaped_layout() -> ModelLayout:
    """SmolLM2-135M's tensor shapes (30 blocks, hidden 576, ffn 1536, vocabulary 49152), no weights."""
    t = [TensorSpec(f"blk.{b}.{k}.weight", rows, cols, k, b) for b in range(30)
         for k, rows, cols in (("attn_q", 576, 576), ("attn_k", 192, 576), ("attn_v", 192, 576),
                               ("attn_output", 576, 576), ("ffn_gate", 1536, 576), ("ffn_up", 1536, 576),
                               ("ffn_down", 576, 1536))]
    t.append(TensorSpec("token_embd.weight", 49152, 576, "token_embd", -1))
    return ModelLayout(t, 1_000_000, 30, menu_names=DEFAULT_MENU)


class _Planned(Exception):
    pass


def test_search_and_emit_plan_the_same_budget_for_every_shipped_profile(tmp_path, capsys, monkeypatch):
    """The run's rank and targets size the adapter in both (search used to assume rank 16 and all tensors)."""
    from toolkit import emit as emit_mod
    from toolkit.profiles import list_profiles, plan_run_budget

    layout = smollm2_shaped_layout()
    errors = {n: {q.name: layout[n].n_weights * 4.0 ** -q.bits_per_weight for q in layout.menu(n)}
              for n in layout.names()}
    meta = {"status": "trained", "layout": layout.describe(), "model": "unused", "model_sha256": "0" * 64, "step": 1,
            "options": {"rank": 8, "targets": ["attn_q", "attn_v", "ffn_down"], "mode": "coa", "alpha": 16.0,
                        "seed": 0, "seq_len": 256, "calib_windows": 4}}
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "run.json").write_text(json.dumps(meta))
    (run_dir / "sensitivity.json").write_text(json.dumps({"key": "x", "errors": errors}))

    class Stub:  # what emit reads before its search
        path, archive_path = run_dir, run_dir / "archive.json"
        meta = json.loads((run_dir / "run.json").read_text())
        layout = ModelLayout.from_description(meta["layout"])

        def loaded(self):
            return None

    seen = {}

    def capture(run, slayout, budget, *a):
        seen["budget"], seen["menu"] = budget, slayout.menu_names
        raise _Planned

    monkeypatch.setattr(emit_mod, "_best", capture)
    profiles = list_profiles()
    assert len(profiles) >= 6
    budgets = set()
    for p in profiles:
        assert main(["search", str(run_dir), "--profile", p.name, "--json"]) == 0
        searched = json.loads(capsys.readouterr().out)
        with pytest.raises(_Planned):
            emit_mod.emit(Stub(), p, tmp_path / "dist", confirm=0)
        plan = plan_run_budget(p, meta, layout)
        assert searched["budget_bytes"] == seen["budget"] == plan.budget_bytes, p.name
        assert searched["file_bytes"] <= plan.budget_bytes
        assert not set(p.avoid) & set(seen["menu"]) and seen["menu"] == plan.layout.menu_names
        budgets.add(plan.budget_bytes)
    assert len(budgets) > 1
    del meta["options"]["rank"]
    (run_dir / "run.json").write_text(json.dumps(meta))
    assert main(["search", str(run_dir), "--profile", profiles[0].name]) == 1
    assert "options lack 'rank'" in capsys.readouterr().err


class ConfirmedRun(TinyRun):
    """TinyRun with a sensitivity table and a held-out loss per window that favours a mix by ``gain`` nats."""

    def __init__(self, model_dir, path, gain: float):
        super().__init__(model_dir, path)
        from toolkit.sensitivity import error_table

        self.path.mkdir(parents=True, exist_ok=True)
        error_table(self.layout, self.loaded_model.gguf_weight, cache=self.path / "sensitivity.json")
        self.gain, self.measured = gain, []

    def calibration_loss(self, cfgs, n_windows=None, per_window=False, adjusted=True):
        base = np.linspace(3.0, 3.5, n_windows)
        noise = np.random.default_rng(0).normal(0.0, 0.01, n_windows)
        uniform = {self.layout.uniform(t) for t in self.layout.menu_names}
        self.measured.extend(cfgs)
        return [base if c in uniform else base - self.gain + noise for c in cfgs]

    def calibration_divergence(self, cfgs, n_windows=None, adjusted=False):
        """Every file equally far from F32: the fidelity rule never decides here."""
        return [np.full(n_windows, 0.01) for _ in cfgs]


@pytest.fixture(scope="module")
def profile(tiny_model_dir, tmp_path_factory):
    """The tiny test profile with a model budget between the tiny model's uniform Q6_K and Q8_0 files."""
    from converters.model_loading import load_model
    from toolkit.profiles import load_profile

    layout = load_model(tiny_model_dir).layout()
    cap = (layout.file_bytes(layout.uniform("Q6_K")) + layout.file_bytes(layout.uniform("Q8_0"))) // 2
    p = tmp_path_factory.mktemp("profile") / "p.toml"
    p.write_text(TINY_PROFILE.replace("model_budget_bytes = 50_000_000", f"model_budget_bytes = {cap}"))
    return load_profile(p)


@pytest.mark.parametrize("gain, keeps_uniform", [(0.0005, True), (0.05, False)])
def test_emit_confirms_its_pick_like_search(tiny_model_dir, tmp_path, monkeypatch, profile, gain, keeps_uniform):
    from toolkit.budget_search import search_run
    from toolkit.emit import emit
    from toolkit.profiles import plan_run_budget

    monkeypatch.setenv("COALORA_HOME", str(tmp_path / "home"))
    run = ConfirmedRun(tiny_model_dir, tmp_path / "run", gain)
    text = tmp_path / "heldout.txt"
    text.write_text(tiny_corpus(2000, seed=5))
    m = emit(run, profile, tmp_path / "dist", n_windows=2, n_ctx=64, text_path=text, confirm=2, confirm_windows=16)
    conf = m["search"]["confirmation"]
    plan = plan_run_budget(profile, run.meta, run.layout)
    assert conf["uniform"] == "Q6_K"  # the largest uniform file within the budget
    assert conf["windows"] == (32 if conf.get("extended_from_windows") == 16 else 16)  # more when undecided
    assert plan.budget_bytes < run.layout.file_bytes(run.layout.uniform("Q8_0"))
    assert len(conf["candidates"]) >= 2 and sum(c["uniform"] for c in conf["candidates"]) == 1
    picked = next(c for c in conf["candidates"] if c["picked"])
    assert picked["uniform"] == keeps_uniform and picked["source"] == m["search"]["source"]
    assert m["search"]["measured_loss"] == picked["measured_loss"]
    if not keeps_uniform:
        assert picked["vs_uniform"] < -2 * picked["vs_uniform_se"]
    res = search_run(run, plan.layout, plan.budget_bytes, 2, 16)  # what `coalora search --confirm 2` picks
    assert res.cfg.to_json()["types"] == m["configuration"] and res.source == m["search"]["source"]


class AdjustedRun(ConfirmedRun):
    """ConfirmedRun whose adapter depends on the configuration; its shared LoRA measures ``shared_gain`` nats
    better than the generated adapter. Records which variant emit writes and predicts with."""

    def __init__(self, model_dir, path, shared_gain: float):
        super().__init__(model_dir, path, 0.05)
        self.shared_gain, self.variants = shared_gain, []

    def has_adjustments(self):
        return True

    def calibration_loss(self, cfgs, n_windows=None, per_window=False, adjusted=True):
        out = super().calibration_loss(cfgs, n_windows, per_window)
        return out if adjusted else [w - self.shared_gain for w in out]

    def write_adapter(self, cfg, path, adjusted=True):
        self.variants.append(("adapter", adjusted))
        return super().write_adapter(cfg, path, adjusted)

    def torch_logits_fn(self, cfg, adjusted=True):
        self.variants.append(("predict", adjusted))
        return super().torch_logits_fn(cfg, adjusted)


@pytest.mark.parametrize("shared_gain, kind", [(0.0, "shared"), (-0.05, "generated")])
def test_emit_writes_and_predicts_the_confirmed_adapter(tiny_model_dir, tmp_path, monkeypatch, profile,
                                                        shared_gain, kind):
    from toolkit.emit import emit

    monkeypatch.setenv("COALORA_HOME", str(tmp_path / "home"))
    run = AdjustedRun(tiny_model_dir, tmp_path / "run", shared_gain)
    text = tmp_path / "heldout.txt"
    text.write_text(tiny_corpus(2000, seed=5))
    m = emit(run, profile, tmp_path / "dist", n_windows=1, n_ctx=64, text_path=text, confirm=2, confirm_windows=16)
    adjusted = kind == "generated"
    assert m["search"]["adapter"] == kind and m["search"]["confirmation"]["adapter"]["generated"] == adjusted
    assert run.variants == [("adapter", adjusted), ("predict", adjusted)]


def test_emit_without_confirmation_measures_nothing(tiny_model_dir, tmp_path, monkeypatch, profile):
    from toolkit.emit import emit

    monkeypatch.setenv("COALORA_HOME", str(tmp_path / "home"))
    run = ConfirmedRun(tiny_model_dir, tmp_path / "run", 0.05)
    text = tmp_path / "heldout.txt"
    text.write_text(tiny_corpus(2000, seed=5))
    m = emit(run, profile, tmp_path / "dist", n_windows=1, n_ctx=64, text_path=text, confirm=0)
    assert run.measured == [] and m["search"]["confirmation"] is None and m["search"]["measured_loss"] is None


def test_emit_cli_option_errors(tmp_path, capsys):
    for args in (["--confirm", "-1"], ["--confirm-windows", "0"]):
        assert main(["emit", str(tmp_path), "--profile", "rpi4-4gb", "-o", str(tmp_path / "d"), *args]) == 1
        err = capsys.readouterr().err
        assert err.startswith("coalora: error:") and err.count("\n") == 1
    with pytest.raises(CoaloraError):
        from toolkit.budget_search import search_run
        search_run(type("R", (), {"path": tmp_path, "archive_path": tmp_path / "a.json"})(),
                   smollm2_shaped_layout(), 10**9)
