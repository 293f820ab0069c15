"""The quality goal with importance matrices (issue 17): coalora against what GGUF users download today.

Protocol (--model, by default SmolLM2-135M-Instruct dequantized to F32; bench/float_model.py makes one trained in
float; the five training novels; held-out Pride and Prejudice):
- Baseline, what users have: llama.cpp's stock file types made by llama.cpp's own `llama_model_quantize`
  (its per-tensor mixes, e.g. Q4_K_M) with the importance matrix of the CoA-LoRA run (computed by
  `coalora train` from the same training text), plus a full-precision LoRA: `coalora finetune --config F32`
  with the same steps, batch, sequence length and rank. The same files without the imatrix are measured too.
- Below about 5 bits per weight llama.cpp has no stock mix for SmolLM2 (its 576-wide rows fall back to 32-block
  types), so the baselines there are llama.cpp's pure files (`--pure`: one type for every tensor, with llama.cpp's
  row fallbacks), made the same way with the imatrix.
- coalora: for each baseline file's byte size as the budget, `coalora search RUN --budget-bytes SIZE --confirm 3`
  over the CoA-LoRA run (`coalora train`'s defaults: the anchored recipe, the imatrix), the mix written by
  `coalora convert --recipe CFG --imatrix RUN/imatrix.gguf`, with the adapter `coalora adapter` writes for it
  (generated for the mix, or the run's shared LoRA where the confirmation measured the generated one no better).
- `--reuse`: rows of the previous result (same run by content: weights and imatrix; same windows) are kept (their
  provenance is recorded) when their model and adapter files are the same bytes (sha256); the coalora adapter rows
  are always measured again. Budgets of the previous result that this invocation has not measured (`--files` does
  not name them, or it has not reached them yet) are kept whole, with the provenance of the run that measured them.
- Floor: the F32 model with the full-precision LoRA.
- Perplexity by llama.cpp (F32 KV cache) on the first --windows windows of 512 tokens of Pride and Prejudice.
- `--data TEXTS --hold-out F`: the LoRAs and the imatrix learn the --data texts without their last fraction F
  (cut at a paragraph), and perplexity is measured on that last part instead: for a model that was trained on
  the novels, a text it has not seen and a LoRA has something to learn from (a LoRA fine-tuned on one novel makes
  another worse).
Writes bench/results/imatrix_quality.{md,json} (--name NAME: NAME.{md,json}).

    python bench/imatrix_quality.py --coa-run coalora-demo/run    # reuse a trained run (e.g. the demo's)
    python bench/imatrix_quality.py --report-only --windows 16     # rewrite the markdown from the JSON
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import RESULTS, cli, llama_quantize, markdown_table, run_fingerprint, write_results  # noqa: E402
from bench.quality import Evaluator  # noqa: E402
from converters.llama_mixes import NEEDS_IMATRIX  # noqa: E402
from converters.quant_types import get  # noqa: E402

# llama.cpp file types from about 8.5 down to about 3.5 bits per weight (on SmolLM2's 576-wide rows the
# 256-block types fall back on most matrices, so the measured bits per weight are in the table)
STOCK = ("Q8_0", "Q6_K", "Q5_K_M", "Q4_K_M", "IQ4_XS", "Q4_0", "Q3_K_M", "IQ3_M")
# llama.cpp's pure files (file types: IQ2_S's tensors are IQ2_XS): 4.5, 4.29, 4.07 bpw
PURE = ("IQ4_NL", "IQ3_S", "IQ2_S")


FLOOR = "F32 + full-precision LoRA (floor)"
BASELINE = "stock + imatrix + full-precision LoRA (baseline)"
COALORA = "coalora: searched mix + imatrix + its adapter"
MIX_ONLY = "coalora: searched mix + imatrix, no adapter"
OTHER = "coalora: searched mix + imatrix + the adapter not picked"


def _texts(data: str) -> list[str]:
    """``--data``'s texts as `coalora train --data` takes them: a novel's name becomes its file."""
    from toolkit import assets

    return [str(assets.require_novels([d])[0]) if d in assets.NOVELS else d for d in data.split(",") if d]


def _hold_out(texts: list[str], fraction: float, work: Path) -> tuple[list[str], Path]:
    """``texts`` joined and cut at the paragraph break nearest to the last ``fraction``: the first part as the
    training file, the last as the evaluation file (both in ``work``)."""
    whole = "\n\n".join(Path(t).read_text(encoding="utf-8") for t in texts)
    cut = int(len(whole) * (1 - fraction))
    cut = max(whole.rfind("\n\n", 0, cut), 0) or cut
    train, held = work / "hold-out-train.txt", work / "hold-out-eval.txt"
    train.write_text(whole[:cut], encoding="utf-8")
    held.write_text(whole[cut:].lstrip("\n"), encoding="utf-8")
    return [str(train)], held


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--coa-run", type=Path, help="a trained `coalora train` run with an imatrix (default: train one)")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--windows", type=int, default=32)
    ap.add_argument("--files", default=",".join([*STOCK, *(f"pure:{t}" for t in PURE)]),
                    help="the baseline files, in the order measured: llama.cpp file types, pure:TYPE for a pure one")
    ap.add_argument("--reuse", action="store_true", help="keep unchanged rows of the previous result")
    ap.add_argument("--work", type=Path, default=Path("bench/work/imatrix_quality"))
    ap.add_argument("--note", default="", help="A sentence about the run, added to the result.")
    ap.add_argument("--model", default="smollm2",
                    help="the model (a GGUF or Hugging Face folder, or smollm2): trained, converted, measured")
    ap.add_argument("--label", default="SmolLM2-135M", help="the model's name in the result's text")
    ap.add_argument("--name", default="imatrix_quality", help="result file name (NAME.json, NAME.md)")
    ap.add_argument("--data", default="austen",
                    help="the training text of both LoRAs and of the imatrix, comma-separated: files or "
                         "novel names (default: austen, the five training novels)")
    ap.add_argument("--hold-out", type=float, default=0.0,
                    help="measure on the last fraction of the --data texts, which the LoRAs do not train on "
                         "(default 0: on Pride and Prejudice)")
    ap.add_argument("--report-only", action="store_true", help="rewrite the markdown from imatrix_quality.json")
    args = ap.parse_args()
    if not 0 <= args.hold_out < 1:
        ap.error("--hold-out is a fraction in [0, 1)")
    if args.report_only:
        data = json.loads((RESULTS / f"{args.name}.json").read_text())
        data.setdefault("windows", args.windows)
        data.setdefault("note", args.note)
        return write_results(args.name, data, report(data))
    from converters import imatrix as imx
    from converters.gguf_inspect import inspect_gguf
    from toolkit import assets

    model = assets.resolve_model(args.model)
    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    texts, eval_text = _texts(args.data), None
    if args.hold_out:
        texts, eval_text = _hold_out(texts, args.hold_out, work)
    data = [a for d in texts for a in ("--data", d)]
    train = ["--steps", args.steps, "--seq-len", args.seq_len, "--batch", args.batch, *data]
    coa = args.coa_run or work / "coa"
    if not (coa / "run.json").exists():
        cli("train", model, "-o", coa, *train, "--json")
    meta = json.loads((coa / "run.json").read_text())
    o = meta["options"]
    if (o["steps"], o["seq_len"], o["batch"]) != (args.steps, args.seq_len, args.batch):
        sys.exit(f"{coa} was trained with steps/seq-len/batch {o['steps']}/{o['seq_len']}/{o['batch']}; "
                 f"pass those or another --coa-run")
    imatrix = coa / "imatrix.gguf"
    if not imatrix.exists():
        sys.exit(f"{coa} has no importance matrix (trained with --no-imatrix)")
    fp = work / "fp"
    if not (fp / "run.json").exists():
        cli("finetune", model, "--config", "F32", "-o", fp, *train, "--rank", o["rank"], "--no-imatrix", "--json")
    fp_adapter = work / "fp-adapter.gguf"
    if not fp_adapter.exists():
        cli("adapter", fp, "--config", "F32", "-o", fp_adapter, "--json")

    f32 = work / "f32.gguf"
    if not f32.exists():
        cli("convert", model, "--type", "F32", "-o", f32)
    ev = Evaluator(f32, args.windows, 512, text=eval_text)
    prev, earlier, kept = {}, None, None
    old = RESULTS / f"{args.name}.json"
    fingerprint = run_fingerprint(coa)
    if args.reuse and old.exists():
        d = json.loads(old.read_text())
        if (d.get("coa_run_sha256"), d.get("windows")) != (fingerprint, args.windows):
            sys.exit(f"--reuse: {old} was measured on another run or with other windows; measure without --reuse")
        prev = {(r.get("stock"), r["method"]): r for r in d["rows"]}
        earlier = d.get("earlier_provenance") or d["provenance"]
        # budgets this invocation has not measured (not asked for, or not reached yet) stay whole, with the
        # provenance of the run that measured them: an interrupted run still writes every budget
        groups = d.get("kept_budgets") or []  # budgets that result kept from earlier ones, and its own
        own = [g["stock"] for g in d["goal"] if not any(g["stock"] in k["stocks"] for k in groups)]
        groups = [*groups, {"stocks": own, "provenance": d["provenance"],
                            "earlier_provenance": d.get("earlier_provenance")}]
        kept = {"goal": d["goal"], "rows": [{**r, "reused": True} for r in d["rows"] if r.get("stock")],
                "groups": [k for k in groups if k["stocks"]]}

    def hashes(model, adapter):  # the evaluator hashes each file once per path, size and mtime
        return {"file_sha256": ev.sha256(model), "adapter_sha256": ev.sha256(adapter) if adapter else None}

    def measured(stock, method, model, adapter):
        """The previous result's perplexity of this row, if its model and adapter files are the same bytes."""
        r = prev.get((stock, method))
        return r["ppl"] if r and all(r.get(k) == v for k, v in hashes(model, adapter).items()) else None

    floor = measured(None, FLOOR, f32, fp_adapter) or ev.ppl(f32, [None, fp_adapter])[1]
    rows = [{"method": FLOOR, "file_bytes": f32.stat().st_size,
             "bpw": inspect_gguf(f32)["bits_per_weight"], "ppl": floor, **hashes(f32, fp_adapter)}]

    def row(stock, method, model, ppl, adapter, reused=False):
        rows.append({"stock": stock, "method": method, "file_bytes": model.stat().st_size,
                     "bpw": inspect_gguf(model)["bits_per_weight"], "ppl": ppl, "reused": reused,
                     **hashes(model, adapter)})
        print(f"  {stock:12s} {method:52s} {model.stat().st_size:>12,d} B  ppl {ppl:.3f}"
              + (" (previous result)" if reused else ""), flush=True)
        return rows[-1]

    def ppl(stock, methods, model, adapters):
        """Rows for one model file and several adapters, reusing unchanged previous rows."""
        got = [measured(stock, m, model, a) for m, a in zip(methods, adapters)]
        todo = [i for i, v in enumerate(got) if v is None]
        if todo:
            for i, v in zip(todo, ev.ppl(model, [adapters[i] for i in todo])):
                got[i] = v
        return [row(stock, m, model, v, adapters[i], reused=i not in todo)
                for i, (m, v) in enumerate(zip(methods, got))]

    goal = []
    kinds = [(t.removeprefix("pure:"), t.startswith("pure:")) for t in args.files.split(",") if t]
    skipped, importance = [], imx.load(imatrix)
    for t, pure in kinds:
        name = f"{t} pure" if pure else t
        uncovered = _pure_file_aborts(f32, importance, get(t)) if pure and get(t).needs_imatrix_entry else []
        if uncovered:  # llama.cpp aborts the process there (GGML_ASSERT(imatrix != NULL) in ggml_quantize_chunk)
            why = (f"llama.cpp's pure {t} file cannot be made: {', '.join(uncovered)} would take a type that needs "
                   f"an importance matrix, which has no entry for them, and llama_model_quantize aborts")
            print(f"  {name:12s} skipped: {why}", flush=True)
            skipped.append({"stock": name, "why": why})
            save(coa, fingerprint, o, args, model, floor, goal, rows, earlier, kept, skipped)
            continue
        stem = f"pure-{t}" if pure else f"stock-{t}"
        plain, with_im = work / f"{stem}.gguf", work / f"{stem}-imatrix.gguf"
        plain_ok = t not in NEEDS_IMATRIX  # llama.cpp refuses those without an importance matrix
        for path, im in ((plain, None), (with_im, importance)):
            if not path.exists() and (im is not None or plain_ok):
                llama_quantize(f32, path, t, imatrix=im, pure=pure)
        (plain_row,) = ppl(name, ["stock + full-precision LoRA"], plain, [fp_adapter]) if plain_ok else (None,)
        _, base = ppl(name, ["stock + imatrix, no adapter", BASELINE], with_im, [None, fp_adapter])

        budget = with_im.stat().st_size
        cfg, mixed, adapter = (work / f"cfg-{stem}.json", work / f"coalora-{stem}.gguf",
                               work / f"coalora-{stem}-adapter.gguf")
        new = cfg.with_suffix(".new.json")
        cli("search", coa, "--budget-bytes", budget, "--confirm", 3, "-o", new, "--json")
        if not cfg.exists() or json.loads(cfg.read_text())["types"] != json.loads(new.read_text())["types"]:
            mixed.unlink(missing_ok=True)  # another mix: written and measured again
            prev.pop((name, MIX_ONLY), None)
        new.replace(cfg)
        picked = json.loads(cfg.read_text())
        kind = picked["adapter"]
        if not mixed.exists():
            cli("convert", model, "--recipe", cfg, "--imatrix", imatrix, "-o", mixed)
        other_kind = "generated" if kind == "shared" else "shared"
        other = work / f"coalora-{stem}-{other_kind}.gguf"  # the adapter the confirmation did not pick
        cli("adapter", coa, "--config", cfg, "-o", adapter, "--json")
        cli("adapter", coa, "--config", cfg, "-o", other, f"--{other_kind}", "--json")
        for m in (COALORA, OTHER):  # the adapters may have changed: always measured
            prev.pop((name, m), None)
        _, ours, theirs = ppl(name, [MIX_ONLY, COALORA, OTHER], mixed, [None, adapter, other])
        ours["adapter"], theirs["adapter"] = kind, other_kind
        p_base, q_coa = base["ppl"], ours["ppl"]
        goal.append({"stock": name, "budget_bytes": budget, "baseline_bpw": base["bpw"], "baseline_ppl": p_base,
                     "coalora_bytes": ours["file_bytes"], "coalora_bpw": ours["bpw"], "coalora_ppl": q_coa,
                     "coalora_adapter": kind, "other_adapter_ppl": theirs["ppl"],
                     "coalora_vs_baseline": q_coa / p_base - 1, "coalora_gap_to_floor": q_coa / floor - 1,
                     "imatrix_helps_with_adapter": None if plain_row is None else p_base < plain_row["ppl"],
                     "wins": q_coa < p_base and ours["file_bytes"] <= budget,
                     "confirmation": confirmation_summary(picked.get("confirmation"))})
        # after every budget: an interrupted run keeps its rows
        save(coa, fingerprint, o, args, model, floor, goal, rows, earlier, kept, skipped)


