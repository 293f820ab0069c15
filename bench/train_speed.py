"""Training speed of the torch path on each device: optimizer steps per second and tokens per second.

Protocol: `coalora finetune MODEL --config Q8_0` (the quantization-exact LoRA training loop; no search
rounds) for --steps steps of --batch x --seq-len tokens on each device of --devices, same seed. MODEL is
'synthetic' by default: SmolLM2-135M's block shapes (30 blocks, hidden 576, FFN 1536, 9 heads, 3 KV
heads, tied embeddings) with random weights and a small test vocabulary, so the script runs anywhere
without the real assets (the real model's vocabulary, 49152, adds the output-head matmul on top);
'synthetic-1b' has Llama 3.2 1B's block shapes (16 blocks, hidden 2048, FFN 8192, 32 heads, 8 KV heads);
'smollm2' trains the real model. The training text is the tiny test corpus repeated, or --data.
Writes bench/results/NAME.{md,json} (--name, default train_speed; or --results-dir).
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import cli, markdown_table, write_results  # noqa: E402

SMOLLM2_BLOCKS = dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                      num_key_value_heads=3, max_position_embeddings=2048, tie_word_embeddings=True)
LLAMA_1B_BLOCKS = dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                       num_key_value_heads=8, max_position_embeddings=2048, tie_word_embeddings=True)
SYNTHETIC = {"synthetic": SMOLLM2_BLOCKS, "synthetic-1b": LLAMA_1B_BLOCKS}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="synthetic")
    ap.add_argument("--data", default=None, help="Training text file (default: the test corpus, repeated).")
    ap.add_argument("--devices", default="cpu,cuda")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--results-dir", type=Path, default=None)
    ap.add_argument("--name", default="train_speed", help="result file name (NAME.json, NAME.md)")
    args = ap.parse_args()
    import torch

    from tests.conftest import build_tiny_llama, tiny_corpus

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model = args.model
        if model in SYNTHETIC:
            model = build_tiny_llama(tmp / model, **SYNTHETIC[model])
        data = args.data
        if data is None:
            data = tmp / "corpus.txt"
            data.write_text(tiny_corpus(n_words=60000))
        for dev in args.devices.split(","):
            if dev.startswith("cuda") and not torch.cuda.is_available():
                print(f"skipping {dev}: torch sees no CUDA GPU")
                continue
            summary, wall = cli("finetune", model, "--config", "Q8_0", "-d", data, "-o", tmp / f"run-{dev}",
                                "--steps", args.steps, "--batch", args.batch, "--seq-len", args.seq_len,
                                "--device", dev, "--json")
            meta = json.loads((tmp / f"run-{dev}" / "run.json").read_text())
            name = torch.cuda.get_device_name(0) if dev.startswith("cuda") else f"CPU, {torch.get_num_threads()} threads"
            rows.append({"device": dev, "hardware": name, "steps": args.steps,
                         "tokens_per_step": args.batch * args.seq_len,
                         "train_s": meta["train_seconds"], "tokens_per_s": meta["tokens_per_second"],
                         "final_loss": round(meta["final_loss"], 4), "process_wall_s": round(wall, 1)})
            print(f"{dev}: {meta['tokens_per_second']:,.0f} tok/s, loss {meta['final_loss']:.4f}", flush=True)
    cols = [("device", "device"), ("hardware", "hardware"), ("steps", "steps"), ("tokens_per_step", "tokens/step"),
            ("train_s", "training s"), ("tokens_per_s", "tokens/s"), ("final_loss", "final loss"),
            ("process_wall_s", "process wall s")]
    md = (f"Model: {args.model}; `coalora finetune --config Q8_0`, {args.steps} steps x {args.batch} x "
          f"{args.seq_len} tokens.\n\n" + markdown_table(rows, cols))
    write_results(args.name, {"model": args.model, "rows": rows}, md, results_dir=args.results_dir)


if __name__ == "__main__":
    main()
