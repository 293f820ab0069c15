"""Importance matrices: computed as llama-imatrix does, llama.cpp's file formats, quantization with them equal to
ggml's and llama_model_quantize's, the IQ1-IQ3 types, training with one, bad files."""
from __future__ import annotations


import numpy as np
import pytest
import torch

from conftest import build_tiny_llama, tiny_corpus
from bench.common import llama_quantize
from test_convert import gguf_tensors
from test_training import FAST, _llama_vs_torch
from converters import ggml_quant
from converters import imatrix as imx
from converters.configuration import Configuration
from converters.errors import CoaloraError
from converters.gguf_model_writer import llama_ftype, write_gguf
from converters.model_loading import load_model
from converters.quant_types import CATALOGUE, CATALOGUE_NAMES, IMATRIX_NAMES, get, resolve
from toolkit import evaluation, importance
from toolkit.cli import main
from toolkit.run import Run
from toolkit.training import TrainOptions, train

TAKES = [n for n in CATALOGUE_NAMES + IMATRIX_NAMES if CATALOGUE[n].takes_imatrix]
SEQ = 48


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    return load_model(tiny_model_dir)


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    p = tmp_path_factory.mktemp("imatrix-text") / "calib.txt"
    p.write_text(tiny_corpus(4000, seed=3))
    return p


@pytest.fixture(scope="module")
def tiny_imatrix(tiny, text_file, tmp_path_factory):
    """(path, Imatrix) of the tiny model over the tiny corpus, made by `coalora imatrix`."""
    out = tmp_path_factory.mktemp("imatrix") / "imatrix.gguf"
    assert main(["imatrix", str(tiny.source), "--data", str(text_file), "-o", str(out), "--chunks", "6",
                 "--seq-len", str(SEQ), "--device", "cpu", "--json"]) == 0
    return out, imx.load_for(out, imx.model_shapes(tiny.gguf))


@pytest.fixture(scope="module")
def tiny_f32(tiny, tmp_path_factory):
    out = tmp_path_factory.mktemp("f32") / "tiny-f32.gguf"
    write_gguf(tiny.gguf, out, tiny.layout().uniform("F32"), progress=False)
    return out


def test_values_are_mean_squared_activations(tiny, text_file, tiny_imatrix):
    """Every block matrix's entry equals the mean over the chunks' tokens of its input's squared columns, taken
    from the norms' and projections' outputs (not from the collector's hooks)."""
    _, im = tiny_imatrix
    ids, valid = importance.data_windows(tiny, [text_file], SEQ, 6)
    assert valid is None and ids.shape == (6, SEQ)
    model, seen = tiny.model, {}
    hooks = []
    for i, layer in enumerate(model.model.layers):
        def keep(key):
            return lambda m, a, out: seen.setdefault(key, []).append(out.detach().reshape(-1, out.shape[-1]))
        hooks += [layer.input_layernorm.register_forward_hook(keep(f"{i}.attn_in")),
                  layer.post_attention_layernorm.register_forward_hook(keep(f"{i}.ffn_in")),
                  layer.mlp.gate_proj.register_forward_hook(keep(f"{i}.gate")),
                  layer.mlp.up_proj.register_forward_hook(keep(f"{i}.up")),
                  layer.self_attn.o_proj.register_forward_pre_hook(
                      lambda m, a, i=i: seen.setdefault(f"{i}.o_in", []).append(a[0].reshape(-1, a[0].shape[-1])))]
    with torch.no_grad():
        model(torch.from_numpy(ids))
    for h in hooks:
        h.remove()
    x = {k: torch.cat(v).double() for k, v in seen.items()}
    for i, layer in enumerate(model.model.layers):
        down_in = layer.mlp.act_fn(x[f"{i}.gate"]) * x[f"{i}.up"]
        expect = {"attn_q": x[f"{i}.attn_in"], "attn_k": x[f"{i}.attn_in"], "attn_v": x[f"{i}.attn_in"],
                  "attn_output": x[f"{i}.o_in"], "ffn_gate": x[f"{i}.ffn_in"], "ffn_up": x[f"{i}.ffn_in"],
                  "ffn_down": down_in}
        for kind, inp in expect.items():
            name = f"blk.{i}.{kind}.weight"
            assert im.counts[name][0] == ids.size
            np.testing.assert_allclose(im.weights(name), (inp ** 2).mean(0).numpy(), rtol=2e-5, atol=1e-9)
    assert "token_embd.weight" not in im.sums and "output.weight" not in im.sums  # as llama-imatrix by default