def _pure_file_aborts(f32: Path, importance, qtype) -> list[str]:
    """The weight matrices a pure file of ``qtype`` (one that needs importance data per tensor) would give that type
    (rows it fits, llama.cpp's fallback rule) although the imatrix has no entry for them: the token embedding, and
    the output head, which llama-imatrix skips by default. llama.cpp then aborts instead of failing."""
    from gguf import GGUFReader

    covered = set(importance.names())
    return sorted(t.name for t in GGUFReader(f32).tensors if len(t.shape) >= 2 and t.name.endswith(".weight")
                  and t.name not in covered and qtype.fits_row(int(t.shape[0])))


def confirmation_summary(conf: dict | None) -> dict | None:
    """What the search's confirmation measured on the training text for its pick and for the largest llama.cpp file
    (loss and KL divergence from F32 with the shared LoRA, each with the adapter it ships and with its paired
    difference to the file's)."""
    if not conf:
        return None
    keys = ("source", "file_bytes", "adapter", "measured_loss", "vs_uniform", "vs_uniform_se", "kl", "kl_vs_uniform",
            "kl_vs_uniform_se", "fidelity")

    def pick(row: dict) -> dict:
        return {k: row[k] for k in keys if k in row}

    return {"windows": conf["windows"], "min_gain": conf.get("min_gain"), "fidelity_share": conf.get("fidelity_share"),
            "picked": next((pick(r) for r in conf["candidates"] if r.get("picked")), None),
            "largest_llama_file": next((pick(r) for r in conf["candidates"] if r.get("uniform")), None)}


