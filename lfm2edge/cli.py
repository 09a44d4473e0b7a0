"""The ``lfm2edge`` command: one Typer app; each subpackage contributes its commands.

Exit codes: 0 success; 1 a check failed (verify below its thresholds); 2 bad usage or
input; 3 a model file or checkpoint that cannot be used; 4 an unsupported llama.cpp build;
5 a feature the build lacks; 6 an index folder that is not an index or is damaged.
"""

from __future__ import annotations

import sys

from lfm2edge.runtime.errors import (
    CheckpointError,
    FeatureUnavailableError,
    InvalidInputError,
    Lfm2EdgeError,
    ModelFileError,
    UnsupportedBuildError,
    VerificationError,
)

EXIT_CODES: list[tuple[type[Lfm2EdgeError], int]] = [
    (VerificationError, 1),
    (InvalidInputError, 2),
    (ModelFileError, 3),
    (CheckpointError, 3),
    (UnsupportedBuildError, 4),
    (FeatureUnavailableError, 5),
]


def _index_exit_codes() -> list[tuple[type[Lfm2EdgeError], int]]:
    from lfm2edge.runtime.index import IndexCorruptError

    return [(IndexCorruptError, 6)]


def exit_code(error: Lfm2EdgeError) -> int:
    return next((code for cls, code in _index_exit_codes() + EXIT_CODES if isinstance(error, cls)), 1)


def build_app():
    import typer

    from lfm2edge.bench import cli as bench_cli
    from lfm2edge.convert import cli as convert_cli
    from lfm2edge.runtime import cli as runtime_cli
    from lfm2edge.runtime import search_cli

    app = typer.Typer(
        name="lfm2edge",
        help="LFM2 retrievers (LFM2.5-ColBERT-350M, LFM2.5-Embedding-350M) from checkpoint to fast, exact search.",
        no_args_is_help=True,
        pretty_exceptions_enable=False,
        add_completion=False,
    )
    convert_cli.register(app)
    runtime_cli.register(app)
    search_cli.register(app)
    bench_cli.register(app)
    return app


def main() -> None:
    try:
        app = build_app()
    except ImportError as e:
        print(f"error: the lfm2edge command needs its CLI extras ({e.name} is missing): "
              "pip install 'lfm2edge[cli,convert]'", file=sys.stderr)
        sys.exit(2)
    try:
        app()
    except Lfm2EdgeError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(exit_code(e))


if __name__ == "__main__":
    main()
