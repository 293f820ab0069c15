"""Every supported architecture, end to end on a tiny random model made with transformers' config classes
(hidden size 256 so K-quants apply): llama.cpp's converter, logits and tokens against transformers, bytes
against llama_model_quantize, metadata and unquantized tensors copied, a short CoA-LoRA run whose adapter
llama.cpp loads on a searched file with the perplexity torch predicts."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import build_tiny_model, tiny_corpus
from converters.configuration import apply_overrides
from converters.gguf_model_writer import llama_ftype, write_gguf
from converters.model_loading import load_model
from bench.common import llama_quantize
from test_convert import SAMPLE, gguf_fields, gguf_tensors, llama
from toolkit import budget_search, evaluation, llama_runtime, pareto_search
from toolkit.sensitivity import load_error_table
from toolkit.ggml_activations import emulate_ggml_ops
from toolkit.training import TrainOptions, train

SHAPE = dict(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=512)
ARCHS = {
    # Llama 3.x: llama3 rope scaling (llama.cpp gets it as rope_freqs.weight), tied head
    "llama3-tied": ("LlamaConfig", dict(tie_word_embeddings=True, rope_theta=500000.0,
                                        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                      "high_freq_factor": 4.0,
                                                      "original_max_position_embeddings": 64})),
    "mistral": ("MistralConfig", dict(sliding_window=None, tie_word_embeddings=False)),
    "qwen2": ("Qwen2Config", dict(tie_word_embeddings=False)),  # q/k/v biases
    "qwen3": ("Qwen3Config", dict(head_dim=32, tie_word_embeddings=True)),  # q_norm / k_norm, head_dim != n_embd / n_head
    # Gemma 2: embedding scaling, norm offsets, alternating sliding-window layers, attention and final soft-capping;
    # a SentencePiece tokenizer.model (llama.cpp's converter reads Gemma 2's vocabulary only from one)
    "gemma2": ("Gemma2Config", dict(head_dim=64, query_pre_attn_scalar=64, sliding_window=16,
                                    attn_logit_softcapping=50.0, final_logit_softcapping=30.0)),
    # Gemma 3: embedding scaling, norm offsets, q/k norms, sliding-window layers (6 layers: 5 local, 1 global)
    "gemma3": ("Gemma3TextConfig", dict(num_hidden_layers=6, head_dim=64, query_pre_attn_scalar=64,
                                        sliding_window=16, final_logit_softcapping=None)),
    "phi3": ("Phi3Config", dict(tie_word_embeddings=False, pad_token_id=None)),  # fused attn_qkv and gate/up
}
TOKENIZER_CLASS = {"phi3": "GPT2Tokenizer"}
SENTENCEPIECE = {"gemma2"}
GGUF_ARCH = {"llama3-tied": "llama", "mistral": "llama", "gemma2": "gemma2", "gemma3": "gemma3", "qwen2": "qwen2", "qwen3": "qwen3",
             "phi3": "phi3"}


@pytest.fixture(scope="module", params=list(ARCHS))
def arch_model(request, tmp_path_factory):
    name = request.param
    cls, extra = ARCHS[name]
    config = {**SHAPE, **extra}
    if config.get("pad_token_id", 0) is None:
        config.pop("pad_token_id")
    folder = build_tiny_model(tmp_path_factory.mktemp(name) / "hf", cls, seed=3,
                              tokenizer_class=TOKENIZER_CLASS.get(name), sentencepiece=name in SENTENCEPIECE,
                              **config)
    return name, folder, load_model(folder)


def _ids(lm, n=48):
    return lm.tokenizer(SAMPLE * 4)["input_ids"][:n]


def test_converted_logits_and_tokens_match_transformers(arch_model, tmp_path):
    name, _, lm = arch_model
    assert lm.arch == GGUF_ARCH[name]
    out = tmp_path / "f32.gguf"
    cfg = lm.layout().uniform("F32")
    write_gguf(lm.gguf, out, cfg, progress=False)
    assert out.stat().st_size == lm.layout().file_bytes(cfg)
    m = llama(out)
    for text in (SAMPLE, "<s>user\nhello</s>"):
        assert m.tokenize(text.encode(), add_bos=False, special=True) == lm.tokenizer(text, add_special_tokens=False)["input_ids"]
    ids = _ids(lm)
    assert len(ids) == 48
    m.eval(ids)
    ours = np.asarray(m.scores[: len(ids)])
    with torch.no_grad():  # transformers' model with ggml's GELU table (Gemma), as coalora trains it
        ref = emulate_ggml_ops(lm.model)(torch.tensor([ids])).logits[0].numpy()
    assert np.abs(ours - ref).max() <= 1e-3, np.abs(ours - ref).max()


def test_gguf_file_loads_as_the_same_model(arch_model):
    """The converted GGUF given directly (no config.json): transformers' GGUF loader plus the architecture
    table's metadata keys and llama.cpp's rope factors give the folder's model."""
    _, _, lm = arch_model
    back = load_model(lm.gguf.path)
    ids = torch.tensor([_ids(lm)])
    with torch.no_grad():
        a = emulate_ggml_ops(back.model)(ids).logits.numpy()
        b = emulate_ggml_ops(lm.model)(ids).logits.numpy()
    assert np.abs(a - b).max() <= 1e-4, np.abs(a - b).max()
    assert back.tokenizer(SAMPLE)["input_ids"] == lm.tokenizer(SAMPLE)["input_ids"]


