"""CoA-LoRA on the real SmolLM2 model: what torch predicts is what llama.cpp measures."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from converters.gguf_model_writer import write_gguf
from converters.quant_types import get
from toolkit import assets, evaluation, llama_runtime
from converters.configuration import Configuration

pytestmark = pytest.mark.integration


def _pair(run, cfg, tmp_path):
    model, adapter = tmp_path / "model.gguf", tmp_path / "adapter.gguf"
    write_gguf(run.loaded().gguf, model, cfg, quantized=run.quantized_bytes, progress=False)
    assert model.stat().st_size == run.layout.file_bytes(cfg)
    run.write_adapter(cfg, adapter)
    return model, adapter


def _mixed(run) -> Configuration:
    """Q4_0 attention, IQ4_NL FFN up/gate, Q4_K FFN down, Q5_0 embeddings: four kinds of kernels at once."""
    types = {}
    for n in run.layout.names():
        kind = run.layout[n].kind
        types[n] = {"ffn_down": "Q4_K", "ffn_up": "IQ4_NL", "ffn_gate": "IQ4_NL", "token_embd": "Q5_0"}.get(kind, "Q4_0")
    return Configuration(types)


def test_trained_run_archive_and_front(smollm2_run):
    from toolkit.pareto_search import Archive
    archive = Archive.load(smollm2_run.archive_path)
    assert len(archive) >= len(smollm2_run.trainset())
    assert (smollm2_run.path / "pareto.png").stat().st_size > 0


def test_perplexity_llama_cpp_matches_torch(smollm2_run, tmp_path):
    run, cfg = smollm2_run, _mixed(smollm2_run)
    model, adapter = _pair(run, cfg, tmp_path)
    llm = llama_runtime.open_model(model, n_ctx=512)
    windows = evaluation.eval_windows(llm, assets.novel_path(assets.EVAL_NOVEL).read_text(), n_windows=4, n_ctx=512)
    handle = llama_runtime.load_adapter(llm, adapter, model)
    llama_runtime.set_adapter(llm, handle)
    p_llama = evaluation.perplexity(llama_runtime.llama_window_nll(llm, windows))
    llama_runtime.set_adapter(llm, None)
    p_plain = evaluation.perplexity(llama_runtime.llama_window_nll(llm, windows))
    llm.close()
    p_torch = evaluation.perplexity(evaluation.torch_window_nll(run.torch_logits_fn(cfg), windows))
    assert abs(p_llama / p_torch - 1) <= 0.005, (p_llama, p_torch)
    assert p_llama != p_plain


def test_f32_logits_with_adapter_match(smollm2_run, tmp_path):
    run = smollm2_run
    cfg = Configuration({n: get("F32") for n in run.layout.names()})
    model, adapter = _pair(run, cfg, tmp_path)
    llm = llama_runtime.open_model(model, n_ctx=128)
    tokens = evaluation.tokenize(llm, assets.novel_path(assets.EVAL_NOVEL).read_text()[:2000])[:64]
    handle = llama_runtime.load_adapter(llm, adapter, model)
    llama_runtime.set_adapter(llm, handle)
    got = llama_runtime.window_logits(llm, tokens)
    llm.close()
    want = run.torch_logits_fn(cfg)(torch.tensor([tokens]))[0].numpy()
    assert float(np.abs(got - want).max()) <= 1e-3
