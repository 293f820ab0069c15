"""Load a model (Hugging Face folder or GGUF file) as float32 transformers weights, with GGUF naming.

``LoadedModel`` is the bridge between the two worlds: HF parameter names <-> GGUF tensor names
(via gguf-py's ``TensorNameMap``), weights in GGUF row order (llama's Q/K rotary permutation),
the exact ``ModelLayout`` of the files :mod:`converters.gguf_model_writer` writes, and the
tokenizer metadata llama.cpp needs.
"""
from __future__ import annotations

import json
import logging
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import gguf
import numpy as np

from toolkit.configuration import BLOCK_KINDS, ModelLayout, TensorSpec
from toolkit.errors import CoaloraError
from toolkit.fileio import read_json

# GGUF architecture name -> gguf-py enum; HF model_type -> GGUF architecture name.
SUPPORTED_ARCHS = {"llama": gguf.MODEL_ARCH.LLAMA}
HF_MODEL_TYPES = {"llama": "llama"}
# Type the embeddings / head get when a layout leaves them out of the search.
EMBEDDING_DEFAULT_TYPE = "Q8_0"
_PERMUTED = ("attn_q", "attn_k")

# tokenizer.json pre-tokenizer (simplified description) -> llama.cpp pre-tokenizer name
_PRE_TOKENIZERS = {
    (("ByteLevel", True),): "gpt-2",
    (("Digits", True), ("ByteLevel", True)): "smollm",
}
_GGUF_TOKEN_NORMAL, _GGUF_TOKEN_CONTROL, _GGUF_TOKEN_USER, _GGUF_TOKEN_UNUSED = (
    int(gguf.TokenType.NORMAL), int(gguf.TokenType.CONTROL), int(gguf.TokenType.USER_DEFINED),
    int(gguf.TokenType.UNUSED))


def _unsupported(arch: str) -> CoaloraError:
    return CoaloraError(f"unsupported architecture {arch!r}; supported: {', '.join(SUPPORTED_ARCHS)}")


