"""The server against hostile clients: real ``lfm2edge serve`` processes on 127.0.0.1, httpx and raw sockets.

Each abuse (surrogates in every text field, deep and large metadata, oversized work, slow headers
and bodies, disconnects, many clients, a wrong or missing API key, a damaged index) must get a 4xx
or 5xx JSON answer naming the rule, while the server process lives and a well-behaved client keeps
being served. The bound stated for that client: every request answered 200, p95 latency under
LATENCY_BOUND_S with the tiny model (a behavioural bound, generous by two orders of magnitude; on a
stuck server it fails). Shutdown under load ends with exit status 0, never a signal.

Every test is bounded in requests and time; the long mixes are marked ``slow``.
"""

from __future__ import annotations

import json
import os
import selectors
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest

from lfm2edge.convert.synthetic import load_sample_texts
from lfm2edge.runtime.frontends.server import default_allowed_hosts, is_loopback
from lfm2edge.runtime.storage.index import Index

SAMPLE = load_sample_texts()
DOCS = [d["text"] for d in SAMPLE["documents"]]
QUERIES = [q["text"] for q in SAMPLE["queries"]]
LATENCY_BOUND_S = 5.0
HEADER_TIMEOUT_S = 2.0
BODY_TIMEOUT_S = 2.0
API_KEY = "test-key-0123456789"
LONG = ("the quick brown fox jumps over the lazy dog " * 20)[:600]  # 600 bytes: a full 512-token bound


# ----------------------------------------------------------------------------------------------------------
# A server process and raw HTTP
# ----------------------------------------------------------------------------------------------------------


class ServerProcess:
    """``python -m lfm2edge.cli serve MODEL --port 0 ...``; ready once it prints its listening line."""

    def __init__(self, *args: str, env: dict[str, str] | None = None):
        cmd = [sys.executable, "-m", "lfm2edge.cli", "serve", *args, "--port", "0", "--threads", "1"]
        self.log = tempfile.TemporaryFile(mode="w+")  # a file: the server never blocks on its log
        child_env = {k: v for k, v in os.environ.items() if k != "LFM2EDGE_API_KEY"} | (env or {})
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=self.log, text=True, env=child_env)
        assert self.proc.stdout is not None
        sel = selectors.DefaultSelector()
        sel.register(self.proc.stdout, selectors.EVENT_READ)
        if not sel.select(timeout=60):
            self.proc.kill()
            raise TimeoutError(f"no listening line in 60 s: {self.stderr()}")
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the server exited with {self.proc.wait()}: {self.stderr()}")
        self.url = json.loads(line)["url"]
        self.port = int(self.url.rsplit(":", 1)[1])
        self.headers = {"authorization": f"Bearer {API_KEY}"} if "--api-key" in args else {}
        deadline = time.monotonic() + 60
        while not self._healthy():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the server did not become healthy: {self.stderr()}")
            time.sleep(0.05)

    def _healthy(self) -> bool:
        try:
            return httpx.get(self.url + "/health", timeout=5).status_code == 200
        except httpx.TransportError:
            return False

    def client(self, timeout: float = 60) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=timeout, headers=self.headers)

    def stderr(self) -> str:
        self.log.seek(0)
        return self.log.read()

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self, sig: int = signal.SIGINT, timeout: float = 60) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise


def connect(server: ServerProcess) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=30)
    return sock


def send(sock: socket.socket, method: str, path: str, body: bytes | None = None, **headers: str) -> None:
    lines = [f"{method} {path} HTTP/1.1", "Host: 127.0.0.1"]
    if body is not None:
        lines += ["Content-Type: application/json", f"Content-Length: {len(body)}"]
    lines += [f"{k.replace('_', '-')}: {v}" for k, v in headers.items()]
    sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + (body or b""))


