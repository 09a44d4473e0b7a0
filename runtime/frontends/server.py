"""The local HTTP server a desktop app (Electron, Tauri, Qt) runs beside itself: one model, maybe an index.

    lfm2edge serve model.gguf --index docs.idx --port 8123

| endpoint | body | answer |
|---|---|---|
| ``GET /health`` | | ``{status, model: {name, kind, dim, identity}, index: {documents, ...} or null}`` |
| ``POST /v1/embeddings`` | ``{input, model?, encoding_format?, input_type?}`` | ``{object, data, usage}`` |
| ``POST /embed`` | ``{input, input_type?, encoding_format?}`` | per-token matrices (ColBERT), vectors |
| ``POST /rerank``, ``/v1/rerank``, ``/v2/rerank`` | ``{query, documents, top_n?}`` | ``{id, results, ...}`` |
| ``POST /search`` | ``{query, top_k?}`` | ``{results: [{id, score, text, metadata}]}`` |
| ``POST /documents`` | ``{documents: [{id?, text, metadata?}], on_duplicate?}`` | ``{ids, documents}`` |
| ``DELETE /documents`` | ``{ids, missing_ok?}`` | ``{deleted, documents}`` |

/v1/embeddings is OpenAI's schema (dense models). ``input`` is a text, texts, or token ids
(``[int]`` for one text, ``[[int]]`` for several): ids of this model's vocabulary, read back as the
text they spell and encoded exactly as that text (a leading BOS is dropped; ids outside the
vocabulary and unused placeholder rows are a 400 naming the position). OpenAI clients send no
``input_type``, so they get the document side (``extra_body={"input_type": "query"}`` for queries).
``usage.prompt_tokens`` counts the tokens decoded: BOS, prompt and text, truncated.

The three rerank paths are one endpoint, answering Cohere's v1 and v2 schemas and Jina's: each
result is ``{index, relevance_score, score, document?: {text}}``; ``relevance_score`` is the raw
score mapped into [0, 1] (``relevance_scores``: ColBERT's MaxSim divided by the query's vectors, or
the cosine, as (x + 1) / 2), ``score`` the raw MaxSim or cosine that /search reports. ``id`` is a
fresh UUID, ``meta`` is ``{api_version: {version}, billed_units: {search_units}}`` (one unit per 100
documents) and ``usage.total_tokens`` the tokens decoded for the query and documents.

Errors are JSON ``{"error": {"message", "type", "code"}}``: 400 or 422 for input the client sent
wrong, 401 without the API key, 404 for /search and /documents without an index, 408 for a body
that does not arrive in time, 409 for an id already indexed, 413 for work over a limit, 503 while
busy or shutting down. Every limit (``ServerLimits``) is named in its error. A 500 says only that
the server log has the details.

Hardening (each part says why where it is):
- Work: the micro-batcher (runtime/frontends/batcher.py) is the only thread that calls the encoder. It fills
  each decode round-robin from the waiting requests, so a small request waits behind at most one
  batch of a large one, and it drops the queued texts of a client that disconnected.
- Shutdown (``serve``): on SIGINT or SIGTERM uvicorn stops accepting, lets requests finish for
  ``shutdown_timeout_s``, then cancels them; the batcher fails what still waits, finishes the batch
  in progress and stops; only then is the model freed. A write cancelled there answers 503 only if
  it wrote nothing; one already committing is answered with its result.
- Connections (runtime/frontends/http_protocol.py): request headers must arrive within ``header_timeout_s``
  and bodies within ``body_timeout_s``; idle connections never lock out a client with work.
- Access: bound to loopback (127.0.0.0/8, ::1) it answers only Host names on its allow-list
  (DNS-rebinding protection); bound to anything else it also needs an API key
  (``Authorization: Bearer KEY``) on every endpoint but /health.
"""

from __future__ import annotations

import asyncio
import base64
import functools
import ipaddress
import json
import logging
import math
import os
import secrets
import signal
import socket
import sys
import threading
import uuid
from collections.abc import Awaitable, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar

import numpy as np
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field, StrictInt
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from lfm2edge.runtime.core.errors import EncoderClosedError, InvalidInputError, Lfm2EdgeError
from lfm2edge.runtime.core.maxsim import maxsim
from lfm2edge.runtime.core.settings import ModelKind
from lfm2edge.runtime.core.text import check_text
from lfm2edge.runtime.core.vocabulary import Vocabulary
from lfm2edge.runtime.frontends.batcher import (
    BatchedEncoder,
    Batcher,
    ServerClosingError,
    Side,
    WorkCancelledError,
    WorkScope,
)
from lfm2edge.runtime.storage.filters import check_where
from lfm2edge.runtime.storage.index import DuplicateIdError, Index, IndexCorruptError, model_identity
from lfm2edge.runtime.storage.qdrant_engines import EngineError

__all__ = ["Batcher", "ServerLimits", "create_app", "is_loopback", "relevance_scores", "serve"]

