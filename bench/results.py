"""What a bench run produces: frozen dataclasses, from one figure up to the whole run.

A *side* is one engine and format measured on one model: llama.cpp with a GGUF (``f16``,
``q8_0``, ...) or the PyTorch reference (``fp32``, ``bf16``). A *figure* is one latency
distribution of one regime on one side. ``bench/README.md`` documents the JSON they become.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import numpy as np

from lfm2edge.bench.stats import Summary

SCHEMA = "lfm2edge.bench/1"

ENGINE_LLAMA = "llama.cpp"
ENGINE_TORCH = "torch"
ENGINE_ONNXRUNTIME = "onnxruntime"
ENGINE_OPENVINO = "openvino"
PEER_ENGINES = (ENGINE_ONNXRUNTIME, ENGINE_OPENVINO)

# Regimes (the JSON's "regime" values).
QUERY = "query"  # encode one query
MAXSIM = "maxsim"  # MaxSim of one query over N cached documents, no encoding (component of the next)
QUERY_MAXSIM_CACHED = "query_maxsim_cached"  # encode one query + MaxSim over N cached documents + top 10
RERANK_UNCACHED = "rerank_uncached"  # encode one query + k documents + MaxSim + sort (a reranker, no cache)
DOCUMENT_BATCH = "document_batch"  # encode a batch of documents (throughput)
# How desktop apps call: a query after an idle gap (a person typing), and the same while another process
# keeps one core busy (the bench starts it and stops it); documents one at a time under the same load.
QUERY_INTERACTIVE = "query_interactive"
QUERY_BUSY = "query_busy"
DOCUMENT_BUSY = "document_busy"
REGIMES = (QUERY, MAXSIM, QUERY_MAXSIM_CACHED, RERANK_UNCACHED, DOCUMENT_BATCH, QUERY_INTERACTIVE, QUERY_BUSY,
           DOCUMENT_BUSY)


@dataclass(frozen=True)
class Figure:
    """One latency distribution: a regime with its parameters, measured ``summary.n`` times."""

    regime: str
    summary: Summary
    samples_ms: np.ndarray  # every measured run, in run order
    docs: int | None = None  # cached documents (maxsim, query_maxsim_cached)
    k: int | None = None  # documents encoded per query (rerank_uncached)
    batch_size: int | None = None  # documents per call (document_batch)
    items_per_run: int = 1  # texts encoded per run (throughput numerator)
    tokens_per_run: int = 0  # tokens decoded per run
    best: bool = False  # document_batch: the batch size with the highest throughput on this side
    vs_torch: dict[str, float | None] = field(default_factory=dict)  # "fp32"/"bf16" -> speed-up

    @property
    def key(self) -> tuple:
        """What makes two figures comparable across sides."""
        return (self.regime, self.docs, self.k, self.batch_size)

    @property
    def label(self) -> str:
        if self.regime == QUERY:
            return "query"
        if self.regime == MAXSIM:
            return f"MaxSim only, {self.docs:,} docs"
        if self.regime == QUERY_MAXSIM_CACHED:
            return f"query + MaxSim, {self.docs:,} cached docs"
        if self.regime == RERANK_UNCACHED:
            return f"query + {self.k} doc{'s' if self.k != 1 else ''} + MaxSim"
        if self.regime == DOCUMENT_BATCH:
            return f"documents, batch {self.batch_size}"
        if self.regime == QUERY_INTERACTIVE:
            return "query after an idle gap"
        if self.regime == QUERY_BUSY:
            return "query after an idle gap, one core busy"
        if self.regime == DOCUMENT_BUSY:
            return "document, one core busy"
        return self.regime

    @property
    def items_per_s(self) -> float | None:
        """Texts per second over all runs (mean time), for figures that encode texts."""
        if self.regime in (MAXSIM,) or self.summary.mean_ms <= 0:
            return None
        return self.items_per_run / (self.summary.mean_ms / 1e3)

    @property
    def tokens_per_s(self) -> float | None:
        if not self.tokens_per_run or self.summary.mean_ms <= 0:
            return None
        return self.tokens_per_run / (self.summary.mean_ms / 1e3)


@dataclass(frozen=True)
class Fidelity:
    """Agreement with the fidelity reference (PyTorch in float64; fp32 where float64 could not run) on the same token ids."""

    reference: str  # "torch fp64", or "torch fp32"
    vectors: int  # rows compared: token vectors (ColBERT) or pooled vectors (Embedding)
    cosine_min: float
    cosine_mean: float
    queries: int
    documents: int
    rank_spearman_mean: float  # mean over queries of Spearman's rho between score vectors
    rank_top1_agreement: float  # fraction of queries with the same best document
    rank_identical_order: float  # fraction of queries with the same full order
    score_max_abs_diff: float


@dataclass(frozen=True)
class Memory:
    """Resident memory of the side's own process, in bytes (VmRSS / VmHWM on Linux)."""

    rss_before_load: int
    rss_after_load: int
    peak_encode: int  # peak after loading and encoding, before the cached-document index exists
    peak_total: int  # peak at the end (with the index of the largest --docs)


