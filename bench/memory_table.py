"""The training memory plan per model size, computed (toolkit/memory_plan.py) from Llama shapes, not measured.

One rank, LoRA rank 8 on every block projection, one configuration per step, batch 4 x 256 tokens (the defaults)
and 4 x 2048; float32 weights as on the CPU, bfloat16 weights with activation checkpointing as for large models on
a GPU. The weight bank's cache is left out (it takes what the device has left).

    .venv/bin/python bench/memory_table.py
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import markdown_table, provenance, write_results  # noqa: E402
from toolkit import memory_plan  # noqa: E402

# name: (layers, hidden, ffn, vocab, heads, kv heads, tied embeddings)
MODELS = {"SmolLM2-135M": (30, 576, 1536, 49152, 9, 3, True), "Llama 3.2 1B": (16, 2048, 8192, 128256, 32, 8, True),
          "Llama 3.2 3B": (28, 3072, 8192, 128256, 24, 8, True),
          "Llama 3.1 8B": (32, 4096, 14336, 128256, 32, 8, False)}
RANK = 8


def lora_parameters(layers, hidden, ffn, heads, kv_heads) -> int:
    kv = hidden // heads * kv_heads
    per_block = (hidden + hidden) * 2 + (hidden + kv) * 2 + (hidden + ffn) * 3  # q, o; k, v; gate, up, down
    return layers * RANK * per_block


def main() -> None:
    rows = []
    for name, (layers, hidden, ffn, vocab, heads, kv, tied) in MODELS.items():
        shape = memory_plan.ModelShape.llama(layers, hidden, ffn, vocab, heads, kv, tied)
        trainable = lora_parameters(layers, hidden, ffn, heads, kv)
        for seq_len in (256, 2048):
            for dtype, ckpt in (("float32", False), ("bfloat16", True)):
                p = memory_plan.plan(shape, trainable=trainable, sequences=4, seq_len=seq_len, weights_dtype=dtype,
                                     checkpointing=ckpt, bank_wanted=0, device="any", available=None)
                gib = memory_plan.GIB
                rows.append({"model": name, "parameters_b": round((shape.n_quantized + shape.n_other) / 1e9, 3),
                             "tokens": f"4 x {seq_len}", "weights": dtype + (" + checkpointing" if ckpt else ""),
                             "weights_gib": round(p.weights / gib, 2), "lora_optimizer_gib": round(p.lora_optimizer / gib, 3),
                             "activations_gib": round(p.activations / gib, 2), "total_gib": round(p.needed / gib, 2)})
    cols = [("model", "model"), ("parameters_b", "parameters (B)"), ("tokens", "batch"), ("weights", "weights"),
            ("weights_gib", "weights GiB"), ("lora_optimizer_gib", "LoRA + optimizer GiB"),
            ("activations_gib", "activations GiB (estimate)"), ("total_gib", "total GiB")]
    md = ("Computed by toolkit/memory_plan.py from the models' shapes (not measured): one rank, LoRA rank 8 on every "
          "block projection, one configuration per step; the weight bank's further cache not included.\n\n"
          + markdown_table(rows, cols))
    write_results("memory_plan", {"provenance": provenance(), "computed": True, "rows": rows}, md)


if __name__ == "__main__":
    main()
