"""Batched encoding with and without lfm2edge's patches, in one run.

    python -m lfm2edge.bench.batching MODEL.gguf --against /path/to/stock/venv/bin/python

Measures ColBERT queries (32 tokens) at batch 1, 8, 16 and 32 and documents (256 tokens) at
batch 1 and 8 (each batch one decode call): throughput (texts/s) and per-call p50/p95. Each build runs in its own
process, one after the other on the same inputs; ``--against`` names the interpreter of the
other build. Make one with the stock binding:

    python -m venv /tmp/stock && LFM2EDGE_PATCHES=0 python patches/build.py --python /tmp/stock/bin/python
    /tmp/stock/bin/pip install --no-deps -e .
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

import numpy as np

QUERY_BATCHES = (1, 8, 16, 32)
DOCUMENT_BATCHES = (1, 8)


def _measure(call, texts: list[str], batch: int, rounds: int) -> dict:
    """Encode ``texts`` in calls of ``batch`` texts, ``rounds`` times: per-call latency and throughput."""
    call(texts[:batch], batch)  # warm-up
    per_call, total = [], 0.0
    for _ in range(rounds):
        for start in range(0, len(texts), batch):
            t = time.perf_counter()
            call(texts[start : start + batch], batch)
            per_call.append(time.perf_counter() - t)
        total += sum(per_call[-(len(texts) // batch) :])
    ms = np.asarray(per_call) * 1e3
    return {
        "batch": batch,
        "calls": len(per_call),
        "texts_per_s": rounds * len(texts) / total,
        "p50_ms": float(np.percentile(ms, 50)),
        "p95_ms": float(np.percentile(ms, 95)),
    }


def worker(model: str, threads: int | None, n_queries: int, n_documents: int, rounds: int) -> dict:
    import lfm2edge
    from lfm2edge.bench.inputs import make_documents, make_queries

    # room for the largest batch in one decode call, so each row measures the batch it names
    tokens = max(32 * max(QUERY_BATCHES), 256 * max(DOCUMENT_BATCHES))
    enc = lfm2edge.load(model, n_threads=threads, max_batch_tokens=tokens)

    def count(text: str) -> int:
        return len(enc.tokenize(text)) + 1  # BOS + text + the [Q]/[D] marker

    queries = make_queries(count, 32, n_queries, seed=0)
    documents = make_documents(count, 256, n_documents, seed=0)
    result = {
        "build": enc.build.describe(),
        "no_memory": not enc._ctx.has_memory,
        "query_expansion": getattr(enc, "query_expansion", None),
        "queries": [_measure(lambda t, b: enc.encode_query(t, batch_size=b), queries, b, rounds) for b in QUERY_BATCHES],
        "documents": [
            _measure(lambda t, b: enc.encode_document(t, batch_size=b), documents, b, 1) for b in DOCUMENT_BATCHES
        ],
    }
    enc.close()
    return result


def _run(python: str, args: argparse.Namespace) -> dict:
    cmd = [python, "-m", "lfm2edge.bench.batching", args.model, "--worker", "--rounds", str(args.rounds),
           "--queries", str(args.queries), "--documents", str(args.documents)]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{python} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _print(results: list[dict]) -> None:
    for r in results:
        print(f"\n{r['build']}\n  no-memory batching: {r['no_memory']}, query expansion: {r['query_expansion']}")
        print(f"  {'input':10} {'batch':>5} {'texts/s':>9} {'p50 ms':>9} {'p95 ms':>9}")
        for kind in ("queries", "documents"):
            for row in r[kind]:
                print(f"  {kind:10} {row['batch']:>5} {row['texts_per_s']:>9.2f} {row['p50_ms']:>9.1f} {row['p95_ms']:>9.1f}")
    if len(results) == 2:
        print("\nthroughput ratio (first / second):")
        for kind in ("queries", "documents"):
            for a, b in zip(results[0][kind], results[1][kind], strict=True):
                print(f"  {kind:10} batch {a['batch']:>3}: {a['texts_per_s'] / b['texts_per_s']:.2f}x")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", help="a ColBERT GGUF")
    parser.add_argument("--against", help="the Python interpreter of another build (e.g. the stock one)")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--queries", type=int, default=64)
    parser.add_argument("--documents", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args.model, args.threads, args.queries, args.documents, args.rounds)))
        return 0
    results = [_run(sys.executable, args)] + ([_run(args.against, args)] if args.against else [])
    _print(results)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
