"""The measurements, engine-agnostic: the same code times llama.cpp and the PyTorch reference.

An ``Engine`` (``llama_side.LlamaEngine``, ``torch_side.TorchEngine``) encodes texts; this
module builds the inputs through the engine's own tokenizer, checks their token counts, and
measures every figure of one side:

- ``query``: encode one query (both models);
- ``maxsim``: MaxSim of one query over N cached documents, no encoding (ColBERT);
- ``query_maxsim_cached``: encode one query, MaxSim over N cached documents, top 10 (ColBERT);
- ``rerank_uncached``: encode one query and k documents, MaxSim, sort (ColBERT, no cache);
- ``document_batch``: encode a batch of documents, per batch size (throughput, both models);
- ``query_interactive``: one query after an idle gap, as a person types them (engines' threads asleep);
- ``query_busy`` / ``document_busy``: the same query regime, and one document at a time, while another
  process keeps one core busy (``load.busy_core``): what a desktop app meets.

Cached documents are random unit vectors of the real shape [document tokens, dim] in float16
(``PackedDocuments``): MaxSim's cost depends on their shape, not their values. MaxSim is
lfm2edge's ``maxsim()`` on every side (C kernel or numpy), so ratios to PyTorch measure the encoders.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Protocol

import numpy as np

from lfm2edge.bench.inputs import Texts, make_texts
from lfm2edge.bench.load import busy_core
from lfm2edge.bench.results import (
    DOCUMENT_BATCH,
    DOCUMENT_BUSY,
    MAXSIM,
    QUERY,
    QUERY_BUSY,
    QUERY_INTERACTIVE,
    QUERY_MAXSIM_CACHED,
    RERANK_UNCACHED,
    Figure,
    Memory,
    SideOutput,
    SideResult,
)
from lfm2edge.bench.stats import RunPolicy, Summary, measure, runs_for_items, timed

Progress = Callable[[str], None]
TOP_K = 10


@dataclass(frozen=True)
class Plan:
    """What every side measures (identical for all sides of a run)."""

    query_tokens: int = 32
    document_tokens: int = 256
    n_queries: int = 8  # distinct queries, cycled through runs; also the fidelity queries
    n_documents: int = 8  # distinct documents, cycled; also the fidelity documents
    cached_docs: tuple[int, ...] = (1000,)
    k: int = 1
    batch_sizes: tuple[int, ...] = (1, 4)
    seed: int = 0
    policy: RunPolicy = field(default_factory=RunPolicy)
    throughput_policy: RunPolicy = field(default_factory=lambda: RunPolicy(min_runs=3))
    maxsim_policy: RunPolicy = field(default_factory=lambda: RunPolicy(budget_s=1.5))
    gap_s: float = 0.5  # idle time before each call of the interactive and busy query regimes
    busy: bool = True  # measure the busy regimes (another process on one core)
    interactive_policy: RunPolicy = field(default_factory=lambda: RunPolicy(budget_s=2.0, min_runs=15, cap_s=40.0))
    busy_document_policy: RunPolicy = field(default_factory=lambda: RunPolicy(budget_s=2.0, min_runs=5, cap_s=40.0))


@dataclass(frozen=True)
class SideSpec:
    """One side to measure, handed to its own process."""

    model: str  # "ColBERT" / "Embedding"
    kind: str  # "late_interaction" / "dense"
    engine: str  # "llama.cpp" / "torch"
    format: str  # GGUF type or torch dtype name
    path: str  # GGUF file or checkpoint folder
    threads: int
    plan: Plan
    exact: bool = True  # llama.cpp only
    query_expansion: str | None = None  # torch: mirror the llama.cpp side's mode
    python: str | None = None  # another interpreter (e.g. a stock llama.cpp build); None: this one
    extra_buffers: bool | None = None  # llama.cpp's CPU extra buffer types (AMX, repack); None: the build decides
    # llama.cpp only: a load option that runs the weights on another kernel (runner.KERNEL_SIDES), or None
    weight_kernel: str | None = None
    checkpoint: str | None = None  # peers: the checkpoint whose tokenizer and settings prepare the texts

    @property
    def colbert(self) -> bool:
        return self.kind == "late_interaction"

    @property
    def batch_sizes(self) -> tuple[int, ...]:
        # The reference and the graphs exported from it run one unpadded sequence per call (padding would
        # change their outputs).
        return self.plan.batch_sizes if self.engine == "llama.cpp" else (1,)


class Engine(Protocol):
    colbert: bool
    dim: int
    query_expansion: str | None

    def query_length(self, text: str) -> int:
        """Positions of the query without expansion pads or truncation (BOS and marker/prompt included)."""

    def document_length(self, text: str) -> int:
        """Positions of the document without truncation (BOS and marker/prompt included)."""

    def prepared_query_length(self, text: str) -> int:
        """Positions the engine really decodes for this query (expansion and truncation applied)."""

    def prepared_document_length(self, text: str) -> int: ...

    def encode_query(self, text: str) -> np.ndarray: ...

    def encode_documents(self, texts: Sequence[str], batch_size: int) -> list[np.ndarray]: ...

    def rerank(self, query: str, documents: Sequence[str], top_k: int) -> np.ndarray: ...


def figure_plan(spec: SideSpec) -> list[tuple]:
    """The figure keys a side will measure, in order: for progress totals."""
    keys: list[tuple] = [(QUERY, None, None, None), (QUERY_INTERACTIVE, None, None, None)]
    if spec.plan.busy:
        keys.append((QUERY_BUSY, None, None, None))
    if spec.colbert:
        keys.append((RERANK_UNCACHED, None, spec.plan.k, None))
    keys += [(DOCUMENT_BATCH, None, None, b) for b in spec.batch_sizes]
    if spec.plan.busy:
        keys.append((DOCUMENT_BUSY, None, None, 1))
    if spec.colbert:
        for n in spec.plan.cached_docs:
            keys += [(MAXSIM, n, None, None), (QUERY_MAXSIM_CACHED, n, None, None)]
    return keys


def random_index(n_docs: int, tokens: int, dim: int, seed: int):
    """N documents of ``tokens`` random unit vectors each, packed in float16 (built in chunks)."""
    from lfm2edge.runtime.core.maxsim import PackedDocuments

    rng = np.random.default_rng(seed)
    vectors = np.empty((n_docs * tokens, dim), dtype=np.float16)
    chunk = 1 << 18
    for lo in range(0, len(vectors), chunk):
        block = rng.standard_normal((min(chunk, len(vectors) - lo), dim), dtype=np.float32)
        block /= np.linalg.norm(block, axis=1, keepdims=True)
        vectors[lo : lo + len(block)] = block
    offsets = np.arange(n_docs + 1, dtype=np.int64) * tokens
    vectors.flags.writeable = False  # unchangeable, as an index's are: the kernel may keep its int8 codes
    return PackedDocuments(vectors, offsets)


def build_texts(engine: Engine, plan: Plan) -> Texts:
    texts = make_texts(
        engine.query_length, engine.document_length, plan.query_tokens, plan.document_tokens,
        plan.n_queries, plan.n_documents, plan.seed,
    )
    for q in texts.queries:
        n = engine.prepared_query_length(q)
        if n != plan.query_tokens:
            raise RuntimeError(f"a bench query decodes {n} positions, not {plan.query_tokens}")
    for d in texts.documents:
        n = engine.prepared_document_length(d)
        if n != plan.document_tokens:
            raise RuntimeError(f"a bench document decodes {n} positions, not {plan.document_tokens}")
    return texts


def _top(scores: np.ndarray) -> np.ndarray:
    k = min(TOP_K, len(scores))
    top = np.argpartition(-scores, k - 1)[:k]
    return top[np.argsort(-scores[top], kind="stable")]


def _figure(regime: str, seconds: np.ndarray, **kw) -> Figure:
    return Figure(regime=regime, summary=Summary.of(seconds), samples_ms=seconds * 1e3, **kw)


def measure_side(
    engine: Engine,
    spec: SideSpec,
    progress: Progress,
    memory_now: Callable[[], tuple[int, int]],
) -> tuple[list[Figure], Texts, dict[int, np.ndarray], dict[int, np.ndarray], int]:
    """Every figure of one side.

    Returns (figures, texts, query vectors by index, document vectors by index, peak RSS before
    the cached-document index). ``memory_now()`` gives (rss, peak rss) in bytes.
    """
    from lfm2edge.runtime.core.maxsim import maxsim

    plan = spec.plan
    texts = build_texts(engine, plan)
    queries, docs = texts.queries, texts.documents
    nq, nd = len(queries), len(docs)
    q_vectors: dict[int, np.ndarray] = {}
    d_vectors: dict[int, np.ndarray] = {}
    figures: list[Figure] = []

    def query_run(i: int) -> None:
        v = engine.encode_query(queries[i % nq])
        q_vectors.setdefault(i % nq, v)

    progress("query")
    figures.append(_figure(QUERY, measure(query_run, plan.policy), tokens_per_run=plan.query_tokens))
    # Quiet and busy interactive figures back to back, so their ratio compares one state of the machine.
    progress("query after an idle gap")
    figures.append(_figure(QUERY_INTERACTIVE, measure(query_run, plan.interactive_policy, plan.gap_s),
                           tokens_per_run=plan.query_tokens))
    if plan.busy:
        progress("query after an idle gap, one core busy")
        with busy_core():
            seconds = measure(query_run, plan.interactive_policy, plan.gap_s)
        figures.append(_figure(QUERY_BUSY, seconds, tokens_per_run=plan.query_tokens))

    if spec.colbert:
        k = plan.k

        def rerank_run(i: int) -> None:
            engine.rerank(queries[i % nq], [docs[(i * k + j) % nd] for j in range(k)], TOP_K)

        progress(f"query + {k} document{'s' if k != 1 else ''} + MaxSim")
        seconds = measure(rerank_run, plan.policy)
        figures.append(_figure(RERANK_UNCACHED, seconds, k=k, items_per_run=k,
                               tokens_per_run=plan.query_tokens + k * plan.document_tokens))

    docs_warm = spec.colbert  # the rerank figure encoded documents
    for b in spec.batch_sizes:

        def batch_run(i: int, b: int = b) -> None:
            idx = [(i * b + j) % nd for j in range(b)]
            for j, v in zip(idx, engine.encode_documents([docs[j] for j in idx], b), strict=True):
                d_vectors.setdefault(j, v)

        progress(f"documents, batch {b}")
        # the runs cover every document at least once (their vectors feed the fidelity check)
        policy = replace(plan.throughput_policy, min_runs=max(plan.throughput_policy.min_runs, runs_for_items(nd, b)))
        if docs_warm:  # an earlier figure already encoded documents: no warm-up needed
            policy = replace(policy, max_warmup_runs=0)
        figures.append(_figure(DOCUMENT_BATCH, measure(batch_run, policy), batch_size=b, items_per_run=b,
                               tokens_per_run=b * plan.document_tokens))
        docs_warm = True
    if plan.busy:

        def busy_document_run(i: int) -> None:
            engine.encode_documents([docs[i % nd]], 1)

        progress("document, one core busy")
        with busy_core():
            seconds = measure(busy_document_run, replace(plan.busy_document_policy, max_warmup_runs=1))
        figures.append(_figure(DOCUMENT_BUSY, seconds, batch_size=1, items_per_run=1,
                               tokens_per_run=plan.document_tokens))
    _, peak_encode = memory_now()

    if spec.colbert:
        q0 = q_vectors[0]
        for n in plan.cached_docs:
            index = random_index(n, plan.document_tokens, engine.dim, plan.seed)
            progress(f"MaxSim only, {n:,} docs")
            figures.append(_figure(MAXSIM, measure(lambda i, ix=index: _top(maxsim(q0, ix)), plan.maxsim_policy),
                                   docs=n, items_per_run=0))

            def cached_run(i: int, ix=index) -> None:
                _top(maxsim(engine.encode_query(queries[i % nq]), ix))

            progress(f"query + MaxSim, {n:,} cached docs")
            figures.append(_figure(QUERY_MAXSIM_CACHED, measure(cached_run, plan.policy), docs=n,
                                   tokens_per_run=plan.query_tokens))
            del index

    best = max((f for f in figures if f.regime == DOCUMENT_BATCH), key=lambda f: f.items_per_s or 0.0, default=None)
    figures = [replace(f, best=True) if f is best else f for f in figures]
    return figures, texts, q_vectors, d_vectors, peak_encode


def run_measurements(
    spec: SideSpec,
    engine: Engine,
    progress: Progress,
    memory_now: Callable[[], tuple[int, int]],
    load_s: float,
    rss_before: int,
    rss_after_load: int,
    file_size: int,
    details: dict[str, str],
) -> SideOutput:
    """The shared tail of both sides: first call, figures, packaging."""
    first_s, _ = timed(lambda: engine.encode_query("a first query after loading"))
    figures, texts, qv, dv, peak_encode = measure_side(engine, spec, progress, memory_now)
    _, peak_total = memory_now()
    result = SideResult(
        model=spec.model,
        kind=spec.kind,
        engine=spec.engine,
        format=spec.format,
        path=spec.path,
        file_size_bytes=file_size,
        threads=spec.threads,
        load_s=load_s,
        first_call_ms=first_s * 1e3,
        memory=Memory(rss_before, rss_after_load, peak_encode, peak_total),
        figures=tuple(figures),
        texts_digest=texts.digest,
        query_tokens=spec.plan.query_tokens,
        document_tokens=spec.plan.document_tokens,
        query_expansion=engine.query_expansion,
        exact=spec.exact if spec.engine == "llama.cpp" else None,
        extra_buffers=getattr(engine, "extra_buffers", None),
        details=details,
    )
    return SideOutput(
        result=result,
        query_vectors=tuple(qv[i] for i in sorted(qv)),
        document_vectors=tuple(dv[i] for i in sorted(dv)),
    )
