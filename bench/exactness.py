"""Exactness: the perplexity torch predicts against the one llama.cpp measures, per quant type and mix.

Protocol (fixed; one run of this script produces every number):
- SmolLM2-135M-Instruct with its base weights only (no adapter), each configuration written as a GGUF with
  coalora's writer (ggml's own bytes).
- llama.cpp (llama-cpp-python 0.3.36, CPU, F32 KV cache, one 512-token batch per window) and torch score the
  same first W windows of 512 tokens of held-out *Pride and Prejudice* (default 8), toolkit.evaluation's
  protocol.
- torch twice: "before" with the previous emulation (torch's ``127 / t``, which is ``127 * t.reciprocal()``,
  rounded twice; Q4_1 / Q5_1 dot products without Q8_1's fp16 block sums; transformers' RMS norm), "after"
  with toolkit.ggml_activations as it is now.
- Residual = llama.cpp perplexity / torch perplexity - 1.
Writes bench/results/exactness.{md,json} (or ``--name``).

With ``--imatrix FILE`` (an importance matrix of the model, e.g. a demo run's ``imatrix.gguf``) every type is
quantized with it, the types that need one (IQ1-IQ3) join, only the current emulation is measured, and the result
is bench/results/exactness-imatrix.{md,json}.

Usage: .venv/bin/python bench/exactness.py [--windows 8] [--only NAME ...] [--name exactness] [--imatrix FILE]
"""
from __future__ import annotations

import argparse
import contextlib
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import markdown_table, provenance, write_results  # noqa: E402

IMATRIX_TYPES = ("Q4_0", "IQ4_NL", "Q3_K", "Q2_K", "IQ3_S", "IQ3_XXS", "IQ2_S", "IQ2_XS", "IQ2_XXS", "IQ1_M", "IQ1_S")
TYPES = ("F16", "Q8_0", "Q6_K", "Q5_K", "Q5_0", "Q4_K", "Q4_0", "IQ4_NL", "Q3_K", "Q2_K")
# Mixes by tensor kind ("*": every other kind). SmolLM2's 576-wide rows take K-quants only in ffn_down.
MIXES = {
    "mix Q8_0/Q4_K/Q5_0": {"ffn_down": "Q4_K", "ffn_up": "Q5_0", "ffn_gate": "Q5_0", "*": "Q8_0"},
    "mix Q4_0/IQ4_NL/Q4_K/Q5_0": {"ffn_down": "Q4_K", "ffn_up": "IQ4_NL", "ffn_gate": "IQ4_NL",
                                  "token_embd": "Q5_0", "*": "Q4_0"},
    "mix Q5_1/Q4_1/Q6_K/Q8_0": {"ffn_down": "Q6_K", "ffn_up": "Q4_1", "ffn_gate": "Q4_1", "token_embd": "Q8_0",
                                "*": "Q5_1"},
}


