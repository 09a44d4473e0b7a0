"""Exact scoring: late interaction (score(q, d) = sum over query rows of the max dot product over d's
rows) and the L2 row normalisation that cosine scores and stored vectors rely on.

Documents are packed into one token matrix with offsets. Two backends give the same scores
(float32 products and sums, so exact to the float16 rounding of stored vectors):
- ``kernel``: the C kernel in ``_maxsim.c`` (AMX, AVX512-VNNI, AVX512-BF16, AVX-512 or AVX2, chosen at
  run time), which widens, multiplies and max-reduces a few rows at a time in registers, split over
  threads by documents. 5-8x faster than numpy over float16 storage on the bench machine. Its screened
  paths (AMX, VNNI, AVX512-BF16) screen similarities in bf16 or int8 and rescore, with the AVX-512
  path's arithmetic, every row that can hold a maximum: the AVX-512 path's scores bit for bit, and
  faster (AMX 1.4-2.4x on a 2-core Xeon; on a 2-core Zen 4 AVX512-BF16 1.3x, VNNI 1.8x).
  The VNNI path screens int8 codes of the rows, made once per ``PackedDocuments`` whose float16
  vectors cannot change (``pack()``'s, an index's mapped segments) and kept with it: 140 bytes per
  128-dim row, 55% of the float16 vectors' memory, for 1.4x over AVX512-BF16.
- ``numpy``: one GEMM per block of tokens and a segmented max (``np.maximum.reduceat``); used
  where the kernel has no path (Apple Silicon, other dimensions, no compiler at install).
  ``maxsim_blocked`` is that path for several queries at once over any row reader: the index
  scores its int8 and dense segments with it too.
This is the same sum PyLate computes over kept vectors (its rerank() zero-padding can only
differ when every similarity of a query token is negative).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from itertools import pairwise
from typing import Literal

import numpy as np

from lfm2edge.runtime.core.cpu import ThreadPolicy, default_threads
from lfm2edge.runtime.core.errors import InvalidInputError

try:
    from lfm2edge.runtime.core import _maxsim
except ImportError:  # built without a C compiler, or not built yet: numpy does the work
    _maxsim = None

Backend = Literal["auto", "kernel", "numpy"]

# Below this many tokens one thread scores everything: handing work to a second one costs more.
THREAD_MIN_TOKENS = 16_384

# Tokens per GEMM block: the block's float32 copy (2 MB at 128 dims) stays in cache between
# the float16 conversion and the GEMM. Measured over 1,000 x 256 x 128 on 2 cores: 69 ms in
# float16 storage and 26 ms in float32 at 4,096, against 100 ms and 53 ms at 65,536.
BLOCK_TOKENS = 4_096
# At most this many float32 similarities per block (16 MB), however many query vectors are scored at once.
BLOCK_FLOATS = 1 << 22


def normalize_rows(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 length; all-zero rows stay zero."""
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


@dataclass(frozen=True)
class PackedDocuments:
    """Document vectors stacked into one [total_tokens, dim] matrix; doc i is rows offsets[i]:offsets[i+1].

    Checked once when built and held read-only: ``offsets`` is a private copy over immutable bytes
    and ``vectors`` a read-only view (no copy: an index's memory-mapped segments stay mapped).
    ``maxsim`` checks the shapes again before its kernel reads a row, so nothing changed later
    (a replaced attribute, a reshaped array) can make it read out of bounds.
    """

    vectors: np.ndarray
    offsets: np.ndarray  # int64, length n_docs + 1, starts at 0
    # The VNNI path's int8 codes of the vectors, made by the first maxsim() that can use them.
    _codes: _Codes | None = field(default=None, init=False, repr=False, compare=False)

    @classmethod
    def pack(cls, documents: Sequence[np.ndarray], dtype: np.dtype | type = np.float16) -> PackedDocuments:
        if isinstance(documents, np.ndarray) and documents.ndim == 2:
            raise InvalidInputError(
                "documents must be a list of [tokens, dim] matrices, one per document, not one matrix; "
                "wrap a single document in a list"
            )
        if not isinstance(documents, (Sequence, np.ndarray)):
            raise InvalidInputError(
                "documents must be a list of [tokens, dim] matrices or PackedDocuments, "
                f"not {type(documents).__name__}"
            )
        try:
            storage = np.dtype(dtype)
        except TypeError:
            storage = None
        if storage not in (np.float16, np.float32):
            raise InvalidInputError(f"PackedDocuments stores float16 or float32 vectors, not {dtype!r}")
        if len(documents) == 0:
            return cls(np.zeros((0, 1), dtype=storage), np.zeros(1, dtype=np.int64))
        docs = [_real_matrix(d, f"document {i}", storage) for i, d in enumerate(documents)]
        lengths = np.array([len(d) for d in docs], dtype=np.int64)
        if lengths.min() == 0:
            raise InvalidInputError(
                f"document {int(np.argmin(lengths))} has no vectors; every document needs at least one"
            )
        dims = {d.shape[1] for d in docs}
        if len(dims) != 1:
            raise InvalidInputError(
                f"documents have different vector sizes {sorted(dims)}; encode them with one model"
            )
        offsets = np.concatenate([[0], np.cumsum(lengths)])
        vectors = np.concatenate(docs)
        vectors.flags.writeable = False  # ours: its read-only view cannot be made writable again
        return cls(vectors, offsets)

    def __post_init__(self) -> None:
        vectors, offsets = _checked(self.vectors, self.offsets)
        # Read-only: a copy of the offsets, a view of the vectors; the caller's arrays keep their flags.
        object.__setattr__(self, "vectors", vectors)
        object.__setattr__(self, "offsets", offsets)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    @property
    def dim(self) -> int:
        return int(self.vectors.shape[1])


