"""How much memory a llama.cpp process needs for a model + adapter at a given context (CPU backend).

    total = model file bytes            mmapped weights; every page is read at load (RssFile = the file)
          + repacked weights            llama.cpp's CPU_REPACK buffer: tensors of REPACK_TYPES are copied into
                                        interleaved rows (q4_0_8x8, iq4_nl_8x8, q4_K_8x8, q2_K_8x8 on x86 AVX2 /
                                        AVX512) while their file pages stay resident, so they count twice
                                        (log: "CPU_REPACK model buffer size"); see repack_bytes()
          + adapter file bytes          llama.cpp copies LoRA tensors into their own buffer
                                        (log: "LoRA buffer size" = the tensor data)
          + KV cache                    n_layers x n_ctx x (n_embd_k + n_embd_v) x bytes/element of the cache type
                                        (n_embd_k = n_kv_heads x head_dim, read from attn_k's rows); llama.cpp
                                        clears it at load, so it is resident from the start
          + compute buffers             4 B x n_ubatch x max(n_vocab + 2 n_embd, (n_head + 1) n_ctx + 2 n_ff)
                                        without flash attention (the KQ scores of a ubatch dominate at long
                                        context, the logits of a ubatch at short); with flash attention the KQ
                                        term drops: 4 B x n_ubatch x (n_vocab + 2 n_embd)
          + runtime overhead            RUNTIME_OVERHEAD: python + llama_cpp imported (43 MiB RSS, half of it
                                        shared libraries) and llama.cpp's vocab / token tables, thread pools
                                        and output buffer (~20 MiB anonymous after load for SmolLM2)

The compute formula was fitted to what llama.cpp's scheduler reserves for SmolLM2-135M (0.3.36,
n_ubatch 512): 98.25 MiB at n_ctx 512 and 2048, 166.4 MiB at 8192; the formula gives 98.25 / 98.25 / 166.0.
Only a full context makes it resident (a short prompt touches a fraction: the KQ scores grow with the
filled cells); the total is what the process holds once its context is full, and that is what
``coalora validate`` measures (peak VmHWM of a child process that fills the context).
Measured on SmolLM2 (x86 AVX512, 0.3.36, full context): all-Q8_0 n_ctx 4096 422 MiB for 400 predicted;
without the repack term an IQ4_NL/Q4_K mix (rpi4-4gb) was under-predicted by the 62 MiB repack buffer.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

from converters.errors import CoaloraError

MiB = 1 << 20
RUNTIME_OVERHEAD = 64 * MiB
# bytes per element of a llama.cpp KV cache type (-ctk / -ctv)
KV_TYPE_BYTES = {"f32": 4.0, "f16": 2.0, "bf16": 2.0, "q8_0": 34 / 32, "q5_1": 24 / 32, "q5_0": 22 / 32,
                 "q4_1": 20 / 32, "q4_0": 18 / 32, "iq4_nl": 18 / 32}
# ggml type ids for llama_cpp.Llama(type_k=..., type_v=...)
KV_TYPE_GGML = {"f32": 0, "f16": 1, "q4_0": 2, "q4_1": 3, "q5_0": 6, "q5_1": 7, "q8_0": 8, "iq4_nl": 20, "bf16": 30}
ASSUMED_HEAD_DIM = 64
# Quant types llama.cpp 0.3.36's CPU backend repacks on x86-64 with AVX2 (where coalora validates); aarch64
# builds with dotprod / i8mm also repack Q8_0, Q5_K and Q6_K. Rows are interleaved in groups of 8.
REPACK_TYPES = frozenset({"Q4_0", "IQ4_NL", "Q4_K", "Q2_K"})
REPACK_ROWS = 8  # only when the head count is unknown (a layout without GGUF metadata)


@dataclass(frozen=True)
class ArchInfo:
    """The shape numbers the memory model needs."""
    n_layers: int
    n_embd: int
    n_ff: int
    n_vocab: int
    n_head: int
    n_embd_k: int   # per layer and token, = n_kv_heads x head_dim
    n_embd_v: int

    @classmethod
    def from_hparams(cls, n_layers: int, h: dict) -> "ArchInfo":
        return cls(int(n_layers), int(h["n_embd"]), int(h["n_ff"]), int(h["n_vocab"]), int(h["n_head"]),
                   int(h["n_embd_k"]), int(h["n_embd_v"]))

    @classmethod
    def from_layout(cls, layout, n_vocab: int | None = None, n_head: int | None = None) -> "ArchInfo":
        """From a ModelLayout: its GGUF hyperparameters, or for layouts that predate them, its tensor shapes
        (the head count then defaults to n_embd / 64 when not given)."""
        if layout.hparams:
            h = dict(layout.hparams)
            h["n_vocab"] = n_vocab or h["n_vocab"]
            return cls.from_hparams(layout.n_blocks, h)
        by_kind = {}
        for t in layout.tensors:
            by_kind.setdefault(t.kind, t)
        try:
            k, v, up = by_kind["attn_k"], by_kind["attn_v"], by_kind["ffn_up"]
        except KeyError as e:
            raise CoaloraError(f"the layout has no {e.args[0]} tensor; cannot size the KV cache") from None
        n_embd = k.n_per_row
        emb = by_kind.get("token_embd") or by_kind.get("output")
        vocab = n_vocab or (emb.n_rows if emb else 0)
        return cls(layout.n_blocks, n_embd, up.n_rows, vocab, n_head or max(1, n_embd // ASSUMED_HEAD_DIM),
                   k.n_rows, v.n_rows)


def kv_bytes_per_element(kv_type: str) -> float:
    try:
        return KV_TYPE_BYTES[kv_type.lower()]
    except KeyError:
        raise CoaloraError(f"unknown KV cache type {kv_type!r}; known: {', '.join(KV_TYPE_BYTES)}") from None


def kv_cache_bytes(arch: ArchInfo, n_ctx: int, kv_type: str = "f16") -> int:
    return int(arch.n_layers * n_ctx * (arch.n_embd_k + arch.n_embd_v) * kv_bytes_per_element(kv_type))


def compute_bytes(arch: ArchInfo, n_ctx: int, n_ubatch: int = 512, flash_attn: bool = False) -> int:
    ub = min(n_ubatch, n_ctx)
    logits_term = arch.n_vocab + 2 * arch.n_embd
    if flash_attn:
        return 4 * ub * logits_term
    return 4 * ub * max(logits_term, (arch.n_head + 1) * n_ctx + 2 * arch.n_ff)


def repack_bytes(layout, cfg) -> int:
    """Bytes llama.cpp copies into its CPU_REPACK buffer for configuration ``cfg`` of ``layout``: the matmul
    weights of a REPACK_TYPES type (not token_embd when an output.weight exists: the input embedding is a
    row lookup, which the repacked layout does not serve; a tied token_embd is the output matmul too)."""
    has_output = any(t.kind == "output" for t in layout.tensors)
    n = 0
    for name, q in cfg.types.items():
        t = layout[name]
        if q.name in REPACK_TYPES and t.n_rows % REPACK_ROWS == 0 and not (t.kind == "token_embd" and has_output):
            n += t.bytes(q)
    return n


@dataclass(frozen=True)
class MemoryEstimate:
    model_bytes: int
    adapter_bytes: int
    kv_cache_bytes: int
    compute_bytes: int
    overhead_bytes: int
    repack_bytes: int = 0

    @property
    def total(self) -> int:
        return (self.model_bytes + self.repack_bytes + self.adapter_bytes + self.kv_cache_bytes
                + self.compute_bytes + self.overhead_bytes)

    def as_dict(self) -> dict:
        return {**asdict(self), "total_bytes": self.total}


def estimate(arch: ArchInfo, model_bytes: int, adapter_bytes: int, n_ctx: int, kv_type: str = "f16",
             n_ubatch: int = 512, flash_attn: bool = False, overhead: int = RUNTIME_OVERHEAD,
             repack: int = 0) -> MemoryEstimate:
    """``repack``: repack_bytes() of the configuration (0 when unknown, e.g. while sizing a budget)."""
    return MemoryEstimate(int(model_bytes), int(adapter_bytes), kv_cache_bytes(arch, n_ctx, kv_type),
                          compute_bytes(arch, n_ctx, n_ubatch, flash_attn), int(overhead), int(repack))


def adapter_bytes_estimate(layout, rank: int, targets=None, bytes_per_value: int = 4) -> int:
    """Size of an F32 LoRA GGUF of ``rank`` over the layout's block tensors of the ``targets`` kinds."""
    n = sum(rank * (t.n_per_row + t.n_rows) for t in layout.tensors
            if t.block >= 0 and (targets is None or t.kind in targets))
    n_tensors = sum(2 for t in layout.tensors if t.block >= 0 and (targets is None or t.kind in targets))
    return n * bytes_per_value + n_tensors * (32 + 96) + 4096  # data + alignment + tensor infos + header
