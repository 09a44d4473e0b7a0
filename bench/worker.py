"""The entry point of each side's own process (multiprocessing, spawn).

A side runs alone in a fresh interpreter: its peak RSS is its own, the llama.cpp side never
imports torch, no thread pool of another engine spins next to it, and a crash in native code
costs one side, not the run. Thread-pool sizes are fixed before numpy or torch load.
Messages to the parent: ("progress", text), then ("result", SideOutput, cpu seconds) or
("error", text).
"""

from __future__ import annotations

import os
import site
import sys
import traceback

THREAD_ENV = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "VECLIB_MAXIMUM_THREADS",
              "NUMEXPR_NUM_THREADS")


def _use_own_site_packages() -> None:
    """A side run by another interpreter must import that interpreter's llama_cpp.

    multiprocessing's spawn hands the child the parent's sys.path, which would load the
    parent's (patched) llama_cpp into the "stock" side: put this interpreter's own
    site-packages first instead.
    """
    if "llama_cpp" in sys.modules:
        raise RuntimeError("llama_cpp was imported before the side could choose its own")
    own = site.getsitepackages()
    sys.path[:] = own + [p for p in sys.path if p not in own and not p.endswith("site-packages")]


def child_main(spec, queue) -> None:
    for name in THREAD_ENV:
        os.environ[name] = str(spec.threads)
    if spec.python:
        _use_own_site_packages()
    try:
        if spec.engine == "torch":
            from lfm2edge.bench.torch_side import run
        elif spec.engine == "llama.cpp":
            from lfm2edge.bench.llama_side import run
        else:
            from lfm2edge.bench.peer_side import run
        output = run(spec, lambda text: queue.put(("progress", text)))
        t = os.times()
        # Children's time included: the busy regimes' competing process is the side's own child.
        queue.put(("result", output, t.user + t.system + t.children_user + t.children_system))
    except BaseException as e:  # noqa: BLE001 - everything goes back to the parent as text
        queue.put(("error", f"{type(e).__name__}: {e}\n{traceback.format_exc(limit=8)}", 0.0))
