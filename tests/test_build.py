"""The patched build: patch series, cache key, platform flags, self-check, packaging."""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
import tarfile
import tomllib
from pathlib import Path

import pytest

import lfm2edge.runtime.core.build as build_module
from lfm2edge.runtime.core.build import BuildInfo, build_info, check_build
from lfm2edge.runtime.core.errors import UnsupportedBuildError

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def builder():
    spec = importlib.util.spec_from_file_location("lfm2edge_build_script", REPO / "patches" / "build.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _patched_paths(patch: Path) -> list[str]:
    return [m.group(1) for m in re.finditer(r"^\+\+\+ b/(\S+)", patch.read_text(), flags=re.M)]


def test_every_patch_has_a_header_and_applies_to_the_pinned_tree(builder, tmp_path):
    """In series order, each onto the tree the patches before it left (as patches/build.py applies them:
    0006 builds on 0004's kernel)."""
    sdist = builder.fetch_sdist(sys.executable)
    series = builder.patch_series(True, release=True)  # the release patches too
    assert series, "the series is empty"
    prefix = f"llama_cpp_python-{builder.VERSION}"
    root = tmp_path / "tree"
    with tarfile.open(sdist) as tar:
        for target, patch in series:
            for path in _patched_paths(patch):
                member = f"{prefix}/{target}/{path}".replace("/./", "/")
                if not (root / member).exists():
                    tar.extract(member, root, filter="data")
    for target, patch in series:
        header = patch.read_text().split("\n--- ", 1)[0]
        assert "What:" in header and "Why:" in header, f"{patch.name} needs a What/Why header"
        proc = subprocess.run(
            ["patch", "-p1", "--forward", "--batch", "-d", str(root / prefix / target), "-i", str(patch)],
            capture_output=True,
            text=True,
        )
        assert proc.returncode == 0, f"{patch.name}: {proc.stdout}{proc.stderr}"


def test_cache_key_follows_flags_and_patch_contents(builder, tmp_path):
    series = builder.patch_series(True)
    key = builder.build_key(["-DA=ON"], series)
    assert key == builder.build_key(["-DA=ON"], series)
    assert key != builder.build_key(["-DA=OFF"], series)
    assert key != builder.build_key(["-DA=ON"], [])
    changed = tmp_path / series[0][1].name
    changed.write_text(series[0][1].read_text() + "\n")
    assert key != builder.build_key(["-DA=ON"], [(series[0][0], changed)] + series[1:])


def test_x86_flags_enable_amx_only_with_the_fix(builder, monkeypatch):
    monkeypatch.delenv("LFM2EDGE_CMAKE_ARGS", raising=False)
    monkeypatch.setattr(builder.platform, "system", lambda: "Linux")
    monkeypatch.setattr(builder.platform, "machine", lambda: "x86_64")
    monkeypatch.setattr(builder, "cpu_flags", lambda: {"avx", "avx2", "fma", "f16c", "avx512f", "amx_tile", "amx_int8"})
    args = builder.platform_cmake_args(patched=False)
    assert "-DGGML_NATIVE=OFF" in args and "-DGGML_AVX512=ON" in args and "-DGGML_AVX512_BF16=OFF" in args
    assert not any("AMX" in a for a in args)  # stock ggml's AMX path crashes (#20824)
    patched = builder.platform_cmake_args(patched=True)
    assert "-DGGML_AMX_INT8=ON" in patched and "-DGGML_AMX_TILE=ON" in patched and "-DGGML_AMX_BF16=OFF" in patched
    monkeypatch.setattr(builder, "cpu_flags", lambda: {"avx", "avx2", "fma", "f16c"})
    assert "-DGGML_AVX512=OFF" in builder.platform_cmake_args()
    monkeypatch.setattr(builder.platform, "system", lambda: "Darwin")
    monkeypatch.setattr(builder.platform, "machine", lambda: "arm64")
    assert "-DGGML_METAL=ON" in builder.platform_cmake_args()
    monkeypatch.setenv("LFM2EDGE_CMAKE_ARGS", "-DGGML_BLAS=ON -DX=1")
    assert builder.platform_cmake_args() == ["-DGGML_BLAS=ON", "-DX=1"]


def test_release_flags_do_not_depend_on_the_building_cpu(builder, monkeypatch):
    monkeypatch.delenv("LFM2EDGE_CMAKE_ARGS", raising=False)
    monkeypatch.setattr(builder.platform, "system", lambda: "Linux")
    monkeypatch.setattr(builder.platform, "machine", lambda: "x86_64")
    monkeypatch.setattr(builder, "cpu_flags", lambda: {"avx", "avx2", "fma", "f16c", "avx512f", "amx_tile", "amx_int8"})
    args = builder.release_cmake_args()
    # every ISA level is built as its own CPU backend module; ggml picks one at load time
    assert {"-DGGML_NATIVE=OFF", "-DGGML_BACKEND_DL=ON", "-DGGML_CPU_ALL_VARIANTS=ON"} <= set(args)
    assert not any(re.search(r"GGML_(AVX|AMX|FMA|F16C|BMI2)", a) for a in args)
    monkeypatch.setattr(builder, "cpu_flags", lambda: set())
    assert builder.release_cmake_args() == args
    monkeypatch.setattr(builder.platform, "machine", lambda: "aarch64")
    assert builder.release_cmake_args() == args
    monkeypatch.setattr(builder.platform, "system", lambda: "Windows")
    monkeypatch.setattr(builder.platform, "machine", lambda: "AMD64")
    assert builder.release_cmake_args() == args + ["-DGGML_OPENMP=OFF"]  # no vcomp140.dll to ship
    monkeypatch.setattr(builder.platform, "system", lambda: "Darwin")
    monkeypatch.setattr(builder.platform, "machine", lambda: "arm64")
    mac = builder.release_cmake_args()
    assert "-DGGML_METAL=ON" in mac and "-DGGML_NATIVE=OFF" in mac and "-DGGML_BACKEND_DL=ON" not in mac
    monkeypatch.setattr(builder.platform, "system", lambda: "Linux")
    monkeypatch.setattr(builder.platform, "machine", lambda: "riscv64")
    with pytest.raises(builder.BuildError, match="LFM2EDGE_CMAKE_ARGS"):
        builder.release_cmake_args()
    monkeypatch.setenv("LFM2EDGE_CMAKE_ARGS", "-DX=1")
    assert builder.release_cmake_args() == ["-DX=1"]


def test_release_series_and_key_leave_the_development_build_alone(builder):
    dev, release = builder.patch_series(True), builder.patch_series(True, release=True)
    assert release[: len(dev)] == dev and [p.parent.name for _, p in release[len(dev):]] == ["release"]
    assert not any(p.parent.name == "release" for _, p in dev)
    args = ["-DA=ON"]
    assert builder.build_key(args, dev) == builder.build_key(args, dev, ())  # the dev key is what it was
    assert builder.build_key(args, dev, builder.RELEASE_WHEEL_EXCLUDE) != builder.build_key(args, dev)


def test_release_source_pins_its_flags_and_keeps_only_the_loaded_libraries(builder, tmp_path):
    pathspec = pytest.importorskip("pathspec")  # what scikit-build-core matches wheel.exclude with (make setup installs it)

    (tmp_path / "pyproject.toml").write_text('[project]\nname = "x"\n\n[tool.scikit-build]\nwheel.py-api = "py3"\n')
    builder.pin_build_settings(tmp_path, ["-DGGML_BACKEND_DL=ON"], builder.RELEASE_WHEEL_EXCLUDE)
    settings = tomllib.loads((tmp_path / "pyproject.toml").read_text())["tool"]["scikit-build"]
    assert settings["cmake"]["args"] == ["-DGGML_BACKEND_DL=ON"] and settings["wheel"]["py-api"] == "py3"
    excluded = pathspec.GitIgnoreSpec.from_lines(settings["wheel"]["exclude"]).match_file
    for kept in ["llama_cpp/lib/libllama.so", "llama_cpp/lib/libggml.so.0", "llama_cpp/lib/libggml-base.so.0",
                 "llama_cpp/lib/libggml-cpu-haswell.so", "llama_cpp/llama_cpp.py", "llama_cpp/lfm2edge_build.json"]:
        assert not excluded(kept), kept
    for dropped in ["lib/libllama.so", "include/llama.h", "bin/libggml-cpu-haswell.so",
                    "llama_cpp/lib/libllama.so.0.5.0", "llama_cpp/lib/libggml-cpu-haswell.so.0"]:
        assert excluded(dropped), dropped
    (tmp_path / "pyproject.toml").write_text("[project]\n")
    with pytest.raises(builder.BuildError, match="tool.scikit-build"):
        builder.pin_build_settings(tmp_path, [], builder.RELEASE_WHEEL_EXCLUDE)


def test_build_errors_say_what_to_do(builder, monkeypatch, tmp_path):
    monkeypatch.setattr(builder.shutil, "which", lambda tool: None if tool == "cmake" else "/usr/bin/" + tool)
    with pytest.raises(builder.BuildError, match="apt-get install cmake"):
        builder.build_wheel(sys.executable, "k", [], [])
    bad = tmp_path / "0001-bad.patch"
    bad.write_text("What: x\nWhy: y\n--- a/nothing.txt\n+++ b/nothing.txt\n@@ -1 +1 @@\n-a\n+b\n")
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "nothing.txt").write_text("something else\n")
    with pytest.raises(builder.BuildError, match="(?s)does not apply.*LFM2EDGE_PATCHES=0"):
        builder.apply_patches(tmp_path / "src", [(".", bad)])


