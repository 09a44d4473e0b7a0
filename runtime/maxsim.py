"""Exact late-interaction scoring: score(q, d) = sum over query rows of the max dot product over d's rows.

Documents are packed into one token matrix with offsets. Two backends give the same scores
(float32 products and sums, so exact to the float16 rounding of stored vectors):
- ``kernel``: the C kernel in ``_maxsim.c`` (AVX-512 or AVX2, chosen at run time), which widens,
  multiplies and max-reduces a few rows at a time in registers, split over threads by
  documents. 5-8x faster than numpy over float16 storage on the bench machine.
- ``numpy``: one GEMM per block of tokens and a segmented max (``np.maximum.reduceat``); used
  where the kernel has no path (Apple Silicon, other dimensions, no compiler at install).
This is the same sum PyLate computes over kept vectors (its rerank() zero-padding can only
differ when every similarity of a query token is negative).
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from itertools import pairwise
from typing import Literal

import numpy as np

from lfm2edge.runtime.build import default_threads
from lfm2edge.runtime.errors import InvalidInputError

try:
    from lfm2edge.runtime import _maxsim
except ImportError:  # built without a C compiler, or not built yet: numpy does the work
    _maxsim = None

Backend = Literal["auto", "kernel", "numpy"]

# Below this many tokens one thread scores everything: handing work to a second one costs more.
THREAD_MIN_TOKENS = 16_384

# Tokens per GEMM block: the block's float32 copy (2 MB at 128 dims) stays in cache between
# the float16 conversion and the GEMM. Measured over 1,000 x 256 x 128 on 2 cores: 69 ms in
# float16 storage and 26 ms in float32 at 4,096, against 100 ms and 53 ms at 65,536.
BLOCK_TOKENS = 4_096


@dataclass(frozen=True)
class PackedDocuments:
    """Document token vectors stacked into one [total_tokens, dim] matrix; doc i is rows offsets[i]:offsets[i+1]."""

    vectors: np.ndarray
    offsets: np.ndarray  # int64, length n_docs + 1, starts at 0

    @classmethod
    def pack(cls, documents: Sequence[np.ndarray], dtype: np.dtype | type = np.float16) -> PackedDocuments:
        if len(documents) == 0:
            return cls(np.zeros((0, 0), dtype=dtype), np.zeros(1, dtype=np.int64))
        lengths = np.array([len(d) for d in documents], dtype=np.int64)
        if lengths.min() == 0:
            raise InvalidInputError("a document has no vectors; every document needs at least one")
        dims = {d.shape[1] for d in documents}
        if len(dims) != 1:
            raise InvalidInputError(f"documents have different vector sizes {sorted(dims)}")
        offsets = np.concatenate([[0], np.cumsum(lengths)])
        return cls(np.concatenate(documents).astype(dtype, copy=False), offsets)

    def __post_init__(self) -> None:
        # The kernel reads rows by these offsets: bad ones would read out of bounds, not raise.
        v, o = self.vectors, self.offsets
        if v.ndim != 2 or o.ndim != 1 or len(o) == 0 or o[0] != 0 or o[-1] != len(v):
            raise InvalidInputError(
                f"PackedDocuments needs [tokens, dim] vectors and offsets from 0 to {len(v)}; "
                "build it with PackedDocuments.pack(documents)"
            )
        if len(o) > 1 and not (np.diff(o) > 0).all():
            raise InvalidInputError("every document needs at least one vector (offsets must increase)")

    def __len__(self) -> int:
        return len(self.offsets) - 1

    @property
    def dim(self) -> int:
        return int(self.vectors.shape[1])


def kernel_path(dim: int) -> str | None:
    """The kernel's path for vectors of this size on this CPU ("avx512", "avx2"), or None (numpy)."""
    return _maxsim.best_path(dim) if _maxsim is not None else None


