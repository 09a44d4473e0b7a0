"""Read a GGUF file's header: metadata and tensor infos, without loading tensor data.

The runtime core ships without the ``gguf`` package, and it must look at a file (arch,
causality, pooling, our settings) before llama.cpp loads it: a wrong file then gets a
clear error instead of a crash or silently wrong vectors.
"""

from __future__ import annotations

import hashlib
import mmap
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lfm2edge.runtime.errors import ModelFileError

GGUF_MAGIC = b"GGUF"
# GGUF value types: their numpy dtypes (scalars and arrays of scalars).
_NUMPY_TYPES = {
    0: np.uint8, 1: np.int8, 2: np.uint16, 3: np.int16, 4: np.uint32, 5: np.int32,
    6: np.float32, 7: np.bool_, 10: np.uint64, 11: np.int64, 12: np.float64,
}
_STRING, _ARRAY = 8, 9
# ggml tensor type ids -> names, for reports (the ones our files contain).
GGML_TYPE_NAMES = {
    0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 6: "Q5_0", 7: "Q5_1", 8: "Q8_0", 10: "Q2_K", 11: "Q3_K",
    12: "Q4_K", 13: "Q5_K", 14: "Q6_K", 15: "Q8_K", 16: "IQ2_XXS", 17: "IQ2_XS", 18: "IQ3_XXS",
    19: "IQ1_S", 20: "IQ4_NL", 21: "IQ3_S", 22: "IQ2_S", 23: "IQ4_XS", 29: "IQ1_M", 30: "BF16",
    34: "TQ1_0", 35: "TQ2_0", 39: "MXFP4",
}


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]  # ggml ne order: innermost first
    type_id: int
    offset: int

    @property
    def type_name(self) -> str:
        return GGML_TYPE_NAMES.get(self.type_id, f"type{self.type_id}")


@dataclass(frozen=True)
class GGUFHeader:
    path: Path
    version: int
    metadata: dict[str, object]
    tensors: tuple[TensorInfo, ...]
    data_offset: int

    @property
    def architecture(self) -> str:
        return str(self.metadata.get("general.architecture", ""))

    def arch_key(self, name: str, default: object = None) -> object:
        return self.metadata.get(f"{self.architecture}.{name}", default)

    def tensor(self, name: str) -> TensorInfo | None:
        return next((t for t in self.tensors if t.name == name), None)

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


class _Cursor:
    def __init__(self, buf: mmap.mmap):
        self.buf, self.pos = buf, 0

    def take(self, fmt: str):
        size = struct.calcsize(fmt)
        if self.pos + size > len(self.buf):
            raise ModelFileError("the GGUF header is truncated")
        values = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += size
        return values[0] if len(values) == 1 else values

    def string(self) -> str:
        n = self.take("<Q")
        raw = bytes(self.buf[self.pos : self.pos + n])
        self.pos += n
        return raw.decode("utf-8", errors="replace")

    def value(self, vtype: int) -> object:
        if vtype == _STRING:
            return self.string()
        if vtype == _ARRAY:
            etype, count = self.take("<I"), self.take("<Q")
            if etype == _STRING:
                return [self.string() for _ in range(count)]
            if etype not in _NUMPY_TYPES:
                raise ModelFileError(f"unsupported GGUF array element type {etype}")
            dtype = np.dtype(_NUMPY_TYPES[etype]).newbyteorder("<")
            arr = np.frombuffer(self.buf, dtype=dtype, count=count, offset=self.pos).copy()
            self.pos += count * dtype.itemsize
            return arr
        if vtype not in _NUMPY_TYPES:
            raise ModelFileError(f"unsupported GGUF value type {vtype}")
        dtype = np.dtype(_NUMPY_TYPES[vtype]).newbyteorder("<")
        value = np.frombuffer(self.buf, dtype=dtype, count=1, offset=self.pos)[0].item()
        self.pos += dtype.itemsize
        return value


def read_header(path: str | Path) -> GGUFHeader:
    """Parse a GGUF header; raises ModelFileError for anything that is not a readable GGUF."""
    path = Path(path)
    if not path.is_file():
        raise ModelFileError(f"{path} does not exist. Convert a checkpoint first: lfm2edge convert MODEL -o {path.name}")
    try:
        with path.open("rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            if buf[:4] != GGUF_MAGIC:
                raise ModelFileError(f"{path} is not a GGUF file (no GGUF magic); convert the checkpoint with lfm2edge convert")
            cur = _Cursor(buf)
            cur.pos = 4
            version, n_tensors, n_kv = cur.take("<I"), cur.take("<Q"), cur.take("<Q")
            if version not in (2, 3):
                raise ModelFileError(f"{path} is GGUF version {version}; lfm2edge reads versions 2 and 3")
            metadata: dict[str, object] = {}
            for _ in range(n_kv):
                key = cur.string()
                metadata[key] = cur.value(cur.take("<I"))
            tensors = []
            for _ in range(n_tensors):
                name = cur.string()
                n_dims = cur.take("<I")
                shape = tuple(cur.take("<Q") for _ in range(n_dims))
                tensors.append(TensorInfo(name, shape, cur.take("<I"), cur.take("<Q")))
            align = int(metadata.get("general.alignment", 32))  # type: ignore[arg-type]
            data_offset = (cur.pos + align - 1) // align * align
    except (ValueError, OSError, struct.error) as e:
        raise ModelFileError(f"{path} is not a readable GGUF file: {e}") from e
    return GGUFHeader(path, version, metadata, tuple(tensors), data_offset)
