"""A bounded check of a GGUF file's structure before gguf-py's reader (or llama.cpp) parses it.

gguf-py's ``GGUFReader`` trusts the file: an array whose elements are typed "array" makes it recurse
through the file, element counts and string lengths are read as given, and tensor offsets are added
without a bound. :func:`check_gguf` walks the header, the key/value section and the tensor infos with
explicit limits (counts, string lengths, no nested arrays, known value and tensor types, UTF-8 names,
at most ``MAX_DIMS`` dimensions) and checks the tensor data layout the way llama.cpp's ``gguf.cpp`` does
(each tensor at the aligned end of the previous one, all of it inside the file). :func:`open_reader`
runs it and only then hands the file to ``GGUFReader``. Every problem is a one-line CoaloraError
naming the file.
"""
from __future__ import annotations

import mmap
import struct
from pathlib import Path

import gguf
import numpy as np

from converters.errors import CoaloraError

GGUF_MAGIC = b"GGUF"
VERSIONS = (2, 3)
MAX_TENSORS = 1 << 16          # a 405B model has ~1,100; a large mixture of experts a few thousand
MAX_KV = 1 << 16
MAX_KEY_BYTES = 1 << 10
MAX_STRING_BYTES = 1 << 27     # 128 MiB (chat templates and embedded tokenizer files are far smaller)
MAX_ARRAY = 1 << 20            # elements of one array (vocabularies and merges: up to a few 100k)
MAX_ARRAY_TOTAL = 1 << 21      # of all arrays: gguf-py keeps a numpy view per element (~300 B each)
MAX_NAME_BYTES = 63            # GGML_MAX_NAME - 1
MAX_DIMS = 4                   # GGML_MAX_DIMS
MAX_ALIGNMENT = 1 << 16
DEFAULT_ALIGNMENT = 32

_T = gguf.GGUFValueType
_SCALAR_SIZE = {_T.UINT8: 1, _T.INT8: 1, _T.UINT16: 2, _T.INT16: 2, _T.UINT32: 4, _T.INT32: 4, _T.FLOAT32: 4,
                _T.BOOL: 1, _T.UINT64: 8, _T.INT64: 8, _T.FLOAT64: 8}
_VALUE_TYPES = {int(t) for t in _T}


def _excerpt(b: bytes | str, n: int = 60) -> str:
    """A bounded, quoted excerpt of a name or value for an error message."""
    s = b[:n].decode("utf-8", "replace") if isinstance(b, bytes) else b[:n]
    return repr(s + ("..." if len(b) > n else ""))


class _Cursor:
    """Reads little-endian values from a memory map, never past its end."""

    def __init__(self, buf, path: Path, what: str):
        self.buf, self.pos, self.size, self.path, self.what = buf, 0, len(buf), path, what

    def fail(self, detail: str):
        raise CoaloraError(f"{self.what} {self.path.name} is not a readable GGUF file: {detail}")

    def take(self, n: int, what: str) -> int:
        if n < 0 or n > self.size - self.pos:
            self.fail(f"{what} runs past the end of the file (offset {self.pos}, {n} bytes, file {self.size})")
        start = self.pos
        self.pos += n
        return start

    def unpack(self, fmt: str, what: str):
        start = self.take(struct.calcsize(fmt), what)
        return struct.unpack_from("<" + fmt, self.buf, start)[0]

    def string(self, what: str, limit: int = MAX_STRING_BYTES) -> bytes:
        n = self.unpack("Q", f"length of {what}")
        if n > limit:
            self.fail(f"{what} is {n} bytes long (at most {limit})")
        start = self.take(n, what)
        return bytes(self.buf[start:start + n])

    def utf8(self, what: str, limit: int = MAX_STRING_BYTES) -> str:
        b = self.string(what, limit)
        try:
            return b.decode("utf-8")
        except UnicodeDecodeError:
            self.fail(f"{what} {_excerpt(b)} is not UTF-8")


