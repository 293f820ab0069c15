"""Write LoRA adapters in llama.cpp's GGUF adapter format (what ``convert_lora_to_gguf.py`` produces).

For a base tensor ``blk.N.attn_q.weight`` of shape (n_out, n_in) the adapter holds
``blk.N.attn_q.weight.lora_a`` (r x n_in) and ``...lora_b`` (n_out x r); llama.cpp adds
``alpha / r * B @ A`` to the base weight's output. Rows of B for attn_q / attn_k must already be in
GGUF row order (the same permutation the base weight got).
"""
from __future__ import annotations

import numpy as np
import gguf

from converters.errors import CoaloraError
from converters.fileio import atomic_path

ADAPTER_TYPES = {"F32": gguf.GGMLQuantizationType.F32, "F16": gguf.GGMLQuantizationType.F16}


def write_lora_gguf(path, arch: str, alpha: float, tensors: dict[str, tuple[np.ndarray, np.ndarray]],
                    dtype: str = "F32", name: str = "coalora adapter", extra: dict[str, str] | None = None) -> int:
    """Write ``tensors`` (base name -> (A [r, n_in], B [n_out, r])) as a GGUF LoRA adapter; returns its size."""
    if not tensors:
        raise CoaloraError("an adapter needs at least one LoRA tensor pair")
    ranks = {a.shape[0] for a, _ in tensors.values()}
    if len(ranks) != 1:
        raise CoaloraError(f"all LoRA pairs must share one rank, got {sorted(ranks)}")
    np_dtype = np.float32 if dtype == "F32" else np.float16
    with atomic_path(path) as tmp:
        w = gguf.GGUFWriter(str(tmp), arch)
        w.add_type(gguf.GGUFType.ADAPTER)
        w.add_string(gguf.Keys.Adapter.TYPE, "lora")
        w.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(alpha))
        w.add_name(name)
        for k, v in (extra or {}).items():
            w.add_string(k, str(v))
        for base, (a, b) in tensors.items():
            if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[1]:
                raise CoaloraError(f"{base}: LoRA shapes {a.shape} and {b.shape} do not pair")
            w.add_tensor(f"{base}.lora_a", np.ascontiguousarray(a, dtype=np_dtype))
            w.add_tensor(f"{base}.lora_b", np.ascontiguousarray(b, dtype=np_dtype))
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        size = tmp.stat().st_size
    return size