def receive(sock: socket.socket) -> tuple[int, dict[str, str], bytes]:
    """One response (status, headers, body) read from ``sock``; Content-Length bodies only."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError(f"closed after {data!r}")
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (h.partition(":") for h in header_lines)}
    while len(body) < int(headers.get("content-length", 0)):
        chunk = sock.recv(65536)
        if not chunk:
            break
        body += chunk
    return int(status_line.split()[1]), headers, body


def closed_by_peer(sock: socket.socket, within: float) -> bool:
    """Whether the server closes ``sock`` within ``within`` seconds (reading past any answer)."""
    sock.settimeout(within)
    deadline = time.monotonic() + within
    try:
        while time.monotonic() < deadline:
            if not sock.recv(65536):
                return True
    except TimeoutError:
        return False
    except ConnectionError:
        return True
    return False


def error_of(response: httpx.Response, status: int) -> str:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["code"] == status
    return error["message"]


class Monitor:
    """A well-behaved client: one small /embed at a time until stopped; records each status and latency."""

    def __init__(self, server: ServerProcess):
        self.server, self.results = server, []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Monitor:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=120)

    def _run(self) -> None:
        with self.server.client(timeout=30) as c:
            while not self._stop.is_set():
                start = time.monotonic()
                try:
                    status = c.post("/embed", json={"input": QUERIES[0], "input_type": "query"}).status_code
                except httpx.HTTPError as e:
                    status = type(e).__name__
                self.results.append((status, time.monotonic() - start))
                time.sleep(0.02)

    def check(self, at_least: int = 5) -> None:
        statuses = [s for s, _ in self.results]
        assert len(statuses) >= at_least, statuses
        assert all(s == 200 for s in statuses), statuses
        p95 = float(np.percentile([t for _, t in self.results], 95))
        assert p95 < LATENCY_BOUND_S, f"the well-behaved client's p95 was {p95:.2f} s"


# ----------------------------------------------------------------------------------------------------------
# Servers: ColBERT with an index (tight limits), dense with an API key and an index to damage
# ----------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def colbert_server(colbert_gguf: Path, tmp_path_factory) -> Iterator[ServerProcess]:
    index_dir = tmp_path_factory.mktemp("hostile-server") / "idx"
    server = ServerProcess(
        str(colbert_gguf),
        "--index",
        str(index_dir),
        "--create-index",
        "--max-inputs",
        "64",
        "--max-tokens",
        "70000",
        "--max-embed-vectors",
        "4000",
        "--max-body-bytes",
        "4000000",
        "--header-timeout",
        str(HEADER_TIMEOUT_S),
        "--body-timeout",
        str(BODY_TIMEOUT_S),
        "--allowed-host",
        "myapp.local",
    )
    server.index_dir = index_dir  # type: ignore[attr-defined]
    yield server
    assert server.stop() == 0, server.stderr()


@pytest.fixture(scope="module")
def dense_server(embedding_gguf: Path, tmp_path_factory) -> Iterator[ServerProcess]:
    index_dir = tmp_path_factory.mktemp("hostile-dense") / "idx"
    server = ServerProcess(
        str(embedding_gguf), "--index", str(index_dir), "--create-index", "--api-key", API_KEY
    )
    server.index_dir = index_dir  # type: ignore[attr-defined]
    yield server
    assert server.stop() == 0, server.stderr()


# ----------------------------------------------------------------------------------------------------------
# Text: a lone surrogate in any text field is a 400/422 naming the field, on a kept-alive connection
# ----------------------------------------------------------------------------------------------------------

S = "\\ud800"  # as JSON writes it: a lone surrogate once parsed
SURROGATE_CASES = {
    "embed input": ("POST", "/embed", f'{{"input": "a{S}b"}}', "input"),
    "embed input list": ("POST", "/embed", f'{{"input": ["ok", "a{S}"]}}', "input\\[1\\]"),
    "embed query": ("POST", "/embed", '{"input": "\\udfff", "input_type": "query"}', "input"),
    "rerank query": ("POST", "/rerank", f'{{"query": "q{S}", "documents": ["x"]}}', "query"),
    "rerank documents": (
        "POST",
        "/rerank",
        f'{{"query": "q", "documents": ["x", "{S}"]}}',
        "documents\\[1\\]",
    ),
    "rerank document object": (
        "POST",
        "/rerank",
        f'{{"query": "q", "documents": [{{"text": "d{S}"}}]}}',
        "documents\\[0\\]",
    ),
    "rerank model": ("POST", "/rerank", f'{{"query": "q", "documents": ["x"], "model": "m{S}"}}', "model"),
    "search query": ("POST", "/search", f'{{"query": "{S}x"}}', "query"),
    "documents text": ("POST", "/documents", f'{{"documents": [{{"text": "t{S}"}}]}}', "documents\\[0\\]"),
    "documents id": ("POST", "/documents", f'{{"documents": [{{"id": "i{S}", "text": "t"}}]}}', "id"),
    "metadata value": (
        "POST",
        "/documents",
        f'{{"documents": [{{"text": "t", "metadata": {{"k": "v{S}"}}}}]}}',
        "metadata",
    ),
    "metadata key": (
        "POST",
        "/documents",
        f'{{"documents": [{{"text": "t", "metadata": {{"k{S}": 1}}}}]}}',
        "metadata",
    ),
    "metadata nested": (
        "POST",
        "/documents",
        f'{{"documents": [{{"text": "t", "metadata": {{"k": [{{"x": "{S}"}}]}}}}]}}',
        "metadata",
    ),
    "delete ids": ("DELETE", "/documents", f'{{"ids": ["{S}"]}}', "ids\\[0\\]"),
}
DENSE_SURROGATE_CASES = {
    "openai input": ("POST", "/v1/embeddings", f'{{"input": "a{S}"}}', "input"),
    "openai input list": ("POST", "/v1/embeddings", f'{{"input": ["a", "b{S}"]}}', "input\\[1\\]"),
    "openai model": ("POST", "/v1/embeddings", f'{{"input": "a", "model": "m{S}"}}', "model"),
}


def _surrogate_case(server: ServerProcess, method: str, path: str, body: str, field: str) -> None:
    import re

    with connect(server) as sock:
        extra = {"authorization": f"Bearer {API_KEY}"} if server.headers else {}
        send(sock, method, path, body.encode("ascii"), **extra)
        status, _, answer = receive(sock)
        assert status in (400, 422), answer
        message = json.loads(answer)["error"]["message"]
        assert re.search(field, message) and re.search("unicode|surrogate", message, re.I), message
        send(sock, "GET", "/health")  # the same connection still answers
        assert receive(sock)[0] == 200
    assert server.alive()


@pytest.mark.parametrize("case", list(SURROGATE_CASES), ids=list(SURROGATE_CASES))
def test_surrogates_colbert(colbert_server, case):
    _surrogate_case(colbert_server, *SURROGATE_CASES[case])


@pytest.mark.parametrize("case", list(DENSE_SURROGATE_CASES), ids=list(DENSE_SURROGATE_CASES))
def test_surrogates_dense(dense_server, case):
    _surrogate_case(dense_server, *DENSE_SURROGATE_CASES[case])


# ----------------------------------------------------------------------------------------------------------
# Metadata: refused before anything is stored, so no document can break later answers
# ----------------------------------------------------------------------------------------------------------


def _nested(depth: int) -> dict:
    value: dict = {"leaf": 1}
    for _ in range(depth - 1):
        value = {"a": value}
    return value


def test_deep_and_large_metadata(colbert_server):
    with colbert_server.client() as c:
        before = c.get("/health").json()["index"]["documents"]

        def add(metadata, n: int = 1) -> httpx.Response:
            docs = [{"text": f"doc {i}", "metadata": metadata} for i in range(n)]
            return c.post("/documents", json={"documents": docs})

        assert "max_metadata_depth" in error_of(add(_nested(33)), 400)
        assert "max_metadata_depth" in error_of(
            add(_nested(254)), 400
        )  # the depth that used to break /search
        deep_arrays = (
            '{"documents": [{"text": "t", "metadata": {"a": ' + "[" * 100_000 + "]" * 100_000 + "}}]}"
        )
        r = c.post("/documents", content=deep_arrays, headers={"content-type": "application/json"})
        assert "nested too deeply" in error_of(r, 400)
        assert "max_metadata_bytes" in error_of(add({"blob": "x" * 70_000}), 413)
        assert "max_request_metadata_bytes" in error_of(add({"blob": "x" * 60_000}, n=20), 413)
        nan = c.post(
            "/documents",
            content='{"documents": [{"text": "t", "metadata": {"x": NaN}}]}',
            headers={"content-type": "application/json"},
        )
        assert "NaN" in error_of(nan, 400)
        infinity = c.post(
            "/documents",
            content='{"documents": [{"text": "t", "metadata": {"x": [-Infinity]}}]}',
            headers={"content-type": "application/json"},
        )
        assert "NaN or Infinity" in error_of(infinity, 400)
        assert c.get("/health").json()["index"]["documents"] == before  # nothing stored

        # At the limit it is stored, and answers keep working.
        ok = c.post(
            "/documents", json={"documents": [{"id": "deep-32", "text": DOCS[0], "metadata": _nested(32)}]}
        )
        assert ok.status_code == 200, ok.text
        hits = c.post("/search", json={"query": DOCS[0], "top_k": 100})
        assert hits.status_code == 200 and any(h["id"] == "deep-32" for h in hits.json()["results"])
    assert colbert_server.alive()


# ----------------------------------------------------------------------------------------------------------
# Oversized work: each limit answered 400/413 with its name
# ----------------------------------------------------------------------------------------------------------


def test_oversized_work(colbert_server):
    with colbert_server.client() as c:
        assert "limit of 64" in error_of(c.post("/embed", json={"input": ["t"] * 65}), 400)
        assert "limit of 64" in error_of(c.post("/documents", json={"documents": [{"text": "t"}] * 65}), 400)
        assert "limit of 1000" in error_of(
            c.post("/rerank", json={"query": "q", "documents": ["d"] * 1001}), 400
        )
        tokens = c.post("/rerank", json={"query": "q", "documents": [LONG] * 200})
        assert "max_tokens" in error_of(tokens, 413) and "70000" in error_of(tokens, 413)
        vectors = c.post("/embed", json={"input": [LONG] * 30})
        assert "max_embed_vectors" in error_of(vectors, 413)
        assert "max_top_k" in error_of(c.post("/search", json={"query": "q", "top_k": 5000}), 400)
        ids = c.request("DELETE", "/documents", json={"ids": [str(i) for i in range(1025)]})
        assert "max_ids" in error_of(ids, 400)
        big = c.post("/embed", content=b"x" * 4_000_001, headers={"content-type": "application/json"})
        assert "max_body_bytes" in error_of(big, 413)

        def chunks():  # no content-length: refused while streaming
            for _ in range(50):
                yield b"x" * 100_000

        streamed = c.post("/embed", content=chunks(), headers={"content-type": "application/json"})
        assert "max_body_bytes" in error_of(streamed, 413)
        r = c.post("/embed", json={"input": QUERIES[:2], "input_type": "query"})  # still serving
        assert r.status_code == 200
    assert colbert_server.alive()


def test_token_id_floods(dense_server, embedding_encoder):
    """Millions of token ids in a body: every id is checked, only what the model keeps is read back."""
    word = int(embedding_encoder.tokenize("hello")[1])
    n, length = 1_000_000, embedding_encoder.settings.document_length  # about 6 MB of JSON, under 8 MiB
    with dense_server.client() as c:
        flood = c.post("/v1/embeddings", json={"input": [word] * n})
        assert flood.status_code == 200, flood.text
        assert flood.json()["usage"]["prompt_tokens"] == length  # truncated like a long text
        bad_last = c.post("/v1/embeddings", json={"input": [word] * (n - 1) + [10**12]})
        assert f"input[{n - 1}] is token id {10**12}" in error_of(bad_last, 400)
        lists = c.post("/v1/embeddings", json={"input": [[word] * 10_000] * 64})
        assert lists.status_code == 200 and len(lists.json()["data"]) == 64
        assert "input" in error_of(c.post("/v1/embeddings", json={"input": [[[word]]]}), 422)
        assert "input[0][0]" in error_of(c.post("/v1/embeddings", json={"input": [[-(2**80)]]}), 400)
    assert dense_server.alive()


# ----------------------------------------------------------------------------------------------------------
# Connections: slow headers, slow bodies, huge headers, disconnects
# ----------------------------------------------------------------------------------------------------------


def open_half_requests(server: ServerProcess, n: int) -> list[socket.socket]:
    """``n`` connections that start a request and never finish its headers."""
    socks = []
    for _ in range(n):
        s = socket.create_connection(("127.0.0.1", server.port), timeout=10)
        s.sendall(b"POST /embed HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ")
        socks.append(s)
    return socks


def test_slowloris_does_not_deny_service(colbert_server):
    socks = open_half_requests(colbert_server, 300)
    try:
        with Monitor(colbert_server) as monitor:
            time.sleep(1.0)
        monitor.check()
        # The server closed them once their header deadline passed.
        time.sleep(HEADER_TIMEOUT_S)
        assert all(closed_by_peer(s, within=5.0) for s in socks)
    finally:
        for s in socks:
            s.close()
    assert colbert_server.alive()


def test_slow_body_and_huge_headers(colbert_server):
    with connect(colbert_server) as sock:
        sock.sendall(
            b"POST /embed HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            b'Content-Length: 100\r\n\r\n{"input": '
        )
        status, headers, body = receive(sock)
        assert status == 408 and "body_timeout_s" in json.loads(body)["error"]["message"]
        assert closed_by_peer(sock, within=5.0)
    with connect(colbert_server) as sock:
        # Headers are held to h11's bound (16 kB while incomplete), then refused.
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Big: " + b"a" * 100_000)
        assert receive(sock)[0] == 400
    assert colbert_server.alive()


def test_disconnected_client_work_is_dropped(colbert_server):
    with colbert_server.client() as c:
        before = c.get("/health").json()["index"]["documents"]
        # Long enough to take many batches: added within about a second if nobody cancels it.
        docs = [{"id": f"gone-{i}", "text": f"{i} {LONG}"} for i in range(64)]
        for _ in range(2):
            with connect(colbert_server) as sock:
                send(sock, "POST", "/documents", json.dumps({"documents": docs}).encode())
                time.sleep(0.05)
        time.sleep(3.0)
        assert c.get("/health").json()["index"]["documents"] == before
        hits = c.post("/search", json={"query": LONG, "top_k": 1000}).json()["results"]
        assert not any(h["id"].startswith("gone-") for h in hits)
        # A body cut off half-way is no harm either.
        with connect(colbert_server) as sock:
            sock.sendall(b'POST /embed HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 1000\r\n\r\n{"in')
        assert c.get("/health").status_code == 200
    assert colbert_server.alive()


# ----------------------------------------------------------------------------------------------------------
# Fairness: a small request does not wait for a large one; /health never waits
# ----------------------------------------------------------------------------------------------------------


def test_small_request_overtakes_large_one(colbert_server):
    done: dict[str, float] = {}
    large_docs = [f"{i} {LONG}" for i in range(130)]  # about 17 batches of 8 long documents

    def large() -> None:
        with colbert_server.client(timeout=120) as c:
            r = c.post("/rerank", json={"query": QUERIES[0], "documents": large_docs})
            assert r.status_code == 200, r.text
        done["large"] = time.monotonic()

    worker = threading.Thread(target=large)
    worker.start()
    try:
        time.sleep(0.3)
        with colbert_server.client() as c:
            assert c.get("/health").status_code == 200
            done["health"] = time.monotonic()
            r = c.post("/embed", json={"input": QUERIES[1], "input_type": "query"})
            assert r.status_code == 200
            done["small"] = time.monotonic()
    finally:
        worker.join(timeout=120)
    assert done["health"] < done["small"] < done["large"], done


# ----------------------------------------------------------------------------------------------------------
# Many clients at once, with a well-behaved client measured throughout
# ----------------------------------------------------------------------------------------------------------


def _crowd(server: ServerProcess, clients: int) -> list[int]:
    """``clients`` requests at once, each on its own connection: searches, reranks and document embeds."""
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=0)
    with httpx.Client(base_url=server.url, timeout=120, limits=limits) as c:

        def call(i: int) -> int:
            if i % 3 == 0:
                return c.post("/search", json={"query": QUERIES[i % len(QUERIES)], "top_k": 3}).status_code
            if i % 3 == 1:
                return c.post("/rerank", json={"query": QUERIES[0], "documents": DOCS[:8]}).status_code
            return c.post("/embed", json={"input": DOCS[i % len(DOCS)]}).status_code

        with ThreadPoolExecutor(max_workers=clients) as pool:
            return list(pool.map(call, range(clients)))


def test_fifty_clients_and_a_measured_one(colbert_server):
    with Monitor(colbert_server) as monitor:
        statuses = _crowd(colbert_server, 50)
    assert statuses == [200] * 50
    monitor.check()


@pytest.mark.slow
def test_two_hundred_clients_with_slowloris_and_large_work(colbert_server):
    socks = open_half_requests(colbert_server, 200)
    try:
        with Monitor(colbert_server) as monitor:
            with ThreadPoolExecutor(max_workers=2) as pool:
                large = [
                    pool.submit(
                        lambda: (
                            httpx.post(
                                colbert_server.url + "/rerank",
                                json={"query": "q", "documents": [f"{i} {LONG[:200]}" for i in range(300)]},
                                timeout=120,
                            ).status_code
                        )
                    )
                    for _ in range(2)
                ]
                statuses = _crowd(colbert_server, 200)
                assert [f.result() for f in large] == [200, 200]
        assert statuses == [200] * 200
        monitor.check(at_least=10)
    finally:
        for s in socks:
            s.close()
    assert colbert_server.alive()


# ----------------------------------------------------------------------------------------------------------
# Access: Host allow-list, API key, what answers reveal
# ----------------------------------------------------------------------------------------------------------


def test_host_allow_list(colbert_server):
    with colbert_server.client() as c:
        assert c.get("/health", headers={"host": f"myapp.local:{colbert_server.port}"}).status_code == 200
        assert c.get("/health", headers={"host": f"localhost:{colbert_server.port}"}).status_code == 200
        for host in ("evil.example", "127.0.0.2", "192.168.1.5:8000", ""):
            assert "--allowed-host" in error_of(c.get("/health", headers={"host": host}), 400)


def test_api_key(dense_server):
    url = dense_server.url
    assert httpx.get(url + "/health").status_code == 200  # the one public endpoint
    for headers in ({}, {"authorization": "Bearer wrong-key-123"}, {"authorization": f"Basic {API_KEY}"}):
        r = httpx.post(url + "/v1/embeddings", json={"input": "x"}, headers=headers)
        assert "Authorization: Bearer" in error_of(r, 401)
        assert r.headers["www-authenticate"].startswith("Bearer")
    assert httpx.get(url + "/openapi.json").status_code == 401
    with dense_server.client() as c:
        assert c.post("/v1/embeddings", json={"input": "x"}).status_code == 200
        assert c.get("/openapi.json").status_code == 200
        assert c.get("/docs").status_code == 404 and c.get("/redoc").status_code == 404  # no CDN pages


def test_health_shows_no_paths(colbert_server, colbert_gguf):
    health = httpx.get(colbert_server.url + "/health").text
    assert str(colbert_server.index_dir) not in health and str(colbert_gguf.parent) not in health
    assert '"/' not in health


def test_500_carries_no_exception_text(dense_server):
    with dense_server.client() as c:
        assert c.post("/documents", json={"documents": [{"text": DOCS[0]}]}).status_code == 200
        manifest = next(p for p in dense_server.index_dir.iterdir() if p.is_file() and "manifest" in p.name)
        manifest.write_text('{"format": "lfm2edge-index", "generation": "not a number"', encoding="utf-8")
        r = c.post("/search", json={"query": QUERIES[0]})
    assert r.status_code == 500, r.text
    message = r.json()["error"]["message"]
    assert str(dense_server.index_dir.parent) not in r.text and "Traceback" not in r.text
    assert "server log" in message or "index info" in message, message
    assert dense_server.alive()


def test_loopback_and_default_hosts():
    assert all(is_loopback(h) for h in ("127.0.0.1", "127.0.0.2", "127.255.0.9", "::1", "[::1]", "localhost"))
    assert not any(is_loopback(h) for h in ("0.0.0.0", "::", "192.168.1.5", "10.0.0.1", "example.com"))
    assert default_allowed_hosts("127.0.0.2") >= {"127.0.0.2", "localhost", "127.0.0.1"}
    assert "0.0.0.0" not in default_allowed_hosts("0.0.0.0")


@pytest.mark.parametrize("extra", [[], ["--api-key", "short"]], ids=["no key", "short key"])
def test_non_loopback_bind_needs_a_key(colbert_gguf, extra):
    # Refused before anything binds: no traffic ever goes to 0.0.0.0.
    env = {k: v for k, v in os.environ.items() if k != "LFM2EDGE_API_KEY"}
    done = subprocess.run(
        [sys.executable, "-m", "lfm2edge.cli", "serve", str(colbert_gguf), "--host", "0.0.0.0", *extra],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert done.returncode == 2 and len(errors) == 1 and "API key" in errors[0], done.stderr
    assert "Traceback" not in done.stderr and "listening" not in done.stdout


# ----------------------------------------------------------------------------------------------------------
# Shutdown under load: drained or cancelled, then the model freed; exit 0, never a signal
# ----------------------------------------------------------------------------------------------------------


def _shutdown_under_load(gguf: Path, index_dir: Path, sig: int) -> None:
    server = ServerProcess(str(gguf), "--index", str(index_dir), "--create-index", "--shutdown-timeout", "2")
    results: list[object] = [None] * 4
    texts = [f"{i} {LONG[:300]}" for i in range(256)]

    def post(i: int) -> None:
        try:
            if i % 2 == 0:
                body = {"documents": [{"id": f"r{i}-{j}", "text": t} for j, t in enumerate(texts)]}
                results[i] = httpx.post(server.url + "/documents", json=body, timeout=120).status_code
            else:
                body = {"query": QUERIES[0], "documents": [f"{i} {t}" for t in texts]}
                results[i] = httpx.post(server.url + "/rerank", json=body, timeout=120).status_code
        except httpx.TransportError as e:  # the connection closed by the shutdown
            results[i] = type(e).__name__

    workers = [threading.Thread(target=post, args=(i,)) for i in range(4)]
    for w in workers:
        w.start()
    time.sleep(1.0)
    rc = server.stop(sig)
    for w in workers:
        w.join(timeout=120)
    assert rc == 0, f"exit status {rc}: {server.stderr()[-3000:]}"
    assert all(r in (200, 503) or isinstance(r, str) for r in results), (results, server.stderr()[-3000:])
    index = Index.open(index_dir)
    assert index.verify() == []
    for i in (0, 2):  # each write is all or nothing: 200 wrote it, 503 did not, a lost answer either
        stored = sum(f"r{i}-{j}" in index for j in range(len(texts)))
        expected = {200: {len(texts)}, 503: {0}}.get(results[i], {0, len(texts)})
        assert stored in expected, (i, results[i], stored)
    assert len(index) == sum(f"r{i}-0" in index for i in (0, 2)) * len(texts)


def test_sigint_under_load(colbert_gguf, tmp_path):
    _shutdown_under_load(colbert_gguf, tmp_path / "idx", signal.SIGINT)


@pytest.mark.slow
def test_sigterm_under_load(colbert_gguf, tmp_path):
    _shutdown_under_load(colbert_gguf, tmp_path / "idx", signal.SIGTERM)


def _cancelled_at_the_deadline(settle: bool, outcome: object) -> object:
    """What ``_until_done`` answers when uvicorn cancels the request (its shutdown deadline), and then the
    loop's end cancels every task, while the work is in a thread whose outcome (a value, or an exception
    to raise) arrives after both."""
    import asyncio

    from starlette.requests import Request

    from lfm2edge.runtime.frontends.server import _until_done

    async def never_disconnects() -> dict:
        await asyncio.Event().wait()
        return {"type": "http.disconnect"}

    async def main() -> object:
        release = threading.Event()
        cancelled = []

        def work() -> object:
            release.wait(10)
            if isinstance(outcome, Exception):
                raise outcome
            return outcome

        request = Request({"type": "http", "method": "POST", "headers": []}, never_disconnects)
        future = asyncio.get_running_loop().run_in_executor(None, work)
        handler = asyncio.ensure_future(_until_done(request, future, lambda: cancelled.append(1), settle))
        await asyncio.sleep(0.05)
        handler.cancel()  # the deadline: the work is still running
        await asyncio.sleep(0.05)
        for task in asyncio.all_tasks() - {asyncio.current_task()}:
            task.cancel()  # the event loop's end cancels every task left (the write must not be one)
        await asyncio.sleep(0.05)
        release.set()
        try:
            return await handler, cancelled
        except (Exception, asyncio.CancelledError) as e:  # the answer under test
            return e, cancelled

    return asyncio.run(main())


def test_a_write_committing_at_the_deadline_is_answered_with_its_result():
    import asyncio

    from lfm2edge.runtime.frontends.batcher import ServerClosingError, WorkCancelledError

    assert _cancelled_at_the_deadline(True, ["r0"]) == (["r0"], [1])  # written: told so, not "retry"
    answer, cancelled = _cancelled_at_the_deadline(True, WorkCancelledError("cancelled"))
    assert isinstance(answer, ServerClosingError) and cancelled == [1]  # nothing written: 503
    answer, cancelled = _cancelled_at_the_deadline(False, ["vectors"])  # a read: AnswerAtDeadline answers
    assert isinstance(answer, asyncio.CancelledError) and cancelled == [1]


def test_a_request_cancelled_anywhere_at_the_deadline_is_answered_503():
    import asyncio

    from lfm2edge.runtime.frontends.server import AnswerAtDeadline

    async def rendering(scope, receive, send) -> None:  # a handler waiting on a thread, say
        await asyncio.Event().wait()

    async def streaming(scope, receive, send) -> None:  # one whose answer had started
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await asyncio.Event().wait()

    async def cancelled_during(app) -> tuple[list[dict], bool]:
        sent: list[dict] = []

        async def send(message: dict) -> None:
            sent.append(message)

        task = asyncio.ensure_future(AnswerAtDeadline(app)({"type": "http"}, None, send))
        await asyncio.sleep(0.01)
        task.cancel()  # uvicorn's shutdown deadline
        await asyncio.wait({task})
        return sent, task.cancelled()

    sent, cancelled = asyncio.run(cancelled_during(rendering))
    assert not cancelled and sent[0]["status"] == 503
    assert json.loads(sent[1]["body"])["error"]["type"] == "server_unavailable"
    sent, cancelled = asyncio.run(cancelled_during(streaming))
    assert cancelled and [m["type"] for m in sent] == ["http.response.start"]  # nothing to replace


# ----------------------------------------------------------------------------------------------------------
# The batcher itself (in process, the real tiny encoder): fair, cancellable, stops cleanly
# ----------------------------------------------------------------------------------------------------------


def test_batcher_interleaves_cancels_and_stops(colbert_encoder):
    from lfm2edge.runtime.frontends.batcher import Batcher, ServerClosingError, WorkCancelledError

    batcher = Batcher(colbert_encoder, max_texts=64, max_tokens=4096)
    try:
        big = batcher.submit([f"{i} {LONG}" for i in range(200)], "document", [512] * 200)
        small = batcher.submit([QUERIES[0]], "query", [32])
        assert len(small.future.result(timeout=60)) == 1
        assert not big.future.done()  # the small job did not wait for the large one
        batcher.cancel(big)
        with pytest.raises(WorkCancelledError):
            big.future.result(timeout=60)
        waiting = [
            batcher.submit([f"{i} {LONG}" for i in range(64)], "document", [512] * 64) for _ in range(3)
        ]
    finally:
        assert batcher.close(timeout=60)  # the batch in progress finished, the thread stopped
    assert all(isinstance(job.future.exception(timeout=5), ServerClosingError) for job in waiting[1:])
    with pytest.raises(ServerClosingError):
        batcher.submit(["late"], "query")
