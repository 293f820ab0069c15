"""Conversion: our GGUF bytes equal llama.cpp's, sizes are exact, llama.cpp agrees with transformers."""
from __future__ import annotations

import json
import os
import random
import re
from pathlib import Path

import numpy as np
import pytest

from bench.common import llama_quantize
from conftest import austen_text
from converters.gguf_model_writer import llama_ftype, write_gguf
from converters.model_loading import load_model
from converters.quant_types import CATALOGUE_NAMES
from toolkit.cli import main
from converters.configuration import Configuration, apply_overrides
from converters.errors import CoaloraError

SAMPLE = "Elinor said to her sister, “the house at Barton is 1811 miles away!”  Mr Dashwood\n\tcafé—well?"


def gguf_tensors(path) -> dict[str, tuple[str, bytes]]:
    import gguf
    r = gguf.GGUFReader(path)
    return {t.name: (t.tensor_type.name, bytes(np.asarray(t.data).view(np.uint8).reshape(-1))) for t in r.tensors}


def llama(path, **kw):
    import llama_cpp
    return llama_cpp.Llama(str(path), verbose=False, logits_all=True, type_k=0, type_v=0, flash_attn=False,
                           n_ctx=kw.pop("n_ctx", 256), n_threads=2, n_batch=256, **kw)


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    return load_model(tiny_model_dir)


@pytest.fixture(scope="module")
def tiny_f32(tiny, tmp_path_factory):
    out = tmp_path_factory.mktemp("f32") / "tiny-f32.gguf"
    write_gguf(tiny.gguf, out, tiny.layout().uniform("F32"), progress=False)
    return out


def test_loaded_model_names_and_permutation(tiny):
    assert tiny.arch == "llama" and tiny.n_blocks == 2
    assert tiny.gguf_name("model.layers.1.self_attn.q_proj.weight") == "blk.1.attn_q.weight"
    assert tiny.hf_name("output.weight") == "lm_head.weight"
    layout = tiny.layout()
    assert len(layout.tensors) == 2 * 7 + 2
    assert layout["token_embd.weight"].block == -1 and layout["blk.1.ffn_down.weight"].n_per_row == 512
    for name in ("blk.0.attn_q.weight", "blk.0.attn_k.weight", "blk.0.attn_v.weight"):
        w = tiny.gguf_weight(name)
        hf = tiny.model.state_dict()[tiny.hf_name(name)].numpy()
        np.testing.assert_array_equal(tiny.to_hf_order(name, w), hf)
        np.testing.assert_array_equal(tiny.permute_rows(name, hf), w)
    assert not np.array_equal(tiny.gguf_weight("blk.0.attn_k.weight"),
                              tiny.model.state_dict()["model.layers.0.self_attn.k_proj.weight"].numpy())


def test_file_bytes_exact(tiny, tmp_path):
    layout = tiny.layout()
    rng = random.Random(0)
    cfgs = [layout.uniform("F32"), layout.uniform("Q4_K"), layout.uniform("IQ4_XS")]
    cfgs += [Configuration({t.name: rng.choice(CATALOGUE_NAMES) for t in layout.tensors}) for _ in range(3)]
    for i, cfg in enumerate(cfgs):
        out = tmp_path / f"m{i}.gguf"
        write_gguf(tiny.gguf, out, cfg, progress=False)
        assert layout.file_bytes(cfg) == os.path.getsize(out)
    small = tiny.layout(include_embeddings=False)
    assert "token_embd.weight" not in small.names()
    cfg = Configuration({n: "Q5_0" for n in small.names()})
    write_gguf(tiny.gguf, tmp_path / "noemb.gguf", cfg, progress=False)
    assert small.file_bytes(cfg) == os.path.getsize(tmp_path / "noemb.gguf")


@pytest.mark.parametrize("qname", CATALOGUE_NAMES)
def test_bytes_equal_llama_quantize(tiny, tiny_f32, tmp_path, qname):
    ours, theirs = tmp_path / "ours.gguf", tmp_path / "theirs.gguf"
    write_gguf(tiny.gguf, ours, tiny.layout().uniform(qname), progress=False)
    llama_quantize(tiny_f32, theirs, llama_ftype(qname), pure=True)
    a, b = gguf_tensors(ours), gguf_tensors(theirs)
    assert a.keys() == b.keys()
    for name in a:
        assert a[name][0] == b[name][0], name
        assert a[name][1] == b[name][1], name


