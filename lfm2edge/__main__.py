"""``python -m lfm2edge``: the same command as ``lfm2edge``."""

from lfm2edge.cli import main

main()
