"""Damaged GGUF models and adapters, damaged device folders: a one-line error naming the file, a non-zero exit,
no traceback, nothing left behind, and nothing reaches llama.cpp that could abort it (issue 20, binary half)."""
from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import pytest

from converters.errors import CoaloraError
from test_architectures import rewrite_gguf
from test_deploy import emit_tiny


@pytest.fixture(scope="module")
def tiny_gguf(tiny_model_dir):
    from converters.gguf_source import open_source
    return open_source(tiny_model_dir).path


def _refused(argv, pattern, capsys, workdir: Path):
    """``coalora ARGV`` exits 1 with one `coalora: error:` line matching ``pattern``; ``workdir`` unchanged."""
    import re
    from toolkit.cli import main

    before = sorted(p.relative_to(workdir) for p in workdir.rglob("*"))
    capsys.readouterr()
    assert main([str(a) for a in argv]) == 1, argv
    captured = capsys.readouterr()
    lines = captured.err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("coalora: error:"), lines
    assert "Traceback" not in captured.err + captured.out
    assert re.search(pattern, lines[0]), lines[0]
    assert sorted(p.relative_to(workdir) for p in workdir.rglob("*")) == before, "a refused command wrote files"


# ---- raw GGUF bytes ------------------------------------------------------------------------------
def _gguf_bytes(kvs: bytes, n_kv: int, n_tensors: int = 0, rest: bytes = b"") -> bytes:
    return b"GGUF" + struct.pack("<IQQ", 3, n_tensors, n_kv) + kvs + rest


def _kv(key: str, vtype: int, payload: bytes) -> bytes:
    k = key.encode()
    return struct.pack("<Q", len(k)) + k + struct.pack("<I", vtype) + payload


def _patch_offset(path: Path, name: str, value: int) -> None:
    """Overwrite the data offset stored in tensor ``name``'s info."""
    data = bytearray(path.read_bytes())
    n = name.encode()
    i = data.index(struct.pack("<Q", len(n)) + n) + 8 + len(n)
    n_dims = struct.unpack_from("<I", data, i)[0]
    pos = i + 4 + 8 * n_dims + 4
    struct.pack_into("<Q", data, pos, value)
    path.write_bytes(bytes(data))


