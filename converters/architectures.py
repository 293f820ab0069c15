"""The model architectures coalora takes, one table entry each.

What an architecture computes is llama.cpp's and transformers' business (both implement all of these);
an entry only says what coalora must know to pair the two:
- ``hf_model_types``: the Hugging Face ``model_type`` values llama.cpp's converter turns into this GGUF
  architecture; torch runs the first (what llama.cpp computes: a Mistral is a Llama there);
- ``permuted``: tensor kinds whose rows llama.cpp's converter reorders for its rotary layout (llama's
  Q/K; transformers' GGUF loader undoes it), so LoRA B rows follow the same order;
- ``gguf_config``: GGUF metadata keys (under the architecture's prefix) that transformers' GGUF loader
  does not read, with the Hugging Face config attribute they set. Only used when the source is a GGUF
  file; a model folder brings its own config.json.
"""
from __future__ import annotations

from dataclasses import dataclass

import gguf

from converters.errors import CoaloraError


@dataclass(frozen=True)
class Architecture:
    name: str                                   # GGUF general.architecture
    hf_model_types: tuple[str, ...]
    permuted: tuple[str, ...] = ()
    gguf_config: tuple[tuple[str, str], ...] = ()

    @property
    def gguf_arch(self) -> gguf.MODEL_ARCH:
        return next(a for a, n in gguf.MODEL_ARCH_NAMES.items() if n == self.name)


_GEMMA_CONFIG = (("attention.key_length", "head_dim"), ("attention.key_length", "query_pre_attn_scalar"),
                 ("final_logit_softcapping", "final_logit_softcapping"))

ARCHITECTURES: dict[str, Architecture] = {a.name: a for a in (
    Architecture("llama", ("llama", "mistral"), permuted=("attn_q", "attn_k")),
    Architecture("qwen2", ("qwen2",)),
    Architecture("qwen3", ("qwen3",), gguf_config=(("attention.key_length", "head_dim"),)),
    Architecture("gemma2", ("gemma2",),
                 gguf_config=_GEMMA_CONFIG + (("attn_logit_softcapping", "attn_logit_softcapping"),)),
    Architecture("gemma3", ("gemma3_text",), gguf_config=_GEMMA_CONFIG),
    Architecture("phi3", ("phi3",)),
)}


def supported() -> str:
    return ", ".join(ARCHITECTURES)


def by_gguf_name(name: str) -> Architecture:
    try:
        return ARCHITECTURES[name]
    except KeyError:
        raise CoaloraError(f"unsupported architecture {str(name)[:60]!r}; supported: {supported()}") from None


def by_hf_model_type(model_type: str) -> Architecture:
    for a in ARCHITECTURES.values():
        if model_type in a.hf_model_types:
            return a
    types = ", ".join(t for a in ARCHITECTURES.values() for t in a.hf_model_types)
    raise CoaloraError(f"unsupported architecture {str(model_type)[:60]!r}; supported model types: {types}")
