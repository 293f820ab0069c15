"""Importance-matrix quantization on SmolLM2: llama.cpp perplexity of uniform files with and without an imatrix.

Protocol:
- Model: SmolLM2-135M-Instruct dequantized to F32 (as bench/quality.py). Importance matrix: `coalora imatrix`
  over the five training novels (--chunks x 512 tokens).
- For each type, the uniform configuration (llama.cpp's row fallbacks: on SmolLM2 the 256-block types only fit
  the 1536-wide ffn_down; Q2_K / Q3_K fall back to Q4_0 elsewhere, the IQ types to IQ4_NL) is written by
  `coalora convert --type T`, once without and once with `--imatrix` (the IQ1-IQ3 types only with it).
- TQ1_0 / TQ2_0 (ternary types, not in coalora's catalogue) are made by llama_model_quantize (pure), without an
  imatrix (ggml's ternary quantizers ignore one), to say whether they make sense for a non-ternary model.
- Perplexity by llama.cpp on the first --windows windows of 512 tokens of Pride and Prejudice (held out), without
  adapter and, with --adapter RUN (a trained full-precision LoRA run, e.g. bench/quality.py's runs/fp), with
  that run's F32 adapter.
Writes bench/results/imatrix.{md,json}; `--ternary-errors` only the weight errors of TQ1_0 / TQ2_0 against the
low-bit types (bench/results/imatrix_ternary.{md,json}).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import RESULTS, cli, markdown_table, provenance, write_results  # noqa: E402
from bench.quality import Evaluator  # noqa: E402

TYPES = ("Q4_0", "IQ4_NL", "Q3_K", "Q2_K", "IQ3_S", "IQ3_XXS", "IQ2_S", "IQ2_XS", "IQ2_XXS", "IQ1_M", "IQ1_S")
TERNARY = {"TQ1_0": 36, "TQ2_0": 37}  # llama_ftype


def ternary_errors() -> None:
    """Relative RMS weight error of TQ1_0 / TQ2_0 against the catalogue's low-bit types on SmolLM2's ffn_down
    matrices (the only ones their 256-blocks fit): bench/results/imatrix_ternary.{md,json}."""
    import numpy as np

    from converters import ggml_quant
    from converters.gguf_source import open_source
    from converters.quant_types import _make
    from toolkit import assets

    src = open_source(assets.smollm2_path())
    rows = []
    for name in ("blk.5.ffn_down.weight", "blk.20.ffn_down.weight"):
        w = src.weight(name)
        for q in ("Q4_0", "Q3_K", "Q2_K", "IQ2_XXS", "IQ1_S", "TQ2_0", "TQ1_0"):
            qt = _make(q)
            ones = np.ones(w.shape[1], np.float32) if qt.needs_imatrix else None  # uniform importance
            deq = ggml_quant.to_float(ggml_quant.quantize(w, qt, ones), int(qt.ggml), w.shape)
            rows.append({"tensor": name, "type": q, "bpw": round(qt.bits_per_weight, 3),
                         "rel_rms_error": round(float(np.sqrt(((w - deq) ** 2).mean() / (w ** 2).mean())), 4)})
    note = ("Relative RMS error ||W - deq(q(W))|| / ||W|| of ggml's quantizers on two SmolLM2 ffn_down matrices "
            "(the IQ types with uniform importance). TQ1_0 / TQ2_0 keep a ternary {-1, 0, 1} x scale per 256 "
            "weights: meant for models trained ternary, not for SmolLM2.")
    write_results("imatrix_ternary", {"provenance": provenance(), "protocol": note,
                                      "rows": rows},
                  f"{note}\n\n" + markdown_table(rows, [("tensor", "tensor"), ("type", "type"), ("bpw", "bpw"),
                                                          ("rel_rms_error", "relative RMS error")]))


def main() -> None:
    if sys.argv[1:] == ["--ternary-errors"]:
        return ternary_errors()
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--windows", type=int, default=16)
    ap.add_argument("--chunks", type=int, default=32, help="imatrix chunks of 512 tokens of the training novels")
    ap.add_argument("--types", default=",".join(TYPES))
    ap.add_argument("--adapter", type=Path, help="a trained full-precision LoRA run whose F32 adapter is applied too")
    ap.add_argument("--work", type=Path, default=Path("bench/work/imatrix"))
    ap.add_argument("--resume", action="store_true",
                    help="keep the rows of bench/results/imatrix.json measured with the same windows, chunks, adapter")
    args = ap.parse_args()
    import ctypes

    import llama_cpp

    from converters.quant_types import get
    from toolkit import assets

    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    f32 = work / "f32.gguf"
    if not f32.exists():
        cli("convert", assets.smollm2_path(), "--type", "F32", "-o", f32)
    im = work / "imatrix.gguf"
    if not im.exists():
        print("computing the importance matrix ...", flush=True)
        cli("imatrix", "smollm2", "--data", "austen", "-o", im, "--chunks", args.chunks, "--seq-len", 512, "--json")
    adapters = [None]
    if args.adapter:
        adapter = work / "fp-adapter.gguf"
        if not adapter.exists():
            cli("adapter", args.adapter, "--config", "F32", "-o", adapter, "--json")
        adapters.append(adapter)
    ev = Evaluator(f32, args.windows, 512)
    rows, earlier = [], None
    old = RESULTS / "imatrix.json"
    if args.resume and old.exists():  # keep the rows an earlier run of the same protocol measured
        prev = json.loads(old.read_text())
        cmd = prev["provenance"]["command"].split()
        adapter = prev.get("adapter", cmd[cmd.index("--adapter") + 1] if "--adapter" in cmd else "")
        if (prev.get("windows"), prev.get("chunks"), adapter) == (args.windows, args.chunks, str(args.adapter or "")):
            rows = prev["rows"]
            earlier = prev.get("earlier_rows_provenance") or prev["provenance"]
    done = {(r["type"], r["imatrix"]) for r in rows}

    def measure(qname, with_imatrix, model):
        from converters.gguf_inspect import inspect_gguf
        if (qname, "yes" if with_imatrix else "no") in done:
            return
        ppl = ev.ppl(model, adapters)
        info = inspect_gguf(model)
        rows.append({"type": qname, "imatrix": "yes" if with_imatrix else "no", "file_bytes": model.stat().st_size,
                     "bpw": round(info["bits_per_weight_quantized"], 3),
                     "types": ", ".join(f"{k} x{v}" for k, v in info["types"].items() if k != "F32"),
                     "ppl": round(ppl[0], 3), "ppl_adapter": round(ppl[1], 3) if len(ppl) > 1 else None})
        save()  # after every row: a partial table survives an interrupted run

    def save():
        cols = [("type", "type"), ("imatrix", "imatrix"), ("file_bytes", "file bytes"), ("bpw", "bpw"),
                ("types", "tensor types"), ("ppl", "perplexity, no adapter")]
        if args.adapter:
            cols.append(("ppl_adapter", "perplexity + full-precision LoRA"))
        base = {r["type"]: r for r in rows if r["imatrix"] == "no"}
        better = [q for q in base if any(r["type"] == q and r["imatrix"] == "yes" and r["ppl"] < base[q]["ppl"]
                                         for r in rows)]
        note = (f"SmolLM2-135M-Instruct; imatrix from {args.chunks} x 512 tokens of the five training novels "
                f"(`coalora imatrix`); perplexity by llama.cpp on {args.windows} x 512 tokens of Pride and Prejudice. "
                f"With the imatrix, perplexity is lower for: {', '.join(better) or 'none'}.")
        write_results("imatrix", {"provenance": provenance(), "protocol": note,
                                  "windows": args.windows, "chunks": args.chunks, "adapter": str(args.adapter or ""),
                                  "rows": rows, **({"earlier_rows_provenance": earlier} if earlier else {})},
                      f"{note}\n\n{markdown_table(rows, cols)}\n")

    for qname in args.types.split(","):
        for with_im in (False, True):
            if get(qname).needs_imatrix and not with_im:
                continue
            out = work / f"{qname}{'-imatrix' if with_im else ''}.gguf"
            if not out.exists():
                cli("convert", f32, "--type", qname, "-o", out, *(["--imatrix", im] if with_im else []))
            measure(qname, with_im, out)
    for qname, ftype in TERNARY.items():
        out = work / f"{qname}.gguf"
        if not out.exists():
            p = llama_cpp.llama_model_quantize_default_params()
            p.ftype, p.pure, p.nthread = ftype, True, 2
            if llama_cpp.llama_model_quantize(str(f32).encode(), str(out).encode(), ctypes.byref(p)) != 0:
                sys.exit(f"llama_model_quantize {qname} failed")
        measure(qname, False, out)


if __name__ == "__main__":
    main()
