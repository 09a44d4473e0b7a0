"""Fidelity of one side against the reference (PyTorch in float64, or fp32), on the same token ids.

ColBERT: cosine of every token vector (queries with their expansion rows, documents after
the skiplist), and the agreement of MaxSim rankings of the bench documents per query.
Embedding: cosine of the pooled vectors, and the agreement of cosine rankings.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from lfm2edge.bench.results import Fidelity


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = np.atleast_2d(np.asarray(a, dtype=np.float64))
    b = np.atleast_2d(np.asarray(b, dtype=np.float64))
    num = (a * b).sum(axis=-1)
    return num / np.maximum(np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1), 1e-30)


def scores(queries: Sequence[np.ndarray], documents: Sequence[np.ndarray], colbert: bool) -> np.ndarray:
    """[queries, documents] float64: exact MaxSim (ColBERT) or cosine (Embedding)."""
    if colbert:
        return np.array([[float((np.asarray(q, np.float64) @ np.asarray(d, np.float64).T).max(axis=1).sum())
                          for d in documents] for q in queries])
    q = np.stack([np.asarray(v, np.float64) for v in queries])
    d = np.stack([np.asarray(v, np.float64) for v in documents])
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    d /= np.linalg.norm(d, axis=1, keepdims=True)
    return q @ d.T


def _ranks(x: np.ndarray) -> np.ndarray:
    r = np.empty(len(x), dtype=np.float64)
    r[np.argsort(x, kind="stable")] = np.arange(len(x))
    return r


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    if len(a) < 2:
        return 1.0
    ra, rb = _ranks(a), _ranks(b)
    ra -= ra.mean()
    rb -= rb.mean()
    denom = np.sqrt((ra**2).sum() * (rb**2).sum())
    return float((ra * rb).sum() / denom) if denom > 0 else 1.0


def compare(
    queries: Sequence[np.ndarray], documents: Sequence[np.ndarray],
    ref_queries: Sequence[np.ndarray], ref_documents: Sequence[np.ndarray],
    colbert: bool, reference: str = "torch fp32",
) -> Fidelity:
    """Raises ValueError when the two sides did not produce vectors of the same shapes."""
    if len(queries) != len(ref_queries) or len(documents) != len(ref_documents):
        raise ValueError("the sides encoded different numbers of texts")
    cos = []
    for ours, ref in zip([*queries, *documents], [*ref_queries, *ref_documents], strict=True):
        if np.shape(ours) != np.shape(ref):
            raise ValueError(f"vector shapes differ ({np.shape(ours)} vs {np.shape(ref)}): different tokenization")
        cos.append(_cosines(ours, ref))
    c = np.concatenate(cos)
    s_ours, s_ref = scores(queries, documents, colbert), scores(ref_queries, ref_documents, colbert)
    order_ours = np.argsort(-s_ours, axis=1, kind="stable")
    order_ref = np.argsort(-s_ref, axis=1, kind="stable")
    return Fidelity(
        reference=reference,
        vectors=int(c.size),
        cosine_min=float(c.min()),
        cosine_mean=float(c.mean()),
        queries=len(queries),
        documents=len(documents),
        rank_spearman_mean=float(np.mean([spearman(a, b) for a, b in zip(s_ours, s_ref, strict=True)])),
        rank_top1_agreement=float(np.mean(order_ours[:, 0] == order_ref[:, 0])),
        rank_identical_order=float(np.mean(np.all(order_ours == order_ref, axis=1))),
        score_max_abs_diff=float(np.abs(s_ours - s_ref).max()),
    )