@dataclass(frozen=True)
class SideResult:
    model: str  # "ColBERT" / "Embedding"
    kind: str  # "late_interaction" / "dense"
    engine: str  # ENGINE_LLAMA / ENGINE_TORCH
    format: str  # GGUF type (f16, q8_0, ...) or torch dtype (fp32, bf16)
    path: str
    file_size_bytes: int
    threads: int
    load_s: float
    first_call_ms: float  # the first query after loading (cold), not part of any figure
    memory: Memory
    figures: tuple[Figure, ...]
    texts_digest: str
    query_tokens: int  # verified positions per query decode
    document_tokens: int  # verified positions per document decode
    query_expansion: str | None
    exact: bool | None  # llama.cpp: F32 K/V, exact (True) or flash attention over F16 K/V; torch: None
    extra_buffers: bool | None = None  # llama.cpp: CPU extra buffer types (AMX, repack) in use; torch: None
    details: dict[str, str] = field(default_factory=dict)  # versions, build description
    fidelity: Fidelity | None = None
    cpu_s: float = 0.0  # CPU time of the side's process (all threads)
    wall_s: float = 0.0  # wall time of the side's process, start to result
    other_cpu_share: float | None = None  # share of the machine's CPU other processes used meanwhile

    @property
    def label(self) -> str:
        return f"{self.engine} {self.format}"

    def best_document_figure(self) -> Figure | None:
        docs = [f for f in self.figures if f.regime == DOCUMENT_BATCH]
        return max(docs, key=lambda f: f.items_per_s or 0.0) if docs else None

    def figure(self, regime: str) -> Figure | None:
        """The side's first figure of ``regime`` (the regimes without parameters have one)."""
        return next((f for f in self.figures if f.regime == regime), None)

    def busy_ratio(self) -> tuple[float, float] | None:
        """(p50, p95) of the query with one core busy over the same query on a quiet machine, both after a gap."""
        quiet, busy = self.figure(QUERY_INTERACTIVE), self.figure(QUERY_BUSY)
        if quiet is None or busy is None or quiet.summary.p50_ms <= 0 or quiet.summary.p95_ms <= 0:
            return None
        return busy.summary.p50_ms / quiet.summary.p50_ms, busy.summary.p95_ms / quiet.summary.p95_ms


def merge_passes(passes: list[SideResult]) -> SideResult:
    """One side measured in several passes of a run (whose side order alternates between passes, so that a
    machine that drifts weighs on every side alike): each figure's samples joined in pass order, its summary
    and the best document batch size recomputed; load time, first call, memory and details from the first
    pass; CPU and wall time summed; the largest share other processes took."""
    first = passes[0]
    figures = []
    for fig in first.figures:
        samples = np.concatenate([f.samples_ms for r in passes for f in r.figures if f.key == fig.key])
        figures.append(dataclasses.replace(fig, samples_ms=samples, summary=Summary.of(samples / 1e3), best=False))
    best = max((f for f in figures if f.regime == DOCUMENT_BATCH), key=lambda f: f.items_per_s or 0.0, default=None)
    shares = [r.other_cpu_share for r in passes if r.other_cpu_share is not None]
    return dataclasses.replace(
        first,
        figures=tuple(dataclasses.replace(f, best=True) if f is best else f for f in figures),
        cpu_s=sum(r.cpu_s for r in passes),
        wall_s=sum(r.wall_s for r in passes),
        other_cpu_share=max(shares) if shares else None,
    )


@dataclass(frozen=True)
class SideOutput:
    """What a side's process hands back: the result plus the vectors fidelity needs (not in the JSON)."""

    result: SideResult
    query_vectors: tuple[np.ndarray, ...]  # per query: [32, d] (ColBERT) or [d] (Embedding)
    document_vectors: tuple[np.ndarray, ...]  # per document: [kept rows, d] or [d]


@dataclass(frozen=True)
class SideError:
    model: str
    engine: str
    format: str
    error: str


@dataclass(frozen=True)
class ModelResult:
    name: str
    kind: str
    source: str  # what the weights are: a checkpoint folder, a hub id, a GGUF, or "synthetic ..."
    random_weights: bool
    reference: str | None  # the checkpoint the PyTorch side ran, if any
    inputs_identical: bool  # every side built the same texts (same digest)
    sides: tuple[SideResult, ...]
    errors: tuple[SideError, ...] = ()
    conversions: dict[str, float | None] = field(default_factory=dict)  # format -> seconds (None: cached)


@dataclass(frozen=True)
class BenchResult:
    schema: str
    created: str
    command: str
    wall_s: float
    settings: dict
    machine: dict
    models: tuple[ModelResult, ...]
    notes: tuple[str, ...]


def to_jsonable(obj: object) -> object:
    """Dataclasses, numpy arrays and scalars as plain JSON types (samples rounded to 1 µs)."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        out = {f.name: to_jsonable(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
        if isinstance(obj, Figure):
            out["label"] = obj.label
            out["items_per_s"] = obj.items_per_s
            out["tokens_per_s"] = obj.tokens_per_s
        if isinstance(obj, SideResult):
            out["label"] = obj.label
        return out
    if isinstance(obj, np.ndarray):
        return [round(float(x), 3) for x in obj.ravel()]
    if isinstance(obj, (np.floating, np.integer, np.bool_)):
        return obj.item()
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    return obj
