"""The PyTorch side: lfm2edge's reference (``convert.reference``) in fp32 or bf16, same inputs, same threads;
and the fidelity reference, the same model in float64.

The reference runs one unpadded sequence per call, as llama.cpp computes (padding changes
these models' outputs), so its document figures use batch size 1. ``torch.set_num_threads``
equals the llama.cpp side's thread count.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from lfm2edge.bench.memory import rss
from lfm2edge.bench.regimes import Progress, SideSpec, build_texts, run_measurements
from lfm2edge.bench.results import SideOutput

DTYPES = ("fp32", "bf16")


class TorchEngine:
    """``regimes.Engine`` over a ``ReferenceEncoder``."""

    def __init__(self, reference, query_expansion: str | None):
        self.ref = reference
        self.colbert = bool(reference.is_colbert)
        self.dim = int(reference.model.output_dim)
        self.query_expansion = (query_expansion or "attended") if self.colbert else None

    def _count(self, text: str) -> int:
        return len(self.ref.tokenizer.encode(text).ids)  # the encoder's copy has no truncation

    def query_length(self, text: str) -> int:
        if self.colbert:
            return self._count(text.strip()) + 1  # BOS, [Q], text; no expansion pads
        return self._count((self.ref.settings.query_prefix + text).strip())

    def document_length(self, text: str) -> int:
        if self.colbert:
            return self._count(text.strip()) + 1
        return self._count((self.ref.settings.document_prefix + text).strip())

    def prepared_query_length(self, text: str) -> int:
        ids, _ = self.ref.tokenize_query(text, expansion=self.query_expansion or "pylate")
        return len(ids)

    def prepared_document_length(self, text: str) -> int:
        ids, _ = self.ref.tokenize_document(text)
        return len(ids)

    def encode_query(self, text: str) -> np.ndarray:
        if self.colbert:
            return self.ref.encode_query(text, expansion=self.query_expansion)
        return self.ref.encode_query(text)

    def encode_documents(self, texts: Sequence[str], batch_size: int) -> list[np.ndarray]:
        out = self.ref.encode_document(list(texts))
        return list(out)

    def rerank(self, query: str, documents: Sequence[str], top_k: int) -> np.ndarray:
        from lfm2edge.runtime.core.maxsim import maxsim

        q = self.encode_query(query)
        docs = self.encode_documents(documents, len(documents))
        scores = maxsim(q, docs) if self.colbert else np.stack(docs) @ q
        return np.argsort(-scores, kind="stable")[:top_k]


def run(spec: SideSpec, progress: Progress) -> SideOutput:
    progress("loading")
    import torch

    from lfm2edge.convert.reference import ReferenceEncoder

    rss_before, _ = rss()  # interpreter, numpy, torch and transformers loaded; no model yet
    if spec.format not in DTYPES:
        raise ValueError(f"the PyTorch side runs {DTYPES}, not {spec.format!r}")
    dtype = torch.float32 if spec.format == "fp32" else torch.bfloat16
    torch.set_num_threads(spec.threads)
    t0 = time.perf_counter()
    reference = ReferenceEncoder.from_checkpoint(spec.path, dtype=dtype, threads=spec.threads)
    load_s = time.perf_counter() - t0
    rss_after_load, _ = rss()
    size = sum(p.stat().st_size for p in Path(spec.path).rglob("*.safetensors"))
    details = {
        "torch_version": torch.__version__,
        "torch_threads": str(torch.get_num_threads()),
        "weights_dtype": str(dtype).removeprefix("torch."),
        "bf16_cpu_support": str(_bf16_hint()),
    }
    with torch.inference_mode():
        return run_measurements(
            spec, TorchEngine(reference, spec.query_expansion), progress, rss, load_s, rss_before,
            rss_after_load, size, details,
        )


def reference_vectors(spec: SideSpec) -> tuple[tuple[np.ndarray, ...], tuple[np.ndarray, ...]]:
    """The fidelity reference: the bench's queries and documents (those every side encodes) through the
    reference in float64, RoPE's angles included, untimed. PyTorch fp32 rounds at every step too (1 - cosine
    about 4e-10 from this on the bench's ColBERT), as much as the f32 sides it would judge."""
    import torch

    from lfm2edge.convert.reference import ReferenceEncoder

    torch.set_num_threads(spec.threads)
    engine = TorchEngine(ReferenceEncoder.from_checkpoint(spec.path, dtype=torch.float64, threads=spec.threads),
                         spec.query_expansion)
    texts = build_texts(engine, spec.plan)
    with torch.inference_mode():
        return (tuple(engine.encode_query(q) for q in texts.queries),
                tuple(engine.encode_documents(texts.documents, 1)))


def _bf16_hint() -> str:
    """Whether this CPU has native bf16 matmul support (what makes bf16 fast in PyTorch)."""
    try:
        flags = Path("/proc/cpuinfo").read_text().split("flags", 2)[1].split("\n", 1)[0]
    except (OSError, IndexError):
        return "unknown"
    found = [f for f in ("avx512_bf16", "amx_bf16") if f in flags.split()]
    return ",".join(found) or "none"
