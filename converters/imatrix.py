"""llama.cpp importance matrices: read (GGUF and the legacy ``.dat``), check against a model, write (GGUF).

An importance matrix holds, per weight matrix, the sum over the calibration tokens of each input column's
squared activation (``in_sum2``, one row per expert) and the number of tokens (``counts``). llama-quantize
passes ``in_sum2 / count`` (the mean squared activation per column) to ``ggml_quantize_chunk`` as its
importance weights; :meth:`Imatrix.weights` returns exactly those float32 values.

GGUF layout (``tools/imatrix`` of llama.cpp): ``general.type = "imatrix"``, ``imatrix.datasets`` (strings),
``imatrix.chunk_count`` and ``imatrix.chunk_size`` (u32), and per weight F32 tensors ``<name>.in_sum2``
(n_per_row x n_mat) and ``<name>.counts`` (1 x n_mat). The legacy ``.dat`` file is: int32 entry count; per
entry int32 name length, the name, int32 ncall, int32 value count, float32 values (mean squared activation
times ncall); then optionally int32 chunk count, int32 length and the dataset name.
"""
from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from converters.errors import CoaloraError
from converters.fileio import atomic_path, sha256_file

KEY_TYPE = "general.type"
KEY_DATASETS = "imatrix.datasets"
KEY_CHUNK_COUNT = "imatrix.chunk_count"
KEY_CHUNK_SIZE = "imatrix.chunk_size"
SUM2, COUNTS = ".in_sum2", ".counts"


@dataclass
class Imatrix:
    sums: dict[str, np.ndarray]     # name -> (n_mat, n_per_row) float32: sum of squared activations per column
    counts: dict[str, np.ndarray]   # name -> (n_mat,) float64: tokens summed (legacy: ncall, the values' scale)
    datasets: list[str] = field(default_factory=list)
    chunk_count: int = 0
    chunk_size: int = 0
    legacy: bool = False
    sha256: str = ""                # of the file it was read from or written to

    def names(self) -> list[str]:
        return sorted(self.sums)

    def weights(self, name: str) -> np.ndarray | None:
        """The importance weights llama-quantize gives ``ggml_quantize_chunk`` for ``name`` (float32, one per
        column of each expert's matrix, flattened), or None when the matrix has no entry."""
        if name not in self.sums:
            return None
        s = self.sums[name].astype(np.float32)
        if self.legacy:
            c = np.float32(self.counts[name][0])
            return (s / c if c > 0 else s).reshape(-1)
        c = np.round(self.counts[name]).astype(np.float32)[:, None]  # llama.cpp reads the counts with lround
        return np.where(c > 0, s / np.where(c > 0, c, 1), np.float32(1)).astype(np.float32).reshape(-1)

    def values_sha256(self) -> str:
        """The identity of what quantization uses: every entry's name and importance weights. Unlike ``sha256``
        it does not change with the metadata (the dataset paths, which differ between machines), so caches keyed
        by it are shared by imatrix files of equal values."""
        h = hashlib.sha256()
        for name in self.names():
            h.update(name.encode() + b"\0")
            h.update(np.ascontiguousarray(self.weights(name), dtype=np.float32).tobytes())
        return h.hexdigest()

    def check(self, shapes: dict[str, tuple[int, ...]], source: str = "imatrix") -> None:
        """Refuse a matrix made for another model (an entry naming no weight of ``shapes``, or of another row
        length), with zero counts or with non-finite values."""
        if not self.sums:
            raise CoaloraError(f"{source} holds no importance data")
        for name in self.names():
            if name not in shapes:
                raise CoaloraError(f"{source} was made for another model: it has an entry for {name!r}, which this "
                                   f"model does not have")
            n_per_row = int(shapes[name][-1])
            n_mat = int(np.prod(shapes[name][:-2])) if len(shapes[name]) > 2 else 1
            if self.sums[name].size == n_mat * n_per_row:
                self.sums[name] = self.sums[name].reshape(n_mat, n_per_row)
            else:
                raise CoaloraError(f"{source} was made for another model: {name} has {self.sums[name].size} values, "
                                   f"the model's rows have {n_per_row}")
            if not (np.isfinite(self.sums[name]).all() and np.isfinite(self.counts[name]).all()):
                raise CoaloraError(f"{source}: {name} holds NaN or Inf values")
            if (self.sums[name] < 0).any():
                raise CoaloraError(f"{source}: {name} has negative sums of squares")
            if (np.round(self.counts[name]) <= 0).any():
                raise CoaloraError(f"{source}: {name} has a zero count (no activations were collected for it)")

    def save(self, path) -> str:
        """Write llama.cpp's GGUF imatrix format (what llama-quantize --imatrix reads); returns its sha256."""
        import gguf

        path = Path(path)
        with atomic_path(path) as tmp:
            w = gguf.GGUFWriter(tmp, arch="")  # the architecture key is dropped below: imatrix files have none
            w.kv_data[0].pop("general.architecture", None)
            w.add_string(KEY_TYPE, "imatrix")
            w.add_array(KEY_DATASETS, [str(d) for d in self.datasets] or [""])  # gguf-py writes no empty array
            w.add_uint32(KEY_CHUNK_COUNT, int(self.chunk_count))
            w.add_uint32(KEY_CHUNK_SIZE, int(self.chunk_size))
            for name in self.names():
                w.add_tensor(name + SUM2, np.ascontiguousarray(self.sums[name], dtype=np.float32))
                w.add_tensor(name + COUNTS, np.asarray(self.counts[name], dtype=np.float32).reshape(-1, 1))
            w.write_header_to_file()
            w.write_kv_data_to_file()
            w.write_tensors_to_file()
            w.close()
        self.sha256 = sha256_file(path)
        return self.sha256


