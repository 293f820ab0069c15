"""Damaged text inputs: configuration JSON (adapter --config, convert --recipe), device-profile TOML,
numeric and text options, run folders (run.json, checkpoint, archive), training data records.

Every case expects a one-line error unless it says why it is accepted. The oracle of what is valid is
written here independently of coalora's checks (the schema each reader documents), so a check that is
too lax shows up as a wrong acceptance and one that is too strict as a wrong refusal.
"""
from __future__ import annotations

import json
import math
import pickle
import random
import shutil
from pathlib import Path

from bench.common import toml_text
from bench.fuzz.cases import (OK, Case, Fixtures, case_dir, deep_json, flip_bytes, hostile_value,
                              truncate, write, write_json)


# ---------------------------------------------------------------- damaged JSON documents
def damaged_json(rng: random.Random, valid: dict) -> tuple[bytes, str]:
    """Bytes of a damaged version of ``valid`` (a configuration or run.json), and what was done."""
    text = json.dumps(valid)
    r = rng.randrange(9)
    if r == 0:
        return rng.choice([b"", b"\xff\xfe\x00{", text.encode()[:-1] + b"\xff}", b"\x00" * 64,
                           bytes(rng.randrange(256) for _ in range(200))]), "raw bytes"
    if r == 1:
        return deep_json(rng.choice([1000, 100_000])).encode(), "deep nesting"
    if r == 2:
        return truncate(text.encode(), rng), "truncated"
    if r == 3:
        return json.dumps(rng.choice([None, [], [valid], 1, "x", True])).encode(), "wrong top-level type"
    if r == 4:
        return flip_bytes(text.encode(), rng, rng.randint(1, 3)), "flipped bits"
    return b"", "structured"  # the caller mutates the structure


