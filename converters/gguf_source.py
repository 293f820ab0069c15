"""The canonical source of every model: a GGUF file, read with gguf-py's reader (memory-mapped).

A Hugging Face folder becomes one first (:func:`converters.hf_to_gguf.convert_folder`, llama.cpp's own
converter). Which tensors are quantizable follows ``llama-quantize`` (``src/llama-quant.cpp``): 2-D
tensors whose name ends in ``weight``, except norms and a few kinds llama.cpp always keeps as they are.
Everything else, metadata included, the GGUF writer copies from here unchanged.
"""
from __future__ import annotations

import os
from pathlib import Path

import gguf
import numpy as np

from converters.architectures import Architecture, by_gguf_name
from converters.configuration import EMBEDDING_KINDS, ModelLayout, TensorSpec
from converters.errors import CoaloraError
from converters.gguf_check import open_reader
from converters.gguf_model_check import MAX_BLOCKS, check_hparams, check_names, check_vocabulary, typed_value

# Substrings of tensor names llama-quantize never quantizes (besides 1-D tensors and names not ending in weight).
_KEPT = ("_norm.weight", "ffn_gate_inp.weight", "altup", "laurel", "per_layer_model_proj", "position_embd",
         "token_types", "ssm_conv1d", "shortconv.conv.weight", "time_mix_", "rope_freqs", "rope_factors")
# Type the embeddings / head get when a layout leaves them out of the search.
EMBEDDING_DEFAULT_TYPE = "Q8_0"


def tensor_kind(name: str) -> str:
    parts = name.split(".")
    return parts[2] if parts[0] == "blk" and len(parts) > 2 else parts[0]


def tensor_block(name: str) -> int:
    parts = name.split(".")
    return int(parts[1]) if parts[0] == "blk" and len(parts) > 1 and parts[1].isdigit() else -1


def is_quantizable(name: str, n_dims: int) -> bool:
    return n_dims >= 2 and name.endswith("weight") and not any(k in name for k in _KEPT)


def one_line(e: Exception) -> str:
    """The first line of an exception message, bounded (for one-line errors)."""
    s = str(e).strip().splitlines()
    return (s[0] if s else type(e).__name__)[:300]


