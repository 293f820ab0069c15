"""Quantization-exact weights for torch: ggml bytes per (tensor, type) and their dequantization.

The bytes come from llama.cpp's ggml quantizer and are the very bytes the GGUF writer stores;
torch trains against their dequantization. Bytes are cached on disk (``cache_dir``), dequantized
float32 tensors in memory (RAM, or the GPU after ``to()``) under a byte limit (least recently used first out).
"""
from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch

from converters import ggml_quant
from converters.quant_types import QuantType, get
from toolkit.fileio import atomic_path

UNQUANTIZED = ("F32",)


class WeightBank:
    def __init__(self, loaded, cache_dir: Path | None = None, ram_limit_bytes: int = 4 << 30):
        self.loaded = loaded
        self.device = torch.device("cpu")  # where the dequantized weights are kept; see to()
        self.cache_dir = Path(cache_dir) if cache_dir else None
        self.ram_limit = ram_limit_bytes
        self._fp32: dict[str, np.ndarray] = {}
        self._deq: OrderedDict[tuple[str, str], torch.Tensor] = OrderedDict()
        self._ram = 0

    def to(self, device) -> None:
        """Serve (and keep) the dequantized weights on ``device`` from now on."""
        device = torch.device(device)
        if device != self.device:
            self.device = device
            for k in self._deq:
                self._deq[k] = self._deq[k].to(device)

    def original(self, name: str) -> np.ndarray:
        """Full-precision weight in GGUF row order."""
        if name not in self._fp32:
            self._fp32[name] = self.loaded.gguf_weight(name)
        return self._fp32[name]

    def quantized_bytes(self, name: str, qtype: str | QuantType) -> np.ndarray:
        q = get(qtype)
        path = self.cache_dir / f"{name}.{q.name}.bin" if self.cache_dir else None
        if path is not None and path.exists():
            return np.fromfile(path, dtype=np.uint8)
        data = ggml_quant.quantize(self.original(name), q)
        if path is not None:
            with atomic_path(path) as tmp:
                data.tofile(tmp)
        return data

    def weight(self, name: str, qtype: str | QuantType) -> torch.Tensor:
        """Float32 torch weight (HF row order, on the bank's device) that the GGUF tensor of this type
        dequantizes to."""
        q = get(qtype)
        key = (name, q.name)
        if key in self._deq:
            self._deq.move_to_end(key)
            return self._deq[key]
        w = self.original(name)
        if q.name not in UNQUANTIZED:
            w = ggml_quant.dequantize(self.quantized_bytes(name, q), q, w.shape)
        t = torch.from_numpy(np.ascontiguousarray(self.loaded.to_hf_order(name, w), dtype=np.float32)).to(self.device)
        self._deq[key] = t
        self._ram += t.numel() * 4
        while self._ram > self.ram_limit and len(self._deq) > 1:
            _, old = self._deq.popitem(last=False)
            self._ram -= old.numel() * 4
        return t
