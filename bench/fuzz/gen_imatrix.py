"""Damaged importance matrices (kind ``imatrix``).

Every case starts from the tiny model's valid imatrix (``cases.Fixtures.imatrix``: `coalora imatrix` on the
fixture text, in llama.cpp's GGUF format, and the same values in the legacy ``.dat`` format) and damages one
thing, chosen by the seeded ``rng``:

- the GGUF's structure (``gen_gguf.structural``: header, keys, tensor infos, offsets, the file's end);
- its content: a sums or counts tensor dropped, renamed to a weight the model lacks, reshaped to another row
  length, a count of zero, negative or non-finite values, the required keys (type, datasets, chunk count and
  size) removed or of another type, a model GGUF given as an imatrix;
- the legacy ``.dat``: cut, an entry count, name length or value count out of range, a name that is no text.

Each case runs ``coalora convert MODEL --imatrix FILE --type T`` and expects a one-line error, except the
documented acceptances: an imatrix covering only some of the model's matrices (llama.cpp quantizes the others
without weights) and one with an extra metadata key.
"""
from __future__ import annotations

import math
import random
import struct
from pathlib import Path

from bench.fuzz.cases import ERROR, OK, Case, Fixtures, case_dir, write
from bench.fuzz.gen_gguf import ARR, F32, STR, U32, Parsed, enc_kv, info_bytes, split_info, structural

SUM2, COUNTS = ".in_sum2", ".counts"
REQUIRED = ("general.type", "imatrix.datasets", "imatrix.chunk_count", "imatrix.chunk_size")


def _set_value(p: Parsed, i: int, value: float, rng: random.Random) -> None:
    """Overwrite one of tensor ``i``'s float32 values (at its data offset in ``p.data``) with ``value``."""
    _, ne, _, off = split_info(p.infos[i])
    j = off + 4 * rng.randrange(math.prod(ne))
    p.data = p.data[:j] + struct.pack("<f", value) + p.data[j + 4:]


