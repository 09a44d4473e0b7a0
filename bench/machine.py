"""The machine a run measured: CPU, the ISA features ggml cares about, cores, load, the llama.cpp build."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from importlib import metadata
from pathlib import Path

# CPU features that decide which ggml kernels run (x86 /proc/cpuinfo names, plus Arm ones).
GGML_RELEVANT_FLAGS = (
    "sse3", "ssse3", "avx", "avx2", "fma", "f16c", "bmi2", "avx_vnni",
    "avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512cd", "avx512_vnni", "avx512_bf16", "avx512vbmi",
    "avx512_fp16", "amx_tile", "amx_int8", "amx_bf16",
    "asimd", "asimddp", "sve", "sve2", "i8mm", "bf16", "fphp", "asimdhp",
)


def _cpuinfo() -> tuple[str, list[str]]:
    model, flags = "", []
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            key = key.strip().lower()
            if key in ("model name", "cpu model", "hardware") and not model:
                model = value.strip()
            elif key in ("flags", "features") and not flags:
                flags = value.split()
    except OSError:
        pass
    if not model and sys.platform == "darwin":
        try:
            model = subprocess.run(["sysctl", "-n", "machdep.cpu.brand_string"], capture_output=True,
                                   text=True, timeout=5).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            pass
    return model or platform.processor() or platform.machine(), flags


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def available_cores() -> int:
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return os.cpu_count() or 1


def physical_cores() -> int | None:
    try:
        import psutil

        return psutil.cpu_count(logical=False)
    except ImportError:
        return None


def load_average() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (OSError, AttributeError):
        return None


def maxsim_backend() -> str:
    """What scores MaxSim over the bench's cached documents (float16, unchangeable) at ColBERT's 128 dims:
    "kernel amx", "kernel vnni", "kernel avx512bf16", "kernel avx512", "kernel avx2" or "numpy"."""
    from lfm2edge.runtime.core.maxsim import coded_path

    path = coded_path(128)
    return f"kernel {path}" if path else "numpy"


def describe_machine(threads: int) -> dict:
    """Everything the JSON's ``machine`` object holds (see bench/README.md)."""
    from lfm2edge.runtime.core.build import build_info

    model, flags = _cpuinfo()
    b = build_info()
    mem = None
    try:
        import psutil

        mem = int(psutil.virtual_memory().total)
    except ImportError:
        pass
    return {
        "cpu_model": model,
        "architecture": platform.machine(),
        "isa_flags": [f for f in GGML_RELEVANT_FLAGS if f in flags],
        "logical_cores": os.cpu_count(),
        "physical_cores": physical_cores(),
        "available_cores": available_cores(),
        "threads": threads,
        "memory_bytes": mem,
        "os": platform.platform(),
        "python": platform.python_version(),
        "numpy": _version("numpy"),
        "torch": _version("torch"),
        "transformers": _version("transformers"),
        "load_average_start": load_average(),
        "maxsim_backend": maxsim_backend(),
        "llama_cpp": {
            "binding_version": b.binding_version,
            "commit": b.llama_cpp_commit or None,
            "patches": list(b.patches),
            "patched": b.patched,
            "cmake_args": list(b.cmake_args),
            "system_info": b.system_info.strip(),
            "amx": b.amx,
        },
    }


def amx_usable() -> bool:
    """Whether llama.cpp's AMX path can run here: a build compiled with AMX on a CPU that has AMX-INT8."""
    from lfm2edge.runtime.core.build import build_info

    return build_info().amx and "amx_int8" in _cpuinfo()[1]


def q8_0_on_vnni() -> bool:
    """Whether q8_0 GGUFs run on lfm2edge's patch llama.cpp/0017 here: AVX512-VNNI in the build and the CPU,
    and no AMX to take them first."""
    from lfm2edge.runtime.core.build import build_info

    return build_info().q8_0_on_vnni and "avx512_vnni" in _cpuinfo()[1]


def bf16_on_avx512() -> bool:
    """Whether bf16 GGUFs run on lfm2edge's patch llama.cpp/0019 here: AVX512-BF16 in the build and the CPU,
    and no AMX to take them first."""
    from lfm2edge.runtime.core.build import build_info

    return build_info().bf16_on_avx512 and "avx512_bf16" in _cpuinfo()[1]


def f32_on_avx512() -> bool:
    """Whether f32 GGUFs run on lfm2edge's patch llama.cpp/0019 here: AVX-512 in the build and the CPU."""
    from lfm2edge.runtime.core.build import build_info

    return build_info().f32_on_avx512 and "avx512f" in _cpuinfo()[1]


def bf16_on_amx() -> bool:
    """Whether bf16 GGUFs run on AMX tiles here: lfm2edge's patch llama.cpp/0004, built with AMX-BF16, on a
    CPU that has it."""
    from lfm2edge.runtime.core.build import build_info

    return amx_usable() and build_info().bf16_on_amx and "amx_bf16" in _cpuinfo()[1]


def bf16_native() -> bool:
    """Whether bf16 GGUFs multiply in bf16 here: on AMX tiles, or with AVX512-BF16's dot products (a build
    compiled with them, on a CPU that has them)."""
    from lfm2edge.runtime.core.build import build_info

    return bf16_on_amx() or (build_info().bf16_native and "avx512_bf16" in _cpuinfo()[1])


def system_busy_seconds() -> float | None:
    """CPU seconds every process on the machine has used so far (all cores, idle and iowait excluded)."""
    try:
        import psutil

        t = psutil.cpu_times()
        return float(sum(t) - t.idle - getattr(t, "iowait", 0.0) - getattr(t, "guest", 0.0)
                     - getattr(t, "guest_nice", 0.0))
    except (ImportError, OSError):
        pass
    try:
        fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        # user nice system idle iowait irq softirq steal guest guest_nice; guest time is inside user
        busy = sum(fields[:8]) - fields[3] - fields[4]
        return busy / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None