def _check_value(c: _Cursor, vtype: int, key: str, budget: list[int]):
    """Skip one value of ``vtype`` (returning scalars and strings; arrays are checked and skipped)."""
    if vtype not in _VALUE_TYPES:
        c.fail(f"key {_excerpt(key)} has unknown value type {vtype}")
    t = _T(vtype)
    if t in _SCALAR_SIZE:
        fmt = {1: "B", 2: "H", 4: "I", 8: "Q"}[_SCALAR_SIZE[t]]
        if t == _T.FLOAT32:
            fmt = "f"
        elif t == _T.FLOAT64:
            fmt = "d"
        return c.unpack(fmt, f"value of {_excerpt(key)}")
    if t == _T.STRING:
        return c.utf8(f"value of {_excerpt(key)}")
    # an array: element type and count, then the elements
    etype = c.unpack("I", f"element type of {_excerpt(key)}")
    n = c.unpack("Q", f"length of {_excerpt(key)}")
    if etype == _T.ARRAY:
        c.fail(f"key {_excerpt(key)} is an array of arrays (not supported by GGUF readers)")
    if etype not in _VALUE_TYPES:
        c.fail(f"key {_excerpt(key)} has unknown element type {etype}")
    if n > MAX_ARRAY:
        c.fail(f"key {_excerpt(key)} has {n} elements (at most {MAX_ARRAY})")
    budget[0] -= n
    if budget[0] < 0:
        c.fail(f"the arrays hold more than {MAX_ARRAY_TOTAL} elements in all")
    et = _T(etype)
    if et in _SCALAR_SIZE:
        c.take(n * _SCALAR_SIZE[et], f"elements of {_excerpt(key)}")
        return None
    if n * 8 > c.size - c.pos:
        c.fail(f"key {_excerpt(key)} has {n} strings, more than the file can hold")
    buf, pos, size, unpack = c.buf, c.pos, c.size, struct.Struct("<Q").unpack_from
    for i in range(n):  # a tight loop: vocabularies have 10^5 strings
        if pos + 8 > size:
            c.pos = pos
            c.take(8, f"element {i} of {_excerpt(key)}")
        length = unpack(buf, pos)[0]
        pos += 8
        if length > MAX_STRING_BYTES or length > size - pos:
            c.pos = pos
            c.fail(f"element {i} of {_excerpt(key)} is {length} bytes long, past the end of the file or the limit")
        try:
            buf[pos:pos + length].decode("utf-8")
        except UnicodeDecodeError:
            c.pos = pos
            c.fail(f"element {i} of {_excerpt(key)} is not UTF-8")
        pos += length
    c.pos = pos
    return None


def check_gguf(path, what: str = "GGUF file") -> dict:
    """Check the structure of the GGUF at ``path``; returns its summary (version, counts, alignment, data
    offset, tensor infos as (name, ggml type, ne, offset, bytes)). CoaloraError on anything out of bounds."""
    path = Path(path)
    if not path.is_file():
        raise CoaloraError(f"{what} not found: {path}")
    try:
        with open(path, "rb") as f:
            size = f.seek(0, 2)
            if size < 24:
                raise CoaloraError(f"{what} {path.name} is not a readable GGUF file ({size} bytes)")
            with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
                return _check(_Cursor(buf, path, what))
    except OSError as e:
        raise CoaloraError(f"cannot read {path}: {e.strerror or e}") from None


