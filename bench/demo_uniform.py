"""Does every profile's emitted pick hold its own against the largest llama.cpp file that fits? (issue 19)

For each profile folder of a `coalora demo` (or `coalora emit`) output, the largest llama.cpp file that fits the
profile's budget is the reference emit's confirmation named (`manifest.search.confirmation`: a uniform type, or
one of llama-quantize's own mixes such as Q4_K_M). This writes that configuration from the same run as emit would
(`coalora convert`, with the run's importance matrix; llama.cpp's row fallbacks; a mix as llama.cpp's dry run
assigns it) with its generated adapter and the run's shared LoRA (`coalora adapter RUN --config ...`), then
measures them and the pick (the folder's model.gguf + adapter.gguf) with llama.cpp on the same first W windows of
512 tokens of Pride and Prejudice (F32 KV cache). The pick holds when it is not worse than the reference with its
generated adapter. Writes bench/results/demo_uniform.{md,json}.

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


def reference_files(run: Path, ftype: str, mix: bool, work: Path) -> tuple[Path, Path, Path]:
    """The llama.cpp file ``ftype`` of ``run``'s model (uniform, or llama-quantize's mix when ``mix``; with the run's
    imatrix, if it has one), its generated adapter and the run's shared LoRA."""
    meta = json.loads((run / "run.json").read_text())
    stem = f"{'mix' if mix else 'uniform'}-{ftype}"
    model, adapter, shared = (work / f"{stem}.gguf", work / f"{stem}-adapter.gguf", work / f"{stem}-shared.gguf")
    imatrix = ["--imatrix", run / "imatrix.gguf"] if (run / "imatrix.gguf").exists() else []
    config = ftype
    if mix:
        from toolkit.budget_search import llama_mixes
        from toolkit.run import Run

        r = Run.open(run)
        config = work / f"{stem}.json"
        llama_mixes(r, r.layout)[ftype].save(config)
    # written every time: another demo's run may have another imatrix
    cli("convert", meta["model"], *(("--recipe", config) if mix else ("--type", ftype)), *imatrix, "-o", model)
    cli("adapter", run, "--config", config, "-o", adapter, "--generated", "--json")
    cli("adapter", run, "--config", config, "-o", shared, "--shared", "--json")
    return model, adapter, shared


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
        conf = m["search"]["confirmation"] or {}
        uniform = conf.get("uniform")
        ref = next((c for c in conf.get("candidates", []) if c.get("uniform")), None)
        mix = bool(ref and ref["source"].startswith("llama.cpp:"))
        pick = folder / "model.gguf"
        (pick_ppl,) = ev.ppl(pick, [folder / "adapter.gguf"])
        row = {"profile": folder.name, "budget_bytes": m["search"]["budget_bytes"], "pick": m["search"]["source"],
               "pick_bytes": pick.stat().st_size, "pick_bpw": m["search"]["bits_per_weight"],
               "pick_adapter": m["search"].get("adapter", "generated"), "pick_ppl": pick_ppl,
               "uniform": None if uniform is None else f"{uniform} ({'mix' if mix else 'uniform'})",
               "uniform_bytes": None, "uniform_ppl": None, "uniform_shared_ppl": None}
        if uniform:
            model, adapter, shared = reference_files(run, uniform, mix, args.work)
            u_ppl, s_ppl = ev.ppl(model, [adapter, shared])
            row.update(uniform_bytes=model.stat().st_size, uniform_ppl=u_ppl, uniform_shared_ppl=s_ppl)
        if row["uniform_ppl"] is not None:
            row["pick_vs_uniform_pct"] = 100 * (pick_ppl / row["uniform_ppl"] - 1)
            row["holds"] = "yes" if pick_ppl <= row["uniform_ppl"] else "no"
        print(f"  {row['profile']}: pick {pick_ppl:.3f}, uniform {uniform} {row['uniform_ppl']}", flush=True)
        rows.append(row)
    md = (f"Each profile's pick from `{args.demo}` (with the adapter emit chose) against the largest llama.cpp file "
          f"that fits its budget (the one emit's confirmation compared: a uniform type or llama-quantize's mix) with "
          f"its generated adapter and with the shared LoRA, from the same run; llama.cpp "
          f"perplexity on {args.windows} x 512 tokens of Pride and Prejudice."
          + (f" {args.note}" if args.note else "") + "\n\n"
          + markdown_table(rows, [("profile", "profile"), ("budget_bytes", "budget (bytes)"), ("pick", "pick"),
                                  ("pick_bytes", "pick bytes"), ("pick_adapter", "pick's adapter"),
                                  ("pick_ppl", "pick + adapter"), ("uniform", "largest llama.cpp file"),
                                  ("uniform_bytes", "its bytes"), ("uniform_ppl", "it + generated adapter"),
                                  ("uniform_shared_ppl", "it + shared LoRA"),
                                  ("pick_vs_uniform_pct", "pick vs it + generated %"),
                                  ("holds", "pick <= it + generated")]))
    write_results("demo_uniform", {"demo": str(args.demo), "windows": args.windows, "rows": rows}, md)


if __name__ == "__main__":
    main()
