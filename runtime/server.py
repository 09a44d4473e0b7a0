"""The local HTTP server a desktop app (Electron, Tauri, Qt) runs beside itself: one model, maybe an index.

    lfm2edge serve model.gguf --index docs.idx --port 8123

| endpoint | body | answer |
|---|---|---|
| ``GET /health`` | | ``{status, model: {name, kind, dim, identity}, index: {documents, ...} or null}`` |
| ``POST /v1/embeddings`` | ``{input, model?, encoding_format?, input_type?}`` | ``{object, data, usage}`` |
| ``POST /embed`` | ``{input, input_type?, encoding_format?}`` | per-token matrices (ColBERT), vectors |
| ``POST /rerank`` | ``{query, documents, top_n?, return_documents?}`` | ``{results: [{index, ...}]}`` |
| ``POST /search`` | ``{query, top_k?}`` | ``{results: [{id, score, text, metadata}]}`` |
| ``POST /documents`` | ``{documents: [{id?, text, metadata?}], on_duplicate?}`` | ``{ids, documents}`` |
| ``DELETE /documents`` | ``{ids, missing_ok?}`` | ``{deleted, documents}`` |

/v1/embeddings is OpenAI's schema (dense models); /rerank is Cohere's and Jina's: each result is
``{index, relevance_score, document?: {text}}``. Errors are JSON ``{"error": {"message", "type",
"code"}}`` with a 4xx status for anything the client sent wrong (413 for bodies over the limit, 409
for an id already indexed, 404 for /search and /documents without an index).

Request threads share the encoder through a micro-batcher: texts that arrive while a decode runs go
into the next decode together. Bound to 127.0.0.1, the server also refuses requests whose Host
header is not a loopback name (DNS-rebinding protection).
"""

from __future__ import annotations

import base64
import json
import queue
import threading
from collections.abc import Sequence
from concurrent.futures import Future
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException

from lfm2edge.runtime.errors import InvalidInputError, Lfm2EdgeError
from lfm2edge.runtime.index import DuplicateIdError, Index, model_identity
from lfm2edge.runtime.maxsim import maxsim
from lfm2edge.runtime.settings import ModelKind

LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1", "[::1]")


@dataclass(frozen=True)
class ServerLimits:
    max_body_bytes: int = 8 << 20
    max_inputs: int = 256  # texts per /v1/embeddings, /embed and /documents call
    max_documents: int = 1000  # candidates per /rerank call
    max_top_k: int = 1000
    max_batch_texts: int = 64  # texts merged into one decode by the micro-batcher


# ----------------------------------------------------------------------------------------------------------
# Request bodies (unknown fields are ignored, as OpenAI and Cohere clients send extras)
# ----------------------------------------------------------------------------------------------------------

Side = Literal["query", "document"]


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")


class EmbeddingsRequest(_Body):
    input: str | list[str]
    model: str | None = None
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = None
    input_type: Side = Field("document", description="LFM2 models encode queries and documents differently")


class EmbedRequest(_Body):
    input: str | list[str]
    input_type: Side = "document"
    encoding_format: Literal["float", "base64"] = "float"


class RerankDocument(_Body):
    text: str


class RerankRequest(_Body):
    query: str
    documents: list[str | RerankDocument]
    top_n: int | None = Field(None, ge=1)
    return_documents: bool = False
    model: str | None = None


class SearchRequest(_Body):
    query: str
    top_k: int = Field(10, ge=1)


class NewDocument(_Body):
    id: str | None = Field(None, min_length=1)
    text: str
    metadata: dict[str, Any] | None = None


class AddRequest(_Body):
    documents: list[NewDocument]
    on_duplicate: Literal["error", "skip", "replace"] = "error"


class DeleteRequest(_Body):
    ids: list[str]
    missing_ok: bool = False


# ----------------------------------------------------------------------------------------------------------
# Micro-batching
# ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Job:
    texts: list[str]
    side: Side
    future: Future


