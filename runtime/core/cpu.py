"""How many threads a decode should use now: the CPUs this process may use, less those other processes take.

Why: llama.cpp splits every graph node evenly over its threads and meets them at a barrier after it.
When another process keeps one of two cores busy, the thread that shares that core runs half the
time, every barrier waits for it, and the waiter's OpenMP spin takes CPU from it too. Measured on
a 2-core VM (bf16 query, 0.3 s gaps, p50): 2 threads 54 ms quiet but 218 ms with one core busy;
1 thread 102 ms quiet and 97 ms busy. So before each decode the encoder asks ``CpuWatch`` how
much CPU other processes used since it last looked (per-CPU counters of /proc/stat, less this
process's own CPU time) and runs on the cores they leave free, back to all of them once the other
load stops. That average is capped by what is runnable right now (/proc/stat's ``procs_running``,
less the caller): a neighbour whose burst ended during a long idle gap takes nothing from the next
decode. No thread polls in the background: the reading happens on the caller's thread, and the
average moves on at most once per ``window_s``.

Where /proc/stat is missing (macOS, Windows) the watch reports no other load: threads stay fixed.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

# Other processes must take at least this share of a core before a thread gives its core up:
# background noise (a shell, a daemon) stays below it, a process computing flat out is far above.
YIELD_AT = 0.5


def usable_cpus() -> frozenset[int]:
    """The CPU numbers this process may run on (its affinity; every CPU where the OS has none)."""
    if hasattr(os, "sched_getaffinity"):
        return frozenset(os.sched_getaffinity(0))
    return frozenset(range(os.cpu_count() or 1))


def cgroup_cpu_limit(path: Path = Path("/sys/fs/cgroup/cpu.max")) -> float | None:
    """The CPUs a cgroup v2 quota grants this container ("max" or no file: None)."""
    try:
        quota, period = path.read_text().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        return None


def default_threads() -> int:
    """The CPUs this process may use: its affinity, capped by a container's CPU quota."""
    n = len(usable_cpus())
    limit = cgroup_cpu_limit()
    if limit is not None:
        n = min(n, max(1, int(limit)))
    return max(1, n)


@dataclass(frozen=True)
class CpuReading:
    busy_s: float  # CPU seconds used so far by everything on the watched CPUs (steal included: the host took them)
    runnable: int | None  # threads runnable right now on the whole machine, the reader included


@dataclass(frozen=True)
class CpuSample:
    wall_s: float
    busy_s: float
    own_s: float  # CPU seconds used by this process, all of its threads


def read_proc_stat(cpus: frozenset[int], path: Path = Path("/proc/stat")) -> CpuReading | None:
    """Busy CPU seconds so far on ``cpus`` (user, nice, system, irq, softirq, steal) and the runnable count."""
    try:
        text = path.read_text()
    except OSError:
        return None
    ticks, runnable = 0, None
    for line in text.splitlines():
        name, _, rest = line.partition(" ")
        if name == "procs_running":
            runnable = int(rest)
        if not name.startswith("cpu") or name == "cpu" or not name[3:].isdigit() or int(name[3:]) not in cpus:
            continue
        fields = [int(x) for x in rest.split()]
        # user nice system idle iowait irq softirq steal (guest time is already inside user)
        ticks += sum(fields[:8]) - fields[3] - fields[4]
    return CpuReading(ticks / os.sysconf("SC_CLK_TCK"), runnable)


class CpuWatch:
    """The CPU other processes take: their average over the last window (two readings at least
    ``window_s`` apart), capped by how many other threads are runnable right now."""

    def __init__(
        self,
        cpus: frozenset[int] | None = None,
        window_s: float = 0.2,
        read_busy: Callable[[frozenset[int]], CpuReading | None] = read_proc_stat,
        clock: Callable[[], float] = time.monotonic,
        own_cpu: Callable[[], float] = time.process_time,
    ):
        self.cpus = usable_cpus() if cpus is None else cpus
        self.window_s = window_s
        self._read_busy, self._clock, self._own_cpu = read_busy, clock, own_cpu
        self._lock = threading.Lock()
        reading = self._read_busy(self.cpus)
        self._base = None if reading is None else CpuSample(self._clock(), reading.busy_s, self._own_cpu())
        self._average = 0.0

    def others(self) -> float:
        """Cores' worth of CPU other processes take (0.0 where unknown)."""
        with self._lock:
            if self._base is None:
                return 0.0
            reading = self._read_busy(self.cpus)
            if reading is None:
                return 0.0
            now = CpuSample(self._clock(), reading.busy_s, self._own_cpu())
            elapsed = now.wall_s - self._base.wall_s
            if elapsed >= self.window_s:
                used = (now.busy_s - self._base.busy_s) - (now.own_s - self._base.own_s)
                self._average = min(float(len(self.cpus)), max(0.0, used / elapsed))
                self._base = now
            if reading.runnable is None:
                return self._average
            return min(self._average, float(max(0, reading.runnable - 1)))


class ThreadPolicy:
    """Threads for the next decode: at most ``max_threads``, fewer while other processes hold cores.

    ``adaptive=False`` always answers ``max_threads`` (what a fixed thread count asks for).
    """

    def __init__(self, max_threads: int, adaptive: bool = True, watch: CpuWatch | None = None):
        self.max_threads = max_threads
        self.adaptive = adaptive
        self._watch = watch

    def threads(self) -> int:
        if not self.adaptive:
            return self.max_threads
        watch = self._watch or shared_watch()
        free = len(watch.cpus) - watch.others()
        return max(1, min(self.max_threads, int(free + (1.0 - YIELD_AT))))


_shared: CpuWatch | None = None
_shared_lock = threading.Lock()


def shared_watch() -> CpuWatch:
    """One watch per process: every encoder sees the same machine."""
    global _shared
    with _shared_lock:
        if _shared is None:
            _shared = CpuWatch()
        return _shared