def _kind(gguf_name: str) -> str:
    parts = gguf_name.split(".")
    return parts[2] if parts[0] == "blk" else parts[0]


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
    arch: str                     # GGUF architecture name
    source: Path
    config: object                # HF config
    n_blocks: int
    _to_gguf: dict = field(default_factory=dict, repr=False)
    _to_hf: dict = field(default_factory=dict, repr=False)
    _state: dict = field(default_factory=dict, repr=False)
    _fixed_bytes: dict = field(default_factory=dict, repr=False)

    # ---- names -------------------------------------------------------------------------------
    def gguf_name(self, hf_param_name: str) -> str | None:
        return self._to_gguf.get(hf_param_name)

    def hf_name(self, gguf_name: str) -> str:
        try:
            return self._to_hf[gguf_name]
        except KeyError:
            raise CoaloraError(f"model has no tensor {gguf_name!r}") from None

    def gguf_names(self) -> list[str]:
        """Every GGUF tensor of the model, in the order llama.cpp's converter writes them."""
        order = {"token_embd": 0, "attn_norm": 1, "attn_q": 2, "attn_k": 3, "attn_v": 4, "attn_output": 5,
                 "ffn_norm": 6, "ffn_gate": 7, "ffn_up": 8, "ffn_down": 9, "output_norm": 10, "output": 11}

        def key(n):
            parts = n.split(".")
            blk = int(parts[1]) if parts[0] == "blk" else (-1 if parts[0] == "token_embd" else 1 << 30)
            return blk, order.get(_kind(n), 99), n
        return sorted(self._to_hf, key=key)

    # ---- weights -----------------------------------------------------------------------------
    @property
    def n_head(self) -> int:
        return int(self.config.num_attention_heads)

    @property
    def n_head_kv(self) -> int:
        return int(getattr(self.config, "num_key_value_heads", None) or self.n_head)

    def _heads_for(self, gguf_name: str) -> int | None:
        k = _kind(gguf_name)
        return self.n_head if k == "attn_q" else self.n_head_kv if k == "attn_k" else None

    def permute_rows(self, gguf_name: str, array_2d: np.ndarray) -> np.ndarray:
        """HF row order -> GGUF row order (identity except for attn_q / attn_k)."""
        h = self._heads_for(gguf_name)
        return array_2d if h is None else _permute(array_2d, h)

    def to_hf_order(self, gguf_name: str, array_2d: np.ndarray) -> np.ndarray:
        """GGUF row order -> HF row order (inverse of :meth:`permute_rows`)."""
        h = self._heads_for(gguf_name)
        return array_2d if h is None else _permute(array_2d, h, inverse=True)

    def gguf_weight(self, gguf_name: str) -> np.ndarray:
        """The float32 weight of ``gguf_name`` in GGUF row order (rows = ne[1], columns = ne[0])."""
        t = self._state[self.hf_name(gguf_name)]
        w = t.detach().to("cpu").float().numpy()
        return np.ascontiguousarray(self.permute_rows(gguf_name, w), dtype=np.float32)

    # ---- layout ------------------------------------------------------------------------------
    def quantizable_names(self, include_embeddings: bool = True) -> list[str]:
        kinds = set(BLOCK_KINDS) | ({"token_embd", "output"} if include_embeddings else set())
        return [n for n in self.gguf_names() if _kind(n) in kinds]

    def tensor_spec(self, gguf_name: str) -> TensorSpec:
        shape = tuple(self._state[self.hf_name(gguf_name)].shape)
        parts = gguf_name.split(".")
        block = int(parts[1]) if parts[0] == "blk" else -1
        return TensorSpec(gguf_name, int(shape[0]), int(shape[1]), _kind(gguf_name), block)

    def layout(self, include_embeddings: bool = True) -> ModelLayout:
        """The quantizable tensors and the exact bytes of everything else in the GGUF we write."""
        if include_embeddings not in self._fixed_bytes:
            from converters.gguf_model_writer import fixed_bytes
            self._fixed_bytes[include_embeddings] = fixed_bytes(self, include_embeddings)
        specs = [self.tensor_spec(n) for n in self.quantizable_names(include_embeddings)]
        return ModelLayout(specs, self._fixed_bytes[include_embeddings], self.n_blocks)

    # ---- tokenizer ---------------------------------------------------------------------------
    def tokenizer_metadata(self) -> list[tuple[str, object, gguf.GGUFValueType, gguf.GGUFValueType | None]]:
        """GGUF ``tokenizer.*`` key/values as (key, value, type, array sub-type)."""
        if self.source.suffix == ".gguf":
            return _gguf_tokenizer_fields(self.source)
        return _hf_tokenizer_fields(self)


# ---- loading -----------------------------------------------------------------------------------
def load_model(path) -> LoadedModel:
    """Load a Hugging Face folder (safetensors) or a ``.gguf`` file as float32 transformers weights."""
    path = Path(path)
    if not path.exists():
        raise CoaloraError(f"model not found: {path}")
    if path.is_file() and path.suffix == ".gguf":
        return _load_gguf(path)
    if path.is_dir():
        return _load_hf(path)
    raise CoaloraError(f"{path}: expected a Hugging Face model folder or a .gguf file")


def _quiet():
    import transformers
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    logging.getLogger("gguf").setLevel(logging.ERROR)


def _load_hf(path: Path) -> LoadedModel:
    _quiet()
    cfg_file = path / "config.json"
    if not cfg_file.exists():
        raise CoaloraError(f"{path}: no config.json (not a Hugging Face model folder)")
    try:
        model_type = json.loads(cfg_file.read_text()).get("model_type", "?")
    except (OSError, json.JSONDecodeError) as e:
        raise CoaloraError(f"cannot read {cfg_file}: {e}") from None
    if model_type not in HF_MODEL_TYPES:
        raise _unsupported(model_type)
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
            tok = AutoTokenizer.from_pretrained(path)
    except Exception as e:  # corrupt safetensors, missing tokenizer, ...
        raise CoaloraError(f"cannot load {path}: {_one_line(e)}") from None
    return _finish(model, tok, HF_MODEL_TYPES[model_type], path)


