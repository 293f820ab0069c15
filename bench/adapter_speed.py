"""How long a new configuration's adapter takes: CoA-LoRA generation vs one per-configuration fine-tune.

A CoA-LoRA run (`--run`) and a per-configuration fine-tune with the same steps, batch, sequence length, rank
and data (`--finetune-run`; trained here with `coalora finetune --config Q4_0` and the run's settings when it
does not exist yet). For 20 random configurations of the run's model (each tensor a random type of its menu)
it times the generation of the adapter tensors (configuration-aware model + folding (I + M) into A; no file
I/O), and separately the GGUF write. Writes bench/results/adapter_speed.{md,json}.

    python bench/adapter_speed.py --run DEMO/run --finetune-run bench/work/adapter_speed/ft-Q4_0
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

from bench.common import cli, markdown_table, write_results  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--run", type=Path, default=Path("bench/work/quality/runs/seed-0/coa"))
    ap.add_argument("--finetune-run", type=Path, default=Path("bench/work/adapter_speed/ft-Q4_0"))
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
    if not (args.finetune_run / "run.json").exists():
        o = run.meta["options"]
        data = [a for d in run.meta.get("data", []) for a in ("--data", d)]
        print("training the per-configuration baseline in", args.finetune_run, flush=True)
        cli("finetune", run.meta["model"], "--config", "Q4_0", "-o", args.finetune_run, "--steps", o["steps"],
            "--seq-len", o["seq_len"], "--batch", o["batch"], "--rank", o["rank"], "--alpha", o["alpha"],
            "--lr", o["lr"], "--seed", o["seed"], *data, *([] if run.meta.get("imatrix_sha256") else ["--no-imatrix"]),
            "--json")
    ft_meta = Run.open(args.finetune_run).meta
    ft = ft_meta["train_seconds"]
    rows = [{"what": "generate adapter tensors (median)", "ms": round(statistics.median(gen), 2)},
            {"what": "generate adapter tensors (max)", "ms": round(max(gen), 2)},
            {"what": "generate + write adapter GGUF (median)", "ms": round(statistics.median(write), 2)},
            {"what": "one per-configuration fine-tune (same steps)", "ms": round(ft * 1e3, 0)}]
    md = markdown_table(rows, [("what", "what"), ("ms", "milliseconds")])
    fo = ft_meta["options"]
    md += (f"\n\nRun {args.run}; {args.n} random configurations of its model; the fine-tune: "
           f"{fo['steps']} steps x {fo['batch']} x {fo['seq_len']} tokens, rank {fo['rank']} ({args.finetune_run}). "
           f"Speed-up of generation over fine-tuning: {ft * 1e3 / statistics.median(gen):,.0f}x.")
    write_results("adapter_speed", {"run": str(args.run), "finetune_run": str(args.finetune_run),
                                    "finetune_options": {k: fo[k] for k in ("steps", "batch", "seq_len", "rank")},
                                    "generation_ms": gen, "write_ms": write, "finetune_s": ft, "rows": rows}, md)


if __name__ == "__main__":
    main()
