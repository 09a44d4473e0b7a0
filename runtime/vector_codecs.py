"""Pure array transforms applied to document vectors before they are stored in an index.

``pool_tokens`` shrinks a ColBERT document's token vectors, ``quantize_int8`` encodes rows as int8
with one float32 scale each, and ``normalize`` scales rows to unit length (dense models, cosine).
None of them touch the disk; ``lfm2edge.runtime.index_storage`` writes what they return.
"""

from __future__ import annotations

import numpy as np


def pool_tokens(vectors: np.ndarray, pool_factor: int, protected: int = 1) -> np.ndarray:
    """Ward-cluster a document's token vectors into n // pool_factor groups and keep each group's mean.

    As PyLate's hierarchical pooling: the first ``protected`` vectors (BOS) are kept as they are, the
    means are not re-normalised, clusters are ordered by their first token. Ward linkage on the vectors
    themselves (for unit vectors, squared distance is 2 - 2 cos).
    """
    x = np.asarray(vectors, dtype=np.float32)
    head, rest = x[:protected], x[protected:]
    n = len(rest)
    target = max(n // pool_factor, 1)
    if pool_factor <= 1 or n <= target:
        return x
    cent = rest.astype(np.float64)
    size = np.ones(n)
    first = np.arange(n)
    alive = np.ones(n, dtype=bool)
    sq = (cent**2).sum(1)
    dist = 0.5 * np.maximum(sq[:, None] + sq[None, :] - 2 * cent @ cent.T, 0.0)
    np.fill_diagonal(dist, np.inf)
    for _ in range(n - target):
        i, j = divmod(int(np.argmin(dist)), n)
        i, j = min(i, j), max(i, j)
        cent[i] = (size[i] * cent[i] + size[j] * cent[j]) / (size[i] + size[j])
        size[i] += size[j]
        alive[j] = False
        dist[j, :] = dist[:, j] = np.inf
        row = size * size[i] / (size + size[i]) * ((cent - cent[i]) ** 2).sum(1)
        row[~alive] = np.inf
        row[i] = np.inf
        dist[i, :] = dist[:, i] = row
    pooled = cent[alive][np.argsort(first[alive], kind="stable")]
    return np.concatenate([head, pooled.astype(np.float32)])


def quantize_int8(vectors: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric per-row int8: (codes, scales) with vectors ~= codes * scales[:, None]."""
    x = np.asarray(vectors, dtype=np.float32)
    scales = np.abs(x).max(axis=1) / 127.0
    scales[scales == 0] = 1.0
    codes = np.clip(np.rint(x / scales[:, None]), -127, 127).astype(np.int8)
    return codes, scales.astype(np.float32)


def normalize(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length (all-zero rows stay zero)."""
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)