def test_mixed_overrides_equal_llama_quantize(tiny, tiny_f32, tmp_path):
    rules = [("attn_(q|k)", "Q4_0"), ("attn_v", "IQ4_NL"), ("attn_output", "Q5_K"), ("ffn_(gate|up)", "Q3_K"),
             ("ffn_down", "Q8_0"), ("token_embd", "Q6_K"), (r"^output\.", "Q4_K")]
    layout = tiny.layout()
    cfg, notes = apply_overrides(layout, layout.uniform("F32"), rules)
    assert notes == []
    ours, theirs = tmp_path / "ours.gguf", tmp_path / "theirs.gguf"
    write_gguf(tiny.gguf, ours, cfg, progress=False)
    llama_quantize(tiny_f32, theirs, llama_ftype("Q4_0"), pure=False, overrides=rules)
    a, b = gguf_tensors(ours), gguf_tensors(theirs)
    assert {n: t for n, (t, _) in a.items()} == {n: t for n, (t, _) in b.items()}
    assert all(a[n][1] == b[n][1] for n in a)
    assert os.path.getsize(ours) == layout.file_bytes(cfg)


def test_quantized_callback_bytes_are_written(tiny, tmp_path):
    from converters.ggml_quant import quantize
    cfg = tiny.layout().uniform("Q4_0")
    seen = []

    def cache(name, q):
        seen.append(name)
        return quantize(tiny.gguf_weight(name), q)
    write_gguf(tiny.gguf, tmp_path / "a.gguf", cfg, progress=False)
    write_gguf(tiny.gguf, tmp_path / "b.gguf", cfg, quantized=cache, progress=False)
    assert sorted(seen) == sorted(cfg.types)
    assert (tmp_path / "a.gguf").read_bytes() == (tmp_path / "b.gguf").read_bytes()


