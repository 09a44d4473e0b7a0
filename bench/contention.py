"""Sides interleaved call by call, quiet and under contention: ``python -m lfm2edge.bench.contention GGUF...``.

The main bench measures sides one after another; a VM whose speed drifts by 2x between minutes
makes the busy/quiet ratio of one side hard to compare with another's. Here every side lives in its
own process, loaded once, and the sides take turns call by call (in a new random order each
round), first on a quiet machine, then while another process keeps one core busy (``load.busy_core``).
Every call follows an idle gap, as a person's queries do.

Sides (``--sides``): ``adaptive`` (lfm2edge's default: threads follow the CPU other processes leave),
``fixed`` (all threads, every decode), ``fixed-nospin`` (the same with ``GOMP_SPINCOUNT=0``), ``one``
(one thread), and ``openvino`` (its default precision, from ``--openvino MODEL.xml`` exported by
``lfm2edge bench --peers openvino``, with ``--checkpoint``). Given several GGUFs (formats of one
checkpoint), every thread policy runs each of them, as "<policy> <file name>". Given ``--build NAME=DIR``
(repeatable; DIR holds a llama.cpp build's libllama and libggml*, such as a copy of the installed
``llama_cpp/lib`` or a CMake build's ``bin``), every llama.cpp side runs once per build, as "... @NAME":
two builds of a patch compared call by call, which one process cannot hold.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from lfm2edge.bench.load import busy_core
from lfm2edge.bench.machine import system_busy_seconds
from lfm2edge.bench.stats import Summary

SIDES = ("adaptive", "fixed", "fixed-nospin", "one", "openvino")


@dataclass(frozen=True)
class SideConfig:
    name: str  # the label; for llama.cpp sides "<policy>" or "<policy> <file name>"
    gguf: str
    threads: int
    openvino: str | None = None
    checkpoint: str | None = None
    build: str | None = None  # a folder with another llama.cpp build's libraries (LLAMA_CPP_LIB_PATH)


def _side_env(name: str) -> dict[str, str]:
    return {"GOMP_SPINCOUNT": "0"} if name == "fixed-nospin" else {}


def _worker(config: SideConfig, conn) -> None:
    """One side's process: load, answer "ready", then time each text it is sent."""
    policy = config.name.split()[0]
    os.environ.update(_side_env(policy))
    if config.build:
        os.environ["LLAMA_CPP_LIB_PATH"] = config.build  # read when llama_cpp is first imported
    if policy == "openvino":
        from lfm2edge.bench.peer_side import GraphEngine, openvino_graph

        run_graph, _ = openvino_graph(Path(config.openvino), "default", config.threads)
        engine = GraphEngine(Path(config.checkpoint), run_graph, "pylate")

        def encode(kind: str, text: str) -> None:
            engine.encode_query(text) if kind == "query" else engine.encode_documents([text], 1)
    else:
        import lfm2edge

        enc = lfm2edge.load(config.gguf, n_threads=1 if policy == "one" else config.threads,
                            adaptive_threads=policy == "adaptive")

        def encode(kind: str, text: str) -> None:
            enc.encode_query(text) if kind == "query" else enc.encode_document(text)

    encode("query", "a first query to warm up")
    conn.send(("ready", _loaded_library()))
    while (msg := conn.recv()) is not None:
        kind, text = msg
        t0 = time.perf_counter()
        encode(kind, text)
        conn.send(time.perf_counter() - t0)


def _loaded_library() -> str | None:
    """The libllama this process mapped (None for OpenVINO, or where /proc is absent)."""
    try:
        maps = Path("/proc/self/maps").read_text().splitlines()
    except OSError:
        return None
    return next((line.split()[-1] for line in maps if "/libllama.so" in line), None)


def _texts(gguf: str, seed: int) -> tuple[list[str], list[str]]:
    """32-token queries and 256-token documents, counted by the GGUF's own tokenizer."""
    import lfm2edge
    from lfm2edge.bench.llama_side import LlamaEngine
    from lfm2edge.bench.regimes import Plan, build_texts

    with lfm2edge.load(gguf, n_threads=1) as enc:
        texts = build_texts(LlamaEngine(enc), Plan(seed=seed))
    return list(texts.queries), list(texts.documents)