def test_mix_bytes_equal_llama_quantize(arch_model, tmp_path):
    _, _, lm = arch_model
    layout = lm.layout()
    rules = [("attn", "Q8_0"), ("ffn", "Q4_K"), ("token_embd|output", "Q8_0")]
    cfg, _ = apply_overrides(layout, layout.uniform("F32"), rules)
    assert {q.name for q in cfg.types.values()} >= {"Q8_0", "Q4_K"}
    ours, theirs = tmp_path / "ours.gguf", tmp_path / "theirs.gguf"
    write_gguf(lm.gguf, ours, cfg, progress=False)
    llama_quantize(lm.gguf.path, theirs, llama_ftype("Q8_0"), pure=False, overrides=rules)
    a, b, src = gguf_tensors(ours), gguf_tensors(theirs), gguf_tensors(lm.gguf.path)
    assert list(a) == list(src)
    assert {n: t for n, (t, _) in a.items()} == {n: t for n, (t, _) in b.items()}
    for n in a:
        assert a[n][1] == b[n][1], n
        if n not in cfg.types:
            assert a[n] == src[n], n
    f_ours, f_src = gguf_fields(ours), gguf_fields(lm.gguf.path)
    f_ours.pop("general.file_type"), f_src.pop("general.file_type")
    assert f_ours == f_src
    assert ours.stat().st_size == layout.file_bytes(cfg)
    m = llama_runtime.open_model(ours, n_ctx=64)  # loads
    m.close()


def test_short_coa_run_adapter_emit_validate_package(arch_model, tmp_path):
    name, folder, _ = arch_model
    text = tmp_path / "train.txt"
    text.write_text(tiny_corpus(4000, seed=1))
    run = train(tmp_path / "run", folder, [text], TrainOptions(steps=2, seq_len=32, batch=2, lr=1e-2, cam_lr=1e-2,
                rounds=1, checkpoint_every=2, search_candidates=2, imatrix=""), progress=False, log=lambda s: None)
    assert tuple(run.meta["options"]["targets"]) == run.layout.projection_kinds()
    layout = run.layout
    lo, hi = layout.file_bytes(layout.uniform("Q2_K")), layout.file_bytes(layout.uniform("Q8_0"))
    archive = pareto_search.Archive.load(run.archive_path)
    cfg = budget_search.best_configuration(layout, archive, (lo + hi) // 2,
                                           errors=load_error_table(run.path / "sensitivity.json")).cfg
    assert layout.file_bytes(cfg) <= (lo + hi) // 2
    model_path, adapter_path = tmp_path / "model.gguf", tmp_path / "adapter.gguf"
    write_gguf(run.loaded().gguf, model_path, cfg, quantized=run.quantized_bytes, progress=False)
    run.write_adapter(cfg, adapter_path)
    windows = evaluation.eval_windows(run.loaded().tokenizer, tiny_corpus(3000, seed=7), n_windows=3, n_ctx=64)
    llm = llama_runtime.open_model(model_path, n_ctx=64)
    handle = llama_runtime.load_adapter(llm, adapter_path, model_path)
    llama_runtime.set_adapter(llm, handle)
    llama_nll = np.stack([evaluation.nll_from_logits(llama_runtime.window_logits(llm, w), w) for w in windows])
    llm.close()
    torch_nll = evaluation.torch_window_nll(run.torch_logits_fn(cfg), windows)
    p_llama, p_torch = evaluation.perplexity(llama_nll), evaluation.perplexity(torch_nll)
    assert abs(p_llama / p_torch - 1) <= 0.005, (name, p_llama, p_torch)

    # deployment: emit for a device profile, validate with llama.cpp, package
    from test_deploy import TINY_PROFILE
    from toolkit import emit as emit_mod
    from toolkit.package import package
    from toolkit.profiles import load_profile
    from toolkit.validate import validate
    (tmp_path / "p.toml").write_text(TINY_PROFILE)
    held_out = tmp_path / "heldout.txt"
    held_out.write_text(tiny_corpus(3000, seed=11))
    manifest = emit_mod.emit(run, load_profile(tmp_path / "p.toml"), tmp_path / "dist", n_windows=3, n_ctx=64,
                             text_path=held_out)
    assert manifest["fits"] == {"model_budget": True, "memory_model": True}
    report = validate(tmp_path / "dist" / "tiny-test", threads=2)
    assert report["ok"], (name, report["verdicts"])
    assert package(tmp_path / "dist" / "tiny-test", tmp_path / "tiny.tar.gz").stat().st_size > 0