def _check(c: _Cursor) -> dict:
    magic = bytes(c.buf[:4])
    if magic == b"FUGG":
        c.fail("big-endian GGUF files are not supported")
    if magic != GGUF_MAGIC:
        c.fail(f"bad magic {_excerpt(magic)}")
    c.pos = 4
    version = c.unpack("I", "version")
    if version not in VERSIONS:
        c.fail(f"version {version} (supported: {', '.join(map(str, VERSIONS))}"
               + ("; a big-endian file?" if version & 0xFFFF == 0 else "") + ")")
    n_tensors = c.unpack("Q", "tensor count")
    n_kv = c.unpack("Q", "metadata count")
    if n_tensors > MAX_TENSORS:
        c.fail(f"{n_tensors} tensors (at most {MAX_TENSORS})")
    if n_kv > MAX_KV:
        c.fail(f"{n_kv} metadata keys (at most {MAX_KV})")

    keys: dict[str, object] = {}
    budget = [MAX_ARRAY_TOTAL]
    for i in range(n_kv):
        key = c.utf8(f"key {i}", MAX_KEY_BYTES)
        if not key:
            c.fail(f"key {i} is empty")
        if key in keys:
            c.fail(f"duplicate key {_excerpt(key)}")
        vtype = c.unpack("I", f"type of {_excerpt(key)}")
        keys[key] = (vtype, _check_value(c, vtype, key, budget))

    alignment = DEFAULT_ALIGNMENT
    if "general.alignment" in keys:
        vtype, value = keys["general.alignment"]
        if vtype != _T.UINT32 or not 0 < value <= MAX_ALIGNMENT or value & (value - 1):
            c.fail(f"general.alignment must be a power of two up to {MAX_ALIGNMENT} (uint32)")
        alignment = value

    infos, names = [], set()
    for i in range(n_tensors):
        name = c.utf8(f"name of tensor {i}", 1 << 10)
        if not name or len(name.encode()) > MAX_NAME_BYTES:
            c.fail(f"tensor {i} has a name of {len(name.encode())} bytes (1 to {MAX_NAME_BYTES})")
        if name in names:
            c.fail(f"duplicate tensor {_excerpt(name)}")
        names.add(name)
        n_dims = c.unpack("I", f"dimensions of {name}")
        if not 1 <= n_dims <= MAX_DIMS:
            c.fail(f"tensor {_excerpt(name)} has {n_dims} dimensions (1 to {MAX_DIMS})")
        ne = [c.unpack("Q", f"shape of {name}") for _ in range(n_dims)]
        raw_type = c.unpack("I", f"type of {name}")
        offset = c.unpack("Q", f"offset of {name}")
        try:
            qtype = gguf.GGMLQuantizationType(raw_type)
            block, type_size = gguf.GGML_QUANT_SIZES[qtype]
        except (ValueError, KeyError):
            c.fail(f"tensor {_excerpt(name)} has unknown ggml type {raw_type}")
        if any(d < 1 or d >= 1 << 40 for d in ne):
            c.fail(f"tensor {_excerpt(name)} has shape {ne[:MAX_DIMS]}")
        if ne[0] % block:
            c.fail(f"tensor {_excerpt(name)} has {ne[0]} values per row, not a multiple of {qtype.name}'s block of {block}")
        n_elements = int(np.prod(ne, dtype=object))
        infos.append((name, qtype, tuple(ne), offset, n_elements // block * type_size))

    header_end = c.pos
    data_offset = -(-header_end // alignment) * alignment
    expected = 0
    for name, _, _, offset, nbytes in infos:
        if offset != expected:
            c.fail(f"tensor {_excerpt(name)} starts at data offset {offset}, expected {expected} (overlapping or "
                   f"out-of-order tensors)")
        expected += -(-nbytes // alignment) * alignment
    if infos:  # llama.cpp maps each tensor from data_offset + offset; all of it must be in the file
        end = data_offset + infos[-1][3] + infos[-1][4]
        if end > c.size:
            c.fail(f"tensor data ends at byte {end}, but the file has {c.size} (truncated)")
        if c.size > data_offset + expected:  # writers pad the last tensor at most; more is a lost tensor info
            c.fail(f"{c.size - end} bytes after the last tensor's data (a tensor count or info is wrong)")
    return {"version": version, "n_tensors": n_tensors, "n_kv": n_kv, "alignment": alignment,
            "data_offset": data_offset, "file_bytes": c.size, "tensors": infos}


class _Reader(gguf.GGUFReader):
    """gguf-py's reader over a plain ndarray view of its memory map: the same parse and the same mapped
    bytes, without numpy's per-slice memmap bookkeeping (3x faster on a 49k-token vocabulary)."""

    @property
    def data(self):
        return self._data

    @data.setter
    def data(self, value):
        self._data = value.view(np.ndarray) if isinstance(value, np.memmap) else value


def open_reader(path, what: str = "GGUF file") -> gguf.GGUFReader:
    """``check_gguf`` then gguf-py's reader; CoaloraError (naming ``what`` and the file) on a damaged file."""
    path = Path(path)
    if not path.is_file():
        raise CoaloraError(f"{what} not found: {path}")
    check_gguf(path, what)
    try:
        return _Reader(path)
    except Exception as e:  # checked above; anything left is still a damaged file, not a crash
        msg = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise CoaloraError(f"{what} {path.name} is not a readable GGUF file: {msg}") from None
