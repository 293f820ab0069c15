"""Deployment: profiles, memory model, emit -> validate -> package on a tiny model (no training run needed)."""
from __future__ import annotations

import json
import tarfile
from pathlib import Path

import numpy as np
import pytest

from conftest import tiny_corpus
from converters.errors import CoaloraError

TINY_PROFILE = """
name = "tiny-test"
description = "test device"
memory_bytes = 2_000_000_000
model_share = 0.5
model_budget_bytes = 50_000_000
context_length = 256
threads = 2
ubatch = 64
kv_cache_type = "f16"
prefer = ["Q8_0"]
avoid = ["Q2_K"]
"""


# ---- profiles ---------------------------------------------------------------------------------
def test_shipped_profiles_load():
    from toolkit.profiles import list_profiles, load_profile

    profs = list_profiles()
    assert len(profs) >= 6
    names = {p.name for p in profs}
    assert {"rpi4-4gb", "rpi5-8gb", "jetson-orin-nano-8gb", "phone-6gb", "phone-8gb", "laptop-16gb"} <= names
    for p in profs:
        assert load_profile(p.name) == p and 0 < p.model_share <= 1 and p.memory_bytes > 2**30


def test_unknown_profile_lists_known_names():
    from toolkit.profiles import load_profile

    with pytest.raises(CoaloraError, match="rpi4-4gb"):
        load_profile("toaster")


def test_user_toml_path_accepted_and_checked(tmp_path):
    from toolkit.profiles import load_profile

    f = tmp_path / "mine.toml"
    f.write_text(TINY_PROFILE)
    p = load_profile(f)
    assert p.name == "tiny-test" and p.model_budget_cap == 50_000_000 and p.avoid == ("Q2_K",)
    bad = tmp_path / "bad.toml"
    bad.write_text(TINY_PROFILE.replace('"f16"', '"q4_0"'))
    with pytest.raises(CoaloraError, match="flash_attn"):
        load_profile(bad)
    bad.write_text("name = [")
    with pytest.raises(CoaloraError, match="bad.toml is unreadable"):
        load_profile(bad)


def test_profiles_give_smollm2_different_budgets():
    """SmolLM2-135M-sized layout: the constrained devices get distinct budgets below F16 size."""
    from converters.configuration import ModelLayout, TensorSpec
    from toolkit.memory_model import ArchInfo
    from toolkit.profiles import list_profiles

    t = []
    for b in range(30):
        for k, rows, cols in (("attn_q", 576, 576), ("attn_k", 192, 576), ("attn_v", 192, 576),
                              ("attn_output", 576, 576), ("ffn_gate", 1536, 576), ("ffn_up", 1536, 576),
                              ("ffn_down", 576, 1536)):
            t.append(TensorSpec(f"blk.{b}.{k}.weight", rows, cols, k, b))
    t.append(TensorSpec("token_embd.weight", 49152, 576, "token_embd", -1))
    layout = ModelLayout(t, 1_000_000, 30)
    arch = ArchInfo(30, 576, 1536, 49152, 9, 192, 192)
    assert ArchInfo.from_layout(layout) == arch
    budgets = {p.name: p.model_budget_bytes(layout, arch) for p in list_profiles()}
    constrained = [v for k, v in budgets.items() if k != "laptop-16gb"]
    assert len(set(constrained)) == len(constrained)
    assert all(v < 271_000_000 for v in constrained) and budgets["laptop-16gb"] > 271_000_000


# ---- memory model -----------------------------------------------------------------------------
def test_memory_model_arithmetic():
    from toolkit import memory_model as mm

    a = mm.ArchInfo(n_layers=30, n_embd=576, n_ff=1536, n_vocab=49152, n_head=9, n_embd_k=192, n_embd_v=192)
    # llama.cpp 0.3.36 reports 11.25 MiB (f16, 512 cells, 30 layers) and 180 MiB at 8192
    assert mm.kv_cache_bytes(a, 512, "f16") == 30 * 512 * 384 * 2 == int(11.25 * mm.MiB)
    assert mm.kv_cache_bytes(a, 8192, "f16") == 180 * mm.MiB
    assert mm.kv_cache_bytes(a, 512, "q8_0") == int(30 * 512 * 384 * 34 / 32)
    # compute buffer reserved by llama.cpp for n_ubatch 512: 98.25 MiB at 512 / 2048, 166.38 MiB at 8192
    assert mm.compute_bytes(a, 512) == mm.compute_bytes(a, 2048) == int(98.25 * mm.MiB)
    assert abs(mm.compute_bytes(a, 8192) / mm.MiB - 166.38) < 1.0
    assert mm.compute_bytes(a, 8192, flash_attn=True) == 4 * 512 * (49152 + 2 * 576)
    e = mm.estimate(a, 100, 10, 512)
    assert e.total == 110 + e.kv_cache_bytes + e.compute_bytes + mm.RUNTIME_OVERHEAD
    with pytest.raises(CoaloraError):
        mm.kv_bytes_per_element("q3_x")


