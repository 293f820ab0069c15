"""Damaged GGUF models, LoRA adapters and emitted device folders (kinds ``gguf``, ``adapter``, ``device``).

Every case starts from a valid fixture (``cases.Fixtures``: the tiny model's Q8_0 GGUF, the tiny run's
adapter, an emitted device folder) and damages one thing, chosen by the seeded ``rng``:

- the header (magic, version, tensor and key counts), a key's value type or length (nested arrays, huge
  strings, unknown types), a tensor info (name, dimensions, type, data offset), the file's end (cut or
  padded);
- hyperparameters llama.cpp aborts on or that are out of range (block count, RMS epsilon, heads, context,
  rope), the vocabulary (duplicate tokens, counts), the architecture, required keys removed;
- adapters: the same structural damage, plus LoRA names, shapes, types and alpha;
- device folders: manifest.json edited (types, NaN, the files listed, checksums, recomputable values,
  unreadable JSON), extra or missing files, and model.gguf / adapter.gguf damaged with the manifest's
  checksum updated to match, so only the content checks stand between the file and llama.cpp.

Model cases run ``coalora convert`` (and ``inspect`` for structural damage), adapter and device cases
``coalora validate`` (or ``package``). Each expects a one-line error, except the documented acceptances
(a renamed model, an added unknown key), which must succeed.
"""
from __future__ import annotations

import hashlib
import json
import math
import random
import shutil
import struct
from pathlib import Path

from bench.fuzz.cases import ERROR, OK, Case, Fixtures, case_dir, write

# GGUF value types
U8, I8, U16, I16, U32, I32, F32, BOOL, STR, ARR, U64, I64, F64 = range(13)
_FMT = {U8: "B", I8: "b", U16: "H", I16: "h", U32: "I", I32: "i", F32: "f", BOOL: "?", U64: "Q", I64: "q",
        F64: "d"}
HOSTILE_INTS = (0, 1, 2, 3, 1000, 2**16, 2**31 - 1, 2**31, 2**32 - 1)
HOSTILE_FLOATS = (math.nan, math.inf, -math.inf, -1e-5, 0.0, 1.0, 1e30, -0.0)


# ---- GGUF bytes, split into editable parts --------------------------------------------------------
def enc_str(s: str | bytes) -> bytes:
    b = s.encode("utf-8", "surrogatepass") if isinstance(s, str) else s
    return struct.pack("<Q", len(b)) + b


def enc_kv(key: str, vtype: int, value) -> bytes:
    """A key/value record; ``value`` a scalar, a string, or (element type, list) for arrays."""
    out = enc_str(key) + struct.pack("<I", vtype)
    if vtype == STR:
        return out + enc_str(value)
    if vtype == ARR:
        etype, items = value
        out += struct.pack("<IQ", etype, len(items))
        return out + b"".join(enc_str(x) if etype == STR else struct.pack("<" + _FMT[etype], x) for x in items)
    return out + struct.pack("<" + _FMT[vtype], value)


class Parsed:
    """A valid GGUF as header fields, key/value records (raw bytes, by key), tensor infos (raw bytes) and the
    data section; ``build()`` puts them back together with the data section realigned."""

    def __init__(self, path: Path):
        import gguf

        r = gguf.GGUFReader(path)
        raw = Path(path).read_bytes()
        base = r.data.ctypes.data
        self.version = 3
        self.kv: dict[str, bytes] = {}
        self.kv_types: dict[str, list] = {}
        starts = [(f.offset, k) for k, f in r.fields.items() if not k.startswith("GGUF.")]
        infos = [t.field.offset for t in r.tensors]
        ends = [o for o, _ in starts[1:]] + [infos[0] if infos else r.data_offset]
        for (o, k), e in zip(starts, ends):
            self.kv[k] = raw[o:e]
            self.kv_types[k] = [int(t) for t in r.fields[k].types]
        info_end = infos[1:] + [_info_end(r.tensors[-1], base)] if infos else []
        self.infos = [raw[o:e] for o, e in zip(infos, info_end)]
        self.names = [t.name for t in r.tensors]
        self.alignment = int(r.alignment)
        self.data = raw[r.data_offset:]
        self.fields = r.fields

    def copy(self) -> "Parsed":
        q = Parsed.__new__(Parsed)
        q.__dict__.update(self.__dict__)
        q.kv, q.infos = dict(self.kv), list(self.infos)
        return q

    def value(self, key):
        return self.fields[key].contents()

    def build(self, n_tensors: int | None = None, n_kv: int | None = None, version: int | None = None,
              magic: bytes = b"GGUF") -> bytes:
        head = magic + struct.pack("<IQQ", self.version if version is None else version,
                                   len(self.infos) if n_tensors is None else n_tensors,
                                   len(self.kv) if n_kv is None else n_kv)
        body = head + b"".join(self.kv.values()) + b"".join(self.infos)
        return body + b"\0" * (-len(body) % self.alignment) + self.data


