"""torch rounds activations exactly as llama.cpp's CPU kernels do, on every kernel path (tiny model)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import tiny_corpus
from converters.quant_types import CATALOGUE_NAMES
from toolkit import ggml_activations as ga

# Per block projection a type, so that one tiny model runs every CPU path of this build: tinyBLAS (Q8_0,
# Q5_0, F16, BF16), CPU_REPACK (Q4_0, IQ4_NL, Q4_K), the tiled K-quant kernels (Q6_K, Q5_K, Q3_K, Q2_K,
# IQ4_XS at 8+ tokens), vec_dot (one token, and Q4_1 / Q5_1 with Q8_1 activations).
MIX = ({"attn_q": "Q8_0", "attn_k": "Q4_0", "attn_v": "IQ4_NL", "attn_output": "Q5_0", "ffn_gate": "Q4_K",
        "ffn_up": "Q6_K", "ffn_down": "Q5_1"},
       {"attn_q": "Q5_K", "attn_k": "Q3_K", "attn_v": "IQ4_XS", "attn_output": "Q4_1", "ffn_gate": "Q2_K",
        "ffn_up": "BF16", "ffn_down": "Q8_0"})
HEADS = {"token_embd": "Q8_0", "output": "F16"}
REPACKED = {"Q4_0", "IQ4_NL", "Q4_K"}  # what CPU_REPACK takes on x86 with AVX2 (rows in groups of 8)


def _ties(rng, shape) -> np.ndarray:
    """Values whose quantization lands on .5 ties (k/2 on the 127 grid of each block's maximum) and others."""
    x = rng.integers(-254, 255, shape) / 2.0 * rng.uniform(0.01, 3.0, (shape[0], 1))
    x[:, ::7] = rng.standard_normal((shape[0], len(range(0, shape[1], 7))))
    x[0, :256] = 0.0  # an all-zero block
    return x.astype(np.float32)


@pytest.mark.parametrize("weight_type", [t for t in CATALOGUE_NAMES if t != "F32"])
def test_activation_rounding_is_ggml_cpu_from_float(weight_type):
    """Bit for bit what ggml-cpu's own from_float of the weight type's vec_dot_type makes of the activations."""
    rng = np.random.default_rng(0)
    kind = ga.vec_dot_kind(weight_type)
    assert kind == ga.cpu_vec_dot_type(weight_type)
    for x in (_ties(rng, (16, 512)), rng.standard_normal((16, 512)).astype(np.float32) * 3):
        got = ga.quantize_activations(torch.from_numpy(x), kind).numpy()
        assert np.array_equal(got, ga.cpu_activations(x, weight_type))


def test_shared_input_is_rounded_once_per_kind():
    """q/k/v (and gate/up) read one tensor: its rounding is reused for the same kind, not for another kind,
    another tensor or the same tensor changed in place; the straight-through gradient is unchanged."""
    rng = np.random.default_rng(2)
    x = torch.from_numpy(rng.standard_normal((4, 512)).astype(np.float32))
    first = ga.quantize_activations(x, "Q8_0")
    assert ga.quantize_activations(x, "Q8_0") is first
    assert torch.equal(ga.quantize_activations(x, "Q8_K"), torch.from_numpy(ga.cpu_activations(x.numpy(), "Q4_K")))
    x.mul_(3.0)  # in place: the version counter moves
    assert torch.equal(ga.quantize_activations(x, "Q8_0"), torch.from_numpy(ga.cpu_activations(x.detach().numpy(), "Q4_0")))
    assert torch.equal(ga.quantize_activations(x.clone(), "Q8_0"), ga.quantize_activations(x, "Q8_0"))
    with torch.inference_mode():  # inference tensors have no version counter: rounded every time
        xi = x.clone()
        assert torch.equal(ga.quantize_activations(xi, "Q8_0"), ga.quantize_activations(x, "Q8_0"))
    g = x.clone().requires_grad_()
    for _ in range(2):  # the second call reuses the rounding
        y = ga.quantize_activations(g, "Q8_0")
        assert torch.equal(y.detach(), torch.from_numpy(ga.cpu_activations(x.detach().numpy(), "Q4_0")))
        (y * 2.0).sum().backward()
        assert torch.equal(g.grad, torch.full_like(g, 2.0))
        g.grad = None


def test_torch_reciprocal_division_misses_ties():
    """Why the division is spelled out: torch's ``127 / t`` rounds twice and moves ties (the old emulation)."""
    rng = np.random.default_rng(1)
    x = _ties(rng, (64, 512))
    amax = torch.from_numpy(x).reshape(64, 16, 32).abs().amax(-1)
    assert not torch.equal(127.0 / amax, ga._div(127.0, amax))
    ref = ga.cpu_activations(x, "Q8_0")
    xb = torch.from_numpy(x).reshape(64, 16, 32)
    inv = torch.where(amax > 0, 127.0 / amax, torch.zeros_like(amax))[..., None]
    old = (torch.round(xb * inv) * (amax / 127.0).to(torch.float16).float()[..., None]).reshape(64, 512).numpy()
    assert (old != ref).sum() > 0
    assert np.array_equal(ga.quantize_activations(torch.from_numpy(x), "Q8_0").numpy(), ref)


@pytest.fixture(scope="module")
def traced(tiny_model_dir, tmp_path_factory):
    """Every weight matmul of the tiny mixed model in llama.cpp, at 64, 5 and 1 tokens, with the weights."""
    from gguf import GGUFReader
    from gguf.quants import dequantize

    from converters.configuration import Configuration
    from converters.gguf_model_writer import write_gguf
    from converters.model_loading import load_model
    from toolkit.llama_runtime import open_model
    from toolkit.llama_trace import capture_matmuls

    loaded = load_model(tiny_model_dir)
    layout = loaded.layout()
    types = {t.name: (HEADS[t.kind] if t.block < 0 else MIX[t.block % 2][t.kind]) for t in layout.tensors}
    path = tmp_path_factory.mktemp("exact") / "mix.gguf"
    write_gguf(loaded.gguf, path, Configuration(types), progress=False)
    ids = loaded.tokenizer(tiny_corpus(400, seed=2), add_special_tokens=False)["input_ids"][:70]
    with capture_matmuls() as calls:
        llm = open_model(path, n_ctx=128, n_threads=2)
        llm.reset()
        for a, b in ((0, 64), (64, 69), (69, 70)):
            llm.eval(ids[a:b])
        llm.close()
    reader = GGUFReader(str(path))
    weights = {t.name: dequantize(t.data, t.tensor_type).reshape(t.shape[::-1]).astype(np.float64)
               for t in reader.tensors if t.name in types}
    norm = next(t for t in reader.tensors if t.name == "blk.0.attn_norm.weight")
    eps = float(reader.get_field("llama.attention.layer_norm_rms_epsilon").contents())
    return calls, weights, types, ids, (np.array(norm.data, dtype=np.float32), eps)


def test_rms_norm_is_ggml_bit_for_bit(traced):
    """The first block's normed input (Q8_0 embedding rows) is llama.cpp's to the last bit."""
    calls, weights, _, ids, (norm, eps) = traced
    first = next(c for c in calls if c.weight == "blk.0.attn_q.weight")
    rows = torch.from_numpy(weights["token_embd.weight"][ids[:first.tokens]].astype(np.float32))
    got = ga.GGMLRMSNorm(torch.from_numpy(norm), eps)(rows).numpy()
    assert np.array_equal(got, first.x)


def test_every_kernel_path_is_emulated(traced):
    """llama.cpp's matmul output equals the emulated activations times the dequantized weight to float32
    rounding, on every path and batch; without the activation rounding it is measurably off."""
    calls, weights, types, *_ = traced
    assert {c.tokens for c in calls} == {64, 5, 1}
    assert {c.weight_type for c in calls} == set(types.values())
    seen = set()
    for c in calls:
        assert c.weight_type == types[c.weight]
        assert c.repacked == (c.weight_type in REPACKED), c.weight
        w = weights[c.weight]
        kind = ga.vec_dot_kind(c.weight_type)
        x = torch.from_numpy(c.x)
        emulated = ga.quantize_activations(x, kind).numpy().astype(np.float64) @ w.T
        if kind == "Q8_1":  # the fp16 block sums times the weight's block minima
            mins = ga.block_mins(torch.from_numpy(w)).numpy()
            emulated += ga.q8_1_sum_error(x).numpy().astype(np.float64) @ mins.T
        plain = c.x.astype(np.float64) @ w.T
        scale = np.abs(c.y).max()
        assert np.abs(emulated - c.y).max() <= 2e-6 * scale, (c.weight, c.weight_type, c.tokens)
        assert np.abs(plain - c.y).max() >= 1e-4 * scale, (c.weight, c.weight_type, c.tokens)
        seen.add((c.weight_type, c.tokens))
    assert len(seen) == len(set(types.values())) * 3