def test_inspect_json(tiny, tmp_path, capsys):
    layout = tiny.layout()
    cfg = Configuration({t.name: ("Q4_K" if t.block == 0 else "Q8_0") for t in layout.tensors})
    out = tmp_path / "mix.gguf"
    write_gguf(tiny.gguf, out, cfg, progress=False)
    capsys.readouterr()
    assert main(["inspect", str(out), "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["tensor_bytes_padded"] == r["tensor_data_bytes"] == sum(t["bytes"] for t in r["tensors"])
    assert r["file_bytes"] == os.path.getsize(out) == layout.file_bytes(cfg)
    assert r["types"] == {"F32": 5, "Q4_K": 7, "Q8_0": 9}
    q = sum(layout[n].bytes(t) for n, t in cfg.types.items())
    assert r["quantized_bytes"] == q
    assert abs(r["bits_per_weight_quantized"] - layout.bits_per_weight(cfg)) < 1e-9
    assert abs(r["bits_per_weight"] - layout.bits_per_weight(cfg)) < 1e-9


def gguf_fields(path) -> dict:
    import gguf
    r = gguf.GGUFReader(path)
    return {k: f.contents() for k, f in r.fields.items() if not k.startswith("GGUF.")}


def test_tokenizer_metadata_and_tokenize(tiny, tiny_f32):
    """llama.cpp's converter wrote the tokenizer; llama.cpp tokenizes as the Hugging Face tokenizer does."""
    meta = gguf_fields(tiny_f32)
    assert meta["tokenizer.ggml.model"] == "gpt2" and meta["tokenizer.ggml.pre"] == "gpt-2"
    assert len(meta["tokenizer.ggml.tokens"]) == len(meta["tokenizer.ggml.token_type"]) == tiny.config.vocab_size
    assert meta["tokenizer.ggml.bos_token_id"] == tiny.tokenizer.bos_token_id
    assert meta["tokenizer.ggml.token_type"][tiny.tokenizer.bos_token_id] == 3  # control
    assert meta["tokenizer.chat_template"] == tiny.tokenizer.chat_template
    m = llama(tiny_f32)
    for text in (SAMPLE, "<s>user\nhello</s>", tiny.tokenizer.decode(list(range(tiny.config.vocab_size)))):
        assert m.tokenize(text.encode(), add_bos=False, special=True) == tiny.tokenizer(text)["input_ids"]


def test_writer_copies_the_source(tiny, tmp_path):
    """Every metadata key and every tensor outside the configuration is the source GGUF's, unchanged;
    general.file_type is set as llama-quantize sets it."""
    out = tmp_path / "mix.gguf"
    cfg = tiny.layout().uniform("Q4_K")
    write_gguf(tiny.gguf, out, cfg, progress=False)
    src, ours = gguf_fields(tiny.gguf.path), gguf_fields(out)
    assert ours.pop("general.file_type") == llama_ftype("Q4_K") and src.pop("general.file_type") == 0
    assert ours == src
    a, b = gguf_tensors(tiny.gguf.path), gguf_tensors(out)
    assert list(a) == list(b)  # same tensors, same order
    for name in a:
        if name not in cfg.types:
            assert a[name] == b[name], name
        else:
            assert b[name][0] == "Q4_K", name


def test_logits_match_transformers(tiny, tiny_f32):
    import torch
    ids = tiny.tokenizer(SAMPLE * 2)["input_ids"][:96]
    m = llama(tiny_f32)
    m.eval(ids)
    ours = np.asarray(m.scores[: len(ids)])
    with torch.no_grad():
        ref = tiny.model(torch.tensor([ids])).logits[0].numpy()
    assert np.abs(ours - ref).max() <= 1e-3


def test_gguf_source_roundtrip(tiny, tiny_f32):
    """The written F32 GGUF, loaded as a model in its own right, is the same model: weights and logits."""
    import torch
    back = load_model(tiny_f32)
    for name in ("token_embd.weight", "blk.1.attn_q.weight", "blk.0.attn_k.weight", "output.weight"):
        np.testing.assert_array_equal(back.gguf_weight(name), tiny.gguf_weight(name))
    ids = torch.tensor([tiny.tokenizer(SAMPLE)["input_ids"]])
    with torch.no_grad():
        np.testing.assert_allclose(back.model(ids).logits.numpy(), tiny.model(ids).logits.numpy(), atol=1e-5)
    assert back.tokenizer(SAMPLE)["input_ids"] == tiny.tokenizer(SAMPLE)["input_ids"]
    assert back.layout().fixed_bytes == tiny.layout().fixed_bytes


def test_gguf_loads_with_one_parse(tiny_f32, monkeypatch):
    """transformers reads the config, weights and tokenizer through the source's reader (the file is parsed
    once), and the model is the one transformers' own parses give: weights, config, tokenizer."""
    import gguf
    import torch
    from converters import model_loading

    parses = []
    plain = gguf.GGUFReader

    class Counting(plain):
        def __init__(self, path, *a, **k):
            parses.append(Path(path).name)
            super().__init__(path, *a, **k)

    monkeypatch.setattr(gguf, "GGUFReader", Counting)
    shared = load_model(tiny_f32)
    assert parses == [] and gguf.GGUFReader is Counting  # the source's own reader (gguf_check) only; restored
    monkeypatch.setattr(model_loading, "_reader_for", lambda path, reader, plain: plain)
    own = load_model(tiny_f32)
    assert len(parses) >= 3  # config, weights, tokenizer
    a, b = shared.model.state_dict(), own.model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert shared.config.to_dict() == own.config.to_dict()
    assert shared.tokenizer.get_vocab() == own.tokenizer.get_vocab()
    assert shared.tokenizer(SAMPLE)["input_ids"] == own.tokenizer(SAMPLE)["input_ids"]


def test_load_errors(tmp_path):
    with pytest.raises(CoaloraError, match="not found"):
        load_model(tmp_path / "nothing")
    d = tmp_path / "neox"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"model_type": "gpt_neox"}))
    with pytest.raises(CoaloraError, match="gpt_neox.*supported model types: llama, mistral, qwen2"):
        load_model(d)
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + os.urandom(200))
    with pytest.raises(CoaloraError):
        load_model(bad)


