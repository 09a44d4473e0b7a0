"""The MaxSim kernel (runtime/core/_maxsim.c) against PyLate's scoring, path by path."""

from __future__ import annotations

import platform

import numpy as np
import pytest

import lfm2edge.runtime.core.maxsim as m
from lfm2edge.convert.reference import pylate_maxsim
from lfm2edge.runtime.core.errors import InvalidInputError
from lfm2edge.runtime.core.maxsim import PackedDocuments, maxsim


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            return {w for line in f if line.startswith("flags") for w in line.split()[2:]}
    except OSError:
        return set()


FLAGS = _cpu_flags()
AMX = {"amx_tile", "amx_bf16", "avx512_bf16", "avx512f", "f16c"}
AVX512_BF16 = {"avx512_bf16", "avx512f", "f16c"}
VNNI = {"avx512_vnni", "avx512f", "f16c"}
PATHS = {
    "amx": (AMX, [32, 128]),
    "vnni": (VNNI, [32, 128]),
    "avx512bf16": (AVX512_BF16, [32, 128]),
    "avx512": ({"avx512f", "f16c"}, [16, 128]),
    "avx2": ({"avx2", "fma", "f16c"}, [8, 24, 128, 200]),
}


def _corpus(rng, dim, n_docs=300, max_len=40):
    docs = [rng.standard_normal((int(n), dim)).astype(np.float32) for n in rng.integers(1, max_len, n_docs)]
    return [d / np.linalg.norm(d, axis=1, keepdims=True) for d in docs]


def test_kernel_is_built_where_it_can_run():
    # A failed build would silently fall back to numpy: make CI notice.
    if platform.machine() not in ("x86_64", "AMD64") or not PATHS["avx2"][0] <= FLAGS:
        pytest.skip("the kernel has no path for this CPU")
    linux = platform.system() == "Linux"
    expected = next(p for p in ("amx", "avx512bf16", "avx512", "avx2") if PATHS[p][0] <= FLAGS and (p != "amx" or linux))
    assert m.kernel_path(128) == expected
    coded = "vnni" if expected in ("avx512bf16", "avx512") and VNNI <= FLAGS else expected
    assert m.coded_path(128) == coded


def _kernel(q, packed, path, threads=1):
    """The kernel's scores on ``path``; the VNNI path gets codes made for it (any vectors, even changeable)."""
    codes = m._make_codes(np.ascontiguousarray(packed.vectors), threads) if path == "vnni" else None
    return m._maxsim_kernel(q, packed, path, threads, codes)


@pytest.mark.parametrize("path", sorted(PATHS))
@pytest.mark.parametrize("n_query", [1, 31, 32, 33, 70])
def test_kernel_equals_pylate(path, n_query):
    needs, dims = PATHS[path]
    if m._maxsim is None or not needs <= FLAGS:
        pytest.skip(f"no {path} here")
    rng = np.random.default_rng(n_query)
    for dim in dims:
        docs = _corpus(rng, dim)
        q = rng.standard_normal((n_query, dim)).astype(np.float32)
        for dtype in (np.float32, np.float16) if path != "vnni" else (np.float16,):
            packed = PackedDocuments.pack(docs, dtype)
            stored = [d.astype(dtype).astype(np.float32) for d in docs]
            got = _kernel(q, packed, path)
            np.testing.assert_allclose(got, pylate_maxsim(q, stored), rtol=1e-5, atol=1e-4)


def _near_ties(rng, n_docs, dim):
    """Documents whose rows are small perturbations of a few directions: many rows per query row
    within bf16 rounding of the maximum, where a screen that kept only its own best row would miss."""
    docs = []
    for n in rng.integers(1, 120, n_docs):
        base = rng.standard_normal((int(rng.integers(1, 4)), dim))
        rows = base[rng.integers(0, len(base), int(n))] + 1e-3 * rng.standard_normal((int(n), dim))
        docs.append((rows / np.linalg.norm(rows, axis=1, keepdims=True)).astype(np.float32))
    return docs


