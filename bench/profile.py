"""Where one encode's time goes: per ggml op, per weight matmul and per layer, from llama.cpp itself.

    python -m lfm2edge.bench.profile MODEL.gguf [--tokens 32,256] [--repeat 5] [--json out.json]
    python -m lfm2edge.bench.profile MODEL.gguf --ab-extra-buffers [--repeat 9]   # AMX on vs off
    perf record -g -- python -m lfm2edge.bench.profile MODEL.gguf --tokens 32 --loop 30

For each input length N it encodes one text of exactly N positions (a ColBERT query when N is
the model's query length, otherwise a document) twice over:

- **normal**: ``encoder.encode_query`` / ``encode_document`` as an application calls them; the
  wall time end to end and the time inside ``llama_decode`` (the rest is Python: tokenizing,
  batch building, copying and normalising rows);
- **node by node**: the same token ids through a second context of the same model with an
  eval callback (llama.cpp's ``cb_eval``). Answering True to every "ask" makes ggml's scheduler
  compute one graph node at a time and call back after each, so the time from our answer to
  the next callback is that node's time. Each node becomes its own OpenMP parallel region, and
  RMS_NORM + MUL are no longer fused, so the node-by-node decode is a little slower than the
  normal one: both totals are reported.

Per-node times are medians over ``--repeat`` decodes (robust to the odd preemption on a small
machine). Every MUL_MAT gets its FLOPs (2·K·N·M per batch) and achieved GFLOP/s. The outputs
of the callback context are compared with the normal context's (the hook must not change them).

``--ab-extra-buffers`` loads the file twice, with llama.cpp's CPU extra buffer types (AMX,
repack) on and off, and alternates their encodes run by run, so drift on a shared machine hits
both alike. ``--loop N`` only encodes the first case N times, for ``perf record``; with
PERF_CTL_FIFO / PERF_ACK_FIFO set (``perf record -D -1 --control fifo:CTL,ACK``) sampling covers
the loop alone, not loading or warm-up.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import re
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

# ggml.h at llama.cpp 0c1e570 (the pinned binding): GGML_MAX_DIMS 4, GGML_MAX_OP_PARAMS 64,
# GGML_MAX_SRC 10, GGML_MAX_NAME 64. Only read, never allocated.
GGML_MAX_DIMS, GGML_MAX_SRC = 4, 10


class GgmlTensor(ctypes.Structure):
    _fields_ = [
        ("type", ctypes.c_int),
        ("buffer", ctypes.c_void_p),
        ("ne", ctypes.c_int64 * GGML_MAX_DIMS),
        ("nb", ctypes.c_size_t * GGML_MAX_DIMS),
        ("op", ctypes.c_int),
        ("op_params", ctypes.c_int32 * 16),
        ("flags", ctypes.c_int32),
        ("src", ctypes.c_void_p * GGML_MAX_SRC),
        ("view_src", ctypes.c_void_p),
        ("view_offs", ctypes.c_size_t),
        ("data", ctypes.c_void_p),
        ("name", ctypes.c_char * 64),
        ("extra", ctypes.c_void_p),
        ("padding", ctypes.c_char * 8),
    ]


# ggml ops that compute nothing on the CPU (ggml_op_is_empty): their time is the per-node floor.
NOOP_OPS = frozenset({"NONE", "VIEW", "RESHAPE", "PERMUTE", "TRANSPOSE"})
WEIGHT_NAME = re.compile(r"^(?:blk\.(\d+)\.)?(.+)\.weight$")
LAYER_SUFFIX = re.compile(r"^(.*?)-(\d+)((?: \([a-z]+\))*)$")  # "kq-2", "Qcur-2 (reshaped)"
OUTPUT_NAMES = re.compile(r"^(norm|result_\w+)\b")  # the final norm and the head come after the last layer


def _ggml_base() -> ctypes.CDLL:
    """libggml-base of the libllama llama_cpp loaded (the same file, so the same copy in memory)."""
    import llama_cpp as ll

    lib_dir = Path(ll.llama_cpp._lib._name).resolve().parent
    for name in ("libggml-base.so", "libggml-base.dylib", "ggml-base.dll"):
        if (lib_dir / name).exists():
            lib = ctypes.CDLL(str(lib_dir / name))
            break
    else:
        raise RuntimeError(f"no libggml-base next to {ll.llama_cpp._lib._name}")
    lib.ggml_op_desc.restype = ctypes.c_char_p  # op name, with the unary/GLU kind spelled out
    lib.ggml_op_desc.argtypes = [ctypes.c_void_p]
    lib.ggml_type_name.restype = ctypes.c_char_p
    lib.ggml_type_name.argtypes = [ctypes.c_int]
    return lib


@dataclass(frozen=True)
class Node:
    """One graph node as llama.cpp computed it, with where it belongs."""

    index: int
    name: str
    op: str  # ggml_op_desc: MUL_MAT, RMS_NORM, SWIGLU, ...
    type: str
    shape: tuple[int, ...]
    layer: str  # "input", "0".."15", "output"
    component: str  # what the node is part of, e.g. "matmul ffn_gate", "short conv (elementwise)"
    weight: str | None = None  # MUL_MAT: the weight's short name (attn_q, shortconv.in_proj, ...)
    weight_type: str | None = None
    mnk: tuple[int, int, int, int] | None = None  # MUL_MAT: (M rows, N outputs, K inner, batch)

    @property
    def flops(self) -> int:
        if self.mnk is None:
            return 0
        m, n, k, b = self.mnk
        return 2 * m * n * k * b


class Recorder:
    """The eval callback: says yes to every node and times each one alone."""

    def __init__(self, lib: ctypes.CDLL):
        self._lib = lib
        self._ready_ns = 0
        self.raw: list[tuple] = []  # per node: (description, ns)
        self.error: BaseException | None = None

    def __call__(self, address: int, ask: bool) -> bool:
        if ask:
            self._ready_ns = time.perf_counter_ns()  # last thing before the scheduler computes the node
            return True
        elapsed = time.perf_counter_ns() - self._ready_ns
        try:
            self.raw.append((self._describe(address), elapsed))
        except Exception as e:  # noqa: BLE001 - ctypes would swallow it and stop the decode silently
            self.error = e
        return True

    def _describe(self, address: int) -> tuple:
        t = GgmlTensor.from_address(address)
        srcs = []
        for i in range(2):
            if t.src[i]:
                s = GgmlTensor.from_address(t.src[i])
                srcs.append((s.name.decode(errors="replace"), self._type(s.type), tuple(s.ne)))
            else:
                srcs.append(None)
        op = self._lib.ggml_op_desc(address).decode()
        return (t.name.decode(errors="replace"), op, self._type(t.type), tuple(t.ne), srcs[0], srcs[1])

    def _type(self, type_id: int) -> str:
        return self._lib.ggml_type_name(type_id).decode()


def classify(raw: list[tuple]) -> list[Node]:
    """Layer and component of every node, from its name, op and weight (graph order carries context).

    llama.cpp names most nodes "<what>-<layer>"; unnamed ones ("node_42", views) belong to the
    layer of the named node before them. Between a mixer's input projection and its output
    projection, elementwise nodes belong to that mixer (short conv or attention).
    """
    nodes = []
    layer, region = "input", ""
    for i, (name, op, type_, shape, src0, src1) in enumerate(raw):
        m = LAYER_SUFFIX.match(name)
        if m:
            layer = m.group(2)
        elif layer != "input" and OUTPUT_NAMES.match(name):
            layer = "output"
        weight = weight_type = mnk = None
        if src0 is not None:
            w = WEIGHT_NAME.match(src0[0])
            if w:
                weight, weight_type = w.group(2), src0[1]
        if op == "MUL_MAT":
            k = src0[2][0]
            mnk = (shape[1], shape[0], k, shape[2] * shape[3])
            if weight is not None:
                component = f"matmul {weight}"
                if weight in ("shortconv.in_proj", "attn_q"):
                    region = "conv" if weight.startswith("shortconv") else "attention"
                elif weight in ("shortconv.out_proj", "attn_output"):
                    region = ""
            else:  # activations times activations: attention scores and their weighted sum
                base = m.group(1) if m else name
                component, weight_type = f"attention {base}", src0[1]
        elif op in NOOP_OPS:
            component = "no-op (view/reshape/permute)"
        elif op == "RMS_NORM" or (op == "MUL" and src1 is not None and src1[0].endswith("norm.weight")):
            component = "norms (rms_norm + weight)"
        elif op == "GET_ROWS":
            component = "embedding lookup" if weight == "token_embd" else "output row selection"
        elif region == "conv":
            component = "short conv (elementwise)"
        elif region == "attention":
            component = {"SOFT_MAX": "attention softmax", "ROPE": "attention rope",
                         "FLASH_ATTN_EXT": "attention (flash)"}.get(op, "attention copies")
        elif op in ("SWIGLU", "GEGLU", "REGLU", "GLU", "SILU"):
            component = "ffn swiglu"
        elif op == "ADD":
            component = "residual add"
        else:
            component = f"other {op}"
        nodes.append(Node(i, name, op, type_, tuple(shape), layer, component,
                          weight if op == "MUL_MAT" else None, weight_type if op == "MUL_MAT" else None, mnk))
    return nodes


@dataclass
class Row:
    key: str
    count: int  # nodes per decode
    ms: float
    share: float  # of the node-by-node total
    flops: int = 0
    gflops_per_s: float | None = None
    detail: str = ""


@dataclass
class CaseProfile:
    kind: str  # "query" / "document"
    tokens: int
    repeats: int
    nodes: int
    node_total_ms: float  # sum of the per-node medians
    node_decode_ms: float  # llama_decode wall of the node-by-node context, median
    normal_ms: float  # encode end to end, callback-free, median
    normal_decode_ms: float  # llama_decode inside it, median
    python_ms: float  # median of (end to end - llama_decode)
    node_floor_us: float  # median time of the no-op nodes: what one node costs for doing nothing
    matmul_gflop: float
    matmul_ms: float
    max_abs_diff: float  # callback context vs normal context, same ids
    by_op: list[Row] = field(default_factory=list)
    by_component: list[Row] = field(default_factory=list)
    by_layer: list[Row] = field(default_factory=list)
    other_cpu_share: float | None = None  # share of the machine other processes used meanwhile


def _rows(keys: list[str], nodes: list[Node], ms: np.ndarray, total: float, details: dict[str, str]) -> list[Row]:
    rows: dict[str, Row] = {}
    for key, node, t in zip(keys, nodes, ms, strict=True):
        r = rows.setdefault(key, Row(key, 0, 0.0, 0.0, detail=details.get(key, "")))
        r.count += 1
        r.ms += float(t)
        r.flops += node.flops
    for r in rows.values():
        r.share = r.ms / total if total > 0 else 0.0
        r.gflops_per_s = r.flops / (r.ms * 1e6) if r.flops and r.ms > 0 else None
    return sorted(rows.values(), key=lambda r: -r.ms)


def _op_key(n: Node) -> str:
    if n.op == "MUL_MAT":
        return f"MUL_MAT {n.weight or n.component.removeprefix('attention ')}"
    return n.op


def summarize(nodes: list[Node], ms: np.ndarray) -> tuple[list[Row], list[Row], list[Row]]:
    """Rows per op (MUL_MAT per weight), per component and per layer; ``ms`` per node."""
    total = float(ms.sum())
    details = {}
    for n in nodes:
        if n.mnk is not None:
            m, nn, k, b = n.mnk
            details.setdefault(_op_key(n), f"{n.weight_type} K={k} N={nn} M={m}" + (f" x{b}" if b > 1 else ""))
    by_op = _rows([_op_key(n) for n in nodes], nodes, ms, total, details)
    by_component = _rows([n.component for n in nodes], nodes, ms, total, {})
    order = {"input": -1, "output": 10**6}
    layer_keys = [n.layer for n in nodes]
    by_layer = _rows(layer_keys, nodes, ms, total, {})
    for r in by_layer:
        kinds = {n.component for n in nodes if n.layer == r.key}
        r.detail = ("attention" if "matmul attn_q" in kinds else "short conv" if "matmul shortconv.in_proj" in kinds
                    else "")
    by_layer.sort(key=lambda r: order.get(r.key, int(r.key) if r.key.isdigit() else 0))
    return by_op, by_component, by_layer


@contextlib.contextmanager
def decode_timer() -> Iterator[list[int]]:
    """Nanoseconds of every llama_decode the runtime makes meanwhile.

    lfm2edge.runtime.core.llama calls ``llama_cpp.llama_decode`` through the module at each call,
    so a wrapper there times exactly the C call without touching the runtime.
    """
    import llama_cpp as ll

    original = ll.llama_decode
    times: list[int] = []

    def timed(ctx, batch):
        t0 = time.perf_counter_ns()
        rc = original(ctx, batch)
        times.append(time.perf_counter_ns() - t0)
        return rc

    ll.llama_decode = timed
    try:
        yield times
    finally:
        ll.llama_decode = original


def make_text(encoder, kind: str, tokens: int) -> str:
    from lfm2edge.bench.inputs import make_documents, make_queries
    from lfm2edge.bench.llama_side import LlamaEngine

    engine = LlamaEngine(encoder)
    if kind == "query":
        return make_queries(engine.query_length, tokens, 1, seed=0)[0]
    return make_documents(engine.document_length, tokens, 1, seed=0)[0]


def _prepare(encoder, kind: str, text: str) -> tuple[np.ndarray, np.ndarray | None]:
    """The token ids (and attention-key flags) the encoder decodes for this text."""
    from lfm2edge.runtime.core.encoders import ColBERTEncoder

    if isinstance(encoder, ColBERTEncoder) and kind == "query":
        ids, keys = encoder.prepare_query_with_keys(text)
        return ids, keys if encoder.query_expansion == "pylate" else None
    return (encoder.prepare_query(text) if kind == "query" else encoder.prepare_document(text)), None


class ForeignCpu:
    """Share of the machine's CPU that other processes used between construction and ``share()``.

    On a 2-core machine another process on one core stalls ggml's OpenMP barriers: an encode
    can take several times longer, so every result says how quiet the machine was.
    """

    def __init__(self) -> None:
        from lfm2edge.bench.machine import system_busy_seconds

        self._busy = system_busy_seconds
        self._start = (system_busy_seconds(), _own_cpu(), time.perf_counter())

    def share(self) -> float | None:
        import os

        busy0, own0, t0 = self._start
        busy1, own1, wall = self._busy(), _own_cpu(), time.perf_counter() - t0
        if busy0 is None or busy1 is None or wall <= 0:
            return None
        return min(1.0, max(0.0, ((busy1 - busy0) - (own1 - own0)) / (wall * (os.cpu_count() or 1))))


def profile_case(encoder, kind: str, tokens: int, repeats: int) -> CaseProfile:
    """Normal and node-by-node timings of one text of ``tokens`` positions."""
    from lfm2edge.runtime.core.encoders import MAX_SEQUENCES_PER_CALL
    from lfm2edge.runtime.core.llama import EmbeddingContext

    text = make_text(encoder, kind, tokens)
    ids, keys = _prepare(encoder, kind, text)
    if len(ids) != tokens:
        raise ValueError(f"the {kind} decodes {len(ids)} positions, not {tokens}")
    encode = encoder.encode_query if kind == "query" else encoder.encode_document
    foreign = ForeignCpu()
    encode(text)  # warm-up: first-touch of weights and buffers
    normal, normal_decode = [], []
    with decode_timer() as decodes:
        for _ in range(repeats):
            start = time.perf_counter_ns()
            encode(text)
            normal.append(time.perf_counter_ns() - start)
            normal_decode.append(decodes[-1])
    normal_ns, decode_ns = np.array(normal, dtype=np.float64), np.array(normal_decode, dtype=np.float64)

    recorder = Recorder(_ggml_base())
    # Same model and context shape as the encoder's, so the graph is the same; only cb_eval differs.
    ctx = EmbeddingContext(encoder._model, encoder.max_batch_tokens, MAX_SEQUENCES_PER_CALL, encoder.n_threads,
                           encoder.exact, eval_callback=recorder)
    try:
        reference = encoder._ctx.decode([ids], None if keys is None else [keys])[0]
        ctx.decode([ids], None if keys is None else [keys])  # warm-up
        per_run, node_decode, described = [], [], None
        with decode_timer() as decodes:
            for _ in range(repeats):
                recorder.raw.clear()
                out = ctx.decode([ids], None if keys is None else [keys])[0]
                node_decode.append(decodes[-1])
                if recorder.error is not None:
                    raise RuntimeError(f"the eval callback failed: {recorder.error!r}")
                if described is None:
                    described = [d for d, _ in recorder.raw]
                elif [d[:2] for d, _ in recorder.raw] != [d[:2] for d in described]:
                    raise RuntimeError("the graph changed between decodes")
                per_run.append([ns for _, ns in recorder.raw])
    finally:
        ctx.close()
    other = foreign.share()
    assert described is not None
    nodes = classify(described)
    ms = np.median(np.array(per_run, dtype=np.float64), axis=0) / 1e6
    by_op, by_component, by_layer = summarize(nodes, ms)
    noop = [t for n, t in zip(nodes, ms, strict=True) if n.op in NOOP_OPS]
    matmul = [(n, t) for n, t in zip(nodes, ms, strict=True) if n.op == "MUL_MAT"]
    return CaseProfile(
        kind=kind,
        tokens=tokens,
        repeats=repeats,
        nodes=len(nodes),
        node_total_ms=float(ms.sum()),
        node_decode_ms=float(np.median(node_decode)) / 1e6,
        normal_ms=float(np.median(normal_ns)) / 1e6,
        normal_decode_ms=float(np.median(decode_ns)) / 1e6,
        python_ms=float(np.median(normal_ns - decode_ns)) / 1e6,
        node_floor_us=float(np.median(noop)) * 1e3 if noop else 0.0,
        matmul_gflop=sum(n.flops for n, _ in matmul) / 1e9,
        matmul_ms=float(sum(t for _, t in matmul)),
        max_abs_diff=float(np.abs(out - reference).max()),
        by_op=by_op,
        by_component=by_component,
        by_layer=by_layer,
        other_cpu_share=other,
    )


def _own_cpu() -> float:
    import os

    t = os.times()
    return t.user + t.system


def profile(path: str | Path, tokens: list[int], repeats: int = 5, threads: int | None = None,
            extra_buffers: bool | None = None, kind: str = "auto") -> dict:
    """Profile every length in ``tokens`` on one loaded model; a JSON-ready dict."""
    import lfm2edge
    from lfm2edge.runtime.core.encoders import ColBERTEncoder

    t0 = time.perf_counter()
    encoder = lfm2edge.load(path, n_threads=threads, extra_buffers=extra_buffers,
                            max_batch_tokens=max([512, *tokens]))
    load_s = time.perf_counter() - t0
    try:
        colbert = isinstance(encoder, ColBERTEncoder)
        cases = [profile_case(encoder, _case_kind(encoder, kind, n), n, repeats) for n in tokens]
        b = encoder.build
        return {
            "schema": "lfm2edge.profile/1",
            "model": str(path),
            "model_kind": "late_interaction" if colbert else "dense",
            "threads": encoder.n_threads,
            "exact": encoder.exact,
            "flash_attention": encoder.flash_attention,
            "extra_buffers": encoder.extra_buffers,
            "build": b.describe(),
            "system_info": b.system_info.strip(),
            "load_s": load_s,
            "cases": [asdict(c) for c in cases],
        }
    finally:
        encoder.close()


def format_report(result: dict, top: int = 25) -> str:
    """Plain-text tables: per op, per component, per layer, for every case."""
    lines = [f"{result['model']} ({result['model_kind']}): {result['threads']} threads, "
             f"extra buffers {'on' if result['extra_buffers'] else 'off'}, "
             f"{'exact (F32 K and V)' if result['exact'] else 'fast (F16 K and V)'}, "
             f"{'flash attention' if result.get('flash_attention') else 'no flash attention'}; "
             f"{result['build']}"]
    for c in result["cases"]:
        lines += [
            "",
            f"== {c['kind']}, {c['tokens']} tokens (medians of {c['repeats']} runs) ==",
            f"normal encode {c['normal_ms']:.1f} ms = llama_decode {c['normal_decode_ms']:.1f} ms + Python "
            f"{c['python_ms']:.2f} ms | node by node: decode {c['node_decode_ms']:.1f} ms, sum of {c['nodes']} "
            f"nodes {c['node_total_ms']:.1f} ms (no-op node floor {c['node_floor_us']:.1f} us)",
            f"matmuls: {c['matmul_gflop']:.2f} GFLOP in {c['matmul_ms']:.1f} ms = "
            f"{c['matmul_gflop'] / max(c['matmul_ms'], 1e-9) * 1e3:.0f} GFLOP/s; callback vs normal outputs: "
            f"max abs diff {c['max_abs_diff']:.3g}"
            + (f"; other processes used {c['other_cpu_share']:.0%} of the machine"
               if c.get("other_cpu_share") is not None else ""),
        ]
        for title, rows in (("op", c["by_op"][:top]), ("component", c["by_component"]), ("layer", c["by_layer"])):
            lines.append(f"{'by ' + title:<34} {'n':>4} {'ms':>8} {'share':>6} {'GFLOP/s':>8}  detail")
            for r in rows:
                rate = f"{r['gflops_per_s']:.0f}" if r["gflops_per_s"] else "-"
                lines.append(f"  {r['key']:<32} {r['count']:>4} {r['ms']:>8.2f} {r['share']:>6.1%} {rate:>8}  "
                             f"{r['detail']}")
    return "\n".join(lines)


def _case_kind(encoder, kind: str, tokens: int) -> str:
    from lfm2edge.runtime.core.encoders import ColBERTEncoder

    if kind != "auto":
        return kind
    colbert = isinstance(encoder, ColBERTEncoder)
    return "query" if colbert and tokens == encoder.settings.query_length else "document"


def ab_extra_buffers(path: str | Path, tokens: list[int], repeats: int, threads: int | None = None) -> list[dict]:
    """Encode p50s with extra buffers as the build chooses ("on") and off, both loaded, runs alternated."""
    import lfm2edge

    encoders = {"on": lfm2edge.load(path, n_threads=threads),
                "off": lfm2edge.load(path, n_threads=threads, extra_buffers=False)}
    try:
        rows = []
        for n in tokens:
            kind = _case_kind(encoders["on"], "auto", n)
            text = make_text(encoders["on"], kind, n)
            foreign = ForeignCpu()
            samples: dict[str, list[float]] = {"on": [], "off": []}
            for i in range(repeats + 1):  # the first round warms both up
                for key, enc in encoders.items():
                    t0 = time.perf_counter()
                    (enc.encode_query if kind == "query" else enc.encode_document)(text)
                    if i:
                        samples[key].append((time.perf_counter() - t0) * 1e3)
            p50 = {k: float(np.median(v)) for k, v in samples.items()}
            rows.append({"kind": kind, "tokens": n, "runs": repeats, "on_extra_buffers": encoders["on"].extra_buffers,
                         "on_p50_ms": p50["on"],
                         "off_p50_ms": p50["off"], "speedup": p50["off"] / p50["on"],
                         "other_cpu_share": foreign.share()})
        return rows
    finally:
        for enc in encoders.values():
            enc.close()


def _perf_control(command: str) -> None:
    """Tell a waiting ``perf record --control fifo:CTL,ACK`` to enable or disable sampling."""
    import os

    ctl, ack = os.environ.get("PERF_CTL_FIFO"), os.environ.get("PERF_ACK_FIFO")
    if ctl and ack:
        with open(ctl, "w") as c:
            c.write(command + "\n")
        with open(ack) as a:
            a.readline()


def loop(path: str | Path, tokens: int, runs: int, threads: int | None, extra_buffers: bool | None,
         kind: str = "auto") -> float:
    """Encode one text ``runs`` times with no callback (for perf); ms per encode."""
    import lfm2edge

    with lfm2edge.load(path, n_threads=threads, extra_buffers=extra_buffers) as enc:
        kind = _case_kind(enc, kind, tokens)
        text = make_text(enc, kind, tokens)
        encode = enc.encode_query if kind == "query" else enc.encode_document
        encode(text)
        _perf_control("enable")
        t0 = time.perf_counter()
        for _ in range(runs):
            encode(text)
        elapsed = time.perf_counter() - t0
        _perf_control("disable")
    return elapsed / runs * 1e3


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lfm2edge.bench.profile", description=__doc__.split("\n")[0])
    parser.add_argument("model", help="a GGUF")
    parser.add_argument("--tokens", default="32,256",
                        help="comma-separated input lengths in positions (default 32,256: a ColBERT query and a "
                             "document)")
    parser.add_argument("--kind", choices=("auto", "query", "document"), default="auto",
                        help="auto: a query when the length is the model's query length, else a document")
    parser.add_argument("--repeat", type=int, default=5, help="measured runs per case (medians are reported)")
    parser.add_argument("--threads", "-t", type=int, default=None,
                        help="CPU threads (default: every CPU this process may use)")
    parser.add_argument("--no-extra-buffers", action="store_true",
                        help="load with llama.cpp's CPU extra buffer types (AMX, repack) off")
    parser.add_argument("--top", type=int, default=25, help="op rows to print per case")
    parser.add_argument("--ab-extra-buffers", action="store_true",
                        help="instead: p50 per case with extra buffers on vs off, runs alternated")
    parser.add_argument("--loop", type=int, default=0, metavar="N",
                        help="instead: encode the first case N times without the callback (for perf record)")
    parser.add_argument("--json", type=Path, default=None, help="also write the full result as JSON")
    args = parser.parse_args(argv)
    tokens = [int(x) for x in args.tokens.split(",") if x.strip()]
    if not tokens or min(tokens) < 1 or args.repeat < 1:
        parser.error("--tokens needs positive lengths and --repeat at least 1")
    extra = False if args.no_extra_buffers else None
    if args.loop:
        ms = loop(args.model, tokens[0], args.loop, args.threads, extra, args.kind)
        print(f"{args.model}: {tokens[0]} tokens x{args.loop}: {ms:.1f} ms per encode")
        return 0
    if args.ab_extra_buffers:
        rows = ab_extra_buffers(args.model, tokens, args.repeat, args.threads)
        for r in rows:
            other = "" if r["other_cpu_share"] is None else f" (other processes: {r['other_cpu_share']:.0%} of the CPU)"
            print(f"{r['kind']} {r['tokens']} tokens, p50 of {r['runs']}: extra buffers on {r['on_p50_ms']:.1f} ms, "
                  f"off {r['off_p50_ms']:.1f} ms, on is {r['speedup']:.2f}x faster{other}")
        if args.json is not None:
            args.json.write_text(json.dumps({"model": args.model, "ab_extra_buffers": rows}, indent=1))
        return 0
    result = profile(args.model, tokens, args.repeat, args.threads, extra, args.kind)
    print(format_report(result, args.top))
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=1))
        print(f"wrote {args.json}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
