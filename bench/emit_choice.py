"""What `coalora emit` picks for a device, with and without its confirmation (SmolLM2, a short Austen run).

For each profile, `coalora emit` with its default confirmation (the search's best candidates, the best archived
one and two llama.cpp files that fit, the largest and the other of least quantization error, each with its
generated adapter and with the shared LoRA, measured on held-out windows of the training text; another candidate
replaces the largest file only when better by two standard errors) and with `--confirm 0` (the surrogate's pick, as emit
chose before); `coalora validate --no-measure` gives llama.cpp's perplexity of each pick with its adapter on
Pride and Prejudice. Writes bench/results/emit_choice.{md,json}.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import ROOT, cli, markdown_table, write_results  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=ROOT / "bench" / "work" / "emit_choice")
    ap.add_argument("--run", type=Path, help="an existing trained run (e.g. the demo's) instead of training one in "
                    "--work (--steps and --recipe then describe nothing and are ignored)")
    ap.add_argument("--profiles", default="jetson-orin-nano-8gb,rpi5-8gb")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--windows", type=int, default=8, help="Pride and Prejudice windows of 512 tokens (validate).")
    ap.add_argument("--recipe", default="anchored")
    ap.add_argument("--no-validate", action="store_true", help="Skip llama.cpp's perplexity of each pick.")
    ap.add_argument("--no-unconfirmed", action="store_true", help="Skip the --confirm 0 emits (the confirmation "
                    "table still shows the surrogate's first choice and its measured loss).")
    ap.add_argument("--shared-machine", action="store_true", help="Record that other work shared the machine.")
    ap.add_argument("--note", default="", help="A sentence about the run, added to the result.")
    args = ap.parse_args()
    run = args.run or args.work / "run"
    if args.run is not None:
        opts = json.loads((run / "run.json").read_text())["options"]
        about = (f"run {run} ({opts['steps']} steps x {opts['batch']} x {opts['seq_len']} tokens, {opts['rounds']} "
                 f"search rounds)")
    else:
        about = (f"{args.steps}-step `--recipe {args.recipe}` run on Austen (4 x 128 tokens per step, 2 search "
                 f"rounds)")
    if not (run / "run.json").exists():
        cli("train", "smollm2", "--data", "austen", "-o", run, "--steps", args.steps, "--seq-len", 128, "--batch", 4,
            "--rounds", 2, "--search-candidates", 4, "--checkpoint-every", args.steps, "--recipe", args.recipe, "--json")
    rows = []
    for profile in args.profiles.split(","):
        modes = [("confirmed (default)", ())] + ([] if args.no_unconfirmed else [("unconfirmed (--confirm 0)",
                                                                                 ("--confirm", 0))])
        for label, confirm in modes:
            dist = args.work / ("dist" if not confirm else "dist0")
            m, emit_s = cli("emit", run, "--profile", profile, "-o", dist, "--windows", args.windows, *confirm, "--json")
            v = None if args.no_validate else cli("validate", dist / profile, "--no-measure", "--json", check=False)[0]
            conf = m["search"]["confirmation"] or {}
            uniform = next((c for c in conf.get("candidates", []) if c["uniform"]), None)
            rows.append({"profile": profile, "emit": label, "budget_bytes": m["search"]["budget_bytes"],
                         "file_bytes": m["files"]["model.gguf"]["bytes"], "bpw": m["search"]["bits_per_weight"],
                         "source": m["search"]["source"], "held_out_loss": m["search"]["measured_loss"],
                         "uniform": conf.get("uniform"), "uniform_loss": uniform and uniform["measured_loss"],
                         "candidates": conf.get("candidates"), "histogram": m["histogram"],
                         "ppl_predicted": m["evaluation"]["predicted_perplexity"],
                         "ppl_llama_cpp": v["evaluation"]["perplexity_adapter"] if isinstance(v, dict) else None,
                         "emit_s": round(emit_s, 1)})
    md = (f"SmolLM2-135M, {about}; confirmation on 16 held-out windows of 128 training-text tokens; perplexity "
          f"of the pick + its adapter on {args.windows} x 512 tokens of Pride and Prejudice, predicted by torch"
          + (" (llama.cpp not run)." if args.no_validate else " and measured by llama.cpp.")
          + (" Other work shared the 2-core machine: emit seconds are indicative only." if args.shared_machine else "")
          + (f" {args.note}" if args.note else "")
          + "\n\n" + markdown_table(rows, [
              ("profile", "profile"), ("emit", "emit"), ("budget_bytes", "budget bytes"),
              ("file_bytes", "file bytes"), ("bpw", "bpw"), ("source", "picked"),
              ("held_out_loss", "held-out loss of the pick"), ("uniform", "largest llama.cpp file that fits"),
              ("uniform_loss", "its held-out loss"), ("ppl_predicted", "predicted ppl"),
              ("ppl_llama_cpp", "llama.cpp ppl"), ("emit_s", "emit s")]))
    cands = [{"profile": r["profile"], **c, "vs": None if c.get("vs_uniform") is None else
              f"{c['vs_uniform']:+.4f} ± {c['vs_uniform_se']:.4f}", "picked": "yes" if c["picked"] else ""}
             for r in rows if r["candidates"] for c in r["candidates"]]
    md += ("\n\nWhat each confirmation compared (held-out loss in nats per token with the adapter the candidate "
           "keeps; the paired difference to the largest llama.cpp file that fits, with its standard error):\n\n"
           + markdown_table(cands, [
               ("profile", "profile"), ("source", "candidate"), ("file_bytes", "file bytes"), ("bpw", "bpw"),
               ("adapter", "adapter"), ("measured_loss", "held-out loss"), ("vs", "vs largest file"),
               ("picked", "picked")]))
    write_results("emit_choice", {"machine_shared": args.shared_machine, "note": args.note, "run": str(run),
                                  **({} if args.run else {"steps": args.steps, "recipe": args.recipe}),
                                  "windows": args.windows, "rows": rows}, md)


if __name__ == "__main__":
    main()