def _uneven_norms(docs):
    """The same documents with rows 8-15 of every 16 ten times as long and the rest a tenth: a screen
    whose bound took a short row's norm for a long row's would drop the long rows' near ties."""
    return [(d * np.where(np.arange(len(d)) // 8 % 2 == 1, 10.0, 0.1)[:, None]).astype(np.float32) for d in docs]


@pytest.mark.parametrize("path", ["amx", "vnni", "avx512bf16"])
@pytest.mark.parametrize("n_query", [1, 17, 32, 33, 70])
def test_screened_scores_are_the_avx512_scores_bit_for_bit(path, n_query):
    # The screened paths' rescoring must find every row that holds a maximum, and compute it as the
    # AVX-512 path does: the same bits, not merely close ones.
    if m._maxsim is None or not PATHS[path][0] <= FLAGS or (path == "amx" and m.kernel_path(128) != "amx"):
        pytest.skip(f"no {path} path here")
    rng = np.random.default_rng(100 + n_query)
    for dim in (32, 64, 128):
        docs = _near_ties(rng, 150, dim) + _corpus(rng, dim, n_docs=50) + _uneven_norms(_near_ties(rng, 50, dim))
        # the query's rows: near the documents' directions (near ties), random, and one all-zero row
        q = np.concatenate([docs[0][: n_query // 2], rng.standard_normal((n_query, dim))])[:n_query]
        q = m.normalize_rows(q.astype(np.float32))
        if n_query > 2:
            q[1] = 0.0
        packed = PackedDocuments.pack(docs, np.float16)
        exact = m._maxsim_kernel(q, packed, "avx512", threads=1)
        np.testing.assert_array_equal(_kernel(q, packed, path, threads=1), exact)
        np.testing.assert_array_equal(_kernel(q, packed, path, threads=2), exact)
    # What the screens do not take goes to the AVX-512 path whole: float32 storage, a document
    # longer than 2,048 rows or holding an infinity or a NaN (written into a packed view after its checks),
    # query values too large or too small for bf16 (the VNNI path screens the tiny ones).
    docs = _corpus(rng, 128, n_docs=20) + [m.normalize_rows(rng.standard_normal((2_100, 128)))]
    q = m.normalize_rows(rng.standard_normal((n_query, 128)).astype(np.float32))
    packed = PackedDocuments.pack(docs, np.float16)
    vectors = packed.vectors.copy()
    vectors[packed.offsets[3] + 1, 5] = np.inf
    vectors[packed.offsets[7] + 2, 9] = np.nan
    tampered = PackedDocuments(vectors, packed.offsets)
    exact = m._maxsim_kernel(q, tampered, "avx512", threads=1)
    np.testing.assert_array_equal(_kernel(q, tampered, path), exact)
    for dtype in (np.float16, np.float32) if path != "vnni" else (np.float16,):
        packed = PackedDocuments.pack(docs, dtype)
        for scale in (1.0, 1e20, 1e-30):
            exact = m._maxsim_kernel(q * scale, packed, "avx512", threads=1)
            np.testing.assert_array_equal(_kernel(q * scale, packed, path), exact)


@pytest.mark.parametrize("path", ["amx", "avx512bf16"])
def test_screened_bound_holds_where_bf16_rounding_errors_are_largest(path):
    # Row a holds the maximum, but bf16 rounds its values and the query's under it down by 2^-8 each
    # (ties to even), while row b's round up: the screen puts b ahead of a by 1.03% of |q| |d|. A
    # bound that took bf16's rounding for 2^-9 (a window of 2 x 0.0041) would drop a and score b.
    if m._maxsim is None or not PATHS[path][0] <= FLAGS or (path == "amx" and m.kernel_path(128) != "amx"):
        pytest.skip(f"no {path} path here")
    q = np.empty((1, 128), dtype=np.float32)
    q[0, :64] = 1 + 2**-8  # to 1
    q[0, 64:] = 1 + 2**-8 + 2**-23  # to 1 + 2^-7
    a = np.zeros(128, dtype=np.float32)
    a[:64] = 1 + 2**-8  # to 1
    b = np.zeros(128, dtype=np.float32)
    b[64:] = 1 + 2**-8 + 2**-10  # to 1 + 2^-7
    b[127] = 0.942  # the largest float16 that keeps b's similarity below a's
    exact = q[0].astype(np.float64) @ np.stack([a, b]).astype(np.float16).astype(np.float64).T
    assert exact[0] > exact[1]
    packed = PackedDocuments.pack([np.stack([a, b])], np.float16)
    np.testing.assert_array_equal(m._maxsim_kernel(q, packed, path, threads=1), np.float32(exact[0]))
    np.testing.assert_array_equal(m._maxsim_kernel(q, packed, "avx512", threads=1), np.float32(exact[0]))


@pytest.mark.parametrize("rounded", ["query", "rows"])
def test_int8_bound_holds_where_int8_rounding_errors_are_largest(rounded):
    # Row a holds the maximum; int8 codes drop what the query (or the rows) hold below half a step, so
    # the screen puts b ahead of a by 98.8-98.9% of the two rows' bounds. A bound without the query's
    # rounding term (eq * n), or with half the rows' (qn * e), drops a and scores b (checked).
    if m._maxsim is None or not VNNI <= FLAGS:
        pytest.skip("no vnni path here")
    sign = np.where(np.arange(127) % 2 == 0, 1.0, -1.0)
    small = 0.49 / 127  # half a step of max / 127 is 0.5 / 127: int8 codes it as 0
    q = np.empty((1, 128), dtype=np.float32)
    a = np.empty(128, dtype=np.float32)
    b = np.empty(128, dtype=np.float32)
    if rounded == "query":  # q = (1, +-small): codes (127, 0); the rows' +-1 are exact
        q[0, 0], q[0, 1:] = 1.0, small * sign
        a[0], a[1:] = -0.5, sign
        b[0], b[1:] = 0.47, -sign
    else:  # the rows' +-small code as 0; the query's +-1 are exact
        q[0, 0], q[0, 1], q[0, 2:] = 1.0, 1.0, sign[1:]
        a[0], a[1], a[2:] = 1.0, 0.0, small * sign[1:]
        b[0], b[1], b[2:] = 1.0, 123 / 127, -small * sign[1:]
    docs = np.stack([a, b]).astype(np.float16)
    exact = q[0].astype(np.float64) @ docs.astype(np.float64).T
    assert exact[0] > exact[1] + 1e-3
    packed = PackedDocuments.pack([docs], np.float16)
    want = m._maxsim_kernel(q, packed, "avx512", 1)
    np.testing.assert_allclose(want, exact[0], rtol=0, atol=1e-5)  # row a's score
    np.testing.assert_array_equal(_kernel(q, packed, "vnni"), want)


def test_maxsim_keeps_codes_only_for_vectors_that_cannot_change():
    # The VNNI path's codes are made once and kept with the PackedDocuments, so they must describe its
    # vectors for good: pack()'s (read-only, owned), not a caller's array they view.
    if m._maxsim is None or m.coded_path(128) != "vnni":
        pytest.skip("no vnni path here")
    rng = np.random.default_rng(8)
    packed = PackedDocuments.pack(_corpus(rng, 128, n_docs=40), np.float16)
    q = m.normalize_rows(rng.standard_normal((32, 128)).astype(np.float32))
    scores = maxsim(q, packed)
    kept = packed._codes
    assert kept is not None and kept.codes.shape == packed.vectors.shape
    np.testing.assert_array_equal(scores, m._maxsim_kernel(q, packed, "avx512", 1))
    assert maxsim(q, packed) is not None and packed._codes is kept  # made once
    mine = np.array(packed.vectors)  # writable: its owner could change it after a search
    view = PackedDocuments(mine, packed.offsets)
    maxsim(q, view)
    assert view._codes is None
    mine[:] = -mine[:]
    np.testing.assert_array_equal(maxsim(q, view), m._maxsim_kernel(q, view, "avx512", 1))


def test_kernel_keeps_negative_maxima():
    # Every similarity negative: a zero-padded or zero-initialised max would score 0.
    rng = np.random.default_rng(3)
    docs = [-np.abs(rng.standard_normal((n, 128))).astype(np.float32) for n in (1, 5, 13, 40)]
    q = np.abs(rng.standard_normal((32, 128))).astype(np.float32)
    scores = maxsim(q, PackedDocuments.pack(docs, np.float16))
    assert (scores < 0).all()
    expected = pylate_maxsim(q, [d.astype(np.float16).astype(np.float32) for d in docs])
    np.testing.assert_allclose(scores, expected, rtol=1e-5)


def test_threads_split_documents_without_changing_scores(monkeypatch):
    monkeypatch.setattr(m, "THREAD_MIN_TOKENS", 1)  # split even this small corpus
    rng = np.random.default_rng(4)
    docs = PackedDocuments.pack(_corpus(rng, 128, n_docs=501), np.float16)
    q = rng.standard_normal((32, 128)).astype(np.float32)
    one = maxsim(q, docs, threads=1)
    for threads in (2, 3, 7):
        np.testing.assert_array_equal(maxsim(q, docs, threads=threads), one)
    np.testing.assert_allclose(maxsim(q, docs, backend="numpy"), one, rtol=1e-5, atol=1e-4)


def test_backends_and_bad_input():
    rng = np.random.default_rng(5)
    q = rng.standard_normal((4, 12)).astype(np.float32)
    docs = PackedDocuments.pack(_corpus(rng, 12, n_docs=10))
    assert m.kernel_path(12) is None  # 12 dims: no SIMD path; auto falls back to numpy
    np.testing.assert_allclose(maxsim(q, docs), maxsim(q, docs, backend="numpy"))
    with pytest.raises(InvalidInputError, match="kernel does not run"):
        maxsim(q, docs, backend="kernel")
    with pytest.raises(InvalidInputError, match="backend must be"):
        maxsim(q, docs, backend="blas")
    with pytest.raises(InvalidInputError, match="offsets"):
        PackedDocuments(np.zeros((5, 8), np.float16), np.array([0, 3, 9]))
    with pytest.raises(InvalidInputError, match="at least one vector"):
        PackedDocuments(np.zeros((5, 8), np.float16), np.array([0, 3, 3, 5]))
    with pytest.raises(InvalidInputError, match="non-empty"):
        maxsim(np.zeros((0, 8), np.float32), PackedDocuments.pack([np.ones((2, 8))]))


def test_blocked_numpy_scores_many_queries_at_once(monkeypatch):
    """maxsim_blocked, the numpy path the index shares: several queries in one pass equal one at a time,
    in blocks that cut anywhere; with one-row documents and one-vector queries it is the dot product."""
    monkeypatch.setattr(m, "BLOCK_TOKENS", 11)  # many blocks, some smaller than a document
    rng = np.random.default_rng(6)
    docs = PackedDocuments.pack(_corpus(rng, 16, n_docs=60), np.float32)
    queries = [rng.standard_normal((int(n), 16)).astype(np.float32) for n in (1, 7, 32)]
    starts = np.cumsum([0] + [len(q) for q in queries[:-1]])

    def rows(lo: int, hi: int) -> np.ndarray:
        return docs.vectors[lo:hi]

    together = m.maxsim_blocked(np.concatenate(queries), starts, docs.offsets, rows)
    assert together.shape == (len(docs), len(queries))
    per_doc = np.split(docs.vectors, docs.offsets[1:-1])
    for i, q in enumerate(queries):
        np.testing.assert_allclose(together[:, i], pylate_maxsim(q, per_doc), rtol=1e-5, atol=1e-5)
    dense = m.normalize_rows(rng.standard_normal((25, 16)).astype(np.float32))
    one_row = np.arange(len(dense) + 1)
    unit_queries = m.normalize_rows(rng.standard_normal((3, 16)).astype(np.float32))
    cosines = m.maxsim_blocked(unit_queries, np.arange(3), one_row, lambda lo, hi: dense[lo:hi])
    np.testing.assert_allclose(cosines, dense @ unit_queries.T, rtol=1e-6, atol=1e-6)


def test_normalize_rows():
    x = np.array([[3.0, 4.0], [0.0, 0.0]], dtype=np.float32)
    np.testing.assert_allclose(m.normalize_rows(x), [[0.6, 0.8], [0.0, 0.0]])  # a zero row stays zero
