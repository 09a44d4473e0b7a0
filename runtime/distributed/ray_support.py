"""Ray and pyarrow, imported only when the pipeline runs, and what their errors mean to a user.

``lfm2edge.runtime.distributed`` imports without the ``distributed`` extra; the first call that needs
Ray or pyarrow raises ``FeatureUnavailableError`` naming ``pip install 'lfm2edge[distributed]'``.
Ray reports an actor's exception as text inside its own error types (the exception object does not
survive the trip), so ``typed_remote_error`` reads the lfm2edge error back out of that text.
"""

from __future__ import annotations

import importlib
import logging
import re
import signal
import socket
import threading
from itertools import takewhile
from types import ModuleType

from lfm2edge.runtime.core.errors import (
    FeatureUnavailableError,
    InvalidInputError,
    Lfm2EdgeError,
    ModelFileError,
)

INSTALL_HINT = "pip install 'lfm2edge[distributed]'"
# Ray's own address forms: "auto" (a running cluster), "local" (a new one), HOST:PORT, ray://HOST:PORT.
_ADDRESS = re.compile(r"^(auto|local|ray://\S+|[\w.\-\[\]:]+:\d+)$")
# The last line of a Python traceback: "package.module.ErrorName: message".
_ERROR_LINE = re.compile(r"^(lfm2edge(?:\.\w+)+)\.(\w+): (.*)$", re.MULTILINE)


def require_ray() -> ModuleType:
    """The ``ray`` module with Ray Data loaded, or FeatureUnavailableError saying how to install it."""
    try:
        import ray
        import ray.data  # noqa: F401  (the pipeline's engine; ``ray`` alone lacks it)
    except ImportError as e:
        raise FeatureUnavailableError(
            f"lfm2edge.distributed needs Ray Data ({e.name or 'ray'} is missing): {INSTALL_HINT}"
        ) from None
    return ray


def require_pyarrow() -> ModuleType:
    """The ``pyarrow`` module (with its Parquet support), or FeatureUnavailableError."""
    try:
        import pyarrow
        import pyarrow.parquet  # noqa: F401
    except ImportError as e:
        raise FeatureUnavailableError(
            f"lfm2edge.distributed needs pyarrow ({e.name or 'pyarrow'} is missing): {INSTALL_HINT}"
        ) from None
    return pyarrow


def check_address(address: str) -> str:
    """``address`` if it has the shape of a Ray address, else InvalidInputError naming the forms."""
    if not _ADDRESS.match(address):
        raise InvalidInputError(
            f"{address!r} is not a Ray address; give auto (a running cluster), local (a new one), "
            "HOST:PORT (the head node's GCS port, 6379 by default) or ray://HOST:PORT (Ray Client)"
        )
    return address


def check_reachable(address: str, timeout_s: float = 5.0) -> None:
    """Refuse at once a HOST:PORT (or ray://HOST:PORT) nothing answers on: Ray itself retries for minutes."""
    if address in ("auto", "local"):
        return  # Ray resolves these itself, and fails fast when no cluster runs
    host, _, port = address.removeprefix("ray://").rpartition(":")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s).close()
    except (OSError, ValueError) as e:
        raise InvalidInputError(
            f"nothing answers at the Ray address {address} ({e}); start the head node there with "
            "`ray start --head`, or check the host and port"
        ) from None


def connect(address: str | None = None, quiet: bool = True) -> bool:
    """Join Ray: ``None`` finds a running local cluster or starts one, else the given cluster address.

    Returns True when this call started or joined Ray (the caller then shuts it down), False when
    this process was already connected. ``quiet`` keeps Ray's INFO logs off the terminal. Ray replaces
    the SIGTERM handler when it starts; the one in place before is put back, so a command still
    stops cleanly on SIGTERM.
    """
    ray = require_ray()
    if ray.is_initialized():
        return False
    if address is not None:
        check_reachable(check_address(address))
    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.getsignal(signal.SIGTERM) if main_thread else None
    try:
        ray.init(address=address, logging_level=logging.WARNING if quiet else logging.INFO)
    except ConnectionError as e:
        raise InvalidInputError(
            f"cannot reach a Ray cluster at {address or 'this machine'} ({e}); start one with "
            "`ray start --head` or check the address"
        ) from None
    finally:
        if main_thread and previous is not None:
            signal.signal(signal.SIGTERM, previous)
    if quiet:
        logging.getLogger("ray.data").setLevel(logging.ERROR)
    return True


def typed_remote_error(error: BaseException, model: str) -> Lfm2EdgeError | None:
    """The lfm2edge error an actor raised, rebuilt from Ray's error text (None: it was something else).

    An actor that died while loading the model is also reported with what every node needs.
    """
    text = str(error)
    on_node = (
        f" (in a Ray encoder actor; every node needs {INSTALL_HINT} and the GGUF at {model}, "
        "the same path as on the driver or a shared file system)"
    )
    if "No module named 'lfm2edge'" in text or "No module named 'llama_cpp'" in text:
        return FeatureUnavailableError(f"a Ray node cannot import lfm2edge{on_node}")
    found = list(_ERROR_LINE.finditer(text))
    if not found:
        if "creation task" in text:  # an actor died in __init__ with no lfm2edge error: name the model
            first = text.strip().splitlines()[0] if text.strip() else type(error).__name__
            return ModelFileError(f"an encoder actor could not start: {first}{on_node}")
        return None
    last = found[-1]
    try:
        cls = getattr(importlib.import_module(last.group(1)), last.group(2))
    except (ImportError, AttributeError):
        return None
    if not (isinstance(cls, type) and issubclass(cls, Lfm2EdgeError)):
        return None
    # A message may go on over lines (lists of problems start with "- ").
    rest = text[last.end() :].splitlines()[1:]
    lines = [last.group(3), *takewhile(lambda line: line.startswith("- "), rest)]
    return cls("\n".join(lines) + on_node)