def load(path) -> Imatrix:
    """An imatrix file (GGUF, or the legacy ``.dat``); a damaged or truncated one is a one-line CoaloraError."""
    path = Path(path)
    if not path.is_file():
        raise CoaloraError(f"imatrix file not found: {path}")
    with open(path, "rb") as f:
        magic = f.read(4)
    im = _load_gguf(path) if magic == b"GGUF" else _load_dat(path)
    if not im.sums:
        raise CoaloraError(f"imatrix {path} holds no importance data")
    im.sha256 = sha256_file(path)
    return im


def load_for(path, shapes: dict[str, tuple[int, ...]]) -> Imatrix:
    """:func:`load` and :meth:`Imatrix.check` against a model's weight shapes (GGUF order, rows last)."""
    im = load(path)
    im.check(shapes, f"imatrix {path}")
    return im


def _load_gguf(path: Path) -> Imatrix:
    import gguf

    from converters.gguf_check import open_reader

    # the structure as llama.cpp's loader checks it: tensor offsets in order, every byte accounted for
    r = open_reader(path, "imatrix")

    def value(key, default=None):
        f = r.fields.get(key)
        return default if f is None else f.contents()

    kind = value(KEY_TYPE)
    if kind != "imatrix":
        raise CoaloraError(f"{path} is a GGUF file but not an imatrix (general.type is {kind!r})")
    V = gguf.GGUFValueType
    for key, types in ((KEY_DATASETS, [V.ARRAY, V.STRING]), (KEY_CHUNK_COUNT, [V.UINT32]),
                       (KEY_CHUNK_SIZE, [V.UINT32])):
        if key not in r.fields:  # llama-quantize refuses such a file too
            raise CoaloraError(f"imatrix {path} lacks its {key} metadata")
        if r.fields[key].types != types:  # llama.cpp reads them with gguf_get_val_u32 / gguf_get_arr_str
            raise CoaloraError(f"imatrix {path}: {key} is {' of '.join(t.name for t in r.fields[key].types)}, "
                               f"must be {' of '.join(t.name for t in types)}")
    sums, counts = {}, {}
    for t in r.tensors:
        if t.tensor_type != gguf.GGMLQuantizationType.F32:
            raise CoaloraError(f"imatrix {path}: {t.name} is {t.tensor_type.name}, must be F32")
        data = np.array(t.data, dtype=np.float32).reshape(-1)
        ne = [int(x) for x in t.shape]
        if t.name.endswith(SUM2):
            n_per_row = ne[0]
            if n_per_row <= 0 or data.size % n_per_row:
                raise CoaloraError(f"imatrix {path}: {t.name} has a bad shape {ne}")
            sums[t.name[:-len(SUM2)]] = data.reshape(-1, n_per_row)
        elif t.name.endswith(COUNTS):
            counts[t.name[:-len(COUNTS)]] = data.astype(np.float64)
    for name in sorted(set(sums) | set(counts)):
        if name not in sums or name not in counts:
            raise CoaloraError(f"imatrix {path}: {name} has {'no counts' if name in sums else 'counts but no sums'}")
        if len(counts[name]) != len(sums[name]):
            raise CoaloraError(f"imatrix {path}: {name} has {len(counts[name])} counts for {len(sums[name])} matrices")
    ds = value(KEY_DATASETS) or []
    return Imatrix(sums, counts, [str(d) for d in (ds if isinstance(ds, list) else [ds]) if d],
                   int(value(KEY_CHUNK_COUNT, 0)), int(value(KEY_CHUNK_SIZE, 0)))


