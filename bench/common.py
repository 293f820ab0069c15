"""Helpers shared by the benchmark scripts: running the CLI, timing, tables, result files."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
COALORA = [sys.executable, "-m", "toolkit.cli"]


def _git_state() -> dict:
    def git(*a):
        r = subprocess.run(["git", *a], capture_output=True, text=True, cwd=ROOT)
        return r.stdout.strip() if r.returncode == 0 else None
    if os.environ.get("COALORA_BENCH_COMMIT"):
        # a copy of a clean checkout on another machine (a lent GPU machine), whose .git may be missing or stale:
        # the caller names the commit it copied
        return {"commit": os.environ["COALORA_BENCH_COMMIT"], "dirty": False, "commit_from": "COALORA_BENCH_COMMIT"}
    # dirty: the code differs from the commit (result files other benchmarks are writing and the README they
    # feed do not count)
    status = git("status", "--porcelain", "--untracked-files=no", "--", ".", ":!bench/results", ":!README.md")
    return {"commit": git("rev-parse", "HEAD"), "dirty": bool(status)}


_STARTED = _git_state()  # the code a benchmark runs is the code it started with, whatever is committed meanwhile


def cpu_model() -> str | None:
    """The CPU's model name: timings depend on it, and so do trained weights (float kernels differ by CPU)."""
    import platform

    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


def provenance() -> dict:
    """What made a result: the commit the script started at (and whether the tree had changes then), the
    exact command, the date it finished, the CPU, and the machine's load then (1, 5 and 15-minute load averages
    against its CPU count: whether other work shared the machine, which timings depend on)."""
    import datetime

    return {**_STARTED, "command": " ".join([Path(sys.executable).name, *sys.argv]),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "cpu": cpu_model(), "cpu_count": os.cpu_count(), "load_average": [round(x, 2) for x in os.getloadavg()]}


def run_fingerprint(run: Path) -> str:
    """The sha256 of a trained run's weights and importance matrix: a result measured on one run is reused only
    for the same run, not for another trained at the same path (training on another CPU gives other weights)."""
    import hashlib

    from converters.fileio import sha256_file

    parts = [sha256_file(run / n) if (run / n).exists() else "-" for n in ("checkpoint.safetensors", "imatrix.gguf")]
    return hashlib.sha256(" ".join(parts).encode()).hexdigest()


def load_sentence(prov: dict) -> str:
    """The load a provenance() recorded, for the text beside timings (other work inflates them)."""
    _, five, fifteen = prov["load_average"]
    return (f"machine load when written: {five:.1f} (5-minute average) and {fifteen:.1f} (15-minute) on "
            f"{prov['cpu_count']} CPUs")


def peak_self_rss_mb() -> float:
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def peak_child_rss_mb() -> float:
    """Largest resident memory any finished child process (e.g. a training run) reached, in MB."""
    import resource
    return resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024


def cli(*args, check=True) -> tuple[dict | str, float]:
    """Run ``coalora ARGS --json`` in a subprocess; returns (parsed JSON or text, wall seconds)."""
    t = time.perf_counter()
    res = subprocess.run([*COALORA, *map(str, args)], capture_output=True, text=True, cwd=ROOT,
                         env={**os.environ, "PYTHONUNBUFFERED": "1"})
    wall = time.perf_counter() - t
    if check and res.returncode != 0:
        sys.exit(f"coalora {' '.join(map(str, args))} failed:\n{res.stderr[-2000:]}")
    try:
        return json.loads(res.stdout), wall
    except json.JSONDecodeError:
        return res.stdout, wall


