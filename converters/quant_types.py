"""Catalogue of the llama.cpp quant types coalora offers, with llama.cpp's row-length rule.

Block geometry comes from ``gguf.GGML_QUANT_SIZES`` (the same table llama.cpp's gguf-py uses),
so bytes and bits per weight are exact.
"""
from __future__ import annotations

from dataclasses import dataclass

from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as T

# Offered types, from most to fewest bits per weight.
CATALOGUE_NAMES = ("F32", "F16", "BF16", "Q8_0", "Q6_K", "Q5_1", "Q5_K", "Q5_0", "Q4_1",
                   "Q4_K", "Q4_0", "IQ4_NL", "IQ4_XS", "Q3_K", "Q2_K")
# The low-bit i-quants, offered only with an importance matrix (they are meant for one), most bits first.
# TQ1_0 / TQ2_0 are left out: they store ternary weights ({-1, 0, 1} times one scale per 256), meant for models
# trained ternary; on SmolLM2 they are far worse than
# every type here (relative RMS weight error 0.81 against 0.35 for IQ2_XXS at the same 2.06 bpw on SmolLM2:
# bench/results/imatrix_ternary.md).
IMATRIX_NAMES = ("IQ3_S", "IQ3_XXS", "IQ2_S", "IQ2_XS", "IQ2_XXS", "IQ1_M", "IQ1_S")
# Of those, the types llama.cpp quantizes only with importance data for the tensor (src/llama-quant.cpp refuses
# them on a tensor the imatrix has no entry for); IQ3_S and IQ3_XXS it quantizes without (its IQ3 mixes give the
# token embedding, which no imatrix covers, IQ3_S). IQ1_M is kept here though llama.cpp lets the token embedding
# and output head take it without one: none of its mixes does.
_NEEDS_ENTRY = ("IQ2_S", "IQ2_XS", "IQ2_XXS", "IQ1_M", "IQ1_S")
# Types whose ggml quantizer ignores importance weights (the others take them).
_NO_IMPORTANCE = ("F32", "F16", "BF16", "Q8_0")

# llama.cpp (src/llama-quant.cpp of the llama.cpp in llama-cpp-python 0.3.36; tests/test_imatrix.py checks it)
# replaces a type whose block does not divide the row length
# by this one, and by F16 if that one's block does not divide it either.
_FALLBACK = {"Q2_K": "Q4_0", "Q3_K": "Q4_0", "IQ4_XS": "IQ4_NL",
             "Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0", **{n: "IQ4_NL" for n in IMATRIX_NAMES}}


class UnknownQuantType(ValueError):
    pass


@dataclass(frozen=True)
class QuantType:
    name: str
    ggml: T
    block_size: int
    type_size: int

    @property
    def bits_per_weight(self) -> float:
        return 8.0 * self.type_size / self.block_size

    def row_bytes(self, n_per_row: int) -> int:
        return n_per_row // self.block_size * self.type_size

    def tensor_bytes(self, n_rows: int, n_per_row: int) -> int:
        return n_rows * self.row_bytes(n_per_row)

    def fits_row(self, n_per_row: int) -> bool:
        return n_per_row % self.block_size == 0

    @property
    def needs_imatrix(self) -> bool:
        """coalora quantizes this type only with an importance matrix."""
        return self.name in IMATRIX_NAMES

    @property
    def needs_imatrix_entry(self) -> bool:
        """This type is quantized only with importance data for the tensor (an imatrix entry)."""
        return self.name in _NEEDS_ENTRY

    @property
    def takes_imatrix(self) -> bool:
        """ggml's quantizer for this type uses importance weights when given them."""
        return self.name not in _NO_IMPORTANCE

    def __str__(self) -> str:
        return self.name


def _make(name: str) -> QuantType:
    g = T[name]
    block, size = GGML_QUANT_SIZES[g]
    return QuantType(name, g, block, size)


CATALOGUE: dict[str, QuantType] = {n: _make(n) for n in CATALOGUE_NAMES + IMATRIX_NAMES}


def get(name: str | QuantType) -> QuantType:
    if isinstance(name, QuantType):
        return name
    key = str(name).upper()
    if key not in CATALOGUE:
        raise UnknownQuantType(f"unknown quant type {name!r}; known: {', '.join(CATALOGUE_NAMES + IMATRIX_NAMES)}")
    return CATALOGUE[key]


def from_ggml(g: int | T) -> QuantType:
    g = T(int(g))
    return CATALOGUE[g.name] if g.name in CATALOGUE else _make(g.name)


def resolve(name: str | QuantType, n_per_row: int) -> tuple[QuantType, str | None]:
    """The type llama.cpp would really write for rows of ``n_per_row``, and why it changed."""
    q = get(name)
    if q.fits_row(n_per_row):
        return q, None
    fb = get(_FALLBACK.get(q.name, "F16"))
    if not fb.fits_row(n_per_row):
        fb = CATALOGUE["F16"]
    return fb, f"{q.name} needs rows of a multiple of {q.block_size}, row has {n_per_row}: {fb.name}"


def menu(n_per_row: int, names=CATALOGUE_NAMES) -> list[QuantType]:
    """Types that store rows of ``n_per_row`` natively (no fallback), most bits first."""
    return [CATALOGUE[n] for n in names if CATALOGUE[n].fits_row(n_per_row)]
