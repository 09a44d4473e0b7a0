"""Run hostile cases in child processes: each must end in the expected Python exception (or none),
never in a signal or a hang.

A case is a few lines of Python. Cases run in batches, one child per batch, so each does not pay
for a fresh interpreter and llama.cpp; a child that dies (a signal) or stops answering is killed,
the case it was running is recorded as crashed or hung, and a new child takes the rest. Tests then
look up their own case's outcome, so every case is its own pytest item:

    CASES = [Case("nan eps", "lfm2edge.load(p)", "ModelFileError", "norm_epsilon"), ...]
    outcomes = run_cases(CASES, prelude="import lfm2edge")
    check(outcomes["nan eps"])
"""

from __future__ import annotations

import json
import os
import re
import selectors
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass

# The child: run the prelude once, then each case in its own namespace, one JSON line per event.
_CHILD = r"""
import json, os, sys, traceback
# Events go to a private copy of stdout; whatever native code prints goes to stderr instead.
out = os.fdopen(os.dup(1), "w", buffering=1)
os.dup2(2, 1)
cases = json.loads(sys.stdin.readline())
prelude = json.loads(sys.stdin.readline())
base = {"__name__": "__hostile__"}
exec(prelude, base)
for name, code in cases:
    print(json.dumps({"start": name}), file=out, flush=True)
    try:
        exec(code, dict(base))
    except BaseException as e:
        print(json.dumps({"end": name, "error": type(e).__name__,
                          "mro": [c.__name__ for c in type(e).__mro__],
                          "message": str(e)[:2000],
                          "where": traceback.format_exc(limit=-3)[-1500:]}), file=out, flush=True)
    else:
        print(json.dumps({"end": name, "error": None, "mro": [], "message": "", "where": ""}), file=out, flush=True)
"""


@dataclass(frozen=True)
class Case:
    name: str
    code: str
    error: str | None  # the exception class expected (its name or a base class's), None: must not raise
    match: str = ""  # a regex the message must contain (case-insensitive)


@dataclass(frozen=True)
class Outcome:
    case: Case
    ended: str  # "raised", "returned", "crashed", "hung"
    error: str | None = None
    mro: tuple[str, ...] = ()
    message: str = ""
    detail: str = ""  # the signal, or the last traceback lines


def run_cases(
    cases: Sequence[Case],
    prelude: str = "",
    timeout_s: float = 60.0,
    env: dict[str, str] | None = None,
    cwd: str | None = None,
) -> dict[str, Outcome]:
    """Every case's outcome, by name. ``timeout_s`` bounds each case (a hang is killed)."""
    names = [c.name for c in cases]
    if len(set(names)) != len(names):
        raise ValueError("case names must be unique")
    by_name = {c.name: c for c in cases}
    outcomes: dict[str, Outcome] = {}
    pending = list(cases)
    while pending:
        outcomes.update(_run_batch(pending, prelude, timeout_s, env, cwd, by_name))
        pending = [c for c in pending if c.name not in outcomes]
    return outcomes


def _run_batch(cases, prelude, timeout_s, env, cwd, by_name) -> dict[str, Outcome]:
    # GGML_NO_BACKTRACE: an abort must not start gdb (ggml's backtrace helper, which can hang).
    child_env = {**os.environ, **(env or {}), "PYTHONUNBUFFERED": "1", "GGML_NO_BACKTRACE": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-c", _CHILD], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL, env=child_env, cwd=cwd,
    )
    assert proc.stdin is not None and proc.stdout is not None
    proc.stdin.write((json.dumps([[c.name, c.code] for c in cases]) + "\n" + json.dumps(prelude) + "\n").encode())
    proc.stdin.close()
    done: dict[str, Outcome] = {}
    current: str | None = None
    fd = proc.stdout.fileno()
    sel = selectors.DefaultSelector()
    sel.register(fd, selectors.EVENT_READ)
    pending = b""  # bytes read but not yet a whole line
    # The prelude (imports, fixtures) gets the same allowance as a case.
    deadline = time.monotonic() + timeout_s
    try:
        while True:
            if b"\n" not in pending:
                left = deadline - time.monotonic()
                if left <= 0 or not sel.select(timeout=left):
                    proc.kill()
                    proc.wait()
                    if current is None:
                        raise RuntimeError(f"the hostile child's prelude did not finish in {timeout_s} s")
                    done[current] = Outcome(by_name[current], "hung", detail=f"no answer in {timeout_s} s")
                    return done
                chunk = os.read(fd, 1 << 16)
                if not chunk:  # the child is gone
                    rc = proc.wait()
                    if current is not None:
                        detail = f"signal {signal.Signals(-rc).name}" if rc < 0 else f"exit code {rc}"
                        done[current] = Outcome(by_name[current], "crashed", detail=detail)
                    elif len(done) < len(cases):
                        raise RuntimeError(f"the hostile child's prelude failed (exit code {rc})")
                    return done
                pending += chunk
                continue
            line, pending = pending.split(b"\n", 1)
            event = json.loads(line)
            if "start" in event:
                current = event["start"]
                deadline = time.monotonic() + timeout_s
                continue
            name = event["end"]
            done[name] = Outcome(
                by_name[name], "raised" if event["error"] else "returned", event["error"],
                tuple(event["mro"]), event["message"], event["where"],
            )
            current = None
    finally:
        sel.close()
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def check(outcome: Outcome) -> None:
    """Assert the case ended as expected: the right exception and message, or a normal return."""
    case = outcome.case
    assert outcome.ended not in ("crashed", "hung"), f"{case.name}: {outcome.ended} ({outcome.detail})"
    if case.error is None:
        assert outcome.ended == "returned", f"{case.name}: raised {outcome.error}: {outcome.message}\n{outcome.detail}"
        return
    assert outcome.ended == "raised", f"{case.name}: returned, expected {case.error}"
    assert case.error in outcome.mro, (
        f"{case.name}: raised {outcome.error} ({outcome.message}), expected {case.error}\n{outcome.detail}"
    )
    if case.match:
        assert re.search(case.match, outcome.message, re.IGNORECASE | re.DOTALL), (
            f"{case.name}: message {outcome.message!r} does not match {case.match!r}"
        )
