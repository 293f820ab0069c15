"""The fuzz harness's vocabulary: one damaged input is a ``Case``; generator modules ``gen_*.py`` each provide

    def cases(rng: random.Random, workdir: Path, n: int) -> list[Case]

which writes the case's input files under ``case_dir(workdir, name)`` (nothing else) and returns about ``n``
cases. ``bench/fuzz/run.py`` discovers every ``gen_*.py``, runs each case's ``coalora ARGV`` with
``$COALORA_HOME`` inside the work folder, and classifies the outcome (see ``run.py``). Shared inputs that are
expensive to build (a tiny GGUF model, a trained tiny run, an emitted device folder) come from ``Fixtures``:
built once under ``workdir/fixtures`` and only ever read or copied by cases.
"""
from __future__ import annotations

import json
import math
import random
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

ERROR = "error"  # expected outcome: a one-line `coalora: error:` or a click usage error, exit != 0
OK = "ok"        # a documented acceptance: exit 0; ``why`` says why that input is fine

KINDS = ("configuration", "profile", "option", "run", "data", "recipe", "gguf", "adapter", "device", "imatrix")


@dataclass
class Case:
    name: str                 # unique, "kind/what-N"; also the case folder's name (see case_dir)
    kind: str                 # one of KINDS
    argv: list[str]           # coalora arguments, without the program name; paths absolute
    expect: str = ERROR       # ERROR or OK
    why: str = ""             # for OK: the documented acceptance
    outputs: tuple[str, ...] = ()   # paths (relative to the work folder) an OK case may create or change
    isolate: bool = False     # run in a fresh interpreter, not a fork of the runner (llama.cpp, signals)
    usage_error: bool = False  # the error must be click's usage error (exit 2): an option out of its range
    timeout_s: float = 30.0

    def __post_init__(self):
        if self.expect not in (ERROR, OK):
            raise ValueError(f"case {self.name}: expect must be {ERROR!r} or {OK!r}")
        if self.expect == OK and not self.why:
            raise ValueError(f"case {self.name}: an accepted case documents why")
        self.argv = [str(a) for a in self.argv]


def case_dir(workdir: Path, name: str) -> Path:
    """The folder holding a case's inputs (and outputs): ``workdir/cases/<name with / as __>``."""
    d = Path(workdir) / "cases" / re.sub(r"[^A-Za-z0-9._-]", "_", name.replace("/", "__"))
    d.mkdir(parents=True, exist_ok=True)
    return d


def write(path: Path, content: bytes | str) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content.encode("utf-8", "surrogatepass") if isinstance(content, str) else content)
    return path


def write_json(path: Path, value) -> Path:
    """JSON as a hostile writer would: NaN / Infinity allowed (Python's json writes them)."""
    return write(path, json.dumps(value, allow_nan=True))


def deep_json(depth: int) -> str:
    return "[" * depth + "]" * depth


# Values that break a field expecting a number, a string, a list or a mapping.
HOSTILE_SCALARS = (None, True, False, 0, -1, 1.5, -0.0, 2**31, 2**63, 2**64 + 1, -2**63, 10**400,
                   math.nan, math.inf, -math.inf, "", "4", "1.5", "true", "false", "NaN", "x" * 10_000,
                   "../../etc", "é\u0000", [], {}, [1], {"a": 1})


def hostile_value(rng: random.Random, like=None):
    """A value of the wrong type or range, sometimes derived from ``like`` (the valid value it replaces)."""
    r = rng.random()
    if isinstance(like, (int, float)) and not isinstance(like, bool) and r < 0.3:
        return rng.choice([-like, like * 10**rng.randint(3, 30), like + 0.5, -1, 0, str(like)])
    if isinstance(like, str) and r < 0.3:
        return rng.choice([like.upper() + "X", like[::-1], like * 1000, like + "\u0000", 1, None])
    if isinstance(like, list) and like and r < 0.3:
        return rng.choice([like[:0], like * 50, [like], like[1:], like + [rng.choice(HOSTILE_SCALARS)]])
    return rng.choice(HOSTILE_SCALARS)


def flip_bytes(data: bytes, rng: random.Random, n: int = 1) -> bytes:
    b = bytearray(data)
    for _ in range(n):
        if b:
            i = rng.randrange(len(b))
            b[i] ^= 1 << rng.randrange(8)
    return bytes(b)


def truncate(data: bytes, rng: random.Random) -> bytes:
    return data[:rng.randrange(len(data))] if data else data


class Fixtures:
    """Valid inputs shared by the generators, built once under ``workdir/fixtures`` (lazily, on first use)."""

    def __init__(self, workdir: Path):
        self.root = Path(workdir) / "fixtures"

    def _cached(self, name: str, build) -> Path:
        p = self.root / name
        if not p.exists():
            self.root.mkdir(parents=True, exist_ok=True)
            tmp = self.root / (name + ".tmp")
            shutil.rmtree(tmp, ignore_errors=True)
            build(tmp)
            tmp.rename(p)
        return p

    def model_dir(self) -> Path:
        """A tiny Hugging Face Llama folder (tests/conftest.py's tiny model)."""
        from bench.fuzz.fixtures import build_model_dir
        return self._cached("tiny_llama", build_model_dir)

    def model_gguf(self) -> Path:
        """The tiny Llama as a Q8_0 GGUF (a folder holding model.gguf)."""
        from bench.fuzz.fixtures import build_model_gguf
        return self._cached("tiny_gguf", lambda d: build_model_gguf(d, self.model_dir())) / "model.gguf"

    def run(self) -> Path:
        """A trained tiny CoA-LoRA run folder (a few steps)."""
        from bench.fuzz.fixtures import build_run
        return self._cached("tiny_run", lambda d: build_run(d, self.model_gguf(), self.text()))

    def adapter_gguf(self) -> Path:
        """The run's adapter for uniform Q8_0 (a folder holding adapter.gguf)."""
        from bench.fuzz.fixtures import build_adapter
        return self._cached("tiny_adapter", lambda d: build_adapter(d, self.run())) / "adapter.gguf"

    def device(self) -> Path:
        """An emitted device folder (model.gguf + adapter.gguf + manifest.json) for a small profile."""
        from bench.fuzz.fixtures import build_device
        return self._cached("tiny_device", lambda d: build_device(d, self.run(), self.profile_toml())) / "tiny"

    def profile_toml(self) -> Path:
        """A valid device-profile TOML whose budget suits the tiny model."""
        from bench.fuzz.fixtures import build_profile
        return self._cached("tiny_profile", build_profile) / "tiny.toml"

    def imatrix(self) -> Path:
        """The tiny model's importance matrix, llama.cpp's GGUF format (`coalora imatrix` on the fixture text)."""
        from bench.fuzz.fixtures import build_imatrix
        return self._cached("tiny_imatrix", lambda d: build_imatrix(d, self.model_gguf(), self.text())) / "imatrix.gguf"

    def imatrix_dat(self) -> Path:
        """The same values in the legacy .dat format."""
        return self.imatrix().with_suffix(".dat")

    def text(self) -> Path:
        from bench.fuzz.fixtures import build_text
        return self._cached("tiny_text", build_text) / "text.txt"
