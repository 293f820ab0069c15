"""Bad text input and options (issue 20, text half): each class of failure the fuzz run found, as a
regression test. Damaged GGUF files and llama.cpp are tests/test_hardening_gguf.py's."""
from __future__ import annotations

import json
import shutil

import pytest

from converters.errors import CoaloraError
from toolkit.cli import main


def _error_line(capsys) -> str:
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert lines and "Traceback" not in err, err
    return lines[-1]


# ---------------------------------------------------------------- options have ranges
@pytest.mark.parametrize("argv", [
    ["train", "m", "-o", "r", "--steps", "0"], ["train", "m", "-o", "r", "--steps", "-1"],
    ["train", "m", "-o", "r", "--lr", "-1"], ["train", "m", "-o", "r", "--lr", "nan"],
    ["train", "m", "-o", "r", "--rank", "0"], ["train", "m", "-o", "r", "--batch", "0"],
    ["train", "m", "-o", "r", "--seq-len", "0"], ["train", "m", "-o", "r", "--rank", "1.5"],
    ["train", "m", "-o", "r", "--alpha", "inf"], ["train", "m", "-o", "r", "--top-share", "nan"],
    ["train", "m", "-o", "r", "--low-share", "1.5"],
    ["finetune", "m", "--config", "Q8_0", "-o", "r", "--checkpoint-every", "0"],
    ["validate", "d", "--threads", "100000"], ["validate", "d", "--windows", "0"],
    ["emit", "r", "--profile", "rpi4-4gb", "-o", "d", "--windows", "-3"],
    ["search", "r", "--bpw", "nan"], ["search", "r", "--budget-bytes", "0"], ["demo", "--steps", "0"],
])
def test_numeric_option_out_of_range_is_a_usage_error(argv, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    assert _error_line(capsys).startswith("Error: Invalid value for")
    assert not any(tmp_path.iterdir()), "nothing written"


def test_error_lines_quote_a_bounded_excerpt(tmp_path, capsys):
    huge = "9" * 1_000_000
    assert main(["train", "m", "-o", str(tmp_path / "r"), "--rank", huge]) == 2
    assert len(_error_line(capsys)) < 500
    assert main(["profiles", "x" * 1_000_000]) == 1
    line = _error_line(capsys)
    assert line.startswith("coalora: error:") and len(line) < 500


# ---------------------------------------------------------------- JSON files
@pytest.mark.parametrize("content", [b"\xff\xfe{\"types\": {}}", b"[" * 100_000 + b"]" * 100_000, b"{\"typez\": {}}",
                                     b"null", b"{\"types\": {\"blk.0.attn_q.weight\": 5}}", b"{\"types\": {}}"])
def test_damaged_configuration_json_is_one_line_error(content, tmp_path, capsys):
    from converters.configuration import Configuration
    p = tmp_path / "cfg.json"
    p.write_bytes(content)
    with pytest.raises(CoaloraError):
        Configuration.load(p)
    assert main(["convert", "no-model", "-o", str(tmp_path / "o.gguf"), "--recipe", str(p)]) == 1
    assert _error_line(capsys).startswith("coalora: error:")


# ---------------------------------------------------------------- device profiles
GOOD = dict(name="dev", description="d", memory_bytes=1 << 30, model_share=0.5, context_length=256, threads=2)


def _toml(d: dict) -> str:
    def val(v):
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, float) and v == float("inf"):
            return "inf"
        return json.dumps(v)
    return "".join(f"{k} = {val(v)}\n" for k, v in d.items())


@pytest.mark.parametrize("change", [
    {"flash_attn": "false"}, {"threads": True}, {"threads": "4"}, {"threads": 1.5}, {"threads": float("inf")},
    {"memory_bytes": float("inf")}, {"context_length": float("inf")}, {"ubatch": 0}, {"model_share": 1.5},
    {"avoid": ["F32", "F16", "BF16", "Q8_0", "Q6_K", "Q5_1", "Q5_K", "Q5_0", "Q4_1", "Q4_K", "Q4_0", "IQ4_NL",
               "IQ4_XS", "Q3_K", "Q2_K"]},
    {"name": ""}, {"name": "."}, {"name": ".."}, {"name": "a/b"}, {"name": "../x"}, {"prefer": "Q8_0"},
])
def test_profile_fields_are_typed_and_ranged(change, tmp_path):
    from toolkit.profiles import load_profile
    p = tmp_path / "p.toml"
    p.write_text(_toml({**GOOD, **change}))
    with pytest.raises(CoaloraError):
        load_profile(p)


