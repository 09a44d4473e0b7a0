"""Resident memory of this process: current and peak RSS, in bytes.

Linux reads ``/proc/self/status`` (VmRSS, VmHWM: per address space, so a freshly started
side's process starts from its own baseline). Elsewhere psutil gives the current RSS and
``resource`` the peak (bytes on macOS, KiB on Linux).
"""

from __future__ import annotations

import sys
from pathlib import Path

_STATUS = Path("/proc/self/status")


def _from_proc() -> tuple[int, int] | None:
    try:
        fields = dict(line.split(":", 1) for line in _STATUS.read_text().splitlines() if ":" in line)
        return int(fields["VmRSS"].split()[0]) * 1024, int(fields["VmHWM"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return None


def rss() -> tuple[int, int]:
    """(current RSS, peak RSS) of this process in bytes; 0 where unknown."""
    found = _from_proc()
    if found is not None:
        return found
    current = 0
    try:
        import psutil

        current = int(psutil.Process().memory_info().rss)
    except ImportError:
        pass
    try:
        import resource

        peak = int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
        peak = peak if sys.platform == "darwin" else peak * 1024
    except ImportError:  # Windows
        peak = current
    return current, max(current, peak)