class Batcher:
    """Encodes texts from many threads with few decodes: jobs queued while one decode runs are merged."""

    def __init__(self, encoder, max_texts: int = 64):
        self.encoder = encoder
        self.max_texts = max_texts
        self._queue: queue.Queue[_Job | None] = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="lfm2edge-batcher", daemon=True)
        self._thread.start()

    def encode(self, texts: list[str], side: Side) -> list[np.ndarray]:
        """One float32 array per text: a [dim] vector (dense) or a [tokens, dim] matrix (ColBERT)."""
        job = _Job(list(texts), side, Future())
        self._queue.put(job)
        return job.future.result()

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join(timeout=30)

    def _run(self) -> None:
        while True:
            job = self._queue.get()
            if job is None:
                return
            jobs, n = [job], len(job.texts)
            while n < self.max_texts:
                try:
                    nxt = self._queue.get_nowait()
                except queue.Empty:
                    break
                if nxt is None:
                    self._queue.put(None)  # finish these jobs, then stop
                    break
                jobs.append(nxt)
                n += len(nxt.texts)
            for side in ("query", "document"):
                group = [j for j in jobs if j.side == side]
                if group:
                    self._encode(group)

    def _encode(self, group: list[_Job]) -> None:
        texts = [t for j in group for t in j.texts]
        try:
            method = self.encoder.encode_query if group[0].side == "query" else self.encoder.encode_document
            out = list(method(texts, batch_size=len(texts)))
        except Exception as e:
            if len(group) == 1:
                group[0].future.set_exception(e)
            else:  # one bad request must not fail the others merged with it
                for j in group:
                    self._encode([j])
            return
        start = 0
        for j in group:
            j.future.set_result(out[start : start + len(j.texts)])
            start += len(j.texts)


# ----------------------------------------------------------------------------------------------------------
# Errors and the body limit
# ----------------------------------------------------------------------------------------------------------


def _error(status: int, message: str, kind: str = "invalid_request_error") -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind, "code": status}}, status_code=status)


class Guard:
    """ASGI middleware run before parsing: the Host check and the body size limit, both answered in JSON.

    ``allowed_hosts`` (when bound to loopback): a web page cannot reach the server through a rebound DNS
    name. Bodies over ``max_bytes``, declared or streamed, get 413 without being kept.
    """

    def __init__(self, app, max_bytes: int, allowed_hosts: Sequence[str] | None):
        self.app, self.max_bytes, self.allowed_hosts = app, max_bytes, allowed_hosts

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope["headers"])
        if self.allowed_hosts is not None and _hostname(headers.get(b"host", b"")) not in self.allowed_hosts:
            await _error(
                400, "invalid Host header: this server answers only requests to 127.0.0.1 or localhost"
            )(scope, receive, send)
            return
        too_big = _error(
            413,
            f"request body over the server's limit of {self.max_bytes} bytes; send fewer or shorter texts",
        )
        declared = headers.get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.max_bytes):
            await too_big(scope, receive, send)
            return
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            more = message.get("more_body", False)
            if size > self.max_bytes:
                await too_big(scope, receive, send)
                return
        body, replayed = b"".join(chunks), False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


def _hostname(host: bytes) -> str:
    """The Host header without its port: "127.0.0.1:8000" -> "127.0.0.1", "[::1]:8000" -> "::1"."""
    text = host.decode("latin-1").strip().lower()
    if text.startswith("["):
        return text[1 : text.find("]")] if "]" in text else text
    return text.rsplit(":", 1)[0] if text.count(":") == 1 else text


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        parts = []
        for e in exc.errors()[:5]:
            if e.get("type") == "json_invalid":
                parts.append(f"the body is not valid JSON ({e.get('ctx', {}).get('error', 'parse error')})")
                continue
            where = ".".join(str(x) for x in e.get("loc", ()) if x != "body") or "body"
            parts.append(f"{where}: {e.get('msg')}")
        return _error(422, "; ".join(parts))

    @app.exception_handler(HTTPException)
    async def http_error(_: Request, exc: HTTPException) -> JSONResponse:
        return _error(
            exc.status_code,
            str(exc.detail),
            "not_found" if exc.status_code == 404 else "invalid_request_error",
        )

    @app.exception_handler(Lfm2EdgeError)
    async def ours(_: Request, exc: Lfm2EdgeError) -> JSONResponse:
        if isinstance(exc, DuplicateIdError):
            return _error(409, str(exc), "conflict")
        if isinstance(exc, InvalidInputError):
            return _error(400, str(exc))
        return _error(500, str(exc), "server_error")

    @app.exception_handler(Exception)
    async def unexpected(_: Request, exc: Exception) -> JSONResponse:
        return _error(500, f"internal error: {type(exc).__name__}: {exc}", "server_error")


