"""Documents/s of ``lfm2edge.distributed`` on a local Ray: ``python -m lfm2edge.bench.ray_rate --model GGUF``.

Three sides on the same documents (the FAQ answers shipped with the runtime, repeated to ``--documents``):
the in-process encoder (``encode_document`` with every core, the model already loaded), and
``encode_corpus`` to Parquet shards with 1 actor of 2 CPUs and with 2 actors of 1 CPU. Each Ray run
counts from the first block sent to the last one written, the actors' start (a process, the import,
loading the GGUF) included. The sides alternate over ``--repeats`` rounds, so a drifting machine
affects them alike; what other processes used of the CPUs in the 3 s before the run is reported.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np

from lfm2edge.bench.machine import system_busy_seconds


def _documents(n: int) -> list[dict]:
    import lfm2edge

    faq = Path(lfm2edge.runtime.__file__).parent / "data" / "faq.jsonl"
    answers = [json.loads(line)["answer"] for line in faq.open(encoding="utf-8")]
    return [{"id": f"d{i}", "text": answers[i % len(answers)]} for i in range(n)]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m lfm2edge.bench.ray_rate", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="the GGUF to encode with")
    p.add_argument("--documents", type=int, default=60)
    p.add_argument("--batch-size", type=int, default=5, help="documents per actor call")
    p.add_argument("--repeats", type=int, default=2)
    args = p.parse_args(argv)

    import ray

    import lfm2edge
    from lfm2edge.distributed import encode_corpus

    docs = _documents(args.documents)
    work = Path(tempfile.mkdtemp(prefix="lfm2edge-ray-rate-"))
    corpus = work / "docs.jsonl"
    corpus.write_text("".join(json.dumps(d) + "\n" for d in docs), encoding="utf-8")
    busy0 = system_busy_seconds()
    time.sleep(3.0)
    others = (system_busy_seconds() - busy0) / 3.0 if busy0 is not None else float("nan")
    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR")
    rates: dict[str, list[float]] = {"in-process (2 threads)": [], "Ray 1 actor x 2 CPUs": [], "Ray 2 actors x 1 CPU": []}
    try:
        for r in range(args.repeats):
            with lfm2edge.load(args.model, n_threads=2) as encoder:
                start = time.perf_counter()
                encoder.encode_document([d["text"] for d in docs])
                rates["in-process (2 threads)"].append(len(docs) / (time.perf_counter() - start))
            for name, actors, cpus in (("Ray 1 actor x 2 CPUs", 1, 2), ("Ray 2 actors x 1 CPU", 2, 1)):
                out = work / f"{r}-{actors}x{cpus}"
                result = encode_corpus(args.model, corpus, out, actors=actors, cpus_per_actor=cpus,
                                       batch_size=args.batch_size)
                rates[name].append(result.documents_per_second)
    finally:
        ray.shutdown()
    print(f"{args.documents} documents, {args.repeats} rounds; other processes used {others:.2f} cores before")
    print(f"{'side':26s} {'docs/s (median)':>16s}  runs")
    for name, values in rates.items():
        print(f"{name:26s} {np.median(values):16.2f}  {', '.join(f'{v:.2f}' for v in values)}")


if __name__ == "__main__":
    main()
