"""Vectors as an Arrow column, the one format the actors send back and the Parquet shards hold.

A dense model's vector per document is a ``fixed_size_list<float32>[dim]``; a ColBERT document's
[tokens, dim] matrix is a ``list<fixed_size_list<float32>[dim]>`` (one inner list per token). Both
are plain Arrow types: Ray moves them without copying row by row, Parquet stores them as they are,
and any Arrow reader gets the matrices back (``to_vectors``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from lfm2edge.runtime.distributed.ray_support import require_pyarrow

if TYPE_CHECKING:
    import pyarrow as pa


def vector_type(late_interaction: bool, dim: int) -> pa.DataType:
    pa = require_pyarrow()
    row = pa.list_(pa.float32(), dim)  # fixed size
    return pa.list_(row) if late_interaction else row


def from_vectors(vectors: Sequence[np.ndarray] | np.ndarray, late_interaction: bool, dim: int) -> pa.Array:
    """[tokens_i, dim] matrices (ColBERT) or an [n, dim] array (dense) as one Arrow array, without copies
    beyond the concatenation."""
    pa = require_pyarrow()
    if late_interaction:
        matrices = [np.asarray(v, dtype=np.float32).reshape(-1, dim) for v in vectors]
        rows = np.concatenate(matrices) if matrices else np.zeros((0, dim), dtype=np.float32)
        offsets = np.cumsum([0] + [len(m) for m in matrices], dtype=np.int32)
        tokens = pa.FixedSizeListArray.from_arrays(pa.array(rows.reshape(-1)), dim)
        return pa.ListArray.from_arrays(pa.array(offsets), tokens)
    flat = np.asarray(vectors, dtype=np.float32).reshape(-1)
    return pa.FixedSizeListArray.from_arrays(pa.array(flat), dim)


def to_vectors(column: pa.Array | pa.ChunkedArray) -> list[np.ndarray]:
    """The float32 matrices ([tokens, dim], ColBERT) or vectors ([dim], dense) of an Arrow column."""
    pa = require_pyarrow()
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks() if column.num_chunks else pa.array([], column.type)
    if pa.types.is_fixed_size_list(column.type):  # dense: one [dim] vector per document
        dim = column.type.list_size
        return list(_floats(column.flatten()).reshape(-1, dim))
    dim = column.type.value_type.list_size
    rows = _floats(column.flatten().flatten()).reshape(-1, dim)
    bounds = np.cumsum(column.value_lengths().to_numpy(zero_copy_only=False))
    return np.split(rows, bounds[:-1]) if len(bounds) else []


def _floats(array: pa.Array) -> np.ndarray:
    return array.to_numpy(zero_copy_only=False).astype(np.float32, copy=False)
