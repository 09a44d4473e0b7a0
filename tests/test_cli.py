"""The ``lfm2edge`` command: its entry points, and the exit codes of convert, verify, inspect and info.

The entry points run as a user runs them (``python -m lfm2edge``, the ``lfm2edge`` script); the exit codes
run ``lfm2edge.cli.main()`` in this process, as the script does, so the models and torch load once.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

import lfm2edge
from lfm2edge.convert.synthetic import make_checkpoint
from lfm2edge.runtime.core.model_file import describe

COMMANDS = ("convert", "verify", "inspect", "info", "encode", "index", "search", "rerank", "serve", "bench")


def cli(capsys: pytest.CaptureFixture, *args: object) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of ``lfm2edge ARGS``."""
    from lfm2edge.cli import main

    argv, sys.argv = sys.argv, ["lfm2edge", *map(str, args)]
    try:
        main()
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else int(e.code is not None)
    finally:
        sys.argv = argv
    out, err = capsys.readouterr()
    assert "Traceback" not in err
    return code, out, err


# --- the entry points ------------------------------------------------------------------------------------


def test_python_m_lfm2edge_prints_the_version():
    command = [sys.executable, "-m", "lfm2edge", "--version"]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == f"lfm2edge {lfm2edge.__version__}"


def test_the_lfm2edge_script_lists_every_command():
    script = Path(sys.executable).with_name("lfm2edge")
    if not script.is_file():
        pytest.skip(f"no lfm2edge script beside {sys.executable} (the package is not installed in this venv)")
    proc = subprocess.run([str(script), "--help"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    for command in COMMANDS:  # one row per command, in rich's box or click's plain list
        assert re.search(rf"^[│|\s]*{command}\s", proc.stdout, re.MULTILINE), (command, proc.stdout)


# --- exit codes ------------------------------------------------------------------------------------------


def test_info_exits_0(capsys):
    code, out, _ = cli(capsys, "info", "--json")
    assert code == 0
    info = json.loads(out)
    assert info["binding_version"] == lfm2edge.build_info().binding_version
    assert info["patched"] == bool(info["patches"])


def test_inspect_exits_0_on_a_retriever_and_3_on_a_damaged_file(capsys, colbert_gguf, tmp_path):
    code, out, _ = cli(capsys, "inspect", colbert_gguf, "--json")
    assert code == 0 and json.loads(out)["kind"] == "late_interaction" and json.loads(out)["problems"] == []
    damaged = tmp_path / "damaged.gguf"
    damaged.write_bytes(colbert_gguf.read_bytes()[:200])
    code, _, err = cli(capsys, "inspect", damaged)
    assert code == 3 and err.startswith("error: ")


def test_convert_exits_0_then_7_without_force_and_2_on_a_bad_type(capsys, colbert_checkpoint, tmp_path):
    out = tmp_path / "colbert-f16.gguf"
    code, stdout, _ = cli(capsys, "convert", colbert_checkpoint, "-o", out, "--outtype", "f16")
    assert code == 0 and out.is_file() and f"wrote {out}" in stdout
    code, _, err = cli(capsys, "convert", colbert_checkpoint, "-o", out, "--outtype", "f16")
    assert code == 7 and "already exists" in err and "--force" in err
    code, _, _ = cli(capsys, "convert", colbert_checkpoint, "-o", out, "--outtype", "f16", "--force")
    assert code == 0
    code, _, err = cli(capsys, "convert", colbert_checkpoint, "-o", tmp_path / "x.gguf", "--outtype", "q9_9")
    assert code == 2 and "unknown --outtype 'q9_9'" in err
    assert not (tmp_path / "x.gguf").exists()


def test_convert_keeps_the_named_parts_in_bf16_and_names_an_unknown_one(capsys, colbert_checkpoint, tmp_path):
    out = tmp_path / "colbert-mixed.gguf"
    code, _, _ = cli(capsys, "convert", colbert_checkpoint, "-o", out, "--outtype", "q8_0_mixed",
                     "--bf16-parts", "token_embd, blk.0")
    types = {t.name: t.type_name for t in describe(out).header.tensors}
    assert code == 0 and types["token_embd.weight"] == types["blk.0.ffn_up.weight"] == "BF16"
    assert types["blk.1.ffn_up.weight"] == "Q8_0"
    code, _, err = cli(capsys, "convert", colbert_checkpoint, "-o", tmp_path / "x.gguf", "--outtype", "q8_0_mixed",
                       "--bf16-parts", "blk.0,ffn")
    assert code == 2 and "unknown part(s) to keep in bf16: 'ffn'" in err and not (tmp_path / "x.gguf").exists()


def test_verify_exits_0_then_1_against_another_checkpoint(capsys, colbert_gguf, colbert_checkpoint, tmp_path):
    code, out, _ = cli(capsys, "verify", colbert_gguf, "--reference", colbert_checkpoint, "--threads", "2")
    assert code == 0 and "PASS" in out
    other = make_checkpoint(tmp_path / "other", "colbert", seed=1)
    code, out, err = cli(capsys, "verify", colbert_gguf, "--reference", other, "--threads", "2", "--json")
    assert code == 1 and json.loads(out)["passed"] is False
    assert err.startswith("error: ") and "below the F32 thresholds" in err
