"""A Hugging Face model folder as a float GGUF, made by llama.cpp's own ``convert_hf_to_gguf.py``.

The converter comes from the llama.cpp sources in llama-cpp-python's sdist (``make setup`` puts it in
``.venv/llama.cpp``; ``$COALORA_LLAMA_CPP_CONVERTER`` points elsewhere). It runs in a child process with
llama.cpp's own gguf-py. The output type is lossless for the folder's weights (BF16 or F16 when every
matrix is stored so, F32 otherwise); results are cached in ``$COALORA_HOME/converted`` by content hash.
"""
from __future__ import annotations

import hashlib
import json
import os
import struct
import subprocess
import sys
from pathlib import Path

from converters.architectures import by_hf_model_type
from converters.errors import CoaloraError
from converters.fileio import atomic_path, coalora_home, model_fingerprint

CONVERTER_ENV = "COALORA_LLAMA_CPP_CONVERTER"
_RUNNER = Path(__file__).with_name("llama_cpp_converter_runner.py")
_LOSSLESS = {"BF16": "bf16", "F16": "f16"}


def converter_dir() -> Path:
    d = Path(os.environ.get(CONVERTER_ENV) or Path(sys.prefix) / "llama.cpp")
    if not (d / "convert_hf_to_gguf.py").is_file():
        raise CoaloraError(f"llama.cpp's convert_hf_to_gguf.py is not in {d}; run `make setup` "
                           f"(or set ${CONVERTER_ENV})")
    return d


def folder_model_type(folder: Path) -> str:
    cfg = folder / "config.json"
    if not cfg.is_file():
        raise CoaloraError(f"{folder}: no config.json (not a Hugging Face model folder)")
    try:
        d = json.loads(cfg.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise CoaloraError(f"cannot read {cfg}: {str(e)[:200]}") from None
    t = d.get("model_type") if isinstance(d, dict) else None
    if not isinstance(t, str):
        raise CoaloraError(f"{cfg}: no model_type")
    return t


def _safetensors_dtypes(folder: Path) -> set[str]:
    """dtypes of the 2-D tensors in the folder's safetensors files (from their headers only)."""
    out = set()
    for f in sorted(folder.glob("*.safetensors")):
        try:
            with open(f, "rb") as fh:
                n = struct.unpack("<Q", fh.read(8))[0]
                if n > 100 << 20:
                    raise ValueError("header too large")
                header = json.loads(fh.read(n))
        except (OSError, ValueError, struct.error) as e:
            raise CoaloraError(f"{f}: not a safetensors file ({str(e)[:100]})") from None
        out |= {v["dtype"] for k, v in header.items() if k != "__metadata__" and isinstance(v, dict)
                and len(v.get("shape", ())) == 2}
    if not out:
        raise CoaloraError(f"{folder}: no safetensors weights")
    return out


def output_type(folder: Path) -> str:
    dtypes = _safetensors_dtypes(folder)
    return _LOSSLESS.get(dtypes.pop(), "f32") if len(dtypes) == 1 else "f32"


def convert_folder(folder, log=lambda m: None) -> Path:
    """The float GGUF of a Hugging Face model folder (converted once, then cached)."""
    folder = Path(folder)
    by_hf_model_type(folder_model_type(folder))  # refuse what coalora cannot pair before converting
    outtype = output_type(folder)
    # keyed by the weights and by how they are converted (the runner, the converter's version)
    conv = converter_dir()
    how = hashlib.sha256(_RUNNER.read_bytes() + (conv / "convert_hf_to_gguf.py").read_bytes()).hexdigest()[:8]
    out = coalora_home() / "converted" / f"{model_fingerprint(folder)[:16]}-{how}-{outtype}.gguf"
    if out.is_file():
        return out
    log(f"converting {folder} to {outtype.upper()} GGUF with llama.cpp's convert_hf_to_gguf.py (cached in {out.parent})")
    with atomic_path(out) as tmp:
        env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
        env.pop("NO_LOCAL_GGUF", None)  # the converter must use llama.cpp's own gguf-py
        proc = subprocess.run([sys.executable, str(_RUNNER), str(conv), str(folder.resolve()), "--outtype", outtype,
                               "--outfile", str(tmp)], capture_output=True, text=True, env=env)
        if proc.returncode != 0:
            raise CoaloraError(f"llama.cpp's converter cannot convert {folder}: {_last_error(proc.stderr)}")
    return out


def _last_error(stderr: str) -> str:
    lines = [ln.strip() for ln in stderr.splitlines() if ln.strip() and not ln.startswith(("INFO:", "WARNING:", "Writing"))]
    errs = [ln for ln in lines if "Error" in ln.split(":", 1)[0] or ln.startswith("ERROR")]
    return ((errs or lines or ["exit status non-zero"])[-1])[:300]
