"""The ``bench`` command: latency, throughput, memory and fidelity, side by side with PyTorch."""

from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path
from typing import Annotated

import typer

from lfm2edge.runtime.core.errors import InvalidInputError
from lfm2edge.runtime.frontends.cli_options import Threads


def _ints(text: str, what: str) -> tuple[int, ...]:
    try:
        values = tuple(int(x.replace("_", "")) for x in text.split(",") if x.strip())
    except ValueError:
        raise InvalidInputError(f"{what} must be comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise InvalidInputError(f"{what} must be positive integers, got {text!r}")
    return values


def make_plan(quick: bool, docs: str | None, k: int, batch_sizes: str | None, budget: float | None,
              min_runs: int | None, seed: int):
    """The default plan, or the quick one (tiny model, few runs), with the options applied."""
    from lfm2edge.bench.regimes import Plan
    from lfm2edge.bench.stats import RunPolicy

    if quick:
        plan = Plan(
            n_queries=4, n_documents=4, cached_docs=(200,), batch_sizes=(1, 2),
            policy=RunPolicy(budget_s=0.1, min_runs=5, max_runs=200, cap_s=2.0, floor_runs=3, warmup_s=0.05),
            throughput_policy=RunPolicy(budget_s=0.05, min_runs=2, cap_s=2.0, floor_runs=2, warmup_s=0.05),
            maxsim_policy=RunPolicy(budget_s=0.05, min_runs=5, cap_s=1.0, floor_runs=3, warmup_s=0.02),
            gap_s=0.05,
            interactive_policy=RunPolicy(budget_s=0.05, min_runs=4, cap_s=2.0, floor_runs=3, warmup_s=0.02),
            busy_document_policy=RunPolicy(budget_s=0.05, min_runs=2, cap_s=2.0, floor_runs=2, warmup_s=0.02),
        )
    else:
        plan = Plan()
    plan = replace(plan, k=k, seed=seed)
    if docs is not None:
        plan = replace(plan, cached_docs=_ints(docs, "--docs"))
    if batch_sizes is not None:
        plan = replace(plan, batch_sizes=_ints(batch_sizes, "--batch-sizes"))
    if budget is not None or min_runs is not None:
        p = plan.policy
        plan = replace(plan, policy=replace(
            p, budget_s=p.budget_s if budget is None else budget,
            min_runs=p.min_runs if min_runs is None else min_runs,
            floor_runs=min(p.floor_runs, p.min_runs if min_runs is None else min_runs),
        ))
    if k < 1:
        raise InvalidInputError(f"--k must be at least 1, got {k}")
    return plan


def bench(
    model: Annotated[str | None, typer.Argument(
        help="a GGUF, a checkpoint folder or a hub id; default: random full-size ColBERT and Embedding "
             "checkpoints of the real shape (only the latency is real)", show_default=False)] = None,
    formats: Annotated[str | None, typer.Option(
        "--formats", help="comma-separated GGUF types to convert to and measure, e.g. f16,bf16,q8_0,q4_k_m "
                          "(default: f16,q8_0 for ColBERT, q8_0 for Embedding; bf16 added where the CPU multiplies it: AMX or AVX512-BF16)",
                          show_default=False)] = None,
    threads: Threads = None,  # llama.cpp and PyTorch alike
    docs: Annotated[str | None, typer.Option(
        "--docs", help="cached documents for query + MaxSim, comma-separated, e.g. 1000,10000 (default 1000)",
        show_default=False)] = None,
    k: Annotated[int, typer.Option("--k", help="documents encoded per query in the no-cache regime")] = 1,
    batch_sizes: Annotated[str | None, typer.Option(
        "--batch-sizes", help="document batch sizes for throughput (default 1,4)", show_default=False)] = None,
    budget: Annotated[float | None, typer.Option(
        "--budget", help="seconds of measuring per figure, beyond the minimum run count (default 4)",
        show_default=False)] = None,
    min_runs: Annotated[int | None, typer.Option(
        "--min-runs", help="minimum runs per latency figure (default 20)", show_default=False)] = None,
    vs_torch: Annotated[bool, typer.Option(
        "--vs-torch/--no-vs-torch", help="measure the PyTorch reference (fp32, bf16) side by side")] = True,
    reference: Annotated[str | None, typer.Option(
        "--reference", "-r", help="checkpoint of a GGUF MODEL, for the PyTorch side and fidelity",
        show_default=False)] = None,
    exact: Annotated[bool, typer.Option(
        "--exact/--flash-attn",
        help="llama.cpp with F32 K and V (exact; through flash attention where patch llama.cpp/0005 is "
             "built, else without it) or flash attention over F16 K and V (~1e-3 per token)")] = True,
    quick: Annotated[bool, typer.Option(
        "--quick", help="tiny random model and few runs: a smoke test in seconds, not a measurement")] = False,
    json_path: Annotated[Path | None, typer.Option("--json", help="write the results as JSON (schema: "
                                                   "bench/README.md)", show_default=False)] = None,
    plot: Annotated[Path | None, typer.Option("--plot", help="write a PNG of the latency distributions",
                                              show_default=False)] = None,
    cache_dir: Annotated[Path | None, typer.Option(
        "--cache-dir", help="where generated checkpoints and conversions are kept "
                            "(default ~/.cache/lfm2edge/bench)", show_default=False)] = None,
    seed: Annotated[int, typer.Option("--seed", help="seed of the random weights and inputs")] = 0,
    stock_python: Annotated[str | None, typer.Option(
        "--stock-python", help="Python of a venv with the stock llama-cpp-python build (LFM2EDGE_PATCHES=0) "
                               "and lfm2edge installed: its llama.cpp sides run too, so the patches' gain shows",
        show_default=False)] = None,
    amx_off_side: Annotated[bool | None, typer.Option(
        "--amx-off-side/--no-amx-off-side",
        help="also measure each GGUF with llama.cpp's CPU extra buffer types (AMX, repack) off, as a side "
             "labelled '<format> AMX off' ('no extra bufts' without AMX); default: for the formats AMX tiles run "
             "(quantized; bf16 with patch llama.cpp/0004) where this CPU and build run AMX, else for q8_0 where "
             "patch llama.cpp/0017 runs it on AVX512-VNNI",
        show_default=False)] = None,
    split_f32_side: Annotated[bool | None, typer.Option(
        "--split-f32-side/--no-split-f32-side",
        help="also measure each f32 GGUF with load(split_f32=True): f32 weights as two bf16 halves on AMX tiles "
             "(patch llama.cpp/0012), as a side labelled 'f32 split'; default: where this CPU and build run it",
        show_default=False)] = None,
    int8_side: Annotated[bool | None, typer.Option(
        "--int8-side/--no-int8-side",
        help="also measure each bf16 GGUF with load(dynamic_int8=True): weights and activations as int8 on AMX "
             "tiles (patch llama.cpp/0013), as a side labelled 'bf16 int8'; default: where this CPU and build run it",
        show_default=False)] = None,
    ozaki_side: Annotated[bool | None, typer.Option(
        "--ozaki-side/--no-ozaki-side",
        help="also measure each f32 GGUF with load(ozaki_f32=True): f32 weights and activations as four int8 "
             "slices, products exact on AMX tiles (patch llama.cpp/0014), as a side labelled 'f32 ozaki'; "
             "default: where this CPU and build run it",
        show_default=False)] = None,
    peers: Annotated[str | None, typer.Option(
        "--peers", help="also measure the other CPU backends on the same ids and threads, exported from the "
                        "reference (the 'peers' extra): onnxruntime (fp32, int8), openvino (default precision, "
                        "f32, int8 weights); comma-separated", show_default=False)] = None,
    gap: Annotated[float | None, typer.Option(
        "--gap", help="idle seconds before each call of the interactive and busy query regimes (default 0.5)",
        show_default=False)] = None,
    busy: Annotated[bool, typer.Option(
        "--busy/--no-busy", help="measure the busy regimes: another process keeps one core busy")] = True,
    passes: Annotated[int | None, typer.Option(
        "--passes", help="passes over the sides, in alternating order (forward, backward, ...), whose samples "
                         "join: a machine that speeds up or slows down during the run then weighs on every side "
                         "alike (default 2; 1 with --quick)", show_default=False)] = None,
) -> None:
    """Benchmark the retrievers: p50/p95/p99 per regime, throughput, load time, memory and fidelity,
    with the PyTorch reference (fp32, bf16) measured side by side in the same run.

    Regimes at 32-token queries and 256-token documents: query embedding, back to back and after an idle
    gap (quiet, and with another process keeping one core busy); ColBERT query + MaxSim over --docs cached
    documents; query + --k documents + MaxSim without a cache; document throughput (quiet and busy).

    Example: lfm2edge bench --json bench.json --plot bench.png
    """
    from rich.console import Console

    from lfm2edge.bench.artifacts import default_cache_dir
    from lfm2edge.bench.machine import available_cores
    from lfm2edge.bench.report import RichReporter, print_report, write_json, write_plot
    from lfm2edge.bench.runner import BenchConfig, run_bench

    if threads is not None and threads < 1:
        raise InvalidInputError(f"--threads must be at least 1, got {threads}")
    if quick and model is not None:
        raise InvalidInputError("--quick measures its own tiny model; leave MODEL out")
    if passes is not None and not 1 <= passes <= 10:
        raise InvalidInputError(f"--passes must be between 1 and 10, got {passes}")
    from lfm2edge.bench.peer_side import parse_peers

    plan = make_plan(quick, docs, k, batch_sizes, budget, min_runs, seed)
    if gap is not None:
        if not 0 <= gap <= 60:
            raise InvalidInputError(f"--gap must be between 0 and 60 seconds, got {gap}")
        plan = replace(plan, gap_s=gap)
    plan = replace(plan, busy=busy)
    fmt_list = tuple(f.strip().lower() for f in formats.split(",") if f.strip()) if formats else None
    config = BenchConfig(
        model=model,
        formats=fmt_list,
        reference=reference,
        threads=threads or available_cores(),
        plan=plan,
        exact=exact,
        vs_torch=vs_torch,
        quick=quick,
        stock_python=stock_python,
        amx_off_side=amx_off_side,
        split_f32_side=split_f32_side,
        int8_side=int8_side,
        ozaki_side=ozaki_side,
        peers=parse_peers(peers),
        passes=passes or (1 if quick else 2),
        cache_dir=(cache_dir or default_cache_dir()).expanduser(),
        command=" ".join(["lfm2edge", "bench", *sys.argv[2:]]) if sys.argv[1:2] == ["bench"] else "lfm2edge bench",
    )
    # Piped output (a log, CI) gets a width that fits the tables instead of rich's default 80.
    console = Console() if sys.stdout.isatty() else Console(width=160)
    with RichReporter(console) as reporter:
        result = run_bench(config, reporter)
    print_report(result, console)
    if json_path is not None:
        write_json(result, json_path)
        console.print(f"wrote {json_path}")
    if plot is not None:
        write_plot(result, plot)
        console.print(f"wrote {plot}")
    if not any(m.sides for m in result.models):
        raise typer.Exit(1)


def register(app: typer.Typer) -> None:
    app.command()(bench)
