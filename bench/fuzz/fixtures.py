"""Builders of the valid inputs the fuzz generators damage (see ``cases.Fixtures``): each writes into a fresh
folder through the real CLI, so a fixture is what a user would have."""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

# A profile whose budget the tiny model (about 1 MB in Q8_0) fits.
TINY_PROFILE = """name = "tiny"
description = "fuzz fixture: a small device"
memory_bytes = 268_435_456
model_share = 0.5
context_length = 256
threads = 2
ubatch = 64
kv_cache_type = "f16"
flash_attn = false
prefer = ["Q8_0"]
avoid = []
"""


def _conftest():
    spec = importlib.util.spec_from_file_location("coalora_tests_conftest", ROOT / "tests" / "conftest.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def coalora(*args, home: Path | None = None) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    if home is not None:
        env["COALORA_HOME"] = str(home)
    r = subprocess.run([sys.executable, "-m", "toolkit.cli", *map(str, args)], capture_output=True, text=True,
                       cwd=ROOT, env=env)
    if r.returncode != 0:
        raise RuntimeError(f"fixture command coalora {' '.join(map(str, args))} failed:\n{r.stderr[-3000:]}")


def _home(d: Path) -> Path:
    """The fixtures' own COALORA_HOME (quantization cache), beside them."""
    return d.parent / "home"


def build_model_dir(d: Path) -> None:
    d.mkdir(parents=True)
    _conftest().build_tiny_llama(d)


def build_model_gguf(d: Path, model_dir: Path) -> None:
    d.mkdir(parents=True)
    coalora("convert", model_dir, "-o", d / "model.gguf", "--type", "Q8_0", home=_home(d))


def build_text(d: Path) -> None:
    d.mkdir(parents=True)
    (d / "text.txt").write_text(_conftest().tiny_corpus(6000, seed=1))


def build_profile(d: Path) -> None:
    d.mkdir(parents=True)
    (d / "tiny.toml").write_text(TINY_PROFILE)


def build_run(d: Path, model_gguf: Path, text: Path) -> None:
    """As small as training gets (the fuzz cases damage the run, they do not judge it)."""
    coalora("train", model_gguf, "--data", text, "-o", d, "--steps", 2, "--rounds", 1, "--seq-len", 32,
            "--batch", 1, "--search-candidates", 1, "--checkpoint-every", 1, "--rank", 2, "--menu", "Q8_0,Q4_0",
            home=_home(d))


def build_adapter(d: Path, run: Path) -> None:
    d.mkdir(parents=True)
    coalora("adapter", run, "--config", "Q8_0", "-o", d / "adapter.gguf", home=_home(d))


def build_device(d: Path, run: Path, profile: Path) -> None:
    text = Path(profile).parent.parent / "tiny_text" / "text.txt"
    coalora("emit", run, "--profile", profile, "-o", d, "--windows", 2, "--data", text, home=_home(d))


def build_imatrix(d: Path, model_gguf: Path, text: Path) -> None:
    """The tiny model's importance matrix in llama.cpp's GGUF format, and the same values as a legacy .dat."""
    d.mkdir(parents=True)
    coalora("imatrix", model_gguf, "--data", text, "-o", d / "imatrix.gguf", "--chunks", 4, "--seq-len", 32,
            home=_home(d))
    from converters import imatrix

    imatrix.save_dat(imatrix.load(d / "imatrix.gguf"), d / "imatrix.dat")
