"""The llama.cpp side: one GGUF through ``lfm2edge.load``, measured by ``regimes``."""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from lfm2edge.bench.memory import rss
from lfm2edge.bench.regimes import Progress, SideSpec, run_measurements
from lfm2edge.bench.results import SideOutput


class LlamaEngine:
    """``regimes.Engine`` over a ``DenseEncoder`` / ``ColBERTEncoder``."""

    def __init__(self, encoder):
        from lfm2edge.runtime.core.encoders import ColBERTEncoder

        self.encoder = encoder
        self.colbert = isinstance(encoder, ColBERTEncoder)
        self.dim = int(encoder.dim)
        self.query_expansion: str | None = encoder.query_expansion if self.colbert else None
        self.extra_buffers: bool | None = getattr(encoder, "extra_buffers", None)

    def query_length(self, text: str) -> int:
        e, s = self.encoder, self.encoder.settings
        if self.colbert:
            return len(e.tokenize(text.strip())) + 1  # BOS, [Q], text; no expansion pads, no truncation
        return len(e.tokenize((s.query_prefix + text).strip()))

    def document_length(self, text: str) -> int:
        e, s = self.encoder, self.encoder.settings
        if self.colbert:
            return len(e.tokenize(text.strip())) + 1
        return len(e.tokenize((s.document_prefix + text).strip()))

    def prepared_query_length(self, text: str) -> int:
        return len(self.encoder.prepare_query(text))

    def prepared_document_length(self, text: str) -> int:
        return len(self.encoder.prepare_document(text))

    def encode_query(self, text: str) -> np.ndarray:
        return self.encoder.encode_query(text)

    def encode_documents(self, texts: Sequence[str], batch_size: int) -> list[np.ndarray]:
        return list(self.encoder.encode_document(list(texts), batch_size=batch_size))

    def rerank(self, query: str, documents: Sequence[str], top_k: int) -> np.ndarray:
        return self.encoder.rerank(query, list(documents), top_k=top_k).indices


def _load(spec: SideSpec, query_expansion: str | None):
    import lfm2edge

    tokens = max(1024, max(spec.batch_sizes) * spec.plan.document_tokens, spec.plan.query_tokens)
    kwargs: dict[str, object] = {"query_expansion": query_expansion} if spec.colbert and query_expansion else {}
    if spec.extra_buffers is not None:  # only when asked: an older lfm2edge (a stock venv's) lacks the option
        kwargs["extra_buffers"] = spec.extra_buffers
    if spec.weight_kernel:
        kwargs[spec.weight_kernel] = True
    return lfm2edge.load(spec.path, n_threads=spec.threads, exact=spec.exact, max_batch_tokens=tokens, **kwargs)


def run(spec: SideSpec, progress: Progress) -> SideOutput:
    import lfm2edge.runtime.core.encoders  # noqa: F401 - imported before the baseline RSS
    from lfm2edge.runtime.core.errors import FeatureUnavailableError

    rss_before, _ = rss()  # interpreter, numpy and llama.cpp loaded; no model yet
    progress("loading")
    t0 = time.perf_counter()
    encoder = _load(spec, spec.query_expansion)
    load_s = time.perf_counter() - t0
    notes = {}
    if spec.colbert and encoder.query_expansion == "pylate":
        try:
            encoder.encode_query("probe")
        except FeatureUnavailableError:
            # The build has the key-mask patch but the runtime does not use it yet: attended pads.
            encoder.close()
            encoder = _load(spec, "attended")
            notes["query_expansion_note"] = "pylate expansion not available in this runtime; attended pads used"
    rss_after_load, _ = rss()
    try:
        b = encoder.build
        details = {
            "build": b.describe(),
            "binding_version": b.binding_version,
            "llama_cpp_commit": b.llama_cpp_commit,
            "patches": ",".join(b.patches),
            "flash_attention": (("on, F32 K/V (exact)" if encoder.flash_attention else "off (exact)")
                                if spec.exact else "on, F16 K/V"),
            **notes,
        }
        return run_measurements(
            spec, LlamaEngine(encoder), progress, rss, load_s, rss_before, rss_after_load,
            Path(spec.path).stat().st_size, details,
        )
    finally:
        encoder.close()
