"""The options every ``lfm2edge`` command spells the same way, defined once.

Each command module (convert/cli.py, runtime/frontends/cli.py, runtime/frontends/search_cli.py, bench/cli.py) takes
``--json``, ``--threads`` and ``--weight-kernel`` from here, so their names, short forms and help never drift apart.
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
WeightKernelOption = Annotated[
    str | None,
    typer.Option(
        "--weight-kernel",
        help="load the GGUF with this option, its matmuls on another kernel: ozaki_f32 or split_f32 (f32 files, "
        "AMX), dynamic_int8 (bf16 files, AMX or AVX512-VNNI). An index remembers it: commands that open the index "
        "reuse it",
        show_default=False,
    ),
]