# ----------------------------------------------------------------------------------------------------------
# The app
# ----------------------------------------------------------------------------------------------------------


def _texts(value: str | list[str], limit: int, field: str = "input") -> list[str]:
    """The texts of ``field``, checked: at least one, at most ``limit``, none blank."""
    texts = [value] if isinstance(value, str) else value
    if not texts:
        raise InvalidInputError(f"{field} is empty: send at least one text")
    if len(texts) > limit:
        raise InvalidInputError(
            f"{len(texts)} texts in {field} is over this server's limit of {limit} per request; split them"
        )
    for i, t in enumerate(texts):
        if not t.strip():
            raise InvalidInputError(
                f"{field} is empty or only whitespace"
                if isinstance(value, str)
                else f"{field}[{i}] is empty or only whitespace"
            )
    return texts


def _vector_payload(v: np.ndarray, encoding_format: str) -> Any:
    if encoding_format == "base64":  # OpenAI's format: little-endian float32 bytes
        return base64.b64encode(np.ascontiguousarray(v, dtype="<f4").tobytes()).decode("ascii")
    return v.tolist()


def create_app(
    encoder, index: Index | None = None, limits: ServerLimits = ServerLimits(), host: str = "127.0.0.1"
) -> FastAPI:
    """The FastAPI app over ``encoder`` (and ``index``, which must belong to it); the caller closes both."""
    batcher = Batcher(encoder, limits.max_batch_texts)
    late = encoder.kind is ModelKind.LATE_INTERACTION
    name = Path(encoder.path).stem
    identity = model_identity(encoder)

    @asynccontextmanager
    async def lifespan(_: FastAPI):
        yield
        batcher.close()

    app = FastAPI(title="lfm2edge", summary="LFM2 retrievers on this machine", lifespan=lifespan)
    app.state.batcher = batcher
    _install_error_handlers(app)
    allowed = ("127.0.0.1", "localhost", "::1") if host in LOOPBACK_HOSTS else None
    app.add_middleware(Guard, max_bytes=limits.max_body_bytes, allowed_hosts=allowed)

    def need_index() -> Index:
        if index is None:
            raise HTTPException(
                404, "this server has no index; start it with `lfm2edge serve MODEL --index DIR`"
            )
        return index

    @app.get("/health")
    def health() -> dict:
        info = None if index is None else {k: v for k, v in index.info().items() if k != "model_path"}
        return {
            "status": "ok",
            "model": {
                "name": name,
                "kind": encoder.kind.value,
                "dim": int(encoder.dim),
                "identity": identity,
            },
            "index": info,
        }

    @app.post("/v1/embeddings")
    def embeddings(req: EmbeddingsRequest) -> dict:
        if late:
            raise InvalidInputError("this is a ColBERT model (one vector per token): use POST /embed")
        if req.dimensions is not None and req.dimensions != encoder.dim:
            raise InvalidInputError(
                f"dimensions={req.dimensions} is not supported; this model gives {encoder.dim}"
            )
        texts = _texts(req.input, limits.max_inputs)
        vectors = batcher.encode(texts, req.input_type)
        tokens = sum(len(encoder.tokenize(t)) for t in texts)
        return {
            "object": "list",
            "data": [
                {"object": "embedding", "index": i, "embedding": _vector_payload(v, req.encoding_format)}
                for i, v in enumerate(vectors)
            ],
            "model": req.model or name,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
        }

    @app.post("/embed")
    def embed(req: EmbedRequest) -> dict:
        texts = _texts(req.input, limits.max_inputs)
        vectors = batcher.encode(texts, req.input_type)
        return {
            "object": "list",
            "model": name,
            "kind": encoder.kind.value,
            "dim": int(encoder.dim),
            "data": [
                {"index": i, "shape": list(v.shape), "embedding": _vector_payload(v, req.encoding_format)}
                for i, v in enumerate(vectors)
            ],
        }

    @app.post("/rerank")
    def rerank(req: RerankRequest) -> dict:
        docs = [d if isinstance(d, str) else d.text for d in req.documents]
        docs = _texts(docs, limits.max_documents, "documents")
        query = _texts(req.query, 1, "query")
        q = batcher.encode(query, "query")[0]
        vectors = batcher.encode(docs, "document")
        scores = maxsim(q, vectors) if late else encoder.similarity(q, np.stack(vectors))
        order = np.argsort(-scores, kind="stable")[: req.top_n]
        results = []
        for i in order:
            r: dict[str, Any] = {"index": int(i), "relevance_score": float(scores[i])}
            if req.return_documents:
                r["document"] = {"text": docs[i]}
            results.append(r)
        return {"model": req.model or name, "results": results}

    @app.post("/search")
    def search(req: SearchRequest) -> dict:
        idx = need_index()
        if req.top_k > limits.max_top_k:
            raise InvalidInputError(f"top_k={req.top_k} is over this server's limit of {limits.max_top_k}")
        q = batcher.encode(_texts(req.query, 1, "query"), "query")[0]
        hits = idx.search_vectors([q], req.top_k)[0]
        return {
            "results": [{"id": h.id, "score": h.score, "text": h.text, "metadata": h.metadata} for h in hits],
            "documents": len(idx),
        }

    @app.post("/documents")
    def add_documents(req: AddRequest) -> dict:
        idx = need_index()
        texts = _texts([d.text for d in req.documents], limits.max_inputs, "documents")
        given = [d.id for d in req.documents if d.id is not None]
        if given and len(given) != len(texts):
            raise InvalidInputError("give every document an id, or none (the index then numbers them)")
        ids = idx.add(
            texts,
            ids=given or None,
            metadata=[d.metadata for d in req.documents],
            on_duplicate=req.on_duplicate,
        )
        return {"ids": ids, "documents": len(idx)}

    @app.delete("/documents")
    def delete_documents(req: DeleteRequest) -> dict:
        idx = need_index()
        if len(req.ids) > limits.max_inputs * 4:
            raise InvalidInputError(
                f"{len(req.ids)} ids is over this server's limit of {limits.max_inputs * 4}"
            )
        deleted = idx.delete(req.ids, missing_ok=req.missing_ok)
        return {"deleted": deleted, "documents": len(idx)}

    return app


def serve(
    model: str | Path,
    index_path: str | Path | None = None,
    host: str = "127.0.0.1",
    port: int = 8000,
    n_threads: int | None = None,
    limits: ServerLimits = ServerLimits(),
    create_index: bool = False,
    log_level: str = "warning",
) -> None:
    """Load ``model`` (and the index), serve until interrupted, then close them."""
    import uvicorn

    from lfm2edge.runtime.encoders import load

    encoder = load(model, n_threads=n_threads)
    try:
        index = None
        if index_path is not None:
            index = (
                Index.open_or_create(index_path, encoder) if create_index else Index.open(index_path, encoder)
            )
        app = create_app(encoder, index, limits, host)
        print(
            json.dumps({"event": "listening", "url": f"http://{host}:{port}", "model": str(model)}),
            flush=True,
        )
        uvicorn.run(
            app, host=host, port=port, log_level=log_level, limit_concurrency=256, timeout_graceful_shutdown=5
        )
    finally:
        encoder.close()