def save(coa, fingerprint, o, args, model, floor, goal, rows, earlier, kept=None, skipped=()) -> None:
    done = {g["stock"] for g in goal}
    if kept:  # the previous result's budgets this invocation has not measured
        groups = [{**k, "stocks": [t for t in k["stocks"] if t not in done]} for k in kept["groups"]]
        kept = {"goal": [g for g in kept["goal"] if g["stock"] not in done],
                "rows": [r for r in kept["rows"] if r["stock"] not in done],
                "groups": [k for k in groups if k["stocks"]]}
        goal, rows = sorted(goal + kept["goal"], key=lambda g: -g["budget_bytes"]), rows + kept["rows"]
    for r in rows:
        r["gap_to_floor"] = r["ppl"] / floor - 1
    data = {"model": str(model), "model_label": args.label, "coa_run": str(coa), "coa_run_sha256": fingerprint,
            "options": o, "data": args.data, "hold_out": args.hold_out, "windows": args.windows, "note": args.note,
            "floor": floor, "goal": goal, "rows": rows}
    if any(r.get("reused") for r in rows):
        data["earlier_provenance"] = earlier  # where the rows marked reused were measured
    if kept:
        data["kept_budgets"] = kept["groups"]
    if skipped:
        data["skipped"] = list(skipped)
    write_results(args.name, data, report(data))


