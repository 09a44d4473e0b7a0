"""The ``lfm2edge`` command: one Typer app; each subpackage contributes its commands.

Exit codes: 0 success; 1 a check failed (verify below its thresholds) or another error; 2 bad
usage or input; 3 a model file or checkpoint that cannot be used; 4 an unsupported llama.cpp
build; 5 a feature the build lacks; 6 an index folder that is not an index or is damaged; 7 a
file or folder that could not be read or written (permissions, a missing folder, a full disk, an
output that exists without --force);
8 a model used after it was closed; 70 ``serve`` stopped with a decode still running past its
shutdown deadline; 143 SIGTERM (after closing what was open; ``serve`` drains and exits 0 instead).
Every error prints one ``error:`` line on stderr, never a traceback (set LFM2EDGE_DEBUG=1 to see one).
"""

from __future__ import annotations

import os
import signal
import sys
import threading

from lfm2edge.runtime.core.errors import (
    CheckpointError,
    ConversionError,
    EncoderClosedError,
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
    (ConversionError, 7),
    (EncoderClosedError, 8),
]
EXIT_FILE_ERROR = 7  # an OSError: a path that cannot be read or written


def _index_exit_codes() -> list[tuple[type[Lfm2EdgeError], int]]:
    from lfm2edge.runtime.storage.index import IndexCorruptError

    return [(IndexCorruptError, 6)]


def exit_code(error: Lfm2EdgeError) -> int:
    return next((code for cls, code in _index_exit_codes() + EXIT_CODES if isinstance(error, cls)), 1)


def describe_error(error: BaseException) -> tuple[str, int]:
    """The ``error:`` line's text and the exit code for any exception a command ends with."""
    if isinstance(error, Lfm2EdgeError):
        return str(error), exit_code(error)
    if isinstance(error, OSError):
        where = f" {error.filename}" if error.filename else ""
        reason = error.strerror or str(error) or type(error).__name__
        return f"cannot use{where}: {reason}; check the path and its permissions", EXIT_FILE_ERROR
    if isinstance(error, UnicodeError):
        return f"text that is not valid UTF-8 or Unicode ({error}); fix or re-encode the input", 2
    if isinstance(error, MemoryError):
        return "out of memory; use smaller inputs or a smaller model", 1
    return f"internal error ({type(error).__name__}: {error}); please report it with the command you ran", 1


def _terminated(signum: int, frame) -> None:
    # SIGTERM unwinds like an error: open files and models are closed by their `with` blocks.
    raise SystemExit(128 + signum)


def run(app) -> None:
    """Run a Typer app; any error ends the process with an ``error:`` line and its exit code."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _terminated)
    try:
        app()
    except SystemExit:
        raise
    except BrokenPipeError:  # the reader of our output went away (`| head`): stop quietly
        try:
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        except OSError:
            pass
        sys.exit(1)
    except Exception as e:
        if os.environ.get("LFM2EDGE_DEBUG"):
            raise
        message, code = describe_error(e)
        print(f"error: {message}", file=sys.stderr)
        sys.exit(code)


def _print_version(value: bool) -> None:
    # The option's own callback: click runs the group callback only before a command.
    if value:
        import typer

        from lfm2edge import __version__

        print(f"lfm2edge {__version__}")
        raise typer.Exit(0)


def build_app():
    import typer

    from lfm2edge.bench import cli as bench_cli
    from lfm2edge.bench import eval_cli
    from lfm2edge.convert import cli as convert_cli
    from lfm2edge.runtime.frontends import cli as runtime_cli
    from lfm2edge.runtime.frontends import search_cli

    app = typer.Typer(
        name="lfm2edge",
        help="LFM2 retrievers (LFM2.5-ColBERT-350M, LFM2.5-Embedding-350M) from checkpoint to fast, "
        "exact search.",
        no_args_is_help=True,
        pretty_exceptions_enable=False,
        add_completion=False,
    )
    @app.callback()
    def _root(
        version: bool = typer.Option(
            False, "--version", is_eager=True, callback=_print_version, help="print lfm2edge's version and exit"
        ),
    ) -> None:
        pass

    convert_cli.register(app)
    runtime_cli.register(app)
    search_cli.register(app)
    bench_cli.register(app)
    eval_cli.register(app)
    return app


def main() -> None:
    try:
        app = build_app()
    except ImportError as e:
        print(
            f"error: the lfm2edge command needs its CLI extras ({e.name} is missing): "
            "pip install 'lfm2edge[cli,convert]'",
            file=sys.stderr,
        )
        sys.exit(2)
    run(app)


if __name__ == "__main__":
    main()
