"""`coalora validate DIST/NAME`: check an emitted pair on CPU with llama-cpp-python before it ships.

Order matters: checksums first (a damaged or swapped file is refused before llama.cpp reads a byte),
then the adapter is checked against the model (gguf.GGUFReader), and only then llama.cpp runs:
- perplexity without and with the adapter, on the manifest's evaluation windows (toolkit.evaluation);
- KL divergence and top-1 agreement against the unquantized model: an F16 GGUF of the run's source
  model, written once and cached in $COALORA_HOME/reference/ (or ``reference=`` any F16/F32 GGUF);
- prompt and generation tokens/s and peak resident memory, measured in a separate process that runs
  with the profile's own settings (context, threads, ubatch, KV type), so the RSS is that of llama.cpp
  and not of this process. By default the prompt fills the context, since the KQ scores of the compute
  buffer grow with the filled cells and the memory model predicts a full context; the child does not
  re-read the files with gguf (this process has checked them): GGUFReader's pass over the model would
  add a transient of about the model's size to the peak.
Verdicts: checksums hold, the pair fits the profile (memory model and measured), perplexity with the
adapter within 0.5% of the manifest's prediction (torch emulates each of llama.cpp's CPU matmuls to float32
rounding, see toolkit.ggml_activations; near-tie roundings still drift apart over the blocks: residuals up to
0.41% measured, bench/results/exactness*.md).
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np

from toolkit import memory_model as mm
from converters.errors import CoaloraError
from toolkit.evaluation import StreamComparison, masked_perplexity, nll_from_logits, perplexity
from converters.fileio import sha256_file
from toolkit.manifest import check_against_files, check_folder, check_source_model, read_manifest

PPL_TOLERANCE = 0.005  # prediction vs llama.cpp; measured residuals in bench/results/exactness.md
MEASURE_GEN_TOKENS = 32


def profile_of(manifest: dict):
    from toolkit.profiles import _parse

    d = {k: v for k, v in manifest["profile"].items() if k not in ("source", "process_budget_bytes")}
    if d.get("model_budget_bytes") is None:
        d.pop("model_budget_bytes", None)
    return _parse(d, f"manifest profile {d.get('name')}")


def reference_gguf(manifest: dict, log=lambda m: None) -> Path | None:
    """An F16 GGUF of the run's unquantized source model, cached by its sha256; None if the source is gone."""
    from toolkit import assets
    from converters.fileio import atomic_path

    src = manifest["source_model"]
    if not check_source_model(manifest):  # the source is gone; a present one has the manifest's sha256 (hex)
        return None
    path = src["path"]
    ref = assets.home() / "reference" / f"{src['sha256'][:16]}-F16.gguf"
    if not ref.exists():
        from converters.gguf_model_writer import write_gguf
        from converters.gguf_source import open_source

        log(f"writing the F16 reference of {Path(path).name} (once) to {ref}")
        src = open_source(path, log)
        with atomic_path(ref) as tmp:
            write_gguf(src, tmp, src.layout().uniform("F16"), progress=False)
    return ref


def _check_reference(ref, model) -> None:
    """A --reference GGUF must be the same network as the model: architecture, blocks, shapes and vocabulary."""
    if (ref.arch.name, ref.n_blocks, ref.hparams()) != (model.arch.name, model.n_blocks, model.hparams()):
        raise CoaloraError(f"the reference {ref.path.name} is not the same model as {model.path.name} "
                           f"(architecture, blocks or shapes differ)")


# ---- measurement in a child process -----------------------------------------------------------
def _peak_rss() -> int:
    """This process's peak resident memory. VmHWM, not ru_maxrss: on Linux ru_maxrss survives exec and
    would report the (much larger) parent that forked us."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)


def _measure_child(args: dict) -> dict:
    """Runs in the child: load with the profile's settings, time a prompt and a generation, report peak RSS."""
    import llama_cpp

    from toolkit.llama_runtime import _quiet_llama_logs, load_checked_adapter, set_adapter

    _quiet_llama_logs()
    t = time.perf_counter()
    kv = mm.KV_TYPE_GGML[args["kv_type"]]
    llm = llama_cpp.Llama(model_path=args["model"], n_ctx=args["n_ctx"], n_batch=args["ubatch"],
                          n_ubatch=args["ubatch"], n_threads=args["threads"], n_threads_batch=args["threads"],
                          n_gpu_layers=0, flash_attn=args["flash_attn"], type_k=kv, type_v=kv, verbose=False)
    h = load_checked_adapter(llm, args["adapter"])  # the parent validated it against this model
    set_adapter(llm, h)
    load_s = time.perf_counter() - t
    prompt = args["prompt"]
    t = time.perf_counter()
    llm.eval(prompt)
    prompt_s = time.perf_counter() - t
    t = time.perf_counter()
    n = 0
    for tok in llm.generate(prompt, temp=0.0):  # reuses the evaluated prompt (prefix match)
        n += 1
        if n >= args["n_gen"]:
            break
    gen_s = time.perf_counter() - t
    peak = _peak_rss()
    h.close()
    llm.close()
    return {"load_s": load_s, "prompt_tokens": len(prompt), "prompt_tokens_per_s": len(prompt) / prompt_s,
            "gen_tokens": n, "gen_tokens_per_s": n / gen_s if gen_s > 0 else 0.0, "peak_rss_bytes": peak}


