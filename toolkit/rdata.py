"""Reader for R lazy-load databases (``.rdx`` index + ``.rdb`` blobs).

Only what R data packages use for plain data is supported: XDR serialization
version 2/3 with vectors, pairlists, symbols and attributes. That is enough to
read the character vectors of ``janeaustenr`` without an R installation.
"""
from __future__ import annotations

import bz2
import gzip
import lzma
import struct
import zlib
from pathlib import Path

# SEXP type codes (R Internals, "Serialization formats").
NILSXP, SYMSXP, LISTSXP, CHARSXP, LGLSXP, INTSXP, REALSXP, STRSXP, VECSXP = 0, 1, 2, 9, 10, 13, 14, 16, 19
REFSXP, NILVALUE_SXP, GLOBALENV_SXP, UNBOUNDVALUE_SXP, MISSINGARG_SXP, BASENAMESPACE_SXP = 255, 254, 253, 252, 251, 250
EMPTYENV_SXP, BASEENV_SXP = 242, 241
NA_INT = -(2**31)


class RDataError(ValueError):
    pass


class _XDR:
    def __init__(self, buf: bytes):
        self.buf, self.pos, self.refs = buf, 0, []

    def int(self) -> int:
        (v,) = struct.unpack_from(">i", self.buf, self.pos)
        self.pos += 4
        return v

    def bytes(self, n: int) -> bytes:
        b = self.buf[self.pos:self.pos + n]
        self.pos += n
        return b

    def item(self):
        flags = self.int()
        kind, has_attr, has_tag = flags & 0xFF, flags & (1 << 9), flags & (1 << 10)
        if kind in (NILVALUE_SXP, EMPTYENV_SXP, BASEENV_SXP, GLOBALENV_SXP, UNBOUNDVALUE_SXP,
                    MISSINGARG_SXP, BASENAMESPACE_SXP):
            return None
        if kind == REFSXP:
            idx = flags >> 8 or self.int()
            return self.refs[idx - 1]
        if kind == SYMSXP:
            name = self.item()
            self.refs.append(name)
            return name
        if kind == CHARSXP:
            n = self.int()
            return None if n == -1 else self.bytes(n).decode("utf-8", "replace")
        if kind == LISTSXP:  # pairlist -> dict of tag: value
            out = {}
            while kind == LISTSXP:
                if has_attr:
                    self.item()
                tag = self.item() if has_tag else str(len(out))
                out[tag] = self.item()
                flags = self.int()
                kind, has_attr, has_tag = flags & 0xFF, flags & (1 << 9), flags & (1 << 10)
            if kind != NILVALUE_SXP:
                raise RDataError(f"unsupported pairlist tail type {kind}")
            return out
        n = self.int()
        if kind == STRSXP:
            value = [self.item() for _ in range(n)]
        elif kind == VECSXP:
            value = [self.item() for _ in range(n)]
        elif kind in (INTSXP, LGLSXP):
            value = list(struct.unpack_from(f">{n}i", self.buf, self.pos))
            self.pos += 4 * n
        elif kind == REALSXP:
            value = list(struct.unpack_from(f">{n}d", self.buf, self.pos))
            self.pos += 8 * n
        else:
            raise RDataError(f"unsupported R object type {kind}")
        if has_attr:
            attrs = self.item()
            names = attrs.get("names") if isinstance(attrs, dict) else None
            if kind == VECSXP and names:
                return dict(zip(names, value))
        return value


def unserialize(buf: bytes):
    if buf[:2] != b"X\n":
        raise RDataError("not an XDR-serialized R object")
    r = _XDR(buf)
    r.pos = 2
    version = r.int()
    r.int(), r.int()
    if version == 3:
        r.bytes(r.int())  # native encoding name
    elif version != 2:
        raise RDataError(f"unsupported serialization version {version}")
    return r.item()


def _decompress_blob(blob: bytes) -> bytes:
    (length,) = struct.unpack(">I", blob[:4])
    kind, body = blob[4:5], blob[5:]
    if kind == b"2":
        out = bz2.decompress(body)
    elif kind == b"Z":
        out = lzma.decompress(body)
    elif kind == b"0":
        out = body
    else:
        out = zlib.decompress(blob[4:])
    if len(out) != length:
        raise RDataError("corrupt R lazy-load blob")
    return out


def read_lazyload_db(base: Path) -> dict[str, object]:
    """Read every object of ``base.rdx``/``base.rdb`` (base without extension)."""
    base = Path(base)
    index = unserialize(gzip.decompress(base.with_suffix(".rdx").read_bytes())
                        if base.with_suffix(".rdx").read_bytes()[:2] == b"\x1f\x8b"
                        else _decompress_blob(base.with_suffix(".rdx").read_bytes()))
    data = base.with_suffix(".rdb").read_bytes()
    out = {}
    for name, (offset, length) in index["variables"].items():
        out[name] = unserialize(_decompress_blob(data[offset:offset + length]))
    return out
