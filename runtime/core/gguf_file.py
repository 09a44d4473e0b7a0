"""Read a GGUF file's header: metadata and tensor infos, without loading tensor data.

The runtime core ships without the ``gguf`` package, and it must look at a file (arch,
causality, pooling, our settings) before llama.cpp loads it: a wrong file then gets a
clear error instead of a crash or silently wrong vectors.

Every length and count read from the file is checked against the bytes that are left
before anything is allocated from it, and the tensor data must lie inside the file, so a
truncated or damaged file is a ``ModelFileError``, never a huge allocation or a crash.
The layout rules are ggml's own (ggml/src/gguf.cpp): unique keys and tensor names, known
value and tensor types, at most 4 dimensions, tensors packed in order at the alignment.
"""

from __future__ import annotations

import enum
import hashlib
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lfm2edge.runtime.core.errors import ModelFileError

GGUF_MAGIC = b"GGUF"
DEFAULT_ALIGNMENT = 32
# Bounds far above any real LFM2 file (a 65,536-token vocabulary, a few hundred tensors), so a
# lying count is refused before the parser loops or allocates on its word.
MAX_ARRAY_ELEMENTS = 1 << 24
MAX_ENTRIES = 1 << 20  # keys, and tensors
MAX_DIMS = 4  # ggml's GGML_MAX_DIMS
MAX_NAME = 64  # ggml's GGML_MAX_NAME, the terminating zero included
MAX_HEADER_BYTES = 1 << 28  # a 262k-token vocabulary with its merges takes about 20 MB
REDOWNLOAD = "download or convert it again (`lfm2edge convert`)"


class GGUFType(enum.IntEnum):
    """GGUF metadata value types (the file format's numbering)."""

    UINT8 = 0
    INT8 = 1
    UINT16 = 2
    INT16 = 3
    UINT32 = 4
    INT32 = 5
    FLOAT32 = 6
    BOOL = 7
    STRING = 8
    ARRAY = 9
    UINT64 = 10
    INT64 = 11
    FLOAT64 = 12


_NUMPY_TYPES = {
    GGUFType.UINT8: np.uint8, GGUFType.INT8: np.int8, GGUFType.UINT16: np.uint16, GGUFType.INT16: np.int16,
    GGUFType.UINT32: np.uint32, GGUFType.INT32: np.int32, GGUFType.FLOAT32: np.float32, GGUFType.BOOL: np.bool_,
    GGUFType.UINT64: np.uint64, GGUFType.INT64: np.int64, GGUFType.FLOAT64: np.float64,
}
# ggml tensor types: name, values per block, bytes per block (ggml.c's type traits).
GGML_TYPES: dict[int, tuple[str, int, int]] = {
    0: ("F32", 1, 4), 1: ("F16", 1, 2), 2: ("Q4_0", 32, 18), 3: ("Q4_1", 32, 20), 6: ("Q5_0", 32, 22),
    7: ("Q5_1", 32, 24), 8: ("Q8_0", 32, 34), 9: ("Q8_1", 32, 40), 10: ("Q2_K", 256, 84), 11: ("Q3_K", 256, 110),
    12: ("Q4_K", 256, 144), 13: ("Q5_K", 256, 176), 14: ("Q6_K", 256, 210), 15: ("Q8_K", 256, 292),
    16: ("IQ2_XXS", 256, 66), 17: ("IQ2_XS", 256, 74), 18: ("IQ3_XXS", 256, 98), 19: ("IQ1_S", 256, 50),
    20: ("IQ4_NL", 32, 18), 21: ("IQ3_S", 256, 110), 22: ("IQ2_S", 256, 82), 23: ("IQ4_XS", 256, 136),
    24: ("I8", 1, 1), 25: ("I16", 1, 2), 26: ("I32", 1, 4), 27: ("I64", 1, 8), 28: ("F64", 1, 8),
    29: ("IQ1_M", 256, 56), 30: ("BF16", 1, 2), 34: ("TQ1_0", 256, 54), 35: ("TQ2_0", 256, 66),
    39: ("MXFP4", 32, 17), 40: ("NVFP4", 64, 36), 41: ("Q1_0", 128, 18), 42: ("Q2_0", 64, 18),
}
GGML_TYPE_NAMES = {type_id: name for type_id, (name, _, _) in GGML_TYPES.items()}


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]  # ggml ne order: innermost first
    type_id: int
    offset: int  # from the start of the data section

    @property
    def type_name(self) -> str:
        return GGML_TYPE_NAMES.get(self.type_id, f"type{self.type_id}")

    @property
    def nbytes(self) -> int:
        _, block, size = GGML_TYPES[self.type_id]
        return int(np.prod(self.shape, dtype=object)) // block * size