# ---- a fake run on the tiny model: quantized weights + a LoRA, emulated in torch ---------------
class TinyRun:
    """Duck-types toolkit.run.Run for emit: a fixed adapter per configuration, torch emulation of the pair."""

    def __init__(self, model_dir, path, seed=0, rank=4, alpha=8.0):
        from converters.model_loading import load_model

        self.path = Path(path)
        self.loaded_model = load_model(model_dir)
        self.layout = self.loaded_model.layout()
        from converters.fileio import model_fingerprint
        self.meta = {"model": str(model_dir), "model_sha256": model_fingerprint(model_dir),
                     "options": {"rank": rank, "alpha": alpha, "targets": ["attn_q", "ffn_down"]}}
        self.archive_path = self.path / "archive.json"
        self.rank, self.alpha = rank, alpha
        rng = np.random.default_rng(seed)
        self.tensors = {}
        for b in range(self.loaded_model.n_blocks):
            for k in ("attn_q", "ffn_down"):
                s = self.layout[f"blk.{b}.{k}.weight"]
                self.tensors[s.name] = (rng.normal(0, 0.1, (rank, s.n_per_row)).astype(np.float32),
                                        rng.normal(0, 0.1, (s.n_rows, rank)).astype(np.float32))

    def loaded(self):
        return self.loaded_model

    def check_layout_with_model(self):
        return None  # the layout is the loaded model's own

    def quantized_bytes(self, name, qtype):
        from converters.ggml_quant import quantize
        return quantize(self.loaded_model.gguf_weight(name), qtype)

    def has_adjustments(self):
        return False  # one fixed adapter for every configuration

    def imatrix(self):
        return None

    def write_adapter(self, cfg, path, adjusted=True):
        from converters.gguf_adapter_writer import write_lora_gguf
        return write_lora_gguf(path, self.loaded_model.arch, self.alpha, self.tensors)

    def torch_logits_fn(self, cfg, adjusted=True):
        import torch
        from converters.ggml_quant import roundtrip

        lm = self.loaded_model
        params = dict(lm.model.named_parameters())
        weights = {}
        for name, q in cfg.types.items():
            w = lm.gguf_weight(name)
            _, deq = roundtrip(w, q)
            if name in self.tensors:
                a, b = self.tensors[name]
                deq = deq + (self.alpha / self.rank) * b @ a
            weights[lm.hf_name(name)] = torch.from_numpy(np.ascontiguousarray(lm.to_hf_order(name, deq)))

        def logits(ids):
            saved = {n: params[n].detach().clone() for n in weights}
            with torch.no_grad():
                for n, w in weights.items():
                    params[n].copy_(w)
                try:
                    return lm.model(ids).logits
                finally:
                    for n, w in saved.items():
                        params[n].copy_(w)
        return logits


def emit_tiny(tiny_model_dir, root, n_windows: int, mp: pytest.MonkeyPatch):
    """One real emit of the tiny model (uniform Q8_0 in place of the search) into ROOT/dist, with
    $COALORA_HOME in ROOT (set through ``mp``, which the caller undoes): (run, profile, text path, DIST/NAME,
    manifest)."""
    from toolkit import emit as emit_mod
    from toolkit.budget_search import SearchResult
    from toolkit.profiles import load_profile

    mp.setenv("COALORA_HOME", str(root / "home"))
    run = TinyRun(tiny_model_dir, root / "run")
    cfg = run.layout.uniform("Q8_0")
    mp.setattr(emit_mod, "_best", lambda r, layout, budget, *a: SearchResult(
        cfg, layout.file_bytes(cfg), layout.bits_per_weight(cfg), None, budget_bytes=budget, source="test"))
    (root / "p.toml").write_text(TINY_PROFILE)
    profile = load_profile(root / "p.toml")
    text = root / "heldout.txt"
    text.write_text(tiny_corpus(3000, seed=11))
    manifest = emit_mod.emit(run, profile, root / "dist", n_windows=n_windows, n_ctx=64, text_path=text)
    return run, profile, text, root / "dist" / profile.name, manifest


