"""Retrieval metrics, computed by ir-measures (trec_eval through pytrec_eval), and TREC run files.

NDCG@10 is the headline (the release's NanoBEIR figure), then Recall@k for each requested k and
MRR@10. Every judged query counts: a query the run misses scores 0 instead of being dropped, which
trec_eval would otherwise do silently.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Mapping, Sequence
from pathlib import Path

from lfm2edge.runtime.core.errors import FeatureUnavailableError, InvalidInputError

HEADLINE = "NDCG@10"
Run = Mapping[str, Mapping[str, float]]  # query id -> document id -> score
Qrels = Mapping[str, Mapping[str, int]]  # query id -> document id -> relevance


def metric_names(recall_ks: Sequence[int]) -> list[str]:
    return [HEADLINE, *(f"Recall@{k}" for k in recall_ks), "MRR@10"]


def run_depth(recall_ks: Sequence[int]) -> int:
    """How many documents to retrieve per query so that every metric sees its full cut-off."""
    return max(10, *recall_ks)


def _measures(recall_ks: Sequence[int]) -> dict[str, object]:
    try:
        import ir_measures
    except ImportError:
        raise FeatureUnavailableError(
            "lfm2edge eval computes its metrics with ir-measures, which is not installed: "
            "pip install 'lfm2edge[eval]'"
        ) from None
    measures = {HEADLINE: ir_measures.nDCG @ 10}
    measures.update({f"Recall@{k}": ir_measures.R @ k for k in recall_ks})
    measures["MRR@10"] = ir_measures.RR @ 10
    return measures


def score_run(qrels: Qrels, run: Run, recall_ks: Sequence[int] = (20, 100)) -> dict[str, float]:
    """The mean of each metric over the judged queries, in ``metric_names`` order."""
    import ir_measures

    if not qrels:
        raise InvalidInputError("no judged queries to score; the qrels are empty")
    measures = _measures(recall_ks)
    per_query: dict[object, float] = {m: 0.0 for m in measures.values()}
    # Only the judged queries, each with at least one entry, so that trec_eval averages over all of them.
    judged_run = {q: dict(run[q]) for q in qrels if run.get(q)}
    found = ir_measures.iter_calc(list(measures.values()), dict(qrels), judged_run) if judged_run else []
    for metric in found:
        per_query[metric.measure] += metric.value
    return {name: per_query[m] / len(qrels) for name, m in measures.items()}


def check_trec_ids(ids: Sequence[str], where: str) -> None:
    """A TREC run is whitespace-separated: an id with a space in it cannot be written to one."""
    bad = next((i for i in ids if any(c.isspace() for c in i)), None)
    if bad is not None:
        raise InvalidInputError(
            f"{where} has the id {bad!r}, with whitespace, which a TREC run file cannot hold; "
            "leave out --save-run or rename the id"
        )


def trec_run_lines(run: Run, tag: str) -> list[str]:
    """``qid Q0 docid rank score tag`` lines, best first per query (the format trec_eval reads)."""
    tag = "".join(c if c.isalnum() or c in "._-" else "_" for c in tag) or "lfm2edge"
    lines = []
    for query_id, scores in run.items():
        ranked = sorted(scores.items(), key=lambda item: -item[1])
        for rank, (doc_id, score) in enumerate(ranked, 1):
            lines.append(f"{query_id} Q0 {doc_id} {rank} {score:.6f} {tag}")
    return lines


def write_atomically(path: Path, data: bytes) -> None:
    """Write under a temporary name beside ``path``, then rename: never a half-written file."""
    tmp = path.with_name(f".{path.name}.tmp-{secrets.token_hex(4)}")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