@dataclass(frozen=True)
class GGUFHeader:
    path: Path
    version: int
    metadata: dict[str, object]
    tensors: tuple[TensorInfo, ...]
    data_offset: int
    # key -> (value type, element type for arrays else None), as stored in the file
    types: dict[str, tuple[GGUFType, GGUFType | None]]

    @property
    def architecture(self) -> str:
        return str(self.metadata.get("general.architecture", ""))

    def arch_key(self, name: str, default: object = None) -> object:
        return self.metadata.get(f"{self.architecture}.{name}", default)

    def tensor(self, name: str) -> TensorInfo | None:
        return next((t for t in self.tensors if t.name == name), None)

    def type_name(self, key: str) -> str:
        """How ``key`` is stored, as people write it: "uint32", "array of int32", "missing"."""
        if key not in self.types:
            return "missing"
        vtype, etype = self.types[key]
        return f"array of {etype.name.lower()}" if etype is not None else vtype.name.lower()

    def identity(self) -> str:
        """A hash of the tensors (names, shapes, types, data) and our settings: the model's identity.

        Reads the tensor data once (a few hundred MB for the full models): call it when the
        identity matters (building or opening an index), not on every load.
        """
        h = hashlib.sha256()
        for key in sorted(k for k in self.metadata if k.startswith("lfm2edge.") and k != "lfm2edge.source"):
            h.update(f"{key}={_canonical(self.metadata[key])}\n".encode())
        with self.path.open("rb") as f:
            for t in self.tensors:
                h.update(f"{t.name}{t.shape}{t.type_id}\n".encode())
            f.seek(self.data_offset)
            for block in iter(lambda: f.read(1 << 22), b""):
                h.update(block)
        return h.hexdigest()[:32]


def _canonical(value: object) -> str:
    if isinstance(value, np.ndarray):
        return ",".join(str(v) for v in value.tolist())
    return repr(value)


class _Damaged(Exception):
    """A defect at a byte position; read_header turns it into a ModelFileError naming the file."""


class _NeedMore(Exception):
    """The header goes on past the bytes read so far: read more and parse again."""