@pytest.fixture(scope="module")
def env(tiny_model_dir, tmp_path_factory):
    """(run, profile, text path, DIST/NAME, manifest) after one real emit of the tiny model."""
    mp = pytest.MonkeyPatch()
    yield emit_tiny(tiny_model_dir, tmp_path_factory.mktemp("deploy"), 4, mp)
    mp.undo()


def test_emit_writes_manifest(env):
    from converters.fileio import sha256_file

    run, profile, _, dist, m = env
    assert sorted(p.name for p in dist.iterdir()) == ["adapter.gguf", "manifest.json", "model.gguf"]
    assert json.loads((dist / "manifest.json").read_text()) == m
    for f, rec in m["files"].items():
        assert sha256_file(dist / f) == rec["sha256"] and (dist / f).stat().st_size == rec["bytes"]
    assert m["files"]["model.gguf"]["bytes"] == run.layout.file_bytes(run.layout.uniform("Q8_0"))
    assert m["commands"]["llama-cli"].startswith("llama-cli -m model.gguf --lora adapter.gguf -c 256 -t 2")
    assert m["fits"] == {"model_budget": True, "memory_model": True}
    assert np.isfinite(m["evaluation"]["predicted_perplexity"])


def test_validate_agrees_with_emit(env):
    from toolkit.validate import validate

    _, _, text, dist, m = env
    r = validate(dist, threads=2)
    assert r["ok"], r["verdicts"]
    assert r["verdicts"]["perplexity_matches_prediction"] is True
    assert abs(r["evaluation"]["relative_difference"]) < 0.005
    ev = m["evaluation"]
    assert r["evaluation"]["scored_tokens"] == ev["n_windows"] * (ev["n_ctx"] - 1)  # every token after the first
    assert r["evaluation"]["perplexity_adapter"] != r["evaluation"]["perplexity_base"]
    assert r["reference"]["base"]["top1_agreement"] > 0.9  # Q8_0 vs F16 without adapter
    assert r["memory"]["measured_peak_rss_bytes"] > 0 and r["speed"]["gen_tokens_per_s"] > 0


def test_package_contents(env, tmp_path):
    from toolkit.package import package

    _, profile, _, dist, m = env
    out = package(dist, tmp_path / "tiny.tar.gz")
    with tarfile.open(out) as tar:
        names = sorted(tar.getnames())
        readme = tar.extractfile(f"{profile.name}/README.md").read().decode()
        assert tar.extractfile(f"{profile.name}/model.gguf").read() == (dist / "model.gguf").read_bytes()
    assert names == sorted(f"{profile.name}/{f}" for f in ("README.md", "adapter.gguf", "manifest.json", "model.gguf"))
    assert m["commands"]["llama-server"] in readme and m["commands"]["llama-cli"] in readme


def _copy_dist(dist, dest):
    import shutil
    shutil.copytree(dist, dest)
    return dest


def test_checksum_failure_before_llama_cpp(env, tmp_path, monkeypatch):
    import toolkit.llama_runtime as rt
    from toolkit.package import package
    from toolkit.validate import validate

    _, _, _, dist, _ = env
    d = _copy_dist(dist, tmp_path / "d")
    data = bytearray((d / "model.gguf").read_bytes())
    data[-10] ^= 0xFF
    (d / "model.gguf").write_bytes(bytes(data))

    def boom(*a, **k):
        raise AssertionError("llama.cpp was reached")
    monkeypatch.setattr(rt, "open_model", boom)
    monkeypatch.setattr(rt, "validate_adapter_file", boom)
    with pytest.raises(CoaloraError, match="model.gguf does not match"):
        validate(d)
    with pytest.raises(CoaloraError, match="checksum"):
        package(d, tmp_path / "x.tar.gz")
    assert not (tmp_path / "x.tar.gz").exists()
    # swapped files: same sizes would not matter, the hashes differ
    e = _copy_dist(dist, tmp_path / "e")
    (e / "adapter.gguf").write_bytes((e / "model.gguf").read_bytes())
    with pytest.raises(CoaloraError, match="adapter.gguf does not match"):
        validate(e)


