"""The local server: a real ``lfm2edge serve`` process on 127.0.0.1, talked to with httpx.

Each endpoint with good and bad input, the limits, the Host check, and 50 concurrent requests from
several client threads answered correctly with the server healthy afterwards.
"""

from __future__ import annotations

import base64
import json
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest

from lfm2edge.convert.synthetic import load_sample_texts
from lfm2edge.runtime.core.maxsim import maxsim
from lfm2edge.runtime.frontends.server import Batcher, relevance_scores
from lfm2edge.runtime.storage.index import Index

SAMPLE = load_sample_texts()
DOCS = [d["text"] for d in SAMPLE["documents"]]
QUERIES = [q["text"] for q in SAMPLE["queries"]]
MAX_BODY = 200_000


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """``python -m lfm2edge.cli serve ...`` on a free port, ready when /health answers."""

    def __init__(self, *args: str):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [
            sys.executable,
            "-m",
            "lfm2edge.cli",
            "serve",
            *args,
            "--port",
            str(self.port),
            "--threads",
            "1",
        ]
        self.log = tempfile.TemporaryFile(mode="w+")  # a file, not a pipe: the server never blocks on its log
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=self.log, text=True)
        self.client = httpx.Client(base_url=self.url, timeout=60)
        deadline = time.monotonic() + 60
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited with {self.proc.returncode}: {self.stderr()}")
            try:
                if self.client.get("/health").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError("the server did not answer /health within 60 s")
            time.sleep(0.1)

    def stderr(self) -> str:
        self.log.seek(0)
        return self.log.read()

    def post(self, path: str, body) -> httpx.Response:
        return self.client.post(path, json=body)

    def stop(self) -> int:
        self.client.close()
        self.proc.send_signal(signal.SIGINT)
        try:
            return self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise


@pytest.fixture(scope="module")
def colbert(colbert_encoder):
    return colbert_encoder  # the session's tiny ColBERT encoder (tests/conftest.py)


@pytest.fixture(scope="module")
def dense(embedding_encoder):
    return embedding_encoder


@pytest.fixture(scope="module")
def index_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("server") / "idx"


@pytest.fixture(scope="module")
def colbert_server(colbert_gguf: Path, index_dir: Path) -> Iterator[Server]:
    server = Server(
        str(colbert_gguf),
        "--index",
        str(index_dir),
        "--create-index",
        "--max-body-bytes",
        str(MAX_BODY),
        "--max-inputs",
        "40",
    )
    yield server
    assert server.stop() == 0, server.stderr()


@pytest.fixture(scope="module")
def dense_server(embedding_gguf: Path) -> Iterator[Server]:
    server = Server(str(embedding_gguf))
    yield server
    server.stop()


def assert_error(response: httpx.Response, status: int, fragment: str = "") -> None:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["code"] == status and fragment.lower() in error["message"].lower(), error


# ----------------------------------------------------------------------------------------------------------
# Each endpoint
# ----------------------------------------------------------------------------------------------------------


def test_health(colbert_server, dense_server, colbert):
    h = colbert_server.client.get("/health").json()
    assert (
        h["status"] == "ok" and h["model"]["kind"] == "late_interaction" and h["model"]["dim"] == colbert.dim
    )
    assert h["index"]["documents"] == 0 or h["index"]["kind"] == "late_interaction"
    d = dense_server.client.get("/health").json()
    assert d["model"]["kind"] == "dense" and d["index"] is None
    assert_error(colbert_server.client.get("/nope"), 404)
    assert_error(colbert_server.client.get("/search"), 405)


