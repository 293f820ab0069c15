"""Quantization configurations: a llama.cpp quant type for every quantizable tensor.

Tensors are named as in GGUF (``blk.3.attn_q.weight``, ``token_embd.weight``). A ``ModelLayout``
says which tensors exist, their shapes and menus; a ``Configuration`` picks one type per tensor.
Sizes are exact: ``layout.file_bytes(cfg)`` is the size of the GGUF file coalora writes.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from pathlib import Path

from converters.quant_types import QuantType, get, menu, resolve
from converters.errors import CoaloraError

GGUF_ALIGNMENT = 32
# Types a configuration search draws from by default. Q4_1 is left out: SmolLM2's weights were
# dequantized from Q4_1, so re-quantizing to it is nearly lossless and would flatter the results.
DEFAULT_MENU = ("Q8_0", "Q6_K", "Q5_K", "Q5_1", "Q5_0", "Q4_K", "Q4_0", "IQ4_NL", "IQ4_XS", "Q3_K", "Q2_K")
# The token embedding and the output head (tied or not): the tensors llama-quantize types apart
# (--token-embedding-type, --output-tensor-type), and the only ones a layout's embedding menu extends.
EMBEDDING_KINDS = ("token_embd", "output")
# What new training runs let them take besides the menu: F16 keeps the tensor nearly exact, for the budgets above
# an all-Q8_0 file.
DEFAULT_EMBEDDING_MENU = ("F16",)


# Order of the block projection kinds (the configuration-aware model's kind index); other kinds follow, sorted.
KIND_ORDER = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down", "attn_qkv")


def projection_kinds(kinds) -> tuple[str, ...]:
    kinds = set(kinds)
    return tuple(k for k in KIND_ORDER if k in kinds) + tuple(sorted(kinds - set(KIND_ORDER)))


def pad(n: int, align: int = GGUF_ALIGNMENT) -> int:
    return (n + align - 1) // align * align


@dataclass(frozen=True)
class TensorSpec:
    name: str           # GGUF name, e.g. blk.0.attn_q.weight
    n_rows: int         # ne[1]
    n_per_row: int      # ne[0]
    kind: str           # attn_q ... ffn_down, token_embd, output
    block: int          # block index, -1 for embeddings / head

    @property
    def n_weights(self) -> int:
        return self.n_rows * self.n_per_row

    def bytes(self, qtype: str | QuantType) -> int:
        return get(qtype).tensor_bytes(self.n_rows, self.n_per_row)


@dataclass
class ModelLayout:
    """The quantizable tensors of a model, plus the bytes of everything else in its GGUF file."""
    tensors: list[TensorSpec]
    fixed_bytes: int                   # header, metadata, tensor infos, unquantized tensors (padded)
    n_blocks: int
    menu_names: tuple[str, ...] = DEFAULT_MENU
    hparams: dict = field(default_factory=dict)  # n_embd, n_head, n_head_kv, n_embd_k, n_embd_v, n_ff, n_vocab
    imatrix_tensors: tuple = ()  # tensors with importance data: only they may take the types that need it
    embedding_menu: tuple = ()  # types EMBEDDING_KINDS tensors may take besides the menu (most bits first)
    # Whether tensors without importance data may take the imatrix types llama.cpp quantizes without it (IQ3_S,
    # IQ3_XXS); layouts recorded before coalora allowed that (no "iq_without_entry") keep them off such tensors.
    iq_without_entry: bool = False
    _index: dict = field(default_factory=dict, repr=False)

    def __post_init__(self):
        self._index = {t.name: t for t in self.tensors}

    def __getitem__(self, name: str) -> TensorSpec:
        return self._index[name]

    def names(self) -> list[str]:
        return [t.name for t in self.tensors]

    def menu(self, name: str) -> list[QuantType]:
        spec = self._index[name]
        names = self.menu_names
        if self.embedding_menu and spec.kind in EMBEDDING_KINDS:
            names = tuple(dict.fromkeys(self.embedding_menu + names))
        m = menu(spec.n_per_row, names)
        if name in self.imatrix_tensors:
            return m
        return [q for q in m if not (q.needs_imatrix_entry if self.iq_without_entry else q.needs_imatrix)]

    def on_menu(self, cfg: "Configuration", menu_names=None) -> bool:
        """Whether every tensor of ``cfg`` takes a type of its menu (of ``menu_names`` when given)."""
        allowed = None if menu_names is None else set(menu_names)
        return all(n in self._index and q in self.menu(n) and (allowed is None or q.name in allowed)
                   for n, q in cfg.types.items())

    def n_weights(self) -> int:
        return sum(t.n_weights for t in self.tensors)

    def with_menu(self, menu_names) -> "ModelLayout":
        """The same tensors with another type menu (every tensor must keep a type to choose)."""
        layout = replace(self, menu_names=tuple(menu_names), hparams=dict(self.hparams))
        if not layout.menu_names or any(not layout.menu(t.name) for t in self.tensors):
            raise CoaloraError(f"no quant type of the menu ({', '.join(layout.menu_names) or 'empty'}) fits every tensor")
        return layout

    def with_imatrix(self, names) -> "ModelLayout":
        """The same layout where ``names`` have importance data (and so may take every imatrix type); the other
        tensors may take those llama.cpp quantizes without it."""
        covered = set(names)
        return replace(self, hparams=dict(self.hparams), iq_without_entry=True,
                       imatrix_tensors=tuple(n for n in self.names() if n in covered))

    def with_embedding_menu(self, types) -> "ModelLayout":
        """The same layout where the token embedding and output head may also take ``types`` (as llama-quantize's
        --token-embedding-type / --output-tensor-type), most bits first; none of them may need an imatrix."""
        qs = sorted({get(t) for t in types}, key=lambda q: -q.bits_per_weight)
        bad = [q.name for q in qs if q.needs_imatrix]
        if bad:
            raise CoaloraError(f"embedding menu: {bad[0]} needs an importance matrix; give the embedding types "
                               "that do not (F16, Q8_0, ...)")
        return replace(self, hparams=dict(self.hparams), embedding_menu=tuple(q.name for q in qs))

    def projection_kinds(self) -> tuple[str, ...]:
        """The kinds of the block tensors (attn_q ... ffn_down for llama; attn_qkv, ffn_up ... for phi3)."""
        return projection_kinds(t.kind for t in self.tensors if t.block >= 0)

    def file_bytes(self, cfg: "Configuration") -> int:
        return self.fixed_bytes + sum(pad(self._index[n].bytes(q)) for n, q in cfg.types.items())

    def bits_per_weight(self, cfg: "Configuration") -> float:
        """Bits per weight of the quantizable tensors (what llama.cpp calls BPW)."""
        return 8.0 * sum(self._index[n].bytes(q) for n, q in cfg.types.items()) / self.n_weights()

    def uniform(self, qtype: str) -> "Configuration":
        """Every tensor in ``qtype``, with llama.cpp's fallback where the rows do not allow it."""
        cfg, _ = self.uniform_with_notes(qtype)
        return cfg

    def uniform_with_notes(self, qtype: str) -> tuple["Configuration", list[str]]:
        return apply_overrides(self, Configuration({t.name: "F32" for t in self.tensors}), [(".*", qtype)])

    def validate(self, cfg: "Configuration", strict_menu: bool = True) -> None:
        """Every tensor typed, rows fit the type and, if ``strict_menu``, the type is in the tensor's menu
        (F32, the unquantized reference, is always accepted)."""
        unknown = [n for n in cfg.types if n not in self._index]
        if unknown:
            raise CoaloraError(f"configuration names unknown tensor {unknown[0]!r} ({len(unknown)} unknown)")
        missing = [n for n in self._index if n not in cfg.types]
        if missing:
            raise CoaloraError(f"configuration has no type for {missing[0]!r} ({len(missing)} missing)")
        for n, q in cfg.types.items():
            spec = self._index[n]
            if not q.fits_row(spec.n_per_row):
                raise CoaloraError(f"{n}: {q.name} needs rows of a multiple of {q.block_size}, rows have {spec.n_per_row}")
            if strict_menu and q.name != "F32" and q.name not in {m.name for m in self.menu(n)}:
                raise CoaloraError(f"{n}: {q.name} is not in its menu ({', '.join(m.name for m in self.menu(n))})")

    def describe(self) -> dict:
        return {"n_blocks": self.n_blocks, "fixed_bytes": self.fixed_bytes,
                "tensors": [[t.name, t.n_rows, t.n_per_row, t.kind, t.block] for t in self.tensors],
                "menu": list(self.menu_names), "hparams": dict(self.hparams),
                **({"imatrix_tensors": list(self.imatrix_tensors)} if self.imatrix_tensors else {}),
                **({"embedding_menu": list(self.embedding_menu)} if self.embedding_menu else {}),
                **({"iq_without_entry": True} if self.iq_without_entry else {})}

    @classmethod
    def from_description(cls, d: dict) -> "ModelLayout":
        return cls([TensorSpec(*row) for row in d["tensors"]], d["fixed_bytes"], d["n_blocks"], tuple(d["menu"]),
                   dict(d.get("hparams") or {}), tuple(d.get("imatrix_tensors") or ()),
                   tuple(d.get("embedding_menu") or ()), bool(d.get("iq_without_entry", False)))


