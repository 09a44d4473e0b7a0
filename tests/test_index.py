"""lfm2edge.runtime.storage.index: round trips, exactness against brute force, crash safety, refusals, fidelity.

Encoders run on one thread: the tests share two cores with whatever else runs, and llama.cpp's
spinning worker threads slow down badly when cores are oversubscribed.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pytest

import lfm2edge
from lfm2edge.convert.synthetic import load_sample_texts
from lfm2edge.runtime.core.errors import InvalidInputError
from lfm2edge.runtime.core.maxsim import kernel_path, maxsim
from lfm2edge.runtime.storage.index import (
    MAX_SEGMENTS,
    DuplicateIdError,
    Index,
    IndexCorruptError,
    IndexModelMismatchError,
    pool_tokens,
    quantize_int8,
)

SAMPLE = load_sample_texts()
DOCS = [d["text"] for d in SAMPLE["documents"]]
QUERIES = [q["text"] for q in SAMPLE["queries"]]


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
def exact(encoders):
    """float32 document and query vectors straight from each encoder, and exact scores [queries, docs]."""
    out = {}
    for kind, enc in encoders.items():
        docs, queries = enc.encode_document(DOCS), enc.encode_query(QUERIES)
        if kind == "colbert":
            scores = np.stack([maxsim(q, docs) for q in queries])
        else:
            scores = queries @ docs.T
        out[kind] = (docs, queries, scores)
    return out


def scores_of(index: Index, queries, k: int) -> list[dict[str, float]]:
    return [{h.id: h.score for h in hits} for hits in index.search_vectors(list(queries), k)]


def same_results(a: list[dict[str, float]], b: list[dict[str, float]], atol: float = 1e-4) -> bool:
    """Same ids per query, scores equal up to float rounding (batching and blocking change the last bits)."""
    return len(a) == len(b) and all(
        x.keys() == y.keys() and all(abs(x[d] - y[d]) <= atol for d in x) for x, y in zip(a, b, strict=True)
    )


# ----------------------------------------------------------------------------------------------------------
# Round trips
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["colbert", "dense"])
def test_add_search_delete_round_trip(kind, encoders, tmp_path):
    enc = encoders[kind]
    path = tmp_path / "idx"
    index = Index.create(path, enc)
    assert len(index) == 0 and index.search("anything") == []
    ids = index.add(DOCS[:6], ids=[f"d{i}" for i in range(6)], metadata=[{"n": i} for i in range(6)])
    assert ids == [f"d{i}" for i in range(6)] and len(index) == 6 and "d3" in index
    auto = index.add(DOCS[6:8])
    assert auto == ["0", "1"] and len(index) == 8

    hits = index.search(QUERIES[0], k=5)
    assert len(hits) == 5 and all(a.score >= b.score for a, b in zip(hits, hits[1:], strict=False))
    by_id = {h.id: h for h in index.search(QUERIES[0], k=100)}
    assert len(by_id) == 8
    assert by_id["d2"].text == DOCS[2] and by_id["d2"].metadata == {"n": 2} and by_id["0"].metadata is None

    with pytest.raises(DuplicateIdError):
        index.add([DOCS[9], DOCS[10]], ids=["new", "d1"])
    assert "new" not in index and len(index) == 8  # checked before anything was written
    with pytest.raises(DuplicateIdError):
        index.add([DOCS[9], DOCS[10]], ids=["x", "x"])
    assert index.add([DOCS[9], DOCS[10]], ids=["d1", "d9"], on_duplicate="skip") == ["d1", "d9"]
    assert len(index) == 9 and {h.id: h for h in index.search(QUERIES[0], k=100)}["d1"].text == DOCS[1]
    index.add([DOCS[11]], ids=["d1"], metadata=[{"v": 2}], on_duplicate="replace")
    replaced = {h.id: h for h in index.search(QUERIES[0], k=100)}["d1"]
    assert len(index) == 9 and replaced.text == DOCS[11] and replaced.metadata == {"v": 2}

    assert index.delete(["d0", "d4"]) == 2 and len(index) == 7
    with pytest.raises(InvalidInputError, match="not in the index"):
        index.delete(["d0", "d5"])
    assert "d5" in index  # nothing deleted when one id is unknown
    assert index.delete(["d0", "d5"], missing_ok=True) == 1
    remaining = set(index.ids())
    assert remaining == {"d1", "d2", "d3", "d9", "0", "1"}
    assert {h.id for h in index.search(QUERIES[1], k=100)} == remaining

    reopened = Index.open(path, enc)
    assert set(reopened.ids()) == remaining and len(reopened) == 6
    queries = enc.encode_query(QUERIES[:3])
    assert same_results(scores_of(reopened, queries, 6), scores_of(index, queries, 6), atol=0)
    assert reopened.add([DOCS[20]]) == ["2"]  # auto ids never reuse one handed out before
    assert reopened.verify() == []


def test_bad_arguments(colbert, dense, tmp_path):
    index = Index.create(tmp_path / "idx", colbert)
    with pytest.raises(InvalidInputError):
        index.add(["ok", "   "])
    with pytest.raises(InvalidInputError):
        index.add(["a", "b"], ids=["only-one"])
    with pytest.raises(InvalidInputError):
        index.add(["a"], metadata=[{"x": object()}])
    with pytest.raises(InvalidInputError):
        index.search("q", k=0)
    with pytest.raises(InvalidInputError):
        index.search_vectors([np.ones(colbert.dim)])  # ColBERT queries are matrices
    with pytest.raises(InvalidInputError):
        Index.create(tmp_path / "idx", colbert)  # already an index
    with pytest.raises(InvalidInputError):
        Index.create(tmp_path / "d", dense, pool_factor=2)  # pooling is for ColBERT
    with pytest.raises(InvalidInputError):
        Index.create(tmp_path / "e", colbert, dtype="float8")
    with pytest.raises(InvalidInputError, match="needs the model"):
        Index.open(tmp_path / "idx").search("q")
    assert len(index) == 0


def test_search_many_and_concurrent_writes(colbert, tmp_path):
    index = Index.create(tmp_path / "idx", colbert)
    index.add(DOCS[:20])
    many = index.search_many(QUERIES[:20], k=7)
    assert [[h.id for h in hits] for hits in many] == [
        [h.id for h in index.search(q, k=7)] for q in QUERIES[:20]
    ]

    errors: list[BaseException] = []

    def searcher() -> None:
        try:
            for q in QUERIES[:15]:
                hits = index.search(q, k=5)
                assert len(hits) == 5 and len({h.id for h in hits}) == 5
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=searcher) for _ in range(3)]
    for t in threads:
        t.start()
    index.add(DOCS[20:40], commit_every=4)
    index.delete([str(i) for i in range(5)])
    for t in threads:
        t.join()
    assert not errors and len(index) == 35

    other = Index.open(tmp_path / "idx", colbert)  # another handle, as another process would hold
    other.add(DOCS[40:42], ids=["other-a", "other-b"])
    other.delete(["5"])
    found = {h.id for h in index.search(QUERIES[0], k=100)}  # the first handle adopts those commits
    assert {"other-a", "other-b"} <= found and "5" not in found and len(index) == 36


def test_segments_stay_packed_for_the_kernel_between_searches(colbert, tmp_path):
    # The MaxSim kernel keeps its int8 codes of a segment's rows with the segment's PackedDocuments:
    # the index must hand it the same one at every search, and let it go with the segment.
    if kernel_path(colbert.dim) is None:
        pytest.skip("no MaxSim kernel here")
    index = Index.create(tmp_path / "idx", colbert)
    index.add(DOCS[:10])
    first = index.search(QUERIES[0], k=3)
    (name, (vectors, packed)), = index._packed.items()
    assert index.search(QUERIES[0], k=3) == first and index._packed[name][1] is packed
    index.add(DOCS[10:12])  # a second segment; the first keeps its packed vectors
    index.search(QUERIES[0], k=3)
    assert index._packed[name][1] is packed and len(index._packed) == 2
    index.compact()  # one new segment: the old ones' packed vectors are let go
    index.search(QUERIES[0], k=3)
    assert name not in index._packed and len(index._packed) == 1
    index.close()
    assert index._packed == {}


# ----------------------------------------------------------------------------------------------------------
# Exactness
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["colbert", "dense"])
def test_exact_search_equals_brute_force(kind, encoders, exact, tmp_path):
    docs, queries, scores32 = exact[kind]
    index = Index.create(tmp_path / "idx", encoders[kind])
    index.add(DOCS, ids=[str(i) for i in range(len(DOCS))])
    k = 10
    if kind == "colbert":
        docs16 = [d.astype(np.float16).astype(np.float32) for d in docs]
        brute16 = np.stack([maxsim(q, docs16) for q in queries])
    else:
        brute16 = queries @ docs.astype(np.float16).astype(np.float32).T
    # float16 rounding bound of a score: each term is a dot of a unit query vector with a stored one.
    rows = queries[0].shape[0] if kind == "colbert" else 1
    bound = rows * 2.0**-11 * 2
    for qi, hits in enumerate(index.search_vectors(list(queries), k)):
        got = [int(h.id) for h in hits]
        want = list(np.argsort(-brute16[qi], kind="stable")[:k])
        got_scores = np.array([h.score for h in hits])
        # Same stored vectors: the same ranking and scores up to float32 summation order.
        assert np.allclose(got_scores, brute16[qi, got], rtol=0, atol=1e-4)
        assert np.allclose(got_scores, brute16[qi, want], rtol=0, atol=1e-4)
        assert got == want or np.allclose(brute16[qi, got], brute16[qi, want], atol=1e-4)
        # Against the float32 vectors: within float16 rounding, rank changes only between near-ties.
        assert np.max(np.abs(got_scores - scores32[qi, got])) <= bound
        exact_top = list(np.argsort(-scores32[qi], kind="stable")[:k])
        for a, b in zip(got, exact_top, strict=True):
            assert a == b or abs(scores32[qi, a] - scores32[qi, b]) <= 2 * bound


# ----------------------------------------------------------------------------------------------------------
# Refusals: another model, foreign and corrupt folders
# ----------------------------------------------------------------------------------------------------------


def test_refuses_another_model(colbert, dense, colbert_checkpoint, tmp_path):
    from lfm2edge.convert.pipeline import convert

    index = Index.create(tmp_path / "idx", colbert)
    index.add(DOCS[:3])
    with pytest.raises(IndexModelMismatchError, match="another model"):
        Index.open(tmp_path / "idx", dense)
    other = convert(
        colbert_checkpoint, tmp_path / "colbert-f16.gguf", "f16"
    )  # same kind and dim, other weights
    with lfm2edge.load(other, n_threads=1) as enc:
        with pytest.raises(IndexModelMismatchError):
            Index.open(tmp_path / "idx", enc)
    assert len(Index.open(tmp_path / "idx", colbert)) == 3


def test_foreign_and_corrupt_folders(colbert, tmp_path):
    with pytest.raises(IndexCorruptError, match="does not exist"):
        Index.open(tmp_path / "missing")
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "cat.jpg").write_bytes(b"\xff\xd8")
    with pytest.raises(IndexCorruptError, match="not an lfm2edge index"):
        Index.open(tmp_path / "photos")
    with pytest.raises(InvalidInputError, match="not an empty folder"):
        Index.create(tmp_path / "photos", colbert)

    path = tmp_path / "idx"
    index = Index.create(path, colbert)
    index.add(DOCS[:4], commit_every=2)
    manifest = (path / "manifest.json").read_text()
    seg = path / "segments" / json.loads(manifest)["segments"][0]["name"]

    def damaged(problem: str, match: str) -> None:
        with pytest.raises(IndexCorruptError, match=match) as info:
            Index.open(path, colbert)
        assert "restore" in str(info.value) or "lfm2edge index" in str(info.value), problem

    (path / "manifest.json").write_text(manifest[: len(manifest) // 2])
    damaged("torn manifest", "cannot be read")
    (path / "manifest.json").write_text(json.dumps({"format": "something-else"}))
    damaged("foreign manifest", "not an lfm2edge index manifest")
    (path / "manifest.json").write_text(manifest.replace('"dim"', '"dims"'))
    damaged("mangled manifest", "lacks or mangles")
    (path / "manifest.json").write_text(manifest)

    vectors = (seg / "vectors.npy").read_bytes()
    (seg / "vectors.npy").write_bytes(vectors[:-10])
    damaged("truncated vectors", "bytes, the manifest says")
    flipped = bytearray(vectors)
    flipped[-3] ^= 0xFF
    (seg / "vectors.npy").write_bytes(bytes(flipped))
    assert any(
        "checksum" in p for p in Index.open(path, colbert).verify()
    )  # same size: only the hash sees it
    (seg / "vectors.npy").write_bytes(vectors)
    (seg / "ids.json").unlink()
    damaged("missing file", "is missing")


# ----------------------------------------------------------------------------------------------------------
# Crash safety: kill -9 in a subprocess
# ----------------------------------------------------------------------------------------------------------

CHILD = textwrap.dedent(
    """
    import json, os, signal, sys
    import lfm2edge
    from lfm2edge.runtime.storage import index_storage
    from lfm2edge.runtime.storage.index import Index

    path, model, mode, first = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    docs = json.loads(sys.stdin.read())
    index = Index.open(path, lfm2edge.load(model, n_threads=1))

    def die():
        os.kill(os.getpid(), signal.SIGKILL)

    if mode == "die-before-manifest":  # the segment is written and renamed; the manifest is not replaced
        real = os.replace
        os.replace = lambda src, dst: die() if str(dst).endswith("manifest.json") else real(src, dst)
    if mode == "die-mid-segment":  # killed after writing two of a segment's files
        real_write, count = index_storage.write_durable, [0]
        def write(p, data):
            count[0] += 1
            if count[0] == 3:
                die()
            return real_write(p, data)
        index_storage.write_durable = write
    if mode == "die-in-delete":
        real = os.replace
        os.replace = lambda src, dst: die() if str(dst).endswith("manifest.json") else real(src, dst)
        index.delete(index.ids()[:2])
    batch = first
    while True:
        ids = [f"b{batch}-{j}" for j in range(4)]
        texts = [docs[(batch * 4 + j) % len(docs)] for j in range(4)]
        index.add(texts, ids=ids, commit_every=2)  # two commits per call
        print(batch, flush=True)
        batch += 1
    """
)


def run_child(path: Path, model: Path, mode: str, first: int, kill_after: int | None) -> list[int]:
    """Run the writer; SIGKILL it after ``kill_after`` reported batches and a random delay; the reported."""
    proc = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(path), str(model), mode, str(first)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    proc.stdin.write(json.dumps(DOCS[:30]))
    proc.stdin.close()
    reported = []
    if kill_after is None:
        proc.wait(timeout=60)
    else:
        while len(reported) < kill_after:
            line = proc.stdout.readline()
            assert line, f"the writer exited early: {proc.stderr.read()}"
            reported.append(int(line))
        time.sleep(random.uniform(0, 0.05))
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    reported += [int(x) for x in proc.stdout.read().split()]
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read()
    return reported


def check_consistent(path: Path, encoder, reported: list[int]) -> dict[int, list[int]]:
    """Every reported batch whole, every batch a prefix of whole commits, no id twice, all searchable."""
    index = Index.open(path, encoder)
    ids = index.ids()
    assert len(ids) == len(set(ids)) == len(index)
    batches: dict[int, list[int]] = {}
    for d in ids:
        b, j = d[1:].split("-")
        batches.setdefault(int(b), []).append(int(j))
    for b in reported:
        assert sorted(batches.get(b, [])) == [0, 1, 2, 3], f"committed batch {b} lost"
    for b, js in batches.items():
        assert sorted(js) in ([0, 1], [0, 1, 2, 3]), f"batch {b} holds a partial commit {js}"
    found = {h.id for h in index.search(QUERIES[0], k=len(index) + 5)}
    assert found == set(ids)
    assert index.verify() == []
    return batches


def test_kill_during_add_keeps_every_committed_batch(colbert_gguf, colbert, tmp_path):
    path = tmp_path / "idx"
    Index.create(path, colbert)
    first, seen = 0, set()
    random.seed(7)
    for round_ in range(3):
        reported = run_child(path, colbert_gguf, "add", first, kill_after=2 + round_)
        batches = check_consistent(path, colbert, reported)
        seen |= set(reported)
        assert seen <= set(batches)
        first = max(batches) + 1


@pytest.mark.parametrize("mode", ["die-before-manifest", "die-mid-segment"])
def test_crash_points_inside_a_commit(mode, colbert_gguf, colbert, tmp_path):
    path = tmp_path / "idx"
    index = Index.create(path, colbert)
    index.add(DOCS[:3], ids=["keep-0", "keep-1", "keep-2"])
    run_child(path, colbert_gguf, mode, 0, kill_after=None)  # dies inside its first commit
    reopened = Index.open(path, colbert)
    assert reopened.ids() == ["keep-0", "keep-1", "keep-2"] and reopened.verify() == []
    leftovers = {p.name for p in (path / "segments").iterdir()}
    assert len(leftovers) == 2  # the committed segment and the crashed one's folder
    reopened.add(DOCS[3:4], ids=["after"])  # the next write clears what the crash left
    committed = {s["name"] for s in json.loads((path / "manifest.json").read_text())["segments"]}
    assert {p.name for p in (path / "segments").iterdir()} == committed
    assert not list(path.glob("manifest.json.tmp-*"))
    assert len(Index.open(path, colbert)) == 4


def test_kill_during_delete_loses_nothing(colbert_gguf, colbert, tmp_path):
    path = tmp_path / "idx"
    index = Index.create(path, colbert)
    index.add(DOCS[:5])
    run_child(path, colbert_gguf, "die-in-delete", 0, kill_after=None)
    reopened = Index.open(path, colbert)
    assert reopened.ids() == ["0", "1", "2", "3", "4"]
    assert reopened.delete(["0", "1"]) == 2 and Index.open(path, colbert).ids() == ["2", "3", "4"]


# ----------------------------------------------------------------------------------------------------------
# Segments: merging and compaction
# ----------------------------------------------------------------------------------------------------------


def test_many_commits_merge_without_changing_results(colbert, tmp_path):
    index = Index.create(tmp_path / "idx", colbert)
    index.add(DOCS[:40], ids=[str(i) for i in range(40)], commit_every=1)
    assert index.info()["segments"] <= MAX_SEGMENTS
    reference = Index.create(tmp_path / "ref", colbert)
    reference.add(DOCS[:40], ids=[str(i) for i in range(40)])
    queries = colbert.encode_query(QUERIES[:8])
    # Decoding 1 vs 40 texts per call moves vectors by ~1e-6, which can flip a float16 rounding.
    assert same_results(scores_of(index, queries, 40), scores_of(reference, queries, 40), atol=2e-3)
    index.delete([str(i) for i in range(0, 40, 3)])
    before = scores_of(index, queries, 40)
    size = index.info()["bytes"]
    index.compact()
    assert index.info()["segments"] == 1 and index.info()["deleted"] == 0 and index.info()["bytes"] < size
    assert same_results(scores_of(index, queries, 40), before)
    assert same_results(scores_of(Index.open(tmp_path / "idx", colbert), queries, 40), before)


# ----------------------------------------------------------------------------------------------------------
# int8 and token pooling: transforms and their measured fidelity
# ----------------------------------------------------------------------------------------------------------


def naive_ward_means(x: np.ndarray, clusters: int) -> np.ndarray:
    """Textbook Ward agglomeration (recomputing every merge cost), for checking pool_tokens."""
    groups = [[i] for i in range(len(x))]
    while len(groups) > clusters:
        best = None
        for a in range(len(groups)):
            for b in range(a + 1, len(groups)):
                ca, cb = x[groups[a]].mean(0), x[groups[b]].mean(0)
                na, nb = len(groups[a]), len(groups[b])
                cost = na * nb / (na + nb) * ((ca - cb) ** 2).sum()
                if best is None or cost < best[0]:
                    best = (cost, a, b)
        _, a, b = best
        groups[a] += groups.pop(b)
    groups.sort(key=min)
    return np.stack([x[g].mean(0) for g in groups])


def test_pool_tokens_and_quantize():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((15, 8)).astype(np.float32)
    pooled = pool_tokens(x, 2)
    assert pooled.shape == (1 + 14 // 2, 8) and np.array_equal(pooled[0], x[0])  # BOS kept as it is
    assert np.allclose(pooled[1:], naive_ward_means(x[1:].astype(np.float64), 7), atol=1e-5)
    assert np.array_equal(pool_tokens(x, 1), x) and pool_tokens(x[:2], 2).shape == (2, 8)
    codes, scales = quantize_int8(x)
    assert codes.dtype == np.int8 and np.abs(codes).max() == 127
    assert np.max(np.abs(codes * scales[:, None] - x)) <= scales.max() / 2 + 1e-7


def fidelity(index: Index, queries, scores32: np.ndarray, k: int = 10) -> dict[str, float]:
    """Score errors against the exact float32 scores, and top-k overlap with the exact top-k."""
    abs_errors, overlaps = [], []
    for qi, got in enumerate(scores_of(index, queries, len(index))):
        ids = np.array([int(d) for d in got])
        abs_errors.append(np.abs(np.array(list(got.values())) - scores32[qi, ids]))
        top = set(np.argsort(-scores32[qi], kind="stable")[:k].tolist())
        overlaps.append(len(top & {int(d) for d in list(got)[:k]}) / k)
    errors = np.concatenate(abs_errors)
    return {
        "mean_abs_error": float(errors.mean()),
        "max_abs_error": float(errors.max()),
        "mean_rel_error": float(errors.mean() / np.abs(scores32).mean()),
        "top10_agreement": float(np.mean(overlaps)),
    }


def measure(encoder, tmp_path: Path, variants, exact_vectors=None) -> dict[str, dict[str, float]]:
    """Fidelity of each (dtype, pool factor) index of the sample documents, printed as a table."""
    if exact_vectors is None:
        late = encoder.kind.value == "late_interaction"
        docs, queries = encoder.encode_document(DOCS), encoder.encode_query(QUERIES)
        scores32 = np.stack([maxsim(q, docs) for q in queries]) if late else queries @ docs.T
    else:
        _, queries, scores32 = exact_vectors
    report = {}
    for dtype, pool in variants:
        index = Index.create(tmp_path / f"{dtype}-{pool}", encoder, dtype=dtype, pool_factor=pool)
        index.add(DOCS, ids=[str(i) for i in range(len(DOCS))])
        info = index.info()
        report[f"{dtype} pool{pool}"] = fidelity(index, queries, scores32) | {
            "vectors": info["vectors"],
            "bytes": info["bytes"],
        }
    print(
        f"\n{Path(encoder.path).name} ({encoder.kind.value}, dim {encoder.dim}): "
        "index scores vs exact float32, "
        f"{len(QUERIES)} queries x {len(DOCS)} documents"
    )
    for name, r in report.items():
        print(
            f"  {name:14} score error mean {r['mean_abs_error']:.5f} "
            f"({100 * r['mean_rel_error']:.3f}% of the mean "
            f"score) max {r['max_abs_error']:.5f}  top-10 agreement {r['top10_agreement']:.3f}  "
            f"vectors {r['vectors']}  bytes {r['bytes']}"
        )
    return report


COLBERT_VARIANTS = [("float16", 1), ("int8", 1), ("float16", 2), ("int8", 2)]
DENSE_VARIANTS = [("float16", 1), ("int8", 1)]


def test_int8_and_pooling_fidelity(colbert, dense, exact, tmp_path, capsys):
    """On the tiny random models (16-d ColBERT, 64-d dense): regression guards, not real-model numbers."""
    with capsys.disabled():
        late = measure(colbert, tmp_path / "colbert", COLBERT_VARIANTS, exact["colbert"])
        flat = measure(dense, tmp_path / "dense", DENSE_VARIANTS, exact["dense"])
    assert late["float16 pool1"]["mean_rel_error"] < 1e-4 and late["float16 pool1"]["top10_agreement"] == 1.0
    assert late["int8 pool1"]["mean_rel_error"] < 1e-3 and late["int8 pool1"]["top10_agreement"] >= 0.95
    assert late["int8 pool1"]["bytes"] < 0.7 * late["float16 pool1"]["bytes"]
    assert late["float16 pool2"]["vectors"] <= 0.55 * late["float16 pool1"]["vectors"]
    assert late["float16 pool2"]["top10_agreement"] >= 0.6
    assert flat["float16 pool1"]["max_abs_error"] < 2e-3
    assert flat["int8 pool1"]["mean_rel_error"] < 3e-3 and flat["int8 pool1"]["top10_agreement"] >= 0.9


@pytest.mark.skipif(
    not os.environ.get("LFM2EDGE_FIDELITY_GGUF"),
    reason="needs a real model: set LFM2EDGE_FIDELITY_GGUF to an LFM2.5-ColBERT-350M or -Embedding-350M GGUF",
)
def test_fidelity_of_a_real_model(tmp_path, capsys):
    """The same table for a real GGUF, held to what the README promises: float16 storage keeps the scores
    and the top 10, int8 stays within about 1% in fewer bytes, pooling by 2 halves the vectors."""
    with lfm2edge.load(os.environ["LFM2EDGE_FIDELITY_GGUF"]) as enc, capsys.disabled():
        late = enc.kind.value == "late_interaction"
        report = measure(enc, tmp_path, COLBERT_VARIANTS if late else DENSE_VARIANTS)
    f16, i8 = report["float16 pool1"], report["int8 pool1"]
    assert f16["mean_rel_error"] < 1e-3 and f16["top10_agreement"] >= 0.98
    assert i8["mean_rel_error"] < 1e-2 and i8["top10_agreement"] >= 0.9
    assert i8["bytes"] < f16["bytes"]
    if late:  # a dense index holds one vector per text, so there the stored texts weigh as much
        assert i8["bytes"] < 0.7 * f16["bytes"]
        pooled = report["float16 pool2"]
        assert pooled["vectors"] <= 0.55 * f16["vectors"] and pooled["top10_agreement"] >= 0.6
