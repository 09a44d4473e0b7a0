"""lfm2edge bench: one --quick run on tiny random models (JSON + PNG), checked for shape, never for speed."""

from __future__ import annotations

import dataclasses
import json
import re
import sys
from pathlib import Path

import numpy as np
import pytest

from lfm2edge.bench.fidelity import compare, spearman
from lfm2edge.bench.inputs import fit_text, make_documents, make_queries
from lfm2edge.bench.stats import RunPolicy, Summary, measure

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

TOP_KEYS = {"schema", "created", "command", "wall_s", "settings", "machine", "models", "notes"}
MACHINE_KEYS = {"cpu_model", "isa_flags", "logical_cores", "available_cores", "threads", "llama_cpp"}
LLAMA_KEYS = {"binding_version", "commit", "patches", "patched", "system_info"}
MODEL_KEYS = {"name", "kind", "source", "random_weights", "reference", "inputs_identical", "sides", "errors"}
SIDE_KEYS = {"model", "kind", "engine", "format", "label", "path", "file_size_bytes", "threads", "load_s",
             "first_call_ms", "memory", "figures", "texts_digest", "query_tokens", "document_tokens",
             "query_expansion", "exact", "extra_buffers", "fidelity"}
FIGURE_KEYS = {"regime", "label", "summary", "samples_ms", "docs", "k", "batch_size", "items_per_run",
               "tokens_per_run", "items_per_s", "tokens_per_s", "best", "vs_torch"}
SUMMARY_KEYS = {"n", "p50_ms", "p95_ms", "p99_ms", "mean_ms", "min_ms", "max_ms", "std_ms"}
FIDELITY_KEYS = {"reference", "vectors", "cosine_min", "cosine_mean", "queries", "documents",
                 "rank_spearman_mean", "rank_top1_agreement", "rank_identical_order", "score_max_abs_diff"}
MEMORY_KEYS = {"rss_before_load", "rss_after_load", "peak_encode", "peak_total"}


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, Path, str]:
    typer = pytest.importorskip("typer")
    pytest.importorskip("matplotlib")
    from typer.testing import CliRunner

    from lfm2edge.bench.cli import register

    app = typer.Typer()
    register(app)

    @app.callback()
    def _root() -> None:  # keeps "bench" a subcommand, as in the lfm2edge app
        pass

    out = tmp_path_factory.mktemp("bench")
    json_path, png_path = out / "bench.json", out / "bench.png"
    result = CliRunner().invoke(app, [
        "bench", "--quick", "--threads", "2", "--cache-dir", str(out / "cache"),
        "--json", str(json_path), "--plot", str(png_path),
        # a second interpreter's llama.cpp sides (here the same one): the stock-build comparison's plumbing
        "--stock-python", sys.executable,
        # every GGUF again with llama.cpp's CPU extra buffers off, whether or not this machine has AMX
        "--amx-off-side",
        # the other CPU backends, exported from the reference
        "--peers", "onnxruntime,openvino",
    ])
    assert result.exit_code == 0, result.output + repr(result.exception)
    return json.loads(json_path.read_text()), png_path, result.output


def _figures(data: dict):
    for model in data["models"]:
        for side in model["sides"]:
            for fig in side["figures"]:
                yield model, side, fig