def llama_quantize(src, dst, ftype: int | str, *, pure: bool = False, overrides=(), imatrix=None, nthread: int = 2,
                   allow_requantize: bool = False) -> float:
    """llama.cpp's own ``llama_model_quantize`` (what llama-quantize runs); returns its seconds.

    ``ftype``: a llama_ftype number or a name such as "Q4_K_M"; ``overrides``: (regex, quant type) pairs, as
    ``--tensor-type``; ``imatrix``: a :class:`converters.imatrix.Imatrix`, fed through
    ``llama_model_quantize_params.imatrix`` as ``llama-quantize --imatrix`` does."""
    import ctypes

    import llama_cpp

    from converters.quant_types import get
    from toolkit.llama_runtime import _quiet_llama_logs

    _quiet_llama_logs()
    p = llama_cpp.llama_model_quantize_default_params()
    p.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{ftype}") if isinstance(ftype, str) else ftype
    p.pure, p.nthread, p.allow_requantize = pure, nthread, allow_requantize
    keep = []  # the arrays the C structs point into, alive until the call returns
    if overrides:
        arr = (llama_cpp.llama_model_tensor_override * (len(overrides) + 1))()
        for i, (pattern, q) in enumerate(overrides):
            arr[i].pattern, arr[i].type = pattern.encode(), int(get(q).ggml)
        arr[len(overrides)].pattern = None
        p.tt_overrides = ctypes.cast(arr, ctypes.POINTER(llama_cpp.llama_model_tensor_override))
        keep.append(arr)
    if imatrix is not None:
        from converters.llama_mixes import imatrix_param
        p.imatrix = imatrix_param(imatrix, keep)
    t = time.perf_counter()
    part = Path(dst).with_name(Path(dst).name + ".part")  # an interrupted call leaves no file that looks complete
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(part).encode(), ctypes.byref(p))
    if rc != 0:
        part.unlink(missing_ok=True)
        raise RuntimeError(f"llama_model_quantize {ftype} of {src} failed ({rc})")
    os.replace(part, dst)
    return time.perf_counter() - t


def toml_value(v) -> str:
    """A TOML value (profiles and recipes written by the benchmarks and the fuzz generator)."""
    import math

    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        return "nan" if math.isnan(v) else ("inf" if v > 0 else "-inf") if math.isinf(v) else repr(v)
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, list):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{json.dumps(str(k))} = {toml_value(x)}" for k, x in v.items()) + "}"
    raise TypeError(type(v))


def toml_text(d: dict) -> str:
    """A flat TOML document of ``d`` (None values left out)."""
    return "".join(f"{json.dumps(k)} = {toml_value(v)}\n" for k, v in d.items() if v is not None)


def markdown_table(rows: list[dict], columns: list[tuple[str, str]]) -> str:
    head = "| " + " | ".join(title for _, title in columns) + " |"
    sep = "|" + "|".join("---" for _ in columns) + "|"
    body = ["| " + " | ".join(_fmt(r.get(key)) for key, _ in columns) + " |" for r in rows]
    return "\n".join([head, sep, *body])


def _fmt(v) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:,.3f}" if abs(v) < 1000 else f"{v:,.0f}"
    if isinstance(v, int):
        return f"{v:,}"
    return str(v)


def stock_with_imatrix(f32, out: Path, ftype: str, imatrix_path) -> Path:
    """``out``: llama.cpp's file type ``ftype`` of ``f32`` quantized with the importance matrix file
    ``imatrix_path`` (as ``llama-quantize --imatrix``), made unless it exists."""
    if not Path(out).exists():
        from converters import imatrix as imx
        llama_quantize(f32, out, ftype, imatrix=imx.load(imatrix_path))
    return Path(out)


def write_results(name: str, payload: dict, markdown: str, results_dir: Path | None = None) -> None:
    """NAME.json (with provenance(), unless the payload brings its own) and NAME.md; the README's tables are made
    from these by bench/readme_tables.py."""
    from converters.fileio import write_json, write_text

    payload = {"provenance": provenance(), **payload}
    out = Path(results_dir or RESULTS)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / f"{name}.json", payload)
    write_text(out / f"{name}.md", markdown + "\n")
    print(markdown)
    print(f"\nwrote {out / (name + '.json')} and .md")


def perplexity_plot(path: Path, title: str, draw, log_y: bool = False) -> None:
    """A perplexity-against-bits-per-weight PNG; ``draw(ax)`` adds the series."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from converters.fileio import atomic_path

    fig, ax = plt.subplots(figsize=(7, 4.5))
    draw(ax)
    if log_y:
        ax.set_yscale("log")
    ax.set_xlabel("bits per weight (quantized tensors)")
    ax.set_ylabel("perplexity, Pride and Prejudice (llama.cpp" + (", log scale)" if log_y else ")"))
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)
