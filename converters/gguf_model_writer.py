"""Write a model GGUF in a quantization ``Configuration``, the way ``llama-quantize`` does.

Every metadata key and every tensor the configuration does not quantize is copied from the source GGUF
unchanged (tokenizer, chat template, rope tables, norms, biases); ``general.file_type`` and
``general.quantization_version`` are set as llama-quantize sets them. Quantized bytes come from llama.cpp's
own ggml (:func:`converters.ggml_quant.quantize`, on all cores) or from a caller's cache, so they are
exactly what llama-quantize writes. The file is written to a temporary path and renamed.
"""
from __future__ import annotations

import os
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable

import gguf
import numpy as np

from converters import ggml_quant
from converters.configuration import EMBEDDING_KINDS, Configuration, pad
from converters.errors import CoaloraError
from converters.fileio import atomic_path
from converters.gguf_source import EMBEDDING_DEFAULT_TYPE, GGUFSource, tensor_kind
from converters.quant_types import QuantType, get, resolve

# Catalogue type -> llama_ftype written as general.file_type (the "_S" member for K-quant families,
# whose default type is the K-quant itself).
_FTYPE = {"F32": 0, "F16": 1, "Q4_0": 2, "Q4_1": 3, "Q8_0": 7, "Q5_0": 8, "Q5_1": 9, "Q2_K": 10,
          "Q3_K": 11, "Q4_K": 14, "Q5_K": 16, "Q6_K": 18, "IQ4_NL": 25, "IQ4_XS": 30, "BF16": 32,
          # i-quants: the llama_ftype whose default type it is (IQ2_S is IQ2_M's; IQ2_S's own is IQ2_XS)
          "IQ2_XXS": 19, "IQ2_XS": 20, "IQ3_XXS": 23, "IQ1_S": 24, "IQ3_S": 26, "IQ2_S": 29, "IQ1_M": 31}
QNT_VERSION = 2  # GGML_QNT_VERSION
# Keys the writer sets itself (the architecture by GGUFWriter, alignment by the layout's padding).
_SET_HERE = ("general.architecture", "general.alignment", "general.file_type", "general.quantization_version")

Quantized = Callable[[str, QuantType], np.ndarray]
# (name, type to quantize to or None to copy the source bytes, logical shape)
Plan = list[tuple[str, "QuantType | None", tuple[int, ...]]]


def llama_ftype(qtype: str | QuantType) -> int:
    return _FTYPE[get(qtype).name]


def _plan(src: GGUFSource, cfg: Configuration | None) -> Plan:
    types = dict(cfg.types) if cfg is not None else {}
    quantizable = set(src.quantizable_names(True))
    unknown = [n for n in types if n not in quantizable]
    if unknown:
        raise CoaloraError(f"configuration names unknown tensor {unknown[0]!r}")
    out = []
    for name in src.names():
        shape = src.shape(name)
        if name not in quantizable:
            out.append((name, None, shape))
            continue
        q = types.get(name)
        if q is None:
            if cfg is not None and tensor_kind(name) not in EMBEDDING_KINDS:
                raise CoaloraError(f"configuration has no type for {name!r}")
            q = resolve(EMBEDDING_DEFAULT_TYPE, shape[-1])[0]
        if not q.fits_row(shape[-1]):
            raise CoaloraError(f"{name}: {q.name} needs rows of a multiple of {q.block_size}, rows have {shape[-1]}")
        out.append((name, q, shape))
    return out


def _dominant(plan: Plan) -> QuantType:
    weights: dict[str, int] = {}
    for _, q, shape in plan:
        if q is not None:
            weights[q.name] = weights.get(q.name, 0) + int(np.prod(shape))
    return get(max(weights, key=weights.get)) if weights else get("F32")


def _nbytes(src: GGUFSource, name: str, q: QuantType | None, shape) -> int:
    if q is None:
        return int(src.tensors[name].n_bytes)
    return q.tensor_bytes(int(np.prod(shape[:-1])), shape[-1])


def _new_writer(src: GGUFSource, path: Path, plan: Plan) -> gguf.GGUFWriter:
    w = gguf.GGUFWriter(path, src.arch.name)
    wrote_ftype = False
    for key, f in src.reader.fields.items():
        if key.startswith("GGUF."):
            continue
        if key in _SET_HERE:
            if key == "general.file_type":  # in its place, as llama-quantize overwrites it
                w.add_file_type(llama_ftype(_dominant(plan)))
                w.add_quantization_version(QNT_VERSION)
                wrote_ftype = True
            continue
        vtype = f.types[0]
        sub = f.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        w.add_key_value(key, f.contents(), vtype, sub_type=sub)
    if not wrote_ftype:
        w.add_file_type(llama_ftype(_dominant(plan)))
        w.add_quantization_version(QNT_VERSION)
    for name, q, shape in plan:
        raw = src.ggml_type(name) if q is None else q.ggml
        w.add_tensor_info(name, shape, np.dtype(np.float32), _nbytes(src, name, q, shape), raw_dtype=raw)
    return w


