"""`coalora emit`: for a device profile, the best configuration within its budget as a model + adapter pair.

DIST/NAME/model.gguf     mixed-precision model (the configuration the search picked)
DIST/NAME/adapter.gguf   the LoRA adapter CoA-LoRA generates for that configuration (or, where the confirmation
                         measured it no better, the run's shared LoRA)
DIST/NAME/manifest.json  configuration, sizes, sha256, predicted perplexity and memory, commands

The folder is built beside its destination and renamed into place, so DIST/NAME is either the old
pair or the new one, never a mixture.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import time
from pathlib import Path

from toolkit import memory_model as mm
from converters.configuration import ModelLayout
from converters.errors import CoaloraError
from toolkit.evaluation import (N_CTX, N_WINDOWS, eval_windows, masked_perplexity, model_bos, perplexity,
                                records_digest, torch_window_nll, windows_digest)
from converters.fileio import sha256_file, write_json
from toolkit.profiles import Profile, plan_run_budget

MANIFEST = "manifest.json"
MODEL_FILE = "model.gguf"
ADAPTER_FILE = "adapter.gguf"
FORMAT = "coalora-dist/1"


def commands(profile: Profile, model: str = MODEL_FILE, adapter: str = ADAPTER_FILE) -> dict[str, str]:
    args = " ".join(profile.llama_args())
    return {"llama-cli": f"llama-cli -m {model} --lora {adapter} {args}",
            "llama-server": f"llama-server -m {model} --lora {adapter} {args} --host 127.0.0.1 --port 8080"}


def profile_dest(out_dir: Path, name: str) -> Path:
    """DIST/NAME, refused unless NAME is a plain folder name inside DIST (never DIST itself, a parent or a path)."""
    from toolkit.profiles import NAME

    if not isinstance(name, str) or not NAME.fullmatch(name):
        raise CoaloraError(f"profile name {str(name)[:60]!r} cannot name a folder in {out_dir}")
    return Path(out_dir) / name


CONFIRM = 2            # emit's default confirmation: the 2 best candidates (+ the best archived one and two
CONFIRM_WINDOWS = 16   # llama.cpp files that fit) measured on 16 held-out windows of the training data


def _best(run, layout: ModelLayout, budget: int, confirm: int = CONFIRM, confirm_windows: int = CONFIRM_WINDOWS):
    """The search's pick within ``budget``, as ``coalora search --confirm`` makes it."""
    from toolkit.budget_search import search_run

    return search_run(run, layout, budget, confirm, confirm_windows)


def eval_text(text_path=None) -> Path:
    from toolkit import assets

    p = Path(text_path) if text_path else assets.novel_path(assets.EVAL_NOVEL)
    if not p.is_file():
        raise CoaloraError(f"evaluation text not found: {p}" + ("" if text_path else "; run `coalora assets --fetch`"))
    return p


@contextlib.contextmanager
def _vocabulary(model_path):
    """The GGUF's own tokenizer (llama.cpp, vocabulary only)."""
    from llama_cpp import Llama

    from toolkit.llama_runtime import _quiet_llama_logs

    _quiet_llama_logs()
    try:
        vocab = Llama(model_path=str(model_path), vocab_only=True, verbose=False)
    except (ValueError, RuntimeError) as e:
        raise CoaloraError(f"llama.cpp cannot read the vocabulary of {model_path}: {e}") from None
    try:
        yield vocab
    finally:
        vocab.close()


def gguf_windows(model_path, text: str, n_windows: int, n_ctx: int):
    """Evaluation windows tokenized by the GGUF's own tokenizer: emit and validate then score exactly the
    same token ids."""
    with _vocabulary(model_path) as vocab:
        bos = model_bos(vocab)
        return eval_windows(vocab, text, n_windows, n_ctx, bos=bos), bos


def eval_set(model_path, data_path: Path, n_windows: int, n_ctx: int):
    """The evaluation windows of ``data_path`` tokenized by the GGUF's own vocabulary (llama.cpp): emit and
    validate score exactly the same tokens. Running text: (windows, None, bos, "text", digest); a record file
    (.jsonl, .json, .parquet, .csv): one window per record, scored on its answers, with their masks."""
    from converters.gguf_source import GGUFSource
    from toolkit.records import eval_records, is_record_file

    if not is_record_file(data_path):
        windows, bos = gguf_windows(model_path, Path(data_path).read_text(), n_windows, n_ctx)
        return windows, None, bos, "text", windows_digest(windows)
    src = GGUFSource(model_path)
    with _vocabulary(model_path) as vocab:
        bos = model_bos(vocab)
        windows, masks, fmt = eval_records(data_path, src.chat_template(), lambda t: list(
            vocab.tokenize(t.encode("utf-8"), add_bos=False, special=True)), n_windows, n_ctx,
            src.special_tokens(), bos)
    return windows, masks, bos, fmt, records_digest(windows, masks)


def predicted_perplexity(logits_fn, windows, masks) -> float:
    """What torch predicts llama.cpp will measure on the windows (the masked tokens, for records)."""
    if masks is None:
        return perplexity(torch_window_nll(logits_fn, windows))
    return masked_perplexity([torch_window_nll(logits_fn, [w])[0] for w in windows], masks)