def test_json_schema(quick_run):
    data, _, _ = quick_run
    assert TOP_KEYS <= data.keys()
    assert data["schema"] == "lfm2edge.bench/1"
    assert MACHINE_KEYS <= data["machine"].keys()
    assert LLAMA_KEYS <= data["machine"]["llama_cpp"].keys()
    assert isinstance(data["machine"]["llama_cpp"]["patches"], list)
    assert data["machine"]["threads"] == 2
    assert {m["name"] for m in data["models"]} == {"ColBERT", "Embedding"}
    for model in data["models"]:
        assert MODEL_KEYS <= model.keys()
        assert model["random_weights"] is True
        assert model["inputs_identical"] is True
        assert not model["errors"]
        labels = {s["label"] for s in model["sides"]}
        assert {"torch fp32", "torch bf16"} <= labels
        assert any(s["engine"] == "llama.cpp" for s in model["sides"])
        for side in model["sides"]:
            assert SIDE_KEYS <= side.keys()
            assert MEMORY_KEYS <= side["memory"].keys()
            assert side["memory"]["peak_encode"] >= side["memory"]["rss_after_load"] > 0
            assert side["file_size_bytes"] > 0 and side["load_s"] > 0
            assert side["query_tokens"] == 32 and side["document_tokens"] == 256
            regimes = {f["regime"] for f in side["figures"]}
            expected = {"query", "document_batch", "query_interactive", "query_busy", "document_busy"}
            if model["kind"] == "late_interaction":
                expected |= {"maxsim", "query_maxsim_cached", "rerank_uncached"}
            assert regimes == expected
            assert sum(f["best"] for f in side["figures"] if f["regime"] == "document_batch") == 1
            fid = side["fidelity"]  # against PyTorch in float64, torch fp32 included
            assert FIDELITY_KEYS <= fid.keys() and fid["reference"] == "torch fp64"
            if side["label"] == "torch fp32":
                assert fid["cosine_min"] > 0.9999999
            else:
                assert -1.0 <= fid["cosine_min"] <= fid["cosine_mean"] <= 1.0 + 1e-9
                assert 0.0 <= fid["rank_top1_agreement"] <= 1.0


PEER_SIDES = {"onnxruntime fp32", "onnxruntime int8", "openvino default", "openvino f32", "openvino int8"}


class RecordingReporter:
    """A runner.Reporter that keeps what it is told."""

    def __init__(self) -> None:
        self.steps: list[str] = []

    def status(self, text: str) -> None:
        pass

    def begin(self, total: int) -> None:
        pass

    def step(self, text: str) -> None:
        self.steps.append(text)

    def advance(self, n: int = 1) -> None:
        pass


def test_passes_alternate_the_side_order_and_join_samples(colbert_gguf, tmp_path):
    from lfm2edge.bench import runner
    from lfm2edge.bench.cli import make_plan

    plan = make_plan(True, None, 1, None, None, None, 0)
    config = runner.BenchConfig(model=str(colbert_gguf), formats=None, reference=None, threads=2, plan=plan,
                                vs_torch=False, quick=True, cache_dir=tmp_path, amx_off_side=True, passes=2,
                                split_f32_side=False, ozaki_side=False)
    reporter = RecordingReporter()
    result = runner.run_bench(config, reporter)
    (model,) = result.models
    assert not model.errors and len(model.sides) == 2
    first = [s.split(":")[0] for s in reporter.steps]
    order = list(dict.fromkeys(first))  # each side's steps in the order the sides ran
    runs = [first[0]] + [b for a, b in zip(first, first[1:], strict=False) if a != b]
    assert runs == [order[0], order[1], order[0]]  # A B, then B A: the second side's two passes adjoin
    assert first.count(order[0]) == first.count(order[1])
    floor = min(p.floor_runs for p in (plan.policy, plan.throughput_policy, plan.maxsim_policy,
                                        plan.interactive_policy, plan.busy_document_policy))
    for side in model.sides:
        for fig in side.figures:
            assert fig.summary.n == len(fig.samples_ms) >= 2 * floor  # both passes' samples
    assert any("alternating order" in n for n in result.notes)


