"""Quantize with llama.cpp's own ggml (the ``libggml-base`` bundled in llama-cpp-python) via ctypes,
and dequantize those same bytes with ``gguf.quants`` for torch.

The bytes returned by :func:`quantize` are exactly what ``llama-quantize`` writes for the tensor,
and exactly what coalora puts in its GGUF files.
"""
from __future__ import annotations

import ctypes
import functools
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from gguf import quants as gguf_quants

from converters.quant_types import QuantType, get


_PARALLEL_MIN = 1 << 16  # smaller tensors are not worth a thread pool


class GGMLError(RuntimeError):
    pass


@functools.lru_cache(maxsize=1)
def libggml() -> ctypes.CDLL:
    import llama_cpp  # the shared libraries live in llama_cpp/lib

    libdir = Path(llama_cpp.__file__).parent / "lib"
    cands = sorted(libdir.glob("libggml-base.*")) or sorted(libdir.glob("ggml-base.*"))
    if not cands:
        raise GGMLError(f"libggml-base not found in {libdir}")
    lib = ctypes.CDLL(str(cands[0]))
    lib.ggml_quantize_chunk.restype = ctypes.c_size_t
    lib.ggml_quantize_chunk.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                                        ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]
    lib.ggml_row_size.restype = ctypes.c_size_t
    lib.ggml_row_size.argtypes = [ctypes.c_int, ctypes.c_int64]
    lib.ggml_validate_row_data.restype = ctypes.c_bool
    lib.ggml_validate_row_data.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_size_t]
    lib.ggml_quantize_requires_imatrix.restype = ctypes.c_bool
    lib.ggml_quantize_requires_imatrix.argtypes = [ctypes.c_int]
    lib.ggml_quantize_init.restype = None
    lib.ggml_quantize_init.argtypes = [ctypes.c_int]
    return lib


@functools.lru_cache(maxsize=4)
def _pool(n_threads: int) -> ThreadPoolExecutor:
    return ThreadPoolExecutor(max_workers=n_threads, thread_name_prefix="ggml-quantize")


class _TypeTraits(ctypes.Structure):  # struct ggml_type_traits (ggml.h)
    _fields_ = [("type_name", ctypes.c_char_p), ("blck_size", ctypes.c_int64), ("blck_size_interleave", ctypes.c_int64),
                ("type_size", ctypes.c_size_t), ("is_quantized", ctypes.c_bool), ("to_float", ctypes.c_void_p),
                ("from_float_ref", ctypes.c_void_p)]


_TO_FLOAT = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64)


@functools.lru_cache(maxsize=None)
def _to_float(ggml_type: int):
    lib = libggml()
    lib.ggml_get_type_traits.restype = ctypes.POINTER(_TypeTraits)
    lib.ggml_get_type_traits.argtypes = [ctypes.c_int]
    traits = lib.ggml_get_type_traits(ggml_type).contents
    if not traits.to_float:
        raise GGMLError(f"ggml has no dequantization for type {ggml_type}")
    return _TO_FLOAT(traits.to_float)


