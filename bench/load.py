"""Another process that keeps one core busy, as a desktop app's neighbours do (a build, a browser tab).

The busy regimes run inside ``busy_core()``: a plain Python loop at normal priority in its own
process, started before the figure and killed after it. Its CPU time is a child's of the side's
process, so the run's "other processes" share does not count it as foreign load.
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager

SPIN = "while True: pass"


@contextmanager
def busy_core(settle_s: float = 0.3) -> Iterator[subprocess.Popen]:
    """One process computing flat out for the duration of the block (``settle_s`` to get it scheduled)."""
    hog = subprocess.Popen([sys.executable, "-c", SPIN], stdin=subprocess.DEVNULL)
    try:
        time.sleep(settle_s)
        yield hog
    finally:
        hog.kill()
        hog.wait()
