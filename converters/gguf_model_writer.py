"""Write a ``LoadedModel`` as a llama.cpp GGUF file in a given quantization ``Configuration``.

Quantized bytes come from llama.cpp's own ggml (:func:`converters.ggml_quant.quantize`) or from a
caller's cache, so they are exactly what ``llama-quantize`` would write. Norms stay F32. The file is
written to a temporary path and renamed, so a failure never leaves a partial file.
"""
from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path
from typing import Callable

import gguf
import numpy as np

from converters import ggml_quant
from converters.quant_types import QuantType, get, resolve
from toolkit.configuration import Configuration, pad
from toolkit.errors import CoaloraError
from toolkit.fileio import atomic_path

# Catalogue type -> llama_ftype written as general.file_type (the "_S" member for K-quant families,
# whose default type is the K-quant itself).
_FTYPE = {"F32": 0, "F16": 1, "Q4_0": 2, "Q4_1": 3, "Q8_0": 7, "Q5_0": 8, "Q5_1": 9, "Q2_K": 10,
          "Q3_K": 11, "Q4_K": 14, "Q5_K": 16, "Q6_K": 18, "IQ4_NL": 25, "IQ4_XS": 30, "BF16": 32}
QNT_VERSION = 2  # GGML_QNT_VERSION

Quantized = Callable[[str, QuantType], np.ndarray]


def llama_ftype(qtype: str | QuantType) -> int:
    return _FTYPE[get(qtype).name]


def _plan(loaded, cfg: Configuration | None) -> list[tuple[str, QuantType, tuple[int, ...]]]:
    """(GGUF name, type, logical shape rows x n_per_row) of every tensor, in file order."""
    types = dict(cfg.types) if cfg is not None else {}
    quantizable = set(loaded.quantizable_names(True))
    unknown = [n for n in types if n not in quantizable]
    if unknown:
        raise CoaloraError(f"configuration names unknown tensor {unknown[0]!r}")
    out = []
    for name in loaded.gguf_names():
        shape = tuple(int(s) for s in loaded._state[loaded.hf_name(name)].shape)
        if name not in quantizable:
            out.append((name, get("F32"), shape))
            continue
        q = types.get(name)
        if q is None:
            if cfg is not None and name not in ("token_embd.weight", "output.weight"):
                raise CoaloraError(f"configuration has no type for {name!r}")
            from converters.model_loading import EMBEDDING_DEFAULT_TYPE
            q = resolve(EMBEDDING_DEFAULT_TYPE, shape[-1])[0]
        if not q.fits_row(shape[-1]):
            raise CoaloraError(f"{name}: {q.name} needs rows of a multiple of {q.block_size}, rows have {shape[-1]}")
        out.append((name, q, shape))
    return out


def _rope_theta(config) -> float:
    rp = getattr(config, "rope_parameters", None) or {}
    rtype = rp.get("rope_type", "default") if isinstance(rp, dict) else "default"
    scaling = getattr(config, "rope_scaling", None)
    if isinstance(scaling, dict):
        rtype = scaling.get("rope_type", scaling.get("type", rtype))
    if rtype not in (None, "default"):
        raise CoaloraError(f"rope type {rtype!r} is not supported yet (only default rope)")
    theta = rp.get("rope_theta") if isinstance(rp, dict) else None
    return float(theta if theta is not None else getattr(config, "rope_theta", 10000.0))


def _dominant(plan) -> QuantType:
    weights: dict[str, int] = {}
    for name, q, shape in plan:
        if len(shape) == 2:
            weights[q.name] = weights.get(q.name, 0) + shape[0] * shape[1]
    return get(max(weights, key=weights.get)) if weights else get("F32")