def _load_gguf(path: Path) -> LoadedModel:
    _quiet()
    try:
        reader = gguf.GGUFReader(path)
        arch = reader.fields["general.architecture"].contents()
    except KeyError:
        raise CoaloraError(f"{path}: GGUF has no general.architecture") from None
    except Exception as e:
        raise CoaloraError(f"cannot read GGUF {path}: {_one_line(e)}") from None
    del reader
    if arch not in SUPPORTED_ARCHS:
        raise _unsupported(arch)
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers import modeling_gguf_pytorch_utils as gguf_utils
    plain_tqdm = getattr(gguf_utils, "tqdm", None)
    try:
        gguf_utils.tqdm = lambda it, *a, **k: it  # its own tqdm bar ignores transformers' progress setting
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            config = AutoConfig.from_pretrained(path.parent, gguf_file=path.name)
            if hasattr(config, "quantization_config"):
                del config.quantization_config  # weights are dequantized; save_pretrained must not see it
            model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, config=config,
                                                         dtype=torch.float32)
            tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    except Exception as e:
        raise CoaloraError(f"cannot load GGUF {path}: {_one_line(e)}") from None
    finally:
        if plain_tqdm is not None:
            gguf_utils.tqdm = plain_tqdm
    # The weights are plain dequantized float32 now: forget the GGUF "quantizer" so that
    # .float(), .to() and save_pretrained behave as for any float model.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer = None
    for attr in ("is_quantized", "quantization_method"):
        if attr in vars(model):
            delattr(model, attr)
    return _finish(model, tok, arch, path)


def _finish(model, tok, arch: str, source: Path) -> LoadedModel:
    import torch
    model = model.to(torch.float32).eval()
    config = model.config
    n_blocks = int(config.num_hidden_layers)
    tmap = gguf.get_tensor_name_map(SUPPORTED_ARCHS[arch], n_blocks)
    state = model.state_dict()
    tied = bool(getattr(config, "tie_word_embeddings", False))
    to_gguf, to_hf = {}, {}
    for hf in state:
        if tied and hf == "lm_head.weight":
            continue
        g = tmap.get_name(hf, try_suffixes=(".weight", ".bias"))
        if g is None:
            if hf.endswith("rotary_emb.inv_freq"):
                continue
            raise CoaloraError(f"{source}: tensor {hf!r} has no GGUF name for {arch}")
        to_gguf[hf], to_hf[g] = g, hf
    state = {k: state[k] for k in to_gguf}
    return LoadedModel(model, tok, arch, Path(source), config, n_blocks, to_gguf, to_hf, state)


def _one_line(e: Exception) -> str:
    s = str(e).strip().splitlines()
    return (s[0] if s else type(e).__name__)[:300]


# ---- tokenizer metadata ------------------------------------------------------------------------
def _gguf_tokenizer_fields(path: Path):
    try:
        reader = gguf.GGUFReader(path)
    except Exception as e:
        raise CoaloraError(f"cannot read GGUF {path}: {_one_line(e)}") from None
    out = []
    for key, f in reader.fields.items():
        if not key.startswith("tokenizer."):
            continue
        vtype = f.types[0]
        sub = f.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        out.append((key, f.contents(), vtype, sub))
    if not any(k == "tokenizer.ggml.tokens" for k, *_ in out):
        raise CoaloraError(f"{path}: GGUF has no tokenizer")
    return out


def _describe_pre(pre: dict | None) -> tuple:
    if pre is None:
        return ()
    if pre.get("type") == "Sequence":
        return tuple(x for p in pre.get("pretokenizers", []) for x in _describe_pre(p))
    t = pre.get("type")
    if t == "ByteLevel":
        return ((t, bool(pre.get("use_regex", True)) and not pre.get("add_prefix_space", False)),)
    if t == "Digits":
        return ((t, bool(pre.get("individual_digits", False))),)
    return ((t, json.dumps(pre, sort_keys=True)),)


