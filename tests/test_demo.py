"""The demo's search loop on a tiny model (the full demo runs a 350M model: `make demo`)."""

from __future__ import annotations

from lfm2edge.runtime import demo


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