class _Cursor:
    """Reads the header from the first bytes of a file of ``size`` bytes."""

    def __init__(self, buf: bytes, size: int):
        self.buf, self.size, self.pos = buf, size, 0

    @property
    def left(self) -> int:
        """Bytes of the file after the cursor (not only those read so far)."""
        return self.size - self.pos

    def need(self, n: int, what: str) -> None:
        if self.pos + n > len(self.buf):
            if len(self.buf) < self.size:
                raise _NeedMore
            raise _Damaged(f"{what} ends early (truncated) at byte {self.pos:,}")

    def take(self, fmt: str) -> int:
        size = struct.calcsize(fmt)
        self.need(size, "the header")
        (value,) = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += size
        return value

    def count(self, what: str, per_item: int, limit: int) -> int:
        """A uint64 count of items of at least ``per_item`` bytes each, bounded by the bytes left."""
        at = self.pos
        n = self.take("<Q")
        if n > limit or n * per_item > self.left:
            raise _Damaged(f"{what} claims {n:,} entries at byte {at:,}, more than the file can hold (truncated?)")
        return n

    def string(self, what: str) -> str:
        at = self.pos
        n = self.take("<Q")
        if n > self.left:
            raise _Damaged(f"{what} claims {n:,} bytes at byte {at:,}, but only {self.left:,} are left (truncated?)")
        self.need(n, what)
        raw = self.buf[self.pos : self.pos + n]
        self.pos += n
        return raw.decode("utf-8", errors="replace")

    def value(self, key: str, vtype: int) -> tuple[object, GGUFType | None]:
        """(the value, its array element type or None)."""
        if vtype == GGUFType.STRING:
            return self.string(f"the string of key {key!r}"), None
        if vtype == GGUFType.ARRAY:
            etype = self.take("<I")
            if etype == GGUFType.STRING:
                n = self.count(f"the array {key!r}", 8, MAX_ARRAY_ELEMENTS)
                return [self.string(f"item {i} of {key!r}") for i in range(n)], GGUFType.STRING
            if etype not in _NUMPY_TYPES:
                raise _Damaged(f"key {key!r} is an array of unknown GGUF type {etype}")
            dtype = np.dtype(_NUMPY_TYPES[GGUFType(etype)]).newbyteorder("<")
            n = self.count(f"the array {key!r}", dtype.itemsize, MAX_ARRAY_ELEMENTS)
            self.need(n * dtype.itemsize, f"the array {key!r}")
            arr = np.frombuffer(self.buf, dtype=dtype, count=n, offset=self.pos).copy()
            self.pos += n * dtype.itemsize
            return arr, GGUFType(etype)
        if vtype not in _NUMPY_TYPES:
            raise _Damaged(f"key {key!r} has unknown GGUF value type {vtype}")
        dtype = np.dtype(_NUMPY_TYPES[GGUFType(vtype)]).newbyteorder("<")
        self.need(dtype.itemsize, f"the value of key {key!r}")
        value = np.frombuffer(self.buf, dtype=dtype, count=1, offset=self.pos)[0].item()
        self.pos += dtype.itemsize
        return value, None


def read_header(path: str | Path) -> GGUFHeader:
    """Parse a GGUF header; raises ModelFileError for anything that is not a readable GGUF.

    The header is read into memory (a first MiB, more when it goes on), not mapped: a file
    truncated by someone else meanwhile then gives an error, never a SIGBUS.
    """
    path = Path(path)
    if path.is_dir():
        raise ModelFileError(f"{path} is a folder, not a GGUF file; give the path of a .gguf file")
    if not path.exists():
        raise ModelFileError(
            f"{path} does not exist. Convert a checkpoint first: lfm2edge convert MODEL -o {path.name}"
        )
    if not path.is_file():  # a fifo would block the reader, a device is no model
        raise ModelFileError(f"{path} is not a regular file; give the path of a .gguf file")
    try:
        with path.open("rb") as f:
            if f.read(4) != GGUF_MAGIC:
                raise ModelFileError(
                    f"{path} is not a GGUF file (no GGUF magic); convert the checkpoint with lfm2edge convert"
                )
            size = f.seek(0, 2)
            if size < 4 + 4 + 8 + 8:
                raise _Damaged(f"it is truncated to {size} bytes, less than a GGUF header")
            chunk = 1 << 20
            while True:
                f.seek(0)
                buf = f.read(min(size, chunk))
                try:
                    return _parse(path, buf, size)
                except _NeedMore:
                    if chunk >= MAX_HEADER_BYTES:
                        raise _Damaged(f"its header goes on past {MAX_HEADER_BYTES:,} bytes") from None
                    chunk *= 4
    except _Damaged as e:
        raise ModelFileError(f"{path} is not a readable GGUF file: {e}. The file is damaged; {REDOWNLOAD}") from None
    except (ValueError, OSError) as e:
        raise ModelFileError(f"{path} cannot be read as a GGUF file: {e}; {REDOWNLOAD}") from e


