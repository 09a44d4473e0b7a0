"""The thread policy: fewer decode threads while other processes hold cores, all of them otherwise."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from lfm2edge.runtime.core.cpu import (
    CpuReading,
    CpuWatch,
    ThreadPolicy,
    cgroup_cpu_limit,
    read_proc_stat,
    usable_cpus,
)


class Counters:
    """Hand-driven counters: the machine's busy seconds, this process's own, the clock, and how many
    threads are runnable now (None: unknown, as where /proc/stat has no procs_running)."""

    def __init__(self) -> None:
        self.wall = self.busy = self.own = 0.0
        self.runnable: int | None = None

    def watch(self, cpus: int = 2, window_s: float = 0.2) -> CpuWatch:
        return CpuWatch(frozenset(range(cpus)), window_s, lambda _: CpuReading(self.busy, self.runnable),
                        lambda: self.wall, lambda: self.own)

    def advance(self, seconds: float, others: float, own: float = 0.0, runnable_now: int | None = None) -> None:
        self.wall += seconds
        self.own += own * seconds
        self.busy += (others + own) * seconds
        self.runnable = runnable_now


def test_other_load_takes_threads_away_and_gives_them_back():
    c = Counters()
    policy = ThreadPolicy(2, watch=c.watch())
    c.advance(0.3, others=0.05, own=1.0)
    assert policy.threads() == 2
    c.advance(0.3, others=1.0)  # another process computes flat out on one core while we wait
    assert policy.threads() == 1
    c.advance(0.3, others=1.0, own=1.0)
    assert policy.threads() == 1
    c.advance(0.3, others=0.1)
    assert policy.threads() == 2


def test_a_burst_that_ended_takes_nothing_from_the_next_decode():
    """The window's average says another process was busy, but nothing else is runnable now."""
    c = Counters()
    policy = ThreadPolicy(2, watch=c.watch())
    c.advance(2.0, others=0.8, runnable_now=1)  # only the caller is runnable
    assert policy.threads() == 2
    c.advance(2.0, others=1.0, runnable_now=2)  # a neighbour still computing
    assert policy.threads() == 1


def test_a_short_window_keeps_the_last_answer():
    c = Counters()
    policy = ThreadPolicy(2, watch=c.watch(window_s=0.2))
    c.advance(0.3, others=1.0)
    assert policy.threads() == 1
    c.advance(0.05, others=0.0)  # too short to tell: keep yielding
    assert policy.threads() == 1


@pytest.mark.parametrize(("others", "threads"), [(0.0, 8), (0.4, 8), (0.6, 7), (2.0, 6), (7.9, 1), (8.0, 1)])
def test_threads_are_the_cores_others_leave(others, threads):
    c = Counters()
    policy = ThreadPolicy(8, watch=c.watch(cpus=8))
    c.advance(1.0, others=others)
    assert policy.threads() == threads


def test_fixed_policy_and_the_cap():
    c = Counters()
    watch = c.watch(cpus=8)
    c.advance(1.0, others=0.0)
    assert ThreadPolicy(3, watch=watch).threads() == 3  # never more than asked for
    c.advance(1.0, others=6.0)
    assert ThreadPolicy(4, adaptive=False, watch=watch).threads() == 4


def test_no_counters_means_no_other_load():
    watch = CpuWatch(frozenset({0, 1}), read_busy=lambda _: None)
    assert watch.others() == 0.0
    assert watch.others() == 0.0
    assert ThreadPolicy(2, watch=watch).threads() == 2


def test_cgroup_quota(tmp_path: Path):
    f = tmp_path / "cpu.max"
    f.write_text("max 100000\n")
    assert cgroup_cpu_limit(f) is None
    f.write_text("150000 100000\n")
    assert cgroup_cpu_limit(f) == 1.5
    assert cgroup_cpu_limit(tmp_path / "missing") is None


@pytest.mark.skipif(read_proc_stat(usable_cpus()) is None, reason="no /proc/stat on this OS")
def test_a_real_busy_process_is_seen():
    """A real competing process (one core, normal priority) shows up as about one core of other load."""
    watch = CpuWatch(window_s=0.3)
    hog = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.2)
        watch.others()  # start a window with the hog already running
        time.sleep(0.6)
        seen = watch.others()
        threads = ThreadPolicy(len(watch.cpus), watch=watch).threads()
    finally:
        hog.kill()
        hog.wait()
    assert seen >= 0.7, seen
    if len(watch.cpus) >= 2:
        assert threads <= len(watch.cpus) - 1


def test_no_thread_spins_behind_an_idle_encoder(colbert_gguf):
    """After a call returns, llama.cpp's worker threads go to sleep: an idle encoder uses no CPU."""
    import lfm2edge

    with lfm2edge.load(colbert_gguf, n_threads=2) as enc:
        enc.encode_document(["a document to wake every thread"] * 4)
        time.sleep(0.05)  # libgomp's bounded spin (GOMP_SPINCOUNT) ends well within this
        before = time.process_time()
        time.sleep(0.5)
        used = time.process_time() - before
    assert used < 0.05, f"{used:.3f} CPU seconds used while idle"


@pytest.mark.skipif(len(usable_cpus()) < 2 or read_proc_stat(usable_cpus()) is None,
                    reason="needs /proc/stat and two CPUs")
def test_an_encoder_yields_a_core_to_a_busy_process(colbert_gguf):
    """With another process computing flat out, decodes run on the cores it leaves (same vectors)."""
    import numpy as np

    import lfm2edge

    n = len(usable_cpus())
    with lfm2edge.load(colbert_gguf, n_threads=n) as enc:
        quiet = enc.encode_query("which threads encode me?")
        hog = subprocess.Popen([sys.executable, "-c", "while True: pass"])
        try:
            for _ in range(3):  # each call after a gap longer than the watch's window
                time.sleep(0.4)
                busy = enc.encode_query("which threads encode me?")
            used = enc._ctx.n_threads
        finally:
            hog.kill()
            hog.wait()
        fixed = lfm2edge.load(colbert_gguf, n_threads=n, adaptive_threads=False)
        with fixed:
            assert fixed.thread_policy.threads() == n
    assert used < n
    np.testing.assert_allclose(busy, quiet, atol=1e-5)
