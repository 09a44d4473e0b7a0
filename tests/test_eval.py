"""`lfm2edge eval`: BEIR data read and checked, metrics from ir-measures, the command end to end.

The datasets are tiny BEIR folders written here: two "languages", each five documents whose queries
are the documents' own texts, so a model that matches a text to itself ranks perfectly (the tiny
random ColBERT does: MaxSim of a text against itself dominates).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from lfm2edge.bench.eval_data import load_datasets
from lfm2edge.bench.eval_metrics import metric_names, score_run, trec_run_lines
from lfm2edge.bench.eval_report import run_file
from lfm2edge.bench.eval_run import Row
from lfm2edge.runtime.core.errors import InvalidInputError

ir_measures = pytest.importorskip("ir_measures")

LANGUAGES = {
    "lang_a": [
        ("a1", "The cat sleeps on the warm windowsill."),
        ("a2", "Stock markets fell sharply on Monday."),
        ("a3", "Bake the bread at 220 degrees for forty minutes."),
        ("a4", "The river flooded the lower valley."),
        ("a5", "Quantum computers use qubits."),
    ],
    "lang_b": [
        ("b1", "Le chat dort sur le rebord de la fenêtre."),
        ("b2", "Les marchés boursiers ont chuté lundi."),
        ("b3", "Cuire le pain à 220 degrés pendant quarante minutes."),
        ("b4", "La rivière a inondé la vallée."),
        ("b5", "Les ordinateurs quantiques utilisent des qubits."),
    ],
}


def write_dataset(folder: Path, docs: list[tuple[str, str]], extra_query: bool = False) -> Path:
    (folder / "qrels").mkdir(parents=True, exist_ok=True)
    (folder / "corpus.jsonl").write_text(
        "".join(json.dumps({"_id": i, "title": "", "text": t}, ensure_ascii=False) + "\n" for i, t in docs),
        encoding="utf-8",
    )
    queries = [{"_id": f"q{i}", "text": t} for i, t in docs]
    if extra_query:
        queries.append({"_id": "unjudged", "text": "a query no qrels row names"})
    (folder / "queries.jsonl").write_text(
        "".join(json.dumps(q, ensure_ascii=False) + "\n" for q in queries), encoding="utf-8"
    )
    (folder / "qrels" / "test.tsv").write_text(
        "query-id\tcorpus-id\tscore\n" + "".join(f"q{i}\t{i}\t1\n" for i, _ in docs), encoding="utf-8"
    )
    return folder


@pytest.fixture(scope="module")
def beir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("beir")
    for lang, docs in LANGUAGES.items():
        write_dataset(root / lang, docs, extra_query=True)
    return root


def run_cli(*args: str | Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "LFM2EDGE_DEBUG": ""}
    return subprocess.run(
        [sys.executable, "-m", "lfm2edge", "eval", *map(str, args)],
        capture_output=True, text=True, timeout=300, env=env,
    )


# ----------------------------------------------------------------------------------------------------------
# Reading the BEIR layout
# ----------------------------------------------------------------------------------------------------------


def test_reads_a_folder_of_datasets_and_evaluates_only_judged_queries(beir: Path) -> None:
    datasets = load_datasets(beir)
    assert [d.name for d in datasets] == ["lang_a", "lang_b"]
    assert [d.column for d in datasets] == ["lang_a", "lang_b"]
    a = datasets[0]
    assert a.doc_ids == ("a1", "a2", "a3", "a4", "a5")
    assert a.query_ids == ("qa1", "qa2", "qa3", "qa4", "qa5")  # "unjudged" is left out
    assert a.query_texts[0] == LANGUAGES["lang_a"][0][1]
    assert a.qrels["qa3"] == {"a3": 1}
    assert datasets[1].fingerprint != a.fingerprint


def test_one_dataset_folder_titles_numeric_ids_and_nested_columns(tmp_path: Path) -> None:
    one = tmp_path / "one" / "scifact"
    (one / "qrels").mkdir(parents=True)
    (one / "corpus.jsonl").write_text(
        '{"_id": 7, "title": "Title", "text": "body"}\n\n{"_id": "8", "text": "only text"}\n'
    )
    (one / "queries.jsonl").write_text('{"_id": 1, "text": "a question"}\n')
    (one / "qrels" / "dev.tsv").write_text("query-id\tcorpus-id\tscore\n1\t7\t2\n")
    [ds] = load_datasets(one, split="dev")
    assert (ds.name, ds.column) == ("scifact", "scifact")
    assert ds.doc_texts == ("Title body", "only text")  # title and text joined, as BEIR does
    assert ds.qrels == {"1": {"7": 2}}
    # A language folder holding task folders: the language is the column, the task path the name.
    nested = load_datasets(tmp_path / "one", split="dev")
    assert [(d.name, d.column) for d in nested] == [("scifact", "scifact")]
    deeper = tmp_path / "deep"
    write_dataset(deeper / "fr" / "NanoA", LANGUAGES["lang_b"])
    write_dataset(deeper / "fr" / "NanoB", LANGUAGES["lang_b"])
    assert [(d.name, d.column) for d in load_datasets(deeper)] == [("fr/NanoA", "fr"), ("fr/NanoB", "fr")]


HEADER = "query-id\tcorpus-id\tscore\n"
BAD_DATA = {
    # name: (file, content, what the message must say: the file and the line)
    "bad JSON line": (
        "corpus.jsonl", '{"_id": "a1", "text": "x"}\n{"_id": "a2", "text": \n',
        r"corpus\.jsonl:2: not valid JSON"
    ),
    "missing _id": (
        "queries.jsonl", '{"_id": "qa1", "text": "x"}\n{"text": "y"}\n',
        r'queries\.jsonl:2: no "_id"',
    ),
    "missing text": ("corpus.jsonl", '{"_id": "a1"}\n', r'corpus\.jsonl:1: "text" is missing'),
    "blank document": ("corpus.jsonl", '{"_id": "a1", "text": "  "}\n', r"corpus\.jsonl:1: .*empty"),
    "duplicate id": (
        "corpus.jsonl", '{"_id": "a1", "text": "x"}\n{"_id": "a1", "text": "y"}\n',
        r"corpus\.jsonl:2: .*repeats line 1"
    ),
    "not an object": ("corpus.jsonl", '["a1", "x"]\n', r"corpus\.jsonl:1: a JSON list"),
    "invalid UTF-8": (
        "corpus.jsonl", b'{"_id": "a1", "text": "\xff"}\n',
        r"corpus\.jsonl:1: not valid UTF-8",
    ),
    "empty corpus": ("corpus.jsonl", "\n", r"corpus\.jsonl holds no documents"),
    "qrels column count": (
        "qrels/test.tsv", HEADER + "qa1\ta1\t1\nqa2\ta2\n", r"test\.tsv:3: 2 tab-separated columns"
    ),
    "qrels unknown query": (
        "qrels/test.tsv", HEADER + "qzz\ta1\t1\n",
        r"test\.tsv:2: query-id 'qzz' is not in",
    ),
    "qrels unknown document": (
        "qrels/test.tsv", HEADER + "qa1\tzz\t1\n",
        r"test\.tsv:2: corpus-id 'zz' is not in",
    ),
    "qrels score": ("qrels/test.tsv", HEADER + "qa1\ta1\thigh\n", r"test\.tsv:2: the score 'high'"),
    "qrels header": ("qrels/test.tsv", "qa1\ta1\t1\n", r"test\.tsv:1: the first line must be the header"),
    "qrels without rows": ("qrels/test.tsv", HEADER, r"test\.tsv judges no query"),
}


def damaged(root: Path, name: str) -> Path:
    folder = write_dataset(root / name.replace(" ", "_"), LANGUAGES["lang_a"])
    file, content, _ = BAD_DATA[name]
    target = folder / file
    target.write_bytes(content if isinstance(content, bytes) else content.encode("utf-8"))
    return folder


@pytest.mark.parametrize("name", sorted(BAD_DATA))
def test_malformed_data_names_the_file_and_line(tmp_path: Path, name: str) -> None:
    folder = damaged(tmp_path, name)
    with pytest.raises(InvalidInputError, match=BAD_DATA[name][2]):
        load_datasets(folder)


def test_missing_files_and_splits_say_what_to_do(tmp_path: Path) -> None:
    with pytest.raises(InvalidInputError, match="holds no dataset"):
        load_datasets(tmp_path)
    folder = write_dataset(tmp_path / "d", LANGUAGES["lang_a"])
    with pytest.raises(InvalidInputError, match=r"no qrels for split 'dev'.*splits there are test"):
        load_datasets(folder, split="dev")
    (folder / "queries.jsonl").unlink()
    with pytest.raises(InvalidInputError, match=r"queries\.jsonl is missing"):
        load_datasets(folder)


# ----------------------------------------------------------------------------------------------------------
# Metrics
# ----------------------------------------------------------------------------------------------------------

QRELS = {"q1": {"d1": 1, "d2": 0, "d4": 1}, "q2": {"d3": 2, "d5": 1}}
RUN = {
    "q1": {"d2": 0.9, "d1": 0.8, "d3": 0.7, "d4": 0.1},  # relevant at ranks 2 and 4
    "q2": {"d3": 0.95, "d1": 0.5, "d5": 0.4},  # the grade-2 document first, the grade-1 at rank 3
}


def test_metrics_equal_the_library_and_the_definitions_on_a_known_run() -> None:
    got = score_run(QRELS, RUN, recall_ks=(2, 20))
    assert list(got) == metric_names((2, 20)) == ["NDCG@10", "Recall@2", "Recall@20", "MRR@10"]
    library = ir_measures.calc_aggregate(
        [ir_measures.nDCG @ 10, ir_measures.R @ 2, ir_measures.R @ 20, ir_measures.RR @ 10], QRELS, RUN
    )
    assert got["NDCG@10"] == pytest.approx(library[ir_measures.nDCG @ 10], abs=1e-12)
    assert got["Recall@2"] == pytest.approx(library[ir_measures.R @ 2], abs=1e-12)
    assert got["MRR@10"] == pytest.approx(library[ir_measures.RR @ 10], abs=1e-12)
    # And by the definitions (trec_eval's NDCG: gain = relevance, discount log2(rank + 1)).
    ndcg_q1 = (1 / math.log2(3) + 1 / math.log2(5)) / (1 + 1 / math.log2(3))
    ndcg_q2 = (2 + 1 / math.log2(4)) / (2 + 1 / math.log2(3))
    assert got["NDCG@10"] == pytest.approx((ndcg_q1 + ndcg_q2) / 2, abs=1e-9)
    assert got["Recall@2"] == pytest.approx((1 / 2 + 1 / 2) / 2)
    assert got["Recall@20"] == pytest.approx(1.0)
    assert got["MRR@10"] == pytest.approx((1 / 2 + 1) / 2)


def test_a_query_missing_from_the_run_counts_as_zero_not_dropped() -> None:
    only_q1 = {"q1": RUN["q1"]}
    got = score_run(QRELS, only_q1, recall_ks=(20,))
    q1 = score_run({"q1": QRELS["q1"]}, only_q1, recall_ks=(20,))
    assert got["NDCG@10"] == pytest.approx(q1["NDCG@10"] / 2)
    assert got["MRR@10"] == pytest.approx(0.25)


def test_a_perfect_ranking_scores_one_on_every_metric() -> None:
    perfect = {"q1": {"d1": 3.0, "d4": 2.0, "d2": 1.0}, "q2": {"d3": 2.0, "d5": 1.0, "d1": 0.5}}
    assert score_run(QRELS, perfect, recall_ks=(2, 100)) == {
        "NDCG@10": pytest.approx(1.0), "Recall@2": 1.0, "Recall@100": 1.0, "MRR@10": 1.0,
    }


def test_trec_run_lines_read_back_by_the_library() -> None:
    lines = trec_run_lines(RUN, "my model [none]")
    assert lines[0] == "q1 Q0 d2 1 0.900000 my_model__none_"
    back = {}
    for r in ir_measures.read_trec_run("\n".join(lines)):
        back.setdefault(r.query_id, {})[r.doc_id] = r.score
    assert back == {q: pytest.approx(s) for q, s in RUN.items()}


# ----------------------------------------------------------------------------------------------------------
# The command, end to end on the tiny GGUFs
# ----------------------------------------------------------------------------------------------------------


def segment_mtimes(cache: Path) -> dict[str, int]:
    return {str(p): p.stat().st_mtime_ns for p in cache.rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def first_run(beir: Path, colbert_gguf: Path, embedding_gguf: Path, tmp_path_factory: pytest.TempPathFactory):
    out = tmp_path_factory.mktemp("eval_out")
    done = run_cli(
        colbert_gguf, embedding_gguf, "--dataset", beir, "--cache-dir", out / "cache",
        "--query-expansion", "attended,none", "--pool-factor", "1,2", "--storage", "float16,int8",
        "--json", out / "result.json", "--save-run", out / "runs", "--plot", out / "ndcg.png",
        "--no-progress", "--threads", "1",
    )
    assert done.returncode == 0, done.stderr
    return out, done, json.loads((out / "result.json").read_text())


def test_cli_writes_table_json_trec_runs_and_plot(first_run, beir: Path) -> None:
    out, done, result = first_run
    rows = {r["label"]: r for r in result["rows"]}
    colbert = [r for r in result["rows"] if r["kind"] == "colbert"]
    dense = [r for r in result["rows"] if r["kind"] == "dense"]
    # ColBERT: 2 modes x 2 pool factors x 2 storages; dense: storage only (no expansion, no pooling).
    assert len(colbert) == 8 and len(dense) == 2
    assert {(r["query_expansion"], r["pool_factor"], r["storage"]) for r in colbert} == {
        (m, p, s) for m in ("attended", "none") for p in (1, 2) for s in ("float16", "int8")
    }
    assert {(r["query_expansion"], r["storage"]) for r in dense} == {(None, "float16"), (None, "int8")}
    assert result["columns"] == ["AVG", "lang_a", "lang_b"]
    assert result["metrics"] == ["NDCG@10", "Recall@20", "Recall@100", "MRR@10"]
    # The table: a header with AVG first, then one line per row label.
    header = next(line for line in done.stdout.splitlines() if "AVG" in line)
    assert header.index("AVG") < header.index("lang_a") < header.index("lang_b")
    for label in rows:
        assert label in done.stdout
    # The queries are their documents' texts: the tiny ColBERT ranks each one's document first,
    # with every option (pooling 2 and int8 included).
    for r in colbert:
        assert r["average"] == {m: pytest.approx(1.0) for m in result["metrics"]}, r["label"]
    for r in dense:
        assert all(0.0 <= v <= 1.0 for v in r["average"].values())
        assert r["average"]["Recall@100"] == pytest.approx(1.0)  # five documents, all retrieved
    # One TREC run per row and dataset; re-scoring each file gives the numbers in the JSON.
    runs = sorted((out / "runs").iterdir())
    assert len(runs) == 10 * 2
    datasets = {d.name: d for d in load_datasets(beir)}
    for r in result["rows"]:
        for name, numbers in r["datasets"].items():
            row = Row(
                r["model"], r["source"], r["kind"], r["query_expansion"], r["pool_factor"], r["storage"]
            )
            path = run_file(out / "runs", row, name)
            run: dict = {}
            for item in ir_measures.read_trec_run(str(path)):
                run.setdefault(item.query_id, {})[item.doc_id] = item.score
            expected = {m: pytest.approx(numbers[m]) for m in result["metrics"]}
            assert score_run(datasets[name].qrels, run) == expected
    assert (out / "ndcg.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_second_run_with_another_query_option_reuses_the_cached_documents(
    first_run, beir: Path, colbert_gguf: Path, embedding_gguf: Path
) -> None:
    out, _, result = first_run
    # The first run encoded each (model, dataset, storage) once, for its first mode only.
    for r in result["rows"]:
        encoded = {d["encoded_documents"] for d in r["datasets"].values()}
        assert encoded == ({5} if r["query_expansion"] in ("attended", None) else {0}), r["label"]
    from lfm2edge.runtime.core.llama import supports_key_mask

    before = segment_mtimes(out / "cache")
    done = run_cli(
        colbert_gguf, embedding_gguf, "--dataset", beir, "--cache-dir", out / "cache",
        "--query-expansion", "pylate" if supports_key_mask() else "attended",
        "--pool-factor", "2", "--storage", "int8",
        "--json", out / "second.json", "--no-progress", "--threads", "1",
    )
    assert done.returncode == 0, done.stderr
    second = json.loads((out / "second.json").read_text())
    assert len(second["rows"]) == 2
    assert all(d["encoded_documents"] == 0 for r in second["rows"] for d in r["datasets"].values())
    assert "encoding 5 documents" not in done.stderr
    assert segment_mtimes(out / "cache") == before  # nothing in the cache was rewritten or added


def test_the_reference_row_sits_beside_the_gguf(
    beir: Path, colbert_gguf: Path, colbert_checkpoint: Path, tmp_path: Path
) -> None:
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    args = (colbert_gguf, colbert_checkpoint, "--dataset", beir / "lang_a", "--cache-dir", tmp_path / "cache",
            "--query-expansion", "none", "--json", tmp_path / "r.json", "--no-progress", "--threads", "1")
    done = run_cli(*args)
    assert done.returncode == 0, done.stderr
    rows = json.loads((tmp_path / "r.json").read_text())["rows"]
    reference = next(r for r in rows if r["pool_factor"] is None)
    assert reference["label"] == f"{colbert_checkpoint.name} (reference) [none, float32]"
    assert reference["datasets"]["lang_a"]["encoded_documents"] == 5
    assert reference["average"]["NDCG@10"] == pytest.approx(1.0)  # the same perfect ranking in PyTorch
    again = run_cli(*args)
    assert again.returncode == 0, again.stderr
    rows = json.loads((tmp_path / "r.json").read_text())["rows"]
    assert all(r["datasets"]["lang_a"]["encoded_documents"] == 0 for r in rows)


def test_a_weight_kernel_row_encodes_and_caches_its_own_documents(
    beir: Path, colbert_checkpoint: Path, tmp_path: Path
) -> None:
    """--weight-kernel dynamic_int8 adds a row for the bf16 GGUF loaded with it. Its vectors differ from the
    file's own, so its documents are encoded and cached apart from the plain row's (another identity)."""
    from lfm2edge.convert.pipeline import convert
    from lfm2edge.runtime.core.llama import DYNAMIC_INT8, weight_kernel_available

    if not weight_kernel_available(DYNAMIC_INT8):
        pytest.skip("this build or CPU has no dynamic_int8 (patch llama.cpp/0013 on AMX)")
    bf16 = convert(colbert_checkpoint, tmp_path / "colbert-bf16.gguf", "bf16")
    args = (bf16, "--dataset", beir / "lang_a", "--cache-dir", tmp_path / "cache", "--query-expansion", "none",
            "--weight-kernel", "dynamic_int8", "--json", tmp_path / "r.json", "--no-progress", "--threads", "1")
    done = run_cli(*args)
    assert done.returncode == 0, done.stderr
    rows = {r["model"]: r for r in json.loads((tmp_path / "r.json").read_text())["rows"]}
    assert sorted(rows) == ["colbert-bf16", "colbert-bf16 dynamic_int8"]
    assert all(r["datasets"]["lang_a"]["encoded_documents"] == 5 for r in rows.values())
    assert rows["colbert-bf16 dynamic_int8"]["average"]["Recall@100"] == pytest.approx(1.0)
    again = run_cli(*args)
    assert again.returncode == 0, again.stderr
    rows = json.loads((tmp_path / "r.json").read_text())["rows"]
    assert all(r["datasets"]["lang_a"]["encoded_documents"] == 0 for r in rows)  # each found its own cache


@pytest.mark.parametrize(
    "name", ["bad JSON line", "qrels column count", "qrels unknown document", "empty corpus"]
)
def test_cli_malformed_data_is_one_error_line_and_exit_2(
    tmp_path: Path, colbert_gguf: Path, name: str
) -> None:
    folder = damaged(tmp_path, name)
    done = run_cli(colbert_gguf, "--dataset", folder, "--cache-dir", tmp_path / "cache", "--no-progress")
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    [line] = [ln for ln in done.stderr.splitlines() if ln.strip()]
    assert line.startswith("error: ") and str(folder) in line


@pytest.mark.parametrize(
    "args, message",
    [
        (["--storage", "bf16"], "--storage takes float16, int8"),
        (["--query-expansion", "maybe"], "--query-expansion takes pylate, attended, none"),
        (["--pool-factor", "0"], "--pool-factor takes positive integers"),
        (["--plot", "chart.gif"], "name a .png, .svg or .pdf"),
        (["--json", "/nonexistent-folder/x.json"], "does not exist"),
        (["--weight-kernel", "fast"], "'fast' is not a weight kernel; the options are split_f32 (f32 files), dynamic_int8"),
        (["--weight-kernel", "dynamic_int8"], "--weight-kernel dynamic_int8 takes BF16 GGUFs, and none was given"),
    ],
)
def test_cli_bad_options_are_refused_before_any_work(
    tmp_path: Path, beir: Path, colbert_gguf: Path, args: list[str], message: str
) -> None:
    done = run_cli(colbert_gguf, "--dataset", beir, "--cache-dir", tmp_path / "cache", "--no-progress", *args)
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    assert done.stderr.startswith("error: ") and message in done.stderr
    assert not (tmp_path / "cache").exists()  # refused before anything was encoded


def test_cli_unknown_model_path_is_refused(tmp_path: Path, beir: Path) -> None:
    done = run_cli(tmp_path / "missing.gguf", "--dataset", beir, "--no-progress")
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.startswith("error: MODEL") and "neither a GGUF file" in done.stderr