class GGUFSource:
    """A model GGUF: its metadata, its tensors (raw bytes, float32 values) and its quantization layout."""

    def __init__(self, path):
        self.path = Path(path)
        self.reader = open_reader(self.path, "model file")
        arch = self._typed("general.architecture", str)
        if arch is None:
            raise CoaloraError(f"{self.path.name}: GGUF has no general.architecture")
        self.arch: Architecture = by_gguf_name(arch)
        self.tensors = {t.name: t for t in self.reader.tensors}
        if "token_embd.weight" not in self.tensors:
            raise CoaloraError(f"{self.path.name}: no token_embd.weight tensor (not a {self.arch.name} model)")
        self.n_blocks = self.int_key("block_count")
        if not 1 <= self.n_blocks <= MAX_BLOCKS:
            raise CoaloraError(f"{self.path.name}: {self.arch.name}.block_count is {self.n_blocks} "
                               f"(1 to {MAX_BLOCKS})")
        self._hparams: dict | None = None
        check_names(self)
        check_hparams(self)
        self._check_shapes()
        check_vocabulary(self)

    # ---- metadata -----------------------------------------------------------------------------
    def _typed(self, key: str, kind: type, default=None):
        """Value of metadata ``key`` if it is of ``kind`` (int: integer types; float: also integers; per-layer
        arrays of those allowed for numbers); CoaloraError for any other type."""
        f = self.reader.get_field(key)
        if f is None:
            return default
        return typed_value(f, kind, f"{self.path.name}: {key}")

    def key(self, suffix: str, default=None):
        """Value of the metadata key ``{arch}.{suffix}``."""
        f = self.reader.get_field(f"{self.arch.name}.{suffix}")
        return default if f is None else f.contents()

    def int_key(self, suffix: str, default: int | None = None) -> int:
        v = self._typed(f"{self.arch.name}.{suffix}", int, default)
        if v is None:
            raise CoaloraError(f"{self.path.name}: no {self.arch.name}.{suffix}")
        if isinstance(v, list):  # per-layer arrays (some archs): one value per block; the largest
            if suffix == "block_count" or len(v) != self.n_blocks:
                raise CoaloraError(f"{self.path.name}: {self.arch.name}.{suffix} has {len(v)} values for "
                                   f"{self.n_blocks} blocks")
            v = max(v)
        return int(v)

    def float_key(self, suffix: str, default: float | None = None) -> float | None:
        v = self._typed(f"{self.arch.name}.{suffix}", float, default)
        if isinstance(v, list):
            raise CoaloraError(f"{self.path.name}: {self.arch.name}.{suffix} is an array, not a number")
        return v

    def chat_template(self) -> str | None:
        """``tokenizer.chat_template``: what llama-server applies to a conversation."""
        return self._typed("tokenizer.chat_template", str)

    def special_tokens(self) -> dict:
        """``bos_token`` / ``eos_token`` texts, as chat templates refer to them."""
        tokens = self.reader.get_field("tokenizer.ggml.tokens")
        out = {}
        for name in ("bos", "eos"):
            i = self._typed(f"tokenizer.ggml.{name}_token_id", int)
            if isinstance(i, int) and 0 <= i < len(tokens.data):
                out[f"{name}_token"] = str(tokens.contents(i))
        return out

    def hparams(self) -> dict:
        """The shape numbers the memory model and the adapter need."""
        if self._hparams is None:
            self._hparams = self._read_hparams()
        return dict(self._hparams)

    def _read_hparams(self) -> dict:
        n_head = self.int_key("attention.head_count")
        n_embd = self.int_key("embedding_length")
        if n_head <= 0 or n_embd <= 0:
            raise CoaloraError(f"{self.path.name}: head count {n_head}, embedding length {n_embd}")
        n_kv = self.int_key("attention.head_count_kv", n_head)
        k_len = self.int_key("attention.key_length", n_embd // n_head)
        v_len = self.int_key("attention.value_length", k_len)
        h = {"n_embd": n_embd, "n_head": n_head, "n_head_kv": n_kv, "n_embd_k": n_kv * k_len,
             "n_embd_v": n_kv * v_len, "n_ff": self.int_key("feed_forward_length"),
             "n_vocab": int(self.shape("token_embd.weight")[0])}
        bad = [k for k, v in h.items() if not 0 < v < 1 << 24]
        if bad:
            raise CoaloraError(f"{self.path.name}: {bad[0]} {h[bad[0]]} is out of range")
        return h

    # ---- tensors ------------------------------------------------------------------------------
    def names(self) -> list[str]:
        return list(self.tensors)

    def shape(self, name: str) -> tuple[int, ...]:
        """Logical (numpy) shape: rows first, i.e. ne reversed."""
        return tuple(int(s) for s in reversed(self._tensor(name).shape))

    def ggml_type(self, name: str) -> gguf.GGMLQuantizationType:
        return self._tensor(name).tensor_type

    def raw(self, name: str) -> np.ndarray:
        """The tensor's bytes as stored."""
        return np.asarray(self._tensor(name).data).view(np.uint8).reshape(-1)

    def weight(self, name: str) -> np.ndarray:
        """float32 values in GGUF row order (a quantized or 16-bit source dequantized by ggml's own
        ``to_float``, as llama-quantize dequantizes it before re-quantizing)."""
        t = self._tensor(name)
        shape = self.shape(name)
        if t.tensor_type == gguf.GGMLQuantizationType.F32:
            return np.asarray(t.data, dtype=np.float32).reshape(shape)
        from converters.ggml_quant import GGMLError, to_float
        try:
            return to_float(t.data, int(t.tensor_type), shape, threads=os.cpu_count() or 1)
        except GGMLError as e:
            raise CoaloraError(f"{self.path.name}: {name}: {e}") from None

    def _tensor(self, name: str):
        try:
            return self.tensors[name]
        except KeyError:
            raise CoaloraError(f"model has no tensor {name!r}") from None

    def quantizable_names(self, include_embeddings: bool = True) -> list[str]:
        out = []
        for n, t in self.tensors.items():
            if not is_quantizable(n, len(t.shape)):
                continue
            if tensor_block(n) >= 0 or (include_embeddings and tensor_kind(n) in EMBEDDING_KINDS):
                out.append(n)
        return out

    def tensor_spec(self, name: str) -> TensorSpec:
        rows, cols = self.shape(name)[-2:]
        return TensorSpec(name, int(rows), int(cols), tensor_kind(name), tensor_block(name))

    def expected_shape(self, name: str) -> tuple[int, int] | None:
        """(rows, n_per_row) the hyperparameters imply for the standard kinds (fused attn_qkv = Q, K, V rows;
        a fused ffn_up without ffn_gate = gate and up rows); None for kinds without a rule."""
        h = self.hparams()
        e, ff, nh, nkv = h["n_embd"], h["n_ff"], h["n_head"], h["n_head_kv"]
        k, v = h["n_embd_k"] // max(nkv, 1), h["n_embd_v"] // max(nkv, 1)
        fused_up = 2 * ff if f"blk.{tensor_block(name)}.ffn_gate.weight" not in self.tensors else ff
        rule = {"token_embd": (h["n_vocab"], e), "output": (h["n_vocab"], e), "attn_q": (nh * k, e),
                "attn_k": (nkv * k, e), "attn_v": (nkv * v, e), "attn_qkv": (nh * k + nkv * (k + v), e),
                "attn_output": (e, nh * v), "ffn_gate": (ff, e), "ffn_up": (fused_up, e), "ffn_down": (e, ff)}
        return rule.get(tensor_kind(name))

    def _check_shapes(self) -> None:
        for n in self.quantizable_names(True):
            want, got = self.expected_shape(n), self.shape(n)
            if want is not None and got != want:
                raise CoaloraError(f"{self.path.name}: {n} is {got[0]} x {got[1]}, but {self.arch.name} with this "
                                   f"file's hyperparameters needs {want[0]} x {want[1]}")

    # ---- layout -------------------------------------------------------------------------------
    def layout(self, include_embeddings: bool = True) -> ModelLayout:
        from converters.gguf_model_writer import fixed_bytes

        specs = [self.tensor_spec(n) for n in self.quantizable_names(include_embeddings)]
        return ModelLayout(specs, fixed_bytes(self, include_embeddings), self.n_blocks, hparams=self.hparams())


def open_source(path, log=lambda m: None) -> GGUFSource:
    """The GGUF source of a model argument: a ``.gguf`` file, or a Hugging Face folder (converted once)."""
    path = Path(path)
    if not path.exists():
        raise CoaloraError(f"model not found: {path}")
    if path.is_dir():
        from converters.hf_to_gguf import convert_folder
        return GGUFSource(convert_folder(path, log))
    if path.suffix != ".gguf":
        raise CoaloraError(f"{path}: expected a Hugging Face model folder or a .gguf file")
    return GGUFSource(path)
