"""Index(backend="qdrant"): the exact index's surface on Qdrant, tested against the real engines.

Every folder test runs Qdrant Edge in-process. The server path runs through qdrant-client: its local
mode (``QdrantClient(":memory:")``, passed as the location) here, where no server runs, or a real
server when ``LFM2EDGE_QDRANT_URL`` names one (``http://localhost:6333``): the same tests then go through
the URL, in collections named ``lfm2edge-test-*`` that they delete afterwards.

Parity is checked against the exact index holding the same documents: the same top k, scores within
float16 rounding (see ``colbert_tolerance``), with and without ``where``.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from types import SimpleNamespace

import numpy as np
import pytest

import lfm2edge
from lfm2edge import EncoderClosedError, InvalidInputError
from lfm2edge.convert.synthetic import load_sample_texts
from lfm2edge.runtime.storage.filters import check_where, matches
from lfm2edge.runtime.storage.index import (
    DuplicateIdError,
    Hit,
    Index,
    IndexCorruptError,
    IndexModelMismatchError,
    model_identity,
    pool_tokens,
)
from lfm2edge.runtime.storage.qdrant_engines import SETTINGS_FILE, SHARD_FOLDER, EngineError
from lfm2edge.runtime.storage.qdrant_index import DEFAULT_CANDIDATES, MAX_CANDIDATES, QdrantIndex

pytest.importorskip("qdrant_edge")
pytest.importorskip("qdrant_client")

SAMPLE = load_sample_texts()
DOCS = [d["text"] for d in SAMPLE["documents"]]
QUERIES = [q["text"] for q in SAMPLE["queries"]]
IDS = [f"d{i}" for i in range(len(DOCS))]
N = len(DOCS)
META = [
    {"lang": d["lang"], "n": i % 3, "even": i % 2 == 0, "tags": ["all", f"t{i % 4}"]}
    for i, d in enumerate(SAMPLE["documents"])
]
WHERES = [None, {"lang": "en"}, {"n": [0, 2], "even": True}, {"tags": "t1"}, {"lang": "xx"}]
SERVER_URL = os.environ.get("LFM2EDGE_QDRANT_URL")


@pytest.fixture(scope="module")
def colbert(colbert_encoder):
    return colbert_encoder  # the session's tiny ColBERT encoder (tests/conftest.py)


@pytest.fixture(scope="module")
def dense(embedding_encoder):
    return embedding_encoder


@pytest.fixture(scope="module")
def encoders(colbert, dense):
    return {"colbert": colbert, "dense": dense}


@pytest.fixture(scope="module")
def built(encoders, tmp_path_factory):
    """kind -> (exact index, Qdrant Edge index), both holding every sample document (``add(texts)``)."""
    root = tmp_path_factory.mktemp("parity")
    out = {}
    for kind, enc in encoders.items():
        exact = Index.create(root / f"{kind}-exact", enc)
        edge = Index.create(root / f"{kind}-edge", enc, backend="qdrant")
        assert isinstance(edge, QdrantIndex) and not isinstance(exact, QdrantIndex)
        for index in (exact, edge):
            assert index.add(DOCS, ids=IDS, metadata=META) == IDS
        out[kind] = (exact, edge)
    yield out
    for exact, edge in out.values():
        exact.close()
        edge.close()


@pytest.fixture
def server():
    """Where server indexes live: a real server's URL when LFM2EDGE_QDRANT_URL names one, else a
    qdrant-client in local mode, passed as the location itself. ``admin`` is a client to the same place."""
    from qdrant_client import QdrantClient

    admin = QdrantClient(url=SERVER_URL) if SERVER_URL else QdrantClient(":memory:")
    names: list[str] = []

    def collection() -> str:
        names.append(f"lfm2edge-test-{uuid.uuid4().hex[:12]}")
        return names[-1]

    yield SimpleNamespace(location=SERVER_URL or admin, admin=admin, collection=collection)
    for name in names:
        if admin.collection_exists(name):
            admin.delete_collection(name)
    admin.close()


@pytest.fixture
def new_index(tmp_path, server):
    """``new_index(engine, encoder, **options)``: an empty index on "exact", "edge" or "server"; closed after."""
    made = []

    def make(engine: str, encoder, **options):
        if engine == "exact":
            index = Index.create(tmp_path / f"exact-{len(made)}", encoder, **options)
        elif engine == "edge":
            index = Index.create(tmp_path / f"edge-{len(made)}", encoder, backend="qdrant", **options)
        else:
            index = Index.create(
                server.location, encoder, backend="qdrant", collection=server.collection(), **options
            )
        made.append(index)
        return index

    yield make
    for index in made:
        index.close()


# ----------------------------------------------------------------------------------------------------------
# Comparing hits
# ----------------------------------------------------------------------------------------------------------

U16 = 2.0**-11  # float16's unit roundoff: a rounded x is x * (1 + e), |e| <= 2**-11


def colbert_tolerance(query_tokens: int) -> float:
    """How far a Qdrant MaxSim score may be from the exact index's for the same document.

    Both engines store the token vectors as float16 (the same values), but Qdrant Edge also rounds the
    query's token vectors to float16 before scoring (qdrant-client's local mode keeps float32 documents
    instead). Each of the query's tokens adds one dot product of unit vectors, moved by at most 2**-11
    (|q.d| error <= 2**-11 |q| |d|), and the max over document tokens moves no more than its terms:
    at most tokens * 2**-11 in all (0.016 for 32 tokens on scores around 20-30; ~1e-3 is observed, the
    roundings mostly cancel), plus float32 summation order (1e-4).
    """
    return query_tokens * U16 + 1e-4


# Dense: Qdrant keeps the float32 unit vector, the exact index its float16 rounding; a cosine of unit
# vectors moves by at most 2**-11 when one side is rounded.
DENSE_TOLERANCE = U16 + 1e-5


def tolerance(encoder) -> float:
    if encoder.kind.value == "late_interaction":
        return colbert_tolerance(int(encoder.encode_query(["x"])[0].shape[0]))
    return DENSE_TOLERANCE


def assert_same_ranking(got: list[Hit], want: list[Hit], every: dict[str, Hit], tol: float) -> None:
    """``got`` (Qdrant) against ``want`` (the exact index, same query and k): the same number of hits, each
    score within ``tol`` of the exact score of the same document (``every``: the exact index's hits for
    every document), the same ids in the same order except where near-ties (within 2 tol) swap, and the
    stored text and metadata."""
    assert len(got) == len(want), ([h.id for h in got], [h.id for h in want])
    for g in got:
        assert g.id in every, f"{g.id} should not be a hit"
        assert abs(g.score - every[g.id].score) <= tol, (g.id, g.score, every[g.id].score, tol)
        assert (g.text, g.metadata) == (every[g.id].text, every[g.id].metadata)
    assert all(a.score >= b.score for a, b in zip(got, got[1:], strict=False))  # best first
    for g, w in zip(got, want, strict=True):
        assert g.id == w.id or abs(every[g.id].score - w.score) <= 2 * tol, (g.id, w.id)


def stored(index) -> dict[str, object]:
    """id -> StoredDocument."""
    return {d.id: d for d in index.documents()}


# ----------------------------------------------------------------------------------------------------------
# Parity with the exact index
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("where", WHERES, ids=lambda w: json.dumps(w))
@pytest.mark.parametrize("kind", ["colbert", "dense"])
def test_search_matches_the_exact_index(kind, where, built, encoders):
    exact, edge = built[kind]
    tol = tolerance(encoders[kind])
    for q in QUERIES[:6]:
        every = {h.id: h for h in exact.search(q, k=N, where=where)}
        want = exact.search(q, k=10, where=where)
        got = edge.search(q, k=10, where=where)
        assert_same_ranking(got, want, every, tol)
        if where == {"lang": "xx"}:
            assert got == []
        elif where is not None:
            assert len(got) == min(10, len(every)) and all(
                matches(h.metadata, check_where(where)) for h in got
            )


@pytest.mark.parametrize("kind", ["colbert", "dense"])
def test_search_many_and_search_vectors_match_the_exact_index(kind, built, encoders):
    exact, edge = built[kind]
    enc, tol = encoders[kind], tolerance(encoders[kind])
    texts = QUERIES[:20]
    queries = list(enc.encode_query(texts))
    for where in (None, {"even": True, "lang": ["de", "fr", "ja"]}):
        everything = exact.search_vectors(queries, k=N, where=where)
        many = edge.search_many(texts, k=5, where=where)
        vectors = edge.search_vectors(queries, k=5, where=where)
        assert len(many) == len(vectors) == len(texts)
        for qi, want in enumerate(exact.search_many(texts, k=5, where=where)):
            every = {h.id: h for h in everything[qi]}
            assert_same_ranking(many[qi], want, every, tol)
            assert_same_ranking(vectors[qi], want, every, tol)
    assert edge.search_many([], k=3) == [] and edge.search_vectors([], k=3) == []


def test_colbert_scores_are_the_exact_maxsim_of_the_stored_vectors(built, colbert):
    """The tight check behind the tolerance: Qdrant Edge scores a query as its float16 rounding, so the
    exact index given the rounded query vectors agrees with it up to float32 summation order."""
    exact, edge = built["colbert"]
    queries = list(colbert.encode_query(QUERIES[:16]))
    rounded = [q.astype(np.float16).astype(np.float32) for q in queries]
    for where in (None, {"n": 1}):
        everything = exact.search_vectors(rounded, k=N, where=where)
        for candidates in (None, 0):
            got = edge.search_vectors(queries, k=10, where=where, candidates=candidates)
            for qi, hits in enumerate(got):
                assert_same_ranking(hits, everything[qi][:10], {h.id: h for h in everything[qi]}, 1e-4)


@pytest.mark.parametrize("kind", ["colbert", "dense"])
def test_full_scan_equals_the_default_on_a_small_collection(kind, built, encoders):
    _, edge = built[kind]
    queries = list(encoders[kind].encode_query(QUERIES[:8]))
    assert edge.candidates == DEFAULT_CANDIDATES > N  # the default hands every document to MaxSim here
    for where in (None, {"even": False}):
        default = edge.search_vectors(queries, k=N, where=where)
        full = edge.search_vectors(queries, k=N, where=where, candidates=0)
        assert [[(h.id, h.score) for h in hits] for hits in full] == [
            [(h.id, h.score) for h in hits] for hits in default
        ]
        assert all(len(hits) == (N if where is None else N // 2) for hits in full)
    # few candidates still give k hits (at least k are fetched), each scored as in the full scan
    full = {h.id: h.score for h in edge.search_vectors(queries[:1], k=N, candidates=0)[0]}
    few = edge.search_vectors(queries[:1], k=10, candidates=3)[0]
    assert len(few) == 10 and all(abs(h.score - full[h.id]) <= 1e-6 for h in few)


# ----------------------------------------------------------------------------------------------------------
# add_vectors, documents() and copies between engines
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["colbert", "dense"])
def test_add_vectors_round_trip(kind, built, encoders, tmp_path):
    enc = encoders[kind]
    late = kind == "colbert"
    vectors = enc.encode_document(DOCS)  # the same calls add() makes: the same vectors
    queries = list(enc.encode_query(QUERIES[:8]))
    for engine, by_texts in zip(("exact", "qdrant"), built[kind], strict=True):
        index = Index.create(tmp_path / engine, enc, backend=engine)
        assert index.add_vectors(vectors, ids=IDS, texts=DOCS, metadata=META) == IDS
        assert len(index) == N and set(index.ids()) == set(IDS)
        for got, want in zip(
            index.search_vectors(queries, k=10), by_texts.search_vectors(queries, k=10), strict=True
        ):
            assert [(h.id, h.text, h.metadata) for h in got] == [(h.id, h.text, h.metadata) for h in want]
            assert np.allclose([h.score for h in got], [h.score for h in want], rtol=0, atol=1e-6)
        docs = stored(index)
        assert set(docs) == set(IDS)
        for i, doc_id in enumerate(IDS):
            doc, v = docs[doc_id], np.asarray(vectors[i], dtype=np.float32)
            assert (doc.text, doc.metadata) == (DOCS[i], META[i]) and doc.vectors.dtype == np.float32
            if late:  # token vectors are stored float16 by both engines: exactly their rounding comes back
                assert np.array_equal(doc.vectors, v.astype(np.float16).astype(np.float32))
            else:  # unit vectors: float16 (exact) or float32 (Qdrant)
                unit = v / np.linalg.norm(v)
                assert doc.vectors.shape == (enc.dim,)
                assert np.allclose(doc.vectors, unit, rtol=0, atol=U16 if engine == "exact" else 1e-6)
        index.close()


@pytest.mark.parametrize("kind", ["colbert", "dense"])
def test_copy_between_engines_keeps_the_ranking(kind, built, encoders, tmp_path):
    """What ``index export`` does: documents() of one engine into add_vectors of the other."""
    exact, edge = built[kind]
    enc, tol = encoders[kind], tolerance(encoders[kind])
    docs = list(exact.documents())
    assert len(docs) == N

    def copy(into, documents):
        ids = into.add_vectors(
            [d.vectors for d in documents],
            ids=[d.id for d in documents],
            texts=[d.text for d in documents],
            metadata=[d.metadata for d in documents],
            commit_every=32,
        )
        assert ids == [d.id for d in documents] and len(into) == len(documents)

    to_qdrant = Index.create(tmp_path / "to-qdrant", enc, backend="qdrant")
    copy(to_qdrant, docs)
    back = Index.create(tmp_path / "back", enc)
    copy(back, list(to_qdrant.documents()))
    queries = list(enc.encode_query(QUERIES[:10]))
    everything = exact.search_vectors(queries, k=N)
    for where in (None, {"lang": "de"}):
        want = exact.search_vectors(queries, k=10, where=where)
        for qi, (got_q, got_back) in enumerate(
            zip(
                to_qdrant.search_vectors(queries, k=10, where=where),
                back.search_vectors(queries, k=10, where=where),
                strict=True,
            )
        ):
            every = {h.id: h for h in everything[qi]}
            assert_same_ranking(got_q, want[qi], every, tol)
            # float16 values survive the round trip exactly (ColBERT); dense ones are renormalized once
            assert_same_ranking(got_back, want[qi], every, 1e-5 if kind == "colbert" else DENSE_TOLERANCE)
    original, copied = stored(exact), stored(to_qdrant)
    assert copied.keys() == original.keys()
    for doc_id, doc in original.items():
        other = copied[doc_id]
        assert (other.text, other.metadata) == (doc.text, doc.metadata)
        assert np.allclose(other.vectors, doc.vectors, rtol=0, atol=0 if kind == "colbert" else 2 * U16)
    to_qdrant.close()


def test_pooling_and_store_texts_as_the_exact_index(colbert, tmp_path):
    vectors = colbert.encode_document(DOCS[:20])
    exact = Index.create(tmp_path / "exact", colbert, pool_factor=2, store_texts=False)
    edge = Index.create(tmp_path / "edge", colbert, backend="qdrant", pool_factor=2, store_texts=False)
    for index in (exact, edge):
        index.add_vectors(vectors, ids=IDS[:20], texts=DOCS[:20], metadata=META[:20])
    pooled = stored(edge)
    for i, doc_id in enumerate(IDS[:20]):
        want = pool_tokens(vectors[i], 2).astype(np.float16).astype(np.float32)
        assert pooled[doc_id].text is None and np.allclose(pooled[doc_id].vectors, want, rtol=0, atol=1e-6)
    assert edge.info()["pool_factor"] == 2 and edge.info()["store_texts"] is False
    queries = list(colbert.encode_query(QUERIES[:6]))
    tol = colbert_tolerance(queries[0].shape[0])
    everything = exact.search_vectors(queries, k=20)
    for qi, (got, want) in enumerate(
        zip(edge.search_vectors(queries, k=5), exact.search_vectors(queries, k=5), strict=True)
    ):
        assert_same_ranking(got, want, {h.id: h for h in everything[qi]}, tol)
        assert all(h.text is None and h.metadata == META[IDS.index(h.id)] for h in got)
    edge.close()


# ----------------------------------------------------------------------------------------------------------
# Writing: duplicates, generated ids, deletes (the same rules on every engine)
# ----------------------------------------------------------------------------------------------------------

ENGINES = ["exact", "edge", "server"]


@pytest.mark.parametrize("engine", ENGINES)
def test_on_duplicate_as_in_the_exact_index(engine, new_index, colbert):
    index = new_index(engine, colbert)
    assert index.add(DOCS[:3], ids=["a", "b", "c"], metadata=[{"v": 1}] * 3) == ["a", "b", "c"]

    # "error" (the default): nothing is written when one id is present
    with pytest.raises(DuplicateIdError, match=r"1 id\(s\) already in the index.*'b'"):
        index.add([DOCS[3], DOCS[4]], ids=["new", "b"])
    assert "new" not in index and len(index) == 3
    # ids repeated within one call are refused whatever on_duplicate says
    for mode in ("error", "skip", "replace"):
        with pytest.raises(DuplicateIdError, match=r"repeated within this call: \['x'\]"):
            index.add([DOCS[3], DOCS[4]], ids=["x", "x"], on_duplicate=mode)
    assert "x" not in index and len(index) == 3
    with pytest.raises(InvalidInputError, match="on_duplicate must be one of"):
        index.add([DOCS[3]], ids=["z"], on_duplicate="overwrite")

    # "skip": present ids keep their document, the others are added
    assert index.add([DOCS[5], DOCS[6]], ids=["b", "d"], on_duplicate="skip") == ["b", "d"]
    docs = stored(index)
    assert len(index) == 4 and docs["b"].text == DOCS[1] and docs["d"].text == DOCS[6]

    # "replace": text, metadata and vectors of the id are the new document's
    assert index.add([DOCS[7]], ids=["b"], metadata=[{"v": 2}], on_duplicate="replace") == ["b"]
    docs = stored(index)
    assert len(index) == 4 and (docs["b"].text, docs["b"].metadata) == (DOCS[7], {"v": 2})
    assert docs["b"].vectors.shape == colbert.encode_document([DOCS[7]])[0].shape
    assert [h.id for h in index.search(QUERIES[0], k=10, where={"v": 2})] == ["b"]

    # add_vectors follows the same rules
    vector = colbert.encode_document([DOCS[8]])
    with pytest.raises(DuplicateIdError, match="already in the index"):
        index.add_vectors(vector, ids=["a"])
    assert (
        index.add_vectors(vector, ids=["a"], on_duplicate="skip") == ["a"]
        and stored(index)["a"].text == DOCS[0]
    )
    assert index.add_vectors(vector, ids=["a"], texts=[DOCS[8]], on_duplicate="replace") == ["a"]
    assert stored(index)["a"].text == DOCS[8] and stored(index)["a"].metadata is None

    # ids=None: fresh string ids, never one already handed out
    first = index.add(DOCS[9:12])
    second = index.add_vectors(colbert.encode_document(DOCS[12:14]))
    assert len(first) == 3 and len(second) == 2 and len(set(first + second)) == 5
    assert all(isinstance(d, str) and d in index for d in first + second)
    assert not set(first + second) & {"a", "b", "c", "d"} and len(index) == 9
    assert sorted(index.ids()) == sorted(["a", "b", "c", "d", *first, *second])


@pytest.mark.parametrize("engine", ENGINES)
def test_delete_contains_len_ids(engine, new_index, colbert):
    index = new_index(engine, colbert)
    assert len(index) == 0 and index.ids() == [] and "d0" not in index and index.search(QUERIES[0]) == []
    index.add(DOCS[:6], ids=IDS[:6])
    assert len(index) == 6 and "d0" in index and "D0" not in index and sorted(index.ids()) == IDS[:6]

    assert index.delete(["d0", "d4"]) == 2
    assert len(index) == 4 and "d0" not in index and "d4" not in index and "d1" in index
    with pytest.raises(InvalidInputError, match=r"1 id\(s\) are not in the index.*'d0'.*nothing was deleted"):
        index.delete(["d1", "d0"])
    assert "d1" in index and len(index) == 4  # nothing deleted when one id is unknown
    assert index.delete(["d1", "d0", "nope"], missing_ok=True) == 1
    assert index.delete("d2") == 1  # one id as a string
    assert index.delete([]) == 0 and index.delete(["gone"], missing_ok=True) == 0
    for bad in (b"d3", 3, None, [3], [""]):
        with pytest.raises(InvalidInputError):
            index.delete(bad)
    assert sorted(index.ids()) == ["d3", "d5"] and len(index) == 2
    assert {h.id for h in index.search(QUERIES[0], k=10)} == {"d3", "d5"}
    assert index.add([DOCS[0]], ids=["d0"]) == ["d0"] and len(index) == 3  # a deleted id can come back
    index.compact()
    assert sorted(index.ids()) == ["d0", "d3", "d5"] and index.verify() == []
    assert {h.id for h in index.search(QUERIES[1], k=10)} == {"d0", "d3", "d5"}


# ----------------------------------------------------------------------------------------------------------
# Reopening: after kill -9, the file lock, another model, closed encoders and indexes
# ----------------------------------------------------------------------------------------------------------

KILLED_WRITER = textwrap.dedent(
    """
    import os, signal, sys
    import lfm2edge
    from lfm2edge.runtime.storage.index import Index

    path, model = sys.argv[1], sys.argv[2]
    index = Index.create(path, lfm2edge.load(model, n_threads=1), backend="qdrant")
    index.add(["alpha one", "beta two"], ids=["a1", "a2"], metadata=[{"batch": 1}, {"batch": 1}])
    index.add(["gamma three", "delta four", "epsilon five"], ids=["b1", "b2", "b3"],
              metadata=[{"batch": 2}] * 3, commit_every=2)
    index.delete(["a2"])
    print("ready", flush=True)
    os.kill(os.getpid(), signal.SIGKILL)
    """
)

OTHER_OPENER = textwrap.dedent(
    """
    import sys
    from lfm2edge.runtime.storage.index import Index
    try:
        Index.open(sys.argv[1]).close()
        print("opened")
    except Exception as e:
        print(type(e).__name__, e)
    """
)


def run_python(code: str, *args: object) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True, timeout=120
    )


def test_reopen_after_kill_9(colbert_gguf, colbert, tmp_path):
    path = tmp_path / "shard"
    child = run_python(KILLED_WRITER, path, colbert_gguf)
    assert child.returncode == -signal.SIGKILL and child.stdout == "ready\n", child.stderr

    index = Index.open(path, colbert)  # the dead process's lock went with it
    assert isinstance(index, QdrantIndex)
    assert sorted(index.ids()) == ["a1", "b1", "b2", "b3"] and len(index) == 4 and "a2" not in index
    assert index.verify() == []
    docs = stored(index)
    assert docs["b2"].text == "delta four" and docs["b2"].metadata == {"batch": 2}
    assert {h.id for h in index.search("anything", k=10, where={"batch": 2})} == {"b1", "b2", "b3"}

    # the same search results as an exact index of the acknowledged documents
    reference = Index.create(tmp_path / "exact", colbert)
    reference.add(
        ["alpha one", "gamma three", "delta four", "epsilon five"],
        ids=["a1", "b1", "b2", "b3"],
        metadata=[{"batch": 1}, {"batch": 2}, {"batch": 2}, {"batch": 2}],
    )
    queries = list(colbert.encode_query(["gamma", "a question about alpha", QUERIES[0]]))
    tol = colbert_tolerance(queries[0].shape[0])
    for got, want in zip(
        index.search_vectors(queries, k=4), reference.search_vectors(queries, k=4), strict=True
    ):
        assert_same_ranking(got, want, {h.id: h for h in want}, tol)

    # while it is open here, another process cannot open it, and says why
    other = run_python(OTHER_OPENER, path)
    assert other.stdout.startswith("InvalidInputError") and "open in another process" in other.stdout, other
    index.add(["zeta six"], ids=["c1"])
    index.close()
    assert run_python(OTHER_OPENER, path).stdout.strip() == "opened"
    with Index.open(path, colbert) as again:
        assert len(again) == 5 and "c1" in again


KILLED_LOOP = textwrap.dedent(
    """
    import json, sys
    import lfm2edge
    from lfm2edge.runtime.storage.index import Index

    path, model, first = sys.argv[1], sys.argv[2], int(sys.argv[3])
    docs = json.loads(sys.stdin.read())
    index = Index.open(path, lfm2edge.load(model, n_threads=1))
    batch = first
    while True:
        ids = [f"b{batch}-{j}" for j in range(4)]
        index.add([docs[(batch * 4 + j) % len(docs)] for j in range(4)], ids=ids, commit_every=2)
        print(batch, flush=True)
        batch += 1
    """
)


def test_kill_during_adds_keeps_every_acknowledged_batch(colbert_gguf, colbert, tmp_path):
    """SIGKILL at a random moment of a stream of adds (two commits each): every batch the writer
    reported is whole, every other one is a prefix of whole commits, and all of it is searchable."""
    path = tmp_path / "shard"
    Index.create(path, colbert, backend="qdrant").close()
    random.seed(11)
    first, reported_all = 0, set()
    for kill_after in (2, 3):
        proc = subprocess.Popen(
            [sys.executable, "-c", KILLED_LOOP, str(path), str(colbert_gguf), str(first)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        proc.stdin.write(json.dumps(DOCS[:30]))
        proc.stdin.close()
        reported = []
        while len(reported) < kill_after:
            line = proc.stdout.readline()
            assert line, f"the writer exited early: {proc.stderr.read()}"
            reported.append(int(line))
        time.sleep(random.uniform(0, 0.05))
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        reported += [int(x) for x in proc.stdout.read().split()]
        assert proc.returncode == -signal.SIGKILL
        reported_all |= set(reported)

        with Index.open(path, colbert) as index:
            ids = index.ids()
            assert len(ids) == len(set(ids)) == len(index)
            batches: dict[int, list[int]] = {}
            for d in ids:
                b, j = d[1:].split("-")
                batches.setdefault(int(b), []).append(int(j))
            for b in reported_all:
                assert sorted(batches.get(b, [])) == [0, 1, 2, 3], f"acknowledged batch {b} lost"
            for b, js in batches.items():
                assert sorted(js) in ([0, 1], [0, 1, 2, 3]), f"batch {b} holds a partial commit {js}"
            assert {h.id for h in index.search(QUERIES[0], k=len(ids) + 5)} == set(ids)
            first = max(batches) + 1


def test_one_user_at_a_time(colbert, tmp_path):
    path = tmp_path / "shard"
    index = Index.create(path, colbert, backend="qdrant")
    index.add(DOCS[:2], ids=["a", "b"])
    for attempt in (
        lambda: Index.open(path, colbert),
        lambda: Index.open(path),
        lambda: QdrantIndex.open(path),
    ):
        with pytest.raises(InvalidInputError, match="is open in another process .* one user at a time"):
            attempt()
    assert len(index) == 2  # the failed opens left the open one alone
    index.close()
    with Index.open(path, colbert) as reopened:
        assert sorted(reopened.ids()) == ["a", "b"]
        with Index.open_or_create(
            tmp_path / "other", colbert, backend="qdrant"
        ) as created:  # not there: made
            assert isinstance(created, QdrantIndex) and len(created) == 0
    with Index.open_or_create(path, colbert) as again:  # found, opened (and not created over)
        assert isinstance(again, QdrantIndex) and len(again) == 2


def test_refuses_another_model(colbert, dense, tmp_path):
    for made_by, other in ((colbert, dense), (dense, colbert)):
        path = tmp_path / made_by.kind.value
        Index.create(path, made_by, backend="qdrant").close()
        with pytest.raises(IndexModelMismatchError, match="built by another model"):
            Index.open(path, other)
        with Index.open(path, made_by) as index:  # the refused open released the shard
            assert index.info()["model_identity"] == model_identity(made_by) != model_identity(other)


def test_closed_encoder(colbert_gguf, tmp_path):
    encoder = lfm2edge.load(colbert_gguf, n_threads=1)
    index = Index.create(tmp_path / "shard", encoder, backend="qdrant")
    index.add(DOCS[:3], ids=["a", "b", "c"])
    encoder.close()
    for call in (lambda: index.search("q"), lambda: index.search_many(["q"]), lambda: index.add(["x"])):
        with pytest.raises(EncoderClosedError, match="needs the model, but"):
            call()
    assert len(index) == 3 and index.delete("a") == 1  # what needs no model still works
    index.close()
    with pytest.raises(EncoderClosedError):
        Index.open(tmp_path / "shard", encoder)
    with pytest.raises(EncoderClosedError):
        Index.create(tmp_path / "new", encoder, backend="qdrant")
    assert not (tmp_path / "new").exists()
    with Index.open(tmp_path / "shard") as no_model:  # open without a model: inspect and delete only
        assert sorted(no_model.ids()) == ["b", "c"]
        with pytest.raises(InvalidInputError, match="needs the model"):
            no_model.search("q")
        with pytest.raises(InvalidInputError, match="needs the model"):
            no_model.add(["x"])


def test_closed_index_raises_typed_errors(colbert, tmp_path):
    index = Index.create(tmp_path / "shard", colbert, backend="qdrant")
    index.add(DOCS[:2], ids=["a", "b"])
    query = colbert.encode_query(["q"])
    index.close()
    index.close()  # twice is fine
    calls = {
        "len": lambda: len(index),
        "in": lambda: "a" in index,
        "ids": index.ids,
        "documents": lambda: list(index.documents()),
        "add": lambda: index.add(["x"]),
        "add_vectors": lambda: index.add_vectors(colbert.encode_document(["x"])),
        "delete": lambda: index.delete("a"),
        "search": lambda: index.search("q"),
        "search_many": lambda: index.search_many(["q"]),
        "search_vectors": lambda: index.search_vectors(list(query)),
        "compact": index.compact,
        "verify": index.verify,
        "info": index.info,
    }
    for name, call in calls.items():
        with pytest.raises(InvalidInputError, match="was closed"):
            call()
        assert name  # (named for the failure report)
    with Index.open(tmp_path / "shard", colbert) as reopened:
        assert len(reopened) == 2
    with pytest.raises(InvalidInputError, match="was closed"):
        len(reopened)  # the with-block closed it


# ----------------------------------------------------------------------------------------------------------
# Bad input and damaged folders
# ----------------------------------------------------------------------------------------------------------


def test_create_refusals(colbert, dense, tmp_path):
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "notes.txt").write_text("mine")
    with pytest.raises(InvalidInputError, match="not an empty folder"):
        Index.create(tmp_path / "full", colbert, backend="qdrant")
    assert [p.name for p in (tmp_path / "full").iterdir()] == ["notes.txt"]
    (tmp_path / "file").write_text("x")
    with pytest.raises(InvalidInputError, match="not an empty folder"):
        Index.create(tmp_path / "file", colbert, backend="qdrant")
    Index.create(tmp_path / "exact", colbert)
    with pytest.raises(InvalidInputError, match="not an empty folder"):
        Index.create(tmp_path / "exact", colbert, backend="qdrant")
    Index.create(tmp_path / "shard", colbert, backend="qdrant").close()
    with pytest.raises(InvalidInputError, match="not an empty folder"):
        Index.create(tmp_path / "shard", colbert, backend="qdrant")
    with pytest.raises(InvalidInputError, match="not an empty folder"):
        Index.create(tmp_path / "shard", colbert)
    (tmp_path / "empty").mkdir()
    Index.create(tmp_path / "empty", colbert, backend="qdrant").close()  # an empty folder is fine

    refusals = [
        (lambda: Index.create("http://localhost:6333", colbert), "lives in a folder.*backend='qdrant'"),
        (lambda: Index.create("https://example.com/x", colbert, backend="exact"), "lives in a folder"),
        (lambda: Index.create(tmp_path / "a", colbert, backend="qdrant", dtype="int8"), "dtype"),
        (
            lambda: Index.create(tmp_path / "b", colbert, backend="faiss"),
            r"backend must be one of \('exact', 'qdrant'\)",
        ),
        (
            lambda: Index.create(tmp_path / "c", colbert, collection="x"),
            r"\['collection'\] apply to backend='qdrant'",
        ),
        (lambda: Index.create(tmp_path / "d", dense, backend="qdrant", pool_factor=2), "ColBERT models only"),
        (lambda: Index.create(tmp_path / "e", colbert, backend="qdrant", pool_factor=0), "pool_factor"),
        (lambda: Index.create(tmp_path / "f", colbert, backend="qdrant", candidates=-1), "candidates"),
        (
            lambda: Index.create(tmp_path / "g", colbert, backend="qdrant", candidates=MAX_CANDIDATES + 1),
            "candidates",
        ),
        (lambda: Index.open(tmp_path / "shard", colbert, collection="x"), None),
        (
            lambda: Index.open(tmp_path / "exact", colbert, collection="x"),
            r"\['collection'\] apply to Qdrant",
        ),
        (lambda: QdrantIndex.open(tmp_path / "exact", colbert), "holds no Qdrant index"),
    ]
    for call, match in refusals:
        if match is None:  # an Edge folder has no collections: the option is ignored, the open works
            call().close()
            continue
        with pytest.raises(InvalidInputError, match=match):
            call()
    for name in "abcdefg":
        assert not (tmp_path / name).exists() or not any((tmp_path / name).iterdir()), name


@pytest.fixture(scope="module")
def small(colbert, tmp_path_factory):
    index = Index.create(tmp_path_factory.mktemp("small") / "shard", colbert, backend="qdrant")
    index.add(DOCS[:4], ids=IDS[:4], metadata=META[:4])
    yield index
    index.close()


@pytest.mark.parametrize(
    ("where", "match"),
    [
        ({"price": 9.99}, r"where\['price'\] holds 9.99 \(float\)"),
        ({"": "x"}, "where key ''"),
        ({"a..b": "x"}, "where key 'a..b'"),
        ({"n": [1, "1"]}, "several types"),
        (["lang", "en"], "where must be a dict"),
        ("lang=en", "where must be a dict"),
        ({"n": []}, r"where\['n'\] must list between 1 and"),
    ],
)
def test_bad_where(where, match, small, colbert):
    query = list(colbert.encode_query(["q"]))
    for call in (
        lambda: small.search("q", where=where),
        lambda: small.search_many(["q"], where=where),
        lambda: small.search_vectors(query, where=where),
    ):
        with pytest.raises(InvalidInputError, match=match):
            call()


@pytest.mark.parametrize("candidates", [-1, True, False, MAX_CANDIDATES + 1, 2.0, "10", None])
def test_bad_candidates(candidates, small, colbert):
    query = list(colbert.encode_query(["q"]))
    if candidates is None:  # None means the index's setting
        assert len(small.search_vectors(query, k=2, candidates=None)[0]) == 2
        return
    with pytest.raises(
        InvalidInputError, match=f"candidates must be an integer from 0 .* to {MAX_CANDIDATES}"
    ):
        small.search_vectors(query, candidates=candidates)


def test_bad_k_and_queries(small, colbert):
    query = list(colbert.encode_query(["q"]))
    for k in (0, -1, True, 2.5, "3"):
        with pytest.raises(InvalidInputError, match="k must be a positive integer"):
            small.search_vectors(query, k=k)
        with pytest.raises(InvalidInputError, match="k must be a positive integer"):
            small.search("q", k=k)
    for bad, match in (
        ([np.ones(colbert.dim, dtype=np.float32)], r"query 0 must be a finite, non-empty \[tokens, 16\]"),
        ([np.ones((3, colbert.dim + 1), dtype=np.float32)], r"got shape \(3, 17\)"),
        ([np.full((3, colbert.dim), np.nan, dtype=np.float32)], "finite"),
        ("a query", "use search"),
    ):
        with pytest.raises(InvalidInputError, match=match):
            small.search_vectors(bad)
    with pytest.raises(InvalidInputError, match="use search_many"):
        small.search(["a", "list"])


@pytest.mark.parametrize("engine", ["exact", "edge"])
@pytest.mark.parametrize("kind", ["colbert", "dense"])
def test_bad_vectors(kind, engine, new_index, encoders):
    enc = encoders[kind]
    index = new_index(engine, enc)
    good = enc.encode_document(DOCS[:2])
    d = enc.dim
    if kind == "colbert":
        want = rf"\[tokens, {d}\]"
        bad = [
            (
                [good[0], np.ones((3, d + 1), np.float32)],
                rf"vectors 1 must be a finite, non-empty {want} array, got shape \(3, {d + 1}\)",
            ),
            ([good[0], np.ones(d, np.float32)], rf"vectors 1 .* got shape \({d},\)"),
            ([good[0], np.ones((0, d), np.float32)], rf"got shape \(0, {d}\)"),
            (
                [np.ones((2, 3, d), np.float32)[0], np.ones((1, 2, d), np.float32)],
                r"vectors 1 .*got shape \(1, 2, 16\)",
            ),
        ]
    else:
        want = rf"\[{d}\]"
        bad = [
            (
                np.ones((2, d + 1), np.float32),
                rf"vectors 0 must be a finite, non-empty {want} array, got shape \({d + 1},\)",
            ),
            ([good[0], np.ones((1, d), np.float32)], rf"vectors 1 .* got shape \(1, {d}\)"),
        ]
    nan, inf = np.array(good[1], dtype=np.float32), np.array(good[1], dtype=np.float32)
    nan.flat[0], inf.flat[-1] = np.nan, np.inf
    bad += [
        ([good[0], nan], "vectors 1 must be a finite"),
        ([good[0], inf], "vectors 1 must be a finite"),
        ([good[0], np.array(["a"] * d)], "vectors 1 must be .* of real numbers"),
        ([good[0], [[1.0, 2.0], [3.0]]], "vectors 1 must be .* of real numbers"),
        ("text", "vectors must be a list"),
        (42, "vectors must be a list"),
    ]
    for vectors, match in bad:
        with pytest.raises(InvalidInputError, match=match):
            pair = isinstance(vectors, (list, np.ndarray)) and len(vectors) == 2
            index.add_vectors(vectors, ids=["x", "y"] if pair else None)
    with pytest.raises(InvalidInputError, match="got 2 vectors but 1 texts; pass one each"):
        index.add_vectors(good, texts=["only one"])
    with pytest.raises(InvalidInputError, match="got 2 texts but 3 ids"):
        index.add_vectors(good, ids=["a", "b", "c"])
    with pytest.raises(InvalidInputError, match="metadata must be a list of 2"):
        index.add_vectors(good, metadata=[{"a": 1}])
    with pytest.raises(InvalidInputError, match="metadata 1 is not JSON-serialisable"):
        index.add_vectors(good, metadata=[None, {"x": 1.5, "f": object()}])
    with pytest.raises(InvalidInputError, match="commit_every"):
        index.add_vectors(good, commit_every=0)
    assert len(index) == 0  # nothing was written by any of them
    assert index.add_vectors(good, ids=["x", "y"], texts=DOCS[:2]) == ["x", "y"] and len(index) == 2


def test_damaged_settings_file(colbert, tmp_path):
    path = tmp_path / "shard"
    with Index.create(path, colbert, backend="qdrant") as index:
        index.add(DOCS[:3], ids=IDS[:3])
    good = (path / SETTINGS_FILE).read_bytes()
    settings = json.loads(good)
    damaged = {
        "truncated": good[: len(good) // 2],
        "garbage": b"\x00\xff\xfe not json",
        "empty": b"",
        "a list": b"[1, 2]",
        "deep": b"[" * 100_000,
        "foreign": json.dumps({"format": "something-else", "version": 1}).encode(),
        "a newer version": json.dumps({**settings, "version": 99}).encode(),
        "no model": json.dumps({**settings, "model": None}).encode(),
        "no identity": json.dumps({**settings, "model": {"kind": "late_interaction", "dim": 16}}).encode(),
        "unknown kind": json.dumps({**settings, "model": {**settings["model"], "kind": "sparse"}}).encode(),
        "dim not a number": json.dumps({**settings, "model": {**settings["model"], "dim": "x"}}).encode(),
        "no candidates": json.dumps(
            {**settings, "storage": {"pool_factor": 1, "store_texts": True}}
        ).encode(),
        "bad candidates": json.dumps(
            {**settings, "storage": {**settings["storage"], "candidates": -5}}
        ).encode(),
    }
    for problem, data in damaged.items():
        (path / SETTINGS_FILE).write_bytes(data)
        with pytest.raises((IndexCorruptError, InvalidInputError)) as info:
            with Index.open(path, colbert) as index:  # if it opened, using it must fail typed too
                index.search("q")
        assert str(path) in str(info.value), problem
    (path / SETTINGS_FILE).write_bytes(good)
    (path / SHARD_FOLDER).rename(path / "moved")
    with pytest.raises(IndexCorruptError, match="could not load its shard"):
        Index.open(path, colbert)
    (path / "moved").rename(path / SHARD_FOLDER)
    with Index.open(path, colbert) as index:  # every failed open released the lock
        assert sorted(index.ids()) == IDS[:3] and index.verify() == []
    (path / SETTINGS_FILE).unlink()
    with pytest.raises(IndexCorruptError):  # without it the folder is no index at all
        Index.open(path, colbert)
    shutil.rmtree(path / SHARD_FOLDER)
    with pytest.raises(InvalidInputError, match="holds no Qdrant index"):
        QdrantIndex.open(path, colbert)


def test_info_and_dispatch(built, colbert):
    _, edge = built["colbert"]
    info = edge.info()
    assert info["engine"] == "qdrant-edge" and info["documents"] == N and info["kind"] == "late_interaction"
    assert info["dim"] == colbert.dim and info["dtype"] == "float16" and info["candidates"] == DEFAULT_CANDIDATES
    assert info["path"] == str(edge.location) and edge.verify() == []
    assert "QdrantIndex(" in repr(edge)


# ----------------------------------------------------------------------------------------------------------
# A server (qdrant-client: its local mode here, a real server with LFM2EDGE_QDRANT_URL)
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["colbert", "dense"])
def test_server_round_trip(kind, server, built, encoders):
    enc, (exact, _) = encoders[kind], built[kind]
    name = server.collection()
    index = Index.create(server.location, enc, backend="qdrant", collection=name)
    assert isinstance(index, QdrantIndex) and index.info()["engine"] == "qdrant" and len(index) == 0
    assert index.add(DOCS, ids=IDS, metadata=META, commit_every=40) == IDS
    tol = tolerance(enc)
    for where in (None, {"lang": "en"}, {"n": [0, 1], "tags": "t2"}):
        for q in QUERIES[:4]:
            every = {h.id: h for h in exact.search(q, k=N, where=where)}
            assert_same_ranking(
                index.search(q, k=10, where=where), exact.search(q, k=10, where=where), every, tol
            )
    docs = stored(index)
    assert set(docs) == set(IDS) and docs["d5"].text == DOCS[5] and docs["d5"].metadata == META[5]

    # a second handle on the same collection, through the same location (the same client in local mode)
    second = Index.open(server.location, enc, collection=name)
    assert isinstance(second, QdrantIndex) and len(second) == N and sorted(second.ids()) == sorted(IDS)
    assert [h.id for h in second.search(QUERIES[0], k=5)] == [h.id for h in index.search(QUERIES[0], k=5)]
    assert second.delete(["d0", "d1"]) == 2 and "d0" not in index and len(index) == N - 2
    index.close()  # closing one index leaves the caller's client, and the other handle, working
    assert len(second) == N - 2 and server.admin.collection_exists(name)
    second.close()
    with Index.open(server.location, enc, collection=name) as third:
        assert len(third) == N - 2


def test_server_refusals(server, colbert, dense):
    from qdrant_client import models

    name = server.collection()
    Index.create(server.location, colbert, backend="qdrant", collection=name).close()
    with pytest.raises(EngineError, match="already exists; open it with Index.open"):
        Index.create(server.location, colbert, backend="qdrant", collection=name)
    with pytest.raises(IndexModelMismatchError, match="built by another model"):
        Index.open(server.location, dense, collection=name)
    missing = server.collection()
    with pytest.raises(EngineError, match="does not exist"):
        Index.open(server.location, colbert, collection=missing)
    foreign = server.collection()
    server.admin.create_collection(
        foreign, vectors_config=models.VectorParams(size=colbert.dim, distance=models.Distance.COSINE)
    )
    with pytest.raises(EngineError, match="was not made by lfm2edge"):
        Index.open(server.location, colbert, collection=foreign)
    with pytest.raises(EngineError, match="was not made by lfm2edge"):
        Index.open_or_create(server.location, colbert, collection=foreign)
    for bad in ("", "a/b", 7):
        with pytest.raises(InvalidInputError, match="collection must be a non-empty name"):
            Index.create(server.location, colbert, backend="qdrant", collection=bad)
    assert not server.admin.collection_exists(missing)  # nothing was created by the refusals


def test_server_open_or_create(server, colbert):
    name = server.collection()
    with Index.open_or_create(server.location, colbert, collection=name, candidates=9) as index:
        assert isinstance(index, QdrantIndex) and len(index) == 0 and index.candidates == 9
        index.add(DOCS[:3], ids=IDS[:3])
    with Index.open_or_create(server.location, colbert, collection=name, candidates=50) as index:
        assert sorted(index.ids()) == IDS[:3] and index.candidates == 9  # opened, not created again
        assert {h.id for h in index.search(QUERIES[0], k=5, where={"missing": 1})} == set()


def test_unreachable_server_is_a_typed_error(colbert):
    url = "http://127.0.0.1:1"  # nothing listens on port 1: refused at once
    with pytest.raises(EngineError, match="127.0.0.1:1"):
        Index.create(url, colbert, backend="qdrant", collection="x")
    with pytest.raises(EngineError, match="127.0.0.1:1"):
        Index.open(url, colbert, collection="x")
