"""Search as the collection grows: ``python -m lfm2edge.bench.scale --model COLBERT.gguf``.

For each collection size it builds (once, cached under ``--work``) a Qdrant Edge index of catalog-like
synthetic ColBERT vectors (``bench.scale_data``: clustered, not random) and, up to ``--exact-up-to``
documents, the exact index of the same vectors. Then it measures, query by query:

- the query encode of a real text by the full-size model (``--model``), then the search of a synthetic
  query vector with k=10: the exact index, and Qdrant with each ``--candidates`` value (0 = MaxSim over
  every document). Sides take turns query by query, so a drifting machine affects them alike.
- recall@10 of each side against exact MaxSim over every stored (float16) vector, computed by
  streaming the chunks through lfm2edge's MaxSim kernel;
- the search process's peak RSS (the index is built in a child process, so building does not count)
  and the index size on disk.

The goal it reports against (issue #14): at 1M x 32-token documents, p95 of query encode + search
<= 3x p95 of the query encode alone, at recall@10 >= 0.95, within 8 GB of RSS.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import shutil
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from lfm2edge.bench.machine import system_busy_seconds
from lfm2edge.bench.memory import rss
from lfm2edge.bench.scale_data import DIM, Catalog, CatalogSpec
from lfm2edge.bench.stats import Summary

DONE = "built.json"  # written last into a finished build folder
K = 10


@dataclass(frozen=True)
class Build:
    engine: str  # "qdrant" | "exact"
    documents: int
    tokens: int
    seconds: float  # adding every document
    optimize_seconds: float  # Qdrant's optimizer (HNSW) after the adds
    disk_bytes: int
    peak_rss_bytes: int


@dataclass(frozen=True)
class Side:
    name: str
    documents: int
    tokens: int
    recall_at_10: float
    search: Summary
    encode: Summary
    encode_and_search: Summary

    @property
    def ratio_p95(self) -> float:
        return self.encode_and_search.p95_ms / self.encode.p95_ms


# ----------------------------------------------------------------------------------------------------------
# Building (in a child process, so the search side's RSS is its own)
# ----------------------------------------------------------------------------------------------------------


def _build(engine: str, folder: str, spec: CatalogSpec, identity: str, out) -> None:
    from lfm2edge.runtime.core.settings import ModelKind
    from lfm2edge.runtime.storage.documents import IndexSettings
    from lfm2edge.runtime.storage.index import Index
    from lfm2edge.runtime.storage.qdrant_index import QdrantIndex

    model = IndexSettings(identity=identity, kind=ModelKind.LATE_INTERACTION, dim=DIM, model_path="scale-bench")
    catalog = Catalog(spec)
    index = (
        QdrantIndex.create_for(folder, model) if engine == "qdrant" else _exact_for(Index, Path(folder), model)
    )
    start = time.perf_counter()
    for i in range(catalog.chunks):
        vectors, _ = catalog.chunk(i)
        ids = [str(i * spec.chunk + j) for j in range(len(vectors))]
        # the default commit size: one Qdrant update per commit, and its WAL entry is replayed in memory
        # when the shard is opened (10k x 256-token documents in one update took 22 GB to reopen)
        index.add_vectors(list(vectors), ids)
    added = time.perf_counter() - start
    start = time.perf_counter()
    index.compact()
    optimized = time.perf_counter() - start
    index.close()
    out.put((added, optimized, rss()[1]))


def _exact_for(index_class, folder: Path, model):
    """An exact index for ``model`` without loading a model: the manifest names its identity."""
    from lfm2edge.runtime.storage.index_storage import FORMAT, FORMAT_VERSION, SEGMENTS, write_manifest

    (folder / SEGMENTS).mkdir(parents=True)
    manifest = {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "generation": 0,
        "model": {"identity": model.identity, "kind": model.kind.value, "dim": model.dim, "path": model.model_path},
        "storage": {"dtype": "float16", "pool_factor": 1, "store_texts": False},
        "next_id": 0,
        "segments": [],
    }
    write_manifest(folder, manifest)
    return index_class.open(folder)


def build(engine: str, work: Path, spec: CatalogSpec, identity: str) -> tuple[Path, Build]:
    folder = work / f"{engine}-{spec.documents}x{spec.tokens}-seed{spec.seed}"
    done = folder / DONE
    if done.is_file():
        return folder, Build(**json.loads(done.read_text()))
    shutil.rmtree(folder, ignore_errors=True)
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    target = str(folder / "index")
    folder.mkdir(parents=True)
    child = ctx.Process(target=_build, args=(engine, target, spec, identity, out))
    child.start()
    added, optimized, peak = out.get()
    child.join()
    disk = sum(p.stat().st_size for p in Path(target).rglob("*") if p.is_file())
    result = Build(engine, spec.documents, spec.tokens, added, optimized, disk, peak)
    done.write_text(json.dumps(asdict(result)))
    return folder, result


# ----------------------------------------------------------------------------------------------------------
# Ground truth and the timed comparison
# ----------------------------------------------------------------------------------------------------------


def exact_top(catalog: Catalog, queries: np.ndarray, k: int = K) -> list[set[str]]:
    """The exact top-k ids of each query over every stored (float16) document, streamed by chunk."""
    from lfm2edge.runtime.core.maxsim import PackedDocuments, maxsim

    spec = catalog.spec
    best = [np.empty(0, dtype=np.int64) for _ in queries]
    best_scores = [np.empty(0, dtype=np.float32) for _ in queries]
    for i in range(catalog.chunks):
        vectors, _ = catalog.chunk(i)
        packed = PackedDocuments(
            vectors.reshape(-1, DIM).astype(np.float16), np.arange(0, vectors.shape[0] * spec.tokens + 1, spec.tokens)
        )
        for q, query in enumerate(queries):
            scores = np.concatenate([best_scores[q], maxsim(query, packed)])
            ids = np.concatenate([best[q], i * spec.chunk + np.arange(len(vectors))])
            keep = np.argsort(-scores, kind="stable")[:k]
            best[q], best_scores[q] = ids[keep], scores[keep]
    return [{str(int(d)) for d in ids} for ids in best]


def measure(
    model: str, indexes: dict[str, object], candidates: dict[str, int | None], queries: np.ndarray,
    truth: list[set[str]], texts: list[str], documents: int, tokens: int, rounds: int,
) -> list[Side]:
    """Each round: every side in a new random order, each encoding a text then searching one query."""
    import lfm2edge

    encoder = lfm2edge.load(model)
    rng = np.random.default_rng(0)
    names = list(indexes)
    encode = {n: [] for n in names}
    total = {n: [] for n in names}
    search = {n: [] for n in names}
    found = {n: [] for n in names}
    for warm in range(2):  # warm-up: load pages and caches
        for n in names:
            _search(indexes[n], candidates[n], queries[warm % len(queries)])
        encoder.encode_query(texts[warm % len(texts)])
    for r in range(rounds):
        q = r % len(queries)
        for n in rng.permutation(names):
            t0 = time.perf_counter()
            encoder.encode_query(texts[r % len(texts)])
            t1 = time.perf_counter()
            hits = _search(indexes[n], candidates[n], queries[q])
            t2 = time.perf_counter()
            encode[n].append(t1 - t0)
            search[n].append(t2 - t1)
            total[n].append(t2 - t0)
            if r < len(queries):
                found[n].append(len({h.id for h in hits} & truth[q]) / K)
    encoder.close()
    return [
        Side(n, documents, tokens, float(np.mean(found[n])), Summary.of(np.array(search[n])),
             Summary.of(np.array(encode[n])), Summary.of(np.array(total[n])))
        for n in names
    ]


def _search(index, candidates: int | None, query: np.ndarray):
    if candidates is None:
        return index.search_vectors([query], k=K)[0]
    return index.search_vectors([query], k=K, candidates=candidates)[0]


def run_size(args, documents: int, tokens: int, identity: str, texts: list[str]) -> dict:
    from lfm2edge.runtime.storage.index import Index

    spec = CatalogSpec(documents=documents, tokens=tokens, seed=args.seed)
    catalog = Catalog(spec)
    builds = []
    qdrant_folder, b = build("qdrant", args.work, spec, identity)
    builds.append(b)
    indexes: dict[str, object] = {}
    candidates: dict[str, int | None] = {}
    if documents <= args.exact_up_to:
        exact_folder, b = build("exact", args.work, spec, identity)
        builds.append(b)
        indexes["exact"], candidates["exact"] = Index.open(exact_folder / "index"), None
    qdrant = Index.open(qdrant_folder / "index")
    for c in args.candidates:
        if c == 0 and documents > args.full_scan_up_to:
            continue
        indexes[f"qdrant c={c}"], candidates[f"qdrant c={c}"] = qdrant, c
    queries, _ = catalog.queries(args.queries, seed=1)
    t = time.perf_counter()
    cached = args.work / f"truth-{documents}x{tokens}-seed{args.seed}-{args.queries}.json"
    if cached.is_file():
        truth = [set(ids) for ids in json.loads(cached.read_text())]
    else:
        with ProcessPoolExecutor(1, mp_context=mp.get_context("spawn")) as pool:  # its memory is not the search's
            truth = pool.submit(exact_top, catalog, queries).result()
        cached.write_text(json.dumps([sorted(ids) for ids in truth]))
    truth_s = time.perf_counter() - t
    busy0, t0 = system_busy_seconds(), time.perf_counter()
    sides = measure(args.model, indexes, candidates, queries, truth, texts, documents, tokens, args.rounds)
    busy = (system_busy_seconds() - busy0) / (time.perf_counter() - t0) if busy0 is not None else None
    for index in {id(i): i for i in indexes.values()}.values():
        index.close()
    return {
        "documents": documents, "tokens": tokens, "builds": [asdict(b) for b in builds],
        "sides": [asdict(s) | {"ratio_p95": s.ratio_p95} for s in sides], "truth_seconds": truth_s,
        "search_process_peak_rss_bytes": rss()[1], "machine_busy_cores": busy,
    }


def print_size(result: dict) -> None:
    d, t = result["documents"], result["tokens"]
    print(f"\n{d:,} documents x {t} tokens (machine busy {result['machine_busy_cores'] or 0:.2f} cores, "
          f"search process peak RSS {result['search_process_peak_rss_bytes'] / 2**30:.2f} GiB)")
    for b in result["builds"]:
        print(f"  build {b['engine']:6s}: {b['documents'] / b['seconds']:8.0f} docs/s, optimize {b['optimize_seconds']:.1f} s, "
              f"{b['disk_bytes'] / 2**30:.2f} GiB on disk, build peak RSS {b['peak_rss_bytes'] / 2**30:.2f} GiB")
    print(f"  {'side':14s} {'recall@10':>9s} {'search p50':>10s} {'p95':>7s} {'encode p95':>10s} {'enc+search p95':>14s} {'ratio':>6s}")
    for s in result["sides"]:
        print(f"  {s['name']:14s} {s['recall_at_10']:9.3f} {s['search']['p50_ms']:10.1f} {s['search']['p95_ms']:7.1f} "
              f"{s['encode']['p95_ms']:10.1f} {s['encode_and_search']['p95_ms']:14.1f} {s['ratio_p95']:6.2f}")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m lfm2edge.bench.scale", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="the full-size ColBERT GGUF whose query encode is timed")
    p.add_argument("--sizes", default="10000x32,100000x32,1000000x32,10000x256,100000x256",
                   help="collections as DOCUMENTSxTOKENS, comma-separated")
    p.add_argument("--candidates", default="0,128,256,512", help="Qdrant candidate counts (0: every document)")
    p.add_argument("--queries", type=int, default=100, help="queries for recall (and timing rounds at least)")
    p.add_argument("--rounds", type=int, default=100, help="timed rounds per side")
    p.add_argument("--exact-up-to", type=int, default=100_000, help="build the exact index up to this size")
    p.add_argument("--full-scan-up-to", type=int, default=100_000, help="time candidates=0 up to this size")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--work", type=Path, default=Path.home() / ".cache/lfm2edge/bench/scale")
    p.add_argument("--json", type=Path, help="write the results here")
    p.add_argument("--build-only", action="store_true", help="build (and cache) the indexes, measure nothing")
    args = p.parse_args(argv)
    args.candidates = [int(c) for c in args.candidates.split(",")]
    args.work.mkdir(parents=True, exist_ok=True)

    import lfm2edge
    from lfm2edge.runtime.storage.documents import model_identity

    encoder = lfm2edge.load(args.model)
    identity = model_identity(encoder)
    encoder.close()
    texts = [json.loads(line)["question"] for line in (Path(lfm2edge.runtime.__file__).parent / "data/faq.jsonl").open()]
    results = []
    for size in args.sizes.split(","):
        documents, tokens = (int(x) for x in size.split("x"))
        if args.build_only:
            spec = CatalogSpec(documents=documents, tokens=tokens, seed=args.seed)
            for engine in ("qdrant", "exact") if documents <= args.exact_up_to else ("qdrant",):
                print(size, engine, build(engine, args.work, spec, identity)[1], flush=True)
            continue
        results.append(run_size(args, documents, tokens, identity, texts))
        print_size(results[-1])
        if args.json:
            args.json.write_text(json.dumps({"model": args.model, "results": results}, indent=1))


if __name__ == "__main__":
    main()