def _info_end(t, base: int) -> int:
    off = t.field.parts[-1]
    return off.ctypes.data - base + off.nbytes


def info_bytes(name: str, ne: list[int], ggml_type: int, offset: int) -> bytes:
    return enc_str(name) + struct.pack("<I", len(ne)) + b"".join(struct.pack("<Q", d) for d in ne) + \
        struct.pack("<IQ", ggml_type, offset)


def split_info(b: bytes) -> tuple[str, list[int], int, int]:
    n = struct.unpack_from("<Q", b, 0)[0]
    name = b[8:8 + n].decode()
    p = 8 + n
    nd = struct.unpack_from("<I", b, p)[0]
    ne = list(struct.unpack_from(f"<{nd}Q", b, p + 4))
    t, off = struct.unpack_from("<IQ", b, p + 4 + 8 * nd)
    return name, ne, t, off


def flip_bit(b: bytes, rng: random.Random, lo: int = 0, hi: int | None = None) -> bytes:
    hi = len(b) if hi is None else hi
    i = rng.randrange(lo, hi)
    out = bytearray(b)
    out[i] ^= 1 << rng.randrange(8)
    return bytes(out)


# ---- damage to any GGUF (model or adapter): (label, bytes) ----------------------------------------
def structural(p: Parsed, raw: bytes, rng: random.Random) -> tuple[str, bytes]:
    """Damage that no reader may accept: bounds, nesting, types, offsets, the file's end."""
    op = rng.choice(["magic", "version", "n_tensors", "n_kv", "nested", "huge_string", "bad_vtype", "key_len",
                     "dup_key", "empty_key", "n_dims", "dim", "ggml_type", "offset", "dup_tensor", "long_name",
                     "truncate", "append", "alignment", "bad_utf8"])
    kvs = list(p.kv)
    if op == "magic":
        return op, p.build(magic=rng.choice([b"GGUG", b"FUGG", b"\0\0\0\0", b"ggml"]))
    if op == "version":
        return op, p.build(version=rng.choice([0, 1, 4, 2**32 - 1, 3 << 24]))
    if op == "n_tensors":
        n = len(p.infos)
        return op, p.build(n_tensors=rng.choice([n + 1, n + 1000, 2**63, 2**64 - 1, n - 1 if n > 1 else n + 2]))
    if op == "n_kv":
        n = len(p.kv)
        return op, p.build(n_kv=rng.choice([n + 1, n - 1, 2**40, 2**64 - 1]))
    if op in ("nested", "huge_string", "bad_vtype", "key_len", "dup_key", "empty_key", "bad_utf8"):
        key = rng.choice(kvs[1:] or kvs)
        q = p.copy()
        if op == "nested":
            q.kv[key] = enc_str(key) + struct.pack("<IIQ", ARR, ARR, rng.choice([1, 2**20, 2**40, 2**64 - 1]))
        elif op == "huge_string":
            q.kv[key] = enc_str(key) + struct.pack("<IQ", STR, rng.choice([2**30, 2**62, 2**64 - 1]))
        elif op == "bad_vtype":
            q.kv[key] = enc_str(key) + struct.pack("<I", rng.choice([13, 99, 2**31, 2**32 - 1])) + q.kv[key][-8:]
        elif op == "key_len":
            q.kv[key] = struct.pack("<Q", rng.choice([2**20, 2**40, 2**64 - 1])) + q.kv[key][8:]
        elif op == "dup_key":
            q.kv[key + "#dup"] = q.kv[kvs[0]]
        elif op == "empty_key":
            q.kv[key] = enc_str("") + q.kv[key][8 + len(key.encode()):]
        else:
            q.kv[key] = enc_str(b"\xff\xfe" + key.encode()[2:]) + q.kv[key][8 + len(key.encode()):]
        return f"{op}:{key}", q.build()
    if op in ("n_dims", "dim", "ggml_type", "offset", "dup_tensor", "long_name"):
        q = p.copy()
        i = rng.randrange(len(q.infos))
        name, ne, t, off = split_info(q.infos[i])
        if op == "n_dims":
            nd = rng.choice([0, 5, 2**32 - 1])
            q.infos[i] = enc_str(name) + struct.pack("<I", nd) + q.infos[i][8 + len(name) + 4:]
        elif op == "dim":
            k = rng.randrange(len(ne))  # never the value it has (an imatrix's counts have a dimension of 1)
            ne[k] = rng.choice([v for v in (0, 1, 2**40, 2**63, 2**64 - 1, ne[0] + 1) if v != ne[k]])
            q.infos[i] = info_bytes(name, ne, t, off)
        elif op == "ggml_type":
            q.infos[i] = info_bytes(name, ne, rng.choice([4, 5, 40, 99, 2**31, t ^ 1 if t not in (0, 1) else 2]),
                                    off)
        elif op == "offset":
            q.infos[i] = info_bytes(name, ne, t, rng.choice([off + 32, off - 32 if off else 64, 2**63,
                                                              2**64 - 32, 2**64 - off - 32]))
        elif op == "dup_tensor":
            j = (i + 1) % len(q.infos)
            n2, ne2, t2, off2 = split_info(q.infos[j])
            q.infos[j] = info_bytes(name, ne2, t2, off2)
        else:
            q.infos[i] = info_bytes(name + "x" * rng.choice([64, 1000]), ne, t, off)
        return f"{op}:{name}", q.build()
    if op == "truncate":
        return op, raw[:rng.randrange(0, len(raw) - p.alignment)]
    if op == "append":
        return op, raw + bytes(rng.randrange(256) for _ in range(rng.choice([p.alignment, 1000, 4096])))
    if op == "alignment":
        q = p.copy()
        q.kv["general.alignment"] = rng.choice([enc_kv("general.alignment", U32, v) for v in (0, 3, 48, 2**31)]
                                               + [enc_kv("general.alignment", U64, 32)])
        return op, q.build()
    raise AssertionError(op)


