"""The server's micro-batcher: while the server runs, its thread is the only one that calls the encoder.

Requests hand it jobs (the texts of one side, queries or documents). It decodes batches of at most
``max_texts`` texts and about ``max_tokens`` tokens, filled round-robin from the waiting jobs (one
text from each in turn), and serves the jobs it took from last next time; queries and documents
take turns whenever both wait (a search's query never waits for every document ahead of it). So
requests that arrive while a decode runs share the next one, and a small request waits behind at
most one batch of a large one. A job can be cancelled (its client went away): its remaining texts
are dropped.

``close()`` fails the jobs still waiting, lets the batch in progress finish and joins the thread;
once it returns True nothing touches the encoder any more and the model may be freed.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Sequence
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from lfm2edge.runtime.core.errors import Lfm2EdgeError

Side = Literal["query", "document"]


class ServerClosingError(Lfm2EdgeError):
    """The server is shutting down: the work was not run."""


class WorkCancelledError(Lfm2EdgeError):
    """The client of this work went away, so its remaining texts were dropped."""


@dataclass(eq=False)
class Job:
    """One request's texts of one side; ``future`` gets their vectors in order (or the error)."""

    texts: list[str]
    side: Side
    costs: list[int]  # the tokens each text may take: what fills a batch
    count_tokens: bool = False  # also count the tokens decoded (the usage fields) into ``tokens``
    future: Future = field(default_factory=Future)
    results: list[Any] = field(default_factory=list)
    handed_out: int = 0  # texts given to a batch so far
    finished: int = 0  # texts whose vectors are in ``results``
    tokens: int = 0


def _settle(future: Future, result: Any = None, error: BaseException | None = None) -> None:
    """Set a future once; a second setter (a cancel racing a result) is ignored."""
    try:
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)
    except InvalidStateError:
        pass


def encoded_length(encoder, text: str, side: Side) -> int:
    """The tokens the encoder decodes for ``text`` (what usage fields report): BOS, the marker or prompt
    and the text, truncated at the side's length; a ColBERT query with its expansion pads."""
    prepare = encoder.prepare_query if side == "query" else encoder.prepare_document
    return len(prepare(text))