class _Cursor:
    def __init__(self, data: bytes, path: Path):
        self.data, self.pos, self.path = data, 0, path

    def take(self, n: int, what: str) -> bytes:
        if n < 0 or self.pos + n > len(self.data):
            raise CoaloraError(f"imatrix {self.path} is truncated or corrupt (reading {what} at byte {self.pos})")
        out = self.data[self.pos:self.pos + n]
        self.pos += n
        return out

    def i32(self, what: str) -> int:
        return struct.unpack("<i", self.take(4, what))[0]


def _load_dat(path: Path) -> Imatrix:
    data = path.read_bytes()
    cur = _Cursor(data, path)
    n = cur.i32("the entry count")
    if not 0 < n <= 1 << 20:  # no model has a million weight matrices
        raise CoaloraError(f"imatrix {path} is neither a GGUF nor a legacy .dat imatrix (entry count {n})")
    sums, counts = {}, {}
    for i in range(n):
        length = cur.i32(f"entry {i + 1}'s name length")
        if not 0 < length <= 4096:
            raise CoaloraError(f"imatrix {path} is corrupt (entry {i + 1} has a name of {length} bytes)")
        try:
            name = cur.take(length, f"entry {i + 1}'s name").decode()
        except UnicodeDecodeError:
            raise CoaloraError(f"imatrix {path} is corrupt (entry {i + 1}'s name is not text)") from None
        ncall = cur.i32(f"{name}'s call count")
        nval = cur.i32(f"{name}'s value count")
        if nval < 1:
            raise CoaloraError(f"imatrix {path} is corrupt ({name} has {nval} values)")
        sums[name] = np.frombuffer(cur.take(4 * nval, f"{name}'s values"), dtype="<f4").astype(np.float32)[None, :]
        counts[name] = np.array([float(ncall)])
    chunk_count, datasets = 0, []
    if cur.pos + 4 <= len(data):
        chunk_count = cur.i32("the chunk count")
        if cur.pos + 4 <= len(data):
            length = cur.i32("the dataset name length")
            if length > 0:
                datasets.append(cur.take(length, "the dataset name").decode(errors="replace"))
    return Imatrix(sums, counts, datasets, chunk_count, 0, legacy=True)


def save_dat(im: Imatrix, path) -> None:
    """Write the legacy ``.dat`` format (as ``llama-imatrix --output-format dat`` does: mean squared
    activation times the call count, per value)."""
    out = [struct.pack("<i", len(im.sums))]
    for name in im.names():
        ncall = max(1, im.chunk_count)
        vals = (im.weights(name) * np.float32(ncall)).astype("<f4")
        raw = name.encode()
        out += [struct.pack("<i", len(raw)), raw, struct.pack("<ii", ncall, vals.size), vals.tobytes()]
    ds = (im.datasets[-1] if im.datasets else "").encode()
    out += [struct.pack("<i", im.chunk_count), struct.pack("<i", len(ds)), ds]
    with atomic_path(path) as tmp:
        Path(tmp).write_bytes(b"".join(out))


def model_shapes(src) -> dict[str, tuple[int, ...]]:
    """Shapes (rows first) of a model source's matrices: what an imatrix's entries must match."""
    return {n: src.shape(n) for n in src.names() if len(src.shape(n)) >= 2}


def check_configuration(cfg, entries) -> None:
    """Types that need an importance matrix only with one, and those that need importance data for the tensor
    (:attr:`QuantType.needs_imatrix_entry`) only on tensors it has an entry for (``entries``: an :class:`Imatrix`,
    the names it has or will have, or None for no imatrix)."""
    names = entries.sums if isinstance(entries, Imatrix) else entries
    for name, q in cfg.types.items():
        if (q.needs_imatrix and names is None) or (q.needs_imatrix_entry and name not in names):
            missing = (" (make one with `coalora imatrix MODEL --data TEXT -o imatrix.gguf`, pass it with --imatrix)"
                       if names is None else ", and the imatrix has no entry for it (imatrices cover no token "
                       "embedding, nor the output head by default): give it another type")
            raise CoaloraError(f"{name}: {q.name} needs an importance matrix{missing}")