def test_mismatched_adapter_refused(env, tmp_path):
    """An adapter for another model, with a manifest that vouches for it, is still refused by the GGUF check."""
    from converters.gguf_adapter_writer import write_lora_gguf
    from converters.fileio import sha256_file, write_json
    from toolkit.validate import validate

    _, _, _, dist, m = env
    d = _copy_dist(dist, tmp_path / "d")
    write_lora_gguf(d / "adapter.gguf", "llama", 8.0, {"blk.0.attn_q.weight": (np.zeros((4, 576), np.float32),
                                                                               np.zeros((576, 4), np.float32))})
    m2 = json.loads((d / "manifest.json").read_text())
    m2["files"]["adapter.gguf"] = {"bytes": (d / "adapter.gguf").stat().st_size, "sha256": sha256_file(d / "adapter.gguf")}
    write_json(d / "manifest.json", m2)
    with pytest.raises(CoaloraError, match="do not fit"):
        validate(d, measure_memory=False)


def test_one_base_two_adapters_each_own_perplexity(env, tmp_path):
    """One loaded model, two adapters swapped in turn: each matches its own torch perplexity."""
    from toolkit.evaluation import eval_windows, perplexity, torch_window_nll
    from toolkit.llama_runtime import llama_window_nll, load_adapter, open_model, set_adapter

    run, _, text, dist, _ = env
    other = TinyRun(run.meta["model"], tmp_path, seed=7)
    cfg = run.layout.uniform("Q8_0")
    other.write_adapter(cfg, tmp_path / "other.gguf")
    windows = eval_windows(run.loaded().tokenizer, text.read_text(), n_windows=2, n_ctx=64)
    llm = open_model(dist / "model.gguf", n_ctx=64, n_threads=2)
    try:
        ppl = {}
        with load_adapter(llm, dist / "adapter.gguf", dist / "model.gguf") as h1, \
                load_adapter(llm, tmp_path / "other.gguf", dist / "model.gguf") as h2:
            for key, h in (("a", h1), ("b", h2), ("a2", h1)):
                set_adapter(llm, h)
                ppl[key] = perplexity(llama_window_nll(llm, windows))
    finally:
        llm.close()
    want_a = perplexity(torch_window_nll(run.torch_logits_fn(cfg), windows))
    want_b = perplexity(torch_window_nll(other.torch_logits_fn(cfg), windows))
    # llama.cpp's quantized matmuls also round the activations (q8), torch does not: the 0.5% verdict tolerance
    assert abs(ppl["a"] / want_a - 1) < 0.005 and abs(ppl["b"] / want_b - 1) < 0.005
    assert abs(want_a / want_b - 1) > 0.02 and abs(ppl["a"] / ppl["b"] - 1) > 0.02
    assert ppl["a"] == ppl["a2"]


def test_cli_profiles_and_errors(tmp_path):
    from toolkit.cli import main

    assert main(["profiles", "--json"]) == 0
    assert main(["profiles", "toaster"]) == 1
    assert main(["validate", str(tmp_path)]) == 1
    assert main(["package", str(tmp_path), "-o", str(tmp_path / "x.tar.gz")]) == 1


def test_demo_writes_table_and_json(tmp_path, monkeypatch, capsys):
    """The demo command's own part (the pipeline itself runs in the integration tests): a wide table on a
    pipe, DIR/demo.json with the rows, and a non-zero exit when a profile failed validation."""
    from toolkit import cmd_demo
    from toolkit.cli import main

    row = dict(profile="rpi4-4gb", budget_bytes=75_000_000, model_bytes=74_999_000, bpw=4.35, adapter_bytes=9_800_000,
               ppl_no_adapter=31.1, ppl_adapter=24.1, ppl_predicted=24.12, memory_predicted=254.8e6,
               memory_measured=235.6e6, verdicts="ok", package="x.tar.gz")
    rows = [row]
    monkeypatch.setattr(cmd_demo, "run_demo", lambda out, steps, windows, log, recipe, imatrix: [dict(r) for r in rows])
    assert main(["demo", "-o", str(tmp_path), "--steps", "3"]) == 0
    assert "rpi4-4gb" in capsys.readouterr().out  # not cut to "rpi4…" by an 80-column console
    saved = json.loads((tmp_path / "demo.json").read_text())
    assert saved["steps"] == 3 and saved["profiles"][0]["ppl_adapter"] == 24.1
    rows = [dict(row, verdicts="perplexity")]
    assert main(["demo", "-o", str(tmp_path), "--json"]) == 1
    assert json.loads((tmp_path / "demo.json").read_text())["profiles"][0]["verdicts"] == "perplexity"
