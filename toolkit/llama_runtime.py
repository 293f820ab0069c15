"""llama-cpp-python (0.3.36) wrapper: exact logits, checked LoRA adapters, adapter swaps without reloading.

Exactness: logits for every token, an F32 KV cache (type_k = type_v = GGML_TYPE_F32 = 0) and flash
attention off, so an F32 GGUF agrees with transformers to ~1e-5.

Adapters: ``Llama(lora_path=...)`` is never used — in 0.3.36 it tests the returned pointer with
``is None`` (a NULL ctypes pointer is not None) and crashes on a bad file. Here every adapter file is
first checked (converters.gguf_check, then against the model), then loaded with ``llama_adapter_lora_init``
whose result is tested for NULL.

Damaged files: llama.cpp aborts the process (GGML_ASSERT) on some inputs that are well-formed GGUF.
Callers check a model with ``converters.gguf_source.GGUFSource`` (structure, tensor set, hyperparameters,
vocabulary) and then :func:`probe` it: load and a short evaluation in a child process, so that whatever
the checks still miss kills the child, and the user gets a one-line error naming the file.
"""
from __future__ import annotations

import contextlib
import ctypes
import json
import os
import re
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from converters.errors import CoaloraError
from converters.gguf_check import open_reader
from toolkit.evaluation import nll_from_logits

GGML_TYPE_F32 = 0
MAX_THREADS = 512  # GGML_MAX_N_THREADS: ggml aborts above it
PROBE_TOKENS = 8
_LORA_NAME = re.compile(r"^(?P<base>.+)\.lora_(?P<ab>[ab])$")


def _quiet_llama_logs() -> None:
    """Silence llama.cpp's own log lines (the Llama object's verbose=False does not cover all of them)."""
    import llama_cpp

    global _LOG_CB
    if "_LOG_CB" in globals():
        return
    _LOG_CB = llama_cpp.llama_log_callback(lambda level, text, user: None)
    llama_cpp.llama_log_set(_LOG_CB, ctypes.c_void_p(0))


def open_model(path, n_ctx: int = 512, n_threads: int | None = None, f32_kv: bool = True, seed: int = 0,
               n_batch: int | None = None, kv_type: int | None = None):
    """A CPU ``llama_cpp.Llama`` with logits for all tokens (F32 KV cache unless ``f32_kv`` is False)."""
    from llama_cpp import Llama

    path = Path(path)
    if not path.is_file():
        raise CoaloraError(f"model file not found: {path}")
    check_threads(n_threads)
    _quiet_llama_logs()
    kv = GGML_TYPE_F32 if f32_kv else kv_type
    try:
        return Llama(model_path=str(path), n_ctx=n_ctx, n_batch=n_batch or n_ctx, n_ubatch=n_batch or n_ctx,
                     n_threads=n_threads or max(1, os.cpu_count() or 1), n_threads_batch=n_threads or None,
                     n_gpu_layers=0, logits_all=True, flash_attn=False, type_k=kv, type_v=kv, seed=seed,
                     verbose=False)
    except (ValueError, RuntimeError) as e:
        raise CoaloraError(f"llama.cpp cannot load {path}: {e}") from None


def check_threads(n) -> None:
    """A thread count llama.cpp can run (None: its default)."""
    if n is not None and (isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= MAX_THREADS):
        raise CoaloraError(f"threads must be an integer from 1 to {MAX_THREADS}, got {str(n)[:20]}")


def probe(model, adapter=None, n_ctx: int = 512, threads: int | None = None, timeout: float = 600) -> None:
    """Load ``model`` (and ``adapter``, already checked with validate_adapter_file) with llama.cpp in a child
    process and evaluate a few tokens; a crash or a refusal there is a CoaloraError naming the file."""
    check_threads(threads)
    model = Path(model)
    args = {"model": str(model), "adapter": None if adapter is None else str(adapter), "n_ctx": int(n_ctx),
            "threads": threads}
    files = model.name + ("" if adapter is None else f" with {Path(adapter).name}")
    run_child("toolkit.llama_runtime", "--probe", args, files, timeout)


