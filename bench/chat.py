"""Benchmark: CoA-LoRA on chat data, scored on held-out answers with SmolLM2's chat template.

The chat data is built reproducibly from the Austen novels (public domain; ``toolkit.assets.austen_chats``):
paragraphs holding quoted speech, in order, are conversation turns; the quoted words of four consecutive such
paragraphs make one conversation (user, assistant, user, assistant), stride four. The five training novels give the training chats, *Pride
and Prejudice* the held-out ones. Training: `coalora train --mode coa` (its defaults: the anchored recipe and an
importance matrix from the training chats) and the full-precision LoRA (`coalora finetune --config F32`), same
steps / batch / sequence length, loss on the assistant turns only. Evaluation: llama.cpp (CPU, F32 KV cache)
perplexity of the held-out chats' answer tokens, with the GGUF's chat template applied (what `coalora validate
--data held.jsonl` measures), per budget: the searched mix (quantized with the run's importance matrix) without
adapter, llama.cpp's stock file of that size with the full-precision LoRA, the same made with the run's importance
matrix (`llama-quantize --imatrix`) with that LoRA, the searched mix with its CoA-LoRA generated adapter and
with the adapter the search's confirmation kept (the generated one or the run's shared LoRA).

    .venv/bin/python bench/chat.py [--steps 60] [--budgets Q8_0,Q5_0]
Writes bench/results/chat.{md,json}.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import cli, markdown_table, provenance, write_results  # noqa: E402
from bench.common import llama_quantize, stock_with_imatrix  # noqa: E402
from bench.quality import Evaluator  # noqa: E402


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--held-out", type=int, default=64, help="Held-out conversations scored.")
    ap.add_argument("--budgets", default="Q8_0,Q5_0", help="Stock types whose file sizes are the budgets.")
    ap.add_argument("--work", type=Path, default=Path("bench/work/chat"))
    args = ap.parse_args()
    from converters.configuration import Configuration
    from toolkit import assets
    from toolkit.emit import eval_set

    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    train_rows = [c for n in assets.TRAIN_NOVELS for c in assets.austen_chats(n)]
    held_rows = assets.austen_chats(assets.EVAL_NOVEL)
    train_file = write_jsonl(work / "austen-chats-train.jsonl", train_rows)
    held_file = write_jsonl(work / "austen-chats-held-out.jsonl", held_rows)
    print(f"{len(train_rows)} training chats, {len(held_rows)} held-out chats", flush=True)

    common = ["--data", train_file, "--steps", args.steps, "--seq-len", args.seq_len, "--batch", args.batch, "--json"]
    runs = {}
    for name, cmd in (("fp", ["finetune", "smollm2", "--config", "F32"]), ("coa", ["train", "smollm2", "--mode", "coa"])):
        out = work / "runs" / name
        if not (out / "run.json").exists() or json.loads((out / "run.json").read_text()).get("status") != "trained":
            summary, wall = cli(*cmd, "-o", out, *common)
            print(f"  trained {name} in {wall:.0f} s: {summary['data']}", flush=True)
        runs[name] = json.loads((out / "run.json").read_text())

    f32 = work / "f32.gguf"
    if not f32.exists():
        cli("convert", assets.smollm2_path(), "--type", "F32", "-o", f32)
    fp_adapter = work / "fp-adapter.gguf"
    if not fp_adapter.exists():
        cli("adapter", work / "runs" / "fp", "--config", "F32", "-o", fp_adapter)
    windows, masks, *_ = eval_set(f32, held_file, args.held_out, args.seq_len)
    ev = Evaluator(f32, len(windows), args.seq_len, windows, masks)

    def ppl(model: Path, adapter: Path | None) -> float:
        return ev.ppl(model, [adapter])[0]

    rows = [{"budget": "", "method": "F32, no adapter", "file_bytes": f32.stat().st_size, "ppl": ppl(f32, None)},
            {"budget": "", "method": "F32 + full-precision LoRA (floor)", "file_bytes": f32.stat().st_size,
             "ppl": ppl(f32, fp_adapter)}]
    coa_run = work / "runs" / "coa"
    imatrix = coa_run / "imatrix.gguf" if runs["coa"].get("imatrix_sha256") else None
    with_imatrix = ("--imatrix", imatrix) if imatrix is not None else ()
    for t in [b for b in args.budgets.split(",") if b]:
        stock = work / f"stock-{t}.gguf"
        if not stock.exists():
            llama_quantize(f32, stock, t)
        budget = stock.stat().st_size
        cfg_path, mixed = work / f"cfg-{t}.json", work / f"mixed-{t}.gguf"
        if not cfg_path.exists():
            cli("search", coa_run, "--budget-bytes", budget, "--confirm", 3, "-o", cfg_path, "--json")
        if not mixed.exists():
            cli("convert", assets.smollm2_path(), "--recipe", cfg_path, *with_imatrix, "-o", mixed)
        adapters = {}
        for kind in ("generated", "shared"):
            adapters[kind] = work / f"coa-{t}-{kind}.gguf"
            if not adapters[kind].exists():
                cli("adapter", coa_run, "--config", cfg_path, f"--{kind}", "-o", adapters[kind])
        kept = json.loads(cfg_path.read_text()).get("adapter") or "generated"
        label = f"<= {t} size ({budget:,} B)"
        hist = ", ".join(f"{k} x{v}" for k, v in Configuration.load(cfg_path).histogram().items())
        mix_ppl = dict(zip((None, "generated", "shared"), ev.ppl(mixed, [None, adapters["generated"],
                                                                          adapters["shared"]])))
        n = len(rows)
        rows += [{"budget": label, "method": "searched mix, no adapter", "file_bytes": mixed.stat().st_size,
                  "ppl": mix_ppl[None], "mix": hist},
                 {"budget": label, "method": f"stock {t} + full-precision LoRA", "file_bytes": budget,
                  "ppl": ppl(stock, fp_adapter)}]
        if imatrix is not None:
            stock_im = stock_with_imatrix(f32, work / f"stock-{t}-imatrix.gguf", t, imatrix)
            rows.append({"budget": label, "method": f"stock {t} + imatrix + full-precision LoRA",
                         "file_bytes": stock_im.stat().st_size, "ppl": ppl(stock_im, fp_adapter)})
        rows += [{"budget": label, "method": "searched mix + CoA-LoRA generated adapter",
                  "file_bytes": mixed.stat().st_size, "ppl": mix_ppl["generated"], "mix": hist},
                 {"budget": label, "method": f"searched mix + the adapter the confirmation kept ({kept})",
                  "file_bytes": mixed.stat().st_size, "ppl": mix_ppl[kept], "mix": hist}]
        print("  " + "  ".join(f"{r['method']}: {r['ppl']:.3f}" for r in rows[n:]), flush=True)
    for r in rows:
        r["ppl"] = round(r["ppl"], 4)
    cols = [("budget", "budget"), ("method", "method"), ("file_bytes", "file bytes"),
            ("ppl", "answer perplexity (llama.cpp)"), ("mix", "searched types")]
    data = runs["coa"]["data_summary"]
    md = (f"{len(train_rows)} training chats ({data['tokens']:,} tokens, {data['loss_tokens']:,} answer tokens, "
          f"{data['truncated']} truncated to {args.seq_len}), {len(windows)} held-out chats of Pride and Prejudice; "
          f"{args.steps} steps x {args.batch} x {args.seq_len} tokens, rank 8, loss on the answers; perplexity of "
          f"the held-out answer tokens with SmolLM2's chat template, by llama.cpp.\n\n" + markdown_table(rows, cols))
    write_results("chat", {"provenance": provenance(), "protocol": vars(args) | {"work": str(args.work)},
                           "train_chats": len(train_rows), "held_out_chats": len(windows), "data": data,
                           "train_seconds": {k: v.get("train_seconds") for k, v in runs.items()}, "rows": rows}, md)


if __name__ == "__main__":
    main()
