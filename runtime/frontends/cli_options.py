"""The options every ``lfm2edge`` command spells the same way, defined once.

Each command module (convert/cli.py, runtime/frontends/cli.py, runtime/frontends/search_cli.py, bench/cli.py) takes
``--json`` and ``--threads`` from here, so their names, short forms and help never drift apart.
"""

from __future__ import annotations

from typing import Annotated

import typer

JsonFlag = Annotated[bool, typer.Option("--json", help="print one JSON document for scripts")]
Threads = Annotated[
    int | None,
    typer.Option(
        "--threads",
        "-t",
        help="CPU threads (default: every CPU this process may use)",
        show_default=False,
    ),
]