def test_openai_embeddings(dense_server, colbert_server, dense):
    texts = DOCS[:3]
    r = dense_server.post("/v1/embeddings", {"input": texts, "model": "text-embedding-3-small"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert (
        body["object"] == "list"
        and body["model"] == "text-embedding-3-small"
        and body["usage"]["total_tokens"] > 0
    )
    got = np.array([d["embedding"] for d in sorted(body["data"], key=lambda d: d["index"])])
    assert np.allclose(got, dense.encode_document(texts), atol=1e-5)

    one = dense_server.post(
        "/v1/embeddings", {"input": QUERIES[0], "input_type": "query", "encoding_format": "base64"}
    )
    vector = np.frombuffer(base64.b64decode(one.json()["data"][0]["embedding"]), dtype="<f4")
    assert np.allclose(vector, dense.encode_query(QUERIES[0]), atol=1e-5)

    assert_error(dense_server.post("/v1/embeddings", {"input": []}), 400, "empty")
    assert_error(dense_server.post("/v1/embeddings", {"input": ["ok", "  "]}), 400, "input[1]")
    assert_error(dense_server.post("/v1/embeddings", {"input": "x", "dimensions": 8}), 400, "dimensions")
    assert_error(dense_server.post("/v1/embeddings", {"input": "x", "encoding_format": "int8"}), 422)
    assert_error(dense_server.post("/v1/embeddings", {"text": "x"}), 422, "input")
    assert_error(dense_server.post("/v1/embeddings", {"input": ["t"] * 257}), 400, "limit of 256")
    assert_error(colbert_server.post("/v1/embeddings", {"input": "x"}), 400, "/embed")
    bad = dense_server.client.post(
        "/v1/embeddings", content=b'{"input": ', headers={"content-type": "application/json"}
    )
    assert_error(bad, 422, "not valid JSON")


def test_openai_usage_counts_the_tokens_decoded(dense_server, dense):
    s = dense.settings
    texts = [DOCS[0], "short", "word " * 2000]  # the last is truncated at the document length
    decoded = [len(dense.prepare_document(t)) for t in texts]
    assert decoded[2] == s.document_length and decoded[1] > len(dense.tokenize("short"))  # prompt counted
    usage = dense_server.post("/v1/embeddings", {"input": texts}).json()["usage"]
    assert usage == {"prompt_tokens": sum(decoded), "total_tokens": sum(decoded)}
    query = dense_server.post("/v1/embeddings", {"input": "short", "input_type": "query"}).json()["usage"]
    assert query["prompt_tokens"] == len(dense.prepare_query("short"))


def test_openai_token_ids_are_the_text_they_spell(dense_server, colbert_server, dense):
    texts = [DOCS[0], QUERIES[1], "naïve café — 東京 😀"]  # multi-byte characters split across tokens
    ids = [dense.tokenize(t)[1:].tolist() for t in texts]  # the text's tokens, without BOS
    by_text = dense_server.post("/v1/embeddings", {"input": texts}).json()
    by_ids = dense_server.post("/v1/embeddings", {"input": ids}).json()
    assert by_ids["usage"] == by_text["usage"]
    got = np.array([d["embedding"] for d in by_ids["data"]])
    assert np.allclose(got, dense.encode_document(texts), atol=1e-5)
    with_bos = dense_server.post(
        "/v1/embeddings", {"input": dense.tokenize(texts[0]).tolist(), "input_type": "query"}
    )
    assert np.allclose(with_bos.json()["data"][0]["embedding"], dense.encode_query(texts[0]), atol=1e-5)

    n = len(dense.model_file.header.metadata["tokenizer.ggml.tokens"])
    word = ids[0][0]
    cases = [
        ({"input": [[word, word, n]]}, 400, f"input[0][2] is token id {n}, outside"),
        ({"input": [word, -1]}, 400, "input[1] is token id -1"),
        ({"input": [[word], [word, 2**70]]}, 400, f"input[1][1] is token id {2**70}"),
        ({"input": [[word, n - 1]]}, 400, "unused placeholder"),  # the padded table's rows past the tokenizer
        ({"input": [[]]}, 400, "no token ids"),
        ({"input": [[word]] * 257}, 400, "limit of 256"),
        ({"input": [True, 1]}, 422, "input"),
        ({"input": ["a", 1]}, 422, "input"),
    ]
    for body, status, fragment in cases:
        assert_error(dense_server.post("/v1/embeddings", body), status, fragment)
    assert_error(colbert_server.post("/v1/embeddings", {"input": [[word]]}), 400, "/embed")


def test_embed_per_token(colbert_server, dense_server, colbert, dense):
    r = colbert_server.post("/embed", {"input": [QUERIES[0], QUERIES[1]], "input_type": "query"})
    assert r.status_code == 200, r.text
    data = r.json()["data"]
    expected = colbert.encode_query(QUERIES[:2])
    for item, want in zip(data, expected, strict=True):
        assert item["shape"] == list(want.shape) and np.allclose(item["embedding"], want, atol=1e-5)
    doc = colbert_server.post("/embed", {"input": DOCS[0], "encoding_format": "base64"}).json()["data"][0]
    matrix = np.frombuffer(base64.b64decode(doc["embedding"]), dtype="<f4").reshape(doc["shape"])
    assert np.allclose(matrix, colbert.encode_document(DOCS[0]), atol=1e-5)
    dense_vec = dense_server.post("/embed", {"input": "x"}).json()["data"][0]
    assert dense_vec["shape"] == [dense.dim]
    assert_error(colbert_server.post("/embed", {"input": "x", "input_type": "passage"}), 422, "input_type")
    assert_error(colbert_server.post("/embed", {"input": ["t"] * 41}), 400, "limit of 40")


def test_rerank_cohere_schema(colbert_server, dense_server, colbert, dense):
    docs = DOCS[:8]
    for server, enc in ((colbert_server, colbert), (dense_server, dense)):
        r = server.post(
            "/rerank", {"query": QUERIES[0], "documents": docs, "top_n": 3, "return_documents": True}
        )
        assert r.status_code == 200, r.text
        results = r.json()["results"]
        want = enc.rerank(QUERIES[0], docs, top_k=3)
        assert [x["index"] for x in results] == want.indices.tolist()
        assert np.allclose([x["score"] for x in results], want.scores, atol=1e-4)
        assert [x["document"]["text"] for x in results] == [docs[i] for i in want.indices]
        # relevance_score: the raw score per query vector (ColBERT) or the cosine, mapped to [0, 1]
        vectors = enc.encode_query(QUERIES[0]).shape[0] if enc is colbert else 1
        expected = (want.scores / vectors + 1) / 2
        assert np.allclose([x["relevance_score"] for x in results], expected, atol=1e-4)
    objects = colbert_server.post(
        "/rerank", {"query": QUERIES[1], "documents": [{"text": d} for d in docs]}
    ).json()
    assert len(objects["results"]) == 8 and "document" not in objects["results"][0]
    assert_error(colbert_server.post("/rerank", {"query": "q", "documents": []}), 400, "documents is empty")
    assert_error(colbert_server.post("/rerank", {"query": " ", "documents": ["a"]}), 400, "query")
    assert_error(colbert_server.post("/rerank", {"query": "q", "documents": ["a"], "top_n": 0}), 422, "top_n")
    assert_error(colbert_server.post("/rerank", {"query": "q", "documents": [1, 2]}), 422)
    assert_error(
        colbert_server.post("/rerank", {"query": "q", "documents": ["a"] * 1001}), 400, "limit of 1000"
    )


def test_rerank_paths_meta_and_usage(colbert_server, colbert):
    docs = DOCS + QUERIES[:20]  # over 100 documents: two search units
    want = maxsim(colbert.encode_query(QUERIES[2]), colbert.encode_document(docs))
    assert want.max() > 1  # a MaxSim sum: raw scores are not relevance scores
    tokens = len(colbert.prepare_query(QUERIES[2])) + sum(len(colbert.prepare_document(d)) for d in docs)
    answers = {}
    for path, version in (("/rerank", "1"), ("/v1/rerank", "1"), ("/v2/rerank", "2")):
        r = colbert_server.post(path, {"query": QUERIES[2], "documents": docs, "model": "rerank-v3.5"})
        assert r.status_code == 200, r.text
        body = answers[path] = r.json()
        assert body["meta"] == {"api_version": {"version": version}, "billed_units": {"search_units": 2}}
        assert body["usage"] == {"total_tokens": tokens} and body["model"] == "rerank-v3.5"
        assert len(body["id"]) == 36
        results = body["results"]
        relevance, raw = [x["relevance_score"] for x in results], [x["score"] for x in results]
        assert all(0 <= x <= 1 for x in relevance) and relevance == sorted(relevance, reverse=True)
        assert raw == sorted(raw, reverse=True)
        assert sorted(x["index"] for x in results) == list(range(len(docs)))
        assert np.allclose(raw, want[[x["index"] for x in results]], atol=1e-4)
    assert len({a["id"] for a in answers.values()}) == 3
    assert answers["/v1/rerank"]["results"] == answers["/v2/rerank"]["results"]


def test_relevance_scores_bounds():
    raw = np.array([32.0, 0.0, -32.0, 16.0, 32.00001], dtype=np.float32)
    assert relevance_scores(raw, 32).tolist() == [1.0, 0.5, 0.0, 0.75, 1.0]
    assert relevance_scores(np.array([1.0, -1.0, 0.2]), None).tolist() == pytest.approx([1.0, 0.0, 0.6])


def test_documents_and_search(colbert_server, dense_server, colbert):
    s = colbert_server
    added = s.post(
        "/documents",
        {"documents": [{"id": f"doc-{i}", "text": DOCS[i], "metadata": {"n": i}} for i in range(10)]},
    )
    assert added.status_code == 200, added.text
    assert added.json()["ids"] == [f"doc-{i}" for i in range(10)]
    r = s.post("/search", {"query": QUERIES[0], "top_k": 4})
    assert r.status_code == 200, r.text
    results = r.json()["results"]
    assert len(results) == 4 and all(
        a["score"] >= b["score"] for a, b in zip(results, results[1:], strict=False)
    )
    scores = maxsim(colbert.encode_query(QUERIES[0]), colbert.encode_document(DOCS[:10]))
    for hit in results:
        n = hit["metadata"]["n"]
        assert hit["id"] == f"doc-{n}" and hit["text"] == DOCS[n] and abs(hit["score"] - scores[n]) < 0.05

    assert_error(s.post("/documents", {"documents": [{"id": "doc-1", "text": "again"}]}), 409, "already")
    replaced = s.post(
        "/documents", {"documents": [{"id": "doc-1", "text": "again"}], "on_duplicate": "replace"}
    )
    assert replaced.json()["documents"] == 10
    assert_error(
        s.post("/documents", {"documents": [{"id": "a", "text": "x"}, {"text": "y"}]}), 400, "every document"
    )
    assert_error(s.post("/documents", {"documents": [{"text": ""}]}), 400, "documents[0]")
    assert_error(s.post("/documents", {"documents": [{"text": "x", "metadata": [1]}]}), 422, "metadata")
    assert_error(s.post("/documents", {"documents": [{"text": "x"}] * 41}), 400, "limit of 40")
    assert_error(s.post("/search", {"query": "q", "top_k": 0}), 422, "top_k")
    assert_error(s.post("/search", {"query": "q", "top_k": 5000}), 400, "top_k")
    assert_error(s.post("/search", {"q": "missing"}), 422, "query")
    odd = s.post("/search", {"query": QUERIES[0], "top_k": 10, "where": {"n": [1, 3, 5, 7, 9]}}).json()["results"]
    assert sorted(h["id"] for h in odd) == ["doc-3", "doc-5", "doc-7", "doc-9"]  # doc-1 was replaced, no metadata
    assert_error(s.post("/search", {"query": "q", "where": {"n": 1.5}}), 400, "float")
    assert_error(s.post("/search", {"query": "q", "where": [1]}), 422, "where")

    gone = s.client.request("DELETE", "/documents", json={"ids": ["doc-8", "doc-9"]})
    assert gone.json() == {"deleted": 2, "documents": 8}
    assert_error(s.client.request("DELETE", "/documents", json={"ids": ["doc-8"]}), 400, "not in the index")
    assert (
        s.client.request("DELETE", "/documents", json={"ids": ["doc-8"], "missing_ok": True}).json()[
            "deleted"
        ]
        == 0
    )
    ids = {h["id"] for h in s.post("/search", {"query": QUERIES[2], "top_k": 100}).json()["results"]}
    assert ids == {f"doc-{i}" for i in range(8)}

    assert_error(dense_server.post("/search", {"query": "q"}), 404, "--index")
    assert_error(dense_server.post("/documents", {"documents": [{"text": "x"}]}), 404, "--index")


def test_limits_and_host_check(colbert_server):
    big = {"query": "x" * (MAX_BODY + 10), "documents": ["a"]}
    assert_error(colbert_server.post("/rerank", big), 413, "limit")

    def chunks():  # no content-length: the limit is enforced while streaming
        for _ in range(30):
            yield b"x" * 10_000

    streamed = colbert_server.client.post(
        "/rerank", content=chunks(), headers={"content-type": "application/json"}
    )
    assert_error(streamed, 413)
    for host in ("evil.example", "192.168.1.5:8000"):
        assert_error(colbert_server.client.get("/health", headers={"host": host}), 400, "Host")
    assert (
        colbert_server.client.get("/health", headers={"host": f"localhost:{colbert_server.port}"}).status_code
        == 200
    )


# ----------------------------------------------------------------------------------------------------------
# Concurrency
# ----------------------------------------------------------------------------------------------------------


def test_fifty_concurrent_requests(colbert_server, colbert, index_dir):
    s = colbert_server
    queries = QUERIES[:10]
    expected_embed = colbert.encode_query(queries)
    rerank_docs = DOCS[20:30]
    expected_rerank = [colbert.rerank(q, rerank_docs).indices.tolist() for q in queries]

    def call(i: int) -> str:
        with httpx.Client(base_url=s.url, timeout=120) as client:
            kind = i % 5
            q = queries[i % 10]
            if kind == 0:
                data = client.post("/embed", json={"input": q, "input_type": "query"}).json()["data"][0]
                assert np.allclose(data["embedding"], expected_embed[i % 10], atol=1e-4)
            elif kind == 1:
                results = client.post("/rerank", json={"query": q, "documents": rerank_docs}).json()[
                    "results"
                ]
                assert [r["index"] for r in results] == expected_rerank[i % 10]
            elif kind == 2:
                results = client.post("/search", json={"query": q, "top_k": 3}).json()["results"]
                assert len(results) == 3 and all(r["text"] for r in results)
            elif kind == 3:
                r = client.post(
                    "/documents", json={"documents": [{"id": f"c-{i}", "text": DOCS[40 + i % 40]}]}
                )
                assert r.status_code == 200 and r.json()["ids"] == [f"c-{i}"], r.text
            else:
                assert client.get("/health").json()["status"] == "ok"
        return f"{kind}:ok"

    with ThreadPoolExecutor(max_workers=10) as pool:
        answers = list(pool.map(call, range(50)))
    assert len(answers) == 50 and all(a.endswith("ok") for a in answers)
    health = s.client.get("/health").json()
    assert health["status"] == "ok" and s.proc.poll() is None
    found = {h["id"] for h in s.post("/search", {"query": QUERIES[0], "top_k": 1000}).json()["results"]}
    assert {f"c-{i}" for i in range(3, 50, 5)} <= found
    # What the server committed is on disk and intact.
    on_disk = Index.open(index_dir)
    assert on_disk.verify() == [] and len(on_disk) == health["index"]["documents"]


class SlowEncoder:
    """Records each encode call; text "boom" fails the call it is in."""

    def __init__(self):
        self.calls: list[int] = []

    def encode_query(self, texts, batch_size=32):
        return self.encode_document(texts, batch_size)

    def encode_document(self, texts, batch_size=32):
        self.calls.append(len(texts))
        time.sleep(0.05)
        if "boom" in texts:
            raise ValueError("boom")
        return [np.full(2, len(t), dtype=np.float32) for t in texts]


def test_batcher_merges_concurrent_requests_and_isolates_failures():
    enc = SlowEncoder()
    batcher = Batcher(enc, max_texts=64)
    texts = [["a" * (i + 1), "b" * (i + 2)] for i in range(20)]
    try:
        with ThreadPoolExecutor(max_workers=20) as pool:
            results = list(pool.map(lambda t: batcher.encode(t, "document"), texts))
            failing = pool.submit(batcher.encode, ["boom"], "document")
            fine = pool.submit(batcher.encode, ["ok"], "document")
            with pytest.raises(ValueError):
                failing.result()
            assert fine.result()[0][0] == 2
    finally:
        batcher.close()
    for t, r in zip(texts, results, strict=True):
        assert [v[0] for v in r] == [len(x) for x in t]
    assert len(enc.calls) < 20  # requests that waited were decoded together


def test_binds_loopback_by_default(colbert_server):
    listening = json.loads(colbert_server.proc.stdout.readline())
    assert listening["event"] == "listening" and listening["url"].startswith("http://127.0.0.1:")