@pytest.fixture()
def damaged(tiny_gguf, tmp_path):
    """Write damaged copies of the tiny model GGUF into tmp_path/in; returns a function name -> path."""
    src = Path(tiny_gguf).read_bytes()
    d = tmp_path / "in"
    d.mkdir()

    def make(kind: str) -> Path:
        p = d / f"{kind}.gguf"
        data = bytearray(src)
        if kind == "no_tensors":
            struct.pack_into("<Q", data, 8, 0)
        elif kind == "flipped_name":
            i = data.index(b"blk.1.attn_q.weight") + len("blk.1.attn_")
            data[i] ^= 0x01  # attn_q -> attn_p
        elif kind == "flipped_global_name":
            i = data.index(b"output_norm.weight") + len("output_nor")
            data[i] ^= 0x02  # output_norm -> output_nool
        elif kind == "truncated":
            data = data[: len(data) * 2 // 3]
        elif kind == "nested_array":  # an array whose elements are typed "array", as the first key
            nested = struct.pack("<IQ", 9, 1 << 40)  # element type ARRAY, 2^40 elements
            n_kv = struct.unpack_from("<Q", data, 16)[0]
            data = bytearray(_gguf_bytes(_kv("evil.nested", 9, nested), n_kv + 1,
                                         struct.unpack_from("<Q", data, 8)[0], bytes(data[24:])))
        elif kind == "huge_array":  # more elements than any vocabulary: gguf-py would hold a view per element
            n = (1 << 20) + 1
            data = bytearray(_gguf_bytes(_kv("evil.arr", 9, struct.pack("<IQ", 0, n) + bytes(n)), 1))
        elif kind == "huge_string":
            data = bytearray(_gguf_bytes(_kv("evil.str", 8, struct.pack("<Q", 1 << 62)), 1))
        elif kind == "huge_counts":
            struct.pack_into("<Q", data, 8, (1 << 64) - 1)
        if kind in ("overflow_offset", "overlap_offset"):  # the last tensor's data offset
            from converters.gguf_check import check_gguf
            p.write_bytes(bytes(data))
            last = check_gguf(p)["tensors"][-1][0]
            _patch_offset(p, last, (1 << 64) - 32 if kind == "overflow_offset" else 0)
            return p
        p.write_bytes(bytes(data))
        return p
    return make


STRUCTURAL = [
    ("no_tensors", r"no token_embd\.weight"),
    ("flipped_name", r"'blk\.1\.attn_p\.weight' is not a llama tensor"),
    ("flipped_global_name", r"is not a llama tensor"),
    ("truncated", r"truncated"),
    ("nested_array", r"array of arrays"),
    ("huge_array", r"has 1048577 elements \(at most"),
    ("huge_string", r"is \d+ bytes long"),
    ("huge_counts", r"tensors \(at most"),
    ("overflow_offset", r"' starts at data offset 18446744073709551584, expected"),
    ("overlap_offset", r"' starts at data offset 0, expected"),
]


@pytest.mark.parametrize("kind,pattern", STRUCTURAL, ids=[k for k, _ in STRUCTURAL])
def test_damaged_gguf_refused_by_every_reader(kind, pattern, damaged, tmp_path, capsys):
    """convert (never fills in a tensor), inspect, train and an adapter check all refuse the file."""
    from toolkit.llama_runtime import validate_adapter_file

    bad = damaged(kind)
    out = tmp_path / "out"
    out.mkdir()
    _refused(["convert", bad, "-o", out / "x.gguf", "--type", "Q8_0"], pattern, capsys, tmp_path)
    if kind not in ("no_tensors", "flipped_name", "flipped_global_name"):  # structure: inspect refuses too
        _refused(["inspect", bad], pattern, capsys, tmp_path)
        with pytest.raises(CoaloraError, match=pattern):
            validate_adapter_file(bad, bad)
    else:  # a well-formed file: inspect shows it as it is
        from toolkit.cli import main
        assert main(["inspect", str(bad), "--json"]) == 0
        capsys.readouterr()


def test_nested_array_is_not_a_runaway_read(damaged):
    """The check stops at the nested array's header: no recursion through 2^40 elements."""
    import time
    from converters.gguf_check import check_gguf

    bad = damaged("nested_array")
    t = time.process_time()
    with pytest.raises(CoaloraError, match="array of arrays"):
        check_gguf(bad)
    assert time.process_time() - t < 5


# ---- metadata that would abort llama.cpp -----------------------------------------------------------
METADATA = [
    ({"llama.block_count": 0}, r"block_count is 0"),
    ({"llama.block_count": 1000}, r"block_count is 1000"),
    ({"llama.block_count": 2**32 - 1}, r"block_count is 4294967295"),
    ({"llama.attention.layer_norm_rms_epsilon": float("nan")}, r"layer_norm_rms_epsilon is not finite"),
    ({"llama.attention.layer_norm_rms_epsilon": -1e-5}, r"layer_norm_rms_epsilon is -1e-05 \(needs 0 < eps < 1\)"),
    ({"llama.attention.head_count_kv": 3}, r"4 attention heads cannot share 3 KV heads"),
    ({"llama.context_length": 0}, r"context_length is 0"),
]


def _same_tokens(tiny_gguf):
    import gguf
    toks = gguf.GGUFReader(tiny_gguf).fields["tokenizer.ggml.tokens"].contents()
    return {"tokenizer.ggml.tokens": [toks[0]] + toks[:-1]}


def test_metadata_llama_cpp_would_abort_on_is_refused(tiny_gguf, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    cases = METADATA + [(_same_tokens(tiny_gguf), r"1 duplicate token")]
    for i, (kv, pattern) in enumerate(cases):
        bad = rewrite_gguf(tiny_gguf, tmp_path / f"bad{i}.gguf", kv=kv)
        _refused(["convert", bad, "-o", out / "x.gguf"], pattern, capsys, tmp_path)


# ---- device folders ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def dist(tiny_model_dir, tmp_path_factory):
    """An emitted device folder of the tiny model (as test_deploy's env fixture emits it)."""
    mp = pytest.MonkeyPatch()
    try:
        return emit_tiny(tiny_model_dir, tmp_path_factory.mktemp("hardening_dist"), 2, mp)[3]
    finally:
        mp.undo()


def _copy(dist, tmp_path) -> Path:
    d = tmp_path / "dist" / "tiny-test"
    shutil.copytree(dist, d)
    return d


def _edit_manifest(d: Path, edit) -> None:
    m = json.loads((d / "manifest.json").read_text())
    edit(m)
    (d / "manifest.json").write_text(json.dumps(m))


def _rehash(d: Path, name: str) -> None:
    from converters.fileio import sha256_file

    def edit(m):
        m["files"][name] = {"bytes": (d / name).stat().st_size, "sha256": sha256_file(d / name)}
    _edit_manifest(d, edit)


def _no_llama(monkeypatch):
    """Fail the test if llama.cpp is reached (in this process or a probe child)."""
    import toolkit.llama_runtime as rt

    def boom(*a, **k):
        raise AssertionError("llama.cpp was reached")
    monkeypatch.setattr(rt, "open_model", boom)
    monkeypatch.setattr(rt, "probe", boom)


MANIFEST_EDITS = [
    ("files-empty", lambda m: m.update(files={}), r"must list exactly model\.gguf and adapter\.gguf"),
    ("files-one", lambda m: m["files"].pop("adapter.gguf"), r"must list exactly"),
    ("source-sha", lambda m: m["source_model"].update(sha256="0" * 64), r"source_model\.sha256 does not match"),
    ("source-sha-path", lambda m: m["source_model"].update(sha256="../" * 5), r"source_model\.sha256: String"),
    ("fits", lambda m: m["fits"].update(memory_model=not m["fits"]["memory_model"]), r"fits does not match"),
    ("memory", lambda m: m["memory"].update(total_bytes=1), r"memory does not match"),
    ("config", lambda m: m["configuration"].update({next(iter(m["configuration"])): "Q4_0"}),
     r"configuration says .* is Q4_0, model\.gguf has Q8_0"),
    ("bpw", lambda m: m["search"].update(bits_per_weight=1.0), r"bits_per_weight does not match"),
    ("nan", lambda m: m["evaluation"].update(predicted_perplexity=float("nan")), r"predicted_perplexity"),
    ("str-int", lambda m: m["evaluation"].update(n_ctx="64"), r"evaluation\.n_ctx"),
    ("nul-path", lambda m: m["evaluation"].update(text_path="a\0b"), r"evaluation\.text_path"),
    ("commands", lambda m: m["commands"].update({"llama-cli": "rm -rf /"}), r"commands does not match"),
]


@pytest.mark.parametrize("name,edit,pattern", MANIFEST_EDITS, ids=[n for n, _, _ in MANIFEST_EDITS])
def test_validate_does_not_trust_the_manifest(name, edit, pattern, dist, tmp_path, capsys, monkeypatch):
    d = _copy(dist, tmp_path)
    _edit_manifest(d, edit)
    _no_llama(monkeypatch)
    _refused(["validate", d, "--no-measure"], pattern, capsys, tmp_path)
    if name.startswith("files"):  # package checks the folder the same way
        _refused(["package", d, "-o", tmp_path / "x.tar.gz"], pattern, capsys, tmp_path)


def test_validate_checks_every_file_in_the_folder(dist, tmp_path, capsys, monkeypatch):
    d = _copy(dist, tmp_path)
    (d / "extra.gguf").write_bytes(b"GGUF")
    _no_llama(monkeypatch)
    _refused(["validate", d], r"holds 'extra\.gguf', which its manifest does not list", capsys, tmp_path)
    _refused(["package", d, "-o", tmp_path / "x.tar.gz"], r"extra\.gguf", capsys, tmp_path)


@pytest.mark.parametrize("kv,pattern", METADATA[:4], ids=["block0", "block1000", "block2^32-1", "eps-nan"])
def test_validate_damaged_model_consistent_with_manifest(kv, pattern, dist, tmp_path, capsys, monkeypatch):
    """The model's metadata damaged and its manifest checksum updated: refused before llama.cpp loads it."""
    d = _copy(dist, tmp_path)
    rewrite_gguf(dist / "model.gguf", d / "model.gguf", kv=kv)
    _rehash(d, "model.gguf")
    _no_llama(monkeypatch)
    _refused(["validate", d], "model.gguf: .*" + pattern, capsys, tmp_path)


def test_validate_threads_out_of_range(dist, tmp_path, capsys, monkeypatch):
    from toolkit.validate import validate

    from toolkit.cli import main

    _no_llama(monkeypatch)
    with pytest.raises(CoaloraError, match="threads must be an integer from 1 to"):
        validate(dist, threads=100_000)
    capsys.readouterr()
    assert main(["validate", str(dist), "--threads", "100000"]) in (1, 2)  # an error, or a usage error
    err = capsys.readouterr().err
    assert "Traceback" not in err and "100000" in err


def test_llama_cpp_crash_in_child_is_one_line(tmp_path, monkeypatch):
    """What the checks miss aborts a child process: the parent reports it in one line naming the file."""
    from toolkit.llama_runtime import run_child

    (tmp_path / "aborts.py").write_text("import os\nos.abort()\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    with pytest.raises(CoaloraError, match=r"llama.cpp crashed \(SIGABRT\) on model\.gguf"):
        run_child("aborts", "--x", {}, "model.gguf", timeout=60)


def test_probe_runs_a_good_pair(dist):
    from toolkit.llama_runtime import probe
    probe(dist / "model.gguf", dist / "adapter.gguf", n_ctx=64, threads=1)
