"""What ``lfm2edge eval`` writes: the table in the release's layout, JSON, TREC run files and a bar chart.

The table has one row per model and option set, one column per language (the first folder under
--dataset; a folder of several tasks averages them), AVG first: the mean over the columns, as the
release averages its languages.
"""

from __future__ import annotations

import io
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from lfm2edge.bench.eval_metrics import HEADLINE, trec_run_lines, write_atomically
from lfm2edge.bench.eval_run import DatasetResult, Row

AVG = "AVG"
PLOT_FORMATS = ("png", "svg", "pdf")


@dataclass(frozen=True)
class Table:
    metric: str
    columns: tuple[str, ...]  # AVG first
    rows: tuple[tuple[Row, tuple[float, ...]], ...]


def _unique(items) -> list:
    return list(dict.fromkeys(items))


def table(results: Sequence[DatasetResult], metric: str = HEADLINE) -> Table:
    columns = _unique(r.column for r in results)
    rows = []
    for row in _unique(r.row for r in results):
        values = []
        for col in columns:
            cell = [r.metrics[metric] for r in results if r.row == row and r.column == col]
            values.append(sum(cell) / len(cell))
        rows.append((row, (sum(values) / len(values), *values)))
    return Table(metric, (AVG, *columns), tuple(rows))


def print_tables(results: Sequence[DatasetResult], metrics: Sequence[str], split: str) -> None:
    """The headline table per column, then every metric's AVG per row."""
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table as RichTable

    console = Console()
    if not console.is_terminal:
        console.width = 1000  # a file or pipe: one line per row; tables take only the width they need
    main = table(results, metrics[0])
    out = RichTable(title=f"{main.metric} (split {split})", title_justify="left")
    out.add_column("model")
    for col in main.columns:
        out.add_column(col, justify="right")
    for row, values in main.rows:
        out.add_row(escape(row.label), *(f"{v:.3f}" for v in values))
    console.print(out)
    summary = RichTable(title=f"{AVG} over the columns, every metric", title_justify="left")
    summary.add_column("model")
    per_metric = [table(results, m) for m in metrics]
    for m in metrics:
        summary.add_column(m, justify="right")
    for i, (row, _) in enumerate(main.rows):
        summary.add_row(escape(row.label), *(f"{t.rows[i][1][0]:.3f}" for t in per_metric))
    console.print(summary)
    encoded = sum(r.encoded_documents for r in results)
    console.print(f"documents encoded in this run: {encoded:,} (the rest came from the cache)")


def to_json(results: Sequence[DatasetResult], metrics: Sequence[str], split: str) -> dict:
    tables = {m: table(results, m) for m in metrics}
    rows = []
    for i, (row, _) in enumerate(tables[metrics[0]].rows):
        mine = [r for r in results if r.row == row]
        rows.append({
            "label": row.label,
            "model": row.model,
            "source": row.source,
            "kind": row.kind,
            "query_expansion": row.query_expansion,
            "pool_factor": row.pool_factor,
            "storage": row.storage,
            "average": {m: t.rows[i][1][0] for m, t in tables.items()},
            "columns": {
                col: {m: t.rows[i][1][j] for m, t in tables.items()}
                for j, col in enumerate(tables[metrics[0]].columns) if col != AVG
            },
            "datasets": {
                r.dataset: {
                    "column": r.column,
                    "queries": r.queries,
                    "documents": r.documents,
                    "encoded_documents": r.encoded_documents,
                    **r.metrics,
                }
                for r in mine
            },
        })
    return {
        "split": split,
        "headline": metrics[0],
        "metrics": list(metrics),
        "columns": list(tables[metrics[0]].columns),
        "rows": rows,
    }


def write_json(doc: dict, path: Path) -> None:
    write_atomically(path, (json.dumps(doc, indent=1, ensure_ascii=False) + "\n").encode("utf-8"))


def slug(text: str) -> str:
    """A file-name-safe form of a row label or dataset name."""
    out = "".join(c if c.isalnum() or c in ".-" else "_" for c in text)
    return "_".join(part for part in out.split("_") if part) or "run"


def run_file(folder: Path, row: Row, dataset: str) -> Path:
    return folder / f"{slug(row.label)}__{slug(dataset)}.trec"


def write_runs(results: Sequence[DatasetResult], folder: Path) -> list[Path]:
    """One TREC run file per row and dataset; returns their paths."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for r in results:
        path = run_file(folder, r.row, r.dataset)
        lines = trec_run_lines(r.run, slug(r.row.label))
        write_atomically(path, ("\n".join(lines) + "\n").encode("utf-8"))
        paths.append(path)
    return paths


def write_plot(results: Sequence[DatasetResult], path: Path, metric: str = HEADLINE) -> None:
    """Grouped bars: one group per column (AVG first), one bar per row."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = table(results, metric)
    n_rows, n_cols = len(t.rows), len(t.columns)
    width = 0.8 / n_rows
    colors = plt.get_cmap("tab20").colors
    fig, ax = plt.subplots(figsize=(max(6.0, 0.25 * n_rows * n_cols + 2) + 3.5, 4.5))
    for i, (row, values) in enumerate(t.rows):
        positions = [c + (i - (n_rows - 1) / 2) * width for c in range(n_cols)]
        ax.bar(positions, values, width, label=row.label, color=colors[i % len(colors)])
    ax.set_xticks(range(n_cols), t.columns, rotation=30, ha="right")
    ax.set_ylabel(metric)
    ax.set_ylim(0, 1)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax.grid(True, axis="y", alpha=0.3)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format=path.suffix.lstrip(".").lower())
    plt.close(fig)
    write_atomically(path, buffer.getvalue())