log = logging.getLogger("lfm2edge.server")
T = TypeVar("T")
API_KEY_ENV = "LFM2EDGE_API_KEY"
# Exit status of serve() when a decode was still running after the shutdown deadline: the process
# ends without freeing the model rather than free it under the decode.
EXIT_UNCLEAN_SHUTDOWN = 70
# Tokens a text may add to its UTF-8 bytes: BOS, the marker or prompt.
TEXT_TOKEN_OVERHEAD = 8
# Documents per Cohere search unit (meta.billed_units.search_units).
SEARCH_UNIT_DOCUMENTS = 100


@dataclass(frozen=True)
class ServerLimits:
    """What one client may ask of the server; each is named (by this field name) in its error."""

    max_body_bytes: int = 8 << 20
    max_inputs: int = 256  # texts per /v1/embeddings, /embed and /documents call
    max_documents: int = 1000  # candidates per /rerank call
    max_top_k: int = 1000
    max_ids: int = 1024  # ids per DELETE /documents
    # Tokens per request, counted without the tokenizer as each text's UTF-8 bytes plus a few, at most
    # the model's truncation length (a ColBERT query: its expanded length): an upper bound of the work.
    max_tokens: int = 131_072
    max_embed_vectors: int = 16_384  # vectors per /embed answer (ColBERT: one per token, each dim floats)
    max_metadata_bytes: int = 65_536  # one document's metadata, as JSON
    max_metadata_depth: int = 32  # nesting of one document's metadata (a flat object is 1)
    max_request_metadata_bytes: int = 1 << 20  # all metadata of one /documents call
    max_in_flight: int = 512  # requests handled at once; more get 503
    max_connections: int = 1000  # open connections; past it, the oldest idle one is closed
    max_batch_texts: int = 64  # texts merged into one decode by the micro-batcher
    max_batch_tokens: int = 4096  # about this many tokens per decode (the same count as max_tokens)
    header_timeout_s: float = 10.0  # to deliver complete request headers
    body_timeout_s: float = 30.0  # to deliver the whole body once the headers are in
    keep_alive_s: float = 5.0  # an idle keep-alive connection is closed after this
    shutdown_timeout_s: float = 10.0  # for requests to finish after SIGINT/SIGTERM; then they are cancelled


class TooMuchWorkError(InvalidInputError):
    """A request over a size limit of the server (answered 413)."""


class ClientGone(Exception):
    """The client disconnected before its answer was ready."""


# ----------------------------------------------------------------------------------------------------------
# Request bodies (unknown fields are ignored, as OpenAI and Cohere clients send extras)
# ----------------------------------------------------------------------------------------------------------


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")


class EmbeddingsRequest(_Body):
    # OpenAI's four forms: a text, texts, one text's token ids, token ids per text (StrictInt: "7" and
    # true are not ids).
    input: str | list[str] | list[StrictInt] | list[list[StrictInt]]
    model: str | None = None
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = None
    # OpenAI clients never send it, so they get the document side; extra_body={"input_type": "query"}.
    input_type: Side = Field("document", description="LFM2 models encode queries and documents differently")


class EmbedRequest(_Body):
    input: str | list[str]
    input_type: Side = "document"
    encoding_format: Literal["float", "base64"] = "float"


class RerankDocument(_Body):
    text: str


class RerankRequest(_Body):
    """Cohere's v1 and v2 and Jina's rerank body; their other fields (rank_fields, max_chunks_per_doc,
    max_tokens_per_doc) are ignored: documents are truncated at the model's document length."""

    query: str
    documents: list[str | RerankDocument]
    top_n: int | None = Field(None, ge=1)
    return_documents: bool = False
    model: str | None = None


class SearchRequest(_Body):
    query: str
    top_k: int = Field(10, ge=1)
    where: dict[str, Any] | None = None  # metadata filter, as Index.search's (storage/filters.py)


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
# Input checks: all before any work is queued or anything stored
# ----------------------------------------------------------------------------------------------------------


def _check_count(value: list, limit: int, field: str) -> None:
    if not value:
        raise InvalidInputError(f"{field} is empty: send at least one text")
    if len(value) > limit:
        raise InvalidInputError(
            f"{len(value)} texts in {field} is over this server's limit of {limit} per request; split them"
        )


def _texts(value: str | list[str], limit: int, field: str = "input") -> list[str]:
    """The texts of ``field``, checked: at least one, at most ``limit``, each valid Unicode and not blank."""
    if isinstance(value, str):
        return [check_text(value, field)]
    _check_count(value, limit, field)
    return [check_text(t, f"{field}[{i}]") for i, t in enumerate(value)]


