"""`coalora demo`, timed: wall clock and peak memory of the whole pipeline, and its table per device profile.

    python bench/demo.py --out /tmp/demo            # runs `coalora demo -o /tmp/demo` under /usr/bin/time -v
    python bench/demo.py --report-only              # rewrite demo.md from bench/results/demo.json

Run it with the assets already fetched (`make assets`) and, to time a first run, a fresh `$COALORA_HOME` holding
only them (no quantization or sensitivity cache). Writes bench/results/demo.{json,md}.
"""
from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import RESULTS, ROOT, markdown_table, write_results  # noqa: E402

COLUMNS = [("profile", "profile"), ("budget_mb", "budget MB"), ("model_mb", "model MB"), ("bpw", "bpw"),
           ("chosen", "chosen"), ("adapter", "adapter"), ("ppl_no_adapter", "ppl, no adapter"), ("ppl_adapter", "ppl + adapter"),
           ("ppl_predicted", "ppl predicted"), ("residual_pct", "llama.cpp vs predicted %"),
           ("memory_model_mb", "memory model MB"), ("memory_measured_mb", "measured peak MB"),
           ("verdicts", "verdicts")]


def table(d: dict) -> list[dict]:
    """The demo's rows as the README shows them (MB, percent; formatted), kept in the result file with the raw
    rows."""
    return [{"profile": r["profile"], "budget_mb": f"{r['budget_bytes'] / 1e6:.1f}",
             "model_mb": f"{r['model_bytes'] / 1e6:.1f}", "bpw": f"{r['bpw']:.2f}", "chosen": r.get("chosen"),
             "adapter": r.get("adapter", "generated"),
             "ppl_no_adapter": f"{r['ppl_no_adapter']:.3f}", "ppl_adapter": f"{r['ppl_adapter']:.3f}",
             "ppl_predicted": f"{r['ppl_predicted']:.3f}",
             "residual_pct": f"{100 * (r['ppl_adapter'] / r['ppl_predicted'] - 1):+.2f}",
             "memory_model_mb": f"{r['memory_predicted'] / 1e6:.1f}",
             "memory_measured_mb": f"{r['memory_measured'] / 1e6:.1f}", "verdicts": r["verdicts"]}
            for r in d["profiles"]]


def markdown(d: dict) -> str:
    p = d["provenance"]
    return (f"`coalora demo`: {d['steps']} training steps (recipe {d['recipe']}, imatrix {d['imatrix']}), then emit, "
            f"validate and package for every profile; llama.cpp perplexity on {d['windows']} x 512 tokens of Pride "
            f"and Prejudice. Wall clock {p['wall_clock']}, peak RSS {p['max_rss_kb']:,} KB.\n\n"
            + markdown_table(d["table"], COLUMNS))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("/tmp/coalora-demo-bench"))
    ap.add_argument("--report-only", action="store_true")
    ap.add_argument("--note", default="", help="A sentence about the machine, recorded in the provenance.")
    args = ap.parse_args()
    if args.report_only:
        d = json.loads((RESULTS / "demo.json").read_text())
        d["table"] = table(d)
        write_results("demo", d, markdown(d))  # keeps the file's own provenance
        return
    if (args.out / "run").exists():
        sys.exit(f"{args.out} holds an earlier demo; give a fresh --out")
    res = subprocess.run(["/usr/bin/time", "-v", str(Path(sys.executable).parent / "coalora"), "demo", "-o",
                          str(args.out)], cwd=ROOT, capture_output=True, text=True)
    if res.returncode != 0:
        sys.exit(f"coalora demo failed:\n{res.stderr[-3000:]}")
    wall = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): (\S+)", res.stderr).group(1)
    rss = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", res.stderr).group(1))
    d = json.loads((args.out / "demo.json").read_text())
    from bench.common import provenance
    d = {"provenance": {**provenance(), "wall_clock": wall, "max_rss_kb": rss,
                        **({"machine": args.note} if args.note else {})}, **d}
    d["table"] = table(d)
    write_results("demo", d, markdown(d))


if __name__ == "__main__":
    main()