@dataclass(frozen=True)
class _Codes:
    """The VNNI path's codes of float16 vectors (``code_rows`` in _maxsim.c): ``codes`` [rows, dim] uint8,
    ``meta`` [rows, 3] float32; ``source`` is the vectors' (address, shape) they were made from."""

    codes: np.ndarray
    meta: np.ndarray
    source: tuple[int, tuple[int, ...]]


def _unchangeable(a: np.ndarray) -> bool:
    """Whether nothing can write ``a``'s bytes through numpy: it and every array it views are read-only,
    and the last of them owns its bytes or views a read-only buffer (a read-only memory map)."""
    while True:
        if a.flags.writeable:
            return False
        if not isinstance(a.base, np.ndarray):
            break
        a = a.base
    if a.base is None:
        return True
    try:
        with memoryview(a.base) as view:  # released at once: a mapped file with a live view cannot close
            return view.readonly
    except TypeError:
        return False


def _real_matrix(x: object, what: str, dtype: np.dtype | type = np.float32) -> np.ndarray:
    """``x`` as a finite [rows, dim >= 1] array of ``dtype``, or InvalidInputError naming ``what``."""
    try:
        a = np.asarray(x)
    except (TypeError, ValueError) as e:  # ragged nested lists, objects numpy cannot hold
        raise InvalidInputError(
            f"{what} is not a numeric array ({e}); pass a [tokens, dim] float32 array"
        ) from None
    if a.dtype.kind not in "fiu":
        raise InvalidInputError(
            f"{what} has dtype {a.dtype}; pass real numbers (float32, float16 or integers)"
        )
    if a.ndim != 2 or a.shape[1] == 0:
        raise InvalidInputError(f"{what} must be a [tokens, dim] matrix with dim >= 1, got shape {a.shape}")
    a = a.astype(dtype, copy=False)
    if not np.isfinite(a).all():  # after the cast: 1e300 is finite in float64, not in float32
        raise InvalidInputError(
            f"{what} holds NaN or infinite values (in {np.dtype(dtype)}); pass finite vectors"
        )
    return a


def _checked(vectors: object, offsets: object) -> tuple[np.ndarray, np.ndarray]:
    """Read-only (vectors, offsets) after the checks the kernel relies on, or InvalidInputError.

    The kernel reads rows offsets[d]:offsets[d + 1] of vectors without bounds checks, so these
    must hold every time it runs: offsets int64 from 0 to len(vectors), strictly increasing.
    """
    if not isinstance(vectors, np.ndarray) or not isinstance(offsets, np.ndarray):
        raise InvalidInputError(
            "PackedDocuments needs numpy arrays for vectors and offsets; "
            "build it with PackedDocuments.pack(documents)"
        )
    if vectors.dtype not in (np.float16, np.float32) or vectors.ndim != 2 or vectors.shape[1] == 0:
        raise InvalidInputError(
            f"PackedDocuments needs [tokens, dim >= 1] float16 or float32 vectors, got {vectors.dtype} "
            f"{vectors.shape}; build it with PackedDocuments.pack(documents)"
        )
    if offsets.ndim != 1 or len(offsets) == 0 or offsets.dtype.kind not in "iu":
        raise InvalidInputError(
            f"PackedDocuments needs 1-d integer offsets, got {offsets.dtype} {offsets.shape}; "
            "build it with PackedDocuments.pack(documents)"
        )
    # A private copy over immutable bytes: no view, flag or base array can make it writable again.
    own = np.frombuffer(np.asarray(offsets, dtype=np.int64).tobytes(), dtype=np.int64)
    if own[0] != 0 or own[-1] != len(vectors) or not np.array_equal(own, offsets):
        raise InvalidInputError(
            f"PackedDocuments needs offsets from 0 to {len(vectors)} (the number of vector rows); "
            "build it with PackedDocuments.pack(documents)"
        )
    if len(own) > 1 and not (np.diff(own) > 0).all():
        raise InvalidInputError("every document needs at least one vector (offsets must increase)")
    view = vectors.view()
    view.flags.writeable = False
    return view, own