def _embedding_texts(
    value: str | list[str] | list[int] | list[list[int]], limit: int, vocabulary: Vocabulary, length: int
) -> list[str]:
    """The texts of an OpenAI ``input``: texts as sent, token ids as the text they spell in this model's
    vocabulary (runtime/core/vocabulary.py), so either form is then encoded the same way.

    Of each id list only the first ``2 * length`` ids are read back (all are checked): the model keeps
    ``length`` tokens, and the margin keeps the re-tokenized text's first ``length`` tokens exact.
    """
    keep = 2 * length
    if isinstance(value, str) or not value or isinstance(value[0], str):
        return _texts(value, limit)
    if isinstance(value[0], int):  # one text's ids
        return _texts(vocabulary.text(value, "input", keep), 1)
    _check_count(value, limit, "input")
    return _texts([vocabulary.text(ids, f"input[{i}]", keep) for i, ids in enumerate(value)], limit)


def _check_string(value: str, where: str) -> str:
    """An id or name the server stores or echoes: valid Unicode (it must go back out as UTF-8)."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        raise InvalidInputError(
            f"{where} is not valid Unicode (a lone surrogate at character {e.start}); remove it"
        ) from None
    return value


def _check_metadata(meta: dict, where: str, limits: ServerLimits) -> int:
    """The JSON size of one document's metadata, once its depth, content and size are within the limits."""
    stack: list[tuple[Any, int]] = [(meta, 1)]
    while stack:  # iterative: a deep value must not exhaust the stack of the check itself
        value, depth = stack.pop()
        if depth > limits.max_metadata_depth:
            raise InvalidInputError(
                f"{where} is nested more than {limits.max_metadata_depth} levels deep, over this server's "
                "limit (max_metadata_depth); flatten it"
            )
        children = value.values() if isinstance(value, dict) else value if isinstance(value, list) else ()
        stack.extend((c, depth + 1) for c in children if isinstance(c, (dict, list)))
    try:
        size = len(json.dumps(meta, ensure_ascii=False, allow_nan=False).encode("utf-8"))
    except UnicodeEncodeError:
        raise InvalidInputError(
            f"{where} holds text that is not valid Unicode (a lone surrogate); remove it"
        ) from None
    except ValueError:
        raise InvalidInputError(
            f"{where} holds NaN or Infinity, which JSON cannot carry; use null or a string"
        ) from None
    if size > limits.max_metadata_bytes:
        raise TooMuchWorkError(
            f"{where} is {size} bytes as JSON, over this server's limit of {limits.max_metadata_bytes} "
            "(max_metadata_bytes); keep large data outside the index and store a reference"
        )
    return size


class Costs:
    """The token bound of texts (what max_tokens, max_embed_vectors and the batches count), from the model's
    settings only: each text's UTF-8 bytes plus a few, at most what the model keeps of it."""

    def __init__(self, encoder):
        s = encoder.settings
        self.query_length, self.document_length = int(s.query_length), int(s.document_length)
        self.expanded = getattr(encoder, "query_expansion", "none") != "none"

    def __call__(self, texts: Sequence[str], side: Side) -> list[int]:
        if side == "query" and self.expanded:
            return [self.query_length] * len(texts)  # padded to it
        cap = self.query_length if side == "query" else self.document_length
        return [min(len(t.encode("utf-8")) + TEXT_TOKEN_OVERHEAD, cap) for t in texts]


def _check_tokens(total: int, limits: ServerLimits, what: str) -> None:
    if total > limits.max_tokens:
        raise TooMuchWorkError(
            f"{what} may hold up to {total} tokens (counted as UTF-8 bytes, at most the model's length per "
            f"text), over this server's limit of {limits.max_tokens} per request (max_tokens); "
            "send fewer or shorter texts"
        )


# ----------------------------------------------------------------------------------------------------------
# Responses and errors: JSON that always encodes; 500s without exception text
# ----------------------------------------------------------------------------------------------------------


