#!/usr/bin/env python3
"""Build llama-cpp-python from its pinned sdist with lfm2edge's patch series, cached.

Steps: download the sdist with pip and check its sha256; unpack it; apply
``patches/binding/*.patch`` at the sdist root and ``patches/llama.cpp/*.patch`` in
``vendor/llama.cpp`` (each in name order, ``patch -p1``); build a wheel with CMake flags
that suit this platform; keep it in a wheelhouse keyed by version + flags + patch
contents; install it into the given Python. A second run with nothing changed finds the
wheel already installed and returns in about a second.

``--release`` builds the wheel other machines install (``make dist``): portable flags
instead of this CPU's ISA (on x86-64 and Linux aarch64 the CPU backend is built once per
ISA level and ggml picks one at load time), plus ``patches/release/*.patch`` at the sdist
root. ``--wheel-dir DIR`` copies the wheel there instead of installing it; ``--source-dir
DIR`` only writes the patched source, its flags pinned in its pyproject.toml, for
cibuildwheel (.github/workflows/wheels.yml).

Environment:
  LFM2EDGE_CMAKE_ARGS   replaces the CMake flags chosen for this platform
  LFM2EDGE_PATCHES=0    build the stock binding (no patches): the fallback path
  LFM2EDGE_CACHE        cache folder (default ~/.cache/lfm2edge)

Uses only the standard library: it runs before the project's own dependencies exist.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Sequence
from pathlib import Path

VERSION = "0.3.36"
SDIST = f"llama_cpp_python-{VERSION}.tar.gz"
SDIST_SHA256 = "832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e"
VENDORED_COMMIT = "0c1e57098bba43ac29e6e3b677cdceebdd22334f"

PATCH_DIR = Path(__file__).resolve().parent
# The stock install also writes lib/, include/ and bin/ at the top of site-packages, and copies
# every library under each of its names (libllama.so, .so.0, .so.0.5.0): a release wheel keeps
# only what the binding loads (libX.so) and the sonames libraries link against (libX.so.0).
RELEASE_WHEEL_EXCLUDE = ("/lib/", "/include/", "/bin/", "llama_cpp/lib/*.so.*.*", "llama_cpp/lib/libggml-cpu-*.so.*")
# Written into the wheel so the runtime can report what it runs (lfm2edge.runtime.core.build).
BUILD_INFO = "llama_cpp/lfm2edge_build.json"


class BuildError(RuntimeError):
    """A build step failed; the message says what to install or change."""


def log(msg: str) -> None:
    print(f"[llama-build] {msg}", flush=True)


def cache_dir() -> Path:
    return Path(os.environ.get("LFM2EDGE_CACHE", Path.home() / ".cache" / "lfm2edge"))


def cpu_flags() -> set[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def platform_cmake_args(patched: bool = True) -> list[str]:
    """CMake flags for this platform; LFM2EDGE_CMAKE_ARGS overrides them all.

    AMX is enabled only with our patches: stock ggml's AMX path dies with SIGILL on every
    quantized model (llama.cpp #20824), which patches/llama.cpp/0003 fixes.
    """
    if "LFM2EDGE_CMAKE_ARGS" in os.environ:
        return os.environ["LFM2EDGE_CMAKE_ARGS"].split()
    args = ["-DLLAVA_BUILD=OFF", "-DLLAMA_OPENSSL=OFF"]
    system, machine = platform.system(), platform.machine().lower()
    if system == "Darwin" and machine == "arm64":
        return args + ["-DGGML_METAL=ON", "-DGGML_METAL_EMBED_LIBRARY=ON"]
    if system == "Linux" and machine in ("x86_64", "amd64"):
        # Pick the ISA explicitly rather than -march=native: the wheel's key then names it.
        flags = cpu_flags()
        isa = {
            "GGML_AVX": "avx",
            "GGML_AVX2": "avx2",
            "GGML_FMA": "fma",
            "GGML_F16C": "f16c",
            "GGML_BMI2": "bmi2",
            "GGML_AVX512": "avx512f",
            "GGML_AVX512_VNNI": "avx512_vnni",
            "GGML_AVX512_BF16": "avx512_bf16",
            "GGML_AVX512_VBMI": "avx512vbmi",
        }
        if patched:
            isa |= {"GGML_AMX_TILE": "amx_tile", "GGML_AMX_INT8": "amx_int8", "GGML_AMX_BF16": "amx_bf16"}
        args.append("-DGGML_NATIVE=OFF")
        args += [f"-D{opt}={'ON' if flag in flags else 'OFF'}" for opt, flag in isa.items()]
        return args
    return args + ["-DGGML_NATIVE=ON"]


def release_cmake_args() -> list[str]:
    """Portable CMake flags for wheels other machines install; LFM2EDGE_CMAKE_ARGS overrides them.

    Nothing may depend on the building CPU. On x86-64 (Linux, Windows) and Linux aarch64 the CPU
    backend is built once per ISA level as a loadable module (x86: x64, sse42 ... haswell,
    skylakex, icelake, zen4, sapphirerapids with AMX); at load time ggml scores each one against
    the running CPU and keeps the best (patches/release/0001 tells it where the modules are).
    Every Apple Silicon Mac runs the arm64 baseline, with Metal.
    """
    if "LFM2EDGE_CMAKE_ARGS" in os.environ:
        return os.environ["LFM2EDGE_CMAKE_ARGS"].split()
    args = ["-DLLAVA_BUILD=OFF", "-DLLAMA_OPENSSL=OFF", "-DGGML_NATIVE=OFF"]
    system, machine = platform.system(), platform.machine().lower()
    if system == "Darwin" and machine == "arm64":
        return args + ["-DGGML_METAL=ON", "-DGGML_METAL_EMBED_LIBRARY=ON"]
    x86 = machine in ("x86_64", "amd64")
    if (system in ("Linux", "Windows") and x86) or (system == "Linux" and machine in ("aarch64", "arm64")):
        args += ["-DGGML_BACKEND_DL=ON", "-DGGML_CPU_ALL_VARIANTS=ON"]
        if system == "Windows":  # MSVC's OpenMP runtime (vcomp140.dll) is not on every machine
            args.append("-DGGML_OPENMP=OFF")
        return args
    raise BuildError(f"no portable (--release) build is defined for {system} {machine}; "
                     "set LFM2EDGE_CMAKE_ARGS to choose the flags")


def patch_series(enabled: bool, release: bool = False) -> list[tuple[str, Path]]:
    """(target folder inside the sdist, patch file), binding first, each in name order; a
    release build adds patches/release/ (at the sdist root) last."""
    if not enabled:
        return []
    series = [(".", p) for p in sorted((PATCH_DIR / "binding").glob("*.patch"))]
    series += [("vendor/llama.cpp", p) for p in sorted((PATCH_DIR / "llama.cpp").glob("*.patch"))]
    if release:
        series += [(".", p) for p in sorted((PATCH_DIR / "release").glob("*.patch"))]
    return series


def build_key(cmake_args: list[str], series: list[tuple[str, Path]], wheel_exclude: Sequence[str] = ()) -> str:
    h = hashlib.sha256()
    h.update(f"{VERSION}\n{SDIST_SHA256}\n{sys.version_info[:2]}\n".encode())
    h.update(" ".join(cmake_args).encode())
    for target, path in series:
        h.update(f"\n{target}/{path.name}\n".encode())
        h.update(path.read_bytes())
    if wheel_exclude:  # only release builds exclude files (a dev build's key stays what it was)
        h.update(("\nexclude " + " ".join(wheel_exclude)).encode())
    return h.hexdigest()[:16]


def run(cmd: list[str], what: str, **kw) -> None:
    try:
        subprocess.run(cmd, check=True, **kw)
    except FileNotFoundError as e:
        raise BuildError(f"{what}: '{cmd[0]}' not found. Install it (Debian: apt-get install {cmd[0]}).") from e
    except subprocess.CalledProcessError as e:
        raise BuildError(f"{what} failed (exit {e.returncode}): {' '.join(cmd)}") from e


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def fetch_sdist(python: str) -> Path:
    target = cache_dir() / "sdist" / SDIST
    if not target.exists():
        log(f"downloading {SDIST} with pip")
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
            run(
                [python, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                 "--no-build-isolation", "-d", tmp, f"llama-cpp-python=={VERSION}"],
                "downloading the llama-cpp-python sdist (needs PyPI)",
            )
            os.replace(Path(tmp) / SDIST, target)
    digest = sha256(target)
    if digest != SDIST_SHA256:
        target.unlink()
        raise BuildError(f"{SDIST} has sha256 {digest}, expected {SDIST_SHA256}; deleted it, run again")
    return target


def apply_patches(src: Path, series: list[tuple[str, Path]]) -> None:
    for target, path in series:
        log(f"applying {path.parent.name}/{path.name}")
        proc = subprocess.run(
            ["patch", "-p1", "--forward", "--batch", "-d", str(src / target), "-i", str(path)],
            capture_output=True, text=True,
        )
        if proc.returncode != 0:
            raise BuildError(
                f"patch {path.name} does not apply to {target} of llama-cpp-python {VERSION}:\n"
                f"{proc.stdout}{proc.stderr}\nRebase the patch on the pinned tree, or build without "
                "patches with LFM2EDGE_PATCHES=0."
            )


def pin_build_settings(src: Path, cmake_args: list[str], wheel_exclude: Sequence[str]) -> None:
    """Write the flags and exclusions into the source's own pyproject.toml, so that any PEP 517
    frontend (cibuildwheel, pip wheel) builds exactly this configuration without CMAKE_ARGS."""
    pyproject = src / "pyproject.toml"
    text = pyproject.read_text()
    header = "[tool.scikit-build]\n"
    if text.count(header) != 1:
        raise BuildError(f"{pyproject} has no single [tool.scikit-build] table to pin the release flags in")
    pinned = (f"# pinned by lfm2edge's patches/build.py --release\n"
              f"cmake.args = {json.dumps(cmake_args)}\nwheel.exclude = {json.dumps(list(wheel_exclude))}\n")
    pyproject.write_text(text.replace(header, header + pinned))


def prepare_source(
    python: str, src: Path, key: str, cmake_args: list[str], series: list[tuple[str, Path]],
    wheel_exclude: Sequence[str] = (),
) -> None:
    """Unpack the sdist into ``src`` (replacing it), apply the series and record the build info."""
    sdist = fetch_sdist(python)
    shutil.rmtree(src, ignore_errors=True)
    src.parent.mkdir(parents=True, exist_ok=True)
    log(f"unpacking to {src}")
    with tempfile.TemporaryDirectory(dir=src.parent) as tmp:
        with tarfile.open(sdist) as tar:
            tar.extractall(tmp, filter="data")
        os.replace(Path(tmp) / f"llama_cpp_python-{VERSION}", src)
    apply_patches(src, series)
    info = {
        "version": VERSION,
        "llama_cpp_commit": VENDORED_COMMIT,
        "patches": [f"{p.parent.name}/{p.name}" for _, p in series],  # binding/, llama.cpp/, release/
        "cmake_args": cmake_args,
        "key": key,
    }
    (src / BUILD_INFO).write_text(json.dumps(info, indent=2))
    if wheel_exclude:
        pin_build_settings(src, cmake_args, wheel_exclude)


def build_wheel(
    python: str, key: str, cmake_args: list[str], series: list[tuple[str, Path]],
    wheel_exclude: Sequence[str] = (),
) -> Path:
    for tool in ("cmake", "cc", "c++", "patch"):
        if shutil.which(tool) is None:
            raise BuildError(f"'{tool}' is not installed; the build needs cmake, a C/C++ compiler and patch "
                             "(Debian: apt-get install cmake build-essential patch).")
    # A stable source path lets ccache (used by ggml when installed) hit across builds; release
    # builds (the ones that exclude files) get their own, so they never disturb the development build.
    src_root = cache_dir() / "src"
    src = src_root / f"llama_cpp_python-{VERSION}{'-release' if wheel_exclude else ''}"
    prepare_source(python, src, key, cmake_args, series, wheel_exclude)

    env = dict(os.environ, CMAKE_ARGS=" ".join(cmake_args), CCACHE_BASEDIR=str(src_root))
    env.setdefault("CMAKE_BUILD_PARALLEL_LEVEL", str(os.cpu_count() or 2))
    out = Path(tempfile.mkdtemp(prefix="wheel-", dir=cache_dir()))
    log(f"building wheel (CMAKE_ARGS={env['CMAKE_ARGS']})")
    run(
        [python, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-cache-dir",
         "-C", f"build-dir={cache_dir() / 'build' / key}", "-w", str(out), str(src)],
        "building llama-cpp-python (see the compiler output above)",
        env=env,
    )
    wheels = list(out.glob("*.whl"))
    if len(wheels) != 1:
        raise BuildError(f"expected one wheel in {out}, found {wheels}")
    house = cache_dir() / "wheelhouse" / key
    house.mkdir(parents=True, exist_ok=True)
    final = house / wheels[0].name
    os.replace(wheels[0], final)  # atomic: a killed build never leaves a half wheel in the house
    shutil.rmtree(out, ignore_errors=True)
    return final


@contextlib.contextmanager
def build_lock(release: bool = False):
    """One build at a time per source folder: builds share the unpacked source (for ccache)."""
    cache_dir().mkdir(parents=True, exist_ok=True)
    with open(cache_dir() / (".build-release.lock" if release else ".build.lock"), "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        yield


def cached_wheel(key: str) -> Path | None:
    house = cache_dir() / "wheelhouse" / key
    wheels = sorted(house.glob("*.whl")) if house.is_dir() else []
    return wheels[0] if wheels else None


def installed_key(python: str) -> str | None:
    code = (
        "import importlib.util, json, pathlib, sys\n"
        "s = importlib.util.find_spec('llama_cpp')\n"
        "p = s and pathlib.Path(s.origin).parent / 'lfm2edge_build.json'\n"
        "print(json.loads(p.read_text())['key'] if p and p.exists() else '')\n"
    )
    proc = subprocess.run([python, "-c", code], capture_output=True, text=True)
    return proc.stdout.strip() or None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--python", default=sys.executable, help="interpreter to install into")
    parser.add_argument("--print-key", action="store_true", help="print the cache key and exit")
    parser.add_argument("--release", action="store_true",
                        help="portable flags and patches/release/: a wheel for other machines (make dist)")
    parser.add_argument("--wheel-dir", type=Path, help="copy the wheel into this folder instead of installing it")
    parser.add_argument("--source-dir", type=Path,
                        help="only write the patched source here, flags pinned (with --release), and exit")
    args = parser.parse_args()

    patched = os.environ.get("LFM2EDGE_PATCHES", "1") != "0"
    try:
        if args.release and not patched:
            raise BuildError("a release build carries the patch series; unset LFM2EDGE_PATCHES=0")
        series = patch_series(patched, release=args.release)
        cmake_args = release_cmake_args() if args.release else platform_cmake_args(patched)
        exclude = RELEASE_WHEEL_EXCLUDE if args.release else ()
        key = build_key(cmake_args, series, exclude)
        if args.print_key:
            print(key)
            return 0
        if args.source_dir is not None:
            prepare_source(args.python, args.source_dir.resolve(), key, cmake_args, series, exclude)
            log(f"patched source in {args.source_dir} [{key}], CMake flags: {' '.join(cmake_args)}")
            return 0
        if args.wheel_dir is None and installed_key(args.python) == key:
            log(f"llama-cpp-python {VERSION} [{key}] already installed")
            return 0
        with build_lock(args.release):
            wheel = cached_wheel(key)
            if wheel is None:
                wheel = build_wheel(args.python, key, cmake_args, series, exclude)
            else:
                log(f"reusing cached wheel {wheel}")
        if args.wheel_dir is not None:
            args.wheel_dir.mkdir(parents=True, exist_ok=True)
            shutil.copy2(wheel, args.wheel_dir / wheel.name)
            log(f"wrote {args.wheel_dir / wheel.name} [{key}]")
            return 0
        run([args.python, "-m", "pip", "install", "--no-deps", "--force-reinstall", "--no-cache-dir", str(wheel)],
            "installing the llama-cpp-python wheel")
        # The binding's own light dependencies (numpy, jinja2, diskcache, typing-extensions).
        run([args.python, "-m", "pip", "install", "-q", str(wheel)], "installing llama-cpp-python's dependencies")
    except BuildError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    log(f"installed llama-cpp-python {VERSION} [{key}], patches: {[p.name for _, p in series] or 'none'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