def content(p: Parsed, model: Parsed, partial: bytes, rng: random.Random) -> tuple[str, bytes, str]:
    """A well-formed GGUF that is no imatrix for the model (or, for a few, one that may be): (label, bytes,
    expect)."""
    q = p.copy()
    sums = [i for i, b in enumerate(q.infos) if split_info(b)[0].endswith(SUM2)]
    counts = [i for i, b in enumerate(q.infos) if split_info(b)[0].endswith(COUNTS)]
    op = rng.choice(["drop_sums", "drop_counts", "rename", "other_row_length", "zero_count", "negative_count",
                     "negative_sum", "nonfinite_sum", "nonfinite_count", "drop_key", "key_type", "not_imatrix",
                     "model_as_imatrix", "accept_partial", "accept_extra_key"])
    if op in ("drop_sums", "drop_counts"):
        i = rng.choice(sums if op == "drop_sums" else counts)
        op = f"{op}:{split_info(q.infos[i])[0]}"
        del q.infos[i]  # its data stays in place: the others keep their offsets
    elif op == "rename":
        i = rng.choice(sums)
        name, ne, t, off = split_info(q.infos[i])
        j = next(k for k in counts if split_info(q.infos[k])[0] == name[:-len(SUM2)] + COUNTS)
        base = rng.choice(["blk.99.ffn_down.weight", "output_norm.weight", "blk.0.attn_qkv.weight",
                           name[:-len(SUM2)].upper()])
        q.infos[i] = info_bytes(base + SUM2, ne, t, off)
        _, ne2, t2, off2 = split_info(q.infos[j])
        q.infos[j] = info_bytes(base + COUNTS, ne2, t2, off2)
        op = f"rename:{name}"
    elif op == "other_row_length":  # same element count: the data layout stays valid
        i = rng.choice(sums)
        name, ne, t, off = split_info(q.infos[i])
        n = math.prod(ne)
        row = rng.choice([d for d in (n // 2, n // 4, 2 * ne[0]) if d and n % d == 0 and d != ne[0]] or [n])
        q.infos[i] = info_bytes(name, [row, n // row], t, off)
        op = f"other_row_length:{name}"
    elif op in ("zero_count", "negative_count", "nonfinite_count"):
        i = rng.choice(counts)
        _set_value(q, i, {"zero_count": 0.0, "negative_count": -rng.choice([1.0, 64.0]),
                          "nonfinite_count": rng.choice([math.nan, math.inf])}[op], rng)
        op = f"{op}:{split_info(q.infos[i])[0]}"
    elif op in ("negative_sum", "nonfinite_sum"):
        i = rng.choice(sums)
        _set_value(q, i, -rng.choice([1e-3, 1.0, 1e30]) if op == "negative_sum"
                   else rng.choice([math.nan, math.inf, -math.inf]), rng)
        op = f"{op}:{split_info(q.infos[i])[0]}"
    elif op == "drop_key":
        key = rng.choice(REQUIRED)
        q.kv.pop(key, None)
        op = f"drop_key:{key}"
    elif op == "key_type":
        key = rng.choice(REQUIRED)
        q.kv[key] = rng.choice([enc_kv(key, F32, 1.5), enc_kv(key, ARR, (U32, [1, 2]))]
                               + ([enc_kv(key, STR, "16")] if key != "general.type" else []))
        op = f"key_type:{key}"
    elif op == "not_imatrix":
        q.kv["general.type"] = enc_kv("general.type", STR, rng.choice(["model", "adapter", "", "IMATRIX"]))
    elif op == "model_as_imatrix":
        return op, model.build(), ERROR
    elif op == "accept_partial":  # one matrix's entry left out: llama.cpp quantizes that one without weights
        return op, partial, OK
    else:
        q.kv["user.note"] = enc_kv("user.note", STR, "a key llama.cpp does not read")
        return op, q.build(), OK
    return op, q.build(), ERROR


def legacy(raw: bytes, rng: random.Random) -> tuple[str, bytes]:
    """The legacy ``.dat`` with one field out of range, or cut short."""
    op = rng.choice(["truncate", "n_entries", "name_length", "n_values", "bad_utf8", "empty"])
    if op == "truncate":
        return op, raw[:rng.randrange(1, len(raw) - 12)]  # the last 12 bytes (chunk count, dataset) are optional
    if op == "empty":
        return op, b""
    if op == "n_entries":
        return op, struct.pack("<i", rng.choice([0, -1, 1 << 21, 2**31 - 1])) + raw[4:]
    name_len = struct.unpack_from("<i", raw, 4)[0]
    if op == "name_length":
        return op, raw[:4] + struct.pack("<i", rng.choice([0, -1, 5000, 2**31 - 1])) + raw[8:]
    if op == "bad_utf8":
        return op, raw[:8] + b"\xff\xfe" + raw[10:]
    p = 8 + name_len + 4  # after the first entry's name and call count
    return op, raw[:p] + struct.pack("<i", rng.choice([0, -1, 2**31 - 1, 1 << 24])) + raw[p + 4:]


def cases(rng: random.Random, workdir: Path, n: int) -> list[Case]:
    fx = Fixtures(workdir)
    model, gguf_path, dat_path = fx.model_gguf(), fx.imatrix(), fx.imatrix_dat()
    p, model_p = Parsed(gguf_path), Parsed(model)
    raw, dat = gguf_path.read_bytes(), dat_path.read_bytes()
    partial = _partial(gguf_path, workdir / "fixtures" / "partial-imatrix.gguf", rng)
    out: list[Case] = []
    counts: dict[str, int] = {}
    for _ in range(n):
        r = rng.random()
        if r < 0.35:
            label, data, expect, suffix = *structural(p, raw, rng), ERROR, ".gguf"
        elif r < 0.8:
            label, data, expect = content(p, model_p, partial, rng)
            suffix = ".gguf"
        else:
            label, data = legacy(dat, rng)
            label, expect, suffix = f"dat_{label}", ERROR, ".dat"
        base = f"imatrix/{label.split(':')[0]}"
        counts[base] = counts.get(base, 0) + 1
        cname = f"{base}-{counts[base]}"
        d = case_dir(workdir, cname)
        f = write(d / f"imatrix{suffix}", data)
        argv = ["convert", model, "--imatrix", f, "--type", rng.choice(["IQ4_NL", "Q4_K", "Q2_K", "IQ3_S"]),
                "-o", d / "out.gguf"]
        outputs = (str((d / "out.gguf").relative_to(workdir)),) if expect == OK else ()
        out.append(Case(cname, "imatrix", argv, expect, why=_WHY.get(label, ""), outputs=outputs))
    return out


def _partial(path: Path, out: Path, rng: random.Random) -> bytes:
    """The imatrix at ``path`` without one matrix's entry, written by coalora's writer (offsets stay valid)."""
    from converters import imatrix

    im = imatrix.load(path)
    name = rng.choice(im.names())
    del im.sums[name], im.counts[name]
    im.save(out)
    return out.read_bytes()


_WHY = {"accept_partial": "an imatrix may cover only some matrices: llama.cpp quantizes the others without "
                          "weights (types that need an entry are refused per tensor)",
        "accept_extra_key": "llama.cpp and coalora ignore keys they do not read"}
