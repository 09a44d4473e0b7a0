"""A whole bench run: prepare the models, measure each side in its own process, compare the sides.

Sides run one after another, never concurrently, in ``passes`` passes whose order alternates (forward,
backward, ...): a VM whose speed drifts during the run then weighs on every side alike, and each side's
figures join its passes' samples. Per model, forward: the llama.cpp formats first
(their ColBERT query-expansion mode is then mirrored by PyTorch), then the same files with
llama.cpp's CPU extra buffer types off ("AMX off", where asked or by default on AMX machines),
then the stock build's (``--stock-python``), then PyTorch fp32 and bf16. Afterwards the reference runs
in float64 on the same texts, untimed, in a process of its own; every figure gets its ratio to PyTorch and
every side its fidelity against the float64 vectors (against PyTorch fp32's where float64 cannot run).
"""

from __future__ import annotations

import importlib.util
import multiprocessing as mp
import os
import queue as queue_mod
import signal
import sys
import time
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Protocol

import numpy as np

from lfm2edge.bench import artifacts, fidelity, peer_side
from lfm2edge.bench.machine import (
    amx_usable,
    bf16_on_avx512,
    describe_machine,
    f32_on_avx512,
    load_average,
    maxsim_backend,
    q8_0_on_vnni,
    system_busy_seconds,
)
from lfm2edge.bench.regimes import Plan, SideSpec, figure_plan
from lfm2edge.bench.results import (
    DOCUMENT_BATCH,
    ENGINE_LLAMA,
    ENGINE_TORCH,
    SCHEMA,
    BenchResult,
    Figure,
    ModelResult,
    SideError,
    SideOutput,
    SideResult,
    merge_passes,
)
from lfm2edge.bench.worker import child_main

TORCH_DTYPES = ("fp32", "bf16")
# GGUF types whose matmuls ggml's AMX buffer runs on AMX tiles (amx/common.h qtype_has_amx_kernels; q4_k_m
# and q5_k_m are mostly Q4_K/Q5_K with Q6_K tensors; q8_0 on the bf16 tiles with lfm2edge's patch
# llama.cpp/0006), plus bf16 with lfm2edge's patch llama.cpp/0004.
# f16 weights go to the AMX buffer too but run AVX-512 kernels there, so no default AMX-off side for f16.
AMX_QUANTIZED_FORMATS = ("q4_0", "q4_1", "q8_0", "q4_k_m", "q4_k_s", "q5_k_m", "q5_k_s", "q6_k", "iq4_xs")


def amx_tile_formats() -> tuple[str, ...]:
    from lfm2edge.runtime.core.build import build_info

    return AMX_QUANTIZED_FORMATS + (("bf16",) if build_info().bf16_on_amx else ())


def extra_buffer_formats() -> tuple[str, ...]:
    """The formats whose matmuls an extra buffer type runs here, so that a side with them off shows what
    they gain: the AMX tile formats where AMX runs, else those that patch llama.cpp/0019 runs on AVX-512
    panels (bf16, f32) and q8_0 where patch llama.cpp/0017 runs it on AVX512-VNNI."""
    if amx_usable():
        return amx_tile_formats()
    runs = {"bf16": bf16_on_avx512(), "f32": f32_on_avx512(), "q8_0": q8_0_on_vnni()}
    return tuple(fmt for fmt, here in runs.items() if here)


BUSY_LOAD = 0.5  # a 1-minute load average above this at the start means someone else is using the CPU
BUSY_SHARE = 0.05  # other processes using more than this share of the machine during a side


class Reporter(Protocol):
    def status(self, text: str) -> None: ...

    def begin(self, total: int) -> None: ...

    def step(self, text: str) -> None: ...

    def advance(self, n: int = 1) -> None: ...


@dataclass(frozen=True)
class BenchConfig:
    model: str | None  # None: synthetic ColBERT and Embedding of the real shape
    formats: tuple[str, ...] | None  # None: artifacts.DEFAULT_FORMATS per kind
    reference: str | None  # checkpoint for the PyTorch side when ``model`` is a GGUF
    threads: int
    plan: Plan
    exact: bool = True
    vs_torch: bool = True
    quick: bool = False
    cache_dir: Path = artifacts.default_cache_dir()
    command: str = "lfm2edge bench"
    stock_python: str | None = None  # interpreter with the stock build: its llama.cpp sides run too
    # The same GGUFs with llama.cpp's CPU extra buffer types off, as extra sides: True for every format,
    # False never, None for the quantized formats AMX takes, where this machine and build run AMX.
    amx_off_side: bool | None = None
    # Each f32 GGUF again with split_f32 (patch llama.cpp/0012), labelled "f32 split", and each bf16 GGUF with
    # dynamic_int8 (patch llama.cpp/0013), labelled "bf16 int8": True always, False never, None where this
    # build and CPU run it.
    split_f32_side: bool | None = None
    int8_side: bool | None = None
    ozaki_side: bool | None = None
    peers: tuple[str, ...] = ()  # other CPU backends (peer_side.PEER_FORMATS), exported from the reference
    passes: int = 1  # passes over the sides, in alternating order (see the module docstring)