def test_file_reads_back_gguf_and_dat(tiny_imatrix, tmp_path):
    path, im = tiny_imatrix
    import gguf
    r = gguf.GGUFReader(path)
    assert r.fields["general.type"].contents() == "imatrix"
    assert r.fields["imatrix.chunk_count"].contents() == 6 and r.fields["imatrix.chunk_size"].contents() == SEQ
    t = {x.name: x for x in r.tensors}
    assert list(t["blk.0.ffn_down.weight.in_sum2"].shape) == [512, 1]
    assert list(t["blk.0.ffn_down.weight.counts"].shape) == [1, 1]
    assert im.sha256 and len(im.names()) == 14
    imx.save_dat(im, tmp_path / "im.dat")
    legacy = imx.load(tmp_path / "im.dat")
    assert legacy.legacy and legacy.chunk_count == 6 and legacy.names() == im.names()
    for n in im.names():
        np.testing.assert_allclose(legacy.weights(n), im.weights(n), rtol=1e-6)


def test_caches_follow_the_values_not_the_file(tiny_imatrix, tmp_path):
    """An imatrix file of the same values with other metadata (the dataset paths differ between machines) shares
    the weight bank's cache folder; other values do not."""
    from toolkit.weight_bank import WeightBank

    path, im = tiny_imatrix
    moved = imx.load(path)
    moved.datasets = ["/elsewhere/" + d for d in moved.datasets] or ["/elsewhere/data.txt"]
    moved.save(tmp_path / "moved.gguf")
    other = imx.load(path)
    name = other.names()[0]
    other.sums[name] = other.sums[name] * 2 + 1
    other.save(tmp_path / "other.gguf")
    assert moved.sha256 != im.sha256 and other.sha256 != im.sha256
    assert moved.values_sha256() == im.values_sha256() != other.values_sha256()
    folder = lambda i: WeightBank(None, tmp_path / "cache", imatrix=i)._cache_file(name, get("IQ4_NL"), True).parent  # noqa: E731
    assert folder(moved) == folder(im) != folder(other)


@pytest.mark.parametrize("part", [0, 1])
def test_convert_imatrix_bytes_equal_ggml_and_llama_quantize(tiny, tiny_f32, tiny_imatrix, tmp_path, part):
    """Every type that takes importance weights, one per block matrix (two files hold them all): the bytes of
    `convert --imatrix` equal ggml_quantize_chunk's with the imatrix weights and llama_model_quantize's with
    the imatrix, and differ from those without it."""
    path, im = tiny_imatrix
    names = im.names()
    types = TAKES[part * len(names):(part + 1) * len(names)]
    rules = [(rf"^{n}$".replace(".", r"\."), q) for n, q in zip(names, types)]
    rules += [("token_embd", "Q8_0"), (r"^output\.", "Q8_0"), (".", "Q8_0")]  # no imatrix entry: no IQ type
    ours, theirs = tmp_path / "ours.gguf", tmp_path / "theirs.gguf"
    assert main(["convert", str(tiny_f32), "-o", str(ours), "--type", "Q8_0", "--imatrix", str(path)]
                + [a for r, q in rules for a in ("--tensor-type", f"{r}={q}")]) == 0
    a = gguf_tensors(ours)
    for name, qname in zip(names, types):
        ty, data = a[name]
        assert ty == qname
        w = tiny.gguf.weight(name)
        assert data == ggml_quant.quantize(w, qname, im.weights(name)).tobytes(), name
        if not get(qname).needs_imatrix:
            assert data != ggml_quant.quantize(w, qname).tobytes(), f"{qname}: the importance weights must count"
    llama_quantize(tiny_f32, theirs, llama_ftype("Q8_0"), pure=True, overrides=rules, imatrix=im)
    b = gguf_tensors(theirs)
    assert {n: t for n, (t, _) in a.items()} == {n: t for n, (t, _) in b.items()}
    assert all(a[n][1] == b[n][1] for n in a)


