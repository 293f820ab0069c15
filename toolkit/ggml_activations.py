"""What llama.cpp's CPU backend does to activations before a matmul with a weight of a given type.

ggml converts the activations (F32) to the weight type's ``vec_dot_type`` with that type's CPU
``from_float`` and multiplies those: Q8_0 blocks of 32 for the 32-block quants (Q8_1 for Q4_1/Q5_1: the
same values, plus an fp16 ``s = d * sum(q)`` per block that the dot products use for the weight's
minimum, see :func:`ggml_linear`), Q8_K blocks of 256 for the K-quants and the IQ types but IQ4_NL, F16 for F16 weights. Every CPU path of the
llama-cpp-python 0.3.36 build (x86-64, AVX2/FMA/F16C, no AVX-512; llamafile and CPU_REPACK on) rounds
them the same way, whatever the batch: the generic vec_dot path (one token, or rows the others leave),
llamafile's tinyBLAS (F32/F16/BF16/Q8_0/Q4_0/Q5_0/IQ4_NL weights, 2+ tokens), the CPU_REPACK buffer's
interleaved kernels (Q4_0, Q4_K, IQ4_NL rows in groups of 8; their ``quantize_mat`` 4-row quantizers
compute the same scales and roundings), the tiled K-quant kernels (8+ tokens), and the tied output head
(token_embd, a plain weight in the matmul; get_rows dequantizes it exactly). ``tests/test_exactness.py``
pins this per path through llama.cpp's eval callback. Details that matter: the AVX2 quantizers round half
to even (``_mm256_round_ps``) and divide once (``127.f / amax``), where torch's ``127 / t`` is
``127 * t.reciprocal()``: the one-ulp difference moved activations across .5 ties. Ties are common where the
input is structured (SmolLM2's first block reads normed Q8_0 embeddings), so the RMS norm is emulated bit for
bit too (:class:`GGMLRMSNorm`). Further in, summation-order differences of ~1e-7 still flip near-tie roundings
now and then, so torch and llama.cpp drift apart slowly; the perplexities agree to noise (see
bench/results/exactness.md). Gradients pass straight through the rounding.
"""
from __future__ import annotations

import ctypes
import functools
from pathlib import Path

import numpy as np
import torch
from torch.nn import functional as F

_Q8_0 = {"Q8_0", "Q5_0", "Q4_0", "IQ4_NL"}
_Q8_1 = {"Q5_1", "Q4_1"}
_Q8_K = {"Q6_K", "Q5_K", "Q4_K", "Q3_K", "Q2_K", "IQ4_XS",
         "IQ3_S", "IQ3_XXS", "IQ2_S", "IQ2_XS", "IQ2_XXS", "IQ1_M", "IQ1_S"}


def vec_dot_kind(weight_type: str) -> str | None:
    """The format ggml's CPU backend converts activations to for a ``weight_type`` weight; None: kept F32."""
    if weight_type in _Q8_0:
        return "Q8_0"
    if weight_type in _Q8_1:
        return "Q8_1"
    if weight_type in _Q8_K:
        return "Q8_K"
    if weight_type in ("F16", "BF16"):
        return weight_type
    return None


def _div(num: float, t: torch.Tensor) -> torch.Tensor:
    """``num / t`` rounded once, as C's float division. Torch's ``num / t`` is ``t.reciprocal() * num``,
    rounded twice: one ulp off in about a quarter of cases, enough to move ``x * id`` across a .5 tie.
    Computed in double and rounded to float: exactly the float quotient (53 >= 2 * 24 + 2 bits)."""
    return (num / t.to(torch.float64)).to(t.dtype)


def _sqrt(t: torch.Tensor) -> torch.Tensor:
    """``sqrtf``, correctly rounded (torch's float32 sqrt is not always: SLEEF), through double as :func:`_div`."""
    return torch.sqrt(t.to(torch.float64)).to(t.dtype)