def torch_available() -> bool:
    return all(importlib.util.find_spec(m) is not None for m in ("torch", "transformers"))


def prepare_models(config: BenchConfig, reporter: Reporter) -> list[artifacts.ModelSpec]:
    from lfm2edge.convert.synthetic import FULL, TINY

    if config.model is None:
        shape = TINY if config.quick else FULL
        return artifacts.synthetic_models(shape, config.plan.seed, config.formats, config.cache_dir,
                                          config.threads, reporter.status)
    return [artifacts.from_argument(config.model, config.formats, config.reference, config.cache_dir,
                                    config.threads, reporter.status)]


# Load options that run a format's weights on another kernel, each measured as an extra side:
# (load option, the format it takes, the side's format label)
KERNEL_SIDES = (("split_f32", "f32", "f32 split"), ("dynamic_int8", "bf16", "bf16 int8"),
                ("ozaki_f32", "f32", "f32 ozaki"))


def kernel_usable(option: str) -> bool:
    """Whether this build and CPU run the load option ``option`` (one of KERNEL_SIDES)."""
    from lfm2edge.runtime.core.llama import WEIGHT_KERNELS, weight_kernel_available

    return weight_kernel_available(next(k for k in WEIGHT_KERNELS if k.option == option))


def amx_off_label(fmt: str, amx: bool) -> str:
    """The format label of a side with extra buffers off: "q8_0 AMX off" where AMX would run."""
    return f"{fmt} AMX off" if amx else f"{fmt} no extra bufts"


def side_specs(model: artifacts.ModelSpec, config: BenchConfig) -> list[SideSpec]:
    specs = [
        SideSpec(model.name, model.kind, ENGINE_LLAMA, fmt, str(path), config.threads, config.plan, config.exact)
        for fmt, path in model.ggufs
    ]
    if config.amx_off_side is not False:  # extra buffers on vs off in one run: same file, same process kind
        amx = amx_usable()
        forced = config.amx_off_side is True
        kernels = extra_buffer_formats()
        specs += [
            replace(s, format=amx_off_label(s.format, amx), extra_buffers=False)
            for s in specs
            if forced or s.format in kernels
        ]
    wanted = {"split_f32": config.split_f32_side, "dynamic_int8": config.int8_side, "ozaki_f32": config.ozaki_side}
    for option, fmt, label in KERNEL_SIDES:
        if wanted[option] is True or (wanted[option] is None and kernel_usable(option)):
            specs += [replace(s, format=label, weight_kernel=option) for s in specs if s.format == fmt]
    if config.stock_python:  # the same files through the stock build, so the patches' gain shows
        specs += [
            replace(s, format=f"{s.format} stock", python=config.stock_python)
            for s in specs
            if s.extra_buffers is None and not s.weight_kernel  # the stock build keeps its own choice, and lacks them
        ]
    if model.checkpoint is not None:
        folder = peer_side.export_folder(config.cache_dir, model.checkpoint)
        specs += [
            SideSpec(model.name, model.kind, peer, fmt, str(peer_side.graph_path(folder, peer, fmt)), config.threads,
                     config.plan, checkpoint=str(model.checkpoint))
            for peer in config.peers
            for fmt in peer_side.PEER_FORMATS[peer]
        ]
    if config.vs_torch and model.checkpoint is not None:
        specs += [
            SideSpec(model.name, model.kind, ENGINE_TORCH, dt, str(model.checkpoint), config.threads, config.plan)
            for dt in TORCH_DTYPES
        ]
    return specs


