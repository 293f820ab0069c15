"""Quantization-exact weights for torch: ggml bytes per (tensor, type) and their dequantization.

The bytes come from llama.cpp's ggml quantizer and are the very bytes the GGUF writer stores;
torch trains against their dequantization. Bytes are cached on disk (``cache_dir``), dequantized
float32 tensors in memory (RAM, or the GPU after ``to()``) under a byte limit (least recently used first out).
Full-precision originals are read from the memory-mapped source GGUF when needed, one tensor kept at a time,
so no whole float32 copy of the model is held besides torch's own. With an importance matrix, ggml gets its
weights for every type that takes them (as llama-quantize --imatrix), and those bytes are cached apart, under
the imatrix file's hash.
"""
from __future__ import annotations

import hashlib
import re
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch

from converters import ggml_quant
from converters.quant_types import QuantType, get
from converters.errors import CoaloraError
from converters.fileio import atomic_path

UNQUANTIZED = ("F32",)
SAFE_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,150}")


class WeightBank:
    def __init__(self, loaded, cache_dir: Path | None = None, ram_limit_bytes: int = 4 << 30, imatrix=None,
                 threads: int = 1):
        self.loaded = loaded
        self.threads = threads  # ggml quantizes a tensor on this many threads (the bytes do not depend on it)
        self.imatrix = imatrix  # converters.imatrix.Imatrix or None
        self._imatrix_key = imatrix.values_sha256()[:16] if imatrix is not None else None
        self.device = torch.device("cpu")  # where the dequantized weights are kept; see to()
        self.dtype = torch.float32  # what they are kept in (training may choose a 16-bit type for large models)
        self.cache_dir = Path(cache_dir) if cache_dir else None
        self.ram_limit = ram_limit_bytes
        self._last: tuple[str, np.ndarray] | None = None
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
        if self._last is None or self._last[0] != name:
            self._last = (name, self.loaded.gguf_weight(name))
        return self._last[1]

    def importance(self, name: str, qtype: str | QuantType) -> np.ndarray | None:
        """The importance weights ggml gets for ``name`` in ``qtype`` (None: quantized without)."""
        q = get(qtype)
        if self.imatrix is None or not q.takes_imatrix:
            return None
        return self.imatrix.weights(name)

    def quantized_bytes(self, name: str, qtype: str | QuantType) -> np.ndarray:
        q = get(qtype)
        imp = self.importance(name, q)
        path = self._cache_file(name, q, imp is not None)
        if path is not None and path.is_file():
            data = np.fromfile(path, dtype=np.uint8)
            shape = self.loaded.gguf.shape(name)
            if data.size == q.tensor_bytes(int(np.prod(shape[:-1])), shape[-1]):
                return data  # else a damaged cache file: quantized again below
        try:
            data = ggml_quant.quantize(self.original(name), q, imp, threads=self.threads)
        except ggml_quant.GGMLError as e:
            raise CoaloraError(f"{name}: {e}") from None
        if path is not None:
            with atomic_path(path) as tmp:
                data.tofile(tmp)
        return data

    def _cache_file(self, name: str, q: QuantType, with_imatrix: bool = False) -> Path | None:
        """The cache file of a tensor in a type (in a folder named by the imatrix's values when quantized with one); a
        name that is not a plain file name (``/``, ``..``, a leading dot, control characters) is hashed, so
        nothing is written outside the cache folder."""
        if self.cache_dir is None:
            return None
        if not SAFE_NAME.fullmatch(name):
            name = "sha256-" + hashlib.sha256(name.encode("utf-8", "surrogatepass")).hexdigest()
        folder = self.cache_dir / f"imatrix-{self._imatrix_key}" if with_imatrix else self.cache_dir
        return folder / f"{name}.{q.name}.bin"

    def weight(self, name: str, qtype: str | QuantType) -> torch.Tensor:
        """Float32 torch weight (HF row order, on the bank's device) that the GGUF tensor of this type
        dequantizes to."""
        q = get(qtype)
        key = (name, q.name)
        if key in self._deq:
            self._deq.move_to_end(key)
            return self._deq[key]
        if q.name in UNQUANTIZED:
            w = self.original(name)
        else:
            w = ggml_quant.dequantize(self.quantized_bytes(name, q), q, self.loaded.gguf.shape(name))
        t = torch.from_numpy(np.array(self.loaded.to_hf_order(name, w), dtype=np.float32)).to(self.device, self.dtype)  # a copy: the source is a read-only map
        self._deq[key] = t
        self._ram += t.numel() * t.element_size()
        while self._ram > self.ram_limit and len(self._deq) > 1:
            _, old = self._deq.popitem(last=False)
            self._ram -= old.numel() * old.element_size()
        return t
