"""A model GGUF's content checked against its architecture: what llama.cpp would otherwise abort on, or what
a loader would silently fill in.

- tensor names: every tensor is one the architecture defines (gguf-py's ``MODEL_TENSORS``), every block
  holds the same tensors, the required ones are there, block numbers match ``block_count``; a missing
  tensor is an error, never initialised (a flipped bit in a name is an unknown name);
- hyperparameters: typed (integers are integers), finite, in range (``block_count`` up to llama.cpp's
  ``LLAMA_MAX_LAYERS``, a positive RMS epsilon below 1, head counts that divide, per-layer arrays with one
  value per block);
- vocabulary: token strings unique (llama.cpp asserts it), scores and token types one per token, as many
  tokens as the embedding has rows.

Structure (bounds, offsets, nesting) is :mod:`converters.gguf_check`'s job and has run before any of this.
"""
from __future__ import annotations

import math

import gguf

from converters.errors import CoaloraError

MAX_BLOCKS = 512               # LLAMA_MAX_LAYERS
MAX_CONTEXT = 1 << 24
_INT_TYPES = {gguf.GGUFValueType.UINT8, gguf.GGUFValueType.INT8, gguf.GGUFValueType.UINT16,
              gguf.GGUFValueType.INT16, gguf.GGUFValueType.UINT32, gguf.GGUFValueType.INT32,
              gguf.GGUFValueType.UINT64, gguf.GGUFValueType.INT64}
_FLOAT_TYPES = {gguf.GGUFValueType.FLOAT32, gguf.GGUFValueType.FLOAT64}
_BIASED = ("attn_q", "attn_k", "attn_v", "attn_qkv", "attn_output", "ffn_up", "ffn_gate", "ffn_down")
# Tensors every block / the model must have (besides attention Q, K, V or a fused QKV).
_BLOCK_REQUIRED = ("attn_norm.weight", "attn_output.weight", "ffn_up.weight", "ffn_down.weight")
_MODEL_REQUIRED = ("token_embd.weight", "output_norm.weight")


def typed_value(field, kind: type, what: str):
    """The value of a GGUF field checked against ``kind`` (int: integer types; float: float or integer
    types, finite; str: a string). Numbers may be per-layer arrays (a non-empty list)."""
    t = field.types[0] if field.types else None
    is_array = t == gguf.GGUFValueType.ARRAY
    if is_array:
        if kind is str or len(field.types) < 2 or not field.data:
            raise CoaloraError(f"{what} is an {'empty ' if not field.data else ''}array, not a {kind.__name__}")
        t = field.types[-1]
    ok = {int: _INT_TYPES, float: _INT_TYPES | _FLOAT_TYPES, str: {gguf.GGUFValueType.STRING}}[kind]
    if t not in ok:
        raise CoaloraError(f"{what} is of type {getattr(t, 'name', t)}, not a {kind.__name__}")
    v = field.contents()
    if kind is float:
        vals = v if is_array else [v]
        if not all(math.isfinite(x) for x in vals):
            raise CoaloraError(f"{what} is not finite")
    return v


def _split(name: str) -> tuple[int, str]:
    """(block, rest) of a tensor name: (3, "attn_q.weight") for "blk.3.attn_q.weight", (-1, name) otherwise."""
    parts = name.split(".", 2)
    if parts[0] == "blk" and len(parts) == 3 and parts[1].isdigit() and len(parts[1]) < 6:
        return int(parts[1]), parts[2]
    return -1, name


def _known_names(arch) -> tuple[set[str], set[str]]:
    """Tensor names (model level, block level without ``blk.N.``) the architecture defines: weights, and
    biases of the block projections (Qwen2's attention has them)."""
    model, block = set(), set()
    for t in gguf.MODEL_TENSORS[arch.gguf_arch]:
        fmt = gguf.TENSOR_NAMES[t]
        if fmt.startswith("blk.{bid}."):
            kind = fmt[len("blk.{bid}."):]
            block.add(kind + ".weight")
            if kind in _BIASED:
                block.add(kind + ".bias")
        elif "{" not in fmt:
            model.add(fmt + ".weight")
    return model, block


