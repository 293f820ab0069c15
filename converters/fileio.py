"""Atomic writes: every output goes to a temporary file in the same folder and is renamed."""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from pathlib import Path

from converters.errors import CoaloraError


def coalora_home() -> Path:
    """Where coalora keeps assets and caches (``$COALORA_HOME``, default ``~/.cache/coalora``)."""
    return Path(os.environ.get("COALORA_HOME", Path.home() / ".cache" / "coalora"))


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike):
    """Yield a temporary path beside ``path``; rename it onto ``path`` only if the block succeeds."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".part", dir=path.parent)
        os.close(fd)
    except OSError as e:
        raise CoaloraError(f"cannot write {path}: {e.strerror or e}") from None
    try:
        yield Path(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_bytes(path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_text(path, text: str) -> None:
    write_bytes(path, text.encode())


def write_json(path, obj) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def read_parsed(path, loads, kind: str, label: str = ""):
    """``loads`` of the UTF-8 text of ``path`` (a JSON or TOML file, ``kind`` names it); an unreadable,
    non-UTF-8, malformed or absurdly nested file is a one-line CoaloraError naming ``label path`` (what the
    values mean is the reader's schema's business)."""
    what = f"{label} {path}".lstrip()
    try:
        return loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CoaloraError(f"{label + ' file' if label else 'file'} not found: {path}") from None
    except IsADirectoryError:
        raise CoaloraError(f"{what} is a folder, not a {kind} file") from None
    except UnicodeDecodeError as e:
        raise CoaloraError(f"{what} is not UTF-8 text (byte {e.start})") from None
    except RecursionError:
        raise CoaloraError(f"{what} is nested too deeply to be a coalora file") from None
    except (OSError, ValueError) as e:  # json.JSONDecodeError and tomllib.TOMLDecodeError are ValueErrors
        raise CoaloraError(f"{what} is unreadable: {getattr(e, 'strerror', None) or e}") from None


def read_json(path):
    """Parsed JSON of ``path`` (:func:`read_parsed`)."""
    return read_parsed(path, json.loads, "JSON")


def sha256_file(path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def model_fingerprint(path) -> str:
    """sha256 of a model file, or of a model folder's weights, config and tokenizer files."""
    path = Path(path)
    if path.is_file():
        return sha256_file(path)
    h = hashlib.sha256()
    for f in sorted(path.iterdir()):
        if f.is_file() and (f.suffix in (".safetensors", ".bin", ".gguf") or f.name in
                            ("config.json", "tokenizer.json", "tokenizer.model", "tokenizer_config.json",
                             "special_tokens_map.json", "chat_template.jinja")):
            h.update(f.name.encode() + bytes.fromhex(sha256_file(f)))
    return h.hexdigest()