def test_merge_passes_recomputes_summaries_and_the_best_batch():
    from lfm2edge.bench.results import DOCUMENT_BATCH, QUERY, Figure, Memory, SideResult, merge_passes

    def side(query_ms, batch1_ms, batch4_ms, share):
        def fig(regime, ms, batch=None, items=1):
            ms = np.array(ms, dtype=np.float64)
            return Figure(regime, Summary.of(ms / 1e3), ms, batch_size=batch, items_per_run=items)
        figures = (fig(QUERY, query_ms), fig(DOCUMENT_BATCH, batch1_ms, 1), fig(DOCUMENT_BATCH, batch4_ms, 4, 4))
        return SideResult("ColBERT", "late_interaction", "llama.cpp", "bf16", "m.gguf", 1, 2, 0.5, 10.0,
                          Memory(1, 2, 3, 4), figures, "digest", 32, 256, None, True, cpu_s=1.0, wall_s=2.0,
                          other_cpu_share=share)

    fast = side([10.0, 12.0], [100.0, 100.0], [800.0, 800.0], 0.01)  # batch 1: 10 docs/s, batch 4: 5
    slow = side([30.0, 40.0], [1000.0, 1000.0], [440.0, 440.0], None)  # the machine slowed down
    merged = merge_passes([fast, slow])
    query, batch1, batch4 = merged.figures
    assert list(query.samples_ms) == [10.0, 12.0, 30.0, 40.0] and query.summary.n == 4
    assert query.summary.p50_ms == pytest.approx(21.0)
    assert batch1.items_per_s == pytest.approx(1 / 0.55) and batch4.items_per_s == pytest.approx(4 / 0.62)
    assert (batch1.best, batch4.best) == (False, True)  # recomputed over both passes' samples
    assert (merged.cpu_s, merged.wall_s, merged.other_cpu_share) == (2.0, 4.0, 0.01)


def test_peers_run_the_reference_on_the_same_ids(quick_run):
    """ONNX Runtime and OpenVINO run graphs exported from the reference: at fp32 they agree with it."""
    data, _, output = quick_run
    for model in data["models"]:
        sides = {s["label"]: s for s in model["sides"]}
        assert PEER_SIDES <= sides.keys(), model["name"]
        for label in ("onnxruntime fp32", "openvino f32"):
            assert sides[label]["fidelity"]["cosine_min"] > 0.9999, (model["name"], label)
            assert sides[label]["query_tokens"] == 32
        # the same expansion mode as the llama.cpp sides (PyLate's masked pads where the build has the patch)
        llama = next(s for s in model["sides"] if s["engine"] == "llama.cpp")
        assert sides["onnxruntime fp32"]["query_expansion"] == llama["query_expansion"]
    assert "busy/quiet" in output


def test_busy_regimes_measure_after_a_gap(quick_run):
    """Every side has the quiet and busy interactive figures the busy/quiet ratio is made of."""
    data, _, _ = quick_run
    for model in data["models"]:
        for side in model["sides"]:
            figs = {f["regime"]: f for f in side["figures"]}
            assert figs["query_interactive"]["summary"]["n"] >= 3
            assert figs["query_busy"]["summary"]["n"] >= 3
            assert figs["document_busy"]["batch_size"] == 1
    assert data["settings"]["busy"] is True and data["settings"]["gap_s"] > 0


def test_percentiles_are_ordered(quick_run):
    data, _, _ = quick_run
    for _, _, fig in _figures(data):
        assert FIGURE_KEYS <= fig.keys()
        s = fig["summary"]
        assert SUMMARY_KEYS <= s.keys()
        assert s["n"] == len(fig["samples_ms"]) >= 2
        assert 0 < s["min_ms"] <= s["p50_ms"] <= s["p95_ms"] <= s["p99_ms"] <= s["max_ms"]
        assert s["min_ms"] <= s["mean_ms"] <= s["max_ms"]


def test_every_row_has_positive_ratios_to_pytorch(quick_run):
    data, _, _ = quick_run
    for _, side, fig in _figures(data):
        assert set(fig["vs_torch"]) == {"fp32", "bf16"}
        for dtype, ratio in fig["vs_torch"].items():
            assert ratio is not None and ratio > 0, (side["label"], fig["label"], dtype)
        if side["label"] == "torch fp32":
            assert fig["vs_torch"]["fp32"] == pytest.approx(1.0)
        if fig["regime"] == "document_batch":
            assert fig["items_per_s"] > 0 and fig["tokens_per_s"] > 0


def test_stock_python_sides_run_beside_ours(quick_run):
    """Every side of ours runs through the stock build too, but those of the patches' load options."""
    data, _, _ = quick_run
    for model in data["models"]:
        ours = [s["format"] for s in model["sides"]
                if s["engine"] == "llama.cpp" and not _extra_buffers_off(s) and not _kernel_side(s)]
        assert ours and all(f"{f} stock" in ours for f in ours if not f.endswith(" stock"))


