"""Training step time of each recipe at the demo's settings (SmolLM2, Austen, 4 x 128 tokens per step).

Trains a few steps per recipe with `coalora train` and reports the training seconds per step, so that the
demo's cost under the default recipe can be checked (`make demo` must stay under 25 minutes). Writes
bench/results/recipe_speed.{md,json}.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import cli, markdown_table, write_results  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--recipes", default="plain,anchored")
    ap.add_argument("--shared-machine", action="store_true", help="Record that other work shared the machine.")
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for recipe in args.recipes.split(","):
            out, wall = cli("train", "smollm2", "--data", "austen", "-o", Path(tmp) / recipe, "--steps", args.steps,
                            "--seq-len", 128, "--batch", 4, "--rounds", 1, "--search-candidates", 2,
                            "--checkpoint-every", args.steps, "--recipe", recipe, "--json")
            rows.append({"recipe": recipe, "steps": out["steps"], "train_s": out["train_seconds"],
                         "s_per_step": out["train_seconds"] / out["steps"], "tokens_per_s": out["tokens_per_second"],
                         "process_wall_s": round(wall, 1)})
    base = rows[0]["s_per_step"]
    for r in rows:
        r["ratio"] = r["s_per_step"] / base
    md = (f"SmolLM2-135M, Austen, {args.steps} steps x 4 x 128 tokens per recipe (the demo's batch), 1 search round."
          + (" Other work shared the 2-core machine: times are indicative only." if args.shared_machine else "")
          + "\n\n" + markdown_table(rows, [("recipe", "recipe"), ("steps", "steps"), ("train_s", "training s"),
                                           ("s_per_step", "s per step"), ("ratio", f"vs {rows[0]['recipe']}"),
                                           ("tokens_per_s", "tokens/s"), ("process_wall_s", "process wall s")]))
    write_results("recipe_speed", {"machine_shared": args.shared_machine, "steps": args.steps, "rows": rows}, md)


if __name__ == "__main__":
    main()