def prepare_peers(models: list[artifacts.ModelSpec], config: BenchConfig, reporter: Reporter) -> BenchConfig:
    """Export the peers' graphs that are not cached yet, each model in its own process; drop unusable peers."""
    peers = []
    for peer in config.peers:
        missing = peer_side.missing_modules(peer)
        if missing:
            reporter.status(f"no {peer} side: {', '.join(missing)} not installed (pip install 'lfm2edge[peers]')")
        else:
            peers.append(peer)
    if not peers:
        return replace(config, peers=())
    ctx = mp.get_context("spawn")
    for m in models:
        if m.checkpoint is None:
            reporter.status(f"{m.name}: a GGUF without --reference has no checkpoint to export for the peers")
            continue
        folder = peer_side.export_folder(config.cache_dir, m.checkpoint)
        reporter.status(f"{m.name}: exporting the reference for {', '.join(peers)} (cached in {folder})")
        proc = ctx.Process(target=peer_side.export, args=(m.checkpoint, folder, tuple(peers)))
        proc.start()
        proc.join()
        if proc.exitcode != 0:
            raise RuntimeError(f"exporting {m.name} for {', '.join(peers)} failed (exit code {proc.exitcode})")
    return replace(config, peers=tuple(peers))


def run_side(spec: SideSpec, reporter: Reporter) -> SideOutput | SideError:
    """Measure one side in a fresh process; its progress messages drive the reporter.

    Also measures how much of the machine other processes used meanwhile: system CPU time
    (from the kernel) minus the side's and this process's own, over wall time x cores.
    """
    steps = 1 + len(figure_plan(spec))
    done = 0
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    proc = ctx.Process(target=child_main, args=(spec, q), daemon=True)
    busy0, own0, t0 = system_busy_seconds(), _own_cpu(), time.perf_counter()
    if spec.python:
        ctx.set_executable(spec.python)  # spawn's interpreter is process-wide: restore it right after
    try:
        proc.start()
    finally:
        ctx.set_executable(sys.executable)
    output: SideOutput | None = None
    error: str | None = None
    child_cpu = 0.0
    seen = 0
    while output is None and error is None:
        try:
            kind, payload, *rest = q.get(timeout=0.5)
        except queue_mod.Empty:
            if proc.is_alive():
                continue
            try:
                kind, payload, *rest = q.get(timeout=2.0)
            except queue_mod.Empty:
                code = proc.exitcode
                how = f"signal {signal.Signals(-code).name}" if code is not None and code < 0 else f"exit code {code}"
                error = f"the side's process died ({how})"
                break
        if kind == "progress":
            if seen:
                reporter.advance()
                done += 1
            seen += 1
            reporter.step(f"{spec.model} {spec.engine} {spec.format}: {payload}")
        elif kind == "result":
            output, child_cpu = payload, float(rest[0])
        else:
            error = str(payload)
    wall = time.perf_counter() - t0
    busy1, own1 = system_busy_seconds(), _own_cpu()
    proc.join(timeout=30)
    if proc.is_alive():
        proc.kill()
    reporter.advance(steps - done)
    if output is None:
        return SideError(spec.model, spec.engine, spec.format, error or "unknown error")
    other = None
    if busy0 is not None and busy1 is not None and wall > 0:
        foreign = (busy1 - busy0) - child_cpu - (own1 - own0)
        other = min(1.0, max(0.0, foreign / (wall * (os.cpu_count() or 1))))
    result = replace(output.result, cpu_s=child_cpu, wall_s=wall, other_cpu_share=other)
    return replace(output, result=result)


def _own_cpu() -> float:
    t = os.times()
    return t.user + t.system


def _ratio(fig: Figure, torch_side: SideResult | None) -> float | None:
    """Speed-up against one PyTorch side: its p50 / this p50; documents: this rate / its best rate."""
    if torch_side is None:
        return None
    if fig.regime == DOCUMENT_BATCH:
        best = torch_side.best_document_figure()
        if best is None or not best.items_per_s or not fig.items_per_s:
            return None
        return fig.items_per_s / best.items_per_s
    match = next((f for f in torch_side.figures if f.key == fig.key), None)
    if match is None or fig.summary.p50_ms <= 0:
        return None
    return match.summary.p50_ms / fig.summary.p50_ms


def with_ratios(sides: list[SideResult]) -> list[SideResult]:
    torch_sides = {s.format: s for s in sides if s.engine == ENGINE_TORCH}
    return [
        replace(s, figures=tuple(
            replace(f, vs_torch={dt: _ratio(f, torch_sides.get(dt)) for dt in TORCH_DTYPES}) for f in s.figures
        ))
        for s in sides
    ]


Vectors = tuple[tuple[np.ndarray, ...], tuple[np.ndarray, ...]]  # (per query, per document)