def _new_writer(loaded, path: Path, plan) -> gguf.GGUFWriter:
    c = loaded.config
    w = gguf.GGUFWriter(path, loaded.arch)
    w.add_type("model")
    w.add_name(loaded.source.stem)
    hidden, n_head = int(c.hidden_size), loaded.n_head
    head_dim = int(getattr(c, "head_dim", None) or hidden // n_head)
    w.add_context_length(int(c.max_position_embeddings))
    w.add_embedding_length(hidden)
    w.add_block_count(loaded.n_blocks)
    w.add_feed_forward_length(int(c.intermediate_size))
    w.add_rope_dimension_count(head_dim)
    w.add_head_count(n_head)
    w.add_head_count_kv(loaded.n_head_kv)
    if head_dim != hidden // n_head:
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
    w.add_layer_norm_rms_eps(float(c.rms_norm_eps))
    w.add_rope_freq_base(_rope_theta(c))
    w.add_vocab_size(int(c.vocab_size))
    w.add_file_type(llama_ftype(_dominant(plan)))
    w.add_quantization_version(QNT_VERSION)
    for key, val, vtype, sub in loaded.tokenizer_metadata():
        w.add_key_value(key, val, vtype, sub_type=sub)
    for name, q, shape in plan:
        w.add_tensor_info(name, shape, np.dtype(np.float32), q.tensor_bytes(*_rows_cols(shape)), raw_dtype=q.ggml)
    return w


def _rows_cols(shape) -> tuple[int, int]:
    return (1, shape[0]) if len(shape) == 1 else (shape[0], shape[1])


def fixed_bytes(loaded, include_embeddings: bool = True) -> int:
    """Bytes of a written GGUF outside the quantizable tensors: header, metadata, tensor infos,
    alignment and the F32 norms (and the embeddings when they are not part of the layout).
    Tensor infos and metadata have the same size whatever the types, so F32 serves as reference."""
    plan = _plan(loaded, None)
    quantizable = set(loaded.quantizable_names(include_embeddings))
    fd, tmp = tempfile.mkstemp(suffix=".gguf")
    os.close(fd)
    try:
        w = _new_writer(loaded, Path(tmp), plan)
        w.write_header_to_file(Path(tmp))
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        w.close()
        head = os.path.getsize(tmp)
    finally:
        os.unlink(tmp)
    rest = sum(pad(q.tensor_bytes(*_rows_cols(s))) for n, q, s in plan if n not in quantizable)
    return pad(head) + rest


def write_gguf(loaded, path, cfg: Configuration, quantized: Quantized | None = None, progress: bool = True) -> dict:
    """Write ``loaded`` to ``path`` with every quantizable tensor in its ``cfg`` type; returns a report."""
    t0 = time.perf_counter()
    plan = _plan(loaded, cfg)
    path = Path(path)
    bar = task = None
    if progress:
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
        bar = Progress(TextColumn("writing {task.fields[tensor]}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                       TimeElapsedColumn(), transient=True)
        task = bar.add_task("write", total=len(plan), tensor="")
        bar.start()
    try:
        with atomic_path(path) as tmp:
            w = _new_writer(loaded, tmp, plan)
            try:
                w.write_header_to_file(tmp)
                w.write_kv_data_to_file()
                w.write_ti_data_to_file()
                for name, q, shape in plan:
                    if bar is not None:
                        bar.update(task, tensor=name)
                    w.write_tensor_data(_tensor_bytes(loaded, name, q, shape, quantized))
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


def _tensor_bytes(loaded, name: str, q: QuantType, shape, quantized: Quantized | None) -> np.ndarray:
    expect = q.tensor_bytes(*_rows_cols(shape))
    if len(shape) == 1:
        data = loaded._state[loaded.hf_name(name)].detach().float().numpy().astype(np.float32).view(np.uint8)
    elif quantized is not None:
        data = np.asarray(quantized(name, q), dtype=np.uint8).reshape(-1)
    else:
        try:
            data = ggml_quant.quantize(loaded.gguf_weight(name), q)
        except ggml_quant.GGMLError as e:
            raise CoaloraError(f"{name}: {e}") from None
    if data.nbytes != expect:
        raise CoaloraError(f"{name}: {q.name} data is {data.nbytes} bytes, expected {expect}")
    return np.ascontiguousarray(data)