def _extra_buffers_off(side: dict) -> bool:
    """A side that --amx-off-side added (its label says so, whatever the build would choose)."""
    return side["format"].endswith((" AMX off", " no extra bufts"))


def _kernel_side(side: dict) -> bool:
    """A side of a load option that runs the weights on another kernel (runner.KERNEL_SIDES): it needs the
    extra buffers and the patches, so it has neither an extra-buffers-off nor a stock twin."""
    from lfm2edge.bench.runner import KERNEL_SIDES

    return side["format"] in {label for _, _, label in KERNEL_SIDES}


def test_amx_off_sides_run_the_same_files(quick_run):
    from lfm2edge.bench.runner import amx_off_label

    data, _, _ = quick_run
    assert data["settings"]["amx_off_side"] is True
    for model in data["models"]:
        llama = {s["format"]: s for s in model["sides"] if s["engine"] == "llama.cpp"}
        plain = [f for f, s in llama.items()
                 if not _extra_buffers_off(s) and not f.endswith(" stock") and not _kernel_side(s)]
        assert plain
        for fmt in plain:
            off = [llama.get(amx_off_label(fmt, amx)) for amx in (True, False)]
            off_side = next(s for s in off if s is not None)
            assert off_side["extra_buffers"] is False and off_side["path"] == llama[fmt]["path"]
            assert off_side["label"].startswith(f"llama.cpp {fmt} ")
            assert off_side["fidelity"] is not None and off_side["figures"]
    for side in (s for m in data["models"] for s in m["sides"]):
        if side["engine"] == "torch":
            assert side["extra_buffers"] is None


def test_plot_is_a_png(quick_run):
    _, png, _ = quick_run
    assert png.stat().st_size > 1000
    assert png.read_bytes()[:8] == PNG_MAGIC


def test_terminal_output_says_weights_are_random(quick_run):
    _, _, output = quick_run
    assert "RANDOM" in output
    assert "vs fp32" in output


# --- the pieces, without a model -------------------------------------------------------------------


def test_summary_percentiles():
    s = Summary.of(np.array([0.003, 0.001, 0.002, 0.010]))
    assert s.n == 4 and s.min_ms == pytest.approx(1.0) and s.max_ms == pytest.approx(10.0)
    assert s.p50_ms <= s.p95_ms <= s.p99_ms <= s.max_ms
    with pytest.raises(ValueError):
        Summary.of(np.array([]))


def test_measure_respects_min_runs_and_cap():
    calls = []
    samples = measure(calls.append, RunPolicy(budget_s=0.0, min_runs=7, max_runs=100, warmup_s=0.0))
    assert len(samples) == 7 and len(calls) == 8  # one warm-up call, not recorded
    samples = measure(lambda i: None, RunPolicy(budget_s=10.0, min_runs=5, max_runs=12, warmup_s=0.0))
    assert len(samples) == 12


def _word_counter(text: str) -> int:
    """A stand-in tokenizer: BOS + one token per word and per comma or full stop."""
    return 1 + len(re.findall(r"[^\W_]+|[,.]", text))


def test_texts_have_exact_token_counts():
    for target in (5, 32, 256):
        text = fit_text("alpha beta gamma delta, epsilon.".split() * 200, _word_counter, target)
        assert _word_counter(text) == target
    queries = make_queries(_word_counter, 32, 3, seed=0)
    docs = make_documents(_word_counter, 256, 3, seed=0)
    assert [_word_counter(q) for q in queries] == [32] * 3
    assert [_word_counter(d) for d in docs] == [256] * 3
    assert make_documents(_word_counter, 256, 3, seed=0) == docs  # deterministic
    assert len(set(docs)) == 3


def test_cosines_near_one_print_their_distance_from_one():
    from lfm2edge.bench.report import cosine_text

    assert cosine_text(0.973435, 6) == "0.973435"
    assert cosine_text(0.9999999993, 6) == "1-7.0e-10"  # would print 1.000000, like 1 - 3.5e-8
    assert cosine_text(1 - 3.46e-8, 6) == "1-3.5e-08"
    assert cosine_text(1.0000000001, 5) == "1-0.0e+00"