def test_cli_convert_and_errors(tiny_model_dir, tiny_f32, tmp_path, capsys):
    out = tmp_path / "out.gguf"
    assert main(["convert", str(tiny_model_dir), "-o", str(out), "--type", "Q4_0",
                 "--tensor-type", "ffn_down=Q8_0"]) == 0
    r = gguf_tensors(out)
    assert r["blk.0.ffn_down.weight"][0] == "Q8_0" and r["blk.0.attn_q.weight"][0] == "Q4_0"
    recipe = tmp_path / "recipe.json"
    lm_layout = load_model(tiny_model_dir).layout()
    Configuration({n: "Q5_1" for n in lm_layout.names()}).save(recipe)
    assert main(["convert", str(tiny_model_dir), "-o", str(tmp_path / "r.gguf"), "--recipe", str(recipe)]) == 0
    assert gguf_tensors(tmp_path / "r.gguf")["output.weight"][0] == "Q5_1"
    corrupt = tmp_path / "corrupt.gguf"
    corrupt.write_bytes(tiny_f32.read_bytes()[:5000])
    capsys.readouterr()
    cases = [
        (["convert", str(tmp_path / "missing"), "-o", str(tmp_path / "a.gguf")], "not found"),
        (["convert", str(tiny_model_dir), "-o", str(tmp_path / "b.gguf"), "--type", "Q7_7"], "unknown quant type"),
        (["convert", str(tiny_model_dir), "-o", str(tmp_path / "c.gguf"), "--tensor-type", "nomatch=Q8_0"],
         "matches no"),
        (["convert", str(tiny_model_dir), "-o", str(tmp_path / "no" / "dir" / "d.gguf")], "does not exist"),
        (["convert", str(tiny_model_dir), "-o", "/proc/e.gguf"], "cannot write"),
        (["convert", str(corrupt), "-o", str(tmp_path / "f.gguf")], "GGUF"),
        (["inspect", str(corrupt)], "truncated|not a readable"),
        (["inspect", str(tmp_path / "nope.gguf")], "not found"),
    ]
    for argv, msg in cases:
        rc = main(argv)
        err = capsys.readouterr().err
        assert rc == 1, argv
        assert err.startswith("coalora: error:") and err.count("\n") == 1, err
        assert re.search(msg, err), err
    leftovers = {p.name for p in tmp_path.iterdir()} - {"out.gguf", "recipe.json", "r.gguf", "corrupt.gguf"}
    assert leftovers == set()


# ---- integration: the real SmolLM2 and Austen ------------------------------------------------------
@pytest.fixture(scope="module")
def smollm2(smollm2_gguf):
    return load_model(smollm2_gguf)


@pytest.mark.integration
def test_smollm2_f32_logits_and_tokenizer(smollm2, tmp_path):
    import torch
    out = tmp_path / "smollm2-f32.gguf"
    layout = smollm2.layout()
    cfg = layout.uniform("F32")
    write_gguf(smollm2.gguf, out, cfg, progress=False)
    assert os.path.getsize(out) == layout.file_bytes(cfg)
    text = austen_text("prideprejudice")
    start = text.find("Chapter 3")
    chapter = text[start: text.find("Chapter 4", start)] if start >= 0 else text[:20000]
    m = llama(out, n_ctx=128)
    assert m.tokenize(chapter.encode(), add_bos=False, special=True) == smollm2.tokenizer(chapter)["input_ids"]
    ids = smollm2.tokenizer(chapter)["input_ids"][:64]
    m.eval(ids)
    ours = np.asarray(m.scores[: len(ids)])
    with torch.no_grad():
        ref = smollm2.model(torch.tensor([ids])).logits[0].numpy()
    assert np.abs(ours - ref).max() <= 1e-3


@pytest.mark.integration
def test_smollm2_layout_fallbacks(smollm2):
    layout = smollm2.layout()
    assert "output.weight" not in layout.names()  # tied embeddings
    assert len(layout.tensors) == 30 * 7 + 1
    cfg, notes = layout.uniform_with_notes("Q4_K")
    assert cfg.types["blk.0.attn_q.weight"].name == "Q5_0"        # rows of 576
    assert cfg.types["blk.0.ffn_down.weight"].name == "Q4_K"      # rows of 1536
    assert len(notes) == 30 * 6 + 1
