"""The memory a training rank needs on its device, computed from the model's shapes before training starts.

Four parts: the weights torch computes with (one configuration's dequantized tensors in the weights dtype, plus
the parameters that are never quantized), the weight bank's cache of further dequantized (tensor, type) pairs,
the LoRA / configuration-aware model with gradients and AdamW moments, and the activations of one configuration's
share of the batch (an estimate from the layer shapes, eager attention; with activation checkpointing only each
block's input is kept, plus one block recomputed). The bank gets what the device has left, so the other three
are checked against the device: free GPU memory, or on the CPU the available RAM shared by the node's ranks.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

from converters.errors import CoaloraError

GIB = 1 << 30
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
RESERVE = 0.1  # of the device's free memory, left to the allocator, the runtime and the search's evaluations


@dataclass(frozen=True)
class ModelShape:
    n_layers: int
    hidden: int
    ffn: int
    vocab: int
    n_heads: int
    n_quantized: int  # weights of the quantizable tensors (what a configuration sets)
    n_other: int      # parameters torch keeps besides them (norms, unquantized embeddings)

    @classmethod
    def of(cls, loaded, layout) -> "ModelShape":
        c = loaded.config
        quantized = {loaded.hf_name(t.name) for t in layout.tensors if _has_hf_name(loaded, t.name)}
        other = sum(p.numel() for n, p in loaded.model.named_parameters() if n not in quantized)
        return cls(c.num_hidden_layers, c.hidden_size, c.intermediate_size, c.vocab_size, c.num_attention_heads,
                   layout.n_weights(), other)

    @classmethod
    def llama(cls, n_layers: int, hidden: int, ffn: int, vocab: int, n_heads: int, n_kv_heads: int,
              tied: bool = False) -> "ModelShape":
        """A Llama-shaped model from its hyper-parameters (for plans of models not at hand)."""
        kv = hidden // n_heads * n_kv_heads
        block = 2 * hidden * hidden + 2 * hidden * kv + 3 * hidden * ffn
        return cls(n_layers, hidden, ffn, vocab, n_heads, n_layers * block + vocab * hidden * (1 if tied else 2),
                   (2 * n_layers + 1) * hidden)


def _has_hf_name(loaded, name: str) -> bool:
    try:
        loaded.hf_name(name)
        return True
    except CoaloraError:
        return False


@dataclass
class MemoryPlan:
    weights: int
    bank: int
    lora_optimizer: int
    activations: int
    available: int | None  # free device memory for this rank (None: unknown)
    device: str
    weights_dtype: str
    checkpointing: bool

    @property
    def needed(self) -> int:
        """What training cannot do without (the bank's cache beyond one configuration is optional)."""
        return self.weights + self.lora_optimizer + self.activations

    def rows(self) -> list[tuple[str, int]]:
        return [(f"weights ({self.weights_dtype}, one configuration + unquantized parameters)", self.weights),
                ("weight bank cache (further dequantized types)", self.bank),
                ("LoRA + configuration-aware model, gradients, AdamW", self.lora_optimizer),
                ("activations" + (" (checkpointed)" if self.checkpointing else "") + ", estimated", self.activations)]

    def describe(self) -> str:
        lines = [f"memory plan on {self.device}:"]
        lines += [f"  {name:<66} {b / GIB:9.3f} GiB" for name, b in self.rows()]
        avail = "unknown" if self.available is None else f"{self.available / GIB:.3f} GiB"
        lines.append(f"  {'total':<66} {(self.needed + self.bank) / GIB:9.3f} GiB of {avail} available")
        return "\n".join(lines)

    def check(self) -> None:
        if self.available is not None and self.needed > self.available:
            raise CoaloraError(
                f"training needs about {self.needed / GIB:.2f} GiB on {self.device} (weights "
                f"{self.weights / GIB:.2f}, LoRA + optimizer {self.lora_optimizer / GIB:.2f}, activations "
                f"{self.activations / GIB:.2f}) but {self.available / GIB:.2f} GiB are available; try --weights-dtype "
                f"bfloat16, --activation-checkpointing or a smaller --batch / --seq-len")


def activation_bytes(shape: ModelShape, sequences: int, seq_len: int, checkpointing: bool) -> int:
    """Float32 activations kept for the backward pass of ``sequences`` x ``seq_len`` tokens (an estimate)."""
    tokens = sequences * seq_len
    # per token and block: norms, projections' inputs (rounded copies too) and outputs, residuals, the MLP's
    # four ffn-wide tensors, the attention scores and probabilities (eager attention)
    block = 16 * shape.hidden + 6 * shape.ffn + 2 * shape.n_heads * seq_len
    logits = 3 * shape.vocab  # logits, their float log-softmax, its gradient
    kept = shape.n_layers * (shape.hidden if checkpointing else block) + (block if checkpointing else 0)
    return 4 * tokens * (kept + logits)


def available_bytes(device) -> int | None:
    """Free memory of a CUDA device, or the CPU's available RAM divided among the node's ranks."""
    import torch

    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        with open("/proc/meminfo") as f:
            info = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in f}
    except (OSError, ValueError, IndexError):
        return None
    ranks = int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1)
    return info.get("MemAvailable", info.get("MemFree", 0)) // max(1, ranks)


def plan(shape: ModelShape, *, trainable: int, sequences: int, seq_len: int, weights_dtype: str,
         checkpointing: bool, bank_wanted: int, device, available: int | None) -> MemoryPlan:
    """The plan of one rank; ``bank_wanted``: bytes of every further dequantized pair the training set uses
    (the bank gets at most what the device has left after the rest and a reserve)."""
    weights = shape.n_quantized * DTYPE_BYTES[weights_dtype] + 4 * shape.n_other
    p = MemoryPlan(weights, 0, 16 * trainable, activation_bytes(shape, sequences, seq_len, checkpointing),
                   available, str(device), weights_dtype, checkpointing)
    room = bank_wanted if available is None else int(available * (1 - RESERVE)) - p.needed
    p.bank = max(0, min(bank_wanted, room))
    return p
