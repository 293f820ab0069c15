"""Searched mixed configurations against the uniform-type ladder, both with the same CoA-LoRA run's adapters.

Protocol (fixed; one run of this script produces every number):
- A trained CoA-LoRA run (`--run`; with its importance matrix, when it has one, every file below is quantized
  with it and the IQ types are rungs).
- Ladder: every distinct uniform configuration of the run's menu (llama.cpp's fallback where rows do not
  allow a type; the token embedding / tied output head follows the same rule), ordered by file size.
- For each rung except the largest (at the top of the menu nothing else fits), or those `--rungs` names, the
  budget is that uniform file's exact size in bytes, and coalora's search picks a configuration exactly as
  `coalora search --confirm N` and `coalora emit` do (never over the budget; llama-quantize's mixes compete; the
  pick keeps the generated adapter or the shared LoRA, whichever the confirmation measured better).
- Both files are written with the run's cached ggml bytes. The uniform file is measured with its generated
  adapter and with the shared LoRA (the better of the two is the rung's reference), the searched file with the
  adapter the search picked. Perplexity by llama.cpp (llama-cpp-python, CPU, F32 KV cache) on held-out
  *Pride and Prejudice*, the first W windows of 512 tokens.
- `--merge`: the rungs of the previous result (same run by content, imatrix, windows and confirmation) that this
  invocation does not measure are kept, each with the commit and date that measured it, so a ladder can be measured in parts.
Writes bench/results/ladder.{md,json,png}.

Usage: .venv/bin/python bench/ladder.py --run RUN [--windows 16] [--confirm 2] [--confirm-windows 16]
       .venv/bin/python bench/ladder.py --run RUN --rungs Q3_K,Q4_K --merge   # add two rungs to the last result
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import RESULTS, markdown_table, perplexity_plot, run_fingerprint, write_results  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--run", type=Path, default=Path("bench/work/quality/runs/seed-0/coa"))
    ap.add_argument("--windows", type=int, default=16)
    ap.add_argument("--confirm", type=int, default=2, help="best candidates whose calibration loss is measured")
    ap.add_argument("--confirm-windows", type=int, default=16, help="held-out windows of the training text per confirmation")
    ap.add_argument("--work", type=Path, default=Path("bench/work/ladder"))
    ap.add_argument("--rungs", default="", help="Comma-separated uniform types to measure (default: every rung but the top).")
    ap.add_argument("--note", default="", help="A sentence about the run, recorded in the result.")
    ap.add_argument("--merge", action="store_true",
                    help="keep the previous result's rungs (same run and protocol) that this run does not measure")
    ap.add_argument("--report-only", action="store_true", help="rewrite the table and plot from ladder.json")
    args = ap.parse_args()
    if args.report_only:
        import json
        return report(json.loads((RESULTS / "ladder.json").read_text()))

    from bench.quality import Evaluator
    from converters.gguf_model_writer import write_gguf
    from toolkit.budget_search import search_run
    from toolkit.run import Run

    t0 = time.perf_counter()
    run = Run.open(args.run)
    if run.meta["options"]["mode"] != "coa":
        sys.exit(f"{args.run} is a {run.meta['options']['mode']} run; the ladder needs a CoA-LoRA run")
    layout, loaded = run.layout, run.loaded()
    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)

    rungs = {}
    for t in layout.menu_names:
        cfg = layout.uniform(t)
        rungs.setdefault(cfg, t)
    ladder = sorted(rungs.items(), key=lambda kv: layout.file_bytes(kv[0]))
    print(f"{len(ladder)} distinct uniform configurations: {', '.join(t for _, t in ladder)}", flush=True)

    def files(tag: str, cfg, adapters: dict[str, bool]) -> tuple[Path, dict[str, Path]]:
        model = work / f"{tag}.gguf"
        write_gguf(loaded.gguf, model, cfg, quantized=run.quantized_bytes, progress=False)
        assert model.stat().st_size == layout.file_bytes(cfg)
        paths = {}
        for name, adjusted in adapters.items():
            paths[name] = work / f"{tag}-{name}.gguf"
            run.write_adapter(cfg, paths[name], adjusted=adjusted)
        return model, paths

    wanted = [t for t in args.rungs.split(",") if t]
    unknown = set(wanted) - {t for _, t in ladder[:-1]}
    if unknown:
        sys.exit(f"--rungs: {', '.join(sorted(unknown))} not among the rungs below the top")
    protocol = {"run": str(run.path), "run_sha256": run_fingerprint(run.path),
                "imatrix_sha256": run.meta.get("imatrix_sha256"), "windows": args.windows,
                "confirm": args.confirm, "confirm_windows": args.confirm_windows}
    kept = previous_rows(protocol, {t for _, t in ladder[:-1] if not wanted or t in wanted}) if args.merge else []
    ev = None
    rows = []
    for cfg_u, t in ladder[:-1]:
        if wanted and t not in wanted:
            continue
        budget = layout.file_bytes(cfg_u)
        ts = time.perf_counter()
        res = search_run(run, layout, budget, args.confirm, args.confirm_windows)
        search_s = time.perf_counter() - ts
        picked = "generated" if res.adjusted else "shared"
        mu, au = files(f"uniform-{t}", cfg_u, {"generated": True, "shared": False})
        ms, as_ = files(f"searched-{t}", res.cfg, {picked: res.adjusted})
        if ev is None:
            ev = Evaluator(mu, args.windows, 512)
        u_gen, u_shared = ev.ppl(mu, [au["generated"], au["shared"]])
        (s_coa,) = ev.ppl(ms, [as_[picked]])
        u_best = min(u_gen, u_shared)
        rows.append({"rung": t, "budget_bytes": budget, "uniform_bpw": round(layout.bits_per_weight(cfg_u), 3),
                     "uniform_generated_ppl": round(u_gen, 4), "uniform_shared_ppl": round(u_shared, 4),
                     "uniform_coa_ppl": round(u_best, 4),
                     "searched_bytes": ms.stat().st_size, "searched_bpw": round(res.bpw, 3),
                     "searched_source": res.source, "searched_adapter": picked,
                     "searched_same_as_uniform": res.cfg == cfg_u,
                     "searched_coa_ppl": round(s_coa, 4),
                     "coa_gain_pct": round(100 * (1 - s_coa / u_best), 2), "search_s": round(search_s, 1),
                     "searched_types": res.cfg.histogram(), "confirmation": res.confirmation})
        print(f"  {t:7s} {budget:,} B: uniform + generated {u_gen:.3f} / + shared {u_shared:.3f}  "
              f"searched ({res.source}) + {picked} {s_coa:.3f}  (search {search_s:.1f} s)", flush=True)
        for p in (mu, ms, *au.values(), *as_.values()):
            p.unlink()

    top_cfg, top_t = ladder[-1]
    rows = sorted(rows + kept, key=lambda r: r["budget_bytes"])
    report({**protocol, "note": args.note,
            "rows": rows, "rungs_measured": len(rows), "rungs": len(ladder) - 1,
            "top_rung": top_t, "top_bytes": layout.file_bytes(top_cfg),
            "wall_s": round(time.perf_counter() - t0, 1)})


def previous_rows(protocol: dict, measuring: set[str]) -> list[dict]:
    """The rows of bench/results/ladder.json measured under ``protocol`` for rungs not in ``measuring``, each with
    ``kept_from``: the provenance of the result that measured it."""
    import json

    old = RESULTS / "ladder.json"
    if not old.exists():
        return []
    d = json.loads(old.read_text())
    if any(d.get(k) != v for k, v in protocol.items()):
        sys.exit(f"--merge: {old} was measured with another run or protocol; measure every rung instead")
    own = {k: d["provenance"].get(k) for k in ("commit", "dirty", "date")}
    return [{**r, "kept_from": r.get("kept_from") or own} for r in d["rows"] if r["rung"] not in measuring]


def report(payload: dict) -> None:
    """bench/results/ladder.{md,json,png} from the measured rows (``--report-only`` redoes this from the JSON)."""
    rows = payload["rows"]
    for r in rows:
        r["same"] = "yes" if r["searched_same_as_uniform"] else ""
        # the best uniform-type file of no greater size (a smaller uniform type can beat the rung's own)
        best = min((u for u in rows if u["budget_bytes"] <= r["budget_bytes"]), key=lambda u: u["uniform_coa_ppl"])
        r["best_uniform"] = f"{best['rung']} {best['uniform_coa_ppl']:.3f}"
        r["gain_vs_best_uniform_pct"] = round(100 * (1 - r["searched_coa_ppl"] / best["uniform_coa_ppl"]), 2)
    wins = sum(r["searched_coa_ppl"] < r["uniform_coa_ppl"] for r in rows)
    wins_best = sum(r["gain_vs_best_uniform_pct"] > 0 for r in rows)
    ties = sum(r["searched_same_as_uniform"] for r in rows)
    payload["wins"], payload["wins_vs_best_uniform"], payload["ties"] = wins, wins_best, ties
    cols = [("rung", "uniform type"), ("budget_bytes", "budget = uniform file bytes"), ("uniform_bpw", "bpw"),
            ("uniform_generated_ppl", "uniform + generated"), ("uniform_shared_ppl", "uniform + shared"),
            ("searched_bytes", "searched file bytes"), ("searched_bpw", "searched bpw"),
            ("searched_adapter", "searched adapter"), ("searched_coa_ppl", "searched + its adapter"),
            ("coa_gain_pct", "gain vs the better uniform %"), ("best_uniform", "best uniform file <= budget"),
            ("gain_vs_best_uniform_pct", "gain vs it %"), ("same", "search kept the uniform file"),
            ("searched_source", "search source"), ("search_s", "search s")]
    top = f" ({payload['top_bytes']:,} bytes)" if "top_bytes" in payload else ""
    wall = (f" Wall time {payload['wall_s']:.0f} s" + (" (this invocation's rungs)." if any(r.get("kept_from")
            for r in rows) else ".")) if "wall_s" in payload else ""
    imx = " with its importance matrix" if payload.get("imatrix_sha256") else ""
    partial = payload.get("rungs_measured", len(rows)) < payload.get("rungs", len(rows))
    measured = "measured " if partial else ""
    note = f" {payload['note']}" if payload.get("note") else ""
    if partial:
        note += f" {payload['rungs_measured']} of the {payload['rungs']} rungs below the top measured (`--rungs`)."
    earlier: dict[tuple, list[str]] = {}
    for r in rows:
        if r.get("kept_from"):
            k = r["kept_from"]
            earlier.setdefault((k["commit"][:10], k["date"], k.get("dirty")), []).append(r["rung"])
    for (commit, date, dirty), names in earlier.items():
        changes = " with uncommitted changes" if dirty else ""
        note += f" Rungs {', '.join(names)}: kept from the result of commit {commit}{changes} ({date}; `--merge`)."
    md = (f"Run {payload['run']}{imx}; {payload['windows']} windows x 512 tokens of Pride and Prejudice; "
          f"perplexity by llama.cpp; search as `coalora search --confirm {payload['confirm']}` on "
          f"{payload.get('confirm_windows', 4)} held-out windows of the training text.{note}\n\n"
          + markdown_table(rows, cols)
          + f"\n\nThe searched file + its adapter has lower perplexity than the uniform file + the better of its two "
            f"adapters at {wins} of {len(rows)} budgets, and than the best {measured}uniform-type file of no greater "
            f"size at {wins_best}; at {ties} the search kept the uniform configuration itself. The top "
            f"rung, {payload['top_rung']}{top}, is the largest configuration of the menu, so no other "
            f"configuration fits its budget.{wall}")
    write_results("ladder", payload, md)
    plot(rows, RESULTS / "ladder.png")


def plot(rows, path: Path) -> None:
    def draw(ax):
        ax.plot([r["uniform_bpw"] for r in rows], [r["uniform_coa_ppl"] for r in rows], "s--",
                label="uniform type + the better adapter")
        ax.plot([r["searched_bpw"] for r in rows], [r["searched_coa_ppl"] for r in rows], "o-",
                label="searched mix + its adapter")
        for r in rows:
            ax.annotate(r["rung"], (r["uniform_bpw"], r["uniform_coa_ppl"]), fontsize=7, xytext=(3, 3),
                        textcoords="offset points")

    # log scale: the Q2_K rung is far above the rest
    perplexity_plot(path, "SmolLM2-135M: searched vs uniform at equal file size", draw, log_y=True)


if __name__ == "__main__":
    main()
