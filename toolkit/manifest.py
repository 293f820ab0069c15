"""An emitted device folder's ``manifest.json``: its schema, and the check that the folder holds what it says.

The manifest is input like any other file: it is read with a schema (types, finiteness, ranges), and what
can be recomputed from the folder's files is recomputed and compared instead of trusted:
- the folder holds exactly model.gguf, adapter.gguf and manifest.json (regular files), and ``files``
  lists exactly the two GGUFs with their sizes and sha256;
- the configuration, its histogram, the architecture numbers, the file size and bits per weight match
  the model file; the memory prediction and both ``fits`` values are recomputed from the files and the
  profile; the commands are the profile's;
- the source model's sha256 matches the file it names, when that file is still there.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from converters.errors import CoaloraError
from converters.fileio import model_fingerprint, sha256_file

from toolkit.emit import ADAPTER_FILE, FORMAT, MANIFEST, MODEL_FILE, commands

MAX_MANIFEST_BYTES = 16 << 20

_HEX64 = r"^[0-9a-f]{64}$"
_PATH = r"^[^\x00]*$"  # no NUL: the OS refuses such a path
_Bytes = Field(ge=0, le=1 << 50)


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, allow_inf_nan=False, extra="ignore")


class FileRecord(_Strict):
    bytes: int = _Bytes
    sha256: str = Field(pattern=_HEX64)


class SourceModel(_Strict):
    path: str = Field(min_length=1, max_length=4096, pattern=_PATH)
    sha256: Optional[str] = Field(default=None, pattern=_HEX64)


class Search(_Strict):
    budget_bytes: int = Field(ge=1, le=1 << 50)
    file_bytes: int = Field(ge=1, le=1 << 50)
    bits_per_weight: float = Field(gt=0, le=64)
    predicted_loss: Optional[float] = None
    predicted_ppl: Optional[float] = None
    source: str = Field(default="", max_length=200)
    adapter: Literal["generated", "shared"] = "generated"  # older manifests: generated
    avoided_types_used: list[str] = Field(default_factory=list, max_length=64)


class Evaluation(_Strict):
    text: str = Field(max_length=4096)
    text_path: str = Field(max_length=4096, pattern=_PATH)
    text_sha256: str = Field(pattern=_HEX64)
    n_windows: int = Field(ge=1, le=1 << 20)
    data_format: Literal["text", "chat", "instruction"]
    n_ctx: int = Field(ge=2, le=1 << 20)
    bos: Optional[int] = Field(default=None, ge=0, le=1 << 31)
    windows_sha256: str = Field(pattern=_HEX64)
    predicted_perplexity: float = Field(gt=0)


class Memory(_Strict):
    model_bytes: int = _Bytes
    adapter_bytes: int = _Bytes
    kv_cache_bytes: int = _Bytes
    compute_bytes: int = _Bytes
    overhead_bytes: int = _Bytes
    repack_bytes: int = _Bytes
    total_bytes: int = _Bytes


class Fits(_Strict):
    model_budget: bool
    memory_model: bool


class Manifest(_Strict):
    format: Literal["coalora-dist/1"]
    profile: dict
    run: str = Field(max_length=4096)
    source_model: SourceModel
    architecture: dict[str, int] = Field(max_length=32)
    configuration: dict[str, str] = Field(min_length=1, max_length=1 << 16)
    histogram: dict[str, int] = Field(max_length=64)
    search: Search
    files: dict[str, FileRecord] = Field(max_length=16)
    evaluation: Evaluation
    memory: Memory
    fits: Fits
    commands: dict[str, str] = Field(max_length=16)


def _schema_error(path: Path, e: ValidationError) -> CoaloraError:
    err = e.errors()[0]
    where = ".".join(str(x) for x in err["loc"]) or "(top level)"
    return CoaloraError(f"{path} is not a valid manifest: {where[:80]}: {err['msg'][:120]}")


def read_manifest(dist_dir) -> dict:
    """The manifest of DIST/NAME checked against the schema (a dict, as emit wrote it)."""
    dist_dir = Path(dist_dir)
    p = dist_dir / MANIFEST
    if not p.is_file():
        raise CoaloraError(f"{dist_dir} is not an emitted pair (no {MANIFEST}); create it with `coalora emit`")
    try:
        if p.stat().st_size > MAX_MANIFEST_BYTES:
            raise CoaloraError(f"{p} is larger than {MAX_MANIFEST_BYTES >> 20} MiB; not a manifest")
        m = json.loads(p.read_bytes().decode("utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise CoaloraError(f"{p} is unreadable: {str(e).splitlines()[0][:200] if str(e) else type(e).__name__}") \
            from None
    if not isinstance(m, dict) or m.get("format") != FORMAT:
        raise CoaloraError(f"{p} is not a {FORMAT} manifest")
    try:
        Manifest.model_validate(m)
    except ValidationError as e:
        raise _schema_error(p, e) from None
    return m


def check_folder(dist_dir, manifest: dict) -> dict:
    """The folder holds exactly the manifest and the files it lists, which are model.gguf and adapter.gguf
    with the listed sizes and sha256 (checked before anything parses them). Returns name -> sha256."""
    dist_dir = Path(dist_dir)
    listed = set(manifest["files"])
    if listed != {MODEL_FILE, ADAPTER_FILE}:
        raise CoaloraError(f"{dist_dir / MANIFEST} must list exactly {MODEL_FILE} and {ADAPTER_FILE}, it lists "
                           f"{', '.join(sorted(listed))[:200] or 'nothing'}")
    held = sorted(p.name for p in dist_dir.iterdir())
    extra = [n for n in held if n not in listed | {MANIFEST}]
    if extra:
        raise CoaloraError(f"{dist_dir} holds {extra[0][:80]!r}, which its manifest does not list")
    out = {}
    for name, rec in sorted(manifest["files"].items()):
        p = dist_dir / name
        if p.is_symlink() or not p.is_file():
            raise CoaloraError(f"{p} is missing or not a regular file")
        if p.stat().st_size != rec["bytes"] or sha256_file(p) != rec["sha256"]:
            raise CoaloraError(f"{name} does not match its manifest checksum (damaged or swapped file); "
                               f"re-run `coalora emit`")
        out[name] = rec["sha256"]
    return out


def check_source_model(manifest: dict) -> bool | None:
    """True when the source model the manifest names is there and has its sha256; None when it is gone
    (nothing to compare); CoaloraError when it differs."""
    src = manifest["source_model"]
    path = Path(src["path"])
    if not path.exists():
        return None
    if src.get("sha256") is None or model_fingerprint(path) != src["sha256"]:
        raise CoaloraError(f"the manifest's source_model.sha256 does not match {str(path)[:200]} "
                           f"(edited manifest or changed model)")
    return True


def check_against_files(manifest: dict, model_src, adapter_bytes: int, profile) -> dict:
    """Recompute what the manifest says about the model file (``model_src``: its GGUFSource) and the profile;
    CoaloraError on the first difference. Returns the recomputed memory estimate and fits."""
    from converters.configuration import Configuration
    from toolkit import memory_model as mm

    name = MANIFEST
    model_bytes = manifest["files"][MODEL_FILE]["bytes"]
    adapter_bytes = int(adapter_bytes)
    try:
        cfg = Configuration(dict(manifest["configuration"]))
    except ValueError as e:
        raise CoaloraError(f"{name}: configuration: {str(e)[:200]}") from None
    from converters.configuration import EMBEDDING_KINDS
    from converters.gguf_source import tensor_kind
    # the run's layout: with the embeddings only when the search covered them
    layout = model_src.layout(include_embeddings=any(tensor_kind(n) in EMBEDDING_KINDS for n in cfg.types))
    actual = {n: model_src.ggml_type(n).name for n in layout.names()}
    for n, q in cfg.types.items():
        if actual.get(n) != q.name:
            raise CoaloraError(f"{name}: configuration says {n[:80]} is {q.name}, {MODEL_FILE} has "
                               f"{actual.get(n, 'no such tensor')}")
    arch = mm.ArchInfo.from_hparams(model_src.n_blocks, model_src.hparams())
    mem = profile.memory(arch, model_bytes, adapter_bytes, mm.repack_bytes(layout, cfg))
    budget = manifest["search"]["budget_bytes"]
    fits = {"model_budget": model_bytes <= budget, "memory_model": mem.total <= profile.process_budget_bytes}
    checks = [
        ("histogram", manifest["histogram"], cfg.histogram()),
        ("architecture", manifest["architecture"], arch.__dict__),
        ("search.file_bytes", manifest["search"]["file_bytes"], model_bytes),
        ("memory", manifest["memory"], mem.as_dict()),
        ("fits", manifest["fits"], fits),
        ("commands", manifest["commands"], commands(profile)),
    ]
    for what, said, real in checks:
        if said != real:
            raise CoaloraError(f"{name}: {what} does not match the files and the profile (edited manifest?)")
    if not math.isclose(manifest["search"]["bits_per_weight"], layout.bits_per_weight(cfg), rel_tol=1e-9):
        raise CoaloraError(f"{name}: search.bits_per_weight does not match {MODEL_FILE} (edited manifest?)")
    if budget > profile.process_budget_bytes:
        raise CoaloraError(f"{name}: search.budget_bytes exceeds the profile's memory (edited manifest?)")
    return {"memory": mem, "fits": fits}