def test_fallbacks_match_llama_quantize(tmp_path):
    """Rows of 288 (a multiple of 32, not of 256): the 256-block types fall back as llama-quant.cpp does."""
    lm = load_model(build_tiny_llama(tmp_path / "m288", hidden_size=288, intermediate_size=512))
    f32 = tmp_path / "f32.gguf"
    write_gguf(lm.gguf, f32, lm.layout().uniform("F32"), progress=False)
    ones = imx.Imatrix({n: np.ones((1, lm.gguf.shape(n)[-1]), np.float32) for n in lm.gguf.quantizable_names(False)},
                       {n: np.array([1.0]) for n in lm.gguf.quantizable_names(False)}, sha256="x")
    for qname in ("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "IQ4_XS", "IQ2_XXS", "IQ3_S"):
        out = tmp_path / f"{qname}.gguf"
        if get(qname).needs_imatrix:
            llama_quantize(f32, out, llama_ftype(qname), pure=True, imatrix=ones,
                           overrides=[("token_embd", "Q8_0"), (r"^output\.", "Q8_0")])
        else:
            llama_quantize(f32, out, llama_ftype(qname), pure=True)
        theirs = gguf_tensors(out)
        assert theirs["blk.0.attn_q.weight"][0] == resolve(qname, 288)[0].name, qname
        assert theirs["blk.0.ffn_down.weight"][0] == qname


def test_iq_types_only_with_an_imatrix(tiny, tiny_imatrix):
    """Without an imatrix no IQ1-IQ3 type is on any menu; with one, the tensors it covers take them all and the
    others (the token embedding, the output head) only those llama.cpp quantizes without importance data."""
    layout = tiny.layout()
    menu = layout.with_menu(CATALOGUE_NAMES + IMATRIX_NAMES)
    assert not any(q.needs_imatrix for n in menu.names() for q in menu.menu(n))
    _, im = tiny_imatrix
    with_im = menu.with_imatrix(im.sums)
    assert {q.name for q in with_im.menu("blk.0.ffn_down.weight")} >= set(IMATRIX_NAMES)
    for name in ("token_embd.weight", "output.weight"):  # no entry: IQ3_S and IQ3_XXS, no IQ2 or IQ1 type
        assert [q.name for q in with_im.menu(name) if q.needs_imatrix] == ["IQ3_S", "IQ3_XXS"], name
    back = type(with_im).from_description(with_im.describe())
    assert back.imatrix_tensors == with_im.imatrix_tensors
    assert back.menu("output.weight") == with_im.menu("output.weight")
    older = with_im.describe()
    del older["iq_without_entry"]  # a run recorded before: its tables never measured IQ types there
    assert not any(q.needs_imatrix for q in type(with_im).from_description(older).menu("token_embd.weight"))
    w = tiny.gguf.weight("blk.0.ffn_down.weight")
    for qname in ("IQ2_S", "IQ2_XS", "IQ2_XXS", "IQ1_M", "IQ1_S"):
        with pytest.raises(ggml_quant.GGMLError, match="importance matrix"):
            ggml_quant.quantize(w, qname)
    assert ggml_quant.quantize(w, "IQ3_S").nbytes == CATALOGUE["IQ3_S"].tensor_bytes(*w.shape)
    with pytest.raises(CoaloraError, match="IQ3_S needs an importance matrix"):
        imx.check_configuration(Configuration({"token_embd.weight": "IQ3_S"}), None)
    imx.check_configuration(Configuration({"token_embd.weight": "IQ3_S", "output.weight": "IQ3_XXS"}), im)
    with pytest.raises(CoaloraError, match="output.weight: IQ2_S needs an importance matrix, and the imatrix has no"):
        imx.check_configuration(Configuration({"output.weight": "IQ2_S"}), im)


def test_iq3_without_an_entry_equals_llama_quantize(tiny, tiny_f32, tiny_imatrix, tmp_path):
    """IQ3_S / IQ3_XXS on the tensors the imatrix has no entry for (as llama.cpp's IQ3 mixes give the token
    embedding): `convert --imatrix` writes ggml's bytes without importance weights, the bytes llama_model_quantize
    writes with the same imatrix; llama.cpp's IQ3_M file of the tiny model is on the imatrix layout's menus."""
    from converters.llama_mixes import mix_configurations

    path, im = tiny_imatrix
    rules = [("token_embd", "IQ3_S"), (r"^output\.", "IQ3_XXS"), (".", "Q4_K")]
    ours, theirs = tmp_path / "ours.gguf", tmp_path / "theirs.gguf"
    assert main(["convert", str(tiny_f32), "-o", str(ours), "--type", "Q4_K", "--imatrix", str(path)]
                + [a for r, q in rules for a in ("--tensor-type", f"{r}={q}")]) == 0
    llama_quantize(tiny_f32, theirs, llama_ftype("Q4_K"), pure=True, overrides=rules, imatrix=im)
    a, b = gguf_tensors(ours), gguf_tensors(theirs)
    for name, qname in (("token_embd.weight", "IQ3_S"), ("output.weight", "IQ3_XXS")):
        assert a[name][0] == b[name][0] == qname
        assert a[name][1] == b[name][1] == ggml_quant.quantize(tiny.gguf.weight(name), qname).tobytes(), name
    assert all(a[n] == b[n] for n in a)
    layout = tiny.layout().with_menu(CATALOGUE_NAMES + IMATRIX_NAMES).with_imatrix(im.sums)
    iq3_m = mix_configurations(tiny_f32, layout, ("IQ3_M",), imatrix=im)["IQ3_M"]
    assert iq3_m.types["token_embd.weight"].name == "IQ3_S" and layout.on_menu(iq3_m)


def _error(capsys, argv) -> str:
    capsys.readouterr()
    assert main(argv) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("coalora: error:") and "\n" not in err, err
    return err


def _save_with_string_chunk_count(im: imx.Imatrix, path) -> None:
    """``im`` in the imatrix GGUF layout, but with imatrix.chunk_count a string (llama.cpp reads a uint32)."""
    import gguf

    w = gguf.GGUFWriter(path, arch="")
    w.kv_data[0].pop("general.architecture", None)
    w.add_string("general.type", "imatrix")
    w.add_array("imatrix.datasets", ["text"])
    w.add_string("imatrix.chunk_count", "4")
    w.add_uint32("imatrix.chunk_size", 32)
    for name in im.names():
        w.add_tensor(name + ".in_sum2", np.ascontiguousarray(im.sums[name], dtype=np.float32))
        w.add_tensor(name + ".counts", np.asarray(im.counts[name], dtype=np.float32).reshape(-1, 1))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def _bad_files(im: imx.Imatrix, good, tmp_path):
    raw = good.read_bytes()
    (tmp_path / "truncated.gguf").write_bytes(raw[: len(raw) // 2])
    (tmp_path / "garbage.gguf").write_bytes(bytes(range(256)) * 8)
    (tmp_path / "truncated.dat").write_bytes((tmp_path / "good.dat").read_bytes()[:200])
    other = imx.Imatrix({"blk.0.attn_q.weight": np.ones((1, 128), np.float32)}, {"blk.0.attn_q.weight": np.ones(1)})
    other.save(tmp_path / "other-size.gguf")
    renamed = imx.Imatrix({"blk.7.attn_q.weight": np.ones((1, 256), np.float32)}, {"blk.7.attn_q.weight": np.ones(1)})
    renamed.save(tmp_path / "other-names.gguf")
    zero = imx.Imatrix(dict(im.sums), {n: (np.zeros(1) if i == 0 else c) for i, (n, c) in enumerate(im.counts.items())})
    zero.save(tmp_path / "zero.gguf")
    nan = imx.Imatrix({n: (s * np.nan if i == 0 else s) for i, (n, s) in enumerate(im.sums.items())}, dict(im.counts))
    nan.save(tmp_path / "nan.gguf")
    (tmp_path / "trailing.gguf").write_bytes(raw + bytes(1000))  # llama.cpp's loader accounts for every byte
    _save_with_string_chunk_count(im, tmp_path / "chunk-count-string.gguf")
    return {"trailing.gguf": "after the last tensor's data", "chunk-count-string.gguf": "chunk_count is STRING",
            "truncated.gguf": "truncated or corrupt|not a readable", "garbage.gguf": "neither a GGUF",
            "truncated.dat": "truncated or corrupt", "other-size.gguf": "another model",
            "other-names.gguf": "another model", "zero.gguf": "zero count", "nan.gguf": "NaN"}


def test_bad_imatrix_files_are_one_line_errors(tiny, tiny_f32, tiny_imatrix, tmp_path, capsys):
    good, im = tiny_imatrix
    imx.save_dat(im, tmp_path / "good.dat")
    out = tmp_path / "out.gguf"
    for name, message in _bad_files(im, good, tmp_path).items():
        err = _error(capsys, ["convert", str(tiny_f32), "-o", str(out), "--type", "Q4_K", "--imatrix", str(tmp_path / name)])
        assert any(m in err for m in message.split("|")), (name, err)
        assert not out.exists() and not list(tmp_path.glob(".out.gguf*"))
    err = _error(capsys, ["convert", str(tiny_f32), "-o", str(out), "--type", "IQ2_XS"])
    assert "IQ2_XS needs an importance matrix" in err and not out.exists()
    err = _error(capsys, ["convert", str(tiny_f32), "-o", str(out), "--type", "IQ2_XS", "--imatrix", str(good)])
    assert "no entry" in err and "give it another type" in err and not out.exists()  # token_embd has none
    err = _error(capsys, ["imatrix", str(tiny.source), "--data", str(tmp_path / "truncated.dat"), "-o",
                          str(tmp_path / "x.txt")])
    assert ".gguf" in err


def _iq_mix(layout, im) -> Configuration:
    """Every IQ1-IQ3 type on the matrices the imatrix has entries for, Q8_0 on the others."""
    return Configuration({n: (IMATRIX_NAMES[i % len(IMATRIX_NAMES)] if n in im.sums else "Q8_0")
                          for i, n in enumerate(layout.names())})


def test_training_computes_and_uses_an_imatrix(tiny, tiny_model_dir, tiny_imatrix, tmp_path):
    """A fine-tune (one configuration: every IQ1-IQ3 type) computes its imatrix from the training windows; the
    bank's bytes are ggml's with it, and torch predicts llama.cpp's perplexity of the file and adapter."""
    text = tmp_path / "train.txt"
    text.write_text(tiny_corpus(6000, seed=1))
    cfg = _iq_mix(tiny.layout(), tiny_imatrix[1])
    opts = TrainOptions(**{**FAST, "mode": "single", "steps": 4, "rounds": 1, "imatrix": "train"})
    run = train(tmp_path / "run", tiny_model_dir, [text], opts, fixed_config=cfg, progress=False, log=lambda s: None)
    run = Run.open(run.path)
    im = run.imatrix()
    assert im is not None and im.sha256 == run.meta["imatrix_sha256"] == imx.load(run.imatrix_path).sha256
    assert im.chunk_size == FAST["seq_len"] and im.names() == tiny_imatrix[1].names()
    assert set(IMATRIX_NAMES) <= set(run.layout.menu_names)
    assert {q.name for q in run.layout.menu("blk.1.ffn_down.weight")} >= set(IMATRIX_NAMES)
    name = "blk.1.ffn_down.weight"
    for q in ("IQ2_XS", "Q4_K", "Q8_0"):
        assert np.array_equal(run.quantized_bytes(name, q),
                              ggml_quant.quantize(run.bank().original(name), q, im.weights(name))), q
    _, _, llama_nll, torch_nll, _ = _llama_vs_torch(run, cfg, tmp_path)
    p_llama, p_torch = evaluation.perplexity(llama_nll), evaluation.perplexity(torch_nll)
    assert abs(p_llama / p_torch - 1) <= 0.005, (p_llama, p_torch)


def test_no_imatrix_and_imatrix_file_options(tiny, tiny_model_dir, tiny_imatrix, tmp_path, capsys):
    text = tmp_path / "t.txt"
    text.write_text(tiny_corpus(6000, seed=1))
    small = ["--steps", "2", "--seq-len", "32", "--batch", "2", "--json"]
    assert main(["finetune", str(tiny_model_dir), "--config", "Q4_K", "--data", str(text), "-o",
                 str(tmp_path / "plain"), "--no-imatrix", *small]) == 0
    plain = Run.open(tmp_path / "plain")
    assert plain.imatrix() is None and not plain.imatrix_path.exists()
    assert not any(q.needs_imatrix for n in plain.layout.names() for q in plain.layout.menu(n))
    path, im = tiny_imatrix
    assert main(["finetune", str(tiny_model_dir), "--config", "Q4_K", "--data", str(text), "-o",
                 str(tmp_path / "given"), "--imatrix", str(path), *small]) == 0
    given = Run.open(tmp_path / "given")
    assert given.meta["imatrix_sha256"] == im.sha256 and given.imatrix_path.read_bytes() == path.read_bytes()
    for argv, message in [(["train", "--no-imatrix", "--menu", "Q8_0,IQ2_XS"], "needs an importance matrix"),
                          (["finetune", "--no-imatrix", "--config", "IQ3_S"], "needs an importance matrix"),
                          (["train", "--imatrix", str(tmp_path / "missing.gguf")], "not found")]:
        err = _error(capsys, [argv[0], str(tiny_model_dir), "--data", str(text), "-o", str(tmp_path / "bad"),
                              *argv[1:], *small])
        assert message in err, err
        assert not (tmp_path / "bad").exists()


@pytest.mark.integration
def test_smollm2_iq_types_torch_matches_llama_cpp(smollm2_run, tmp_path):
    """The shared SmolLM2 run quantizes with the imatrix computed from its training text; a file with the IQ1-IQ3
    types on ffn_down (the only matrices their 256-blocks fit) and its adapter: torch predicts llama.cpp."""
    from test_integration_training import _pair
    from toolkit import assets, llama_runtime

    run = smollm2_run
    im = run.imatrix()
    assert im is not None and "token_embd.weight" not in im.sums
    downs = [n for n in run.layout.names() if run.layout[n].kind == "ffn_down"]
    assert all({q.name for q in run.layout.menu(n)} >= set(IMATRIX_NAMES) for n in downs)
    types = {n: "Q4_0" for n in run.layout.names()}
    types.update({n: IMATRIX_NAMES[i % len(IMATRIX_NAMES)] for i, n in enumerate(downs)})
    cfg = Configuration(types)
    model, adapter = _pair(run, cfg, tmp_path)
    llm = llama_runtime.open_model(model, n_ctx=512)
    windows = evaluation.eval_windows(llm, assets.novel_path(assets.EVAL_NOVEL).read_text(), n_windows=4, n_ctx=512)
    llama_runtime.set_adapter(llm, llama_runtime.load_adapter(llm, adapter, model))
    p_llama = evaluation.perplexity(llama_runtime.llama_window_nll(llm, windows))
    llm.close()
    p_torch = evaluation.perplexity(evaluation.torch_window_nll(run.torch_logits_fn(cfg), windows))
    assert abs(p_llama / p_torch - 1) <= 0.005, (p_llama, p_torch)


def test_bench_knows_where_llama_cpp_pure_files_abort(tiny_f32, tiny_imatrix):
    """llama_model_quantize aborts the process (GGML_ASSERT) on a pure IQ2 file whose token embedding or output
    head can take the type but has no imatrix entry; bench/imatrix_quality.py finds those tensors beforehand."""
    from bench.imatrix_quality import _pure_file_aborts

    _, im = tiny_imatrix
    assert "token_embd.weight" not in im.names() and "output.weight" not in im.names()
    assert _pure_file_aborts(tiny_f32, im, get("IQ2_S")) == ["output.weight", "token_embd.weight"]  # 256-wide rows