def float64_reference(model: artifacts.ModelSpec, config: BenchConfig, query_expansion: str | None,
                      reporter: Reporter, notes: list[str]) -> Vectors | None:
    """The reference's float64 vectors of the bench texts (``torch_side.reference_vectors``), computed in a
    spawned process so its 2.8 GB of float64 weights leave with it; None, with a note, where that fails."""
    from concurrent.futures import ProcessPoolExecutor

    from lfm2edge.bench import torch_side

    spec = SideSpec(model.name, model.kind, ENGINE_TORCH, "fp64", str(model.checkpoint), config.threads,
                    config.plan, query_expansion=query_expansion)
    reporter.status(f"{model.name}: the fidelity reference, PyTorch in float64")
    try:
        with ProcessPoolExecutor(1, mp_context=mp.get_context("spawn")) as pool:
            return pool.submit(torch_side.reference_vectors, spec).result()
    except Exception as e:  # noqa: BLE001 - any failure there leaves PyTorch fp32 as the reference
        notes.append(f"{model.name}: no float64 reference ({type(e).__name__}: {e}); fidelity is against "
                     "PyTorch fp32")
        return None


def with_fidelity(outputs: list[SideOutput], notes: list[str], truth: Vectors | None = None) -> list[SideResult]:
    """Each side's fidelity against ``truth`` (float64), or, without it, against PyTorch fp32's vectors."""
    ref = next((o for o in outputs if o.result.engine == ENGINE_TORCH and o.result.format == "fp32"), None)
    reference = "torch fp64" if truth is not None else "torch fp32"
    if truth is None and ref is not None:
        truth = (ref.query_vectors, ref.document_vectors)
    results = []
    for o in outputs:
        r = o.result
        if truth is not None and (o is not ref or reference == "torch fp64"):
            try:
                fid = fidelity.compare(o.query_vectors, o.document_vectors, *truth, r.kind == "late_interaction",
                                       reference)
                r = replace(r, fidelity=fid)
            except ValueError as e:
                notes.append(f"{r.model} {r.label}: no fidelity ({e})")
        results.append(r)
    return results


def run_model(model: artifacts.ModelSpec, config: BenchConfig, reporter: Reporter,
              notes: list[str]) -> ModelResult:
    specs = side_specs(model, config)
    passes: dict[tuple[str, str], list[SideOutput]] = {(s.engine, s.format): [] for s in specs}
    failed: dict[tuple[str, str], SideError] = {}
    expansion: str | None = None
    for n in range(config.passes):
        for spec in specs if n % 2 == 0 else specs[::-1]:
            key = (spec.engine, spec.format)
            if key in failed:
                continue
            if spec.engine != ENGINE_LLAMA:  # PyTorch and the peers mirror the llama.cpp side's expansion mode
                spec = replace(spec, query_expansion=expansion)
            out = run_side(spec, reporter)
            if isinstance(out, SideError):
                failed[key] = out
                reporter.status(f"[red]{spec.model} {spec.engine} {spec.format} failed:[/red] "
                                f"{out.error.splitlines()[0]}")
                continue
            passes[key].append(out)
            if spec.engine == ENGINE_LLAMA and expansion is None:
                expansion = out.result.query_expansion
    errors = list(failed.values())
    # a side that failed in any pass is reported as failed, not with fewer passes than the sides it is compared with
    outputs = [SideOutput(merge_passes([o.result for o in outs]), outs[0].query_vectors, outs[0].document_vectors)
               for key, outs in passes.items() if outs and key not in failed]
    truth = None
    if any(o.result.engine == ENGINE_TORCH for o in outputs):
        truth = float64_reference(model, config, expansion, reporter, notes)
    sides = with_ratios(with_fidelity(outputs, notes, truth))
    digests = {s.texts_digest for s in sides}
    if len(digests) > 1:
        notes.append(f"{model.name}: the sides built different input texts (tokenizers disagree); "
                     "fidelity compares only where shapes match")
    return ModelResult(
        name=model.name,
        kind=model.kind,
        source=model.source,
        random_weights=model.random_weights,
        reference=str(model.checkpoint) if model.checkpoint and config.vs_torch else None,
        inputs_identical=len(digests) <= 1,
        sides=tuple(sides),
        errors=tuple(errors),
        conversions=dict(model.conversions),
    )