def run(configs: list[SideConfig], rounds: int, doc_rounds: int, gap_s: float, seed: int) -> dict:
    queries, documents = _texts(configs[0].gguf, seed)
    ctx = mp.get_context("spawn")
    sides = {}
    for c in configs:
        parent, child = ctx.Pipe()
        proc = ctx.Process(target=_worker, args=(c, child), daemon=True)
        proc.start()
        sides[c.name] = (proc, parent)
    libraries = {}
    for name, (_, conn) in sides.items():
        msg = conn.recv()
        if not (isinstance(msg, tuple) and msg[0] == "ready"):
            raise RuntimeError(f"side {name} did not start")
        libraries[name] = msg[1]
    rng = random.Random(seed)
    samples: dict[str, dict[str, list[float]]] = {n: {} for n in sides}
    other_share: dict[str, float | None] = {}

    def phase(label: str, kind: str, texts: list[str], n_rounds: int) -> None:
        busy0, t0 = system_busy_seconds(), time.perf_counter()
        own0 = sum(_cpu(p.pid) for p, _ in sides.values())
        for r in range(n_rounds):
            order = list(sides)
            rng.shuffle(order)
            for name in order:
                time.sleep(gap_s)
                conn = sides[name][1]
                conn.send((kind, texts[r % len(texts)]))
                samples[name].setdefault(label, []).append(conn.recv())
        busy1, wall = system_busy_seconds(), time.perf_counter() - t0
        own1 = sum(_cpu(p.pid) for p, _ in sides.values())
        if busy0 is not None and busy1 is not None:
            other_share[label] = max(0.0, (busy1 - busy0) - (own1 - own0)) / (wall * (os.cpu_count() or 1))

    try:
        phase("query quiet", "query", queries, rounds)
        with busy_core():
            phase("query busy", "query", queries, rounds)
        if doc_rounds:
            phase("document quiet", "document", documents, doc_rounds)
            with busy_core():
                phase("document busy", "document", documents, doc_rounds)
    finally:
        for proc, conn in sides.values():
            conn.send(None)
            proc.join(timeout=10)
            if proc.is_alive():
                proc.kill()
    summaries = {n: {label: asdict(Summary.of(np.array(s))) for label, s in by.items()} for n, by in samples.items()}
    return {"gap_s": gap_s, "rounds": rounds, "doc_rounds": doc_rounds, "other_cpu_share": other_share,
            "libraries": libraries, "sides": summaries}


def side_configs(policies: list[str], ggufs: list[str], threads: int, openvino: str | None = None,
                 checkpoint: str | None = None, builds: dict[str, str] | None = None) -> list[SideConfig]:
    """Every llama.cpp policy over every GGUF (named by file when there are several) and every build
    (named "@NAME"; none given: the installed one), then OpenVINO; the first GGUF's tokenizer counts the texts."""
    configs = []
    for policy in policies:
        if policy == "openvino":
            configs.append(SideConfig(policy, ggufs[0], threads, openvino, checkpoint))
            continue
        for g in ggufs:
            name = policy if len(ggufs) == 1 else f"{policy} {Path(g).name}"
            if not builds:
                configs.append(SideConfig(name, g, threads))
            configs += [SideConfig(f"{name} @{b}", g, threads, build=d) for b, d in (builds or {}).items()]
    return configs


def _build_arg(value: str) -> tuple[str, str]:
    name, sep, folder = value.partition("=")
    path = Path(folder).expanduser()
    if not (sep and name and path.is_dir()):
        raise argparse.ArgumentTypeError(f"expected NAME=DIR, DIR a folder of llama.cpp libraries; got {value!r}")
    return name, str(path.resolve())


def _cpu(pid: int) -> float:
    """CPU seconds of a process so far (its threads and reaped children), from /proc."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return sum(int(x) for x in fields[11:15]) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return 0.0


def print_table(result: dict) -> None:
    labels = ["query quiet", "query busy", "document quiet", "document busy"]
    print(f"gap {result['gap_s']} s, {result['rounds']} query rounds, {result['doc_rounds']} document rounds; "
          f"other processes' CPU share per phase (the busy phases' own competing process counts as other): "
          + ", ".join(f"{k} {v:.0%}" for k, v in result["other_cpu_share"].items() if v is not None))
    if len({lib for lib in result.get("libraries", {}).values() if lib}) > 1:
        print("llama.cpp builds: " + "; ".join(f"{n}: {lib}" for n, lib in result["libraries"].items() if lib))
    width = max(14, *(len(n) + 2 for n in result["sides"]))
    print(f"{'side':<{width}}" + "".join(f"{lab + ' p50/p95':>26}" for lab in labels) + f"{'busy/quiet q p50/p95':>24}")
    for name, by in result["sides"].items():
        cells = []
        for lab in labels:
            s = by.get(lab)
            cells.append(f"{s['p50_ms']:>12.1f} / {s['p95_ms']:<10.1f}" if s else f"{'-':>26}")
        q, b = by.get("query quiet"), by.get("query busy")
        ratio = f"{b['p50_ms'] / q['p50_ms']:.2f} / {b['p95_ms'] / q['p95_ms']:.2f}" if q and b else "-"
        print(f"{name:<{width}}" + "".join(cells) + f"{ratio:>24}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("gguf", nargs="+", help="one or more GGUFs of the same checkpoint")
    ap.add_argument("--sides", default="adaptive,fixed,fixed-nospin,one")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--openvino", help="an OpenVINO IR (model.xml) of the same checkpoint")
    ap.add_argument("--checkpoint", help="the checkpoint that prepares the OpenVINO side's texts")
    ap.add_argument("--rounds", type=int, default=40)
    ap.add_argument("--doc-rounds", type=int, default=10)
    ap.add_argument("--gap", type=float, default=0.5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path)
    ap.add_argument("--build", type=_build_arg, action="append", metavar="NAME=DIR",
                    help="run the llama.cpp sides on the build whose libraries are in DIR (repeatable)")
    args = ap.parse_args()
    names = [s.strip() for s in args.sides.split(",") if s.strip()]
    unknown = [n for n in names if n not in SIDES]
    if unknown or ("openvino" in names and not (args.openvino and args.checkpoint)):
        ap.error(f"sides are among {', '.join(SIDES)}; openvino needs --openvino and --checkpoint")
    configs = side_configs(names, args.gguf, args.threads, args.openvino, args.checkpoint,
                           dict(args.build) if args.build else None)
    result = run(configs, args.rounds, args.doc_rounds, args.gap, args.seed)
    print_table(result)
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
