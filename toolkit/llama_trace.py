"""The operands of llama.cpp's weight matmuls, captured while it runs (the scheduler's eval callback).

``capture_matmuls()`` makes every ``llama_cpp.Llama`` opened inside it report each MUL_MAT whose first
operand is a model weight: the weight's name and type, whether it sits in the CPU_REPACK buffer (its
``extra`` is set), and the F32 input and output rows. Comparing those with torch's emulation checks each
kernel path on its own (tests/test_exactness.py, bench/exactness.py). Asking the scheduler to stop at
every matmul makes evaluation slower; use it for checks only.
"""
from __future__ import annotations

import contextlib
import ctypes
import functools
from dataclasses import dataclass

import numpy as np

GGML_TYPE_F32 = 0
_CALLBACKS: list = []  # llama.cpp keeps calling a context's callback for as long as the context lives


class _Tensor(ctypes.Structure):  # struct ggml_tensor (ggml.h, llama-cpp-python 0.3.36)
    pass


_Tensor._fields_ = [
    ("type", ctypes.c_int), ("buffer", ctypes.c_void_p), ("ne", ctypes.c_int64 * 4), ("nb", ctypes.c_size_t * 4),
    ("op", ctypes.c_int), ("op_params", ctypes.c_int32 * 16), ("flags", ctypes.c_int32),
    ("src", ctypes.POINTER(_Tensor) * 10), ("view_src", ctypes.c_void_p), ("view_offs", ctypes.c_size_t),
    ("data", ctypes.c_void_p), ("name", ctypes.c_char * 64), ("extra", ctypes.c_void_p), ("padding", ctypes.c_char * 8)]


@dataclass
class MatMul:
    weight: str          # GGUF tensor name, e.g. blk.0.attn_q.weight (token_embd.weight for a tied head)
    weight_type: str     # ggml type name
    repacked: bool       # held in the CPU_REPACK buffer (interleaved kernels)
    x: np.ndarray        # [tokens, n_in] the F32 input
    y: np.ndarray        # [tokens, n_out] llama.cpp's result

    @property
    def tokens(self) -> int:
        return self.x.shape[0]


@functools.lru_cache(maxsize=1)
def _mul_mat_op() -> int:
    from converters.ggml_quant import libggml

    lib = libggml()
    lib.ggml_op_name.restype = ctypes.c_char_p
    lib.ggml_op_name.argtypes = [ctypes.c_int]
    return next(op for op in range(128) if lib.ggml_op_name(op) == b"MUL_MAT")


def _rows(t: _Tensor) -> np.ndarray | None:
    """A 2-D contiguous F32 tensor as [ne1, ne0], copied; None otherwise."""
    if t.type != GGML_TYPE_F32 or t.ne[2] != 1 or t.ne[3] != 1 or t.nb[0] != 4 or t.nb[1] != 4 * t.ne[0]:
        return None
    n = t.ne[0] * t.ne[1]
    return np.ctypeslib.as_array(ctypes.cast(t.data, ctypes.POINTER(ctypes.c_float)), shape=(n,)).reshape(
        t.ne[1], t.ne[0]).copy()


@contextlib.contextmanager
def capture_matmuls(repack: bool = True):
    """Yields a list that fills with a :class:`MatMul` per weight matmul of every Llama opened inside;
    ``repack=False`` opens models without the CPU_REPACK buffer (llama.cpp's ``use_extra_bufts``)."""
    import llama_cpp.llama_cpp as lc
    from gguf import GGMLQuantizationType

    records: list[MatMul] = []
    mul_mat = _mul_mat_op()
    active = [True]

    def observe(ptr, ask, _user):
        t = ctypes.cast(ptr, ctypes.POINTER(_Tensor)).contents
        if not active[0] or t.op != mul_mat:
            return not ask  # when asked: not interested; otherwise carry on
        w = t.src[0].contents
        name = w.name.decode()
        if ask:
            return name.endswith(".weight")
        x, y = _rows(t.src[1].contents), _rows(t)
        if x is not None and y is not None:
            records.append(MatMul(name, GGMLQuantizationType(w.type).name, bool(w.extra), x, y))
        return True

    callback = lc.ggml_backend_sched_eval_callback(observe)
    _CALLBACKS.append(callback)
    ctx_defaults, model_defaults = lc.llama_context_default_params, lc.llama_model_default_params

    def ctx_params():
        p = ctx_defaults()
        p.cb_eval, p.cb_eval_user_data = callback, None
        return p

    def model_params():
        p = model_defaults()
        p.use_extra_bufts = repack
        return p

    lc.llama_context_default_params, lc.llama_model_default_params = ctx_params, model_params
    try:
        yield records
    finally:
        active[0] = False
        lc.llama_context_default_params, lc.llama_model_default_params = ctx_defaults, model_defaults
