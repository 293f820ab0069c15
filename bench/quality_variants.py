"""Training variants against the quality benchmark's files: the rows of the README's "What we tried" table.

Needs a finished `bench/quality.py` run (its F32 and stock files in bench/work/quality, seed 0's searched mixes
and configurations in bench/work/quality/runs/seed-0). One variant per call:

    python bench/quality_variants.py NAME coa [coalora train options...]     # adapters on the three searched mixes
    python bench/quality_variants.py NAME fp  [coalora finetune options...]  # full-precision LoRA on stock Q8_0

Same protocol as bench/quality.py (60 x 4 x 128 steps unless overridden, 32 x 512 P&P tokens, llama.cpp), plus
the loss on 32 held-out windows of the training novels (the run's calibration tail) at uniform Q8_0 (F32 for fp),
computed in torch. Appends a line (with its provenance) to bench/results/quality_variants.jsonl.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import RESULTS, ROOT, cli, provenance  # noqa: E402
from bench.quality import BUDGET_FROM, Evaluator  # noqa: E402

WORK = ROOT / "bench" / "work" / "quality"
SEED0 = WORK / "runs" / "seed-0"  # the searched mixes and their configurations of quality.py's seed 0
OUT = ROOT / "bench" / "work" / "variants"
STEPS = ("--steps", 60, "--seq-len", 128, "--batch", 4)


def main(name: str, kind: str, extra: list[str]) -> None:
    from converters.configuration import Configuration
    from toolkit.run import Run

    if kind not in ("coa", "fp") or not (WORK / "f32.gguf").exists():
        sys.exit("usage: quality_variants.py NAME coa|fp [options]; run bench/quality.py first")
    OUT.mkdir(parents=True, exist_ok=True)
    run_dir, t0 = OUT / name, time.perf_counter()
    if kind == "fp":
        cli("finetune", "smollm2", "--config", "F32", "-o", run_dir, *STEPS, "--json", *extra)
    else:
        cli("train", "smollm2", "--mode", "coa", "-o", run_dir, *STEPS, "--json", *extra)
    wall = time.perf_counter() - t0
    ev = Evaluator(WORK / "f32.gguf", 32, 512)
    ppl = {}
    for t in BUDGET_FROM[:1] if kind == "fp" else BUDGET_FROM:
        adapter = OUT / f"{name}-{t}.gguf"
        # --generated: the configuration files say which adapter the search's confirmation kept
        cli("adapter", run_dir, "--config", "F32" if kind == "fp" else SEED0 / f"cfg-{t}.json", "-o", adapter,
            "--json", *(() if kind == "fp" else ("--generated",)))
        model = WORK / f"stock-{t}.gguf" if kind == "fp" else SEED0 / f"mixed-{t}.gguf"
        ppl[t] = round(ev.ppl(model, [adapter])[0], 4)
        print(f"{name} {t} ({model.name}): {ppl[t]}", flush=True)
    run = Run.open(run_dir)
    cfg = run.layout.uniform("F32") if kind == "fp" else Configuration.load(SEED0 / "cfg-Q8_0.json")
    val = run.calibration_loss([cfg], 32)[0]
    print(f"{name} validation loss: {val:.4f}")
    rec = {"name": name, "kind": kind, "options": extra, "ppl": ppl, "validation_loss": round(val, 4),
           "train_wall_s": round(wall, 1), "provenance": provenance()}
    with open(RESULTS / "quality_variants.jsonl", "a") as f:
        f.write(json.dumps(rec) + "\n")


if __name__ == "__main__":
    if len(sys.argv) < 3:
        sys.exit(__doc__)
    main(sys.argv[1], sys.argv[2], sys.argv[3:])