class Batcher:
    """Encodes texts from many threads and requests with few, fair decodes; see the module docstring."""

    def __init__(self, encoder, max_texts: int = 64, max_tokens: int = 4096):
        self.encoder = encoder
        self.max_texts = max(1, max_texts)
        self.max_tokens = max(1, max_tokens)
        self._cond = threading.Condition(threading.RLock())
        self._jobs: deque[Job] = deque()
        self._closing = False
        self._last_side: Side | None = None
        self._thread = threading.Thread(target=self._run, name="lfm2edge-batcher", daemon=True)
        self._thread.start()

    # -- the request side -----------------------------------------------------------------------------

    def submit(
        self, texts: Sequence[str], side: Side, costs: Sequence[int] | None = None, count_tokens: bool = False
    ) -> Job:
        """Queue ``texts``; the job's future gets one float32 array per text. Refused once closing."""
        texts = list(texts)
        job = Job(texts, side, list(costs) if costs is not None else [len(t) for t in texts], count_tokens)
        job.results = [None] * len(texts)
        with self._cond:
            if self._closing:
                raise ServerClosingError(
                    "the server is shutting down; send the request again once it is back"
                )
            if texts:
                self._jobs.append(job)
                self._cond.notify()
            else:
                _settle(job.future, [])
        return job

    def encode(self, texts: Sequence[str], side: Side) -> list[np.ndarray]:
        """Blocking: one float32 array per text, [dim] (dense) or [tokens, dim] (ColBERT)."""
        return self.submit(texts, side).future.result()

    def cancel(self, job: Job, reason: str = "the client went away") -> None:
        """Drop what is left of ``job`` (texts in the decode running now still finish, unused)."""
        with self._cond:
            _settle(job.future, error=WorkCancelledError(f"{reason}; its remaining texts were not encoded"))

    def close(self, timeout: float | None = None) -> bool:
        """Fail waiting jobs, finish the batch in progress, stop the thread: True once it has stopped."""
        with self._cond:
            self._closing = True
            for job in self._jobs:
                _settle(
                    job.future, error=ServerClosingError("the server is shutting down; send it again later")
                )
            self._jobs.clear()
            self._cond.notify_all()
        if self._thread is not threading.current_thread():
            self._thread.join(timeout)
        return not self._thread.is_alive()

    @property
    def closing(self) -> bool:
        return self._closing

    # -- the thread -----------------------------------------------------------------------------------

    def _run(self) -> None:
        try:
            while True:
                with self._cond:
                    batch = self._take()
                    while batch is None:
                        if self._closing:
                            return
                        self._cond.wait()
                        batch = self._take()
                self._decode(*batch)
        finally:  # whatever ended the thread, nobody may wait for it any more
            with self._cond:
                self._closing = True
                for job in self._jobs:
                    _settle(job.future, error=ServerClosingError("the server's encoder stopped"))
                self._jobs.clear()

    def _take(self) -> tuple[Side, dict[Job, list[int]]] | None:
        """The next batch, round-robin over the waiting jobs of one side; called under the lock."""
        live = [j for j in self._jobs if not j.future.done()]
        if not live:
            self._jobs.clear()
            return None
        sides = {j.side for j in live if j.handed_out < len(j.texts)}
        side = live[0].side if len(sides) < 2 else "document" if self._last_side == "query" else "query"
        self._last_side = side
        pieces: dict[Job, list[int]] = {}
        n = tokens = 0
        progress = True
        while progress and n < self.max_texts:
            progress = False
            for job in live:
                if job.side != side or job.handed_out >= len(job.texts):
                    continue
                cost = job.costs[job.handed_out]
                if n and tokens + cost > self.max_tokens:
                    continue
                pieces.setdefault(job, []).append(job.handed_out)
                job.handed_out += 1
                n, tokens, progress = n + 1, tokens + cost, True
                if n >= self.max_texts:
                    break
        # The jobs served go to the back, so the next batch starts with the others (the other side too).
        waiting = [j for j in live if j not in pieces]
        self._jobs = deque(waiting + [j for j in pieces if j.handed_out < len(j.texts)])
        return side, pieces

    def _decode(self, side: Side, pieces: dict[Job, list[int]]) -> None:
        order = [(job, i) for job, rows in pieces.items() for i in rows]
        try:
            method = self.encoder.encode_query if side == "query" else self.encoder.encode_document
            texts = [job.texts[i] for job, i in order]
            out = list(method(texts, batch_size=len(texts)))
        except Exception as e:
            if len(pieces) == 1:
                _settle(next(iter(pieces)).future, error=e)
            else:  # one bad request must not fail the others decoded with it
                for job, rows in pieces.items():
                    self._decode(side, {job: rows})
            return
        for (job, i), vector in zip(order, out, strict=True):
            job.results[i] = vector
        for job, rows in pieces.items():
            job.finished += len(rows)
            if job.finished == len(job.texts) and not job.future.done():
                self._complete(job)

    def _complete(self, job: Job) -> None:
        try:
            if job.count_tokens:
                job.tokens = sum(encoded_length(self.encoder, t, job.side) for t in job.texts)
        except Exception as e:
            _settle(job.future, error=e)
            return
        _settle(job.future, job.results)


class WorkScope:
    """The jobs one request started from a worker thread (``Index.add``), to cancel them together."""

    _current = threading.local()

    def __init__(self, batcher: Batcher):
        self.batcher = batcher
        self.cancelled = False
        self._jobs: list[Job] = []
        self._lock = threading.Lock()

    def track(self, job: Job) -> None:
        with self._lock:
            self._jobs.append(job)
            cancelled = self.cancelled
        if cancelled:
            self.batcher.cancel(job)

    def cancel(self) -> None:
        with self._lock:
            self.cancelled = True
            jobs = list(self._jobs)
        for job in jobs:
            self.batcher.cancel(job)

    def run(self, fn, *args, **kwargs):
        """``fn(*args, **kwargs)`` in this thread, its batcher jobs tracked by this scope."""
        WorkScope._current.scope = self
        try:
            return fn(*args, **kwargs)
        finally:
            WorkScope._current.scope = None

    @classmethod
    def current(cls) -> WorkScope | None:
        return getattr(cls._current, "scope", None)


class BatchedEncoder:
    """The encoder as an Index sees it inside the server: encodes go through the batcher (fair, and
    cancelled with their request's WorkScope); every other attribute is the encoder's own."""

    def __init__(self, encoder, batcher: Batcher, costs):
        self._encoder = encoder
        self._batcher = batcher
        self._costs = costs  # (texts, side) -> the token bound of each text

    def __getattr__(self, name: str):
        return getattr(self._encoder, name)

    def encode_query(self, texts, batch_size: int = 32, show_progress_bar: bool = False):
        return self._encode(texts, "query")

    def encode_document(self, texts, batch_size: int = 32, show_progress_bar: bool = False):
        return self._encode(texts, "document")

    def _encode(self, texts, side: Side):
        single = isinstance(texts, str)
        items = [texts] if single else list(texts)
        job = self._batcher.submit(items, side, self._costs(items, side))
        scope = WorkScope.current()
        if scope is not None:
            scope.track(job)
        vectors = job.future.result()
        if single:
            return vectors[0]
        return vectors if self._encoder.kind.value == "late_interaction" else np.stack(vectors)
