"""bench/profile.py on the tiny ColBERT model: rows, totals, and a hook that leaves the outputs alone."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from .patch_support import require_patch


@pytest.fixture(scope="module")
def profiled(colbert_gguf: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, str]:
    from lfm2edge.bench.profile import main

    out = tmp_path_factory.mktemp("profile") / "profile.json"
    assert main([str(colbert_gguf), "--tokens", "32,40", "--repeat", "2", "--threads", "1", "--json", str(out)]) == 0
    return json.loads(out.read_text()), str(colbert_gguf)


def test_cases_are_a_query_and_a_document(profiled):
    result, path = profiled
    assert result["schema"] == "lfm2edge.profile/1" and result["model"] == path
    assert result["model_kind"] == "late_interaction" and result["threads"] == 1
    assert [(c["kind"], c["tokens"]) for c in result["cases"]] == [("query", 32), ("document", 40)]


def test_rows_sum_to_the_node_by_node_total(profiled):
    result, _ = profiled
    for case in result["cases"]:
        total = case["node_total_ms"]
        assert total > 0 and case["nodes"] > 0
        for table in ("by_op", "by_component", "by_layer"):
            rows = case[table]
            assert rows
            assert sum(r["ms"] for r in rows) == pytest.approx(total, rel=1e-9)
            assert sum(r["count"] for r in rows) == case["nodes"]
            assert sum(r["share"] for r in rows) == pytest.approx(1.0, rel=1e-9)
        ops = {r["key"]: r for r in case["by_op"]}
        matmuls = [k for k in ops if k.startswith("MUL_MAT")]
        # the weights of every LFM2 block kind, the ColBERT head and attention's two activation matmuls
        # (with flash attention, the exact mode of patch llama.cpp/0005, one FLASH_ATTN_EXT node instead)
        flash = "FLASH_ATTN_EXT" in ops
        for weight in ("ffn_gate", "ffn_up", "ffn_down", "shortconv.in_proj", "shortconv.out_proj", "attn_q",
                       "attn_k", "attn_v", "attn_output", "dense_2", *(() if flash else ("kq", "kqv"))):
            assert f"MUL_MAT {weight}" in matmuls, weight
        for key in matmuls:
            assert ops[key]["flops"] > 0 and ops[key]["gflops_per_s"] > 0
        assert {"RMS_NORM", "FLASH_ATTN_EXT" if flash else "SOFT_MAX", "GET_ROWS"} <= ops.keys()
        assert case["matmul_gflop"] == pytest.approx(sum(ops[k]["flops"] for k in matmuls) / 1e9)
        layers = [r["key"] for r in case["by_layer"]]
        assert layers[0] == "input" and layers[-1] == "output"
        assert {r["detail"] for r in case["by_layer"]} >= {"short conv", "attention"}
        assert case["normal_ms"] >= case["normal_decode_ms"] > 0 and case["node_decode_ms"] > 0


def test_short_conv_runs_as_one_op_per_layer(profiled):
    """Patch llama.cpp/0007: on the CPU each short-conv layer's elementwise chain is one op (the vectors are
    checked against the reference by the runtime's parity tests)."""
    require_patch("lfm2-short-conv-one-pass")
    result, _ = profiled
    for case in result["cases"]:
        conv_layers = sum(r["detail"] == "short conv" for r in case["by_layer"])
        ops = {r["key"]: r for r in case["by_op"]}
        components = {r["key"]: r for r in case["by_component"]}
        assert ops["CUSTOM"]["count"] == components["short conv (elementwise)"]["count"] == conv_layers > 0
        assert "PAD" not in ops  # the chain pads; the one pass reads the neighbours in place


def test_the_eval_callback_leaves_the_embeddings_unchanged(profiled):
    result, _ = profiled
    for case in result["cases"]:
        # Same graph, same kernels: node-by-node only unfuses RMS_NORM + MUL, which rounds the same.
        assert case["max_abs_diff"] == 0.0


def test_report_names_the_tables(profiled):
    from lfm2edge.bench.profile import format_report

    text = format_report(profiled[0])
    assert "by op" in text and "by layer" in text and "MUL_MAT ffn_gate" in text


def test_ab_extra_buffers_and_loop(colbert_gguf: Path, tmp_path: Path, capsys):
    from lfm2edge.bench.profile import main

    out = tmp_path / "ab.json"
    assert main([str(colbert_gguf), "--ab-extra-buffers", "--tokens", "32", "--repeat", "2", "--threads", "1",
                 "--json", str(out)]) == 0
    (row,) = json.loads(out.read_text())["ab_extra_buffers"]
    assert row["kind"] == "query" and row["runs"] == 2
    assert row["on_p50_ms"] > 0 and row["off_p50_ms"] > 0 and row["speedup"] > 0
    assert main([str(colbert_gguf), "--loop", "2", "--tokens", "40", "--threads", "1"]) == 0
    assert "ms per encode" in capsys.readouterr().out