def _q8_0_blocks(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(integer values [..., n/32, 32], unrounded scale amax/127 [..., n/32, 1]) of ggml's Q8_0 / Q8_1 blocks."""
    xb = x.reshape(*x.shape[:-1], x.shape[-1] // 32, 32)
    amax = xb.abs().amax(-1, keepdim=True)
    nz = amax > 0
    inv = torch.where(nz, _div(127.0, torch.where(nz, amax, torch.ones_like(amax))), torch.zeros_like(amax))
    return torch.round(xb * inv), amax / 127.0  # round half to even, as _mm256_round_ps


def _fp16(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.float16).to(t.dtype)


def _q8_0(x: torch.Tensor) -> torch.Tensor:
    q, d = _q8_0_blocks(x)
    return (q * _fp16(d)).reshape(x.shape)  # ggml stores the block scale as fp16


def _q8_k(x: torch.Tensor) -> torch.Tensor:
    xb = x.reshape(*x.shape[:-1], x.shape[-1] // 256, 256)
    peak = xb.gather(-1, xb.abs().argmax(-1, keepdim=True))  # signed value of largest magnitude
    nz = peak != 0
    iscale = torch.where(nz, _div(-127.0, torch.where(nz, peak, torch.ones_like(peak))), torch.zeros_like(peak))
    q = torch.round(iscale * xb).clamp(max=127)  # nearest_int: half to even
    d = torch.where(nz, _div(1.0, torch.where(nz, iscale, torch.ones_like(iscale))), torch.zeros_like(iscale))
    return (q * d).reshape(x.shape)


def _rounded(x: torch.Tensor, kind: str) -> torch.Tensor:
    with torch.no_grad():
        if kind in ("Q8_0", "Q8_1"):
            return _q8_0(x)
        if kind == "Q8_K":
            return _q8_k(x)
        if kind == "F16":
            return _fp16(x)
        if kind == "BF16":
            return x.to(torch.bfloat16).to(x.dtype)
        raise ValueError(kind)


# The last rounding: attention's q/k/v and the MLP's gate/up read the same input tensor, so each is rounded
# once per kind. Keyed by the tensor itself (held, so its id cannot be reused) and its version counter.
_last_rounding: list = [None]


def quantize_activations(x: torch.Tensor, kind: str | None) -> torch.Tensor:
    """``x`` as ggml feeds it to the dot products for ``kind`` (straight-through gradient)."""
    if kind is None:
        return x
    last = _last_rounding[0]
    if x.is_inference():  # no version counter under torch.inference_mode
        y = _rounded(x, kind)
    elif last is not None and last[0] is x and last[1] == x._version and last[2] == kind:
        y = last[3]
    else:
        y = _rounded(x, kind)
        _last_rounding[0] = (x, x._version, kind, y)
    return x + (y - x).detach() if x.requires_grad else y


def block_mins(weight: torch.Tensor) -> torch.Tensor:
    """[n_out, n_in/32] the ``m`` of each block of a dequantized Q4_1 / Q5_1 weight: ggml's quantizer codes
    each block's minimum as q = 0, so the smallest dequantized value of a block is its m."""
    return weight.reshape(weight.shape[0], -1, 32).amin(-1)


def q8_1_sum_error(x: torch.Tensor) -> torch.Tensor:
    """[..., n/32] per Q8_1 block, ``s - d * sum(q)``: the dot products with Q4_1 / Q5_1 weights add
    ``m * s`` for each block, with ``s = fp16(amax/127 * sum(q))`` rounded apart from the fp16 ``d``."""
    with torch.no_grad():
        q, d = _q8_0_blocks(x)
        sq = q.sum(-1, keepdim=True)
        return (_fp16(d * sq) - _fp16(d) * sq).squeeze(-1)


def ggml_linear(x: torch.Tensor, weight: torch.Tensor, kind: str | None, bias: torch.Tensor | None = None,
                mins: torch.Tensor | None = None) -> torch.Tensor:
    """``x weight^T (+ bias)`` as llama.cpp's CPU backend computes it for a weight whose activations become
    ``kind``; ``mins`` (:func:`block_mins`) for a Q4_1 / Q5_1 weight."""
    y = F.linear(quantize_activations(x, kind), weight, bias)
    if kind == "Q8_1":
        y = y + F.linear(q8_1_sum_error(x), mins)
    return y


class _CPUTypeTraits(ctypes.Structure):  # struct ggml_type_traits_cpu (ggml-cpu.h)
    _fields_ = [("from_float", ctypes.c_void_p), ("vec_dot", ctypes.c_void_p), ("vec_dot_type", ctypes.c_int),
                ("nrows", ctypes.c_int64)]


_FROM_FLOAT = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64)


@functools.lru_cache(maxsize=1)
def _libggml_cpu() -> ctypes.CDLL:
    import llama_cpp  # the CPU backend llama.cpp runs, from llama-cpp-python's lib folder

    libdir = Path(llama_cpp.__file__).parent / "lib"
    lib = ctypes.CDLL(str(sorted(libdir.glob("libggml-cpu.*"))[0]))
    lib.ggml_get_type_traits_cpu.restype = ctypes.POINTER(_CPUTypeTraits)
    lib.ggml_get_type_traits_cpu.argtypes = [ctypes.c_int]
    lib.ggml_cpu_init()
    return lib


def cpu_vec_dot_type(weight_type: str) -> str:
    """The vec_dot_type ggml's CPU backend converts activations to for ``weight_type`` (from its type traits)."""
    from gguf import GGMLQuantizationType as T

    return T(_libggml_cpu().ggml_get_type_traits_cpu(int(T[weight_type])).contents.vec_dot_type).name


def cpu_activations(x: np.ndarray, weight_type: str) -> np.ndarray:
    """``x`` [rows, n] as llama.cpp's CPU backend feeds it to a matmul with a ``weight_type`` weight: converted
    by ggml's own ``from_float`` of the vec_dot_type and read back with ggml's ``to_float`` (the reference
    that :func:`quantize_activations` emulates)."""
    from gguf import GGMLQuantizationType as T

    from converters.ggml_quant import row_size_of, to_float

    x = np.ascontiguousarray(x, dtype=np.float32)
    kind = T[cpu_vec_dot_type(weight_type)]
    if kind == T.F32:
        return x.copy()
    lib = _libggml_cpu()
    from_float = _FROM_FLOAT(lib.ggml_get_type_traits_cpu(int(kind)).contents.from_float)
    rows = x.reshape(-1, x.shape[-1])
    rbytes = row_size_of(int(kind), rows.shape[1])
    out = np.empty(rows.shape[0] * rbytes, dtype=np.uint8)
    for i in range(rows.shape[0]):
        from_float(rows[i].ctypes.data, out.ctypes.data + i * rbytes, rows.shape[1])
    # ggml has no to_float for Q8_1 (fp16 d, fp16 s, 32 int8) or Q8_K (f32 d, 256 int8, 16 int16 sums)
    layout = {T.Q8_1: (np.float16, 4, 32), T.Q8_K: (np.float32, 4, 256)}.get(kind)
    if layout is None:
        return to_float(out, int(kind), rows.shape).reshape(x.shape)
    dtype, off, n = layout
    blocks = out.reshape(rows.size // n, -1)
    d = blocks[:, :np.dtype(dtype).itemsize].copy().view(dtype).astype(np.float32)
    return (d * blocks[:, off:off + n].view(np.int8).astype(np.float32)).reshape(x.shape)


class GGMLGeluTanh(torch.nn.Module):
    """GELU (tanh form) as ggml's CPU backend computes it (``GGML_GELU_FP16``): the input rounded to fp16,
    looked up in a table of fp16 results; 0 below -10, the identity above 10. Gradient of the exact GELU."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        exact = F.gelu(x, approximate="tanh")
        with torch.no_grad():
            table = F.gelu(x.to(torch.float16).to(x.dtype), approximate="tanh").to(torch.float16).to(x.dtype)
            y = torch.where(x <= -10.0, torch.zeros_like(x), torch.where(x >= 10.0, x, table))
        return exact + (y - exact).detach()


class GGMLRMSNorm(torch.nn.Module):
    """RMS norm as ggml's CPU backend computes it: the squares (float) summed in double, their mean rounded to
    float, ``scale = 1.0f / sqrtf(mean + eps)``, then ``x * scale * w``. Torch's float32 mean differs in the
    last bit now and then, which moves the Q8_0 roundings that follow across ties (SmolLM2's first block
    reads normed Q8_0 embeddings, full of exact ties)."""

    def __init__(self, weight: torch.Tensor, eps: float):
        super().__init__()
        self.weight, self.eps = weight, eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.to(torch.float32)
        mean = ((x * x).to(torch.float64).sum(-1, keepdim=True) / x.shape[-1]).to(torch.float32)
        scale = _div(1.0, _sqrt(mean + self.eps))
        return (x * scale * self.weight.to(torch.float32)).to(dtype)


def emulate_ggml_ops(model: torch.nn.Module) -> torch.nn.Module:
    """Swap, in place, the modules whose ggml CPU kernel rounds differently from torch for their ggml emulation:
    tanh GELU (Gemma's MLP) and the ``x * rsqrt(mean(x^2) + eps) * w`` RMS norms (Llama, Qwen, Phi-3; Gemma's
    ``1 + w`` form is left as transformers computes it); returns ``model``."""
    from transformers.activations import GELUTanh

    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, GELUTanh) or (isinstance(child, torch.nn.GELU) and child.approximate == "tanh"):
                setattr(module, name, GGMLGeluTanh())
            elif type(child).__name__.endswith("RMSNorm") and hasattr(child, "variance_epsilon"):
                setattr(module, name, GGMLRMSNorm(child.weight, float(child.variance_epsilon)))
    return model
