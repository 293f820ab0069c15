"""How long a new configuration's adapter takes: CoA-LoRA generation vs one per-configuration fine-tune.

Uses the runs that bench/quality.py trained (bench/work/quality/runs/coa and ft-Q4_0). For 20 random
configurations of SmolLM2 (each tensor a random type of its menu) it times the generation of the
adapter tensors (configuration-aware model + folding (I + M) into A; no file I/O), and separately the
GGUF write. Writes bench/results/adapter_speed.{md,json}.
"""
from __future__ import annotations

import argparse
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import markdown_table, write_results  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--run", type=Path, default=Path("bench/work/quality/runs/coa"))
    ap.add_argument("--finetune-run", type=Path, default=Path("bench/work/quality/runs/ft-Q4_0"))
    ap.add_argument("--n", type=int, default=20)
    args = ap.parse_args()
    from converters.configuration import Configuration
    from toolkit.run import Run

    run = Run.open(args.run)
    run.model()
    rng = random.Random(0)
    gen, write = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.n):
            cfg = Configuration({n: rng.choice(run.layout.menu(n)) for n in run.layout.names()})
            t = time.perf_counter()
            run.adapter_tensors(cfg)
            gen.append((time.perf_counter() - t) * 1e3)
            t = time.perf_counter()
            run.write_adapter(cfg, Path(tmp) / f"a{i}.gguf")
            write.append((time.perf_counter() - t) * 1e3)
    ft = Run.open(args.finetune_run).meta["train_seconds"]
    rows = [{"what": "generate adapter tensors (median)", "ms": round(statistics.median(gen), 2)},
            {"what": "generate adapter tensors (max)", "ms": round(max(gen), 2)},
            {"what": "generate + write adapter GGUF (median)", "ms": round(statistics.median(write), 2)},
            {"what": "one per-configuration fine-tune (same steps)", "ms": round(ft * 1e3, 0)}]
    md = markdown_table(rows, [("what", "what"), ("ms", "milliseconds")])
    md += f"\n\n{args.n} random SmolLM2 configurations; speed-up of generation over fine-tuning: " \
          f"{ft * 1e3 / statistics.median(gen):,.0f}x."
    write_results("adapter_speed", {"generation_ms": gen, "write_ms": write, "finetune_s": ft, "rows": rows}, md)


if __name__ == "__main__":
    main()
