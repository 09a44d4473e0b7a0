"""Timing and summary statistics: warm-up, adaptive run counts, percentiles.

``measure`` runs a callable until it has both a minimum number of runs (so the tails mean
something) and a time budget, with a hard cap so a slow machine still finishes. Timings are
``time.perf_counter`` seconds with the garbage collector paused inside each run.
"""

from __future__ import annotations

import gc
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class RunPolicy:
    """How long to measure one figure.

    Runs continue until ``n >= min_runs`` and ``budget_s`` has elapsed, or ``max_runs`` is
    reached. After ``cap_s`` of measuring, a figure stops as soon as it has ``floor_runs``.
    """

    budget_s: float = 4.0
    min_runs: int = 20
    max_runs: int = 2000
    cap_s: float = 40.0
    floor_runs: int = 5
    warmup_s: float = 0.3  # warm-up runs continue until this much time has passed
    max_warmup_runs: int = 3


@dataclass(frozen=True)
class Summary:
    """Latency statistics of one figure, in milliseconds."""

    n: int
    p50_ms: float
    p95_ms: float
    p99_ms: float
    mean_ms: float
    min_ms: float
    max_ms: float
    std_ms: float

    @classmethod
    def of(cls, seconds: np.ndarray) -> Summary:
        ms = np.asarray(seconds, dtype=np.float64) * 1e3
        if ms.ndim != 1 or ms.size == 0:
            raise ValueError("a summary needs a non-empty 1-D array of timings")
        p50, p95, p99 = np.percentile(ms, [50, 95, 99])  # linear interpolation: monotone in q
        return cls(
            n=int(ms.size),
            p50_ms=float(p50),
            p95_ms=float(p95),
            p99_ms=float(p99),
            mean_ms=float(ms.mean()),
            min_ms=float(ms.min()),
            max_ms=float(ms.max()),
            std_ms=float(ms.std(ddof=1)) if ms.size > 1 else 0.0,
        )


def timed(fn: Callable[[], object]) -> tuple[float, object]:
    """(seconds, result) of one call, with the garbage collector paused."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        t0 = time.perf_counter()
        out = fn()
        return time.perf_counter() - t0, out
    finally:
        if enabled:
            gc.enable()


def measure(run: Callable[[int], object], policy: RunPolicy, gap_s: float = 0.0) -> np.ndarray:
    """Seconds of each measured call of ``run(i)`` (i counts calls from 0, warm-up included).

    Warm-up calls are not recorded: up to ``max_warmup_runs``, stopping once they took ``warmup_s``
    together (``max_warmup_runs=0``: none, for code the previous figure already warmed). ``gap_s``
    idles before every measured call (not timed, not counted in the budget): calls as a person
    makes them, after the engine's threads went to sleep.
    """
    i = 0
    spent = 0.0
    while i < policy.max_warmup_runs:
        dt, _ = timed(lambda: run(i))  # noqa: B023 - called immediately
        spent += dt
        i += 1
        if spent >= policy.warmup_s:
            break
    samples: list[float] = []
    start = time.perf_counter()
    while len(samples) < policy.max_runs:
        if gap_s > 0:
            time.sleep(gap_s)
        dt, _ = timed(lambda: run(i))  # noqa: B023 - called immediately
        samples.append(dt)
        i += 1
        elapsed = time.perf_counter() - start - gap_s * len(samples)
        if len(samples) >= policy.min_runs and elapsed >= policy.budget_s:
            break
        if elapsed >= policy.cap_s and len(samples) >= policy.floor_runs:
            break
    return np.asarray(samples, dtype=np.float64)


def runs_for_items(items: int, per_run: int) -> int:
    """Runs needed for ``per_run`` items each to cover ``items`` items once."""
    return max(1, math.ceil(items / max(1, per_run)))