def check_names(src) -> None:
    """Every tensor is one of the architecture's, blocks 0..block_count-1 hold the same set, the required
    tensors exist."""
    name = src.path.name
    model_known, block_known = _known_names(src.arch)
    blocks: dict[int, set[str]] = {}
    for n in src.tensors:
        b, rest = _split(n)
        if (n.endswith(".bias") or "norm" in n) and len(src.tensors[n].shape) != 1:
            raise CoaloraError(f"{name}: {n[:80]} has {len(src.tensors[n].shape)} dimensions, a bias or norm has 1")
        if b < 0:
            if n not in model_known:
                raise CoaloraError(f"{name}: tensor {n[:80]!r} is not a {src.arch.name} tensor")
        elif rest not in block_known:
            raise CoaloraError(f"{name}: tensor {n[:80]!r} is not a {src.arch.name} tensor")
        else:
            blocks.setdefault(b, set()).add(rest)
    if set(blocks) != set(range(src.n_blocks)):
        odd = sorted(set(blocks) ^ set(range(src.n_blocks)))[0]
        raise CoaloraError(f"{name}: tensors of {len(blocks)} blocks, but {src.arch.name}.block_count is "
                           f"{src.n_blocks} (block {odd})")
    first = blocks[0]
    for b, kinds in sorted(blocks.items()):
        if kinds != first:
            odd = sorted(kinds ^ first)[0]
            raise CoaloraError(f"{name}: block {b} has other tensors than block 0 ({odd.removesuffix('.weight')})")
    missing = [k for k in _BLOCK_REQUIRED if k not in first]
    if not ({"attn_q.weight", "attn_k.weight", "attn_v.weight"} <= first or "attn_qkv.weight" in first):
        missing.append("attn_q/k/v.weight")
    missing = [f"blk.N.{k}" for k in missing] + [k for k in _MODEL_REQUIRED if k not in src.tensors]
    if missing:
        raise CoaloraError(f"{name}: no {missing[0]} tensor (a {src.arch.name} model needs it)")


def check_hparams(src) -> None:
    """Hyperparameters typed, finite and in the ranges llama.cpp can run."""
    name, a = src.path.name, src.arch.name
    ctx = src.int_key("context_length")
    if not 1 <= ctx <= MAX_CONTEXT:
        raise CoaloraError(f"{name}: {a}.context_length is {ctx} (1 to {MAX_CONTEXT})")
    h = src.hparams()  # n_embd, heads, ffn, vocab: integers in (0, 2^24)
    if h["n_head_kv"] > h["n_head"] or h["n_head"] % h["n_head_kv"]:
        raise CoaloraError(f"{name}: {h['n_head']} attention heads cannot share {h['n_head_kv']} KV heads")
    eps = src.float_key("attention.layer_norm_rms_epsilon")
    if eps is None or not 0 < eps < 1:
        raise CoaloraError(f"{name}: {a}.attention.layer_norm_rms_epsilon is {eps:g} (needs 0 < eps < 1)"
                           if eps is not None else f"{name}: no {a}.attention.layer_norm_rms_epsilon")
    for key in ("rope.freq_base", "rope.scaling.factor", "attn_logit_softcapping", "final_logit_softcapping"):
        v = src.float_key(key)
        if v is not None and not (isinstance(v, (int, float)) and v > 0):
            raise CoaloraError(f"{name}: {a}.{key} is {v} (must be positive)")
    head_dim = h["n_embd_k"] // h["n_head_kv"]
    rope = src.int_key("rope.dimension_count", head_dim)
    if not 1 <= rope <= head_dim or rope % 2:
        raise CoaloraError(f"{name}: {a}.rope.dimension_count is {rope} (an even number up to {head_dim})")
    for key, f in src.reader.fields.items():  # any other number of the architecture: typed and finite
        if key.startswith(a + ".") and f.types and (f.types[-1] in _FLOAT_TYPES):
            typed_value(f, float, f"{name}: {key}")


def check_vocabulary(src) -> None:
    """Tokens: strings, unique, one per embedding row; scores / token types (when present) one per token."""
    name = src.path.name
    f = src.reader.get_field("tokenizer.ggml.tokens")
    if f is None or src.reader.get_field("tokenizer.ggml.model") is None:
        raise CoaloraError(f"{name}: GGUF has no tokenizer")
    typed_value(src.reader.get_field("tokenizer.ggml.model"), str, f"{name}: tokenizer.ggml.model")
    if f.types[:1] != [gguf.GGUFValueType.ARRAY] or f.types[-1] != gguf.GGUFValueType.STRING:
        raise CoaloraError(f"{name}: tokenizer.ggml.tokens is not an array of strings")
    n = len(f.data)
    tokens = {bytes(f.parts[i]) for i in f.data}
    if len(tokens) != n:
        raise CoaloraError(f"{name}: the vocabulary has {n - len(tokens)} duplicate token(s)")
    rows = src.hparams()["n_vocab"]
    if n != rows:
        raise CoaloraError(f"{name}: {n} tokens, but token_embd.weight has {rows} rows")
    for key, kinds in (("scores", _FLOAT_TYPES), ("token_type", _INT_TYPES)):
        g = src.reader.get_field(f"tokenizer.ggml.{key}")
        if g is None:
            continue
        if g.types[:1] != [gguf.GGUFValueType.ARRAY] or g.types[-1] not in kinds or len(g.data) != n:
            raise CoaloraError(f"{name}: tokenizer.ggml.{key} must hold one number per token ({n})")
    for key, g in src.reader.fields.items():
        if key.startswith("tokenizer.ggml.") and key.endswith("_token_id"):
            typed_value(g, int, f"{name}: {key}")
        elif key == "tokenizer.ggml.merges" and g.data and (g.types[:1] != [gguf.GGUFValueType.ARRAY]
                                                            or g.types[-1] != gguf.GGUFValueType.STRING):
            raise CoaloraError(f"{name}: tokenizer.ggml.merges is not an array of strings")
