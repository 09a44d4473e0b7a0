"""Conversion commands: ``convert`` (checkpoint to GGUF) and ``verify`` (GGUF against the PyTorch reference)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from lfm2edge.runtime.core.errors import VerificationError
from lfm2edge.runtime.frontends.cli_options import JsonFlag, Threads

OUTTYPE_HELP = (
    "f32, f16, bf16, q8_0 (written directly), q8_0_mixed (q8_0 with the parts that lose most in bf16, measured "
    "on the checkpoint) or q4_0, q4_k_m, q5_k_m, q6_k, ... (llama.cpp's quantizer)"
)
BF16_PARTS_HELP = (
    "q8_0_mixed: the parts to keep in bf16 instead of measuring them, comma-separated "
    "(token_embd, blk.0, blk.1, ..., dense_2); an empty string keeps none"
)


def convert(
    model: Annotated[str, typer.Argument(help="checkpoint folder or hub id, e.g. LiquidAI/LFM2.5-ColBERT-350M")],
    outfile: Annotated[Path, typer.Option("--outfile", "-o", help="the GGUF to write")],
    outtype: Annotated[str, typer.Option("--outtype", help=OUTTYPE_HELP)] = "f16",
    revision: Annotated[str | None, typer.Option(help="hub revision (branch, tag or commit)")] = None,
    threads: Threads = None,
    force: Annotated[bool, typer.Option("--force", help="replace OUTFILE if it exists (a regular file only)")] = False,
    bf16_parts: Annotated[str | None, typer.Option("--bf16-parts", help=BF16_PARTS_HELP)] = None,
) -> None:
    """Convert an LFM2 retriever checkpoint to a GGUF that stock llama.cpp loads, settings inside.

    An existing OUTFILE is kept unless --force is given. Example:
    lfm2edge convert LiquidAI/LFM2.5-ColBERT-350M -o colbert-q8_0.gguf --outtype q8_0
    """
    from lfm2edge.convert.pipeline import convert as convert_checkpoint

    path = convert_checkpoint(
        model, outfile, outtype, revision=revision, progress=True, n_threads=threads, force=force,
        bf16_parts=bf16_parts,
    )
    typer.echo(f"wrote {path} ({path.stat().st_size / 2**20:.1f} MiB)")


def verify(
    gguf: Annotated[Path, typer.Argument(help="the GGUF to check")],
    reference: Annotated[str, typer.Option("--reference", "-r", help="the checkpoint it came from (folder or hub id)")],
    threads: Threads = None,
    as_json: JsonFlag = False,
) -> None:
    """Compare a GGUF with the PyTorch reference on a built-in multilingual sample.

    Prints per-token (or pooled) cosine and top-10 rank agreement; exits 1 below the thresholds for the file's type.

    Example: lfm2edge verify colbert-q8_0.gguf --reference LiquidAI/LFM2.5-ColBERT-350M
    """
    from lfm2edge.convert.verify import verify as run_verify

    report = run_verify(gguf, reference, n_threads=threads)
    if as_json:
        typer.echo(json.dumps(report.as_dict(), indent=2))
    else:
        typer.echo(f"{gguf}: {report.kind}, {report.file_type}, {report.texts} texts"
                   + (f", query expansion {report.query_expansion}" if report.query_expansion else ""))
        typer.echo(f"  cosine   min {report.cosine_min:.6f}  mean {report.cosine_mean:.6f}  "
                   f"(thresholds {report.threshold_cosine_min} / {report.threshold_cosine_mean})")
        typer.echo(f"  top-10   overlap {report.top10_overlap:.3f}  identical order {report.top10_identical:.3f}  "
                   f"(threshold {report.threshold_overlap})")
        typer.echo("  PASS" if report.passed else "  FAIL")
    if not report.passed:
        raise VerificationError(f"{gguf} is below the {report.file_type} thresholds against the reference")


def register(app: typer.Typer) -> None:
    app.command()(convert)
    app.command()(verify)