def test_fidelity_is_against_float64_where_it_ran_else_pytorch_fp32():
    """Every side, PyTorch fp32 included, is judged against the float64 vectors; without them PyTorch fp32 is
    the reference and has no fidelity of its own."""
    from lfm2edge.bench import runner
    from lfm2edge.bench.results import Memory, SideOutput, SideResult

    rng = np.random.default_rng(0)
    truth = ((rng.standard_normal((4, 8)),), (rng.standard_normal((6, 8)),))

    def side(engine: str, fmt: str, noise: float) -> SideOutput:
        result = SideResult(model="ColBERT", kind="late_interaction", engine=engine, format=fmt, path="p",
                            file_size_bytes=1, threads=1, load_s=1.0, first_call_ms=1.0,
                            memory=Memory(1, 1, 1, 1), figures=(), texts_digest="t", query_tokens=4,
                            document_tokens=6, query_expansion=None, exact=None)
        return SideOutput(result, tuple(v + noise for v in truth[0]), tuple(v + noise for v in truth[1]))

    outputs = [side("llama.cpp", "f32", 1e-3), side("torch", "fp32", 1e-6)]
    judged = runner.with_fidelity(outputs, [], truth)
    assert [r.fidelity.reference for r in judged] == ["torch fp64"] * 2
    assert judged[0].fidelity.cosine_mean < judged[1].fidelity.cosine_mean < 1
    fallback = runner.with_fidelity(outputs, [])
    assert fallback[0].fidelity.reference == "torch fp32" and fallback[1].fidelity is None


def test_fidelity_of_identical_vectors():
    rng = np.random.default_rng(0)
    q = [rng.standard_normal((4, 8)) for _ in range(3)]
    d = [rng.standard_normal((6, 8)) for _ in range(5)]
    fid = compare(q, d, q, d, colbert=True)
    assert fid.cosine_min == pytest.approx(1.0) and fid.rank_identical_order == 1.0
    assert spearman(np.array([1.0, 2.0, 3.0]), np.array([3.0, 2.0, 1.0])) == pytest.approx(-1.0)
    with pytest.raises(ValueError):
        compare(q, d, q, [x[:-1] for x in d], colbert=True)


def test_default_formats_add_bf16_where_the_cpu_multiplies_it(monkeypatch):
    from lfm2edge.bench import artifacts, machine

    monkeypatch.setattr(machine, "bf16_native", lambda: True)
    assert artifacts._formats_for("late_interaction", None) == ("bf16", *artifacts.DEFAULT_FORMATS["late_interaction"])
    assert artifacts._formats_for("dense", None)[0] == "bf16"
    assert artifacts._formats_for("dense", ["q8_0"]) == ("q8_0",)  # what the user asked for, untouched
    monkeypatch.setattr(machine, "bf16_native", lambda: False)
    assert "bf16" not in artifacts._formats_for("late_interaction", None)


def test_cached_mixed_files_follow_the_measure_that_chose_their_parts(monkeypatch):
    """A q8_0_mixed file depends on convert.mixing and the reference too: a change there converts it again;
    the other formats keep their cached files."""
    from lfm2edge.bench import artifacts

    sources = {"mixing": b"one"}
    monkeypatch.setattr(artifacts, "_source_digest",
                        lambda modules: artifacts._digest(*[sources.get(m, m.encode()) for m in modules]))
    before = {fmt: artifacts._converter_digest(fmt) for fmt in ("q8_0", "q8_0_mixed")}
    sources["mixing"] = b"two"
    assert artifacts._converter_digest("q8_0_mixed") != before["q8_0_mixed"]
    assert artifacts._converter_digest("q8_0") == before["q8_0"]


