"""Does every profile's emitted pick hold its own against the largest uniform file that fits? (issue 19)

For each profile folder of a `coalora demo` (or `coalora emit`) output, the largest uniform type that fits the
profile's budget is the one emit's confirmation named (`manifest.search.confirmation.uniform`). This writes that
uniform configuration from the same run as emit would (`coalora convert --type T`, with the run's importance
matrix; llama.cpp's row fallbacks) and its adapter (`coalora adapter RUN --config T`), then measures both pairs
(the pick: the folder's model.gguf + adapter.gguf) with llama.cpp on the same first W windows of 512 tokens of
Pride and Prejudice (F32 KV cache). Writes bench/results/demo_uniform.{md,json}.

    python bench/demo_uniform.py --demo coalora-demo
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import ROOT, cli, markdown_table, write_results  # noqa: E402
from bench.quality import Evaluator  # noqa: E402


def uniform_pair(run: Path, qtype: str, work: Path) -> tuple[Path, Path]:
    """The uniform ``qtype`` model of ``run`` (its imatrix, if it has one) and its generated adapter."""
    meta = json.loads((run / "run.json").read_text())
    model, adapter = work / f"uniform-{qtype}.gguf", work / f"uniform-{qtype}-adapter.gguf"
    imatrix = ["--imatrix", run / "imatrix.gguf"] if (run / "imatrix.gguf").exists() else []
    if not model.exists():
        cli("convert", meta["model"], "--type", qtype, *imatrix, "-o", model)
    if not adapter.exists():
        cli("adapter", run, "--config", qtype, "-o", adapter, "--json")
    return model, adapter


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--demo", type=Path, required=True, help="A `coalora demo -o` folder (run/ and dist/).")
    ap.add_argument("--work", type=Path, default=ROOT / "bench" / "work" / "demo_uniform")
    ap.add_argument("--windows", type=int, default=16, help="Pride and Prejudice windows of 512 tokens.")
    ap.add_argument("--note", default="", help="A sentence about the run, added to the result.")
    args = ap.parse_args()
    run, dist = args.demo / "run", args.demo / "dist"
    args.work.mkdir(parents=True, exist_ok=True)
    folders = sorted(p for p in dist.iterdir() if (p / "manifest.json").is_file())
    ev = Evaluator(folders[0] / "model.gguf", args.windows, 512)
    rows = []
    for folder in folders:
        m = json.loads((folder / "manifest.json").read_text())
        uniform = (m["search"]["confirmation"] or {}).get("uniform")
        pick = folder / "model.gguf"
        (pick_ppl,) = ev.ppl(pick, [folder / "adapter.gguf"])
        row = {"profile": folder.name, "budget_bytes": m["search"]["budget_bytes"], "pick": m["search"]["source"],
               "pick_bytes": pick.stat().st_size, "pick_bpw": m["search"]["bits_per_weight"], "pick_ppl": pick_ppl,
               "uniform": uniform, "uniform_bytes": None, "uniform_ppl": None}
        if uniform and m["search"]["source"] == f"uniform:{uniform}":  # the pick is that very file
            row.update(uniform_bytes=row["pick_bytes"], uniform_ppl=pick_ppl)
        elif uniform:
            model, adapter = uniform_pair(run, uniform, args.work)
            (u_ppl,) = ev.ppl(model, [adapter])
            row.update(uniform_bytes=model.stat().st_size, uniform_ppl=u_ppl)
        if row["uniform_ppl"] is not None:
            row["pick_vs_uniform_pct"] = 100 * (pick_ppl / row["uniform_ppl"] - 1)
            row["holds"] = "yes" if pick_ppl <= row["uniform_ppl"] else "no"
        print(f"  {row['profile']}: pick {pick_ppl:.3f}, uniform {uniform} {row['uniform_ppl']}", flush=True)
        rows.append(row)
    md = (f"Each profile's pick from `{args.demo}` against the largest uniform file that fits its budget (the one "
          f"emit's confirmation compared), both with their generated adapters from the same run; llama.cpp "
          f"perplexity on {args.windows} x 512 tokens of Pride and Prejudice."
          + (f" {args.note}" if args.note else "") + "\n\n"
          + markdown_table(rows, [("profile", "profile"), ("budget_bytes", "budget (bytes)"), ("pick", "pick"),
                                  ("pick_bytes", "pick bytes"), ("pick_ppl", "pick + adapter"),
                                  ("uniform", "largest uniform"), ("uniform_bytes", "uniform bytes"),
                                  ("uniform_ppl", "uniform + adapter"), ("pick_vs_uniform_pct", "pick vs uniform %"),
                                  ("holds", "pick <= uniform")]))
    write_results("demo_uniform", {"demo": str(args.demo), "windows": args.windows, "rows": rows}, md)


if __name__ == "__main__":
    main()