def fixed_bytes(src: GGUFSource, include_embeddings: bool = True) -> int:
    """Bytes of a written GGUF outside the layout's tensors: header, metadata, tensor infos, alignment, the
    copied tensors (and the embeddings in their default type when they are not part of the layout).
    Tensor infos and metadata have the same size whatever the types."""
    plan = _plan(src, None)
    in_layout = set(src.quantizable_names(include_embeddings))
    fd, tmp = tempfile.mkstemp(suffix=".gguf")
    os.close(fd)
    try:
        w = _new_writer(src, Path(tmp), plan)
        w.write_header_to_file(Path(tmp))
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        w.close()
        head = os.path.getsize(tmp)
    finally:
        os.unlink(tmp)
    return pad(head) + sum(pad(_nbytes(src, n, q, s)) for n, q, s in plan if n not in in_layout)


def write_gguf(src: GGUFSource, path, cfg: Configuration, quantized: Quantized | None = None,
               progress: bool = True, threads: int | None = None, imatrix=None) -> dict:
    """Write ``src`` to ``path`` with every layout tensor in its ``cfg`` type; returns a report.
    ``imatrix`` (a :class:`converters.imatrix.Imatrix`) gives ggml the importance weights of the tensors
    it has entries for, as llama-quantize --imatrix does."""
    t0 = time.perf_counter()
    plan = _plan(src, cfg)
    path = Path(path)
    threads = threads or os.cpu_count() or 1
    bar = task = None
    if progress:
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
        bar = Progress(TextColumn("writing {task.fields[tensor]}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                       TimeElapsedColumn(), transient=True)
        task = bar.add_task("write", total=len(plan), tensor="")
        bar.start()
    try:
        with atomic_path(path) as tmp, ThreadPoolExecutor(max_workers=2) as pool:
            w = _new_writer(src, tmp, plan)
            try:
                w.write_header_to_file(tmp)
                w.write_kv_data_to_file()
                w.write_ti_data_to_file()
                # the next tensor is prepared while this one is written
                job = lambda item: _tensor_bytes(src, *item, quantized, threads, imatrix)  # noqa: E731
                pending = pool.submit(job, plan[0]) if plan else None
                for i, (name, _, _) in enumerate(plan):
                    data = pending.result()
                    pending = pool.submit(job, plan[i + 1]) if i + 1 < len(plan) else None
                    if bar is not None:
                        bar.update(task, tensor=name)
                    w.write_tensor_data(data)
                    if bar is not None:
                        bar.advance(task)
            finally:
                w.close()
    finally:
        if bar is not None:
            bar.stop()
    quant = [(q, shape) for n, q, shape in plan if n in cfg.types]
    n_weights = sum(s[0] * s[1] for _, s in quant)
    q_bytes = sum(q.tensor_bytes(*s) for q, s in quant)
    return {"path": str(path), "bytes": os.path.getsize(path), "n_tensors": len(plan),
            "types": cfg.histogram(), "file_type": llama_ftype(_dominant(plan)),
            "quantized_bytes": q_bytes, "bits_per_weight": 8.0 * q_bytes / n_weights if n_weights else 0.0,
            "seconds": time.perf_counter() - t0}


def _tensor_bytes(src: GGUFSource, name: str, q: QuantType | None, shape, quantized: Quantized | None,
                  threads: int, imatrix=None) -> np.ndarray:
    expect = _nbytes(src, name, q, shape)
    if q is None:
        data = src.raw(name)
    elif quantized is not None:
        data = np.asarray(quantized(name, q), dtype=np.uint8).reshape(-1)
    else:
        try:
            weights = imatrix.weights(name) if imatrix is not None and q.takes_imatrix else None
            data = ggml_quant.quantize(src.weight(name), q, weights, threads=threads)
        except ggml_quant.GGMLError as e:
            raise CoaloraError(f"{name}: {e}") from None
    if data.nbytes != expect:
        raise CoaloraError(f"{name}: {q.name if q else 'source'} data is {data.nbytes} bytes, expected {expect}")
    return np.ascontiguousarray(data)