def run_child(module: str, flag: str, args: dict, files: str, timeout: float) -> str:
    """``python -m module flag`` with ``args`` as JSON on stdin; its stdout. A signal (llama.cpp's abort), an
    error exit or a timeout is a one-line CoaloraError naming ``files``."""
    try:
        res = subprocess.run([sys.executable, "-m", module, flag], input=json.dumps(args), capture_output=True,
                             text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise CoaloraError(f"llama.cpp ran past {timeout:.0f} s on {files}") from None
    if res.returncode < 0:
        try:
            sig = signal.Signals(-res.returncode).name
        except ValueError:
            sig = f"signal {-res.returncode}"
        raise CoaloraError(f"llama.cpp crashed ({sig}) on {files}: a damaged file or settings it cannot run")
    if res.returncode != 0:
        last = (res.stderr.strip().splitlines() or [f"exit {res.returncode}"])[-1][:200]
        raise CoaloraError(f"llama.cpp failed on {files}: {last}")
    return res.stdout


def child_main(fn) -> None:
    """The child side of run_child: ``fn(args)``'s JSON result on stdout, an error's one line on stderr."""
    try:
        out = fn(json.loads(sys.stdin.read()))
        print(json.dumps(out), flush=True)
    except BaseException as e:  # report it; the interpreter teardown would hide it
        msg = " ".join(str(e).split())[:200] or type(e).__name__
        print(msg if isinstance(e, CoaloraError) else f"{type(e).__name__}: {msg}", file=sys.stderr, flush=True)
        os._exit(1)
    os._exit(0)  # skip interpreter teardown: llama_cpp's finalizers can fail at shutdown


def _probe_child(args: dict) -> None:
    """Runs in the child: what the parent is about to do with the files, on a few tokens."""
    llm = open_model(args["model"], n_ctx=args["n_ctx"], n_threads=args["threads"])
    tokens = list(llm.tokenize(b"The quick brown fox", add_bos=True, special=False))[:PROBE_TOKENS]
    window_logits(llm, tokens or [0])
    if args["adapter"]:
        h = load_checked_adapter(llm, args["adapter"])
        set_adapter(llm, h)
        window_logits(llm, tokens or [0])
        h.close()
    llm.close()


def window_logits(llm, tokens: Sequence[int]) -> np.ndarray:
    """Logits [T, V] of one window evaluated from an empty cache."""
    if len(tokens) > llm.n_ctx():
        raise CoaloraError(f"window of {len(tokens)} tokens exceeds the context of {llm.n_ctx()}")
    llm.reset()
    llm.eval(list(tokens))
    return np.array(llm.scores[:len(tokens)], dtype=np.float32)


def llama_window_nll(llm, windows: Sequence[Sequence[int]]) -> np.ndarray:
    """Per-token NLL [n_windows, n_ctx-1], scoring exactly what ``evaluation.torch_window_nll`` scores."""
    return np.stack([nll_from_logits(window_logits(llm, w), w) for w in windows])


# ---------------------------------------------------------------------------------------------------
# adapter files


def _field(reader, key: str):
    f = reader.get_field(key)
    if f is None:
        return None
    try:
        return f.contents()
    except Exception:
        return None


@dataclass
class AdapterInfo:
    path: Path
    architecture: str
    alpha: float | None
    rank: int
    targets: dict[str, tuple[int, int]]   # base tensor -> (n_in, n_out)


def validate_adapter_file(adapter_path, model_path) -> AdapterInfo:
    """Check a LoRA GGUF against its base model before llama.cpp sees it; CoaloraError on any mismatch."""
    from gguf.quants import dequantize

    ad = open_reader(adapter_path, "adapter file")
    md = open_reader(model_path, "model file")
    name = Path(adapter_path).name
    if _field(ad, "general.type") != "adapter":
        raise CoaloraError(f"{name}: general.type is {_field(ad, 'general.type')!r}, not 'adapter'")
    if _field(ad, "adapter.type") != "lora":
        raise CoaloraError(f"{name}: adapter.type is {_field(ad, 'adapter.type')!r}, not 'lora'")
    arch, march = _field(ad, "general.architecture"), _field(md, "general.architecture")
    if arch != march:
        raise CoaloraError(f"{name}: adapter is for architecture {arch!r}, the model is {march!r}")
    alpha = _field(ad, "adapter.lora.alpha")
    if alpha is not None and not (isinstance(alpha, (int, float)) and np.isfinite(alpha)):
        raise CoaloraError(f"{name}: adapter.lora.alpha is not a finite number ({alpha!r})")

    base = {t.name: tuple(int(x) for x in t.shape) for t in md.tensors}
    pairs: dict[str, dict] = {}
    for t in ad.tensors:
        m = _LORA_NAME.match(t.name)
        if not m:
            raise CoaloraError(f"{name}: tensor {t.name!r} is not a lora_a/lora_b tensor")
        pairs.setdefault(m["base"], {})[m["ab"]] = t
    if not pairs:
        raise CoaloraError(f"{name}: adapter has no tensors")

    ranks, targets = set(), {}
    for b, ab in pairs.items():
        if set(ab) != {"a", "b"}:
            raise CoaloraError(f"{name}: {b} has lora_{''.join(ab)} but not its partner")
        if b not in base:
            raise CoaloraError(f"{name}: {b} does not exist in the model {Path(model_path).name}")
        a, bt = ab["a"], ab["b"]
        ane, bne, mne = tuple(int(x) for x in a.shape), tuple(int(x) for x in bt.shape), base[b]
        if len(ane) != 2 or len(bne) != 2 or len(mne) != 2:
            raise CoaloraError(f"{name}: {b} lora tensors must be 2-D")
        if b == "token_embd.weight":  # llama.cpp flips A and B for the embedding (llm_build_inp_embd)
            ok = bne[1] == mne[0] and ane[1] == mne[1] and ane[0] == bne[0]
            r = ane[0]
        else:
            ok = ane[0] == mne[0] and bne[1] == mne[1] and ane[1] == bne[0]
            r = ane[1]
        if not ok or r < 1:
            raise CoaloraError(f"{name}: {b} lora_a {ane} / lora_b {bne} do not fit the model tensor {mne} "
                               f"(expected lora_a (n_in, r), lora_b (r, n_out))")
        ranks.add(r)
        targets[b] = mne
        for t in (a, bt):
            try:
                vals = dequantize(np.asarray(t.data), t.tensor_type)
            except Exception as e:
                raise CoaloraError(f"{name}: cannot read {t.name}: {e}") from None
            if not np.isfinite(vals).all():
                raise CoaloraError(f"{name}: {t.name} has non-finite values")
    if len(ranks) != 1:
        raise CoaloraError(f"{name}: inconsistent LoRA ranks {sorted(ranks)}")
    return AdapterInfo(Path(adapter_path), arch, None if alpha is None else float(alpha), ranks.pop(), targets)


# ---------------------------------------------------------------------------------------------------
# adapters in a live model


class AdapterHandle:
    """A loaded ``llama_adapter_lora``; freed by ``close()`` or when its Llama is closed (whichever first)."""

    def __init__(self, llm, ptr, info: AdapterInfo):
        self._llm, self.ptr, self.info = llm, ptr, info
        llm._stack.callback(self.close)  # runs before the context and model are freed

    @property
    def path(self) -> Path:
        return self.info.path

    def close(self) -> None:
        import llama_cpp

        if self.ptr is None:
            return
        llm = self._llm
        if getattr(llm, "_coalora_adapter", None) is self:
            with contextlib.suppress(Exception):
                set_adapter(llm, None)
        llama_cpp.llama_adapter_lora_free(self.ptr)
        self.ptr = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _model_ptr(llm):
    return llm._model.model if hasattr(llm, "_model") else llm.model


def _ctx_ptr(llm):
    return llm._ctx.ctx if hasattr(llm, "_ctx") else llm.ctx


def load_adapter(llm, path, model_path) -> AdapterHandle:
    """Validate ``path`` against ``model_path`` (the GGUF ``llm`` was opened from) and load it."""
    return load_checked_adapter(llm, path, validate_adapter_file(path, model_path))


def load_checked_adapter(llm, path, info: AdapterInfo | None = None) -> AdapterHandle:
    """Load an adapter already checked with validate_adapter_file (here, or by the parent process)."""
    import llama_cpp

    ptr = llama_cpp.llama_adapter_lora_init(_model_ptr(llm), str(Path(path)).encode("utf-8"))
    if not ptr:  # NULL: llama.cpp refused the file
        raise CoaloraError(f"llama.cpp refused the adapter {Path(path).name}")
    return AdapterHandle(llm, ptr, info or AdapterInfo(Path(path), "", None, 0, {}))


def set_adapter(llm, handle: AdapterHandle | None, scale: float = 1.0) -> None:
    """Make ``handle`` the only active adapter (None: none), keeping the model and context loaded."""
    import llama_cpp

    if handle is None:
        rc = llama_cpp.llama_set_adapters_lora(_ctx_ptr(llm), None, 0, None)
    else:
        if handle.ptr is None:
            raise CoaloraError(f"adapter {handle.path.name} has been closed")
        arr = (llama_cpp.llama_adapter_lora_p_ctypes * 1)(handle.ptr)
        scales = (ctypes.c_float * 1)(scale)
        rc = llama_cpp.llama_set_adapters_lora(_ctx_ptr(llm), arr, 1, scales)
    if rc != 0:
        raise CoaloraError(f"llama.cpp could not set the adapter (code {rc})")
    llm._coalora_adapter = handle
    llm.reset()  # cached logits / KV belong to the previous adapter


if __name__ == "__main__" and sys.argv[1:] == ["--probe"]:
    child_main(_probe_child)