def model_content(p: Parsed, rng: random.Random) -> tuple[str, bytes, str]:
    """Well-formed GGUF with content a llama model cannot have (or, for a few, may have): (label, bytes, expect)."""
    a = p.value("general.architecture")
    n_blocks = p.value(f"{a}.block_count")
    q = p.copy()
    op = rng.choice(["block_count", "eps", "heads", "heads_kv", "embd", "ctx", "rope_base", "rope_dim", "ffn",
                     "dup_tokens", "n_tokens", "scores", "token_type", "tokens_type", "arch", "drop_key",
                     "drop_tensor", "rename_tensor", "int_as_string", "float_as_int_array", "no_tensors",
                     "accept_name", "accept_extra_key"])
    if op == "block_count":
        q.kv[f"{a}.block_count"] = enc_kv(f"{a}.block_count", U32,
                                          rng.choice([0, n_blocks + 1, n_blocks - 1 or 3, 513, 1000, 2**32 - 1]))
    elif op == "eps":
        q.kv[f"{a}.attention.layer_norm_rms_epsilon"] = enc_kv(f"{a}.attention.layer_norm_rms_epsilon", F32,
                                                              rng.choice(HOSTILE_FLOATS))
    elif op in ("heads", "heads_kv", "embd", "ctx", "ffn", "rope_dim"):
        key = {"heads": "attention.head_count", "heads_kv": "attention.head_count_kv", "embd": "embedding_length",
               "ctx": "context_length", "ffn": "feed_forward_length", "rope_dim": "rope.dimension_count"}[op]
        cur = p.value(f"{a}.{key}") if f"{a}.{key}" in p.kv else 64
        q.kv[f"{a}.{key}"] = enc_kv(f"{a}.{key}", U32, rng.choice([v for v in HOSTILE_INTS + (cur + 1, cur * 2)
                                                                   if v != cur and not (op == "ctx" and 0 < v < 2**24)
                                                                   and not (op == "rope_dim" and v == 2)]))
    elif op == "rope_base":
        q.kv[f"{a}.rope.freq_base"] = enc_kv(f"{a}.rope.freq_base", F32, rng.choice(HOSTILE_FLOATS[:5]))
    elif op in ("dup_tokens", "n_tokens", "tokens_type"):
        toks = p.value("tokenizer.ggml.tokens")
        if op == "dup_tokens":
            i, j = rng.sample(range(len(toks)), 2)
            toks = list(toks)
            toks[j] = toks[i]
            q.kv["tokenizer.ggml.tokens"] = enc_kv("tokenizer.ggml.tokens", ARR, (STR, toks))
        elif op == "n_tokens":
            toks = toks[:-rng.randint(1, 5)] if rng.random() < 0.5 else toks + [f"<extra{i}>" for i in range(3)]
            q.kv["tokenizer.ggml.tokens"] = enc_kv("tokenizer.ggml.tokens", ARR, (STR, toks))
        else:
            q.kv["tokenizer.ggml.tokens"] = enc_kv("tokenizer.ggml.tokens", ARR, (I32, list(range(len(toks)))))
    elif op in ("scores", "token_type"):
        key = f"tokenizer.ggml.{op}"
        n = len(p.value("tokenizer.ggml.tokens"))
        if key in p.kv:
            q.kv[key] = enc_kv(key, ARR, (F32 if op == "scores" else I32, [1] * rng.choice([0, 1, n - 1, n + 1])))
        else:
            q.kv[key] = enc_kv(key, STR, "not an array")
    elif op == "arch":
        q.kv["general.architecture"] = enc_kv("general.architecture", STR,
                                              rng.choice(["gpt2", "", "llama\0", "LLAMA", "x" * 5000, "qwen2"]))
    elif op == "drop_key":
        key = rng.choice(["general.architecture", f"{a}.block_count", f"{a}.embedding_length",
                          f"{a}.attention.head_count", f"{a}.attention.layer_norm_rms_epsilon",
                          f"{a}.context_length", "tokenizer.ggml.tokens", "tokenizer.ggml.model",
                          f"{a}.feed_forward_length"])
        q.kv.pop(key, None)
        op = f"drop_key:{key}"
    elif op in ("drop_tensor", "rename_tensor"):
        i = rng.randrange(len(q.infos))
        name, ne, t, off = split_info(q.infos[i])
        if op == "drop_tensor":  # data of the others stays in place; the dropped one's bytes become a gap
            del q.infos[i]
        else:
            new = rng.choice([flip_bit(name.encode(), rng).decode("utf-8", "replace")[:63], name.upper(),
                              name.replace("weight", "bias"), "blk.99." + name.split(".", 2)[-1], "token_embd"])
            q.infos[i] = info_bytes(new, ne, t, off)
        op = f"{op}:{name}"
    elif op == "int_as_string":
        key = rng.choice([f"{a}.block_count", f"{a}.embedding_length", f"{a}.attention.head_count"])
        q.kv[key] = enc_kv(key, STR, str(p.value(key)))
    elif op == "float_as_int_array":
        key = f"{a}.attention.layer_norm_rms_epsilon"
        q.kv[key] = enc_kv(key, ARR, (I32, []))
    elif op == "no_tensors":
        q.infos, q.data = [], b""
    elif op == "accept_name":
        name = "".join(rng.choice("abcdefgh é-_0123456789") for _ in range(rng.randint(1, 40)))
        q.kv["general.name"] = enc_kv("general.name", STR, name)
        return op, q.build(), OK
    elif op == "accept_extra_key":
        q.kv["user.note"] = rng.choice([enc_kv("user.note", STR, "a key llama.cpp does not read"),
                                        enc_kv("user.note", U32, rng.randrange(2**32))])
        return op, q.build(), OK
    return op, q.build(), ERROR