@dataclass
class Configuration:
    types: dict[str, QuantType]

    def __post_init__(self):
        self.types = {n: get(q) for n, q in self.types.items()}

    def key(self) -> tuple:
        return tuple(sorted((n, q.name) for n, q in self.types.items()))

    def __eq__(self, other) -> bool:
        return isinstance(other, Configuration) and self.key() == other.key()

    def __hash__(self) -> int:
        return hash(self.key())

    def to_json(self) -> dict:
        return {"types": {n: q.name for n, q in self.types.items()}}

    @classmethod
    def from_json(cls, d: dict) -> "Configuration":
        if not isinstance(d, dict) or not isinstance(d.get("types"), dict) or not d["types"]:
            raise CoaloraError("a configuration is a JSON object with a \"types\" mapping of tensor name to quant type")
        bad = [n for n, q in d["types"].items() if not isinstance(q, str)]
        if bad:
            raise CoaloraError(f"configuration: the type of {bad[0][:80]!r} is not a quant type name")
        try:
            return cls(dict(d["types"]))
        except ValueError as e:
            raise CoaloraError(str(e)) from None

    def save(self, path, extra: dict | None = None) -> None:
        from converters.fileio import write_json
        write_json(path, {**(extra or {}), **self.to_json()})

    @classmethod
    def load(cls, path) -> "Configuration":
        from converters.fileio import read_json
        if not Path(path).is_file():
            raise CoaloraError(f"configuration file not found: {path}")
        return cls.from_json(read_json(path))

    def histogram(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for q in self.types.values():
            out[q.name] = out.get(q.name, 0) + 1
        return dict(sorted(out.items(), key=lambda kv: -get(kv[0]).bits_per_weight))


def apply_overrides(layout: ModelLayout, base: Configuration, overrides: list[tuple[str, str]]) -> tuple[Configuration, list[str]]:
    """``llama-quantize --tensor-type REGEX=TYPE`` semantics: the first rule whose regex matches a tensor
    name decides its type (as llama.cpp does); a rule matching no tensor is an error. Types whose block
    does not divide the rows fall back as llama.cpp does; the notes say which and why."""
    rules = []
    for pattern, qname in overrides:
        try:
            rules.append((re.compile(pattern), get(qname), pattern))
        except re.error as e:
            raise CoaloraError(f"bad tensor regex {pattern!r}: {e}") from None
    types = dict(base.types)
    for rx, _, pattern in rules:
        if not any(rx.search(n) for n in types):
            raise CoaloraError(f"tensor regex {pattern!r} matches no quantizable tensor")
    for n in types:
        for rx, q, _ in rules:
            if rx.search(n):
                types[n] = q
                break
    notes = []
    for n, q in types.items():
        real, why = resolve(q, layout[n].n_per_row)
        if why:
            notes.append(f"{n}: {why}")
        types[n] = real
    return Configuration(types), notes