def kernel_path(dim: int) -> str | None:
    """The kernel's path for vectors of this size on this CPU ("amx", "avx512bf16", "avx512", "avx2"),
    or None (numpy)."""
    return _maxsim.best_path(dim) if _maxsim is not None else None


# Paths the VNNI path replaces where documents keep codes. Not AMX: its bf16 tiles were not measured against it.
_CODES_BEAT = ("avx512bf16", "avx512")


def coded_path(dim: int) -> str | None:
    """The kernel's path for float16 documents that keep int8 codes (a ``PackedDocuments`` whose vectors
    cannot change): "vnni" where the CPU has AVX512-VNNI and it would replace ``kernel_path(dim)``."""
    path = kernel_path(dim)
    return "vnni" if path in _CODES_BEAT and _maxsim.path_runs("vnni", dim) else path


def _codes(owner: PackedDocuments, vectors: np.ndarray, threads: int) -> _Codes | None:
    """``owner``'s codes of ``vectors`` (made now, and kept, if it has none for them), or None where
    they cannot stay right: vectors that can change, or float32 ones."""
    if vectors.dtype != np.float16 or not _unchangeable(vectors) or not vectors.flags.c_contiguous:
        return None
    kept = owner._codes
    if kept is not None and kept.source == _source(vectors):
        return kept
    made = _make_codes(vectors, threads)
    object.__setattr__(owner, "_codes", made)  # a cache: the frozen fields are unchanged
    return made


def _make_codes(vectors: np.ndarray, threads: int) -> _Codes:
    """The VNNI path's codes of C-contiguous float16 ``vectors``, made on ``threads`` threads."""
    rows, dim = vectors.shape
    codes = np.empty((rows, dim), dtype=np.uint8)
    meta = np.empty((rows, 3), dtype=np.float32)
    cuts = [round(rows * i / threads) for i in range(threads + 1)]
    parts = [(vectors, dim, a, b, codes, meta) for a, b in pairwise(cuts) if b > a]
    futures = [_thread_pool().submit(_maxsim.code_rows, *part) for part in parts[1:]]
    if parts:
        _maxsim.code_rows(*parts[0])
    for f in futures:
        f.result()
    codes.flags.writeable = meta.flags.writeable = False
    return _Codes(codes, meta, _source(vectors))


def _source(vectors: np.ndarray) -> tuple[int, tuple[int, ...]]:
    return vectors.__array_interface__["data"][0], vectors.shape


def maxsim(
    query: np.ndarray,
    documents: PackedDocuments | Sequence[np.ndarray],
    *,
    backend: Backend = "auto",
    threads: int | None = None,
) -> np.ndarray:
    """Scores [n_docs] float32 of one query [q, dim] against every document.

    ``backend`` "auto" takes the kernel where it runs, else numpy; ``threads`` (kernel only)
    defaults to the CPUs this process may use. Where ``coded_path`` is "vnni", the first call over a
    ``PackedDocuments`` whose float16 vectors cannot change makes their int8 codes and keeps them with it.
    """
    if backend not in ("auto", "kernel", "numpy"):
        raise InvalidInputError(f"backend must be 'auto', 'kernel' or 'numpy', not {backend!r}")
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise InvalidInputError(f"threads must be a positive integer or None, not {threads!r}")
    if isinstance(documents, PackedDocuments):
        # Checked again here, at the kernel boundary: a PackedDocuments' attributes can be replaced.
        docs, owner = PackedDocuments(documents.vectors, documents.offsets), documents
    else:
        docs, owner = PackedDocuments.pack(documents, np.float32), None
    query = _real_matrix(query, "the query")
    if query.shape[0] == 0:
        raise InvalidInputError(
            f"the query must be a non-empty [tokens, dim] matrix, got shape {query.shape}"
        )
    if len(docs) == 0:
        return np.zeros(0, dtype=np.float32)
    if query.shape[1] != docs.dim:
        raise InvalidInputError(
            f"query vectors have {query.shape[1]} dims, documents {docs.dim}; encode both with the same model"
        )
    path = kernel_path(docs.dim)
    if backend == "kernel" and path is None:
        raise InvalidInputError(
            f"the MaxSim kernel does not run here for {docs.dim}-dim {docs.vectors.dtype} vectors; "
            "use backend='auto'"
        )
    if backend == "numpy" or path is None:
        return _maxsim_numpy(np.ascontiguousarray(query, dtype=np.float32), docs)
    n_threads = _threads_for(docs, threads)
    if owner is not None and coded_path(docs.dim) == "vnni":
        codes = _codes(owner, docs.vectors, n_threads)
        if codes is not None:
            return _maxsim_kernel(query, docs, "vnni", n_threads, codes)
    return _maxsim_kernel(query, docs, path, n_threads)


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
# threads=None: the cores other processes leave free (a part on a busy core would hold up the result).
_policy = ThreadPolicy(default_threads())