def _over_rows(n_rows: int, n_per_row: int, threads: int, chunk) -> list:
    """``chunk((r0, r1))`` over the rows split into ``threads`` spans, in parallel for large tensors (ctypes
    releases the GIL); the results in row order."""
    step = max(1, -(-n_rows // max(1, threads)))
    spans = [(r, min(n_rows, r + step)) for r in range(0, n_rows, step)]
    if len(spans) > 1 and n_rows * n_per_row >= _PARALLEL_MIN:
        return list(_pool(len(spans)).map(chunk, spans))
    return [chunk((0, n_rows))] if n_rows else []


def to_float(data: np.ndarray, ggml_type: int, shape: tuple[int, ...], threads: int = 1) -> np.ndarray:
    """float32 values of raw ggml bytes of any ggml type, by ggml's own ``to_float`` (what llama-quantize
    uses to dequantize a quantized source), rows split over ``threads``."""
    raw = np.ascontiguousarray(np.asarray(data).view(np.uint8).reshape(-1))
    n_rows, n_per_row = int(np.prod(shape[:-1])), int(shape[-1])
    rbytes = row_size_of(ggml_type, n_per_row)
    if raw.nbytes != n_rows * rbytes:
        raise GGMLError(f"{raw.nbytes} bytes do not hold {n_rows} rows of {n_per_row} values of type {ggml_type}")
    out = np.empty((n_rows, n_per_row), dtype=np.float32)
    fn = _to_float(int(ggml_type))

    def chunk(rows: tuple[int, int]) -> None:
        r0, r1 = rows
        fn(raw.ctypes.data + r0 * rbytes, out.ctypes.data + r0 * n_per_row * 4, (r1 - r0) * n_per_row)

    _over_rows(n_rows, n_per_row, threads, chunk)
    return out.reshape(shape)


def row_size_of(ggml_type: int, n_per_row: int) -> int:
    return int(libggml().ggml_row_size(int(ggml_type), n_per_row))


def row_size(qtype: str | QuantType, n_per_row: int) -> int:
    """Bytes of one row, as ggml computes it."""
    return row_size_of(int(get(qtype).ggml), n_per_row)


def quantize(weight: np.ndarray, qtype: str | QuantType, imatrix: np.ndarray | None = None,
             threads: int = 1) -> np.ndarray:
    """Quantize a 2-D float32 array (rows x n_per_row) to ``qtype``; returns the raw ggml bytes (uint8).
    ``imatrix``: importance weights of the columns (n_per_row float32, what llama-quantize passes from an
    imatrix file: :meth:`converters.imatrix.Imatrix.weights`), given to ``ggml_quantize_chunk`` as they are.
    ``threads`` > 1 splits the rows into chunks quantized in parallel (ctypes releases the GIL), as
    llama-quantize splits a tensor over its threads: the bytes do not depend on the split."""
    q = get(qtype)
    w = np.ascontiguousarray(weight, dtype=np.float32)
    if w.ndim == 1:
        w = w[None, :]
    w = w.reshape(-1, w.shape[-1])
    n_rows, n_per_row = w.shape
    if not q.fits_row(n_per_row):
        raise GGMLError(f"{q.name} needs rows of a multiple of {q.block_size}, got {n_per_row}")
    if not np.isfinite(w).all():
        raise GGMLError("weights contain NaN or Inf; refusing to quantize them")
    lib = libggml()
    imat_ptr = None
    if imatrix is not None:
        imatrix = np.ascontiguousarray(imatrix, dtype=np.float32)
        if imatrix.shape != (n_per_row,):
            raise GGMLError(f"imatrix must have {n_per_row} entries, got {imatrix.shape}")
        if not np.isfinite(imatrix).all():
            raise GGMLError("importance weights contain NaN or Inf")
        imat_ptr = imatrix.ctypes.data
    elif q.needs_imatrix_entry or lib.ggml_quantize_requires_imatrix(int(q.ggml)):
        raise GGMLError(f"{q.name} needs an importance matrix (make one with `coalora imatrix`, pass it with "
                        f"--imatrix)")
    lib.ggml_quantize_init(int(q.ggml))
    out = np.empty(n_rows * row_size(q, n_per_row), dtype=np.uint8)

    def chunk(rows: tuple[int, int]) -> int:
        r0, r1 = rows
        return lib.ggml_quantize_chunk(int(q.ggml), w.ctypes.data, out.ctypes.data, r0 * n_per_row, r1 - r0,
                                       n_per_row, imat_ptr)

    n = sum(_over_rows(n_rows, n_per_row, threads, chunk))
    if n != out.nbytes:
        raise GGMLError(f"ggml wrote {n} bytes, expected {out.nbytes}")
    if not lib.ggml_validate_row_data(int(q.ggml), out.ctypes.data, out.nbytes):
        raise GGMLError(f"ggml rejected its own {q.name} data")
    return out


def dequantize(data: np.ndarray, qtype: str | QuantType, shape: tuple[int, ...]) -> np.ndarray:
    """Float32 values of ggml bytes ``data`` of type ``qtype``, reshaped to ``shape`` (rows, n_per_row)."""
    q = get(qtype)
    raw = np.asarray(data, dtype=np.uint8).reshape(-1, q.row_bytes(shape[-1]))
    return gguf_quants.dequantize(raw, q.ggml).astype(np.float32, copy=False).reshape(shape)


def roundtrip(weight: np.ndarray, qtype: str | QuantType, imatrix: np.ndarray | None = None,
              threads: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """(ggml bytes, their dequantized float32 values) for ``weight`` in ``qtype`` (with importance weights),
    quantized on ``threads`` threads."""
    data = quantize(weight, qtype, imatrix, threads=threads)
    return data, dequantize(data, qtype, weight.shape)
