"""llama-cpp-python runtime: exact logits vs transformers, adapter checks and swaps (tiny model, CPU)."""
from __future__ import annotations

import numpy as np
import pytest

from conftest import tiny_corpus
from converters.errors import CoaloraError


@pytest.fixture(scope="module")
def tiny(tiny_model_dir, tmp_path_factory):
    """(loaded tiny model, its F32 GGUF path)."""
    from converters.gguf_model_writer import write_gguf
    from converters.model_loading import load_model

    loaded = load_model(tiny_model_dir)
    path = tmp_path_factory.mktemp("rt") / "tiny-f32.gguf"
    write_gguf(loaded.gguf, path, loaded.layout().uniform("F32"))
    return loaded, path


def random_adapter(loaded, path, kinds=("attn_q", "ffn_down"), rank=4, alpha=8.0, seed=0, scale=0.2):
    """Write a LoRA GGUF for ``loaded``; returns {base name: (A, B)}."""
    from converters.gguf_adapter_writer import write_lora_gguf

    rng = np.random.default_rng(seed)
    tensors = {}
    for b in range(loaded.n_blocks):
        for k in kinds:
            spec = loaded.tensor_spec(f"blk.{b}.{k}.weight")
            tensors[spec.name] = (rng.normal(0, scale, (rank, spec.n_per_row)).astype(np.float32),
                                  rng.normal(0, scale, (spec.n_rows, rank)).astype(np.float32))
    write_lora_gguf(path, loaded.arch, alpha, tensors)
    return tensors


@pytest.fixture(scope="module")
def llm(tiny):
    from toolkit.llama_runtime import open_model

    m = open_model(tiny[1], n_ctx=128, n_threads=2)
    yield m
    m.close()


def _tokens(loaded, n=96):
    ids = loaded.tokenizer(tiny_corpus(300, seed=3), add_special_tokens=False)["input_ids"]
    return ids[:n]


def test_f32_gguf_logits_match_transformers(tiny, llm):
    import torch
    from toolkit.llama_runtime import window_logits

    loaded, _ = tiny
    toks = _tokens(loaded)
    with torch.no_grad():
        ref = loaded.model(torch.tensor([toks])).logits[0].numpy()
    got = window_logits(llm, toks)
    assert got.shape == ref.shape
    assert np.abs(got - ref).max() <= 1e-4


def test_llama_nll_matches_torch_nll(tiny, llm):
    from toolkit.evaluation import eval_windows, perplexity, torch_window_nll
    from toolkit.llama_runtime import llama_window_nll

    loaded, _ = tiny
    windows = eval_windows(loaded.tokenizer, tiny_corpus(2000, seed=5), n_windows=3, n_ctx=64)
    assert all(len(w) == 64 for w in windows)
    t = torch_window_nll(lambda ids: loaded.model(ids).logits, windows)
    lnll = llama_window_nll(llm, windows)
    assert t.shape == lnll.shape == (3, 63)
    assert abs(perplexity(t) / perplexity(lnll) - 1) < 1e-5


def test_adapter_swap_changes_and_restores_logits(tiny, llm, tmp_path):
    from toolkit.llama_runtime import load_adapter, set_adapter, window_logits

    loaded, model_path = tiny
    random_adapter(loaded, tmp_path / "a.gguf", seed=1)
    random_adapter(loaded, tmp_path / "b.gguf", kinds=("attn_v", "ffn_up"), seed=2)
    toks = _tokens(loaded, 48)
    base = window_logits(llm, toks)
    with load_adapter(llm, tmp_path / "a.gguf", model_path) as ha, \
            load_adapter(llm, tmp_path / "b.gguf", model_path) as hb:
        set_adapter(llm, ha)
        la = window_logits(llm, toks)
        set_adapter(llm, hb)
        lb = window_logits(llm, toks)
        set_adapter(llm, None)
        back = window_logits(llm, toks)
        set_adapter(llm, ha)
        la2 = window_logits(llm, toks)
        set_adapter(llm, None)
    assert np.abs(la - base).max() > 1e-2 and np.abs(lb - base).max() > 1e-2 and np.abs(la - lb).max() > 1e-2
    assert np.array_equal(back, base)
    assert np.array_equal(la2, la)