def test_installed_build_is_the_one_the_script_made(builder):
    info = build_info()
    assert info.binding_version == builder.VERSION
    if info.patched:  # a wheel from patches/build.py records its key and patches
        assert info.llama_cpp_commit == builder.VENDORED_COMMIT
    if info.amx:  # AMX is compiled in only together with the fix for llama.cpp #20824
        assert info.has_patch("amx-tile-config")
    assert "CPU" in info.system_info


def test_old_llama_cpp_is_refused(monkeypatch):
    old = BuildInfo("0.3.31", "", (), (), "CPU : AVX2 = 1 |")
    monkeypatch.setattr(build_module, "build_info", lambda: old)
    with pytest.raises(UnsupportedBuildError, match="older than build b9777.*conv causally"):
        check_build()
    ok = BuildInfo("0.3.32", "", (), (), "")
    monkeypatch.setattr(build_module, "build_info", lambda: ok)
    assert check_build() is ok
    assert "stock build" in ok.describe()


def test_runtime_core_depends_on_numpy_llama_cpp_and_filelock_only():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    names = {re.split(r"[<>=\[ ]", d)[0].lower() for d in project["dependencies"]}
    assert names == {"numpy", "llama-cpp-python", "filelock"}  # filelock: pure Python, the index's lock
    assert "llama-cpp-python==0.3.36" in project["dependencies"]
    assert any(d.startswith("torch") for d in project["optional-dependencies"]["reference"])