def _parse(path: Path, buf: bytes, size: int) -> GGUFHeader:
    cur = _Cursor(buf, size)
    cur.pos = 4
    version = cur.take("<I")
    if version not in (2, 3):
        raise ModelFileError(
            f"{path} is GGUF version {version}; lfm2edge reads versions 2 and 3: re-convert the checkpoint with "
            "`lfm2edge convert`"
        )
    # The smallest tensor info: an empty name, one dimension, a type and an offset.
    n_tensors = cur.count("the tensor count", 8 + 4 + 8 + 4 + 8, MAX_ENTRIES)
    # The smallest key/value: an empty key, a type and a one-byte value.
    n_kv = cur.count("the key count", 8 + 4 + 1, MAX_ENTRIES)
    metadata: dict[str, object] = {}
    types: dict[str, tuple[GGUFType, GGUFType | None]] = {}
    for i in range(n_kv):
        key = cur.string(f"key {i}")
        if not key or key in metadata:
            raise _Damaged(f"key {i} ({key!r}) is empty or appears twice")
        vtype = cur.take("<I")
        metadata[key], etype = cur.value(key, vtype)
        types[key] = (GGUFType(vtype), etype)
    alignment = metadata.get("general.alignment", DEFAULT_ALIGNMENT)
    if "general.alignment" in types and types["general.alignment"][0] is not GGUFType.UINT32:
        raise _Damaged("general.alignment is not a uint32")
    if not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1):
        raise _Damaged(f"general.alignment {alignment!r} is not a power of 2")
    tensors = [_tensor_info(cur, i) for i in range(n_tensors)]
    names = [t.name for t in tensors]
    if len(set(names)) != len(names):
        raise _Damaged("a tensor name appears twice")
    data_offset = (cur.pos + alignment - 1) // alignment * alignment
    # llama.cpp wants the tensors packed in order, each padded to the alignment.
    expected = 0
    for t in tensors:
        if t.offset != expected:
            raise _Damaged(f"tensor {t.name!r} starts at offset {t.offset:,}, expected {expected:,}")
        expected += (t.nbytes + alignment - 1) // alignment * alignment
    end = data_offset + expected - (-tensors[-1].nbytes % alignment) if tensors else cur.pos
    if end > size:
        raise _Damaged(
            f"its tensors need {end:,} bytes (general.alignment {alignment}) but the file has {size:,} (truncated)"
        )
    return GGUFHeader(path, version, metadata, tuple(tensors), data_offset, types)


def _tensor_info(cur: _Cursor, i: int) -> TensorInfo:
    name = cur.string(f"the name of tensor {i}")
    if not name or len(name.encode()) >= MAX_NAME:
        raise _Damaged(f"tensor {i} has an empty name or one longer than ggml's {MAX_NAME - 1} bytes")
    n_dims = cur.take("<I")
    if not 1 <= n_dims <= MAX_DIMS:
        raise _Damaged(f"tensor {name!r} has {n_dims} dimensions; ggml allows 1 to {MAX_DIMS}")
    shape = tuple(cur.take("<Q") for _ in range(n_dims))
    type_id = cur.take("<I")
    if type_id not in GGML_TYPES:
        raise _Damaged(f"tensor {name!r} has unknown ggml type {type_id}")
    _, block, _ = GGML_TYPES[type_id]
    if shape[0] % block:
        raise _Damaged(f"tensor {name!r} has rows of {shape[0]} values, not a multiple of its block ({block})")
    if max(shape) >= 1 << 63 or int(np.prod(shape, dtype=object)) >= 1 << 62:  # ggml counts in int64
        raise _Damaged(f"tensor {name!r} has an impossible shape {shape}")
    return TensorInfo(name, shape, type_id, cur.take("<Q"))