def adapter_content(p: Parsed, rng: random.Random) -> tuple[str, bytes]:
    """A well-formed GGUF that is not a LoRA adapter for the model."""
    q = p.copy()
    op = rng.choice(["type", "adapter_type", "alpha", "arch", "rename", "shape", "drop_partner", "tensor_type"])
    if op == "type":
        q.kv["general.type"] = enc_kv("general.type", STR, rng.choice(["model", "", "ADAPTER"]))
    elif op == "adapter_type":
        q.kv["adapter.type"] = enc_kv("adapter.type", STR, rng.choice(["control_vector", "lora ", ""]))
    elif op == "alpha":
        v = rng.choice([math.nan, math.inf, -math.inf])
        q.kv["adapter.lora.alpha"] = rng.choice([enc_kv("adapter.lora.alpha", F32, v),
                                                 enc_kv("adapter.lora.alpha", STR, "8")])
    elif op == "arch":
        q.kv["general.architecture"] = enc_kv("general.architecture", STR, rng.choice(["qwen2", "gpt2", ""]))
    else:
        i = rng.randrange(len(q.infos))
        name, ne, t, off = split_info(q.infos[i])
        if op == "rename":
            new = rng.choice([name.replace("lora_a", "lora_c"), name.replace("blk.0", "blk.7"),
                              name.replace(".weight", ""), "token_embd.weight.lora_a"])
            q.infos[i] = info_bytes(new if new != name else name + "x", ne, t, off)
        elif op == "shape":  # same element count, so the data layout stays valid
            q.infos[i] = info_bytes(name, [ne[1], ne[0]] if ne[0] != ne[1] else [ne[0] * 2, ne[1] // 2], t, off) \
                if len(ne) == 2 and ne[1] % 2 == 0 else info_bytes(name, [ne[0] // 2 or 2, 2], t, off)
        elif op == "drop_partner":
            del q.infos[i]
        else:  # F32 -> I32 (same size): not a float tensor
            q.infos[i] = info_bytes(name, ne, 26, off)
        op = f"{op}:{name}"
    return op, q.build()


# ---- device folders ----------------------------------------------------------------------------------
def _sha(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


def manifest_edit(m: dict, rng: random.Random) -> str:
    """Edit a manifest in place so that it no longer describes its folder or breaks the schema."""
    op = rng.choice(["files_empty", "files_one", "files_extra", "file_sha", "file_bytes", "source_sha",
                     "source_sha_path", "fits", "memory", "config_type", "config_name", "histogram", "arch",
                     "bpw", "file_bytes_search", "budget", "nan", "inf", "str_int", "bool_int", "float_int",
                     "negative", "missing_key", "null", "list", "commands", "format", "n_ctx", "n_windows",
                     "profile_threads", "profile_ctx", "text_sha"])
    ev, mem = m.get("evaluation", {}), m.get("memory", {})
    if op == "files_empty":
        m["files"] = {}
    elif op == "files_one":
        m["files"].pop(rng.choice(list(m["files"])))
    elif op == "files_extra":
        m["files"]["../../escape.gguf"] = dict(m["files"]["model.gguf"])
    elif op == "file_sha":
        m["files"][rng.choice(list(m["files"]))]["sha256"] = rng.choice(["0" * 64, "../" * 20, "", "G" * 64])
    elif op == "file_bytes":
        m["files"][rng.choice(list(m["files"]))]["bytes"] = rng.choice([0, -1, 1.5, "12", 2**70, None])
    elif op == "source_sha":
        m["source_model"]["sha256"] = "f" * 64
    elif op == "source_sha_path":
        m["source_model"]["sha256"] = rng.choice(["../../../../etc/x", "a" * 10, 12])
    elif op == "fits":
        k = rng.choice(["model_budget", "memory_model"])
        m["fits"][k] = rng.choice([not m["fits"][k], "yes", 1, None])
    elif op == "memory":
        k = rng.choice(list(mem))
        mem[k] = rng.choice([v for v in (0, 1, mem[k] + 1, mem[k] * 2) if v != mem[k]])  # always a change
    elif op == "config_type":
        n = rng.choice(list(m["configuration"]))
        cur = m["configuration"][n].upper()
        m["configuration"][n] = rng.choice([q for q in ("Q4_0", "Q2_K", "F16", "Q9_9", "", "q8_0") if q.upper() != cur])
    elif op == "config_name":
        n = rng.choice(list(m["configuration"]))
        m["configuration"][n + ".x"] = m["configuration"].pop(n)
    elif op == "histogram":
        m["histogram"] = {"Q4_0": 1}
    elif op == "arch":
        k = rng.choice(list(m["architecture"]))
        m["architecture"][k] += rng.choice([1, -1, 1000])
    elif op == "bpw":
        m["search"]["bits_per_weight"] = rng.choice([1.0, 8.6, 0.0, 100.0])
    elif op == "file_bytes_search":
        m["search"]["file_bytes"] += 1
    elif op == "budget":
        m["search"]["budget_bytes"] = rng.choice([1, 2**49, 0, -5])
    elif op in ("nan", "inf"):
        v = math.nan if op == "nan" else rng.choice([math.inf, -math.inf])
        target = rng.choice([("evaluation", "predicted_perplexity"), ("search", "bits_per_weight"),
                             ("memory", "total_bytes"), ("evaluation", "n_ctx")])
        m[target[0]][target[1]] = v
        op = f"{op}:{'.'.join(target)}"
    elif op in ("str_int", "bool_int", "float_int", "negative"):
        target = rng.choice([("evaluation", "n_ctx"), ("evaluation", "n_windows"), ("memory", "model_bytes"),
                             ("search", "budget_bytes")])
        cur = m[target[0]][target[1]]
        m[target[0]][target[1]] = {"str_int": str(cur), "bool_int": True, "float_int": cur + 0.5,
                                   "negative": -cur}[op]
        op = f"{op}:{'.'.join(target)}"
    elif op == "missing_key":
        k = rng.choice(["files", "evaluation", "memory", "fits", "profile", "configuration", "source_model",
                        "search", "commands"])
        m.pop(k)
        op = f"missing_key:{k}"
    elif op == "null":
        k = rng.choice(["files", "evaluation", "memory", "profile", "configuration"])
        m[k] = None
        op = f"null:{k}"
    elif op == "list":
        k = rng.choice(["files", "evaluation", "fits"])
        m[k] = [m[k]]
        op = f"list:{k}"
    elif op == "commands":
        m["commands"]["llama-cli"] = rng.choice(["rm -rf ~", "", "llama-cli -m /etc/passwd"])
    elif op == "format":
        m["format"] = rng.choice(["coalora-dist/2", "", None, 1])
    elif op == "n_ctx":
        ev["n_ctx"] = rng.choice([0, 1, 2**21, 2**40])
    elif op == "n_windows":
        ev["n_windows"] = rng.choice([0, -1, 2**21])
    elif op == "profile_threads":
        m["profile"]["threads"] = rng.choice([0, 100_000, -1, "4", True, 2.5])
    elif op == "profile_ctx":
        m["profile"]["context_length"] = rng.choice([0, -1, 2**40, "256", math.inf])
    else:  # not a sha256 (another valid one is a changed text: validate then skips the perplexity verdict)
        ev["text_sha256"] = rng.choice(["zz", "G" * 64, "", "0" * 63])
    return op


def cases(rng: random.Random, workdir: Path, n: int) -> list[Case]:
    fx = Fixtures(workdir)
    model_path, adapter_path, device = fx.model_gguf(), fx.adapter_gguf(), fx.device()
    model_raw, adapter_raw = model_path.read_bytes(), adapter_path.read_bytes()
    model_p, adapter_p = Parsed(model_path), Parsed(adapter_path)
    out: list[Case] = []
    counts: dict[str, int] = {}

    def name(kind: str, label: str) -> str:
        base = f"{kind}/{label.split(':')[0]}"
        counts[base] = counts.get(base, 0) + 1
        return f"{base}-{counts[base]}"

    for _ in range(n):
        r = rng.random()
        if r < 0.4:  # a damaged model
            if rng.random() < 0.45:
                label, data, expect = *structural(model_p, model_raw, rng), ERROR
            else:
                label, data, expect = model_content(model_p, rng)
            cname = name("gguf", label)
            d = case_dir(workdir, cname)
            f = write(d / "model.gguf", data)
            cmd = rng.choice(["convert", "convert", "inspect", "train"]) if expect == ERROR else "convert"
            if cmd == "inspect" and not label.split(":")[0] in _STRUCTURAL_OPS:
                cmd = "convert"  # a well-formed file with odd content: inspect shows it, by design
            if cmd == "convert":
                argv = ["convert", f, "-o", d / "out.gguf", "--type", rng.choice(["Q8_0", "Q4_0", "F16"])]
            elif cmd == "inspect":
                argv = ["inspect", f, "--json"]
            else:
                argv = ["train", f, "-o", d / "run", "--steps", "1", "--data", fx.text(), "--seq-len", "16"]
            outputs = (str((d / "out.gguf").relative_to(workdir)),) if expect == OK else ()
            out.append(Case(cname, "gguf", argv, expect, why=_WHY.get(label.split(":")[0], ""), outputs=outputs))
        elif r < 0.6:  # a damaged adapter in an otherwise valid device folder, its checksum updated
            if rng.random() < 0.5:
                label, data = structural(adapter_p, adapter_raw, rng)
            else:
                label, data = adapter_content(adapter_p, rng)
            cname = name("adapter", label)
            d = _device_copy(device, workdir, cname)
            _replace(d, "adapter.gguf", data)
            out.append(Case(cname, "adapter", ["validate", d, "--no-measure", "--threads", "1"]))
        else:  # a damaged device folder
            cname, argv = _device_case(rng, workdir, device, model_p, model_raw, name)
            out.append(Case(cname, "device", argv))
    return out


_STRUCTURAL_OPS = {"magic", "version", "n_tensors", "n_kv", "nested", "huge_string", "bad_vtype", "key_len",
                   "dup_key", "empty_key", "n_dims", "dim", "ggml_type", "offset", "dup_tensor", "long_name",
                   "truncate", "append", "alignment", "bad_utf8"}
_WHY = {"accept_name": "general.name is free text: the model is unchanged",
        "accept_extra_key": "llama.cpp and coalora ignore keys they do not read; the writer copies it"}


def _device_copy(device: Path, workdir: Path, cname: str) -> Path:
    d = case_dir(workdir, cname) / "dist" / device.name
    shutil.rmtree(d.parent, ignore_errors=True)  # a work folder reused from an earlier run
    shutil.copytree(device, d)
    return d


def _replace(d: Path, fname: str, data: bytes) -> None:
    """Write ``data`` as ``fname`` and make the manifest's checksum (and size) agree with it."""
    write(d / fname, data)
    m = json.loads((d / "manifest.json").read_text())
    m["files"][fname] = {"bytes": len(data), "sha256": _sha(data)}
    (d / "manifest.json").write_text(json.dumps(m, indent=2))


def _device_case(rng, workdir, device, model_p, model_raw, name):
    op = rng.choice(["manifest"] * 6 + ["model", "model", "extra_file", "missing_file", "symlink", "raw_json",
                                        "swap"])
    if op == "manifest":
        m = json.loads((device / "manifest.json").read_text())
        label = manifest_edit(m, rng)
        cname = name("device", f"manifest_{label}")
        d = _device_copy(device, workdir, cname)
        (d / "manifest.json").write_text(json.dumps(m, allow_nan=True))
    elif op == "model":  # damaged model.gguf, manifest checksum updated: the content checks must catch it
        label, data, expect = model_content(model_p, rng)
        if expect == OK:
            label, data = structural(model_p, model_raw, rng)
        cname = name("device", f"model_{label}")
        d = _device_copy(device, workdir, cname)
        _replace(d, "model.gguf", data)
    elif op == "extra_file":
        cname = name("device", "extra_file")
        d = _device_copy(device, workdir, cname)
        write(d / rng.choice(["notes.txt", "model.gguf.bak", ".hidden", "adapter2.gguf"]), b"x")
    elif op == "missing_file":
        cname = name("device", "missing_file")
        d = _device_copy(device, workdir, cname)
        (d / rng.choice(["model.gguf", "adapter.gguf"])).unlink()
    elif op == "symlink":
        cname = name("device", "symlink")
        d = _device_copy(device, workdir, cname)
        f = rng.choice(["model.gguf", "adapter.gguf"])
        target = d.parent / f"real-{f}"
        (d / f).rename(target)
        (d / f).symlink_to(target)
    elif op == "raw_json":
        cname = name("device", "raw_json")
        d = _device_copy(device, workdir, cname)
        (d / "manifest.json").write_bytes(rng.choice([b"\xff\xfe{}", b"[" * 100_000 + b"]" * 100_000, b"",
                                                      b"null", b"[]", b'{"format": "coalora-dist/1"}',
                                                      b"{" * 50, b'"x"' * 1000]))
    else:  # adapter and model swapped
        cname = name("device", "swap")
        d = _device_copy(device, workdir, cname)
        a, b = (d / "model.gguf").read_bytes(), (d / "adapter.gguf").read_bytes()
        _replace(d, "model.gguf", b)
        _replace(d, "adapter.gguf", a)
    if rng.random() < 0.25:
        return cname, ["package", d, "-o", case_dir(workdir, cname) / "out.tar.gz"]
    return cname, ["validate", d, "--no-measure", "--threads", "1"]