def standing_notes(config: BenchConfig, models: list[artifacts.ModelSpec], machine: dict,
                   results: list[ModelResult]) -> list[str]:
    """What every reader of the numbers must know: random weights, inputs, modes, a busy machine."""
    p = config.plan
    notes = []
    if any(m.random_weights for m in models):
        notes.append("Weights are RANDOM (synthetic checkpoints of the real shape): latency, throughput and memory "
                     "are real; fidelity shows numerical agreement on random weights, not retrieval quality.")
    notes.append(f"Inputs: {p.query_tokens}-token queries and {p.document_tokens}-token documents (BOS and marker "
                 "or prompt included), real-looking English, counts checked through each side's tokenizer.")
    if any(m.kind == "late_interaction" for m in models):
        notes.append(f"Cached documents are random unit vectors [{p.document_tokens}, dim] in float16 "
                     "(MaxSim's cost depends on their shape only); MaxSim is lfm2edge's maxsim() on every side "
                     f"({maxsim_backend()}).")
    if config.passes > 1:
        notes.append(f"Every side ran {config.passes} times, one pass over the sides after another in alternating "
                     "order (forward, then backward): each figure joins its passes' samples, so a machine that drifts "
                     "during the run weighs on every side alike.")
    notes.append("llama.cpp runs exact (F32 K and V; flash attention over them where patch 0005 is built)" if config.exact else
                 "llama.cpp runs with flash attention on (about 1e-3 error per token)")
    if config.vs_torch:
        notes.append("PyTorch: lfm2edge's reference, one unpadded sequence per call, torch.set_num_threads = "
                     f"{config.threads}. Ratios are speed-ups: PyTorch p50 / this p50 (documents: this docs/s / "
                     "PyTorch's best docs/s); above 1 is faster than PyTorch.")
    busy = [(m.name, s.label, s.other_cpu_share) for m in results for s in m.sides
            if s.other_cpu_share is not None and s.other_cpu_share > BUSY_SHARE]
    if busy:
        worst = max(busy, key=lambda x: x[2])
        notes.append(f"Other processes used the CPU during {len(busy)} side(s) (up to {worst[2]:.0%} of the "
                     f"machine during {worst[0]} {worst[1]}): those timings are inflated; rerun on a quiet machine.")
    measured = any(s.other_cpu_share is not None for m in results for s in m.sides)
    load = machine.get("load_average_start")
    if not measured and load and load[0] > BUSY_LOAD:  # the load average only where nothing better exists
        notes.append(f"The machine was busy when the run started (1-minute load average {load[0]} on "
                     f"{machine.get('available_cores')} cores): timings may be inflated.")
    return notes


def run_bench(config: BenchConfig, reporter: Reporter) -> BenchResult:
    t0 = time.perf_counter()
    created = datetime.now(UTC).isoformat(timespec="seconds")
    machine = describe_machine(config.threads)
    if config.vs_torch and not torch_available():
        reporter.status("PyTorch (torch, transformers) is not installed: no PyTorch side, no ratios, no fidelity")
        config = replace(config, vs_torch=False)
    models = prepare_models(config, reporter)
    if config.peers:
        config = prepare_peers(models, config, reporter)
    if config.vs_torch and not any(m.checkpoint for m in models):
        reporter.status("a GGUF without --reference: no PyTorch side, no ratios, no fidelity")
    reporter.begin(config.passes * sum(1 + len(figure_plan(s)) for m in models for s in side_specs(m, config)))
    run_notes: list[str] = []
    results = [run_model(m, config, reporter, run_notes) for m in models]
    machine["load_average_end"] = load_average()
    notes = standing_notes(config, models, machine, results) + run_notes
    p = config.plan
    settings = {
        "model": config.model,
        "formats": {m.name: [f for f, _ in m.ggufs] for m in models},
        "threads": config.threads,
        "exact": config.exact,
        "vs_torch": config.vs_torch,
        "quick": config.quick,
        "amx_off_side": config.amx_off_side,
        "split_f32_side": config.split_f32_side,
        "int8_side": config.int8_side,
        "ozaki_side": config.ozaki_side,
        "peers": list(config.peers),
        "passes": config.passes,
        "gap_s": p.gap_s,
        "busy": p.busy,
        "query_tokens": p.query_tokens,
        "document_tokens": p.document_tokens,
        "queries": p.n_queries,
        "documents": p.n_documents,
        "cached_docs": list(p.cached_docs),
        "k": p.k,
        "batch_sizes": list(p.batch_sizes),
        "seed": p.seed,
        "runs": {"budget_s": p.policy.budget_s, "min_runs": p.policy.min_runs, "max_runs": p.policy.max_runs,
                 "cap_s": p.policy.cap_s, "document_min_runs": p.throughput_policy.min_runs},
        "cache_dir": str(config.cache_dir),
    }
    return BenchResult(
        schema=SCHEMA,
        created=created,
        command=config.command,
        wall_s=time.perf_counter() - t0,
        settings=settings,
        machine=machine,
        models=tuple(results),
        notes=tuple(notes),
    )