def test_valid_profile_keeps_its_types(tmp_path):
    from toolkit.profiles import load_profile
    p = tmp_path / "p.toml"
    p.write_text(_toml({**GOOD, "flash_attn": False, "model_share": 1}))
    prof = load_profile(p)
    assert prof.flash_attn is False and prof.threads == 2 and prof.model_share == 1.0


def test_profile_name_never_addresses_dist_itself(tmp_path):
    """emit's folder is DIST/NAME: a name that is not a plain folder name never reaches the rename."""
    from toolkit.emit import profile_dest
    for bad in ("", ".", "..", "../x", "a/b", "/abs"):
        with pytest.raises(CoaloraError):
            profile_dest(tmp_path, bad)
    assert profile_dest(tmp_path, "rpi4-4gb") == tmp_path / "rpi4-4gb"


def test_profile_avoiding_the_whole_menu_is_an_error():
    from converters.configuration import ModelLayout, TensorSpec
    layout = ModelLayout([TensorSpec("blk.0.attn_q.weight", 64, 64, "attn_q", 0)], 0, 1, ("Q8_0",))
    with pytest.raises(CoaloraError):
        layout.with_menu(())
    with pytest.raises(CoaloraError):  # 64-wide rows take no 256-block K-quant
        layout.with_menu(("Q4_K",))


# ---------------------------------------------------------------- run folders and cache paths
def test_quant_cache_path_needs_a_real_sha256(tmp_path, monkeypatch):
    from toolkit.run import quant_cache_dir
    monkeypatch.setenv("COALORA_HOME", str(tmp_path / "home"))
    for bad in ("../../../../../../../x", "0" * 63 + "/", "G" * 64, "", None):
        with pytest.raises(CoaloraError):
            quant_cache_dir(bad)
    assert quant_cache_dir("ab" * 32).parent == tmp_path / "home" / "quant-cache"


def test_weight_cache_file_names_stay_in_the_cache(tmp_path):
    from converters.quant_types import get
    from toolkit.weight_bank import WeightBank
    bank = WeightBank(None, tmp_path / "cache")
    for name in ("../../evil", "/etc/x", "..", "blk.0/../../x"):
        p = bank._cache_file(name, get("Q8_0"))
        assert p.parent == tmp_path / "cache" and not p.name.startswith(".")
    assert bank._cache_file("blk.0.attn_q.weight", get("Q8_0")).name == "blk.0.attn_q.weight.Q8_0.bin"


@pytest.fixture
def run_copy(fuzz_workdir, tmp_path):
    from bench.fuzz.cases import Fixtures
    dst = tmp_path / "run"
    shutil.copytree(Fixtures(fuzz_workdir).run(), dst)
    return dst


@pytest.mark.parametrize("damage", ["list", "null", "no-options", "no-layout", "sha-path", "rank-type", "menu",
                                    "embedding-menu", "tensor-row", "utf8", "deep"])
def test_damaged_run_json_is_refused_on_open(damage, run_copy, tmp_path, capsys):
    meta_path = run_copy / "run.json"
    m = json.loads(meta_path.read_text())
    if damage == "list":
        m = [m]
    elif damage == "null":
        m = None
    elif damage == "no-options":
        del m["options"]
    elif damage == "no-layout":
        del m["layout"]
    elif damage == "sha-path":
        m["model_sha256"] = "../" * 30
    elif damage == "rank-type":
        m["options"]["rank"] = "4"
    elif damage == "menu":
        m["layout"]["menu"] = []
    elif damage == "embedding-menu":
        m["layout"]["embedding_menu"] = ["F99"]
    elif damage == "tensor-row":
        m["layout"]["tensors"][0] = [m["layout"]["tensors"][0][0]]
    meta_path.write_text(json.dumps(m))
    if damage == "utf8":
        meta_path.write_bytes(b"\xff" + meta_path.read_bytes())
    if damage == "deep":
        meta_path.write_text("[" * 100_000 + "]" * 100_000)
    before = sorted(p.name for p in run_copy.iterdir())
    assert main(["adapter", str(run_copy), "--config", "Q8_0", "-o", str(tmp_path / "a.gguf")]) == 1
    assert _error_line(capsys).startswith("coalora: error:")
    assert sorted(p.name for p in run_copy.iterdir()) == before and not (tmp_path / "a.gguf").exists()


