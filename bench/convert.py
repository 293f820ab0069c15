"""Benchmark: converting a GGUF to a Q8_0 / Q4_0 / IQ4_NL mix with coalora vs llama.cpp's quantizer.

coalora: what ``coalora convert`` does (open the source GGUF with gguf's reader, plan the layout, dequantize
and re-quantize tensor by tensor with ggml on all cores, copy the rest); no transformers model is loaded.
llama.cpp: ``llama_model_quantize`` with the same tensor-type rules (tt_overrides), from the same source file,
same thread count. Both outputs are checked to hold identical tensor bytes. Two sources: the SmolLM2 Q4_1
asset as shipped (requantized, as llama-quantize --allow-requantize does) and an F32 GGUF of it.

A third row converts a synthetic 1B-parameter Llama-shaped F16 GGUF (random weights written tensor by
tensor, SmolLM2's tokenizer; Llama 3.2 1B's block shapes) to a K-quant mix, each side in a child process
whose peak resident memory is recorded.

    .venv/bin/python bench/convert.py [--repeats 3] [--no-1b]
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import markdown_table, peak_self_rss_mb, provenance, write_results  # noqa: E402
from converters.configuration import apply_overrides  # noqa: E402
from converters.gguf_model_writer import write_gguf  # noqa: E402
from converters.gguf_source import open_source  # noqa: E402
from toolkit.assets import require_smollm2  # noqa: E402

# Non-overlapping rules (llama.cpp applies the first matching rule; so does coalora).
RULES = [("attn_(q|k|v|output)", "IQ4_NL"), ("ffn_(gate|up)", "Q4_0"), ("ffn_down", "Q8_0"), ("token_embd", "Q8_0")]


def llama_quantize(src: Path, dst: Path, nthread: int, rules=RULES) -> None:
    """llama_model_quantize with ``rules`` as --tensor-type overrides (Q4_0 elsewhere), its output silenced."""
    from llama_cpp._utils import suppress_stdout_stderr

    from bench import common

    with suppress_stdout_stderr(disable=False):
        common.llama_quantize(src, dst, "Q4_0", overrides=rules, nthread=nthread, allow_requantize=True)


def coalora_convert(src: Path, dst: Path, nthread: int, rules=RULES) -> dict:
    """``coalora convert SRC -o DST --tensor-type ...`` with ``rules``, in process."""
    s = open_source(src)
    layout = s.layout()
    cfg, notes = apply_overrides(layout, layout.uniform("F32"), rules)
    write_gguf(s, dst, cfg, progress=False, threads=nthread)
    return {"cfg": cfg, "notes": notes, "predicted": layout.file_bytes(cfg)}


def same_tensors(a: Path, b: Path) -> bool:
    import gguf
    import numpy as np
    ta = {t.name: (t.tensor_type, np.asarray(t.data).tobytes()) for t in gguf.GGUFReader(a).tensors}
    tb = {t.name: (t.tensor_type, np.asarray(t.data).tobytes()) for t in gguf.GGUFReader(b).tensors}
    return ta == tb


def measure(name: str, src: Path, tmp: Path, repeats: int, nthread: int) -> dict:
    ours, theirs = tmp / f"{name}-ours.gguf", tmp / f"{name}-theirs.gguf"
    t_ours, t_theirs, plan = [], [], None
    for _ in range(repeats):  # alternate, so both see the same page cache and machine load
        t = time.perf_counter()
        plan = coalora_convert(src, ours, nthread)
        t_ours.append(time.perf_counter() - t)
        t = time.perf_counter()
        llama_quantize(src, theirs, nthread)
        t_theirs.append(time.perf_counter() - t)
    w, q = statistics.median(t_ours), statistics.median(t_theirs)
    return {"source": name, "source_bytes": src.stat().st_size, "coalora_s": round(w, 3), "llama_quantize_s": round(q, 3),
            "ratio": round(w / q, 3), "identical_tensor_bytes": same_tensors(ours, theirs),
            "coalora_bytes": ours.stat().st_size, "llama_cpp_bytes": theirs.stat().st_size,
            "predicted_bytes": plan["predicted"], "types": plan["cfg"].histogram(), "fallbacks": len(plan["notes"])}


# Llama 3.2 1B's block shapes (its own 128k vocabulary replaced by SmolLM2's 49k tokenizer)
SYNTH_1B = dict(n_embd=2048, n_ff=8192, n_layer=16, n_head=32, n_head_kv=8)
RULES_1B = [("attn", "Q8_0"), ("ffn_(gate|up)", "Q4_K"), ("ffn_down", "Q6_K"), ("token_embd", "Q8_0")]


def write_synthetic_llama(tokenizer_src: Path, dst: Path, n_embd, n_ff, n_layer, n_head, n_head_kv) -> int:
    """A Llama GGUF of random F16 weights, written one tensor at a time (never the whole model in memory)."""
    import gguf
    import numpy as np
    r = gguf.GGUFReader(tokenizer_src)
    n_vocab = len(r.fields["tokenizer.ggml.tokens"].data)
    w = gguf.GGUFWriter(dst, "llama")
    w.add_name("synthetic-1b")
    w.add_context_length(4096)
    w.add_embedding_length(n_embd)
    w.add_block_count(n_layer)
    w.add_feed_forward_length(n_ff)
    w.add_head_count(n_head)
    w.add_head_count_kv(n_head_kv)
    w.add_rope_dimension_count(n_embd // n_head)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(500000.0)
    w.add_file_type(1)
    for key, f in r.fields.items():
        if key.startswith("tokenizer."):
            vt = f.types[0]
            w.add_key_value(key, f.contents(), vt, sub_type=f.types[-1] if vt == gguf.GGUFValueType.ARRAY else None)
    kv = n_embd // n_head * n_head_kv
    shapes = [("token_embd.weight", (n_vocab, n_embd))]
    for b in range(n_layer):
        shapes += [(f"blk.{b}.attn_norm.weight", (n_embd,)), (f"blk.{b}.attn_q.weight", (n_embd, n_embd)),
                   (f"blk.{b}.attn_k.weight", (kv, n_embd)), (f"blk.{b}.attn_v.weight", (kv, n_embd)),
                   (f"blk.{b}.attn_output.weight", (n_embd, n_embd)), (f"blk.{b}.ffn_norm.weight", (n_embd,)),
                   (f"blk.{b}.ffn_gate.weight", (n_ff, n_embd)), (f"blk.{b}.ffn_up.weight", (n_ff, n_embd)),
                   (f"blk.{b}.ffn_down.weight", (n_embd, n_ff))]
    shapes.append(("output_norm.weight", (n_embd,)))
    for name, shape in shapes:
        dt = np.float32 if len(shape) == 1 else np.float16
        w.add_tensor_info(name, shape, np.dtype(dt), int(np.prod(shape)) * np.dtype(dt).itemsize)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    rng = np.random.default_rng(0)
    for name, shape in shapes:
        if len(shape) == 1:
            w.write_tensor_data(np.ones(shape, np.float32))
        else:
            w.write_tensor_data((rng.standard_normal(shape, np.float32) * 0.02).astype(np.float16))
    w.close()
    return sum(int(np.prod(s)) for _, s in shapes)


def _child(code: str) -> tuple[float, float]:
    """Run ``code`` in a fresh Python; (wall seconds, peak RSS MB of that child)."""
    import json
    import subprocess
    root = Path(__file__).resolve().parents[1]
    wrapped = (f"import json, resource, sys, time; sys.path.insert(0, {str(root)!r}); t = time.perf_counter()\n{code}\n"
               "print(json.dumps([time.perf_counter() - t, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024]))")
    out = subprocess.run([sys.executable, "-c", wrapped], capture_output=True, text=True, check=True).stdout
    return tuple(json.loads(out.strip().splitlines()[-1]))


def measure_1b(tmp: Path, nthread: int) -> dict:
    src = tmp / "synthetic-1b-f16.gguf"
    n_params = write_synthetic_llama(require_smollm2(), src, **SYNTH_1B)
    ours, theirs = tmp / "1b-ours.gguf", tmp / "1b-theirs.gguf"
    call = "from pathlib import Path; import bench.convert as b; b.{}(Path({!r}), Path({!r}), {}, b.RULES_1B)"
    t_ours, rss_ours = _child(call.format("coalora_convert", str(src), str(ours), nthread))
    t_theirs, rss_theirs = _child(call.format("llama_quantize", str(src), str(theirs), nthread))
    s = open_source(src)
    cfg, notes = apply_overrides(s.layout(), s.layout().uniform("F32"), RULES_1B)
    predicted = s.layout().file_bytes(cfg)
    row = {"source": f"synthetic Llama, {n_params / 1e9:.2f}B parameters (F16, K-quant mix)",
           "source_bytes": src.stat().st_size, "coalora_s": round(t_ours, 3), "llama_quantize_s": round(t_theirs, 3),
           "ratio": round(t_ours / t_theirs, 3), "identical_tensor_bytes": same_tensors(ours, theirs),
           "coalora_bytes": ours.stat().st_size, "llama_cpp_bytes": theirs.stat().st_size, "predicted_bytes": predicted,
           "types": cfg.histogram(), "fallbacks": len(notes), "rules": [f"{p}={t}" for p, t in RULES_1B],
           "coalora_peak_rss_mb": round(rss_ours, 1), "llama_quantize_peak_rss_mb": round(rss_theirs, 1),
           "repeats": 1}
    for f in (src, ours, theirs):
        f.unlink()
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--no-1b", action="store_true", help="skip the synthetic 1B-parameter model")
    args = ap.parse_args()
    asset = require_smollm2()
    nthread = os.cpu_count() or 1
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        f32 = tmp / "smollm2-f32.gguf"
        s = open_source(asset)
        write_gguf(s, f32, s.layout().uniform("F32"), progress=False)
        rows = [measure(f"{asset.name} (Q4_1, requantized)", asset, tmp, args.repeats, nthread),
                measure("F32 GGUF of it", f32, tmp, args.repeats, nthread)]
        f32.unlink()
        if not args.no_1b:
            rows.append(measure_1b(tmp, nthread))
    result = {"provenance": provenance(), "rules": [f"{p}={t}" for p, t in RULES], "repeats": args.repeats,
              "threads": nthread, "machine": f"{platform.processor() or platform.machine()}, {nthread} cores",
              "peak_rss_mb": round(peak_self_rss_mb(), 1), "rows": rows}
    cols = [("source", "source"), ("coalora_s", "coalora convert s (median)"),
            ("llama_quantize_s", "llama_model_quantize s (median)"), ("ratio", "ratio"),
            ("identical_tensor_bytes", "identical tensor bytes"), ("coalora_bytes", "file bytes coalora"),
            ("llama_cpp_bytes", "file bytes llama.cpp"), ("predicted_bytes", "predicted bytes")]
    md = [f"Mix: {', '.join(result['rules'])} ({', '.join(f'{k}: {v}' for k, v in rows[0]['types'].items())}; "
          f"{rows[0]['fallbacks']} fallbacks). {args.repeats} repeats, {nthread} threads each, {result['machine']}; "
          f"coalora without any transformers model (peak RSS of the whole benchmark {result['peak_rss_mb']:,.0f} MB).",
          *([f"Synthetic 1B row: mix {', '.join(rows[-1]['rules'])} "
             f"({', '.join(f'{k}: {v}' for k, v in rows[-1]['types'].items())}), one run each in a child process; "
             f"peak RSS coalora {rows[-1]['coalora_peak_rss_mb']:,.0f} MB, llama_model_quantize "
             f"{rows[-1]['llama_quantize_peak_rss_mb']:,.0f} MB (source file {rows[-1]['source_bytes'] / 1e9:.2f} GB)."]
            if len(rows) > 2 else []),
          "", markdown_table([{**r, "identical_tensor_bytes": str(r["identical_tensor_bytes"])} for r in rows], cols)]
    write_results("convert", result, "\n".join(md))


if __name__ == "__main__":
    main()