def _thread_pool() -> ThreadPoolExecutor:
    """One pool for the process; concurrent searches queue their parts on it."""
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(max_workers=default_threads(), thread_name_prefix="lfm2edge-maxsim")
        return _pool


def _threads_for(docs: PackedDocuments, threads: int | None) -> int:
    return max(1, min(threads or _policy.threads(), len(docs), int(docs.offsets[-1]) // THREAD_MIN_TOKENS or 1))


def _maxsim_kernel(
    query: np.ndarray, docs: PackedDocuments, path: str, threads: int, codes: _Codes | None = None
) -> np.ndarray:
    """The kernel's scores on ``path`` over ``threads`` threads; ``codes`` are the "vnni" path's (and only its)."""
    panels = _query_panels(np.asarray(query, dtype=np.float32))
    vectors = np.ascontiguousarray(docs.vectors)
    offsets = np.ascontiguousarray(docs.offsets, dtype=np.int64)
    is_f16 = int(vectors.dtype == np.float16)
    out = np.empty(len(docs), dtype=np.float32)
    n_threads = max(1, min(threads, len(docs)))
    # Contiguous runs of documents with about the same number of tokens each.
    cuts = np.searchsorted(offsets, np.linspace(0, offsets[-1], n_threads + 1)[1:-1])
    bounds = [0, *sorted(set(int(c) for c in cuts) - {0, len(docs)}), len(docs)]
    coded = (codes.codes, codes.meta) if codes is not None else ()
    jobs = [
        (panels, len(query), vectors, is_f16, docs.dim, offsets, a, b, out, path, *coded)
        for a, b in pairwise(bounds)
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
    def rows(lo: int, hi: int) -> np.ndarray:
        return docs.vectors[lo:hi].astype(np.float32, copy=False)

    scores = maxsim_blocked(query, np.zeros(1, dtype=np.int64), docs.offsets, rows)
    return np.ascontiguousarray(scores[:, 0])


def maxsim_blocked(
    queries: np.ndarray, starts: np.ndarray, offsets: np.ndarray, rows: Callable[[int, int], np.ndarray]
) -> np.ndarray:
    """Scores [n_docs, n_queries] float32: MaxSim of each query against each document, in numpy.

    ``queries`` [vectors, dim] float32 stacks the queries, query i starting at row ``starts[i]``;
    document d owns rows ``offsets[d]:offsets[d + 1]``, which ``rows(lo, hi)`` returns as float32
    (widened or dequantized from storage). A query of one vector against one-row documents is a
    plain dot product, so dense cosine scores come out of the same loop.
    """
    n_docs = len(offsets) - 1
    out = np.empty((n_docs, len(starts)), dtype=np.float32)
    block = max(1, min(BLOCK_TOKENS, BLOCK_FLOATS // max(len(queries), 1)))
    first = 0
    while first < n_docs:
        # Whole documents per block, at least one.
        last = int(np.searchsorted(offsets, offsets[first] + block, side="right")) - 1
        last = min(max(last, first + 1), n_docs)
        lo, hi = int(offsets[first]), int(offsets[last])
        sims = rows(lo, hi) @ queries.T  # [tokens, query vectors]
        best = np.maximum.reduceat(sims, offsets[first:last] - lo, axis=0)  # [docs, query vectors]
        out[first:last] = np.add.reduceat(best, starts, axis=1)
        first = last
    return out