@pytest.mark.parametrize("change", ["rank", "targets", "shape"])
def test_run_json_not_matching_checkpoint_or_model(change, run_copy, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("COALORA_HOME", str(tmp_path / "home"))
    meta_path = run_copy / "run.json"
    m = json.loads(meta_path.read_text())
    if change == "rank":
        m["options"]["rank"] *= 2
    elif change == "targets":
        m["options"]["targets"] = ["attn_q"]
    else:
        m["layout"]["tensors"][0][1] *= 2
    meta_path.write_text(json.dumps(m))
    assert main(["adapter", str(run_copy), "--config", "Q8_0", "-o", str(tmp_path / "a.gguf")]) == 1
    assert _error_line(capsys).startswith("coalora: error:")
    assert not (tmp_path / "a.gguf").exists()


def test_search_refuses_a_layout_the_model_does_not_have(run_copy, tmp_path, capsys, monkeypatch):
    """A search reads no weights, but where the run's model is at hand its header shows a damaged layout: the
    token embedding with twice its rows was searched on those sizes, and an archived configuration sized by
    the old ones left the budget (fuzz case run/0095, an assertion's traceback)."""
    monkeypatch.setenv("COALORA_HOME", str(tmp_path / "home"))
    meta_path = run_copy / "run.json"
    m = json.loads(meta_path.read_text())
    row = next(t for t in m["layout"]["tensors"] if t[0] == "token_embd.weight")
    row[1] *= 2
    meta_path.write_text(json.dumps(m))
    assert main(["search", str(run_copy), "--bpw", "6"]) == 1
    assert "run.json's tensor 'token_embd.weight' is not in the model as described" in _error_line(capsys)


@pytest.mark.parametrize("damage", ["nan", "string", "missing-tensor", "missing-type", "garbage"])
def test_damaged_sensitivity_table_is_refused_by_search(damage, run_copy, tmp_path, capsys, monkeypatch):
    """The run folder's sensitivity.json steers the search: damaged, it is the run's error, not a traceback or
    a silently different search."""
    from toolkit.sensitivity import _read_table_file, load_error_table

    monkeypatch.setenv("COALORA_HOME", str(tmp_path / "home"))
    path = run_copy / "sensitivity.json"
    d = json.loads(path.read_text())
    name = next(iter(d["errors"]))
    if damage == "nan":
        d["errors"][name][next(iter(d["errors"][name]))] = float("nan")
    elif damage == "string":
        d["errors"][name] = "Q8_0"
    elif damage == "missing-tensor":
        del d["errors"][name]
    elif damage == "missing-type":
        del d["errors"][name][next(iter(d["errors"][name]))]
    path.write_text("{garbage" if damage == "garbage" else json.dumps(d))
    assert main(["search", str(run_copy), "--bpw", "6"]) == 1
    assert "sensitivity.json is damaged" in _error_line(capsys)
    # the shared cache of the same kind is recomputed instead
    assert load_error_table(path) is None or damage.startswith("missing")
    assert _read_table_file(tmp_path / "absent.json") is None


# ---------------------------------------------------------------- no partial folders, nothing moved
def test_failed_train_leaves_no_run_folder(fuzz_workdir, tmp_path, capsys, monkeypatch):
    from bench.fuzz.cases import Fixtures
    monkeypatch.setenv("COALORA_HOME", str(tmp_path / "home"))
    fx = Fixtures(fuzz_workdir)
    out = tmp_path / "runs" / "new"
    assert main(["train", str(fx.model_gguf()), "--data", str(fx.text()), "-o", str(out), "--steps", "1",
                 "--menu", "Q8_0", "--init-lora", str(tmp_path / "no-such-run")]) == 1
    assert _error_line(capsys).startswith("coalora: error:")
    assert not out.exists()


def test_emit_with_bad_profile_touches_nothing_in_dist(fuzz_workdir, tmp_path, capsys):
    from bench.fuzz.cases import Fixtures
    dist = tmp_path / "dist"
    (dist / "other").mkdir(parents=True)
    (dist / "other" / "keep.txt").write_text("x")
    for name in ("", ".", "../dist"):
        p = tmp_path / "p.toml"
        p.write_text(_toml({**GOOD, "name": name}))
        assert main(["emit", str(Fixtures(fuzz_workdir).run()), "--profile", str(p), "-o", str(dist)]) == 1
        assert _error_line(capsys).startswith("coalora: error:")
        assert sorted(str(x.relative_to(tmp_path)) for x in tmp_path.rglob("*")) == [
            "dist", "dist/other", "dist/other/keep.txt", "p.toml"]


def test_damaged_token_file_of_a_run_is_a_one_line_error(tmp_path):
    """A run folder's tokens.npy / windows.npz that numpy cannot read, or whose arrays have the wrong shape,
    dtype or token ids, is the run's error, not a traceback."""
    import io

    import numpy as np

    from converters.errors import CoaloraError
    from toolkit.training import _stream_for

    good = io.BytesIO()
    np.save(good, np.arange(1000, dtype=np.int64) % 50)
    header_broken = bytearray(good.getvalue())
    header_broken[20:24] = b"\x00\x00(\x00"  # a null byte and an open bracket inside the header's dict literal
    def npz(**arrays):
        buf = io.BytesIO()
        np.savez(buf, **arrays)
        return buf.getvalue()
    ids = np.zeros((8, 32), np.int64)
    cases = [("tokens.npy", b"garbage"), ("windows.npz", b"PK\x03\x04junk"), ("tokens.npy", b""),
             ("tokens.npy", bytes(header_broken)), ("tokens.npy", good.getvalue()[:200]),
             ("windows.npz", npz(ids=ids, mask=ids.astype(bool))),                     # record missing
             ("windows.npz", npz(ids=ids, mask=ids[:4].astype(bool), record=np.arange(8))),
             ("windows.npz", npz(ids=ids.astype(np.float32), mask=ids.astype(bool), record=np.arange(8))),
             ("windows.npz", npz(ids=ids + 50, mask=ids.astype(bool), record=np.arange(8)))]  # ids >= vocab
    for i, (name, body) in enumerate(cases):
        d = tmp_path / str(i)
        d.mkdir()
        (d / name).write_bytes(body)
        with pytest.raises(CoaloraError, match=f"{name} of the run is damaged"):
            _stream_for(str(d / name), 32, 4, 50)


def test_eof_inside_a_command_is_an_error_not_an_abort(monkeypatch, capsys):
    """click turns any EOFError inside a command into Abort ("aborted", exit 130); coalora never prompts, so
    an EOFError is a truncated file: an error line."""
    from toolkit import profiles

    def truncated(*a, **k):
        raise EOFError("reading array header")
    monkeypatch.setattr(profiles, "list_profiles", truncated)
    assert main(["profiles"]) == 1
    assert _error_line(capsys) == "coalora: error: unexpected end of a file (reading array header)"


def test_bad_data_records_fail_before_the_model_loads(fuzz_workdir, tmp_path, capsys, monkeypatch):
    from bench.fuzz.cases import Fixtures
    import converters.model_loading as ml

    def no_load(*a, **k):
        raise AssertionError("the model was loaded before the data records were checked")
    monkeypatch.setattr(ml, "load_model", no_load)
    data = tmp_path / "chat.jsonl"
    for body in ['{"messages": [{"role": "robot", "content": "x"}]}\n', '{"foo": "bar"}\n',
                 '{"prompt": "q", "completion": null}\n', '{"text": ""}\n']:
        data.write_text(body)
        assert main(["train", str(Fixtures(fuzz_workdir).model_gguf()), "--data", str(data), "-o",
                     str(tmp_path / "run"), "--steps", "1", "--no-imatrix"]) == 1
        assert _error_line(capsys).startswith("coalora: error:")
        assert not (tmp_path / "run").exists()


def test_bad_experiment_switch_fails_before_the_model_loads(tmp_path, capsys, monkeypatch):
    import converters.model_loading as ml

    def no_load(*a, **k):
        raise AssertionError("the model was loaded before the options were checked")
    monkeypatch.setattr(ml, "load_model", no_load)
    for switch in (["--anchor", "Q9"], ["--type-deltas", "bogus"]):
        assert main(["train", "smollm2", "-o", str(tmp_path / "run"), *switch]) == 1
        assert _error_line(capsys).startswith(f"coalora: error: {switch[0]} ")
        assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("field", ["memory_bytes", "model_share", "context_length", "threads", "ubatch"])
def test_huge_integer_profile_field_is_out_of_range(field, tmp_path, capsys):
    p = tmp_path / "p.toml"
    p.write_text(_toml({**GOOD, field: 10 ** 400}))
    assert main(["profiles", str(p)]) == 1
    assert _error_line(capsys).startswith(f"coalora: error: profile {p}: {field} must be in")
