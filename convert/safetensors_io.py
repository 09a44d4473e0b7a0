"""Read safetensors files one tensor at a time, into float32 numpy, without torch or mmap.

Each tensor is read with a positioned read of its own bytes, so converting a model holds
about one tensor in memory at a time (an mmap would keep every page it touched resident),
and bfloat16 checkpoints convert without torch.

The header is checked before anything is allocated from it: its length against the file,
each tensor's dtype, shape and byte range against the file and each other, so a damaged or
truncated file is a CheckpointError naming it, never a MemoryError or a struct.error.
"""

from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lfm2edge.runtime.core.errors import CheckpointError

_DTYPES = {"F32": np.float32, "F16": np.float16, "F64": np.float64, "BF16": np.uint16}
MAX_HEADER_BYTES = 100 * 2**20  # the safetensors format's own limit
_FIX = "the file is damaged or truncated: download the checkpoint again"


@dataclass(frozen=True)
class TensorEntry:
    name: str
    dtype: str
    shape: tuple[int, ...]
    start: int  # absolute byte offsets in the file
    end: int


def read_entries(path: Path) -> list[TensorEntry]:
    """The tensors of one safetensors file, sorted by name (the order upstream's converter writes)."""
    try:
        size = path.stat().st_size
        with path.open("rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointError(f"{path} has {len(head)} bytes, not even a safetensors header; {_FIX}")
            (n,) = struct.unpack("<Q", head)
            if n > min(MAX_HEADER_BYTES, size - 8):
                raise CheckpointError(
                    f"{path} declares a {n:,}-byte header but has {size:,} bytes (at most "
                    f"{MAX_HEADER_BYTES:,} allowed); it is not a safetensors file, or {_FIX}"
                )
            header = json.loads(f.read(n))
    except OSError as e:
        raise CheckpointError(f"cannot read {path}: {e}") from e
    except ValueError as e:  # not JSON, or not UTF-8
        raise CheckpointError(f"{path} is not a safetensors file: its header is not JSON ({e}); {_FIX}") from e
    if not isinstance(header, dict):
        raise CheckpointError(f"{path} is not a safetensors file: its header is not a JSON object; {_FIX}")
    base = 8 + n
    entries = [_entry(path, name, meta, base, size) for name, meta in header.items() if name != "__metadata__"]
    return sorted(entries, key=lambda e: e.name)


def _entry(path: Path, name: str, meta: object, base: int, size: int) -> TensorEntry:
    def bad(why: str) -> CheckpointError:
        return CheckpointError(f"{path}: tensor {name!r} {why}; {_FIX}")

    if not isinstance(meta, dict):
        raise bad("has no dtype/shape/data_offsets object")
    dtype, shape, offsets = meta.get("dtype"), meta.get("shape"), meta.get("data_offsets")
    if dtype not in _DTYPES:
        raise bad(f"has dtype {dtype!r}; lfm2edge reads F32, F16, BF16 and F64")
    if not isinstance(shape, list) or not all(_is_count(d) for d in shape):
        raise bad(f"has shape {shape!r}, not a list of sizes")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_count(o) for o in offsets)
            and offsets[0] <= offsets[1]):
        raise bad(f"has data_offsets {offsets!r}, not [start, end]")
    start, end = base + offsets[0], base + offsets[1]
    if end > size:
        raise bad(f"ends at byte {end:,}, past the end of the {size:,}-byte file")
    itemsize = np.dtype(_DTYPES[dtype]).itemsize
    if math.prod(shape) * itemsize != end - start:
        raise bad(f"has shape {shape} of {dtype} ({math.prod(shape) * itemsize:,} bytes) but {end - start:,} "
                  "bytes of data")
    return TensorEntry(name, dtype, tuple(shape), start, end)


def _is_count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def read_tensor(path: Path, entry: TensorEntry) -> np.ndarray:
    """One tensor as float32."""
    if entry.dtype not in _DTYPES:
        raise CheckpointError(f"{path}: tensor {entry.name} has dtype {entry.dtype}; expected F32, F16 or BF16")
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            raw = os.pread(fd, entry.end - entry.start, entry.start)
        finally:
            os.close(fd)
    except OSError as e:
        raise CheckpointError(f"cannot read tensor {entry.name} from {path}: {e}") from e
    if len(raw) != entry.end - entry.start:
        raise CheckpointError(f"{path} ends inside tensor {entry.name} (it changed while being read?); {_FIX}")
    array = np.frombuffer(raw, dtype=np.dtype(_DTYPES[entry.dtype]).newbyteorder("<")).reshape(entry.shape)
    if entry.dtype == "BF16":  # bfloat16 is the top half of a float32
        return (array.astype(np.uint32) << 16).view(np.float32)
    return array.astype(np.float32)