def test_adapter_matches_torch_merged_weights(tiny, llm, tmp_path):
    """The adapter llama.cpp applies is alpha/r * B @ A on the base weight (GGUF row order)."""
    import torch
    from toolkit.llama_runtime import load_adapter, set_adapter, window_logits

    loaded, model_path = tiny
    tensors = random_adapter(loaded, tmp_path / "a.gguf", seed=4, scale=0.1)
    toks = _tokens(loaded, 48)
    params = dict(loaded.model.named_parameters())
    saved = {}
    with torch.no_grad():
        for name, (a, b) in tensors.items():
            p = params[loaded.hf_name(name)]
            saved[name] = p.detach().clone()
            delta = loaded.to_hf_order(name, (8.0 / a.shape[0]) * b @ a)
            p += torch.from_numpy(np.ascontiguousarray(delta))
        ref = loaded.model(torch.tensor([toks])).logits[0].numpy()
        for name, w in saved.items():
            params[loaded.hf_name(name)].copy_(w)
    with load_adapter(llm, tmp_path / "a.gguf", model_path) as h:
        set_adapter(llm, h)
        got = window_logits(llm, toks)
        set_adapter(llm, None)
    assert np.abs(got - ref).max() <= 1e-3


def _raises(path, model_path, match):
    from toolkit.llama_runtime import validate_adapter_file

    with pytest.raises(CoaloraError, match=match):
        validate_adapter_file(path, model_path)


def test_bad_adapters_refused(tiny, llm, tmp_path):
    import gguf
    from converters.gguf_adapter_writer import write_lora_gguf
    from toolkit.llama_runtime import load_adapter

    loaded, model_path = tiny
    ok = tmp_path / "ok.gguf"
    random_adapter(loaded, ok)
    # truncated
    trunc = tmp_path / "trunc.gguf"
    trunc.write_bytes(ok.read_bytes()[: ok.stat().st_size // 2])
    _raises(trunc, model_path, "not a readable GGUF")
    # not a GGUF at all
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"hello world" * 100)
    _raises(junk, model_path, "not a readable GGUF")
    # the model itself is not an adapter
    _raises(model_path, model_path, "general.type")
    # shapes of another model
    wrong = tmp_path / "wrong.gguf"
    write_lora_gguf(wrong, loaded.arch, 8.0, {"blk.0.attn_q.weight": (np.zeros((4, 100), np.float32),
                                                                     np.zeros((256, 4), np.float32))})
    _raises(wrong, model_path, "do not fit")
    # base tensor missing
    missing = tmp_path / "missing.gguf"
    write_lora_gguf(missing, loaded.arch, 8.0, {"blk.9.attn_q.weight": (np.zeros((4, 256), np.float32),
                                                                       np.zeros((256, 4), np.float32))})
    _raises(missing, model_path, "does not exist")
    # other architecture
    arch = tmp_path / "arch.gguf"
    write_lora_gguf(arch, "qwen2", 8.0, {"blk.0.attn_q.weight": (np.zeros((4, 256), np.float32),
                                                                 np.zeros((256, 4), np.float32))})
    _raises(arch, model_path, "architecture")
    # non-finite values
    nan = tmp_path / "nan.gguf"
    a = np.zeros((4, 256), np.float32)
    a[0, 0] = np.nan
    write_lora_gguf(nan, loaded.arch, 8.0, {"blk.0.attn_q.weight": (a, np.zeros((256, 4), np.float32))})
    _raises(nan, model_path, "non-finite")
    # lora_a without lora_b, and adapter.type missing
    half = tmp_path / "half.gguf"
    w = gguf.GGUFWriter(str(half), loaded.arch)
    w.add_type(gguf.GGUFType.ADAPTER)
    w.add_string(gguf.Keys.Adapter.TYPE, "lora")
    w.add_tensor("blk.0.attn_q.weight.lora_a", np.zeros((4, 256), np.float32))
    w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()
    _raises(half, model_path, "partner")
    # load_adapter validates before llama.cpp sees the file; the model stays usable
    with pytest.raises(CoaloraError):
        load_adapter(llm, trunc, model_path)
    with load_adapter(llm, ok, model_path):
        pass
