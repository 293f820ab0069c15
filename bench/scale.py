"""Benchmark: how the CPU side grows from SmolLM2-135M to a synthetic 1B-parameter Llama.

For each model, four steps, each in a fresh child process (wall time and peak resident memory of that process):
convert (``coalora convert`` to a K-quant mix), the sensitivity table (ggml round trips of every tensor in every
menu type, tensor by tensor), the search on it (the initial training set and budget allocations, as
``coalora train`` starts), and the quantization cache of that training set (every (tensor, type) pair quantized by
ggml and written to disk, tensor by tensor). The 1B model is bench/convert.py's synthetic Llama (Llama 3.2 1B's
block shapes, random F16 weights written tensor by tensor, SmolLM2's tokenizer). The last columns compare the
two models per parameter.

    .venv/bin/python bench/scale.py [--no-1b] [--keep DIR]
"""
from __future__ import annotations

import argparse
import functools
import json
import math
import os
import platform
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import load_sentence, markdown_table, provenance, write_results  # noqa: E402
from bench.convert import RULES_1B, SYNTH_1B, _child, write_synthetic_llama  # noqa: E402
from toolkit.assets import require_smollm2  # noqa: E402

STEPS = ("convert", "sensitivity", "search", "quant_cache")

# Each step's code runs in a child with SRC, WORK, THREADS and EXTRA (a JSON file for its numbers) defined.
CODE = {
    "convert": "import bench.convert as b\n"
               "plan = b.coalora_convert(SRC, WORK / 'mix.gguf', THREADS, b.RULES_1B)\n"
               "json.dump({'file_bytes': (WORK / 'mix.gguf').stat().st_size}, open(EXTRA, 'w'))\n"
               "(WORK / 'mix.gguf').unlink()",
    "sensitivity": "from bench.scale import source_layout; from toolkit import sensitivity\n"
                   "s, layout = source_layout(SRC)\n"
                   "table = sensitivity.error_table(layout, s.weight, cache=WORK / 'sensitivity.json', progress=True,\n"
                   "                                threads=THREADS)\n"
                   "json.dump({'tensors': len(table), 'round_trips': sum(len(r) for r in table.values())},\n"
                   "          open(EXTRA, 'w'))",
    "search": "from bench.scale import source_layout; from toolkit import sensitivity\n"
              "s, layout = source_layout(SRC)\n"
              "errors = sensitivity.load_error_table(WORK / 'sensitivity.json')\n"
              "lo, hi = sensitivity.byte_range(layout)\n"
              "cfgs = sensitivity.initial_training_set(layout, errors, sensitivity.bpw_of_bytes(layout, lo),\n"
              "                                        sensitivity.bpw_of_bytes(layout, hi))\n"
              "for bpw in (4.5, 5.5, 6.5):\n"
              "    sensitivity.allocate(layout, errors, sensitivity.bytes_for_bpw(layout, bpw))\n"
              "json.dump([c.to_json() for c in cfgs], open(WORK / 'trainset.json', 'w'))\n"
              "json.dump({'training_configurations': len(cfgs)}, open(EXTRA, 'w'))",
    "quant_cache": "from bench.scale import warm_quant_cache\n"
                   "json.dump(warm_quant_cache(SRC, WORK, THREADS), open(EXTRA, 'w'))",
}


def source_layout(src: Path):
    """The source GGUF (read tensor by tensor from its memory map) and its layout with the default menu."""
    from converters.configuration import DEFAULT_MENU
    from converters.gguf_source import open_source

    s = open_source(src)
    return s, s.layout().with_menu(DEFAULT_MENU)


class _Weights:
    """What the weight bank needs of a model to quantize: its GGUF weights, one tensor at a time."""

    def __init__(self, source):
        self.gguf_weight = source.weight


def warm_quant_cache(src: Path, work: Path, threads: int) -> dict:
    """Quantize every (tensor, type) pair of the training set into a disk cache, as training does (each tensor
    on ``threads`` threads)."""
    from tqdm import tqdm

    from converters.configuration import Configuration
    from toolkit.weight_bank import UNQUANTIZED, WeightBank

    s, _ = source_layout(src)
    cfgs = [Configuration.from_json(d) for d in json.loads((work / "trainset.json").read_text())]
    pairs = sorted({(n, q.name) for c in cfgs for n, q in c.types.items() if q.name not in UNQUANTIZED})
    bank = WeightBank(_Weights(s), work / "quant-cache", threads=threads)
    for n, q in tqdm(pairs, desc="quantizing with ggml", unit="tensor"):
        bank.quantized_bytes(n, q)
    return {"pairs": len(pairs), "cache_bytes": sum(f.stat().st_size for f in (work / "quant-cache").iterdir())}


