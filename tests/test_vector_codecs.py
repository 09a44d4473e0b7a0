"""lfm2edge.runtime.storage.vector_codecs: token pooling, with scipy's Ward linkage or the numpy fallback."""

from __future__ import annotations

import numpy as np
import pytest

from lfm2edge.runtime.storage import vector_codecs
from lfm2edge.runtime.storage.vector_codecs import pool_tokens, ward_labels, ward_labels_numpy


def _partition(labels: np.ndarray) -> list[int]:
    """Labels renumbered by first appearance: equal lists mean the same clusters."""
    seen: dict[int, int] = {}
    return [seen.setdefault(int(label), len(seen)) for label in labels]


def _unit_rows(rng: np.random.Generator, n: int, dim: int) -> np.ndarray:
    x = rng.standard_normal((n, dim))
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.mark.parametrize("seed", range(8))
def test_scipy_and_numpy_find_the_same_ward_clusters(seed):
    rng = np.random.default_rng(seed)
    points = _unit_rows(rng, int(rng.integers(3, 260)), int(rng.choice([16, 128])))
    for pool_factor in (2, 3, 4):
        k = max(len(points) // pool_factor, 1)
        scipy_labels, numpy_labels = ward_labels(points, k), ward_labels_numpy(points, k)
        assert len(set(scipy_labels.tolist())) == k
        assert _partition(scipy_labels) == _partition(numpy_labels)


def test_pooling_is_the_same_with_and_without_scipy(monkeypatch):
    rng = np.random.default_rng(42)
    doc = _unit_rows(rng, 97, 32).astype(np.float32)
    with_scipy = pool_tokens(doc, 2)
    monkeypatch.setattr(vector_codecs, "_linkage", None)  # as where scipy is not installed
    without = pool_tokens(doc, 2)
    assert np.array_equal(with_scipy, without)
    assert with_scipy.shape == (1 + 96 // 2, 32) and np.array_equal(with_scipy[0], doc[0])  # BOS kept


def test_pooled_vectors_are_cluster_means_in_first_token_order():
    points = np.array([[0.0, 0.0], [10.0, 0.0], [0.1, 0.0], [10.1, 0.0]])
    doc = np.concatenate([[[5.0, 5.0]], points]).astype(np.float32)  # BOS first
    pooled = pool_tokens(doc, 2)
    assert np.allclose(pooled, [[5.0, 5.0], [0.05, 0.0], [10.05, 0.0]])
