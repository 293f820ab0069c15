"""Summarize a GGUF file: tensors, types, sizes and bits per weight (checked by converters.gguf_check, then read
with gguf-py's GGUFReader)."""
from __future__ import annotations

import os
from pathlib import Path

from converters.configuration import pad
from converters.errors import CoaloraError
from converters.gguf_check import open_reader

_FLOAT_TYPES = ("F32", "F64")


def inspect_gguf(path) -> dict:
    """Per-tensor name/type/shape/bytes, a type histogram, quantized bytes and bits per weight,
    the tensor data section size and the file size. Unreadable or truncated files raise CoaloraError."""
    import gguf

    path = Path(path)
    reader = open_reader(path)  # bounds, offsets and sizes checked: truncated or damaged files are refused
    size = os.path.getsize(path)
    try:
        fields = {k: f for k, f in reader.fields.items() if not k.startswith("GGUF.")}
        meta = {}
        for k, f in fields.items():
            if f.types and f.types[0] != gguf.GGUFValueType.ARRAY:
                meta[k] = f.contents()
            else:
                meta[k] = f"[{len(f.data)} items]"
        tensors = []
        for t in reader.tensors:
            tensors.append({"name": t.name, "type": t.tensor_type.name,
                            "shape": [int(s) for s in t.shape], "n_elements": int(t.n_elements),
                            "bytes": int(t.n_bytes), "offset": int(t.data_offset)})
        data_offset = int(reader.data_offset)
    except CoaloraError:
        raise
    except Exception as e:
        msg = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise CoaloraError(f"{path} is not a readable GGUF file: {msg[:200]}") from None
    alignment = int(reader.alignment)
    hist: dict[str, int] = {}
    for t in tensors:
        hist[t["type"]] = hist.get(t["type"], 0) + 1
    weights = [t for t in tensors if len(t["shape"]) >= 2]  # the matrices; norms are 1-D F32
    quantized = [t for t in weights if t["type"] not in _FLOAT_TYPES]
    q_bytes = sum(t["bytes"] for t in quantized)
    q_elems = sum(t["n_elements"] for t in quantized)
    w_bytes = sum(t["bytes"] for t in weights)
    w_elems = sum(t["n_elements"] for t in weights)
    return {
        "path": str(path), "file_bytes": size, "architecture": meta.get("general.architecture"),
        "file_type": meta.get("general.file_type"), "n_tensors": len(tensors), "n_metadata": len(fields),
        "alignment": alignment, "data_offset": data_offset, "tensor_data_bytes": size - data_offset,
        "tensor_bytes": sum(t["bytes"] for t in tensors),
        "tensor_bytes_padded": sum(pad(t["bytes"], alignment) for t in tensors),
        "types": dict(sorted(hist.items())),
        "quantized_bytes": q_bytes, "quantized_weights": q_elems,
        # bits per weight of all weight matrices (F32/F16 ones too; norms excluded), as layout.bits_per_weight
        "bits_per_weight": 8.0 * w_bytes / w_elems if w_elems else 0.0,
        "bits_per_weight_quantized": 8.0 * q_bytes / q_elems if q_elems else None,
        "metadata": {k: v for k, v in meta.items() if not isinstance(v, str) or len(v) < 200},
        "tensors": tensors,
    }