def measure(name: str, src: Path, work: Path, threads: int, rows: list, report) -> None:
    """Append ``name``'s row to ``rows`` and fill it step by step, reporting after each (a run cut short on a
    busy machine still leaves the steps it finished in the result file)."""
    s, layout = source_layout(src)
    largest = max(t.n_weights for t in layout.tensors)
    row = {"model": name, "source_bytes": src.stat().st_size,
           "parameters": sum(math.prod(s.shape(n)) for n in s.names()),
           "quantizable_weights": layout.n_weights(), "largest_tensor_mb_f32": round(largest * 4 / 2**20, 1)}
    rows.append(row)
    del s
    shutil.rmtree(work / "quant-cache", ignore_errors=True)  # every step from scratch, even in a kept folder
    (work / "sensitivity.json").unlink(missing_ok=True)
    for step in STEPS:
        extra = work / f"step-{step}.json"
        code = (f"from pathlib import Path\nSRC, WORK, THREADS, EXTRA = Path({str(src)!r}), Path({str(work)!r}), "
                f"{threads}, {str(extra)!r}\n{CODE[step]}")
        wall, rss = _child(code)
        row[f"{step}_s"], row[f"{step}_peak_rss_mb"] = round(wall, 2), round(rss, 1)
        row.update({f"{step}_{k}": v for k, v in json.loads(extra.read_text()).items()})
        print(f"{name}: {step} {wall:.1f} s, peak RSS {rss:,.0f} MB", flush=True)
        report(rows)


def report(rows: list, threads: int, complete: bool) -> None:
    """Write bench/results/scale.{json,md}; with both models, a ratio row for the steps both finished."""
    rows = list(rows)
    if len(rows) == 2:  # growth from 135M to 1B: 1B's time / 135M's, and that per quantizable weight
        a, b = rows
        n = b["quantizable_weights"] / a["quantizable_weights"]
        growth = {"model": "ratio 1B / 135M", "quantizable_weights": round(n, 2)}
        for step in STEPS:
            if f"{step}_s" in a and f"{step}_s" in b:
                growth[f"{step}_s"] = round(b[f"{step}_s"] / a[f"{step}_s"], 2)
                growth[f"{step}_peak_rss_mb"] = round(b[f"{step}_peak_rss_mb"] / a[f"{step}_peak_rss_mb"], 2)
                growth[f"{step}_s_per_weight"] = round(growth[f"{step}_s"] / n, 3)
        rows.append(growth)
    result = {"provenance": provenance(), "complete": complete, "threads": threads,
              "machine": f"{platform.processor() or platform.machine()}, {threads} cores",
              "rules_convert": [f"{p}={t}" for p, t in RULES_1B], "rows": rows}
    cols = [("model", "model"), ("quantizable_weights", "quantizable weights")]
    for step in STEPS:
        cols += [(f"{step}_s", f"{step} s"), (f"{step}_peak_rss_mb", f"{step} peak RSS MB")]
    md = [f"Each step in its own process, {threads} threads, {result['machine']}; {load_sentence(result['provenance'])}. convert: mix "
          f"{', '.join(result['rules_convert'])}; sensitivity: every tensor x menu type (tall tensors on 2048 "
          f"sampled rows); search: the initial training set + allocations at 4.5 / 5.5 / 6.5 bpw; quant cache: every "
          f"(tensor, type) pair of that training set quantized and written to disk. The ratio row divides 1B by 135M "
          f"(`_s_per_weight`: the time ratio per quantizable weight)."
          + ("" if complete else " Partial: the run had not finished every step when this was written."),
          "", markdown_table(rows, cols)]
    if len(rows) == 3:
        md += ["", "Per quantizable weight (1B time ratio / weight ratio): " + ", ".join(
            f"{s} {rows[2][f'{s}_s_per_weight']}" for s in STEPS if f"{s}_s_per_weight" in rows[2]) + "."]
    write_results("scale", result, "\n".join(md))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--no-1b", action="store_true", help="only SmolLM2")
    ap.add_argument("--keep", type=Path, help="work folder to keep (default: a temporary one)")
    args = ap.parse_args()
    threads = os.cpu_count() or 1
    rows: list = []
    partial = functools.partial(report, threads=threads, complete=False)
    with tempfile.TemporaryDirectory() as tmp:
        root = args.keep or Path(tmp)
        small = root / "smollm2"
        small.mkdir(parents=True, exist_ok=True)
        measure("SmolLM2-135M-Instruct (Q4_1 GGUF)", require_smollm2(), small, threads, rows, partial)
        if not args.no_1b:
            big = root / "synthetic-1b"
            big.mkdir(parents=True, exist_ok=True)
            src = big / "synthetic-1b-f16.gguf"
            if not src.exists():
                write_synthetic_llama(require_smollm2(), src, **SYNTH_1B)
            measure("synthetic Llama 1B (F16 GGUF)", src, big, threads, rows, partial)
    report(rows, threads, complete=True)


if __name__ == "__main__":
    main()
