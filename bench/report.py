"""Outputs of a run: rich tables and a progress bar on the terminal, the JSON file, the PNG plot."""

from __future__ import annotations

import json
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from lfm2edge.bench.results import (
    QUERY,
    QUERY_INTERACTIVE,
    REGIMES,
    BenchResult,
    Figure,
    ModelResult,
    SideResult,
    to_jsonable,
)

MIB = 2**20


class RichReporter:
    """``runner.Reporter`` as a rich progress bar; status lines print above it."""

    def __init__(self, console: Console):
        self.console = console
        self.progress = Progress(
            TextColumn("[bold]bench[/bold]"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
            TextColumn("{task.description}"), console=console, transient=False,
        )
        self.task = None

    def __enter__(self) -> RichReporter:
        self.progress.start()
        return self

    def __exit__(self, *exc) -> None:
        self.progress.stop()

    def status(self, text: str) -> None:
        self.console.print(text)

    def begin(self, total: int) -> None:
        self.task = self.progress.add_task("", total=total)

    def step(self, text: str) -> None:
        if self.task is not None:
            self.progress.update(self.task, description=text)

    def advance(self, n: int = 1) -> None:
        if self.task is not None and n > 0:
            self.progress.advance(self.task, n)


def _ms(x: float) -> str:
    return f"{x:,.1f}" if x >= 10 else f"{x:.2f}"


def _ratio(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}x"


def _figure_order(f: Figure) -> tuple:
    return (REGIMES.index(f.regime), f.docs or 0, f.k or 0, f.batch_size or 0)


def latency_table(model: ModelResult) -> Table:
    t = Table(title=f"{model.name}: latency per call (ms)", title_justify="left")
    for col in ("figure", "side", "n", "p50", "p95", "p99", "mean", "texts/s", "vs fp32", "vs bf16"):
        t.add_column(col, justify="left" if col in ("figure", "side") else "right")
    keys = sorted({f.key: f for s in model.sides for f in s.figures}.values(), key=_figure_order)
    for i, proto in enumerate(keys):
        first = True
        for side in model.sides:
            f = next((x for x in side.figures if x.key == proto.key), None)
            if f is None:
                continue
            s = f.summary
            rate = f.items_per_s
            t.add_row(
                proto.label if first else "",
                side.label + (" *" if f.best else ""),
                str(s.n), _ms(s.p50_ms), _ms(s.p95_ms), _ms(s.p99_ms), _ms(s.mean_ms),
                "-" if rate is None else f"{rate:,.1f}",
                _ratio(f.vs_torch.get("fp32")), _ratio(f.vs_torch.get("bf16")),
            )
            first = False
        if i < len(keys) - 1:
            t.add_section()
    return t


def summary_table(model: ModelResult) -> Table:
    t = Table(title=f"{model.name}: per format", title_justify="left")
    for col in ("side", "file MiB", "load s", "peak RSS MiB", "docs/s (batch)", "tokens/s",
                "busy/quiet p50 / p95", "cos min", "cos mean", "rank rho", "top-1", "others' CPU"):
        t.add_column(col, justify="left" if col == "side" else "right")
    for side in model.sides:
        best = side.best_document_figure()
        fid = side.fidelity
        busy = side.busy_ratio()
        t.add_row(
            side.label,
            f"{side.file_size_bytes / MIB:,.0f}",
            f"{side.load_s:.2f}",
            f"{side.memory.peak_encode / MIB:,.0f}",
            "-" if best is None else f"{best.items_per_s:,.2f} ({best.batch_size})",
            "-" if best is None or best.tokens_per_s is None else f"{best.tokens_per_s:,.0f}",
            "-" if busy is None else f"{busy[0]:.2f} / {busy[1]:.2f}",
            "ref" if _is_reference(side) else "-" if fid is None else cosine_text(fid.cosine_min, 5),
            "ref" if _is_reference(side) else "-" if fid is None else cosine_text(fid.cosine_mean, 6),
            "-" if fid is None else f"{fid.rank_spearman_mean:.3f}",
            "-" if fid is None else f"{fid.rank_top1_agreement:.2f}",
            "-" if side.other_cpu_share is None else f"{side.other_cpu_share:.0%}",
        )
    return t


def cosine_text(cosine: float, digits: int) -> str:
    """A cosine to `digits` decimals, or as 1 - x where those would print 1.0: f32 sides differ there."""
    if 1 - cosine < 0.5 * 10.0**-digits:
        return f"1-{max(1 - cosine, 0.0):.1e}"
    return f"{cosine:.{digits}f}"


def _is_reference(side: SideResult) -> bool:
    """PyTorch fp32 where it was the fidelity reference (no float64 one), so it has no fidelity of its own."""
    return side.engine == "torch" and side.format == "fp32" and side.fidelity is None


def print_report(result: BenchResult, console: Console) -> None:
    m = result.machine
    ll = m["llama_cpp"]
    console.print(
        f"[bold]{m['cpu_model']}[/bold], {m['available_cores']} cores available, {m['threads']} threads; "
        f"ISA: {' '.join(m['isa_flags']) or 'unknown'}"
    )
    console.print(
        f"llama-cpp-python {ll['binding_version']} (llama.cpp {(ll['commit'] or 'unknown')[:7]}), patches: "
        f"{', '.join(ll['patches']) or 'none (stock)'}; torch {m.get('torch') or 'not installed'}; "
        f"MaxSim: {m.get('maxsim_backend', 'numpy')}"
    )
    for model in result.models:
        console.print()
        console.print(f"[bold]{model.name}[/bold] ({model.source})")
        console.print(latency_table(model))
        console.print(summary_table(model))
        for e in model.errors:
            console.print(f"[red]{e.model} {e.engine} {e.format} failed:[/red] {e.error}")
    console.print()
    console.print("* best document batch size of that side. Peak RSS: the side's own process after loading "
                  "and encoding (before the cached-document index). busy/quiet: the query after an idle gap "
                  "with another process keeping one core busy, over the same on a quiet machine. Others' CPU: "
                  "share of the machine other processes used while the side ran (0% on a quiet machine; the "
                  "busy regimes' own competing process is not counted).")
    for note in result.notes:
        console.print(f"- {note}")
    console.print(f"wall time {result.wall_s:,.0f} s")


def write_json(result: BenchResult, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(to_jsonable(result), indent=1) + "\n", encoding="utf-8")


def _pareto(ax, title: str, model: ModelResult) -> None:
    """Query p50 after an idle gap against per-token cosine mean (vs the fidelity reference), one point per side."""
    for side in model.sides:
        fig = side.figure(QUERY_INTERACTIVE) or side.figure(QUERY)
        cos = 1.0 if _is_reference(side) else side.fidelity.cosine_mean if side.fidelity else None
        if fig is None or cos is None:
            continue
        ax.scatter([cos], [fig.summary.p50_ms], s=18)
        ax.annotate(side.label, (cos, fig.summary.p50_ms), fontsize=7, xytext=(3, 3), textcoords="offset points")
    reference = next((s.fidelity.reference for s in model.sides if s.fidelity), "torch fp32")
    ax.set_xlabel(f"per-token cosine mean vs PyTorch {reference.removeprefix('torch ')}")
    ax.set_ylabel("query p50 ms (after an idle gap)")
    ax.set_yscale("log")
    ax.set_title(title, fontsize=9)
    ax.grid(True, which="both", alpha=0.3)


def write_plot(result: BenchResult, path: Path) -> None:
    """One panel per (model, figure): box plots of every side's runs, whiskers at p1/p99, log scale; then
    per model, every side's query latency against its fidelity (the Pareto view)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = []
    for model in result.models:
        keys = sorted({f.key: f for s in model.sides for f in s.figures}.values(), key=_figure_order)
        for proto in keys:
            series = [(s.label, f) for s in model.sides for f in s.figures if f.key == proto.key]
            panels.append((f"{model.name}: {proto.label}", series))
        if any(s.fidelity for s in model.sides):
            panels.append((f"{model.name}: speed against fidelity", model))
    if not panels:
        raise ValueError("nothing was measured: no plot")
    cols = min(3, len(panels))
    rows = (len(panels) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(5.2 * cols, 3.8 * rows), squeeze=False)
    for ax, (title, series) in zip(axes.ravel(), panels, strict=False):
        if isinstance(series, ModelResult):
            _pareto(ax, title, series)
            continue
        ax.boxplot([f.samples_ms for _, f in series], whis=(1, 99), showfliers=True,
                   flierprops={"markersize": 2})
        ax.set_xticks(range(1, len(series) + 1), [label for label, _ in series], rotation=20, fontsize=8)
        ax.set_yscale("log")
        ax.set_ylabel("ms per call")
        ax.set_title(title, fontsize=9)
        ax.grid(True, axis="y", which="both", alpha=0.3)
    for ax in axes.ravel()[len(panels):]:
        ax.axis("off")
    m = result.machine
    weights = "random weights, " if any(x.random_weights for x in result.models) else ""
    fig.suptitle(f"lfm2edge bench: {m['cpu_model']}, {m['threads']} threads, {weights}{result.created[:10]}",
                 fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, format="png")
    plt.close(fig)
