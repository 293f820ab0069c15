"""SmolLM2 deployment: every budget emits, validates and packages; one model file serves two adapters.

Separate from test_deploy.py, whose module fixture points COALORA_HOME at a scratch folder."""
from __future__ import annotations

import tarfile

import pytest


# ---- SmolLM2: a real CoA run, every shipped profile, and one model file serving two adapters --------
# 8 windows of 512 tokens: torch and llama.cpp drift apart chaotically by up to ~0.4% on 8 windows (README,
# exactness); on 4 the phone-6gb pick (llama.cpp's IQ3_S mix + shared LoRA) drifted 0.68%, past the 0.5% verdict
SMOL_WINDOWS, SMOL_CTX = 8, 512
MEMORY_TOLERANCE = 0.15                  # measured peak RSS vs the memory model (issue requirement)
MEASURED_PROFILES = ("rpi4-4gb",)        # full-context measurement is slow on CPU; this one has the
                                         # largest repack buffer and a flash-attention compute buffer
CONFIRM_WINDOWS = 8                      # emit's confirmation on half its default windows: the rule itself is
                                         # tested on the tiny run (test_emit_choice.py); here it must run and ship
SWAP_WINDOWS = 2                         # swapping adapters is compared exactly, not against a prediction


@pytest.fixture(scope="module")
def smol_dist(smollm2_run, tmp_path_factory):
    return tmp_path_factory.mktemp("smol_dist")


@pytest.mark.integration
# Three budgets (low, middle, high) keep CI short; `coalora demo` runs every shipped profile.
@pytest.mark.parametrize("name", ["rpi4-4gb", "phone-6gb", "jetson-orin-nano-8gb"])
def test_smollm2_profile_emit_validate_package(smollm2_run, smol_dist, name, tmp_path):
    from toolkit.emit import emit
    from toolkit.package import package
    from toolkit.profiles import load_profile, profile_names
    from toolkit.validate import PPL_TOLERANCE, validate

    assert name in profile_names()
    profile = load_profile(name)
    m = emit(smollm2_run, profile, smol_dist, n_windows=SMOL_WINDOWS, n_ctx=SMOL_CTX, confirm_windows=CONFIRM_WINDOWS)
    assert m["fits"] == {"model_budget": True, "memory_model": True}
    assert m["files"]["model.gguf"]["bytes"] <= m["search"]["budget_bytes"]
    measured = name in MEASURED_PROFILES
    r = validate(smol_dist / name, threads=2, measure_memory=measured)
    assert r["ok"], r["verdicts"]
    ev = r["evaluation"]
    assert ev["same_windows_as_manifest"] and r["verdicts"]["perplexity_matches_prediction"] is True
    assert abs(ev["perplexity_adapter"] / m["evaluation"]["predicted_perplexity"] - 1) <= PPL_TOLERANCE
    mem = r["memory"]
    assert mem["predicted_total_bytes"] == m["memory"]["total_bytes"]
    if measured:
        assert mem["measured_prompt_tokens"] > profile.context_length // 2  # the context was filled
        assert r["verdicts"]["fits_measured"] is True
        assert abs(mem["measured_peak_rss_bytes"] / mem["predicted_total_bytes"] - 1) <= MEMORY_TOLERANCE, mem
    out = package(smol_dist / name, tmp_path / f"{name}.tar.gz")
    with tarfile.open(out) as tar:
        assert sorted(tar.getnames()) == sorted(f"{name}/{f}" for f in ("README.md", "adapter.gguf",
                                                                          "manifest.json", "model.gguf"))


def _neighbour(run, cfg):
    """``cfg`` with one block tensor moved to the next type of its menu (a configuration the search could visit)."""
    from converters.configuration import Configuration

    for name in sorted(cfg.types):
        if run.layout[name].block < 0:
            continue
        menu = [q.name for q in run.layout.menu(name)]
        cur = cfg.types[name].name
        other = next((q for q in menu if q != cur), None)
        if other is not None:
            return Configuration({**{n: q.name for n, q in cfg.types.items()}, name: other})
    raise AssertionError("no tensor with a second type on its menu")


@pytest.mark.integration
def test_smollm2_one_model_two_adapters_swapped(smollm2_run, tmp_path):
    """One model file, two CoA adapters (two configurations of the run) swapped in one loaded model: each gives
    exactly the perplexity of a fresh load with that adapter, and they differ."""
    from converters.configuration import Configuration
    from toolkit.emit import emit, eval_text, gguf_windows
    from toolkit.evaluation import perplexity
    from toolkit.llama_runtime import llama_window_nll, load_adapter, open_model, set_adapter
    from toolkit.profiles import load_profile

    run = smollm2_run
    m = emit(run, load_profile("rpi5-8gb"), tmp_path, n_windows=1, n_ctx=SMOL_CTX, confirm=0)  # any file will do
    dist = tmp_path / "rpi5-8gb"
    model, ad_a, ad_b = dist / "model.gguf", dist / "adapter.gguf", tmp_path / "neighbour.gguf"
    cfg_b = _neighbour(run, Configuration.from_json({"types": m["configuration"]}))
    run.write_adapter(cfg_b, ad_b)
    coa = run.meta["options"]["mode"] == "coa"  # other modes' adapters ignore the configuration
    assert (ad_a.read_bytes() != ad_b.read_bytes()) == coa
    windows, _ = gguf_windows(model, eval_text().read_text(), SWAP_WINDOWS, SMOL_CTX)

    llm = open_model(model, n_ctx=SMOL_CTX, n_threads=2)
    try:
        swapped = {}
        with load_adapter(llm, ad_a, model) as ha, load_adapter(llm, ad_b, model) as hb:
            for key, h in (("a", ha), ("b", hb), ("a2", ha), ("none", None)):
                set_adapter(llm, h)
                swapped[key] = perplexity(llama_window_nll(llm, windows))
    finally:
        llm.close()
    fresh = {}
    for key, path in (("a", ad_a), ("b", ad_b)):
        llm = open_model(model, n_ctx=SMOL_CTX, n_threads=2)
        try:
            with load_adapter(llm, path, model) as h:
                set_adapter(llm, h)
                fresh[key] = perplexity(llama_window_nll(llm, windows))
        finally:
            llm.close()
    assert swapped["a"] == swapped["a2"]
    assert abs(swapped["a"] / fresh["a"] - 1) < 1e-6 and abs(swapped["b"] / fresh["b"] - 1) < 1e-6
    assert swapped["none"] not in (swapped["a"], swapped["b"])
    assert (swapped["a"] != swapped["b"]) == coa