# ---- bad input: a one-line error, non-zero exit, nothing written ----------------------------------
def rewrite_gguf(src, dst, kv: dict | None = None, drop=(), rows: dict | None = None):
    """Copy GGUF ``src`` to ``dst`` with metadata values replaced (``kv``: key -> value, same type), tensors
    dropped, or tensors cut to fewer rows (``rows``: name -> row count)."""
    import gguf
    r = gguf.GGUFReader(src)
    kv, rows = kv or {}, rows or {}
    arch = kv.get("general.architecture", r.fields["general.architecture"].contents())
    w = gguf.GGUFWriter(dst, arch)
    for key, f in r.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture" or key in drop:
            continue
        vtype = f.types[0]
        sub = f.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        w.add_key_value(key, kv.get(key, f.contents()), vtype, sub_type=sub)
    for t in r.tensors:
        if t.name in drop:
            continue
        data = np.asarray(t.data)
        w.add_tensor(t.name, np.ascontiguousarray(data[: rows.get(t.name, len(data))]), raw_dtype=t.tensor_type)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return dst


@pytest.fixture(scope="module")
def phi3_gguf(tmp_path_factory):
    cls, extra = ARCHS["phi3"]
    config = {**SHAPE, **extra}
    config.pop("pad_token_id")
    folder = build_tiny_model(tmp_path_factory.mktemp("phi3") / "hf", cls, seed=3, tokenizer_class="GPT2Tokenizer",
                              **config)
    return load_model(folder).gguf.path


def _refused(argv, pattern, tmp_path, capsys):
    import re
    from toolkit.cli import main
    before = set(tmp_path.iterdir())
    capsys.readouterr()
    assert main(argv) == 1, argv
    lines = capsys.readouterr().err.splitlines()  # progress lines ("converting ...") may come first
    err = lines[-1] if lines else ""
    assert err.startswith("coalora: error:") and sum("error" in ln for ln in lines) == 1, lines
    assert re.search(pattern, err), err
    assert set(tmp_path.iterdir()) == before, "a refused command must write nothing"


def test_damaged_models_are_refused(phi3_gguf, tiny_model_dir, tmp_path, capsys):
    import shutil
    bad = tmp_path / "in"
    bad.mkdir()
    out = tmp_path / "out"
    out.mkdir()
    cases = [
        (rewrite_gguf(phi3_gguf, bad / "arch.gguf", kv={"general.architecture": "gpt_neox"}),
         r"unsupported architecture 'gpt_neox'; supported: llama, qwen2, qwen3, gemma2, gemma3, phi3"),
        (rewrite_gguf(phi3_gguf, bad / "qkv.gguf", rows={"blk.0.attn_qkv.weight": 300}),
         r"blk\.0\.attn_qkv\.weight is 300 x 256, but phi3 .* needs 512 x 256"),
        (rewrite_gguf(phi3_gguf, bad / "missing.gguf", drop={"blk.1.ffn_down.weight"}),
         r"block 1 has other tensors than block 0 \(ffn_down\)"),
        (rewrite_gguf(phi3_gguf, bad / "blocks.gguf", kv={"phi3.block_count": 3}),
         r"tensors of 2 blocks, but phi3\.block_count is 3"),
        (rewrite_gguf(phi3_gguf, bad / "notok.gguf", drop={"tokenizer.ggml.tokens"}), r"GGUF has no tokenizer"),
    ]
    no_config = bad / "no-config"
    shutil.copytree(tiny_model_dir, no_config)
    (no_config / "config.json").unlink()
    cases.append((no_config, r"no config\.json"))
    no_tok = bad / "no-tokenizer"
    shutil.copytree(tiny_model_dir, no_tok)
    for f in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        (no_tok / f).unlink()
    cases.append((no_tok, r"llama\.cpp's converter cannot convert .*no-tokenizer"))
    neox = bad / "neox"
    neox.mkdir()
    (neox / "config.json").write_text('{"model_type": "gpt_neox"}')
    cases.append((neox, r"unsupported architecture 'gpt_neox'; supported model types: llama, mistral"))
    text = bad / "train.txt"
    text.write_text(tiny_corpus(2000))
    for model, pattern in cases:
        _refused(["convert", str(model), "-o", str(out / "x.gguf"), "--type", "Q8_0"], pattern, out, capsys)
        _refused(["train", str(model), "-o", str(out / "run"), "--steps", "1", "--data", str(text)], pattern, out, capsys)