def measure(model, adapter, profile, prompt: list[int], n_gen: int = MEASURE_GEN_TOKENS, timeout: float = 1800,
            threads: int | None = None) -> dict:
    """Load, prompt and generate with the profile's settings in a child process (``threads`` overrides the
    profile's thread count). ``model`` and ``adapter`` must have been checked with validate_adapter_file."""
    from toolkit.llama_runtime import check_threads, run_child

    args = {"model": str(model), "adapter": str(adapter), "n_ctx": profile.context_length, "ubatch": profile.ubatch,
            "threads": threads or profile.threads, "kv_type": profile.kv_cache_type, "flash_attn": profile.flash_attn,
            "prompt": [int(t) for t in prompt], "n_gen": n_gen}
    check_threads(args["threads"])
    out = run_child("toolkit.validate", "--measure-child", args, f"{Path(model).name} with {Path(adapter).name}",
                    timeout)
    return json.loads(out.strip().splitlines()[-1])


# ---- validation -------------------------------------------------------------------------------
def check_dist(dist_dir) -> dict:
    """The checks of DIST/NAME that need no llama.cpp, in the order that keeps damaged bytes away from the
    parsers: the manifest's schema, the folder's files and checksums, the model GGUF against its
    architecture, the adapter against the model, the manifest's recomputable values, the source model."""
    from converters.gguf_source import GGUFSource
    from toolkit.emit import ADAPTER_FILE, MODEL_FILE
    from toolkit.llama_runtime import validate_adapter_file

    dist_dir = Path(dist_dir)
    manifest = read_manifest(dist_dir)
    sums = check_folder(dist_dir, manifest)
    model, adapter = dist_dir / MODEL_FILE, dist_dir / ADAPTER_FILE
    src = GGUFSource(model)
    info = validate_adapter_file(adapter, model)
    profile = profile_of(manifest)
    recomputed = check_against_files(manifest, src, adapter.stat().st_size, profile)
    return {"manifest": manifest, "checksums": sums, "model": src, "adapter": info, "profile": profile,
            "recomputed": recomputed, "source_verified": check_source_model(manifest)}