def _num(x):
    return None if x is None else float(x)


def _install(tmp: Path, dest: Path) -> None:
    old = None
    if dest.exists():
        old = dest.with_name(f".{dest.name}.old-{os.getpid()}")
        os.replace(dest, old)
    os.replace(tmp, dest)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def emit(run, profile: Profile, out_dir, n_windows: int = N_WINDOWS, n_ctx: int = N_CTX, text_path=None,
         log=lambda msg: None, confirm: int = CONFIRM, confirm_windows: int = CONFIRM_WINDOWS) -> dict:
    """Write DIST/<profile.name>/ for ``run`` and return its manifest. ``confirm`` (0: off) and
    ``confirm_windows``: the search's confirmation, as ``coalora search --confirm``."""
    t0 = time.perf_counter()
    from converters.gguf_model_writer import write_gguf

    loaded = run.loaded()
    layout = run.layout
    plan = plan_run_budget(profile, run.meta, layout)
    arch, budget = plan.arch, plan.budget_bytes
    log(f"{profile.name}: model budget {budget / 1e6:.1f} MB" + (
        f"; measuring the best candidates on {confirm_windows} held-out windows" if confirm else ""))
    try:
        res = _best(run, plan.layout, budget, confirm, confirm_windows)
    except CoaloraError as e:
        raise CoaloraError(f"profile {profile.name}: {e}") from None
    cfg = res.cfg
    avoided = sorted({q.name for q in cfg.types.values()} & set(profile.avoid))
    text_file = eval_text(text_path)

    out_dir = Path(out_dir)
    dest = profile_dest(out_dir, profile.name)
    if out_dir.exists() and not out_dir.is_dir():
        raise CoaloraError(f"output {out_dir} is not a folder")
    made = [d for d in (out_dir, *out_dir.parents) if not d.exists()]  # removed again if emit fails
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{profile.name}.", suffix=".part", dir=out_dir))
    except OSError as e:
        raise CoaloraError(f"cannot write into {out_dir}: {e.strerror or e}") from None
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)
    try:
        model_path, adapter_path = tmp / MODEL_FILE, tmp / ADAPTER_FILE
        log(f"{profile.name}: writing {MODEL_FILE} ({res.file_bytes / 1e6:.1f} MB, {res.bpw:.2f} bpw)")
        run.write_adapter(cfg, adapter_path, adjusted=res.adjusted)  # first: a checkpoint not fitting the run fails before the slow part
        write_gguf(loaded.gguf, model_path, cfg, quantized=run.quantized_bytes, progress=False)
        model_bytes, adapter_bytes = model_path.stat().st_size, adapter_path.stat().st_size

        log(f"{profile.name}: predicting perplexity on {n_windows} windows of {n_ctx} tokens")
        windows, masks, bos, data_format, digest = eval_set(model_path, text_file, n_windows, n_ctx)
        ppl = predicted_perplexity(run.torch_logits_fn(cfg, adjusted=res.adjusted), windows, masks)

        mem = profile.memory(arch, model_bytes, adapter_bytes, mm.repack_bytes(layout, cfg))
        manifest = {
            "format": FORMAT,
            "profile": profile.to_dict(),
            "run": str(Path(run.path).resolve()),
            "source_model": {"path": str(Path(run.meta["model"]).resolve()), "sha256": run.meta.get("model_sha256")},
            "imatrix_sha256": run.meta.get("imatrix_sha256"),  # the importance matrix the model was quantized with
            "architecture": arch.__dict__,
            "configuration": cfg.to_json()["types"],
            "histogram": cfg.histogram(),
            "search": {"budget_bytes": budget, "file_bytes": int(res.file_bytes), "bits_per_weight": float(res.bpw),
                       "predicted_loss": _num(res.predicted_loss), "predicted_ppl": _num(res.predicted_ppl),
                       "source": getattr(res, "source", ""),
                       "measured_loss": _num(res.measured_loss), "confirmation": res.confirmation,
                       "adapter": "generated" if res.adjusted else "shared",
                       "avoided_types_used": avoided},
            "files": {MODEL_FILE: {"bytes": model_bytes, "sha256": sha256_file(model_path)},
                      ADAPTER_FILE: {"bytes": adapter_bytes, "sha256": sha256_file(adapter_path)}},
            "evaluation": {"text": text_file.name, "text_path": str(text_file.resolve()), "text_sha256": sha256_file(text_file), "n_windows": n_windows,
                           "data_format": data_format, "n_ctx": n_ctx, "bos": bos, "windows_sha256": digest,
                           "predicted_perplexity": ppl},
            "memory": mem.as_dict(),
            "fits": {"model_budget": model_bytes <= budget, "memory_model": mem.total <= profile.process_budget_bytes},
            "commands": commands(profile),
            "seconds": round(time.perf_counter() - t0, 2),
        }
        write_json(tmp / MANIFEST, manifest)
        _install(tmp, dest)
        made = []
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
        for d in made:  # innermost first: folders this call created, left empty by a failure
            with contextlib.suppress(OSError):
                d.rmdir()
    return manifest