def maxsim(
    query: np.ndarray,
    documents: PackedDocuments | Sequence[np.ndarray],
    *,
    backend: Backend = "auto",
    threads: int | None = None,
) -> np.ndarray:
    """Scores [n_docs] float32 of one query [q, dim] against every document.

    ``backend`` "auto" takes the kernel where it runs, else numpy; ``threads`` (kernel only)
    defaults to the CPUs this process may use.
    """
    if backend not in ("auto", "kernel", "numpy"):
        raise InvalidInputError(f"backend must be 'auto', 'kernel' or 'numpy', not {backend!r}")
    docs = (
        documents if isinstance(documents, PackedDocuments) else PackedDocuments.pack(documents, np.float32)
    )
    query = np.asarray(query)
    if query.ndim != 2 or query.shape[0] == 0:
        raise InvalidInputError(
            f"the query must be a non-empty [tokens, dim] matrix, got shape {query.shape}"
        )
    if len(docs) == 0:
        return np.zeros(0, dtype=np.float32)
    if query.shape[1] != docs.dim:
        raise InvalidInputError(f"query vectors have {query.shape[1]} dims, documents {docs.dim}")
    path = kernel_path(docs.dim) if docs.vectors.dtype in (np.float16, np.float32) else None
    if backend == "kernel" and path is None:
        raise InvalidInputError(
            f"the MaxSim kernel does not run here for {docs.dim}-dim {docs.vectors.dtype} vectors; use backend='auto'"
        )
    if backend == "numpy" or path is None:
        return _maxsim_numpy(np.ascontiguousarray(query, dtype=np.float32), docs)
    return _maxsim_kernel(query, docs, path, threads)


def _query_panels(query: np.ndarray) -> np.ndarray:
    """The query transposed into 64-byte aligned [passes, dim, QW] float32 panels, zero-padded."""
    qw = _maxsim.QW
    n, dim = query.shape
    passes = -(-n // qw)
    raw = np.zeros(passes * dim * qw + 16, dtype=np.float32)
    start = (-raw.ctypes.data % 64) // 4
    panels = raw[start : start + passes * dim * qw].reshape(passes, dim, qw)
    for p in range(passes):
        rows = query[p * qw : (p + 1) * qw]
        panels[p, :, : len(rows)] = rows.T
    return panels


_pool_lock = threading.Lock()
_pool: ThreadPoolExecutor | None = None


def _thread_pool() -> ThreadPoolExecutor:
    """One pool for the process; concurrent searches queue their parts on it."""
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(max_workers=default_threads(), thread_name_prefix="lfm2edge-maxsim")
        return _pool


def _maxsim_kernel(query: np.ndarray, docs: PackedDocuments, path: str, threads: int | None) -> np.ndarray:
    panels = _query_panels(np.asarray(query, dtype=np.float32))
    vectors = np.ascontiguousarray(docs.vectors)
    offsets = np.ascontiguousarray(docs.offsets, dtype=np.int64)
    is_f16 = int(vectors.dtype == np.float16)
    out = np.empty(len(docs), dtype=np.float32)
    n_threads = max(1, min(threads or default_threads(), len(docs), int(offsets[-1]) // THREAD_MIN_TOKENS or 1))
    # Contiguous runs of documents with about the same number of tokens each.
    cuts = np.searchsorted(offsets, np.linspace(0, offsets[-1], n_threads + 1)[1:-1])
    bounds = [0, *sorted(set(int(c) for c in cuts) - {0, len(docs)}), len(docs)]
    jobs = [
        (panels, len(query), vectors, is_f16, docs.dim, offsets, a, b, out, path) for a, b in pairwise(bounds)
    ]
    if len(jobs) == 1:
        _maxsim.score(*jobs[0])
        return out
    # The kernel releases the GIL: the pool's threads and this one score their parts in parallel.
    futures = [_thread_pool().submit(_maxsim.score, *job) for job in jobs[1:]]
    _maxsim.score(*jobs[0])
    for f in futures:
        f.result()
    return out


def _maxsim_numpy(query: np.ndarray, docs: PackedDocuments) -> np.ndarray:
    q = query.T
    scores = np.empty(len(docs), dtype=np.float32)
    offsets = docs.offsets
    first = 0
    while first < len(docs):
        # Whole documents per block, at least one.
        last = int(np.searchsorted(offsets, offsets[first] + BLOCK_TOKENS, side="right")) - 1
        last = max(last, first + 1)
        lo, hi = int(offsets[first]), int(offsets[last])
        sims = docs.vectors[lo:hi].astype(np.float32, copy=False) @ q  # [tokens, q]
        best = np.maximum.reduceat(sims, offsets[first:last] - lo, axis=0)  # [docs, q]
        scores[first:last] = best.sum(axis=1)
        first = last
    return scores
