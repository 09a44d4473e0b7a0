"""Run upstream llama.cpp's own converter (``convert_hf_to_gguf.py``) on a checkpoint folder.

Tests use it as the reference for lfm2edge's converter: the same checkpoint through both, then
compare metadata and tensors key by key. The converter ships only in the pinned llama-cpp-python
sdist (``vendor/llama.cpp``), which ``patches/build.py`` downloads and checks; its functions are
reused here by importing the script from its path.

``upstream_converter_dir()`` extracts just the converter (``convert_hf_to_gguf.py``,
``conversion/``, ``gguf-py/``, the licence) into ``<cache>/upstream-converter/<sdist sha>/``,
once, atomically (a temp folder renamed into place, so a killed run never leaves a half tree).

``convert_with_upstream()`` runs it in a subprocess with this interpreter, through a small wrapper
(``_WRAPPER`` below) that leaves upstream's files untouched and:

* puts the converter folder first on ``sys.path`` and drops ``NO_LOCAL_GGUF`` from the
  environment, so the converter inserts and imports its **vendored** ``gguf-py`` (which differs
  from PyPI's ``gguf`` of the same version); the wrapper asserts that it did;
* replaces ``TextModel.get_vocab_base_pre`` (the probe-text hash -> pre-tokenizer lookup) with one
  returning ``"lfm2"``: a self-made test tokenizer never hashes to a known value, and upstream
  raises ``NotImplementedError`` on an unknown hash. Nothing else is overridden: upstream's
  converter at 0c1e570 runs unchanged on transformers 5.x / torch 2.13, although its requirements
  pin transformers 4.57.6 and torch 2.11.0.

Upstream's ``LFM2ColBertModel`` prepends ``model.`` to every tensor name but ``dense_2``: it
converts only the real layout (names without ``model.``); a checkpoint whose names already carry
``model.`` fails with ``ValueError: Can not map tensor 'model.model.embed_tokens.weight'``.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from functools import cache
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BUILD_SCRIPT = REPO / "patches" / "build.py"

OUTTYPES = ("f32", "f16", "bf16", "q8_0")
# Inside vendor/llama.cpp: the converter script and everything it imports, nothing else.
CONVERTER_PATHS = ("convert_hf_to_gguf.py", "conversion", "gguf-py", "LICENSE")
# Above this age an unfinished extraction folder belongs to a run that died.
STALE_TMP_S = 3600

_WRAPPER = r"""
import os, sys
conv_dir, script, args = sys.argv[1], sys.argv[2], sys.argv[3:]
os.environ.pop("NO_LOCAL_GGUF", None)
if sys.path and sys.path[0] == "":
    sys.path.pop(0)  # -c puts the working folder first
sys.path.insert(0, conv_dir)
import conversion.base as base  # inserts conv_dir/gguf-py at sys.path[1], then imports gguf
import gguf
local = os.path.realpath(os.path.join(conv_dir, "gguf-py", "gguf"))
if os.path.dirname(os.path.realpath(gguf.__file__)) != local:
    sys.exit(f"upstream converter imported gguf from {gguf.__file__}, not its vendored {local}")

def get_vocab_base_pre(self, tokenizer):
    # The probe-text hash of a test tokenizer matches nothing upstream knows: force LFM2's.
    return "lfm2"

base.TextModel.get_vocab_base_pre = get_vocab_base_pre
sys.argv = [script, *args]
import runpy
runpy.run_path(script, run_name="__main__")
"""


class UpstreamConverterError(RuntimeError):
    """Upstream's converter failed; the message holds its output."""


@cache
def _build_module():
    spec = importlib.util.spec_from_file_location("lfm2edge_patches_build", BUILD_SCRIPT)
    assert spec is not None and spec.loader is not None, BUILD_SCRIPT
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _clean_stale(parent: Path) -> None:
    now = time.time()
    for tmp in parent.glob(".tmp-*"):
        try:
            if now - tmp.stat().st_mtime > STALE_TMP_S:
                shutil.rmtree(tmp, ignore_errors=True)
        except OSError:
            pass


def upstream_converter_dir() -> Path:
    """The folder holding upstream's ``convert_hf_to_gguf.py``, extracted from the sdist once."""
    build = _build_module()
    parent = build.cache_dir() / "upstream-converter"
    target = parent / build.SDIST_SHA256[:16]
    if (target / "convert_hf_to_gguf.py").is_file():
        return target
    sdist = build.fetch_sdist(sys.executable)  # downloads with pip when missing, checks sha256
    parent.mkdir(parents=True, exist_ok=True)
    _clean_stale(parent)
    root = f"llama_cpp_python-{build.VERSION}/vendor/llama.cpp"
    prefixes = tuple(f"{root}/{p}" for p in CONVERTER_PATHS)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=parent))
    try:
        with tarfile.open(sdist) as tar:
            members = [m for m in tar.getmembers()
                       if m.name in prefixes or m.name.startswith(tuple(p + "/" for p in prefixes))]
            tar.extractall(tmp, members=members, filter="data")
        tree = tmp / root
        missing = [p for p in CONVERTER_PATHS if not (tree / p).exists()]
        if missing:
            raise UpstreamConverterError(f"{sdist} lacks {missing} under {root}")
        try:
            os.rename(tree, target)  # atomic: the folder appears complete or not at all
        except OSError:
            if not (target / "convert_hf_to_gguf.py").is_file():  # not a concurrent winner
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def convert_with_upstream(checkpoint: Path, outfile: Path, outtype: str = "f32", *, timeout: float = 600) -> Path:
    """Convert ``checkpoint`` with upstream's converter into ``outfile``; returns ``outfile``."""
    if outtype not in OUTTYPES:
        raise ValueError(f"outtype {outtype!r} not in {OUTTYPES}")
    conv_dir = upstream_converter_dir().resolve()
    outfile = Path(outfile)
    outfile.parent.mkdir(parents=True, exist_ok=True)
    outfile.unlink(missing_ok=True)  # success is an exit status of 0 and a fresh file
    env = {k: v for k, v in os.environ.items() if k != "NO_LOCAL_GGUF"}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    cmd = [sys.executable, "-c", _WRAPPER, str(conv_dir), str(conv_dir / "convert_hf_to_gguf.py"),
           str(Path(checkpoint).resolve()), "--outfile", str(outfile.resolve()), "--outtype", outtype]
    proc = subprocess.run(cmd, env=env, cwd=outfile.parent, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0 or not outfile.is_file():
        raise UpstreamConverterError(
            f"upstream convert_hf_to_gguf.py failed (exit {proc.returncode}) on {checkpoint}:\n"
            f"{proc.stdout[-4000:]}{proc.stderr[-8000:]}"
        )
    return outfile
