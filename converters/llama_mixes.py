"""llama.cpp's own file types (llama-quantize's Q4_K_M, Q5_K_M, ...) as per-tensor types of a model.

llama.cpp decides each tensor's type for a file type with its own rules (more bits for attn_v, ffn_down and the
output, its row fallbacks, ...). Rather than re-implement them, ``llama_model_quantize`` runs them itself in a dry
run (``dry_run``: nothing is quantized or written) and its per-tensor log line names the type it chose.
"""
from __future__ import annotations

import ctypes
import os
import re
import threading
from pathlib import Path

from converters.errors import CoaloraError
from converters.quant_types import CATALOGUE, get

# llama-quantize's mixed file types that coalora's catalogue can write (the plain ones are the uniform files)
MIXES = ("Q6_K", "Q5_K_M", "Q5_K_S", "Q4_K_M", "Q4_K_S", "IQ4_XS", "Q3_K_L", "Q3_K_M", "Q3_K_S", "IQ3_M", "IQ3_S",
         "IQ3_XS", "IQ3_XXS", "Q2_K", "Q2_K_S", "IQ2_M", "IQ2_S", "IQ2_XS", "IQ2_XXS", "IQ1_M", "IQ1_S")
# llama-quantize's file types named after one type: the file differs from the uniform one where llama.cpp gives the
# output head (or a tied token embedding) more bits (Q6_K, or Q8_0 on rows that are not a multiple of 256); the
# search weighs them as llama.cpp's files, training does not add them to its set (they are nearly the uniform files)
SINGLE_TYPE_FILES = ("Q8_0", "Q5_1", "Q5_0", "Q4_1", "Q4_0", "IQ4_NL")
NEEDS_IMATRIX = {"IQ3_XXS", "Q2_K_S", "IQ2_M", "IQ2_S", "IQ2_XS", "IQ2_XXS", "IQ1_M", "IQ1_S"}

# "[  12/ 272] blk.0.attn_q.weight - [ 576, 576, 1, 1], type = q4_1, size = 0.18 MiB -> 0.21 MiB (q5_0)";
# without "(type)" the tensor keeps its type
_LINE = re.compile(r"^\[\s*\d+/\s*\d+\]\s+(\S+)\s+- \[[^\]]*\], type =\s*(\S+), size =[^(]*(?:\((\S+)\))?\s*$")
_LOCK = threading.Lock()  # llama.cpp's log callback is process-wide
_SILENT = None


def imatrix_param(imatrix, keep: list):
    """``llama_model_quantize_params.imatrix`` for a :class:`converters.imatrix.Imatrix` (what llama-quantize
    --imatrix passes: each matrix's per-column importance); the arrays it points into are appended to ``keep``,
    which must outlive the call."""
    import llama_cpp
    import numpy as np

    names = imatrix.names()
    data = (llama_cpp.llama_model_imatrix_data * (len(names) + 1))()
    for i, n in enumerate(names):
        v = np.ascontiguousarray(imatrix.weights(n), dtype=np.float32)
        keep.append(v)
        data[i].name, data[i].data, data[i].size = n.encode(), v.ctypes.data_as(ctypes.POINTER(ctypes.c_float)), v.size
    data[len(names)].name = None
    keep.append(data)
    return ctypes.cast(data, ctypes.POINTER(llama_cpp.llama_model_imatrix_data))


_CACHE: dict[tuple, dict[str, str]] = {}  # (file, its mtime, ftype, imatrix values) -> types: emit asks per profile


def mix_types(model_path, ftype: str, imatrix=None) -> dict[str, str]:
    """Tensor name -> quant type name that ``llama_model_quantize`` (file type ``ftype``, e.g. "Q4_K_M"; with the
    importance matrix ``imatrix``, which changes some of its choices) gives every tensor of the GGUF ``model_path``."""
    import llama_cpp

    key = (str(Path(model_path).resolve()), Path(model_path).stat().st_mtime_ns, ftype,
           None if imatrix is None else imatrix.values_sha256())
    if key in _CACHE:
        return dict(_CACHE[key])
    code = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{ftype}", None)
    if code is None:
        raise CoaloraError(f"unknown llama.cpp file type {ftype!r}")
    global _SILENT
    text: list[str] = []
    cb = llama_cpp.llama_log_callback(lambda level, t, user: text.append(t.decode("utf-8", "replace")))
    p = llama_cpp.llama_model_quantize_default_params()
    p.ftype, p.dry_run, p.nthread = code, True, 1
    keep: list = []
    if imatrix is not None:
        p.imatrix = imatrix_param(imatrix, keep)
    with _LOCK:
        llama_cpp.llama_log_set(cb, ctypes.c_void_p(0))
        try:
            rc = llama_cpp.llama_model_quantize(str(Path(model_path)).encode(), os.devnull.encode(),
                                                ctypes.byref(p))
        finally:  # back to silence (coalora never shows llama.cpp's log); llama.cpp keeps the callback's pointer
            _SILENT = _SILENT or llama_cpp.llama_log_callback(lambda level, t, user: None)
            llama_cpp.llama_log_set(_SILENT, ctypes.c_void_p(0))
    types = {}
    for line in "".join(text).splitlines():
        m = _LINE.match(line)
        if m:
            types[m.group(1)] = (m.group(3) or m.group(2)).upper()
    if rc != 0 or not types:
        raise CoaloraError(f"llama.cpp's dry run of {ftype} on {model_path} failed")
    _CACHE[key] = types
    return dict(types)


def mix_configurations(model_path, layout, ftypes=MIXES, imatrix=None) -> dict:
    """``{ftype: Configuration}`` of llama.cpp's file types on ``layout``'s tensors (as llama-quantize makes them
    with ``imatrix``, or without one), for those whose every type is in the catalogue and fits the layout (the
    mixes that need an importance matrix only with one)."""
    from converters.configuration import Configuration

    out = {}
    for f in ftypes:
        if f in NEEDS_IMATRIX and imatrix is None:
            continue
        types = mix_types(model_path, f, imatrix)
        if not all(n in types for n in layout.names()):
            continue
        picked = {n: types[n] for n in layout.names()}
        if all(q in CATALOGUE and get(q).fits_row(layout[n].n_per_row) for n, q in picked.items()):
            out[f] = Configuration(picked)
    return out
