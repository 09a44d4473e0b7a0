"""Which llama.cpp the runtime runs, and whether it can run bidirectional LFM2 correctly.

A llama.cpp older than upstream build b9777 loads these GGUFs, makes attention
bidirectional, but keeps the short conv causal: wrong vectors and no error. We refuse it.
llama-cpp-python 0.3.31 vendors b9733 (too old); 0.3.32 vendors b9837, the first with support.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from pathlib import Path

from lfm2edge.runtime.core.errors import UnsupportedBuildError

PINNED_BINDING = "0.3.36"
FIRST_SUPPORTED_BINDING = (0, 3, 32)
BUILD_INFO_FILE = "lfm2edge_build.json"  # written into the wheel by patches/build.py


@dataclass(frozen=True)
class BuildInfo:
    binding_version: str
    llama_cpp_commit: str  # "" when the build did not record it (a stock install)
    patches: tuple[str, ...]  # names of the lfm2edge patches built in
    cmake_args: tuple[str, ...]
    system_info: str  # llama_print_system_info(): the compiled ISA

    @property
    def patched(self) -> bool:
        return bool(self.patches)

    def has_patch(self, stem: str) -> bool:
        """Whether a patch whose file name contains ``stem`` is built in."""
        return any(stem in p for p in self.patches)

    @property
    def amx(self) -> bool:
        return "AMX_INT8 = 1" in self.system_info

    @property
    def bf16_on_amx(self) -> bool:
        """Whether bf16 GGUFs run on AMX tiles: patch llama.cpp/0004, built with AMX-BF16 (build.py
        turns it on only where the CPU has it; a release wheel's CPU library reports it when loaded)."""
        built = "-DGGML_AMX_BF16=ON" in self.cmake_args or "AMX_BF16 = 1" in self.system_info
        return self.amx and self.has_patch("amx-bf16") and built

    @property
    def bf16_native(self) -> bool:
        """Whether bf16 GGUFs multiply in bf16 on this build: on AMX tiles (above), or with AVX512-BF16's
        dot products (llamafile's bf16 GEMM; AMD Zen 4 and later, Intel Cooper Lake)."""
        return self.bf16_on_amx or "AVX512_BF16 = 1" in self.system_info

    @property
    def vnni_without_amx(self) -> bool:
        """Whether this build multiplies int8 with AVX512-VNNI and has no AMX to take the matmuls first: where
        lfm2edge's VNNI kernels (patches llama.cpp/0017, 0018) run."""
        return "AVX512_VNNI = 1" in self.system_info and not self.amx

    @property
    def bf16_on_avx512(self) -> bool:
        """Whether bf16 GGUFs run on patch llama.cpp/0019's AVX512-BF16 panels: a build with AVX512-BF16 whose
        AMX does not take bf16 first (AMD Zen 4; Intel without AMX). Without it they run on tinyBLAS."""
        native = "AVX512_BF16 = 1" in self.system_info
        return native and not self.bf16_on_amx and self.has_patch("bf16-f32-avx512-panels")

    @property
    def f32_on_avx512(self) -> bool:
        """Whether f32 GGUFs run on patch llama.cpp/0019's AVX-512 panels (AMX takes f32 only for a load that
        asks, ``split_f32`` or ``ozaki_f32``). Without it they run on tinyBLAS."""
        return "AVX512 = 1" in self.system_info and self.has_patch("bf16-f32-avx512-panels")

    @property
    def q8_0_on_vnni(self) -> bool:
        """Whether q8_0 GGUFs run on patch llama.cpp/0017's AVX512-VNNI kernel."""
        return self.vnni_without_amx and self.has_patch("q8_0-on-avx512-vnni")

    def fastest_type(self) -> str:
        """The GGUF type to convert to for speed on this build: q8_0 where it runs on the VNNI kernel (on Zen 4
        a query in 36.5 ms against bf16's 53.3 on patch 0019, in one bench run), else bf16 where the CPU
        multiplies bf16 natively, else q8_0. Without that kernel or AMX, q8_0 rescales every 32 values in
        256-bit registers: on Zen 4 its query took 108.7 ms against bf16's 73.6, and its documents 1.30
        docs/s against 2.02 (bench/PROFILE.md)."""
        if self.q8_0_on_vnni:
            return "q8_0"
        return "bf16" if self.bf16_native else "q8_0"

    def describe(self) -> str:
        commit = self.llama_cpp_commit[:7] or "unknown commit"
        patches = ", ".join(self.patches) if self.patches else "none (stock build)"
        return f"llama-cpp-python {self.binding_version} (llama.cpp {commit}); lfm2edge patches: {patches}"


def _version_tuple(version: str) -> tuple[int, ...]:
    parts = []
    for piece in version.split("+")[0].split("."):
        digits = "".join(ch for ch in piece if ch.isdigit())
        parts.append(int(digits or 0))
    return tuple(parts)


@functools.cache
def build_info() -> BuildInfo:
    try:
        import llama_cpp
    except ImportError as e:
        raise UnsupportedBuildError(
            "llama-cpp-python is not installed. Run `make setup` (it builds the pinned, patched "
            f"llama-cpp-python {PINNED_BINDING}) or `pip install llama-cpp-python=={PINNED_BINDING}`."
        ) from e
    recorded = {}
    info_path = Path(llama_cpp.__file__).parent / BUILD_INFO_FILE
    if info_path.exists():
        recorded = json.loads(info_path.read_text())
    system_info = llama_cpp.llama_print_system_info().decode("utf-8", errors="replace")
    return BuildInfo(
        binding_version=llama_cpp.__version__,
        llama_cpp_commit=recorded.get("llama_cpp_commit", ""),
        patches=tuple(recorded.get("patches", ())),
        cmake_args=tuple(recorded.get("cmake_args", ())),
        system_info=system_info,
    )


def check_build() -> BuildInfo:
    """The build info, or UnsupportedBuildError for a llama.cpp without bidirectional LFM2."""
    info = build_info()
    if _version_tuple(info.binding_version) < FIRST_SUPPORTED_BINDING:
        raise UnsupportedBuildError(
            f"llama-cpp-python {info.binding_version} vendors a llama.cpp older than build b9777, which runs "
            "LFM2's short conv causally on bidirectional models: the vectors would be wrong. Install "
            f"llama-cpp-python >= 0.3.32 (lfm2edge pins {PINNED_BINDING}: run `make setup`)."
        )
    return info