def test_extra_buffers_off_sides_by_default_only_where_amx_or_the_avx512_kernels_run(monkeypatch):
    from lfm2edge.bench import runner
    from lfm2edge.bench.artifacts import ModelSpec
    from lfm2edge.bench.regimes import Plan

    model = ModelSpec("ColBERT", "late_interaction", (("f16", Path("a.gguf")), ("q8_0", Path("b.gguf"))),
                      None, "test", True)

    def formats(amx_off_side, amx: bool, vnni: bool = False, bf16: bool = False,
                f32: bool = False) -> list[tuple[str, bool | None]]:
        monkeypatch.setattr(runner, "amx_usable", lambda: amx)
        monkeypatch.setattr(runner, "q8_0_on_vnni", lambda: vnni)
        monkeypatch.setattr(runner, "bf16_on_avx512", lambda: bf16)
        monkeypatch.setattr(runner, "f32_on_avx512", lambda: f32)
        config = runner.BenchConfig(model=None, formats=None, reference=None, threads=1, plan=Plan(),
                                    amx_off_side=amx_off_side, int8_side=False)
        return [(s.format, s.extra_buffers) for s in runner.side_specs(model, config)]

    plain = [("f16", None), ("q8_0", None)]
    assert formats(None, amx=True) == plain + [("q8_0 AMX off", False)]  # f16 does not run on AMX tiles
    assert formats(None, amx=False) == plain
    assert formats(True, amx=False) == plain + [("f16 no extra bufts", False), ("q8_0 no extra bufts", False)]
    assert formats(True, amx=True) == plain + [("f16 AMX off", False), ("q8_0 AMX off", False)]
    assert formats(False, amx=True) == plain
    # without AMX, q8_0 on patch llama.cpp/0017's VNNI kernel against the same file on tinyBLAS
    assert formats(None, amx=False, vnni=True) == plain + [("q8_0 no extra bufts", False)]
    assert formats(None, amx=True, vnni=True) == plain + [("q8_0 AMX off", False)]
    assert formats(False, amx=False, vnni=True) == plain
    # bf16 and f32 on patch llama.cpp/0019's AVX-512 panels against the same files on tinyBLAS
    model = dataclasses.replace(model, ggufs=(("bf16", Path("a.gguf")), ("f32", Path("c.gguf")),
                                              ("q8_0", Path("b.gguf"))))
    plain = [("bf16", None), ("f32", None), ("q8_0", None)]
    assert formats(None, amx=False, vnni=True, bf16=True, f32=True) == plain + [
        ("bf16 no extra bufts", False), ("f32 no extra bufts", False), ("q8_0 no extra bufts", False)]
    assert formats(None, amx=False, bf16=True) == plain + [("bf16 no extra bufts", False)]
    assert formats(None, amx=False, f32=True) == plain + [("f32 no extra bufts", False)]


def test_kernel_sides_only_for_their_format_and_where_the_build_runs_them(monkeypatch):
    """f32 split and f32 ozaki for f32 files, bf16 int8 for bf16 files; by default only where the build runs
    them, never through the stock build (which lacks the patches)."""
    from lfm2edge.bench import runner
    from lfm2edge.bench.artifacts import ModelSpec
    from lfm2edge.bench.regimes import Plan

    model = ModelSpec("ColBERT", "late_interaction", (("f32", Path("a.gguf")), ("bf16", Path("b.gguf"))),
                      None, "test", True)
    every = {"split_f32", "dynamic_int8", "ozaki_f32"}

    def sides(wanted, usable: set[str]) -> list[tuple[str, str, str | None]]:
        monkeypatch.setattr(runner, "kernel_usable", lambda option: option in usable)
        config = runner.BenchConfig(model=None, formats=None, reference=None, threads=1, plan=Plan(),
                                    amx_off_side=False, split_f32_side=wanted, int8_side=wanted,
                                    ozaki_side=wanted, stock_python="python3")
        return [(s.format, s.path, s.weight_kernel) for s in runner.side_specs(model, config)]

    plain = [("f32", "a.gguf", None), ("bf16", "b.gguf", None)]
    split, int8 = ("f32 split", "a.gguf", "split_f32"), ("bf16 int8", "b.gguf", "dynamic_int8")
    ozaki = ("f32 ozaki", "a.gguf", "ozaki_f32")
    stock = [("f32 stock", "a.gguf", None), ("bf16 stock", "b.gguf", None)]
    assert sides(None, usable=every) == plain + [split, int8, ozaki] + stock
    assert sides(None, usable={"dynamic_int8"}) == plain + [int8] + stock
    assert sides(None, usable={"ozaki_f32"}) == plain + [ozaki] + stock
    assert sides(None, usable=set()) == plain + stock
    assert sides(True, usable=set()) == plain + [split, int8, ozaki] + stock
    assert sides(False, usable=every) == plain + stock