def _hf_tokenizer_fields(lm: LoadedModel):
    tj = lm.source / "tokenizer.json"
    if not tj.exists():
        raise CoaloraError(f"{lm.source}: no tokenizer.json (only fast byte-level BPE tokenizers are supported)")
    spec = read_json(tj)
    model = spec.get("model", {})
    if model.get("type") != "BPE":
        raise CoaloraError(f"{tj}: tokenizer model {model.get('type')!r} is not supported (byte-level BPE only)")
    pre_desc = _describe_pre(spec.get("pre_tokenizer"))
    pre = _PRE_TOKENIZERS.get(pre_desc)
    if pre is None:
        raise CoaloraError(f"{tj}: unknown pre-tokenizer {[d[0] for d in pre_desc]}; "
                           f"known: plain ByteLevel (gpt-2), Digits+ByteLevel (smollm)")

    vocab_size = int(lm.config.vocab_size)
    tokens: list[str | None] = [None] * vocab_size
    types = [_GGUF_TOKEN_NORMAL] * vocab_size
    for tok, i in model.get("vocab", {}).items():
        if i < vocab_size:
            tokens[i] = tok
    for a in spec.get("added_tokens", []):
        i = a["id"]
        if i < vocab_size:
            tokens[i] = a["content"]
            types[i] = _GGUF_TOKEN_CONTROL if a.get("special") else _GGUF_TOKEN_USER
    for i, t in enumerate(tokens):
        if t is None:
            tokens[i], types[i] = f"[PAD{i}]", _GGUF_TOKEN_UNUSED
    # llama.cpp maps every byte to its byte-level character token and aborts if one is missing.
    present = set(tokens)
    missing = [c for c in _byte_chars() if c not in present]
    if missing:
        raise CoaloraError(f"{tj}: byte-level vocabulary lacks {len(missing)} of the 256 byte tokens")
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]

    V, S, A = gguf.GGUFValueType.UINT32, gguf.GGUFValueType.STRING, gguf.GGUFValueType.ARRAY
    out = [("tokenizer.ggml.model", "gpt2", S, None), ("tokenizer.ggml.pre", pre, S, None),
           ("tokenizer.ggml.tokens", tokens, A, S),
           ("tokenizer.ggml.scores", [0.0] * vocab_size, A, gguf.GGUFValueType.FLOAT32),
           ("tokenizer.ggml.token_type", types, A, gguf.GGUFValueType.INT32),
           ("tokenizer.ggml.merges", merges, A, S)]
    tk = lm.tokenizer
    for key, attr in (("bos", "bos_token_id"), ("eos", "eos_token_id"), ("unknown", "unk_token_id"),
                      ("padding", "pad_token_id")):
        i = getattr(tk, attr, None)
        if i is not None and 0 <= i < vocab_size:
            out.append((f"tokenizer.ggml.{key}_token_id", int(i), V, None))
    add_bos = _adds_bos(spec, lm.source, tk)
    out.append(("tokenizer.ggml.add_bos_token", add_bos, gguf.GGUFValueType.BOOL, None))
    tmpl = getattr(tk, "chat_template", None)
    if isinstance(tmpl, str) and tmpl:
        out.append(("tokenizer.chat_template", tmpl, S, None))
    return out


def _adds_bos(spec: dict, folder: Path, tk) -> bool:
    try:
        tc = json.loads((folder / "tokenizer_config.json").read_text())
        if "add_bos_token" in tc:
            return bool(tc["add_bos_token"])
    except (OSError, json.JSONDecodeError):
        pass
    post = spec.get("post_processor") or {}
    single = post.get("single") or []
    bos = getattr(tk, "bos_token", None)
    return bool(bos) and any(s.get("SpecialToken", {}).get("id") == bos for s in single)


def _byte_chars() -> list[str]:
    """The 256 printable characters byte-level BPE uses for the bytes 0..255 (GPT-2's table)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for c in cs]


os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