@contextlib.contextmanager
def previous_emulation():
    """The activation rounding as coalora emulated it before: division by reciprocal, no Q8_1 block sums."""
    import torch

    from toolkit import ggml_activations as ga

    def hf_rms_norm(self, x):  # transformers' LlamaRMSNorm: float32 mean, rsqrt
        return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps))

    saved = ga._div, ga.q8_1_sum_error, ga.GGMLRMSNorm.forward
    ga._div = lambda num, t: num / t
    ga.q8_1_sum_error = lambda x: torch.zeros(*x.shape[:-1], x.shape[-1] // 32, dtype=x.dtype, device=x.device)
    ga.GGMLRMSNorm.forward = hf_rms_norm
    try:
        yield
    finally:
        ga._div, ga.q8_1_sum_error, ga.GGMLRMSNorm.forward = saved


def configurations(layout, imatrix: bool = False) -> dict:
    from converters.configuration import Configuration

    out = {q: layout.uniform(q) for q in (IMATRIX_TYPES if imatrix else TYPES)}
    for name, by_kind in MIXES.items():
        out[name] = Configuration({t.name: by_kind.get(t.kind, by_kind["*"]) for t in layout.tensors})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--windows", type=int, default=8)
    ap.add_argument("--only", nargs="*", help="configurations to measure (names as in the table)")
    ap.add_argument("--name", help="result file name in bench/results (default: exactness, exactness-imatrix)")
    ap.add_argument("--imatrix", help="quantize with this importance matrix; adds the IQ1-IQ3 types")
    args = ap.parse_args()
    args.name = args.name or ("exactness-imatrix" if args.imatrix else "exactness")

    from tqdm import tqdm

    from converters.fileio import model_fingerprint
    from converters.gguf_model_writer import write_gguf
    from converters.model_loading import load_model
    from toolkit import assets, evaluation, llama_runtime
    from toolkit.coa_lora import CoALoRAModel
    from toolkit.run import quant_cache_dir
    from toolkit.weight_bank import WeightBank

    model_path = assets.smollm2_path()
    loaded = load_model(model_path)
    layout = loaded.layout()
    im = None
    if args.imatrix:
        from converters import imatrix as imx
        from converters.gguf_source import GGUFSource
        im = imx.load_for(args.imatrix, imx.model_shapes(GGUFSource(model_path)))
        layout = layout.with_imatrix(im.sums)
    bank = WeightBank(loaded, cache_dir=quant_cache_dir(model_fingerprint(model_path)), imatrix=im)
    model = CoALoRAModel(loaded, bank, layout, mode="shared", targets=())
    model.eval()
    cfgs = configurations(layout, imatrix=im is not None)
    names = args.only or list(cfgs)
    text = assets.novel_path(assets.EVAL_NOVEL).read_text()
    rows, windows = [], None
    with tempfile.TemporaryDirectory(prefix="coalora-exactness-") as tmp:
        for name in tqdm(names, desc="configurations"):
            cfg, t0 = cfgs[name], time.perf_counter()
            path = Path(tmp) / "model.gguf"
            write_gguf(loaded.gguf, path, cfg, quantized=bank.quantized_bytes, progress=False)
            llm = llama_runtime.open_model(path, n_ctx=512)
            if windows is None:
                windows = evaluation.eval_windows(llm, text, n_windows=args.windows, n_ctx=512)
            p_llama = evaluation.perplexity(llama_runtime.llama_window_nll(llm, windows))
            llm.close()
            model.set_configuration(cfg)

            def logits(ids):
                return model.base(input_ids=ids, use_cache=False).logits

            p_before = None
            if im is None:
                with previous_emulation():
                    p_before = evaluation.perplexity(evaluation.torch_window_nll(logits, windows))
            p_after = evaluation.perplexity(evaluation.torch_window_nll(logits, windows))
            counts = {}
            for q in cfg.types.values():
                counts[q.name] = counts.get(q.name, 0) + 1
            rows.append({"configuration": name, "types": ", ".join(f"{k} x{v}" for k, v in sorted(counts.items())),
                         "file_bytes": path.stat().st_size, "bpw": layout.bits_per_weight(cfg),
                         "llama_ppl": p_llama, "torch_before": p_before, "before_pct": None if p_before is None else 100 * (p_llama / p_before - 1),
                         "torch_after": p_after, "after_pct": 100 * (p_llama / p_after - 1),
                         "seconds": time.perf_counter() - t0})
            report(rows, args.windows, windows, args.name, im)


def report(rows: list[dict], n_windows: int, windows, name: str, im=None) -> None:
    from toolkit.evaluation import windows_digest

    order = [*(IMATRIX_TYPES if im is not None else TYPES), *MIXES]
    rows = sorted(rows, key=lambda r: order.index(r["configuration"]))
    worst = max(abs(r["after_pct"]) for r in rows)
    if im is None:
        cols = [("configuration", "configuration"), ("types", "tensor types"), ("bpw", "bpw"),
                ("llama_ppl", "llama.cpp ppl"), ("torch_before", "torch ppl, before"),
                ("before_pct", "residual before %"), ("torch_after", "torch ppl, after"),
                ("after_pct", "residual after %")]
        what = ("llama.cpp (CPU, F32 KV cache) against torch's prediction with the previous activation emulation "
                "(before) and the current one (after)")
    else:
        cols = [("configuration", "configuration"), ("types", "tensor types"), ("bpw", "bpw"),
                ("llama_ppl", "llama.cpp ppl"), ("torch_after", "torch ppl"), ("after_pct", "residual %")]
        what = (f"every type quantized with an importance matrix (sha256 {im.sha256[:12]}); llama.cpp (CPU, "
                "F32 KV cache) against torch's prediction")
    md = (f"Protocol: SmolLM2-135M-Instruct base weights, no adapter; {n_windows} x 512 tokens of Pride and Prejudice; "
          f"{what}; residual = llama.cpp / torch - 1. Largest residual: {worst:.3f}%.\n\n"
          + markdown_table(rows, cols))
    write_results(name, {"provenance": provenance(), "windows": n_windows,
                         "imatrix_sha256": None if im is None else im.sha256,
                         "n_ctx": 512, "windows_sha256": windows_digest(windows), "rows": rows}, md)


if __name__ == "__main__":
    main()
