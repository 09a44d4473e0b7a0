"""The demo's search loop on a tiny model (the full demo runs a 350M model: `make demo`)."""

from __future__ import annotations

import os
import subprocess
import sys

from lfm2edge.runtime.frontends import demo


def test_faq_corpus_covers_the_11_languages():
    entries = demo.faq_entries()
    assert len(entries) >= 100
    assert {e["lang"] for e in entries} == {"ar", "de", "en", "es", "fr", "it", "ja", "ko", "no", "pt", "sv"}
    assert len({e["id"] for e in entries}) == len(entries)


def test_demo_runs_on_a_gguf(colbert_gguf, capsys):
    assert demo.main(["--model", str(colbert_gguf), "--threads", "2"]) == 0
    out = capsys.readouterr().out
    assert "indexed" in out and "query latency over 8 queries" in out
    assert "RANDOM" not in out  # a given GGUF is used as is


def test_demo_reports_a_bad_model(tmp_path, capsys):
    assert demo.main(["--model", str(tmp_path / "missing.gguf")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_demo_falls_back_to_a_random_model_when_the_hub_is_unreachable(tmp_path):
    """Offline, with nothing cached: the demo says so and runs a random checkpoint of the real layout
    (tiny here, to be quick; `make demo` uses the full 350M shape)."""
    env = os.environ | {
        "HF_HUB_OFFLINE": "1",  # what an unreachable hub looks like to huggingface_hub, without a network
        "HF_HOME": str(tmp_path / "hf"),
        "LFM2EDGE_CACHE": str(tmp_path / "cache"),
    }
    args = ["--model", "LiquidAI/LFM2.5-ColBERT-350M", "--stand-in", "tiny", "--outtype", "f32", "-t", "1"]
    proc = subprocess.run(
        [sys.executable, "-m", "lfm2edge.runtime.frontends.demo", *args],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = proc.stdout
    assert "cannot reach the Hugging Face hub" in out and "tiny RANDOM checkpoint" in out
    assert "query latency over 8 queries" in out and "Reminder: random weights" in out
    assert (tmp_path / "cache" / "demo" / "random-colbert-tiny" / "config.json").is_file()
    assert (tmp_path / "cache" / "demo" / "random-colbert-tiny-f32.gguf").is_file()


def test_demo_falls_back_only_when_the_hub_is_unreachable(tmp_path, capsys):
    assert demo.main(["--model", "./no-such-folder", "--stand-in", "tiny"]) == 2
    captured = capsys.readouterr()
    assert "neither an existing folder nor a hub id" in captured.err and "RANDOM" not in captured.out


def test_importing_the_demo_loads_neither_the_converter_nor_torch():
    heavy = ("torch", "lfm2edge.convert.pipeline", "lfm2edge.convert.synthetic")
    code = f"import sys, lfm2edge.runtime.frontends.demo; print([m for m in {heavy} if m in sys.modules])"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and proc.stdout.strip() == "[]", proc.stderr[-2000:]