def _trained_on(data: dict) -> str:
    """The training text named in the report, where it is not the five training novels."""
    texts, f = data.get("data", "austen"), data.get("hold_out") or 0
    return ("" if texts == "austen" and not f else f"; both LoRAs and the imatrix trained on "
            f"{texts.replace(',', ', ')}" + (f" without its last {100 * f:g}%" if f else ""))


def _measured_on(data: dict) -> str:
    f = data.get("hold_out") or 0
    return (f"the last {100 * f:g}% of {data['data'].replace(',', ', ')}, which the LoRAs did not train on" if f
            else "Pride and Prejudice")


def report(data: dict) -> str:
    """The markdown of a result: the goal per budget, then every row. Adds the ratios as percentages to ``data``
    (the README's numbers must be in the result file)."""
    o, floor = data["options"], data["floor"]
    for g in data["goal"]:
        g["coalora_vs_baseline_pct"] = round(100 * g["coalora_vs_baseline"], 2)
        g["coalora_gap_to_floor_pct"] = round(100 * g["coalora_gap_to_floor"], 2)
    for r in data["rows"]:
        r["gap_to_floor_pct"] = round(100 * r["gap_to_floor"], 2)
    goal = [{**g, "wins": "yes" if g["wins"] else "no", "coalora_adapter": g.get("coalora_adapter", "generated")}
            for g in data["goal"]]
    rows = [{**r, "reused": "yes" if r.get("reused") else "",
             "method": r["method"] + (f" ({r['adapter']})" if r.get("adapter") else "")} for r in data["rows"]]
    return (f"{data.get('model_label', 'SmolLM2-135M')}; CoA-LoRA run `{Path(data['coa_run']).name}` "
            f"({o['steps']} steps x {o['batch']} x {o['seq_len']} tokens, rank {o['rank']}, recipe options as trained, "
            f"imatrix from its training text{_trained_on(data)}); "
            f"full-precision LoRA with the same steps; llama.cpp perplexity on {data['windows']} x 512 tokens of "
            f"{_measured_on(data)}. Floor (F32 + full-precision LoRA): {floor:.3f}."
            + (f" {data['note']}" if data.get("note") else "")
            + "".join(f" Budgets {', '.join(k['stocks'])}: kept from the result of commit "
                      f"{k['provenance']['commit'][:7]} (not measured again)." for k in data.get("kept_budgets") or [])
            + "".join(f" {k['stock']}: skipped ({k['why']})." for k in data.get("skipped") or [])
            + "\n\n"
            + markdown_table(goal, [("stock", "stock type"), ("budget_bytes", "budget = stock+imatrix bytes"),
                                    ("baseline_bpw", "stock bpw"), ("baseline_ppl", "stock + imatrix + fp LoRA"),
                                    ("coalora_bytes", "coalora bytes"), ("coalora_bpw", "coalora bpw"),
                                    ("coalora_adapter", "coalora adapter"), ("coalora_ppl", "coalora + adapter"),
                                    ("other_adapter_ppl", "with the adapter not picked"),
                                    ("coalora_vs_baseline_pct", "coalora vs stock %"),
                                    ("coalora_gap_to_floor_pct", "coalora gap to floor %"), ("wins", "coalora wins")])
            + "\n\nEvery row:\n\n"
            + markdown_table(rows, [("stock", "stock type"), ("method", "method"), ("file_bytes", "file bytes"),
                                    ("bpw", "bpw"), ("ppl", "perplexity"), ("gap_to_floor_pct", "gap to floor %"),
                                    ("reused", "from the previous result")]))


if __name__ == "__main__":
    main()