def _json_bytes(content: Any) -> bytes:
    # A lone surrogate cannot be UTF-8: written as its JSON escape rather than failing the response.
    text = json.dumps(content, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
    return text.encode("utf-8", "backslashreplace")


class SafeJSONResponse(JSONResponse):
    def render(self, content: Any) -> bytes:
        return _json_bytes(content)


def _error(
    status: int, message: str, kind: str = "invalid_request_error", headers: dict[str, str] | None = None
) -> SafeJSONResponse:
    return SafeJSONResponse(
        {"error": {"message": message, "type": kind, "code": status}}, status_code=status, headers=headers
    )


def _shutting_down() -> SafeJSONResponse:
    return _error(
        503,
        "the server is shutting down; send the request again once it is back",
        "server_unavailable",
        {"retry-after": "5"},
    )


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
        message = str(exc.detail)
        if isinstance(exc.__cause__, RecursionError):
            message = "the body is nested too deeply to parse; send flatter JSON"
        elif exc.__cause__ is not None and exc.status_code == 400:  # FastAPI's "error parsing the body"
            message = f"the body could not be parsed as JSON ({type(exc.__cause__).__name__}); check it"
        kind = "not_found" if exc.status_code == 404 else "invalid_request_error"
        return _error(exc.status_code, message, kind)

    @app.exception_handler(Lfm2EdgeError)
    async def ours(request: Request, exc: Lfm2EdgeError) -> JSONResponse:
        if isinstance(exc, DuplicateIdError):
            return _error(409, str(exc), "conflict")
        if isinstance(exc, TooMuchWorkError):
            return _error(413, str(exc))
        if isinstance(exc, InvalidInputError):
            return _error(400, str(exc))
        if isinstance(exc, (ServerClosingError, EncoderClosedError)):
            return _shutting_down()
        if isinstance(exc, WorkCancelledError):
            return _error(499, str(exc), "client_closed_request")
        log.error("%s %s failed", request.method, request.url.path, exc_info=exc)
        if isinstance(exc, IndexCorruptError):
            return _error(500, "the index is damaged; run `lfm2edge index info DIR --verify`", "server_error")
        if isinstance(exc, EngineError):  # Qdrant down or refusing: not this request's fault
            return _error(502, "the Qdrant engine failed; the server log has the details", "bad_gateway")
        return _error(
            500, f"internal error ({type(exc).__name__}); the server log has the details", "server_error"
        )

    @app.exception_handler(ClientGone)
    async def gone(_: Request, exc: ClientGone) -> JSONResponse:
        return _error(499, "the client closed the request", "client_closed_request")

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.error("%s %s failed", request.method, request.url.path, exc_info=exc)
        return _error(
            500, f"internal error ({type(exc).__name__}); the server log has the details", "server_error"
        )


# ----------------------------------------------------------------------------------------------------------
# Before the app: Host allow-list, API key, requests in flight, the body's size and deadline
# ----------------------------------------------------------------------------------------------------------


def is_loopback(host: str) -> bool:
    """127.0.0.0/8, ::1 or localhost: only this machine can connect."""
    if host.strip().lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def default_allowed_hosts(host: str) -> frozenset[str]:
    """The Host names a client on this machine uses, plus the bound address (and this machine's name for
    a wildcard bind); clients that use another name need ``--allowed-host``."""
    names = {"localhost", "127.0.0.1", "::1", host.strip("[]").lower()}
    if host in ("0.0.0.0", "::", ""):
        hostname = socket.gethostname().lower()
        names |= {hostname, f"{hostname}.local"}
    return frozenset(n for n in names if n and n not in ("0.0.0.0", "::"))


class AnswerAtDeadline:
    """ASGI middleware: a request still running at the shutdown deadline is cancelled by uvicorn wherever
    it waits (a decode, a write, rendering the answer); it is answered 503, shutting down, instead of
    uvicorn's bare 500, unless its answer had started."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def watched_send(message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, watched_send)
        except asyncio.CancelledError:
            if started:
                raise
            asyncio.current_task().uncancel()
            await _shutting_down()(scope, receive, send)


def _hostname(host: bytes) -> str:
    """The Host header without its port: "127.0.0.1:8000" -> "127.0.0.1", "[::1]:8000" -> "::1"."""
    text = host.decode("latin-1").strip().lower()
    if text.startswith("["):
        return text[1 : text.find("]")] if "]" in text else text
    return text.rsplit(":", 1)[0] if text.count(":") == 1 else text


class Guard:
    """ASGI middleware run before anything is parsed, each refusal a JSON error naming its rule or limit:

    - the Host header must be on ``allowed_hosts`` (None: no check), so a web page cannot reach the
      server through a rebound DNS name;
    - with ``api_key``, every path but /health needs ``Authorization: Bearer <key>``;
    - at most ``max_in_flight`` requests at once (not counting /health, which always answers);
    - bodies over ``max_body_bytes`` (declared or streamed) get 413, bodies not complete within
      ``body_timeout_s`` 408; both close the connection.
    """

    def __init__(self, app, limits: ServerLimits, allowed_hosts: frozenset[str] | None, api_key: str | None):
        self.app, self.limits, self.allowed_hosts = app, limits, allowed_hosts
        self.api_key = api_key.encode("utf-8") if api_key is not None else None
        self.in_flight = 0

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        refusal = self._refusal(scope)
        if refusal is not None:
            await refusal(scope, receive, send)
            return
        counted = scope["path"] != "/health"
        self.in_flight += counted
        try:
            body = await self._body(scope, receive, send)
            if body is None:
                return
            replayed = False

            async def replay():
                nonlocal replayed
                if not replayed:
                    replayed = True
                    return {"type": "http.request", "body": body, "more_body": False}
                return await receive()

            await self.app(scope, replay, send)
        finally:
            self.in_flight -= counted

    def _refusal(self, scope) -> Response | None:
        headers = dict(scope["headers"])
        host = _hostname(headers.get(b"host", b""))
        if self.allowed_hosts is not None and host not in self.allowed_hosts:
            return _error(
                400,
                f"invalid Host header {host[:100]!r}: this server answers only to "
                f"{', '.join(sorted(self.allowed_hosts))}; start it with --allowed-host NAME to add one",
            )
        if self.api_key is not None and scope["path"] != "/health":
            given = headers.get(b"authorization", b"")
            scheme, _, token = given.partition(b" ")
            if scheme.lower() != b"bearer" or not secrets.compare_digest(token.strip(), self.api_key):
                return _error(
                    401,
                    "missing or wrong API key: send `Authorization: Bearer <key>` with the key the "
                    f"server was started with (--api-key or {API_KEY_ENV})",
                    "authentication_error",
                    {"www-authenticate": 'Bearer realm="lfm2edge"'},
                )
        if scope["path"] != "/health" and self.in_flight >= self.limits.max_in_flight:
            return _error(
                503,
                f"the server is busy: {self.in_flight} requests in progress, its limit is "
                f"{self.limits.max_in_flight} (max_in_flight); retry shortly",
                "server_busy",
                {"retry-after": "1"},
            )
        return None

    async def _body(self, scope, receive, send) -> bytes | None:
        """The whole body, or None once it was refused (answered) or the client went away."""
        limit, close = self.limits.max_body_bytes, {"connection": "close"}
        too_big = _error(
            413,
            f"request body over the server's limit of {limit} bytes (max_body_bytes); "
            "send fewer or shorter texts",
            headers=close,
        )
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > limit):
            await too_big(scope, receive, send)
            return None
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.limits.body_timeout_s
        chunks, size, more = [], 0, True
        while more:
            try:
                message = await asyncio.wait_for(receive(), max(0.0, deadline - loop.time()))
            except TimeoutError:
                await _error(
                    408,
                    f"the request body did not arrive within {self.limits.body_timeout_s:g} s "
                    "(body_timeout_s); send it in one go",
                    headers=close,
                )(scope, receive, send)
                return None
            if message["type"] == "http.disconnect":
                return None
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            more = message.get("more_body", False)
            if size > limit:
                await too_big(scope, receive, send)
                return None
        return b"".join(chunks)


# ----------------------------------------------------------------------------------------------------------
# Waiting for work while watching the client
# ----------------------------------------------------------------------------------------------------------


async def _disconnected(request: Request) -> None:
    """Returns when the client has gone (the body was read already, so only a disconnect can arrive)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def _discard_outcome(task: asyncio.Future) -> None:
    if not task.cancelled():
        task.exception()


async def _until_done(
    request: Request, work: Awaitable[T], on_gone: Callable[[], None], settle: bool = False
) -> T:
    """``work``'s result. If the client disconnects first, ``on_gone()`` cancels what it queued and
    ClientGone is raised; if uvicorn cancels the request (the shutdown deadline), so is what it queued,
    and the cancel goes on to AnswerAtDeadline (503).

    ``settle`` (writes): at the shutdown deadline, ``on_gone()`` fails the encodes still waiting and the
    answer waits for the write's own outcome, so a 503 always means nothing was written. A write
    already past its encodes commits, and its client is told so instead of being told to retry.
    """
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        watcher.cancel()
        if not settle:
            _abandon(task, on_gone)
            raise
        on_gone()
        while not task.done():  # the loop's own end cancels again: the write still decides the answer
            asyncio.current_task().uncancel()
            try:
                await asyncio.wait({task})
            except asyncio.CancelledError:
                pass
        try:
            return task.result()
        except (WorkCancelledError, ServerClosingError):
            raise ServerClosingError("the server is shutting down") from None
    watcher.cancel()
    if not task.done():
        _abandon(task, on_gone)
        raise ClientGone()
    return task.result()


def _abandon(task: asyncio.Future, on_gone: Callable[[], None]) -> None:
    """Cancel what ``task`` queued and drop its outcome: no one waits for it any more."""
    if not task.done():
        on_gone()
        task.add_done_callback(_discard_outcome)


def relevance_scores(scores: np.ndarray, query_vectors: int | None) -> np.ndarray:
    """Cohere's ``relevance_score`` in [0, 1] from the raw scores, in the same order.

    A dense score is a cosine; a ColBERT score (MaxSim) is a sum of one cosine per query vector, so
    divided by ``query_vectors`` it is their mean. Either lies in [-1, 1] and maps linearly to
    (x + 1) / 2: 0.5 is orthogonal, 1 identical. Comparable across queries, not a probability.
    """
    mean = scores / query_vectors if query_vectors else scores
    return np.clip((mean.astype(np.float64) + 1.0) / 2.0, 0.0, 1.0)  # clip: unit rows round past 1


def _vector_payload(v: np.ndarray, encoding_format: str) -> Any:
    if encoding_format == "base64":  # OpenAI's format: little-endian float32 bytes
        return base64.b64encode(np.ascontiguousarray(v, dtype="<f4").tobytes()).decode("ascii")
    return v.tolist()


async def _render(build: Callable[[], Any]) -> Response:
    """Build and encode a large answer in a worker thread: the event loop keeps answering others."""
    body = await run_in_threadpool(lambda: _json_bytes(build()))
    return Response(body, media_type="application/json")


# ----------------------------------------------------------------------------------------------------------
# The app
# ----------------------------------------------------------------------------------------------------------


def create_app(
    encoder,
    index: Index | None = None,
    limits: ServerLimits = ServerLimits(),
    host: str = "127.0.0.1",
    api_key: str | None = None,
    allowed_hosts: Sequence[str] = (),
) -> FastAPI:
    """The FastAPI app over ``encoder`` (and ``index``, which must belong to it).

    While the app lives, only its batcher thread calls the encoder, and the index encodes through it.
    To stop: ``app.state.stop_encoding(timeout)`` (also run at the app's shutdown) fails queued work and
    returns True once the batcher has stopped; only then may the caller close the encoder (and index).
    ``allowed_hosts``: Host names answered besides ``default_allowed_hosts(host)`` ("*": any).
    """
    costs = Costs(encoder)
    batcher = Batcher(encoder, limits.max_batch_texts, limits.max_batch_tokens)
    late = encoder.kind is ModelKind.LATE_INTERACTION
    name = Path(encoder.path).stem
    identity = model_identity(encoder)
    dim = int(encoder.dim)
    if index is not None:
        index.encoder = BatchedEncoder(encoder, batcher, costs)
    hosts = default_allowed_hosts(host) | {h.strip("[]").lower() for h in allowed_hosts}

    @functools.cache
    def vocabulary() -> Vocabulary:  # read back token-id input; built on the first such request
        return Vocabulary.of(encoder.model_file.header)

    def stop_encoding(timeout: float | None = limits.shutdown_timeout_s) -> bool:
        return batcher.close(timeout)

    @asynccontextmanager
    async def lifespan(_: FastAPI):
        yield
        await asyncio.to_thread(stop_encoding)

    # No /docs or /redoc: their pages load scripts from a CDN. The schema stays at /openapi.json.
    app = FastAPI(
        title="lfm2edge",
        summary="LFM2 retrievers on this machine",
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,
        default_response_class=SafeJSONResponse,
    )
    app.state.batcher = batcher
    app.state.stop_encoding = stop_encoding
    _install_error_handlers(app)
    app.add_middleware(Guard, limits=limits, allowed_hosts=None if "*" in hosts else hosts, api_key=api_key)
    app.add_middleware(AnswerAtDeadline)  # outside Guard: it sees the cancel wherever it lands

    def need_index() -> Index:
        if index is None:
            raise HTTPException(
                404, "this server has no index; start it with `lfm2edge serve MODEL --index DIR`"
            )
        return index

    async def encode(request: Request, texts: list[str], side: Side, count_tokens: bool = False):
        job = batcher.submit(texts, side, costs(texts, side), count_tokens)
        vectors = await _until_done(request, asyncio.wrap_future(job.future), lambda: batcher.cancel(job))
        return vectors, job.tokens

    async def in_thread(request: Request, fn: Callable[..., T], *args, **kwargs) -> T:
        """``fn`` (a write) in a worker thread; a disconnect cancels the batcher work it started.

        A future of the loop's executor, not a task: the loop's end cancels every task, and a task over the
        thread would lose the write's outcome while the thread still commits."""
        scope = WorkScope(batcher)
        work = asyncio.get_running_loop().run_in_executor(None, functools.partial(scope.run, fn, *args, **kwargs))
        return await _until_done(request, work, scope.cancel, settle=True)

    @app.get("/health")
    async def health() -> dict:
        # On the event loop, never behind the encoder or the thread pool; no local paths.
        info = None
        if index is not None:
            info = {k: v for k, v in index.info().items() if "path" not in k}
        return {
            "status": "ok",
            "model": {"name": name, "kind": encoder.kind.value, "dim": dim, "identity": identity},
            "index": info,
        }

    @app.post("/v1/embeddings")
    async def embeddings(req: EmbeddingsRequest, request: Request) -> Response:
        if late:
            raise InvalidInputError("this is a ColBERT model (one vector per token): use POST /embed")
        if req.dimensions is not None and req.dimensions != dim:
            raise InvalidInputError(f"dimensions={req.dimensions} is not supported; this model gives {dim}")
        model = _check_string(req.model, "model") if req.model else name
        s = encoder.settings
        length = s.query_length if req.input_type == "query" else s.document_length
        texts = _embedding_texts(req.input, limits.max_inputs, vocabulary(), length)
        _check_tokens(sum(costs(texts, req.input_type)), limits, "input")
        vectors, tokens = await encode(request, texts, req.input_type, count_tokens=True)
        return await _render(
            lambda: {
                "object": "list",
                "data": [
                    {"object": "embedding", "index": i, "embedding": _vector_payload(v, req.encoding_format)}
                    for i, v in enumerate(vectors)
                ],
                "model": model,
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
            }
        )

    @app.post("/embed")
    async def embed(req: EmbedRequest, request: Request) -> Response:
        texts = _texts(req.input, limits.max_inputs)
        bounds = costs(texts, req.input_type)
        _check_tokens(sum(bounds), limits, "input")
        vectors_out = sum(bounds) if late else len(texts)
        if vectors_out > limits.max_embed_vectors:
            raise TooMuchWorkError(
                f"this /embed answer may hold up to {vectors_out} vectors of {dim} floats (one per token), "
                f"over this server's limit of {limits.max_embed_vectors} per answer (max_embed_vectors); "
                "send fewer or shorter texts per request"
            )
        vectors, _ = await encode(request, texts, req.input_type)
        return await _render(
            lambda: {
                "object": "list",
                "model": name,
                "kind": encoder.kind.value,
                "dim": dim,
                "data": [
                    {"index": i, "shape": list(v.shape), "embedding": _vector_payload(v, req.encoding_format)}
                    for i, v in enumerate(vectors)
                ],
            }
        )

    # Cohere's clients call /v1/rerank (cohere.Client) and /v2/rerank (cohere.ClientV2), Jina's /v1/rerank.
    @app.post("/rerank")
    @app.post("/v1/rerank")
    @app.post("/v2/rerank")
    async def rerank(req: RerankRequest, request: Request) -> Response:
        docs = [d if isinstance(d, str) else d.text for d in req.documents]
        docs = _texts(docs, limits.max_documents, "documents")
        query = _texts(req.query, 1, "query")
        model = _check_string(req.model, "model") if req.model else name
        _check_tokens(sum(costs(query, "query")) + sum(costs(docs, "document")), limits, "this rerank")
        q_job = batcher.submit(query, "query", costs(query, "query"), count_tokens=True)
        d_job = batcher.submit(docs, "document", costs(docs, "document"), count_tokens=True)

        def cancel() -> None:
            batcher.cancel(q_job)
            batcher.cancel(d_job)

        both = asyncio.gather(asyncio.wrap_future(q_job.future), asyncio.wrap_future(d_job.future))
        (q,), vectors = await _until_done(request, both, cancel)
        version = "2" if request.url.path.startswith("/v2/") else "1"

        def answer() -> dict:
            scores = maxsim(q, vectors) if late else encoder.similarity(q, np.stack(vectors))
            relevance = relevance_scores(scores, len(q) if late else None)
            order = np.argsort(-scores, kind="stable")[: req.top_n]
            results = []
            for i in order:
                r: dict[str, Any] = {
                    "index": int(i),
                    "relevance_score": float(relevance[i]),
                    "score": float(scores[i]),
                }
                if req.return_documents:
                    r["document"] = {"text": docs[i]}
                results.append(r)
            return {
                "id": str(uuid.uuid4()),
                "model": model,
                "results": results,
                # Cohere bills one search unit per query and 100 documents; Jina reports tokens.
                "meta": {
                    "api_version": {"version": version},
                    "billed_units": {"search_units": math.ceil(len(docs) / SEARCH_UNIT_DOCUMENTS)},
                },
                "usage": {"total_tokens": q_job.tokens + d_job.tokens},
            }

        return await _render(answer)

    @app.post("/search")
    async def search(req: SearchRequest, request: Request) -> Response:
        idx = need_index()
        if req.top_k > limits.max_top_k:
            raise InvalidInputError(
                f"top_k={req.top_k} is over this server's limit of {limits.max_top_k} (max_top_k)"
            )
        check_where(req.where)  # a 400 naming the bad condition, before the query is encoded
        (q,), _ = await encode(request, _texts(req.query, 1, "query"), "query")

        def answer() -> dict:
            hits = idx.search_vectors([q], req.top_k, where=req.where)[0]
            return {
                "results": [
                    {"id": h.id, "score": h.score, "text": h.text, "metadata": h.metadata} for h in hits
                ],
                "documents": len(idx),
            }

        return await _render(answer)

    @app.post("/documents")
    async def add_documents(req: AddRequest, request: Request) -> dict:
        idx = need_index()
        texts = _texts([d.text for d in req.documents], limits.max_inputs, "documents")
        given = [d.id for d in req.documents if d.id is not None]
        if given and len(given) != len(texts):
            raise InvalidInputError("give every document an id, or none (the index then numbers them)")
        for i, d in enumerate(given):
            _check_string(d, f"documents[{i}].id")
        total = sum(
            _check_metadata(d.metadata, f"documents[{i}].metadata", limits)
            for i, d in enumerate(req.documents)
            if d.metadata is not None
        )
        if total > limits.max_request_metadata_bytes:
            raise TooMuchWorkError(
                f"the documents' metadata is {total} bytes as JSON, over this server's limit of "
                f"{limits.max_request_metadata_bytes} per request (max_request_metadata_bytes); "
                "split the request"
            )
        _check_tokens(sum(costs(texts, "document")), limits, "documents")
        ids = await in_thread(
            request,
            idx.add,
            texts,
            ids=given or None,
            metadata=[d.metadata for d in req.documents],
            on_duplicate=req.on_duplicate,
            commit_every=len(texts),  # one commit: a cancelled request leaves nothing behind
        )
        return {"ids": ids, "documents": len(idx)}

    @app.delete("/documents")
    async def delete_documents(req: DeleteRequest, request: Request) -> dict:
        idx = need_index()
        if len(req.ids) > limits.max_ids:
            raise InvalidInputError(
                f"{len(req.ids)} ids is over this server's limit of {limits.max_ids} (max_ids)"
            )
        ids = [_check_string(d, f"ids[{i}]") for i, d in enumerate(req.ids)]
        deleted = await in_thread(request, idx.delete, ids, missing_ok=req.missing_ok)
        return {"deleted": deleted, "documents": len(idx)}

    return app


# ----------------------------------------------------------------------------------------------------------
# Running it
# ----------------------------------------------------------------------------------------------------------


def check_api_key(host: str, api_key: str | None) -> str | None:
    """The key to require (``api_key``, else $LFM2EDGE_API_KEY); a non-loopback bind must have one."""
    key = api_key or os.environ.get(API_KEY_ENV) or None  # an empty value is no key
    if key is not None and (not key.strip() or len(key) < 8):
        raise InvalidInputError(
            "the API key must be at least 8 characters; generate one, e.g. `openssl rand -hex 16`"
        )
    if key is not None:
        _check_string(key, "the API key")
    if key is None and not is_loopback(host):
        raise InvalidInputError(
            f"binding {host} lets other machines connect, so the server needs an API key: pass --api-key KEY "
            f"or set {API_KEY_ENV} (clients send `Authorization: Bearer KEY`), or bind 127.0.0.1"
        )
    return key


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def serve(
    model: str | Path,
    index_path: str | Path | None = None,
    host: str = "127.0.0.1",
    port: int = 8000,
    n_threads: int | None = None,
    limits: ServerLimits = ServerLimits(),
    create_index: bool = False,
    index_options: Mapping[str, Any] | None = None,
    log_level: str = "warning",
    api_key: str | None = None,
    allowed_hosts: Sequence[str] = (),
    weight_kernel: str | None = None,
) -> None:
    """Load ``model`` (with the load option ``weight_kernel``, if given) and the index, serve until SIGINT or
    SIGTERM, drain, then close them.

    Prints one JSON line ``{"event": "listening", "url", "model"}`` once it accepts requests (``port=0``
    picks a free port, which the url names). Exits the process with status 70 (EXIT_UNCLEAN_SHUTDOWN),
    without freeing the model, only if a decode still ran ``shutdown_timeout_s`` after the requests stopped.
    """
    import uvicorn

    from lfm2edge.runtime.core.encoders import load
    from lfm2edge.runtime.core.llama import weight_kernel_options
    from lfm2edge.runtime.frontends.http_protocol import guarded_protocol, listen, raise_open_files_limit

    key = check_api_key(host, api_key)
    load_options = weight_kernel_options(weight_kernel)  # an unknown name fails before the port is bound
    sock = listen(host, port)
    # Each connection is a file descriptor: keep the cap below what the process may open.
    open_files = raise_open_files_limit(limits.max_connections + 256)
    max_connections = max(16, min(limits.max_connections, open_files - 128))
    main_thread = threading.current_thread() is threading.main_thread()
    previous = (
        {s: signal.signal(s, _interrupt) for s in (signal.SIGINT, signal.SIGTERM)} if main_thread else {}
    )
    encoder = app = None
    try:
        encoder = load(model, n_threads=n_threads, **load_options)
        index = None
        if index_path is not None:
            options = dict(index_options or {})  # a Qdrant server's collection
            index = (
                Index.open_or_create(index_path, encoder, **options)
                if create_index
                else Index.open(index_path, encoder, **options)
            )
        app = create_app(encoder, index, limits, host, api_key=key, allowed_hosts=allowed_hosts)
        config = uvicorn.Config(
            app,
            log_level=log_level,
            http=guarded_protocol(limits.header_timeout_s, max_connections),
            limit_concurrency=None,  # counts idle connections too; Guard limits requests instead
            timeout_keep_alive=limits.keep_alive_s,
            timeout_graceful_shutdown=limits.shutdown_timeout_s,
        )
        server = uvicorn.Server(config)
        bound = sock.getsockname()
        url_host = f"[{bound[0]}]" if ":" in bound[0] else bound[0]
        print(
            json.dumps({"event": "listening", "url": f"http://{url_host}:{bound[1]}", "model": str(model)}),
            flush=True,
        )
        for s in previous:  # from here a signal is uvicorn's to handle, even before it installs its own
            signal.signal(s, server.handle_exit)
        server.run(sockets=[sock])
    finally:
        sock.close()
        if encoder is not None:
            stopped = app is None or app.state.stop_encoding(limits.shutdown_timeout_s)
            if not stopped:
                print(
                    f"error: a decode was still running {limits.shutdown_timeout_s:g} s after the shutdown; "
                    "exiting without freeing the model",
                    file=sys.stderr,
                    flush=True,
                )
                os._exit(EXIT_UNCLEAN_SHUTDOWN)
            encoder.close()
        for s, handler in previous.items():
            signal.signal(s, handler)
