"""Sides interleaved call by call, quiet and under contention: ``python -m lfm2edge.bench.contention GGUF...``.

The main bench measures sides one after another; a VM whose speed drifts by 2x between minutes
makes the busy/quiet ratio of one side hard to compare with another's. Here every side lives in its
own process, loaded once, and the sides take turns call by call (in a new random order each
round), first on a quiet machine, then while another process keeps one core busy (``load.busy_core``).
Every call follows an idle gap, as a person's queries do.

Sides (``--sides``): ``adaptive`` (lfm2edge's default: threads follow the CPU other processes leave),
``fixed`` (all threads, every decode), ``fixed-nospin`` (the same with ``GOMP_SPINCOUNT=0``), ``one``
(one thread), and the peers, graphs exported by ``lfm2edge bench --peers onnxruntime,openvino`` (with
``--checkpoint``, which prepares their texts): ``openvino`` (its default precision) and ``openvino-f32``
from ``--openvino MODEL.xml``, ``onnxruntime`` from ``--onnx MODEL.onnx``. Given several GGUFs (formats of
one checkpoint), every thread policy runs each of them, as "<policy> <file name>". Given ``--weight-kernel
OPTION`` (comma-separated load options), every llama.cpp side of a GGUF that option takes runs once more
with it, as "... +OPTION". Given ``--build NAME=DIR``
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

POLICIES = ("adaptive", "fixed", "fixed-nospin", "one")
PEERS = ("openvino", "openvino-f32", "onnxruntime")  # the first two from --openvino, the last from --onnx
SIDES = POLICIES + PEERS


@dataclass(frozen=True)
class SideConfig:
    name: str  # the label; for llama.cpp sides "<policy>" or "<policy> <file name>"
    gguf: str
    threads: int
    graph: str | None = None  # a peer's exported graph (model.xml, model.onnx)
    checkpoint: str | None = None
    build: str | None = None  # a folder with another llama.cpp build's libraries (LLAMA_CPP_LIB_PATH)
    weight_kernel: str | None = None  # a load option of the llama.cpp side (split_f32, ozaki_f32, ...)


def _side_env(name: str) -> dict[str, str]:
    return {"GOMP_SPINCOUNT": "0"} if name == "fixed-nospin" else {}


def _worker(config: SideConfig, conn) -> None:
    """One side's process: load, answer "ready", then time each text it is sent."""
    policy = config.name.split()[0]
    os.environ.update(_side_env(policy))
    if config.build:
        os.environ["LLAMA_CPP_LIB_PATH"] = config.build  # read when llama_cpp is first imported
    if policy in PEERS:
        from lfm2edge.bench.peer_side import GraphEngine, onnxruntime_graph, openvino_graph

        if policy == "onnxruntime":
            run_graph, _ = onnxruntime_graph(Path(config.graph), config.threads)
        else:
            fmt = "f32" if policy == "openvino-f32" else "default"
            run_graph, _ = openvino_graph(Path(config.graph), fmt, config.threads)
        engine = GraphEngine(Path(config.checkpoint), run_graph, "pylate")

        def encode(kind: str, text: str) -> None:
            engine.encode_query(text) if kind == "query" else engine.encode_documents([text], 1)
    else:
        import lfm2edge

        kernel = {config.weight_kernel: True} if config.weight_kernel else {}
        enc = lfm2edge.load(config.gguf, n_threads=1 if policy == "one" else config.threads,
                            adaptive_threads=policy == "adaptive", **kernel)

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


def side_configs(policies: list[str], ggufs: list[str], threads: int, graphs: dict[str, str] | None = None,
                 checkpoint: str | None = None, builds: dict[str, str] | None = None,
                 weight_kernels: list[str] | None = None) -> list[SideConfig]:
    """Every llama.cpp policy over every GGUF (named by file when there are several), plain and with each
    weight kernel that takes the file ("+OPTION"), and every build (named "@NAME"; none given: the installed
    one), then the peers (``graphs``: peer -> graph); the first GGUF's tokenizer counts the texts."""
    from lfm2edge.runtime.core.llama import weight_kernel_named
    from lfm2edge.runtime.core.model_file import describe

    kernels = [weight_kernel_named(k) for k in weight_kernels or []]
    configs = []
    for policy in policies:
        if policy in PEERS:
            configs.append(SideConfig(policy, ggufs[0], threads, (graphs or {})[policy], checkpoint))
            continue
        for g in ggufs:
            name = policy if len(ggufs) == 1 else f"{policy} {Path(g).name}"
            weight_type = describe(g).matmul_weight_type
            for kernel in [None, *(k for k in kernels if k.weight_type == weight_type)]:
                label, option = (f"{name} +{kernel.option}", kernel.option) if kernel else (name, None)
                if not builds:
                    configs.append(SideConfig(label, g, threads, weight_kernel=option))
                configs += [SideConfig(f"{label} @{b}", g, threads, build=d, weight_kernel=option)
                            for b, d in (builds or {}).items()]
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
    ap.add_argument("--onnx", help="an ONNX graph (model.onnx) of the same checkpoint")
    ap.add_argument("--checkpoint", help="the checkpoint that prepares the peer sides' texts")
    ap.add_argument("--weight-kernel", default="", help="load options to run every llama.cpp side of a GGUF they "
                    "take once more with, comma-separated (split_f32, dynamic_int8, ozaki_f32)")
    ap.add_argument("--rounds", type=int, default=40)
    ap.add_argument("--doc-rounds", type=int, default=10)
    ap.add_argument("--gap", type=float, default=0.5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path)
    ap.add_argument("--build", type=_build_arg, action="append", metavar="NAME=DIR",
                    help="run the llama.cpp sides on the build whose libraries are in DIR (repeatable)")
    args = ap.parse_args()
    names = [s.strip() for s in args.sides.split(",") if s.strip()]
    graphs = {"openvino": args.openvino, "openvino-f32": args.openvino, "onnxruntime": args.onnx}
    unknown = [n for n in names if n not in SIDES]
    missing = [n for n in names if n in PEERS and not (graphs[n] and args.checkpoint)]
    if unknown or missing:
        ap.error(f"sides are among {', '.join(SIDES)}; openvino and openvino-f32 need --openvino and --checkpoint, "
                 "onnxruntime --onnx and --checkpoint")
    kernels = [k.strip() for k in args.weight_kernel.split(",") if k.strip()]
    configs = side_configs(names, args.gguf, args.threads, graphs, args.checkpoint,
                           dict(args.build) if args.build else None, kernels)
    result = run(configs, args.rounds, args.doc_rounds, args.gap, args.seed)
    print_table(result)
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
