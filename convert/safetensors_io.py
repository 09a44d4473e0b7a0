"""Read safetensors files one tensor at a time, into float32 numpy, without torch or mmap.

Each tensor is read with a positioned read of its own bytes, so converting a model holds
about one tensor in memory at a time (an mmap would keep every page it touched resident),
and bfloat16 checkpoints convert without torch.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lfm2edge.runtime.errors import CheckpointError

_DTYPES = {"F32": np.float32, "F16": np.float16, "F64": np.float64, "BF16": np.uint16}


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
        with path.open("rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(n))
    except (OSError, ValueError, struct.error) as e:
        raise CheckpointError(f"{path} is not a readable safetensors file: {e}") from e
    base = 8 + n
    entries = [
        TensorEntry(name, meta["dtype"], tuple(meta["shape"]), base + meta["data_offsets"][0], base + meta["data_offsets"][1])
        for name, meta in header.items()
        if name != "__metadata__"
    ]
    return sorted(entries, key=lambda e: e.name)


def read_tensor(path: Path, entry: TensorEntry) -> np.ndarray:
    """One tensor as float32."""
    if entry.dtype not in _DTYPES:
        raise CheckpointError(f"{path}: tensor {entry.name} has dtype {entry.dtype}; expected F32, F16 or BF16")
    fd = os.open(path, os.O_RDONLY)
    try:
        raw = os.pread(fd, entry.end - entry.start, entry.start)
    finally:
        os.close(fd)
    array = np.frombuffer(raw, dtype=np.dtype(_DTYPES[entry.dtype]).newbyteorder("<")).reshape(entry.shape)
    if entry.dtype == "BF16":  # bfloat16 is the top half of a float32
        return (array.astype(np.uint32) << 16).view(np.float32)
    return array.astype(np.float32)