def test_contention_interleaves_sides_quiet_and_busy(colbert_gguf, tmp_path):
    """bench.contention: every policy runs every GGUF, each side answers every round of every phase, and the
    busy phases see the other load."""
    import shutil

    from lfm2edge.bench.contention import run, side_configs

    other = shutil.copy(colbert_gguf, tmp_path / "other.gguf")
    configs = side_configs(["adaptive", "one"], [str(colbert_gguf), str(other)], 2)
    assert [(c.name, c.gguf) for c in configs] == [
        (f"adaptive {colbert_gguf.name}", str(colbert_gguf)), ("adaptive other.gguf", str(other)),
        (f"one {colbert_gguf.name}", str(colbert_gguf)), ("one other.gguf", str(other))]
    result = run(configs, rounds=3, doc_rounds=1, gap_s=0.01, seed=0)
    assert set(result["sides"]) == {c.name for c in configs}
    for phases in result["sides"].values():
        assert {p: s["n"] for p, s in phases.items()} == {
            "query quiet": 3, "query busy": 3, "document quiet": 1, "document busy": 1}
    assert result["other_cpu_share"]["query busy"] > 0.2  # the competing process ran


def test_contention_runs_weight_kernels_and_the_fp32_peers(quick_run, colbert_gguf):
    """bench.contention --weight-kernel adds "+OPTION" sides for the GGUFs the option takes; the peer sides
    run the graphs the quick bench exported, interleaved with them."""
    from lfm2edge.bench.contention import run, side_configs
    from lfm2edge.runtime.core.llama import OZAKI_F32, weight_kernel_available

    data, _, _ = quick_run
    colbert = next(m for m in data["models"] if m["name"] == "ColBERT")
    f32 = str(colbert_gguf)  # an f32 file
    onnx = next(s["path"] for s in colbert["sides"] if s["label"] == "onnxruntime fp32")
    xml = next(s["path"] for s in colbert["sides"] if s["label"] == "openvino f32")
    kernels = ["ozaki_f32", "dynamic_int8"] if weight_kernel_available(OZAKI_F32) else []
    configs = side_configs(["adaptive", "onnxruntime", "openvino-f32"], [f32], 2,
                           {"onnxruntime": onnx, "openvino-f32": xml}, colbert["reference"], weight_kernels=kernels)
    names = ["adaptive", *(["adaptive +ozaki_f32"] if kernels else []), "onnxruntime", "openvino-f32"]
    assert [c.name for c in configs] == names  # dynamic_int8 takes bf16 files only
    result = run(configs, rounds=2, doc_rounds=0, gap_s=0.01, seed=0)
    assert {n: {p: s["n"] for p, s in phases.items()} for n, phases in result["sides"].items()} == {
        n: {"query quiet": 2, "query busy": 2} for n in names}


def test_contention_runs_each_side_on_each_build(colbert_gguf, tmp_path):
    """bench.contention --build: every llama.cpp side runs once per build, on that build's libraries."""
    import shutil

    import llama_cpp

    from lfm2edge.bench.contention import run, side_configs

    installed = Path(llama_cpp.__file__).parent / "lib"
    copy = shutil.copytree(installed, tmp_path / "copy", symlinks=True)
    configs = side_configs(["adaptive"], [str(colbert_gguf)], 2, builds={"installed": str(installed), "copy": str(copy)})
    assert [c.name for c in configs] == ["adaptive @installed", "adaptive @copy"]
    result = run(configs, rounds=2, doc_rounds=0, gap_s=0.01, seed=0)
    assert Path(result["libraries"]["adaptive @installed"]).parent == installed
    assert Path(result["libraries"]["adaptive @copy"]).parent == copy
    assert {p: s["n"] for p, s in result["sides"]["adaptive @copy"].items()} == {"query quiet": 2, "query busy": 2}
