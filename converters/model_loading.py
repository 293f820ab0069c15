"""A model as torch trains it: the source GGUF loaded by transformers' GGUF loader, with GGUF naming.

``LoadedModel`` pairs the two worlds: the canonical :class:`GGUFSource` (what llama.cpp runs; a Hugging
Face folder is converted to it first by llama.cpp's own converter) and the float32 transformers model
loaded from that same GGUF. Names follow gguf-py's ``TensorNameMap`` (HF parameter <-> GGUF tensor), row
orders the architecture's permutation (llama's rotary Q/K order). A model folder brings its own
config.json and tokenizer; a GGUF file gets both from transformers' GGUF loader, plus the metadata keys it
does not read (the architecture table's ``gguf_config``) and llama.cpp's rope frequency factors.
"""
from __future__ import annotations

import logging
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import gguf
import numpy as np

from converters.configuration import ModelLayout, TensorSpec
from converters.errors import CoaloraError
from converters.gguf_source import (EMBEDDING_DEFAULT_TYPE, GGUFSource, one_line, open_source,  # noqa: F401
                                    tensor_kind)

__all__ = ["LoadedModel", "load_model", "EMBEDDING_DEFAULT_TYPE"]


def _permute(w: np.ndarray, n_head: int, inverse: bool = False) -> np.ndarray:
    """llama.cpp's rotary row order for Q/K (convert_hf_to_gguf ``permute``) or its inverse."""
    rows = w.shape[0]
    half = rows // n_head // 2
    if inverse:
        return w.reshape(n_head, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)
    return w.reshape(n_head, 2, half, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


@dataclass
class LoadedModel:
    model: object                 # transformers causal LM, float32, eval mode
    tokenizer: object
    gguf: GGUFSource              # the canonical source: what the writer copies and quantizes
    source: Path                  # what the user gave (folder or .gguf)
    config: object                # HF config
    _to_gguf: dict = field(default_factory=dict, repr=False)
    _to_hf: dict = field(default_factory=dict, repr=False)

    @property
    def arch(self) -> str:
        return self.gguf.arch.name

    @property
    def n_blocks(self) -> int:
        return self.gguf.n_blocks

    # ---- names -------------------------------------------------------------------------------
    def gguf_name(self, hf_param_name: str) -> str | None:
        return self._to_gguf.get(hf_param_name)

    def hf_name(self, gguf_name: str) -> str:
        try:
            return self._to_hf[gguf_name]
        except KeyError:
            raise CoaloraError(f"model has no tensor {gguf_name!r}") from None

    # ---- row order ---------------------------------------------------------------------------
    @property
    def n_head(self) -> int:
        return int(self.gguf.hparams()["n_head"])

    @property
    def n_head_kv(self) -> int:
        return int(self.gguf.hparams()["n_head_kv"])

    def _heads_for(self, gguf_name: str) -> int | None:
        k = tensor_kind(gguf_name)
        if k not in self.gguf.arch.permuted:
            return None
        return self.n_head if k == "attn_q" else self.n_head_kv

    def permute_rows(self, gguf_name: str, array_2d: np.ndarray) -> np.ndarray:
        """HF row order -> GGUF row order (identity except for the architecture's permuted kinds)."""
        h = self._heads_for(gguf_name)
        return array_2d if h is None else _permute(array_2d, h)

    def to_hf_order(self, gguf_name: str, array_2d: np.ndarray) -> np.ndarray:
        """GGUF row order -> HF row order (inverse of :meth:`permute_rows`)."""
        h = self._heads_for(gguf_name)
        return array_2d if h is None else _permute(array_2d, h, inverse=True)

    # ---- weights and layout (from the source GGUF) -------------------------------------------
    def gguf_weight(self, gguf_name: str) -> np.ndarray:
        """The float32 weight of ``gguf_name`` in GGUF row order, read from the source GGUF."""
        return self.gguf.weight(gguf_name)

    def quantizable_names(self, include_embeddings: bool = True) -> list[str]:
        return self.gguf.quantizable_names(include_embeddings)

    def tensor_spec(self, gguf_name: str) -> TensorSpec:
        return self.gguf.tensor_spec(gguf_name)

    def layout(self, include_embeddings: bool = True) -> ModelLayout:
        return self.gguf.layout(include_embeddings)


# ---- loading -----------------------------------------------------------------------------------
def load_model(path, log=lambda m: None) -> LoadedModel:
    """Load a Hugging Face folder or a ``.gguf`` file: its GGUF source and the float32 torch model."""
    path = Path(path)
    src = open_source(path, log)
    _quiet()
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers import modeling_gguf_pytorch_utils as gguf_utils

    gpath = src.path
    plain_tqdm = getattr(gguf_utils, "tqdm", None)
    plain_reader = gguf.GGUFReader
    try:
        gguf_utils.tqdm = lambda it, *a, **k: it  # its own tqdm bar ignores transformers' progress setting
        # transformers parses the file again for the config, the weights and the tokenizer: hand it the
        # source's reader (checked, already parsed, read-only) instead
        gguf.GGUFReader = _reader_for(gpath, src.reader, plain_reader)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if path.is_dir():
                config = AutoConfig.from_pretrained(path)
                torch_type = src.arch.hf_model_types[0]
                if config.model_type != torch_type:  # e.g. mistral: llama.cpp runs it as llama
                    config = AutoConfig.for_model(torch_type, **{k: v for k, v in config.to_dict().items()
                                                                 if k != "model_type"})
            else:
                config = AutoConfig.from_pretrained(gpath.parent, gguf_file=gpath.name)
                _config_from_gguf(config, src)
            if hasattr(config, "quantization_config"):
                del config.quantization_config  # weights are dequantized; save_pretrained must not see it
            model = AutoModelForCausalLM.from_pretrained(gpath.parent, gguf_file=gpath.name, config=config,
                                                         dtype=torch.float32)
            if path.is_dir():
                tok = AutoTokenizer.from_pretrained(path)
            else:
                tok = AutoTokenizer.from_pretrained(gpath.parent, gguf_file=gpath.name)
    except CoaloraError:
        raise
    except Exception as e:  # corrupt weights, a tokenizer transformers cannot build, ...
        raise CoaloraError(f"cannot load {path}: {one_line(e)}") from None
    finally:
        gguf.GGUFReader = plain_reader
        if plain_tqdm is not None:
            gguf_utils.tqdm = plain_tqdm
    _forget_gguf_quantizer(model)
    model = model.to(torch.float32).eval()
    if not path.is_dir():
        _apply_rope_factors(model, src)
    to_gguf, to_hf = _name_maps(model, src)
    return LoadedModel(model, tok, src, path, model.config, to_gguf, to_hf)


def _reader_for(path: Path, reader, plain):
    """A stand-in for ``gguf.GGUFReader`` that returns ``reader`` for ``path`` and parses any other file."""
    def open_reader(p, *args, **kwargs):
        same = not args and not kwargs and Path(p).resolve() == path.resolve()
        return reader if same else plain(p, *args, **kwargs)
    return open_reader


def _quiet():
    import transformers
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    logging.getLogger("gguf").setLevel(logging.ERROR)


def _config_from_gguf(config, src: GGUFSource) -> None:
    """Hugging Face config attributes that transformers' GGUF loader leaves at their defaults."""
    for key, attr in src.arch.gguf_config:
        v = src.key(key)
        if v is not None:
            setattr(config, attr, v)


def _apply_rope_factors(model, src: GGUFSource) -> None:
    """llama.cpp divides the rotary frequencies by ``rope_freqs.weight`` (Llama 3 rope scaling, written by
    the converter instead of the config); transformers' GGUF loader does not read it."""
    if "rope_freqs.weight" not in src.tensors:
        return
    import torch
    factors = torch.from_numpy(src.weight("rope_freqs.weight").reshape(-1).copy())
    for m in model.modules():
        inv = getattr(m, "inv_freq", None)
        if isinstance(inv, torch.Tensor) and inv.shape == factors.shape:
            m.inv_freq = inv / factors
            if hasattr(m, "original_inv_freq"):
                m.original_inv_freq = m.inv_freq


def _forget_gguf_quantizer(model) -> None:
    """The weights are plain dequantized float32 now: drop the GGUF "quantizer" so that .float(), .to()
    and save_pretrained behave as for any float model."""
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer = None
    for attr in ("is_quantized", "quantization_method"):
        if attr in vars(model):
            delattr(model, attr)


def _name_maps(model, src: GGUFSource) -> tuple[dict, dict]:
    """HF parameter <-> GGUF tensor for every quantizable tensor of the source, from gguf-py's tensor map."""
    tmap = gguf.get_tensor_name_map(src.arch.gguf_arch, src.n_blocks)
    to_gguf, to_hf = {}, {}
    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    for hf, _ in model.named_parameters():
        if tied and hf == "lm_head.weight":
            continue
        g = tmap.get_name(hf, try_suffixes=(".weight", ".bias"))
        if g is not None and g in src.tensors:
            to_gguf[hf], to_hf[g] = g, hf
    quantizable = set(src.quantizable_names(True))
    missing = [n for n in quantizable if n not in to_hf]
    if missing:
        raise CoaloraError(f"{src.path.name}: tensor {missing[0]!r} has no counterpart in transformers' "
                           f"{src.arch.name} model ({len(missing)} without)")
    for g, hf in to_hf.items():
        shape = tuple(model.get_parameter(hf).shape)
        if g in quantizable and shape != src.shape(g):
            raise CoaloraError(f"{src.path.name}: {g} has shape {src.shape(g)}, transformers expects {shape}")
    return to_gguf, to_hf


os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
