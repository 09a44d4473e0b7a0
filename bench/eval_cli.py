"""The ``eval`` command: retrieval quality (NDCG@10, Recall@k, MRR@10) on BEIR / NanoBEIR data."""

from __future__ import annotations

import os
import stat
import sys
from pathlib import Path
from typing import Annotated

import typer

from lfm2edge.runtime.core.errors import InvalidInputError
from lfm2edge.runtime.frontends.cli_options import Threads

HELP = (
    "Retrieval quality (NDCG@10, Recall@k, MRR@10) of GGUFs and the PyTorch reference on BEIR-layout data."
    "\n\n"
    "MODEL is a GGUF, a checkpoint folder (run through the PyTorch reference; needs torch) or several of "
    "them, so one run compares types with the reference on the same data. --dataset is one folder with "
    "corpus.jsonl, queries.jsonl and qrels/<split>.tsv, or a folder of such folders (NanoBEIR: one per "
    "language and task; the first folder under --dataset is the table's column). Prints NDCG@10 per column "
    "with AVG first, then every metric's average; ir-measures (trec_eval) computes the metrics."
    "\n\n"
    "--query-expansion, --pool-factor and --storage take comma-separated lists: each combination is a row "
    "of the same run. Document encodings are cached per model content and corpus (--cache-dir), so another "
    "query-side option, or a second run, encodes only the queries. The two-stage engine (issue 14) does not "
    "exist yet: every row is exact search over the index."
)


def _csv(text: str | None, what: str) -> tuple[str, ...]:
    if text is None:
        return ()
    values = tuple(v.strip() for v in text.split(",") if v.strip())
    if not values:
        raise InvalidInputError(f"{what} needs at least one value, got {text!r}")
    return values


def _ints(text: str, what: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in _csv(text, what))
    except ValueError:
        raise InvalidInputError(f"{what} takes comma-separated positive integers, got {text!r}") from None
    if min(values) < 1:
        raise InvalidInputError(f"{what} takes positive integers, got {text!r}")
    return values


def _check_output_file(path: Path, what: str) -> None:
    """An output file we may write: its folder exists, and it is not a folder, link or device."""
    if not path.parent.is_dir():
        raise InvalidInputError(f"{what} {path}: the folder {path.parent} does not exist; create it first")
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISREG(mode):
        raise InvalidInputError(f"{what} {path} exists and is not a regular file; choose another path")


def _check_output_folder(path: Path, what: str) -> None:
    if path.exists() and not path.is_dir():
        raise InvalidInputError(f"{what} {path} exists and is not a folder; choose another path")
    if not path.exists() and not path.parent.is_dir():
        raise InvalidInputError(f"{what} {path}: the folder {path.parent} does not exist; create it first")


def eval_command(
    models: Annotated[list[str], typer.Argument(
        help="GGUF files and/or checkpoint folders (the PyTorch reference)", show_default=False)],
    dataset: Annotated[Path, typer.Option(
        "--dataset", "-d", help="a BEIR-layout dataset folder, or a folder of them (NanoBEIR)",
        show_default=False)],
    split: Annotated[str, typer.Option("--split", help="which qrels/<split>.tsv to evaluate")] = "test",
    query_expansion: Annotated[str | None, typer.Option(
        "--query-expansion", help="ColBERT query expansion modes to compare, e.g. pylate,attended,none "
        "(default: the model's default mode)", show_default=False)] = None,
    pool_factor: Annotated[str, typer.Option(
        "--pool-factor", help="ColBERT index token pooling factors to compare, e.g. 1,2")] = "1",
    storage: Annotated[str, typer.Option(
        "--storage", help="index vector storage to compare: float16, int8 or both")] = "float16",
    recall_k: Annotated[str, typer.Option("--recall-k", help="cut-offs for Recall@k")] = "20,100",
    weight_kernel: Annotated[str | None, typer.Option(
        "--weight-kernel", help="load options to evaluate as rows of their own, each for the GGUFs of the type "
        "it takes: dynamic_int8 (bf16 files: int8 on AMX tiles), split_f32 and ozaki_f32 (f32 files); "
        "comma-separated",
        show_default=False)] = None,
    threads: Threads = None,
    batch_size: Annotated[int, typer.Option("--batch-size", help="texts per encoding batch")] = 32,
    cache_dir: Annotated[Path | None, typer.Option(
        "--cache-dir", help="where document encodings are cached (default ~/.cache/lfm2edge/eval)",
        show_default=False)] = None,
    json_path: Annotated[Path | None, typer.Option(
        "--json", help="also write every number (per dataset too) as JSON to this file",
        show_default=False)] = None,
    save_run: Annotated[Path | None, typer.Option(
        "--save-run", help="write TREC run files here, one per row and dataset", show_default=False)] = None,
    plot: Annotated[Path | None, typer.Option(
        "--plot", help="a bar chart of NDCG@10 per column (.png, .svg or .pdf; needs matplotlib)",
        show_default=False)] = None,
    progress: Annotated[bool, typer.Option(
        "--progress/--no-progress", help="progress bars on stderr")] = True,
) -> None:
    from lfm2edge.bench import eval_report
    from lfm2edge.bench.eval_cache import DEFAULT_CACHE_DIR
    from lfm2edge.bench.eval_data import load_datasets
    from lfm2edge.bench.eval_metrics import check_trec_ids, metric_names
    from lfm2edge.bench.eval_run import Options, evaluate, model_specs

    if batch_size < 1:
        raise InvalidInputError(f"--batch-size must be at least 1, got {batch_size}")
    options = Options(
        query_expansions=_csv(query_expansion, "--query-expansion"),
        pool_factors=_ints(pool_factor, "--pool-factor"),
        storages=_csv(storage, "--storage"),
        recall_ks=_ints(recall_k, "--recall-k"),
        threads=threads,
        batch_size=batch_size,
        cache_dir=(cache_dir or DEFAULT_CACHE_DIR).expanduser(),
        progress=progress,
    )
    # Everything that can be refused is refused before the first text is encoded.
    if json_path is not None:
        _check_output_file(json_path, "--json")
    if plot is not None:
        _check_output_file(plot, "--plot")
        if plot.suffix.lstrip(".").lower() not in eval_report.PLOT_FORMATS:
            raise InvalidInputError(f"--plot {plot}: name a .png, .svg or .pdf file")
    if save_run is not None:
        _check_output_folder(save_run, "--save-run")
    specs = model_specs(models, _csv(weight_kernel, "--weight-kernel"))
    datasets = load_datasets(dataset, split)
    if save_run is not None:
        for ds in datasets:
            check_trec_ids(ds.query_ids, f"{ds.path / 'queries.jsonl'}")
            check_trec_ids(ds.doc_ids, f"{ds.path / 'corpus.jsonl'}")

    results = evaluate(specs, datasets, options, log=lambda m: print(m, file=sys.stderr, flush=True))
    metrics = metric_names(options.recall_ks)
    eval_report.print_tables(results, metrics, split)
    if json_path is not None:
        eval_report.write_json(eval_report.to_json(results, metrics, split), json_path)
        typer.echo(f"wrote {json_path}")
    if save_run is not None:
        paths = eval_report.write_runs(results, save_run)
        typer.echo(f"wrote {len(paths)} TREC run files to {save_run}")
    if plot is not None:
        eval_report.write_plot(results, plot, metrics[0])
        typer.echo(f"wrote {plot}")


def register(app: typer.Typer) -> None:
    app.command(name="eval", help=HELP)(eval_command)
