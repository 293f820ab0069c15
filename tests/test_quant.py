"""The ggml binding: llama.cpp's quantizer bytes, and gguf-py's dequantization of them equals ggml's own."""
from __future__ import annotations

import ctypes

import numpy as np
import pytest

from converters import ggml_quant
from converters.quant_types import CATALOGUE, get, menu, resolve


class _Traits(ctypes.Structure):  # the leading fields of ggml's struct ggml_type_traits
    _fields_ = [("type_name", ctypes.c_char_p), ("blck_size", ctypes.c_int64),
                ("blck_size_interleave", ctypes.c_int64), ("type_size", ctypes.c_size_t),
                ("is_quantized", ctypes.c_bool), ("to_float", ctypes.c_void_p)]


@pytest.mark.parametrize("name", [n for n in CATALOGUE if n != "F32"])
def test_dequantization_equals_ggml_to_float(name):
    lib = ggml_quant.libggml()
    lib.ggml_get_type_traits.restype = ctypes.POINTER(_Traits)
    lib.ggml_get_type_traits.argtypes = [ctypes.c_int]
    q = get(name)
    traits = lib.ggml_get_type_traits(int(q.ggml)).contents
    assert traits.blck_size == q.block_size and traits.type_size == q.type_size
    w = (np.random.default_rng(1).standard_normal((8, 512)) * 0.05).astype(np.float32)
    data = ggml_quant.quantize(w, q, np.ones(512, np.float32) if q.needs_imatrix else None)
    assert data.nbytes == q.tensor_bytes(*w.shape) == 8 * ggml_quant.row_size(q, 512)
    theirs = np.empty(w.size, dtype=np.float32)
    ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64)(traits.to_float)(
        data.ctypes.data, theirs.ctypes.data, w.size)
    assert np.array_equal(ggml_quant.dequantize(data, q, w.shape).ravel(), theirs)


def test_row_rule_and_fallbacks():
    assert [q.name for q in menu(576) if q.block_size == 256] == []
    assert resolve("Q4_K", 576)[0].name == "Q5_0" and resolve("Q6_K", 576)[0].name == "Q8_0"
    assert resolve("Q2_K", 576)[0].name == "Q4_0" and resolve("Q4_0", 100)[0].name == "F16"  # as llama-quant.cpp
    assert resolve("Q4_K", 1536) == (get("Q4_K"), None)


def test_bad_rows_and_nan_are_refused():
    with pytest.raises(ggml_quant.GGMLError):
        ggml_quant.quantize(np.zeros((2, 100), np.float32), "Q4_0")
    bad = np.zeros((2, 64), np.float32)
    bad[0, 3] = np.nan
    with pytest.raises(ggml_quant.GGMLError):
        ggml_quant.quantize(bad, "Q8_0")