def test_runtime_runs_without_torch_or_transformers(colbert_gguf):
    # A meta-path hook makes torch and transformers unimportable in a fresh interpreter.
    code = f"""
import sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in ('torch', 'transformers', 'tokenizers', 'gguf', 'safetensors'):
            raise ImportError('blocked: ' + name)
sys.meta_path.insert(0, Block())
import lfm2edge
enc = lfm2edge.load({str(colbert_gguf)!r}, n_threads=1)
print(enc.encode_query('works without torch').shape)
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "(32, 16)" in proc.stdout


def test_package_maps_one_import_package():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    packages = project["tool"]["setuptools"]["packages"]
    assert all(p == "lfm2edge" or p.startswith("lfm2edge.") for p in packages)
    assert project["project"]["scripts"]["lfm2edge"] == "lfm2edge.cli:main"


def test_fastest_type_is_bf16_only_where_the_cpu_multiplies_bf16_and_q8_0_has_no_vnni_kernel():
    from lfm2edge.runtime.core.build import BuildInfo

    amx_info = "CPU : AVX512 = 1 | AMX_INT8 = 1 |"
    patched = ("llama.cpp/0003-amx-tile-config-barrier.patch", "llama.cpp/0004-amx-bf16-matmul.patch")
    flags = ("-DGGML_AMX_INT8=ON", "-DGGML_AMX_BF16=ON")
    assert BuildInfo("0.3.36", "c", patched, flags, amx_info).fastest_type() == "bf16"
    assert BuildInfo("0.3.36", "c", patched[:1], flags, amx_info).fastest_type() == "q8_0"  # no bf16 kernel
    assert BuildInfo("0.3.36", "c", patched, flags[:1], amx_info).fastest_type() == "q8_0"  # built without AMX-BF16
    assert BuildInfo("0.3.36", "c", patched, flags, "CPU : AVX512 = 1 |").fastest_type() == "q8_0"  # no AMX
    # without AMX, AVX512-BF16's dot products (llamafile's bf16 GEMM) beat q8_0's 256-bit rescaling
    zen4 = "CPU : AVX512 = 1 | AVX512_VNNI = 1 | AVX512_BF16 = 1 | LLAMAFILE = 1 |"
    assert BuildInfo("0.3.36", "c", patched, (), zen4).fastest_type() == "bf16"
    assert BuildInfo("0.3.36", "c", (), (), zen4).fastest_type() == "bf16"  # stock builds have that GEMM too
    assert BuildInfo("0.3.36", "c", patched, (), "CPU : AVX2 = 1 | AVX512 = 1 | AVX512_VNNI = 1 |").fastest_type() == "q8_0"
    # patch 0017's VPDPBUSD kernel puts q8_0 ahead of bf16 where AMX does not take it
    vnni = (*patched, "llama.cpp/0017-q8_0-on-avx512-vnni.patch")
    assert BuildInfo("0.3.36", "c", vnni, (), zen4).fastest_type() == "q8_0"
    assert BuildInfo("0.3.36", "c", vnni, flags, amx_info + " AVX512_VNNI = 1 |").fastest_type() == "bf16"
    assert BuildInfo("0.3.36", "c", vnni, (), "CPU : AVX512 = 1 | AVX512_BF16 = 1 |").fastest_type() == "bf16"
