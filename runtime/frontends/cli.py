"""Runtime commands: ``info`` (the llama.cpp build) and ``inspect`` (what a GGUF is, what is wrong with it)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from lfm2edge.runtime.core.errors import ModelFileError
from lfm2edge.runtime.frontends.cli_options import JsonFlag

GgufPath = Annotated[Path, typer.Argument(help="a GGUF file", show_default=False)]


def info(as_json: JsonFlag = False) -> None:
    """Show the llama.cpp build the runtime uses: version, commit, lfm2edge patches, compiled ISA."""
    from lfm2edge.runtime.core.build import check_build

    b = check_build()
    if as_json:
        typer.echo(json.dumps(b.__dict__ | {"patched": b.patched}, indent=2))
        return
    typer.echo(b.describe())
    typer.echo(f"compiled for: {b.system_info.strip()}")
    if b.cmake_args:
        typer.echo(f"CMake flags: {' '.join(b.cmake_args)}")


def inspect_report(path: Path) -> dict:
    """Everything ``inspect`` prints, as a dict."""
    from lfm2edge.runtime.core.architecture import pooling_name
    from lfm2edge.runtime.core.model_file import describe

    mf = describe(path)
    h = mf.header
    groups: dict[str, dict[str, int]] = {}
    for t in h.tensors:
        group = t.name.split(".")[-2] if t.name.startswith("blk.") else t.name.rsplit(".", 1)[0]
        groups.setdefault(group, {}).setdefault(t.type_name, 0)
        groups[group][t.type_name] += 1
    s = mf.settings
    return {
        "file": str(path),
        "size_bytes": path.stat().st_size,
        "architecture": h.architecture,
        "kind": mf.kind.value if mf.kind else None,
        "causal": mf.causal,
        "pooling": pooling_name(mf.pooling),
        "layers": h.arch_key("block_count"),
        "embedding_length": h.arch_key("embedding_length"),
        "embedding_length_out": h.arch_key("embedding_length_out"),
        "vocab_size": h.arch_key("vocab_size"),
        "tensor_types": mf.tensor_type_summary(),
        "tensor_groups": groups,
        "settings_source": "file" if mf.has_own_settings else "published defaults (file has no lfm2edge settings)",
        "settings": None if s is None else {
            k: (v.value if hasattr(v, "value") else list(v) if isinstance(v, tuple) else v)
            for k, v in s.__dict__.items()
        },
        "problems": mf.problems(),
    }


def inspect(path: GgufPath, as_json: JsonFlag = False) -> None:
    """Show a GGUF's architecture, kind, dimensions, tensor types, size, retrieval settings and problems.

    Exits 3 when the file will not work as a retriever, naming each reason.
    """
    report = inspect_report(path)
    if as_json:
        typer.echo(json.dumps(report, indent=2, ensure_ascii=False, default=str))
    else:
        for key in ("file", "architecture", "kind", "causal", "pooling", "layers", "embedding_length",
                    "embedding_length_out", "vocab_size"):
            typer.echo(f"{key:22} {report[key]}")
        typer.echo(f"{'size':22} {report['size_bytes'] / 2**20:.1f} MiB")
        typer.echo(f"{'tensor types':22} {report['tensor_types']}")
        for group, types in sorted(report["tensor_groups"].items()):
            typer.echo(f"  {group:20} {types}")
        typer.echo(f"settings ({report['settings_source']}):")
        for k, v in (report["settings"] or {}).items():
            typer.echo(f"  {k:26} {v}")
    if report["problems"]:
        raise ModelFileError(f"{path} will not work as a retriever:\n- " + "\n- ".join(report["problems"]))


def register(app: typer.Typer) -> None:
    app.command()(info)
    app.command()(inspect)
