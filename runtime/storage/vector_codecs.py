"""Pure array transforms applied to document vectors before they are stored in an index.

``pool_tokens`` shrinks a ColBERT document's token vectors and ``quantize_int8`` encodes rows as int8
with one float32 scale each. Neither touches the disk; ``lfm2edge.runtime.storage.index_storage`` writes what
they return.
"""

from __future__ import annotations

import numpy as np

try:  # optional, as in PyLate: the numpy fallback finds the same clusters, more slowly
    from scipy.cluster.hierarchy import fcluster as _fcluster
    from scipy.cluster.hierarchy import linkage as _linkage
except ImportError:  # pragma: no cover - scipy is installed with the dev extras
    _fcluster = _linkage = None


def pool_tokens(vectors: np.ndarray, pool_factor: int, protected: int = 1) -> np.ndarray:
    """Ward-cluster a document's token vectors into n // pool_factor groups and keep each group's mean.

    As PyLate's hierarchical pooling: the first ``protected`` vectors (BOS) are kept as they are, the
    means are not re-normalised, clusters are ordered by their first token. Ward linkage on the vectors
    themselves (for unit vectors, squared distance is 2 - 2 cos): scipy's where it is installed, else
    the same clustering in numpy (slower: a quadratic distance matrix updated merge by merge).
    """
    x = np.asarray(vectors, dtype=np.float32)
    head, rest = x[:protected], x[protected:]
    n = len(rest)
    target = max(n // pool_factor, 1)
    if pool_factor <= 1 or n <= target:
        return x
    points = rest.astype(np.float64)
    labels = ward_labels(points, target) if _linkage is not None else ward_labels_numpy(points, target)
    return np.concatenate([head, _cluster_means(points, labels).astype(np.float32)])


def ward_labels(points: np.ndarray, n_clusters: int) -> np.ndarray:
    """Cluster labels [n] of ``points`` cut into ``n_clusters`` Ward clusters, with scipy (as PyLate)."""
    assert _linkage is not None and _fcluster is not None
    return _fcluster(_linkage(points, method="ward"), t=n_clusters, criterion="maxclust")


def ward_labels_numpy(points: np.ndarray, n_clusters: int) -> np.ndarray:
    """The same clusters as ``ward_labels`` without scipy: merge the pair of least Ward cost until
    ``n_clusters`` remain (the cost of merging a and b is |a||b| / (|a| + |b|) * |mean a - mean b|^2)."""
    n = len(points)
    cent = points.copy()
    size = np.ones(n)
    labels = np.arange(n)
    alive = np.ones(n, dtype=bool)
    sq = (cent**2).sum(1)
    dist = 0.5 * np.maximum(sq[:, None] + sq[None, :] - 2 * cent @ cent.T, 0.0)
    np.fill_diagonal(dist, np.inf)
    for _ in range(n - n_clusters):
        i, j = divmod(int(np.argmin(dist)), n)
        i, j = min(i, j), max(i, j)
        cent[i] = (size[i] * cent[i] + size[j] * cent[j]) / (size[i] + size[j])
        size[i] += size[j]
        labels[labels == j] = i
        alive[j] = False
        dist[j, :] = dist[:, j] = np.inf
        row = size * size[i] / (size + size[i]) * ((cent - cent[i]) ** 2).sum(1)
        row[~alive] = np.inf
        row[i] = np.inf
        dist[i, :] = dist[:, i] = row
    return labels


def _cluster_means(points: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """The mean of each cluster, clusters ordered by their first point."""
    _, first, group = np.unique(labels, return_index=True, return_inverse=True)
    rank = np.empty(len(first), dtype=np.int64)
    rank[np.argsort(first, kind="stable")] = np.arange(len(first))
    group = rank[group.reshape(-1)]
    sums = np.zeros((len(first), points.shape[1]))
    np.add.at(sums, group, points)
    return sums / np.bincount(group)[:, None]


def quantize_int8(vectors: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric per-row int8: (codes, scales) with vectors ~= codes * scales[:, None]."""
    x = np.asarray(vectors, dtype=np.float32)
    scales = np.abs(x).max(axis=1) / 127.0
    scales[scales == 0] = 1.0
    codes = np.clip(np.rint(x / scales[:, None]), -127, 127).astype(np.int8)
    return codes, scales.astype(np.float32)

