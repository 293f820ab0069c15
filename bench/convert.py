"""Benchmark: converting SmolLM2 to a Q8_0 / Q4_0 / IQ4_NL mix with coalora vs llama.cpp's quantizer.

coalora: load the GGUF through transformers (dequantize to float32), then write the mixed GGUF.
llama.cpp: ``llama_model_quantize`` with the same tensor-type rules (tt_overrides), from an F32 GGUF
of the same weights. Both outputs are checked to hold identical tensor bytes.

    COALORA_HOME=/tmp/chome .venv/bin/python bench/convert.py [--repeats 3]
"""
from __future__ import annotations

import argparse
import ctypes
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from converters.gguf_model_writer import llama_ftype, write_gguf  # noqa: E402
from converters.model_loading import load_model  # noqa: E402
from converters.quant_types import get  # noqa: E402
from toolkit.assets import require_smollm2  # noqa: E402
from converters.configuration import apply_overrides  # noqa: E402
from converters.fileio import write_json, write_text  # noqa: E402

# Non-overlapping rules (llama.cpp applies the first matching rule, coalora the last).
RULES = [("attn_(q|k|v|output)", "IQ4_NL"), ("ffn_(gate|up)", "Q4_0"), ("ffn_down", "Q8_0"), ("token_embd", "Q8_0")]
RESULTS = Path(__file__).resolve().parent / "results"


def llama_quantize(src: Path, dst: Path, nthread: int) -> None:
    import llama_cpp
    from llama_cpp._utils import suppress_stdout_stderr

    p = llama_cpp.llama_model_quantize_default_params()
    p.ftype, p.pure, p.nthread = llama_ftype("Q4_0"), False, nthread
    arr = (llama_cpp.llama_model_tensor_override * (len(RULES) + 1))()
    for i, (pattern, q) in enumerate(RULES):
        arr[i].pattern, arr[i].type = pattern.encode(), int(get(q).ggml)
    arr[len(RULES)].pattern = None
    p.tt_overrides = ctypes.cast(arr, ctypes.POINTER(llama_cpp.llama_model_tensor_override))
    with suppress_stdout_stderr(disable=False):
        rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(p))
    if rc != 0:
        raise RuntimeError(f"llama_model_quantize failed ({rc})")


def same_tensors(a: Path, b: Path) -> bool:
    import gguf
    import numpy as np
    ta = {t.name: (t.tensor_type, np.asarray(t.data).tobytes()) for t in gguf.GGUFReader(a).tensors}
    tb = {t.name: (t.tensor_type, np.asarray(t.data).tobytes()) for t in gguf.GGUFReader(b).tensors}
    return ta == tb


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    src = require_smollm2()
    nthread = os.cpu_count() or 1

    t0 = time.perf_counter()
    lm = load_model(src)
    load_s = time.perf_counter() - t0
    layout = lm.layout()
    cfg, notes = apply_overrides(layout, layout.uniform("F32"), RULES)

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        f32 = tmp / "smollm2-f32.gguf"
        write_gguf(lm.gguf, f32, layout.uniform("F32"), progress=False)
        ours, theirs = tmp / "ours.gguf", tmp / "theirs.gguf"
        t_ours, t_theirs = [], []
        for _ in range(args.repeats):
            t = time.perf_counter()
            write_gguf(lm.gguf, ours, cfg, progress=False)
            t_ours.append(time.perf_counter() - t)
            t = time.perf_counter()
            llama_quantize(f32, theirs, nthread)
            t_theirs.append(time.perf_counter() - t)
        identical = same_tensors(ours, theirs)
        sizes = {"coalora": os.path.getsize(ours), "llama.cpp": os.path.getsize(theirs)}

    w, q = statistics.median(t_ours), statistics.median(t_theirs)
    result = {
        "model": src.name, "rules": [f"{p}={t}" for p, t in RULES], "types": cfg.histogram(),
        "fallbacks": len(notes), "repeats": args.repeats, "threads_llama_cpp": nthread, "threads_coalora": 1,
        "coalora_load_s": round(load_s, 3), "coalora_write_s": round(w, 3),
        "llama_quantize_s": round(q, 3), "write_over_quantize": round(w / q, 3),
        "end_to_end_over_quantize": round((load_s + w) / q, 3),
        "identical_tensor_bytes": identical, "file_bytes": sizes,
        "predicted_file_bytes": layout.file_bytes(cfg),
        "machine": f"{platform.processor() or platform.machine()}, {nthread} cores",
    }
    rows = [("coalora load (GGUF -> float32 transformers)", f"{load_s:.2f} s"),
            ("coalora write mixed GGUF (median)", f"{w:.2f} s"),
            (f"llama_model_quantize from F32, {nthread} threads (median)", f"{q:.2f} s"),
            ("ratio write / quantize", f"{w / q:.2f}"),
            ("ratio load+write / quantize", f"{(load_s + w) / q:.2f}"),
            ("identical tensor bytes", str(identical)),
            ("file bytes coalora / llama.cpp / predicted",
             f"{sizes['coalora']} / {sizes['llama.cpp']} / {result['predicted_file_bytes']}")]
    md = [f"# Conversion benchmark: {src.name}", "",
          f"Mix: {', '.join(result['rules'])} ({', '.join(f'{k}: {v}' for k, v in cfg.histogram().items())}; "
          f"{len(notes)} fallbacks). {args.repeats} repeats, {result['machine']}.", "",
          "| step | value |", "|---|---|"] + [f"| {a} | {b} |" for a, b in rows]
    RESULTS.mkdir(exist_ok=True)
    write_json(RESULTS / "convert.json", result)
    write_text(RESULTS / "convert.md", "\n".join(md) + "\n")
    from rich.console import Console
    from rich.table import Table
    table = Table(title=f"convert {src.name} to a Q8_0/Q4_0/IQ4_NL mix")
    table.add_column("step")
    table.add_column("value", justify="right")
    for a, b in rows:
        table.add_row(a, b)
    Console().print(table)


if __name__ == "__main__":
    main()
