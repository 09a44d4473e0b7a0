"""``verify``: a GGUF through the runtime against the PyTorch reference on a multilingual sample.

Reports per-token cosine (ColBERT) or pooled cosine (dense), and rank agreement: for each
query, how much of the reference's top 10 over the sample documents the GGUF reproduces.
Thresholds depend on the file's type; random weights are the worst case for quantization,
so run ``verify`` on the real weights before trusting a quantized file.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path

import numpy as np

from lfm2edge.runtime.core.errors import InvalidInputError

# file type -> (min cosine, mean cosine, min mean top-10 overlap); cosine is per token for
# ColBERT and per vector for dense. f32 is the converter's exactness bar. From f16 down,
# ggml also rounds the activations inside each matmul to the weight type's vec-dot type,
# so a few of thousands of tokens fall further than the mean: the mean carries the bar
# (-1 leaves the minimum ungated). The bars below f16 are set from tiny random-weight
# models over several seeds, the worst case for quantization (their 64-wide rows even
# push k-quants down to fallback types); real weights do far better, so treat them as
# "the file is sane", and compare your own real-weight numbers between types.
THRESHOLDS: dict[str, tuple[float, float, float]] = {
    "F32": (0.99999, 0.99999, 0.99),  # near-tied scores may swap at rank 10 and 11
    "F16": (0.999, 0.99995, 0.98),
    "BF16": (0.95, 0.998, 0.9),
    "Q8_0": (-1.0, 0.98, 0.75),
    "Q6_K": (-1.0, 0.98, 0.75),
    "Q5_K_M": (-1.0, 0.8, 0.5),
    "Q5_K_S": (-1.0, 0.8, 0.5),
    "Q5_0": (-1.0, 0.8, 0.5),
    "Q5_1": (-1.0, 0.8, 0.5),
    "Q4_K_M": (-1.0, 0.6, 0.4),
    "Q4_K_S": (-1.0, 0.6, 0.4),
    "Q4_0": (-1.0, 0.6, 0.4),
    "Q4_1": (-1.0, 0.6, 0.4),
}
DEFAULT_THRESHOLD = (-1.0, 0.5, 0.3)
# llama.cpp's general.file_type values -> names.
FILE_TYPE_NAMES = {0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 7: "Q8_0", 8: "Q5_0", 9: "Q5_1", 10: "Q2_K",
                   11: "Q3_K_S", 12: "Q3_K_M", 13: "Q3_K_L", 14: "Q4_K_S", 15: "Q4_K_M", 16: "Q5_K_S",
                   17: "Q5_K_M", 18: "Q6_K", 32: "BF16"}
TOP_K = 10


@dataclass(frozen=True)
class VerifyReport:
    file_type: str
    kind: str
    query_expansion: str | None
    texts: int
    cosine_min: float  # per token (ColBERT) or per pooled vector (dense)
    cosine_mean: float
    top10_overlap: float  # mean over queries of |top10(gguf) ∩ top10(ref)| / 10
    top10_identical: float  # fraction of queries with the same top-10 order
    threshold_cosine_min: float
    threshold_cosine_mean: float
    threshold_overlap: float

    @property
    def passed(self) -> bool:
        return (
            self.cosine_min >= self.threshold_cosine_min
            and self.cosine_mean >= self.threshold_cosine_mean
            and self.top10_overlap >= self.threshold_overlap
        )

    def as_dict(self) -> dict:
        return asdict(self) | {"passed": self.passed}


def sample_texts() -> tuple[list[str], list[str]]:
    """The built-in multilingual sample: (queries, documents), all 11 languages and edge cases."""
    data = json.loads(resources.files("lfm2edge.convert").joinpath("data/sample_texts.json").read_text("utf-8"))
    return [q["text"] for q in data["queries"]], [d["text"] for d in data["documents"]]


def row_cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    num = (a * b).sum(axis=-1)
    return num / np.maximum(np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1), 1e-30)


def _top_k_agreement(ours: np.ndarray, ref: np.ndarray) -> tuple[float, float]:
    """Mean top-k overlap and the fraction of identical top-k orders, over query rows."""
    k = min(TOP_K, ours.shape[1])
    overlaps, identical = [], []
    for o, r in zip(ours, ref, strict=True):
        top_o, top_r = np.argsort(-o, kind="stable")[:k], np.argsort(-r, kind="stable")[:k]
        overlaps.append(len(set(top_o) & set(top_r)) / k)
        identical.append(bool(np.array_equal(top_o, top_r)))
    return float(np.mean(overlaps)), float(np.mean(identical))


def verify(gguf_path: str | Path, reference, n_threads: int | None = None,
           queries: list[str] | None = None, documents: list[str] | None = None) -> VerifyReport:
    """Compare ``gguf_path`` (through the runtime) with the PyTorch reference.

    ``reference`` is the checkpoint (folder or hub id) or an already built ReferenceEncoder.
    """
    from lfm2edge.convert.reference import ReferenceEncoder, pylate_maxsim
    from lfm2edge.runtime.core.encoders import ColBERTEncoder, load
    from lfm2edge.runtime.core.maxsim import maxsim

    default_q, default_d = sample_texts()
    queries, documents = queries or default_q, documents or default_d
    enc = load(gguf_path, n_threads=n_threads)
    ref = (
        reference
        if isinstance(reference, ReferenceEncoder)
        else ReferenceEncoder.from_checkpoint(reference, threads=n_threads)
    )
    if ref.is_colbert != isinstance(enc, ColBERTEncoder):
        raise InvalidInputError(f"{gguf_path} and {reference} are not the same kind of model")
    file_type = FILE_TYPE_NAMES.get(int(enc.model_file.header.metadata.get("general.file_type", -1)), "unknown")
    if isinstance(enc, ColBERTEncoder):
        mode = enc.query_expansion
        q_ours, q_ref = enc.encode_query(queries), ref.encode_query(queries, expansion=mode)
        d_ours, d_ref = enc.encode_document(documents), ref.encode_document(documents)
        cosines = []
        for ours, theirs in zip(q_ours + d_ours, q_ref + d_ref, strict=True):
            if ours.shape != theirs.shape:
                raise InvalidInputError(
                    f"token counts differ ({ours.shape[0]} vs {theirs.shape[0]}): llama.cpp and the HF tokenizer "
                    "disagree on this file's vocabulary. Re-convert the checkpoint with `lfm2edge convert`."
                )
            cosines.append(row_cosines(ours, theirs))
        cos = np.concatenate(cosines)
        scores_ours = np.stack([maxsim(q, d_ours) for q in q_ours])
        scores_ref = np.stack([pylate_maxsim(q, d_ref) for q in q_ref])
    else:
        mode = None
        q_ours, q_ref = enc.encode_query(queries), ref.encode_query(queries)
        d_ours, d_ref = enc.encode_document(documents), ref.encode_document(documents)
        cos = np.concatenate([row_cosines(q_ours, q_ref), row_cosines(d_ours, d_ref)])
        scores_ours, scores_ref = q_ours @ d_ours.T, q_ref @ d_ref.T
    enc.close()
    overlap, identical = _top_k_agreement(scores_ours, scores_ref)
    t_min, t_mean, t_overlap = THRESHOLDS.get(file_type, DEFAULT_THRESHOLD)
    return VerifyReport(
        file_type=file_type,
        kind=enc.kind.value,
        query_expansion=mode,
        texts=len(queries) + len(documents),
        cosine_min=float(cos.min()),
        cosine_mean=float(cos.mean()),
        top10_overlap=overlap,
        top10_identical=identical,
        threshold_cosine_min=t_min,
        threshold_cosine_mean=t_mean,
        threshold_overlap=t_overlap,
    )