def _types_mutation(rng: random.Random, cfg: dict) -> tuple[dict, str]:
    """A configuration whose "types" mapping is wrong (never a valid one)."""
    types = dict(cfg["types"])
    names = list(types)
    r = rng.randrange(10)
    if r == 0:
        return {"types": rng.choice([None, [], {}, "Q8_0", 1, [types]])}, "types not a non-empty mapping"
    if r == 1:
        return {k: v for k, v in cfg.items() if k != "types"} | {"typez": types}, "types missing"
    if r == 2:
        n = rng.choice(names)
        types[n] = rng.choice([None, 1, 1.5, True, [], {}, math.nan, "", "Q9_9", "q8_0x", "F32 ", "Q8_0" * 1000])
        return {"types": types}, f"bad type {types[n]!r:.30}"
    if r == 3:
        del types[rng.choice(names)]
        return {"types": types}, "a tensor missing"
    if r == 4:
        types[rng.choice(["blk.99.attn_q.weight", "../../etc/passwd", "x" * 10_000, "", "blk.0.attn_q.weight\u0000"])] = "Q8_0"
        return {"types": types}, "an unknown tensor"
    if r == 5:
        n = rng.choice(names)
        bad = bytearray(n.encode())
        bad[rng.randrange(len(bad))] ^= 1 << rng.randrange(7)
        types[bad.decode("utf-8", "replace")] = types.pop(n)
        return {"types": types}, "a flipped bit in a tensor name"
    if r == 6:
        return {"types": {n: types[n] for n in names[:rng.randint(1, max(1, len(names) // 2))]}}, "half the tensors"
    if r == 7:
        return {"types": {n: rng.choice(["TQ1_0", "I8", "Q4_0_4_4", "IQ1_S_X"]) for n in names}}, "unknown types"
    if r == 8:
        return {"types": {**types, **{f"blk.{i}.ffn_up.weight": "Q8_0" for i in range(50, 60)}}}, "extra blocks"
    # the mapping spread over the top level with no "types" key (extra keys beside a complete "types" are a
    # documented acceptance: `search -o` writes them)
    return {n: types[n] for n in names}, "tensor names at top level only"


def valid_configuration(fx: Fixtures) -> dict:
    layout = json.loads((fx.run() / "run.json").read_text())["layout"]
    return {"types": {row[0]: "Q8_0" for row in layout["tensors"]}}


def configuration_cases(rng: random.Random, workdir: Path, fx: Fixtures, n: int, kind: str) -> list[Case]:
    """kind "configuration": adapter RUN --config; kind "recipe": convert MODEL --recipe."""
    valid = valid_configuration(fx)
    out = []
    for i in range(n):
        name = f"{kind}/{i:04d}"
        d = case_dir(workdir, name)
        target = d / ("out.gguf" if kind == "recipe" else "adapter.gguf")
        argv = (["convert", fx.model_gguf(), "-o", target, "--recipe", d / "cfg.json"] if kind == "recipe" else
                ["adapter", fx.run(), "--config", d / "cfg.json", "-o", target])
        rel = str(target.relative_to(workdir))
        if i % 25 == 0:  # controls: a valid file, and one with extra keys beside "types" (what search -o writes)
            extra = {"budget_bytes": 1, "note": "x"} if i % 50 else {}
            write_json(d / "cfg.json", {**extra, **valid})
            out.append(Case(name, kind, argv, expect=OK, outputs=(rel,),
                            why="a valid configuration" + (" with extra keys, as `search -o` writes" if extra else "")))
            continue
        data, what = damaged_json(rng, valid)
        if what == "flipped bits":
            try:
                if json.loads(data) == valid:
                    data, what = b"[" + data, "flipped bits + bracket"
            except ValueError:
                pass
            else:  # a flip that still parses may still be valid (e.g. in a type name's case): make it certain
                data, what = json.dumps(_types_mutation(rng, valid)[0]).encode(), "structured"
        if what == "structured":
            cfg, what = _types_mutation(rng, valid)
            data = json.dumps(cfg).encode()
        write(d / "cfg.json", data)
        out.append(Case(f"{name}-{what.split()[0]}", kind, argv))
    return out


# ---------------------------------------------------------------- device-profile TOML
BASE_PROFILE = {"name": "tiny", "description": "fuzz", "memory_bytes": 268_435_456, "model_share": 0.5,
                "context_length": 256, "threads": 2, "ubatch": 64, "kv_cache_type": "f16", "flash_attn": False,
                "prefer": ["Q8_0"], "avoid": []}
REQUIRED = ("name", "description", "memory_bytes", "model_share", "context_length", "threads")
CATALOGUE = ("F32", "F16", "BF16", "Q8_0", "Q6_K", "Q5_1", "Q5_K", "Q5_0", "Q4_1", "Q4_K", "Q4_0", "IQ4_NL",
             "IQ4_XS", "Q3_K", "Q2_K")
MENU = ("Q8_0", "Q6_K", "Q5_K", "Q5_1", "Q5_0", "Q4_K", "Q4_0", "IQ4_NL", "IQ4_XS", "Q3_K", "Q2_K")


def _int_in(v, lo, hi) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and lo <= v <= hi


def profile_field_valid(key: str, v) -> bool:
    """The documented profile schema (README / device_profiles): the fuzz oracle."""
    import re
    if key == "name":
        return isinstance(v, str) and re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}", v) is not None
    if key == "description":
        return isinstance(v, str)
    if key in ("memory_bytes", "model_budget_bytes"):
        return _int_in(v, 1, 2**50)
    if key == "model_share":
        return isinstance(v, (int, float)) and not isinstance(v, bool) and (isinstance(v, int) or math.isfinite(v)) and 0 < v <= 1
    if key == "context_length":
        return _int_in(v, 1, 1 << 20)
    if key == "threads":
        return _int_in(v, 1, 512)
    if key == "ubatch":
        return _int_in(v, 1, 1 << 16)
    if key == "flash_attn":
        return isinstance(v, bool)
    if key == "kv_cache_type":
        return isinstance(v, str) and v.lower() in ("f16", "f32", "bf16")  # quantized KV needs flash_attn
    if key in ("prefer", "avoid"):
        return isinstance(v, list) and all(isinstance(q, str) and q.upper() in CATALOGUE for q in v) and not (
            key == "avoid" and set(MENU) <= {q.upper() for q in v})
    return False


def profile_cases(rng: random.Random, workdir: Path, fx: Fixtures, n: int) -> list[Case]:
    out = []
    run = fx.run()
    for i in range(n):
        name = f"profile/{i:04d}"
        d = case_dir(workdir, name)
        p = d / "p.toml"
        prof = dict(BASE_PROFILE)
        r = rng.randrange(12)
        if r == 0:
            write(p, rng.choice([b"\xff\xfe name = 1", b"name = [" * 50_000, b"= =", b"", b"[[a]]\n" * 3,
                                 toml_text(prof).encode()[:-5] + b"\xc3", flip_bytes(toml_text(prof).encode(), rng, 3)]))
            # a flip may leave a valid file: the `profiles` listing of it is then fine
            valid = _toml_profile_valid(p)
            out.append(Case(f"{name}-raw", "profile", ["profiles", p], **_ok_if(valid, "the damage left a valid profile")))
            continue
        if r == 1:
            del prof[rng.choice(REQUIRED)]
            what = "missing"
        elif r == 2:
            prof[rng.choice(["nmae", "thread", "x" * 300, "memory-bytes"])] = 1
            what = "unknown-key"
        elif r in (3, 4, 5, 6):
            key = rng.choice(list(BASE_PROFILE) + ["model_budget_bytes"])
            prof[key] = rng.choice([hostile_value(rng, prof.get(key, 1)),
                                    {"flash_attn": "false", "threads": True, "memory_bytes": math.inf}.get(key, "4")])
            if prof[key] is None:
                del prof[key]
            what = f"field-{key}"
        elif r == 7:
            prof["avoid"] = rng.choice([list(CATALOGUE), list(MENU), ["q8_0", "Q9"], [1], "Q8_0"])
            what = "avoid"
        else:  # names that would be paths: emit must not touch DIST or the other profiles' folders
            prof["name"] = rng.choice(["", ".", "..", "../x", "a/b", "/tmp/x", "x" * 65, " tiny", "tiny\n", "é",
                                       "-tiny", ".hidden"])
            what = "name"
        write(p, toml_text(prof))
        valid = all(profile_field_valid(k, v) for k, v in prof.items()) and set(REQUIRED) <= set(prof) and not (
            set(prof) - set(BASE_PROFILE) - {"model_budget_bytes"})
        cmd = rng.choice(["profiles", "emit", "search"]) if not valid else "profiles"
        if what == "name" or what == "avoid":
            cmd = "emit"
        if cmd == "profiles":
            argv = ["profiles", p]
        elif cmd == "search":
            argv = ["search", run, "--profile", p]
        else:
            dist = d / "dist"
            write(dist / "other" / "keep.txt", "another profile's pair\n")
            argv = ["emit", run, "--profile", p, "-o", dist, "--windows", 1, "--data", fx.text()]
        if valid and cmd == "emit":  # emit of a valid profile takes seconds and writes the pair
            argv = ["profiles", p]
        out.append(Case(f"{name}-{what}", "profile", argv, **_ok_if(valid, "every field valid per the schema")))
    return out


def _toml_profile_valid(p: Path) -> bool:
    import tomllib
    try:
        d = tomllib.loads(p.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError, RecursionError, ValueError):
        return False
    return (set(REQUIRED) <= set(d) and not set(d) - set(BASE_PROFILE) - {"model_budget_bytes"}
            and all(profile_field_valid(k, v) for k, v in d.items()))


def _ok_if(valid: bool, why: str) -> dict:
    return {"expect": OK, "why": why} if valid else {}


# ---------------------------------------------------------------- options
# (option, integer?, lo, hi, lo_open) per command; the documented ranges.
TRAIN_OPTIONS = [("--rank", 1, 1, 1024, 0), ("--alpha", 0, 0, 1e6, 1), ("--steps", 1, 1, 10**7, 0),
                 ("--seq-len", 1, 2, 1 << 17, 0), ("--batch", 1, 1, 4096, 0), ("--lr", 0, 0, 10, 1),
                 ("--seed", 1, 0, 2**32 - 1, 0), ("--checkpoint-every", 1, 1, 10**7, 0)]
TRAIN_ONLY = [("--rounds", 1, 1, 1000, 0), ("--search-candidates", 1, 1, 10_000, 0), ("--cam-lr", 0, 0, 10, 0),
              ("--configs-per-step", 1, 1, 1024, 0), ("--top-share", 0, 0, 1, 0), ("--low-share", 0, 0, 1, 0),
              ("--anchor-lora-weight", 0, 0, 1e6, 0), ("--delta-lr", 0, 0, 10, 0), ("--delta-error-power", 0, 0, 100, 0)]
WINDOWS = ("--windows", 1, 1, 100_000, 0)


def bad_numbers(integer: bool, lo, hi, lo_open: bool, rng: random.Random) -> str:
    cands = [str(lo) if lo_open else str(lo - 1), str(hi * 10 + 1), "nan", "inf", "-inf", "1e400", "abc", "",
             "9" * rng.choice([30, 5000]), "--", "0x1g"]
    if integer:
        cands += [f"{lo + 0.5}", "1e3", "true"]
    else:
        cands += ["NaN", "-nan", "1,5"]
    return rng.choice(cands)


def option_cases(rng: random.Random, workdir: Path, fx: Fixtures, n: int) -> list[Case]:
    """Numbers out of range are usage errors, raised before any file is read: the paths are placeholders
    (were a check missing, the command would fail later with another error, which is not a usage error).
    Text options with a fixed vocabulary are checked at the start of the run, on the real tiny model."""
    out = []
    ph = workdir / "cases" / "no-such-input"
    for i in range(n):
        name = f"option/{i:04d}"
        d = case_dir(workdir, name)
        r = rng.randrange(10)
        usage = True
        if r < 4:
            opt = rng.choice(TRAIN_OPTIONS + TRAIN_ONLY)
            argv = ["train", ph, "-o", d / "run", opt[0], bad_numbers(*opt[1:], rng)]
        elif r == 4:
            opt = rng.choice(TRAIN_OPTIONS)
            argv = ["finetune", ph, "--config", "Q8_0", "-o", d / "run", opt[0], bad_numbers(*opt[1:], rng)]
        elif r == 5:
            opt = rng.choice([("--budget-bytes", 1, 1, 1 << 50, 0), ("--bpw", 0, 0, 32, 1), ("--confirm", 1, 0, 1000, 0),
                              ("--confirm-windows", 1, 1, 100_000, 0)])
            base = [] if opt[0] in ("--budget-bytes", "--bpw") else ["--bpw", "8"]
            argv = ["search", ph, *base, opt[0], bad_numbers(*opt[1:], rng)]
        elif r == 6:
            opt = rng.choice([WINDOWS, ("--threads", 1, 1, 512, 0), ("--measure-tokens", 1, 1, 1 << 20, 0)])
            argv = ["validate", ph, opt[0], bad_numbers(*opt[1:], rng)]
        elif r == 7:
            opt = WINDOWS
            argv = ["emit", ph, "--profile", "rpi4-4gb", "-o", d / "dist", "--windows", bad_numbers(*WINDOWS[1:], rng)]
        elif r == 8:
            opt = rng.choice([("--steps", 1, 1, 10**7, 0), WINDOWS])
            argv = ["demo", "-o", d / "demo", opt[0], bad_numbers(*opt[1:], rng)]
        else:  # text options with a fixed vocabulary
            opt, val = rng.choice([("--device", "tpu"), ("--device", "cuda:99"), ("--device", "cpu:x"),
                                   ("--targets", ",,,"), ("--targets", "attn_zz"), ("--menu", "Q9_0"), ("--menu", ","),
                                   ("--anchor", "Q9"), ("--type-deltas", "Q2_K"), ("--data-format", "xml"),
                                   ("--mode", "single"), ("--config-batch", "half"), ("--init-lora", d / "nothing"),
                                   ("--eval-data", d / "missing.jsonl")])
            usage = opt in ("--data-format", "--mode", "--config-batch")
            argv = ["train", fx.model_gguf(), "--data", fx.text(), "-o", d / "run", "--steps", "1", "--seq-len", "32",
                    "--batch", "1", "--rounds", "1", "--search-candidates", "1", "--menu", "Q8_0,Q4_0", opt, val]
        out.append(Case(f"{name}-{argv[0]}{opt[0]}", "option", argv, usage_error=usage))
    return out


# ---------------------------------------------------------------- run folders
# The fixture run's options (bench/fuzz/fixtures.py), so that --resume reaches the damage.
RESUME = ["--steps", "3", "--rank", "2", "--seq-len", "32", "--batch", "1", "--rounds", "1", "--search-candidates",
          "1", "--checkpoint-every", "1", "--menu", "Q8_0,Q4_0"]


class _Canary:
    """A pickle that, when loaded, writes the canary file: code execution made visible."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (Path.write_text, (Path(self.path), "unpickled"))


def run_cases(rng: random.Random, workdir: Path, fx: Fixtures, n: int) -> list[Case]:
    src = fx.run()
    meta = json.loads((src / "run.json").read_text())
    canary = workdir / "cases" / "CANARY"
    out = []
    for i in range(n):
        name = f"run/{i:04d}"
        d = case_dir(workdir, name)
        run = d / "run"
        shutil.copytree(src, run)
        m = json.loads(json.dumps(meta))
        r = rng.randrange(17)
        what = ""
        cmd = rng.choice(["adapter", "adapter", "search", "emit", "resume"])
        if r <= 1:
            data, what = damaged_json(rng, meta)
            if what == "structured" or what == "flipped bits":
                data, what = json.dumps(rng.choice([None, [], [meta], {}, 5])).encode(), "wrong top-level type"
            write(run / "run.json", data)
        elif r == 2:
            del m[rng.choice(["status", "model", "model_sha256", "options", "layout", "step"])]
            what = "missing key"
        elif r == 3:
            key = rng.choice(["status", "model", "model_sha256", "options", "layout", "step"])
            m[key] = rng.choice([None, [], 1, "x", True, math.nan, {"a": 1}, -1])
            what = f"{key} wrong"
        elif r == 4:
            key = rng.choice(["rank", "alpha", "seed", "seq_len", "calib_windows", "steps", "batch", "lr"])
            cur = m["options"][key]  # never the value it has (a seed of 0 set to 0 is no damage)
            m["options"][key] = rng.choice([v for v in (0, -1, math.nan, math.inf, None, "4", True, 10**30, 1.5)
                                            if not (type(v) is type(cur) and v == cur)])
            what = f"options.{key}"
        elif r == 5:
            m["options"]["rank"] = m["options"]["rank"] * 2
            what = "rank mismatch"
        elif r == 6:
            m["options"]["targets"] = rng.choice([["attn_q"], ["ffn_up", "ffn_down"], ["nonexistent"], "attn_q", [1]])
            what = "targets mismatch"
        elif r == 7:
            m["model_sha256"] = rng.choice(["../../../../../../../escape", "../" * 30, "/tmp/abs" + "0" * 56,
                                            "0" * 63 + "/", "G" * 64, ""])
            what = "model_sha256 path"
        elif r == 8:
            rows = m["layout"]["tensors"]
            k = rng.randrange(len(rows))
            rows[k] = rng.choice([[rows[k][0], rows[k][1] * 2, rows[k][2], rows[k][3], rows[k][4]],
                                  ["blk.9.attn_q.weight", *rows[k][1:]], [rows[k][0]], None,
                                  [rows[k][0], -1, 0, "x", "y"], [rows[k][0], 2**40, 2**40, rows[k][3], 0]])
            what = "layout tensor"
        elif r == 9:
            m["layout"]["menu"] = rng.choice([[], ["Q9_9"], None, "Q8_0", [1]])
            what = "layout menu"
        elif r == 10:
            (run / "checkpoint.safetensors").unlink()
            if rng.random() < 0.5:
                with open(run / "checkpoint.pt", "wb") as f:
                    pickle.dump({"lora": _Canary(str(canary))}, f)
                what = "pickle checkpoint"
            else:
                what = "no checkpoint"
        elif r == 11:
            ck = (run / "checkpoint.safetensors").read_bytes()
            hlen = int.from_bytes(ck[:8], "little")
            write(run / "checkpoint.safetensors", rng.choice([truncate(ck, rng), b"", ck[:8] + b"{" + ck[9:],
                                                              flip_bytes(ck[:8], rng) + ck[8:],
                                                              ck[:8] + flip_bytes(ck[8:8 + hlen], rng, 3) + ck[8 + hlen:]]))
            what = "checkpoint damaged"
            if (run / "checkpoint.safetensors").read_bytes() == ck:
                (run / "checkpoint.safetensors").unlink()
        elif r == 12:
            _nan_checkpoint(run / "checkpoint.safetensors", rng)
            what = "NaN checkpoint"
        elif r == 13:
            m["status"] = "training"
            what = "not trained"
        elif r == 14:  # the search's archive: read by search and emit
            arch = json.loads((run / "archive.json").read_text())
            data, what = damaged_json(rng, arch)
            if what in ("structured", "flipped bits"):
                rec = arch["records"][0]
                key = rng.choice(list(rec))
                rec[key] = rng.choice([None, "x", -1, math.nan, [], {"blk.0.nope.weight": "Q8_0"}])
                if key == "round" and rec[key] == -1:
                    rec[key] = None
                data, what = json.dumps(arch).encode(), f"archive record {key}"
            write(run / "archive.json", data)
            cmd = rng.choice(["search", "emit"])
        elif r == 15:  # the training set: read on resume
            data, what = damaged_json(rng, {"x": 1})
            if what in ("structured", "flipped bits"):
                data, what = json.dumps(rng.choice([{}, [None], [{"types": {"x": "Q8_0"}}], [{"types": []}]])).encode(), "trainset"
            write(run / "trainset.json", data)
            cmd = "resume"
        else:  # the tokenized training text: read by --confirm's measurements and on resume
            tok = (run / "tokens.npy").read_bytes()
            write(run / "tokens.npy", rng.choice([b"", truncate(tok, rng), tok[:10] + b"\x00" * 20 + tok[30:],
                                                 pickle.dumps([1, 2, 3]), b"\x93NUMPY\x01\x00" + b"{" * 100]))
            what = "tokens damaged"
            cmd = rng.choice(["confirm", "resume"])
        if r >= 2 and r not in (10, 11, 12, 14, 15, 16):
            write_json(run / "run.json", m)
        if cmd == "search" and r in (5, 6, 10, 11, 12):
            cmd = "adapter"  # search (without --confirm) never reads the checkpoint: rightly unaffected
        if cmd == "adapter":
            argv = ["adapter", run, "--config", "Q8_0", "-o", d / "adapter.gguf"]
        elif cmd == "search":
            argv = ["search", run, "--bpw", "6"]
        elif cmd == "confirm":
            argv = ["search", run, "--bpw", "6", "--confirm", "1", "--confirm-windows", "1"]
        elif cmd == "emit":
            argv = ["emit", run, "--profile", fx.profile_toml(), "-o", d / "dist", "--windows", "1", "--data", fx.text()]
        else:
            argv = ["train", "ignored", "-o", run, "--resume", *RESUME]
        if what == "not trained" and cmd == "resume":
            argv = ["adapter", run, "--config", "Q8_0", "-o", d / "adapter.gguf"]
        out.append(Case(f"{name}-{cmd}-{what.replace(' ', '_')}", "run", argv))
    return out


def _nan_checkpoint(path: Path, rng: random.Random) -> None:
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(path), framework="pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    keys = [k for k in tensors if k.startswith("lora/")]
    for k in (keys if rng.random() < 0.5 else [rng.choice(keys)]):
        t = tensors[k].clone()
        t.view(-1)[rng.randrange(t.numel())] = rng.choice([math.nan, math.inf, -math.inf])
        tensors[k] = t if rng.random() < 0.5 else torch.full_like(t, math.nan)
    save_file(tensors, str(path), metadata=meta)


# ---------------------------------------------------------------- training data records
def data_cases(rng: random.Random, workdir: Path, fx: Fixtures, n: int) -> list[Case]:
    good_chat = {"messages": [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "hi there"}]}
    out = []
    for i in range(n):
        name = f"data/{i:04d}"
        d = case_dir(workdir, name)
        r = rng.randrange(11)
        suffix = ".jsonl"
        if r == 0:
            body = rng.choice([b"\xff\xfe{}", b"{\"text\": \"a\"}\n{bad json\n", b"\x00\x01", deep_json(100_000).encode()])
        elif r == 1:
            body = b""
        elif r == 2:
            body = (json.dumps({"foo": "bar"}) + "\n").encode()
        elif r == 3:
            m = json.loads(json.dumps(good_chat))
            m["messages"][rng.randrange(2)]["role"] = rng.choice(["robot", "", None, 1, "USER"])
            body = (json.dumps(m) + "\n").encode()
        elif r == 4:
            body = (json.dumps({"messages": rng.choice([None, [], "hello", [1, 2], [{"role": "user"}],
                                                        [{"content": "x"}], {"role": "user"}])}) + "\n").encode()
        elif r == 5:
            body = (json.dumps({"messages": [{"role": "user", "content": rng.choice([None, 1, [], {"a": 1}, ""])},
                                             {"role": "assistant", "content": "ok"}]}) + "\n").encode()
        elif r == 6:
            body = (json.dumps({"prompt": "q", "completion": rng.choice([None, 1, [], {}])}) + "\n").encode()
        elif r == 7:
            body = (json.dumps({"text": rng.choice([None, 1, [], "", {"a": "b"}])}) + "\n").encode()
        elif r == 8:
            suffix = ".json"
            body = json.dumps(rng.choice([None, 1, "text", [[1]], {"a": [1]}])).encode()
        elif r == 9:
            suffix = ".csv"
            body = rng.choice([b"a,b\n1,2\n", b"text\n", b"\xff\xfe,\n", b"text,text\n\"x\n"])
        else:
            suffix = rng.choice([".parquet", ".jsonl"])
            body = bytes(rng.randrange(256) for _ in range(rng.randint(1, 300)))
        f = write(d / f"data{suffix}", body)
        argv = ["train", fx.model_gguf(), "--data", f, "-o", d / "run", "--steps", "1", "--seq-len", "32",
                "--batch", "1", "--rounds", "1", "--search-candidates", "1"]
        out.append(Case(f"{name}-{suffix[1:]}{r}", "data", argv))
    return out


# ---------------------------------------------------------------- all of them
def cases(rng: random.Random, workdir: Path, n: int) -> list[Case]:
    fx = Fixtures(workdir)
    # data cases load the model before the records fail (seconds each): fewer of them
    shares = {"configuration": 0.16, "recipe": 0.08, "profile": 0.23, "option": 0.25, "run": 0.22, "data": 0.06}
    out: list[Case] = []
    for kind, share in shares.items():
        k = max(1, round(n * share))
        if kind in ("configuration", "recipe"):
            out += configuration_cases(rng, workdir, fx, k, kind)
        else:
            out += globals()[f"{kind}_cases"](rng, workdir, fx, k)
    return out