def validate(dist_dir, data=None, n_windows: int | None = None, reference=None, measure_memory: bool = True,
             threads: int | None = None, measure_tokens: int | None = None, log=lambda m: None) -> dict:
    """``measure_tokens``: prompt length of the memory / speed measurement (default: fill the profile's
    context, what the memory model predicts); ``threads`` overrides the profile's for all llama.cpp work."""
    from converters.gguf_source import GGUFSource
    from toolkit.emit import ADAPTER_FILE, MODEL_FILE, eval_set, eval_text
    from toolkit.llama_runtime import check_threads, load_adapter, open_model, probe, set_adapter, window_logits

    t0 = time.perf_counter()
    dist_dir = Path(dist_dir)
    check_threads(threads)
    c = check_dist(dist_dir)                            # everything that can be checked without llama.cpp
    manifest, sums, src, info, profile, recomputed = (c["manifest"], c["checksums"], c["model"], c["adapter"],
                                                      c["profile"], c["recomputed"])
    check_threads(threads or profile.threads)
    model, adapter = dist_dir / MODEL_FILE, dist_dir / ADAPTER_FILE

    ev = manifest["evaluation"]
    n_windows = n_windows or ev["n_windows"]
    n_ctx = ev["n_ctx"]
    probe(model, adapter, n_ctx=n_ctx, threads=threads)  # whatever the checks missed crashes a child, not us
    ref_path = None
    if reference:
        ref_path = Path(reference)
        _check_reference(GGUFSource(ref_path), src)
    else:
        ref_path = reference_gguf(manifest, log)
    if ref_path is not None:
        probe(ref_path, n_ctx=n_ctx, threads=threads)
    if data is None and Path(ev["text_path"]).is_file() and sha256_file(ev["text_path"]) == ev["text_sha256"]:
        data = ev["text_path"]
    text_file = eval_text(data)
    try:
        windows, masks, bos, data_format, digest = eval_set(model, text_file, n_windows, n_ctx)
    except (UnicodeDecodeError, OSError) as e:
        raise CoaloraError(f"cannot read the evaluation data {text_file}: {str(e)[:200]}") from None
    same_protocol = (sha256_file(text_file) == ev["text_sha256"] and n_windows == ev["n_windows"]
                     and digest == ev["windows_sha256"] and bos == ev["bos"])

    llm = open_model(model, n_ctx=n_ctx, n_threads=threads)
    ref = open_model(ref_path, n_ctx=n_ctx, n_threads=threads) if ref_path else None
    try:
        handle = load_adapter(llm, adapter, model)
        nll_base, nll_adapted = [], []
        cmp_base, cmp_adapted = StreamComparison(), StreamComparison()
        for i, w in enumerate(windows):
            log(f"window {i + 1}/{len(windows)}")
            set_adapter(llm, None)
            base = window_logits(llm, w)
            set_adapter(llm, handle)
            adapted = window_logits(llm, w)
            nll_base.append(nll_from_logits(base, w))
            nll_adapted.append(nll_from_logits(adapted, w))
            if ref is not None:
                r = window_logits(ref, w)
                # records: only the positions that predict an answer token
                rows = None if masks is None else list(masks[i][1:]) + [False]
                cmp_base.add(r, base, rows)
                cmp_adapted.add(r, adapted, rows)
        handle.close()
    finally:
        llm.close()
        if ref is not None:
            ref.close()
    if masks is None:
        ppl_base, ppl_adapted = perplexity(np.stack(nll_base)), perplexity(np.stack(nll_adapted))
        scored = sum(len(n) for n in nll_adapted)
    else:  # records: their answer tokens
        ppl_base, ppl_adapted = masked_perplexity(nll_base, masks), masked_perplexity(nll_adapted, masks)
        scored = sum(int(np.count_nonzero(m[1:len(n) + 1])) for n, m in zip(nll_adapted, masks))
    predicted = ev["predicted_perplexity"]
    rel = ppl_adapted / predicted - 1

    measured = None
    if measure_memory:
        n_prompt = profile.context_length - MEASURE_GEN_TOKENS
        if measure_tokens is not None:
            n_prompt = max(1, min(int(measure_tokens), n_prompt))
        log(f"measuring speed and peak memory in a separate process ({n_prompt}-token prompt)")
        pool = [t for w in windows for t in w]
        prompt = (pool * (n_prompt // len(pool) + 1))[:n_prompt]  # the text's tokens, repeated as needed
        measured = measure(model, adapter, profile, prompt, threads=threads)

    mem = manifest["memory"]  # equal to what the files and the profile give (check_against_files)
    allowed = profile.process_budget_bytes
    verdicts = {
        "checksums": True,
        "fits_memory_model": recomputed["fits"]["memory_model"] and recomputed["fits"]["model_budget"],
        "fits_measured": None if measured is None else measured["peak_rss_bytes"] <= allowed,
        "perplexity_matches_prediction": (abs(rel) <= PPL_TOLERANCE) if same_protocol else None,
    }
    report = {
        "dist": str(dist_dir), "profile": profile.name, "checksums": sums, "source_model_verified": c["source_verified"],
        "adapter": {"rank": info.rank, "alpha": info.alpha, "tensors": len(info.targets)},
        "evaluation": {"n_windows": len(windows), "n_ctx": n_ctx, "data_format": data_format,
                       "same_windows_as_manifest": same_protocol, "scored_tokens": scored,
                       "perplexity_base": ppl_base, "perplexity_adapter": ppl_adapted,
                       "predicted_perplexity": predicted, "relative_difference": rel},
        "reference": None if ref is None else {"path": str(ref_path), "base": cmp_base.summary(),
                                               "adapter": cmp_adapted.summary()},
        "memory": {"predicted_total_bytes": mem["total_bytes"], "allowed_bytes": allowed,
                   "measured_peak_rss_bytes": None if measured is None else measured["peak_rss_bytes"],
                   "measured_prompt_tokens": None if measured is None else measured["prompt_tokens"],
                   "relative_difference": None if measured is None
                   else measured["peak_rss_bytes"] / mem["total_bytes"] - 1},
        "speed": None if measured is None else {k: measured[k] for k in ("load_s", "prompt_tokens_per_s",
                                                                           "gen_tokens_per_s")},
        "verdicts": verdicts,
        "ok": all(v is not False for v in verdicts.values()),
        "seconds": round(time.perf_counter() - t0, 2),
    }
    return report


if __name__ == "__main__" and sys.argv[1:] == ["--measure-child"]:
    from toolkit.llama_runtime import child_main

    child_main(_measure_child)
