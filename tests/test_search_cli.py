"""The search commands: each command's happy path and a bad input, through Typer's CliRunner.

``invoke`` maps an lfm2edge error to its exit code as ``lfm2edge.cli.main`` does; one test runs the
real entry point in a subprocess. ``serve``'s happy path is tests/test_server.py, which starts the
server through this CLI.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import typer
from typer.testing import CliRunner

import lfm2edge
from lfm2edge.cli import exit_code
from lfm2edge.convert.synthetic import load_sample_texts
from lfm2edge.runtime.core.errors import Lfm2EdgeError
from lfm2edge.runtime.frontends.search_cli import register
from lfm2edge.runtime.storage.index import IndexCorruptError

SAMPLE = load_sample_texts()
DOCS = [d["text"] for d in SAMPLE["documents"]]
QUERIES = [q["text"] for q in SAMPLE["queries"]]
T1 = ["--threads", "1"]


@pytest.fixture(scope="module")
def app() -> typer.Typer:
    app = typer.Typer(pretty_exceptions_enable=False, add_completion=False)
    register(app)
    return app


@pytest.fixture(scope="module")
def colbert(colbert_gguf: Path):
    with lfm2edge.load(colbert_gguf, n_threads=1) as enc:
        yield enc


class Result:
    def __init__(self, code: int, stdout: str, stderr: str, exception: BaseException | None):
        self.code, self.stdout, self.stderr, self.exception = code, stdout, stderr, exception

    def json(self):
        return json.loads(self.stdout)


@pytest.fixture(scope="module")
def invoke(app):
    runner = CliRunner()

    def run(*args: str, input: str | None = None) -> Result:
        r = runner.invoke(app, [str(a) for a in args], input=input)
        exc = r.exception if not isinstance(r.exception, SystemExit) else None
        code = exit_code(exc) if isinstance(exc, Lfm2EdgeError) else r.exit_code
        if exc is not None and not isinstance(exc, Lfm2EdgeError):
            raise exc
        return Result(code, r.stdout, r.stderr, exc)

    return run


def write_lines(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


# ----------------------------------------------------------------------------------------------------------
# encode
# ----------------------------------------------------------------------------------------------------------


def test_encode(invoke, colbert_gguf, embedding_gguf, colbert, tmp_path):
    texts = write_lines(tmp_path / "texts.txt", DOCS[:3])
    r = invoke("encode", embedding_gguf, texts, "-o", tmp_path / "v.npy", "--json", *T1)
    assert r.code == 0, r.stdout
    assert r.json()["texts"] == 3 and np.load(tmp_path / "v.npy").shape == (3, r.json()["dim"])

    r = invoke("encode", colbert_gguf, texts, "-o", tmp_path / "v.npz", *T1)
    assert r.code == 0 and "encoded 3 texts" in r.stdout
    packed = np.load(tmp_path / "v.npz")
    want = colbert.encode_document(DOCS[:3])
    assert packed["offsets"].tolist() == [0, *np.cumsum([len(w) for w in want]).tolist()]
    assert np.allclose(packed["vectors"], np.concatenate(want), atol=1e-5)

    stdin = "\n".join(json.dumps({"text": q}) for q in QUERIES[:2])
    r = invoke("encode", colbert_gguf, "-", "--queries", *T1, input=stdin)
    rows = [json.loads(line) for line in r.stdout.splitlines()]
    assert r.code == 0 and [x["index"] for x in rows] == [0, 1]
    assert np.allclose(rows[1]["embedding"], colbert.encode_query(QUERIES[1]), atol=1e-5)

    r = invoke("encode", colbert_gguf, texts, "-o", tmp_path / "out.jsonl", *T1)
    assert r.code == 0 and len((tmp_path / "out.jsonl").read_text().splitlines()) == 3

    assert invoke("encode", colbert_gguf, texts, "-o", tmp_path / "c.npy", *T1).code == 2  # ragged
    assert invoke("encode", colbert_gguf, tmp_path / "missing.txt", *T1).code == 2
    bad = write_lines(tmp_path / "bad.jsonl", ['{"text": "ok"}', "{not json"])
    r = invoke("encode", colbert_gguf, bad, *T1)
    assert r.code == 2 and "line 2" in str(r.exception)
    assert invoke("encode", colbert_gguf, texts, "-o", tmp_path / "v.csv", *T1).code == 2
    assert invoke("encode", tmp_path / "missing.gguf", texts).code == 3


# ----------------------------------------------------------------------------------------------------------
# index create | add | delete | info | compact, and search
# ----------------------------------------------------------------------------------------------------------


def test_index_lifecycle_and_search(invoke, colbert_gguf, embedding_gguf, tmp_path):
    idx = tmp_path / "idx"
    r = invoke("index", "create", idx, "--model", colbert_gguf, "--dtype", "int8", "--json", *T1)
    assert r.code == 0 and r.json()["dtype"] == "int8" and r.json()["documents"] == 0
    assert invoke("index", "create", idx, "--model", colbert_gguf, *T1).code == 2  # exists
    assert (
        invoke("index", "create", tmp_path / "x", "--model", colbert_gguf, "--dtype", "float8", *T1).code == 2
    )

    records = [json.dumps({"id": f"faq-{i}", "text": DOCS[i], "metadata": {"n": i}}) for i in range(6)]
    docs = write_lines(tmp_path / "docs.jsonl", records)
    r = invoke("index", "add", idx, docs, "--json", *T1)  # the model comes from the index
    assert r.code == 0, r.exception
    assert r.json() == {
        "ids": [f"faq-{i}" for i in range(6)],
        "documents": 6,
        "added": 6,
        "skipped": 0,
        "replaced": 0,
    }
    r = invoke("index", "add", idx, "-", *T1, input="\n".join(DOCS[6:9]))
    assert r.code == 0 and "the index holds 9 documents" in r.stdout
    r = invoke("index", "add", idx, docs, *T1)
    assert r.code == 2 and "already in the index" in str(r.exception)
    r = invoke("index", "add", idx, docs, "--on-duplicate", "skip", *T1)  # counts what was done
    assert r.code == 0 and "added 0 texts, 6 skipped" in r.stdout and "holds 9 documents" in r.stdout
    mixed = write_lines(
        tmp_path / "mixed.jsonl", [json.dumps({"id": "a", "text": "x"}), json.dumps({"text": "y"})]
    )
    assert invoke("index", "add", idx, mixed, *T1).code == 2
    assert invoke("index", "add", idx, docs, "--model", embedding_gguf, *T1).code == 2  # another model

    r = invoke("search", idx, QUERIES[0], QUERIES[1], "-k", "3", "--json", *T1)
    assert r.code == 0
    out = r.json()
    assert [x["query"] for x in out] == QUERIES[:2] and all(len(x["hits"]) == 3 for x in out)
    hit = next(h for x in out for h in x["hits"] if h["id"].startswith("faq-"))
    assert hit["text"] == DOCS[hit["metadata"]["n"]]
    queries = write_lines(tmp_path / "q.txt", QUERIES[:3])
    r = invoke("search", idx, "--queries-from", queries, "-k", "2", *T1)
    assert r.code == 0 and r.stdout.count("   1. ") == 3
    assert invoke("search", idx, *T1).code == 2
    assert invoke("search", idx, "q", "--model", embedding_gguf, *T1).code == 2

    r = invoke("index", "delete", idx, "faq-0", "faq-1", "--json")
    assert r.code == 0 and r.json() == {"deleted": 2, "documents": 7}
    ids_file = write_lines(tmp_path / "ids.txt", ["faq-2"])
    assert invoke("index", "delete", idx, "--ids-from", ids_file).code == 0
    r = invoke("index", "delete", idx, "faq-0")
    assert r.code == 2 and "not in the index" in str(r.exception)
    assert invoke("index", "delete", idx, "faq-0", "--missing-ok").code == 0
    assert invoke("index", "delete", idx).code == 2

    r = invoke("index", "info", idx, "--verify", "--json")
    info = r.json()
    assert r.code == 0 and info["documents"] == 6 and info["deleted"] == 3 and info["problems"] == []
    assert "documents" in invoke("index", "info", idx).stdout
    r = invoke("index", "compact", idx, "--json")
    assert r.code == 0 and r.json()["segments"] == 1 and r.json()["deleted"] == 0

    foreign = tmp_path / "photos"
    foreign.mkdir()
    r = invoke("index", "info", foreign)
    assert (
        r.code != 0
        and isinstance(r.exception, IndexCorruptError)
        and "not an lfm2edge index" in str(r.exception)
    )
    assert len(list((idx / "segments").iterdir())) == 1  # compaction removed the old segments
    seg = next((idx / "segments").iterdir())
    data = bytearray((seg / "vectors.npy").read_bytes())
    data[-1] ^= 0xFF
    (seg / "vectors.npy").write_bytes(bytes(data))
    r = invoke("index", "info", idx, "--verify")
    assert r.code != 0 and isinstance(r.exception, IndexCorruptError) and "checksum" in str(r.exception)
    assert isinstance(invoke("index", "compact", foreign).exception, IndexCorruptError)


def test_qdrant_index_where_and_export(invoke, colbert_gguf, tmp_path):
    """--backend qdrant, --where, --candidates, and `index export` from the exact engine to Qdrant Edge:
    the copy answers as the source does."""
    records = [
        json.dumps({"id": f"faq-{i}", "text": DOCS[i], "metadata": {"lang": "en" if i % 2 else "fr"}})
        for i in range(8)
    ]
    docs = write_lines(tmp_path / "docs.jsonl", records)
    exact, edge, copy = tmp_path / "exact", tmp_path / "edge", tmp_path / "copy"
    for idx, backend in ((exact, "exact"), (edge, "qdrant")):
        assert invoke("index", "create", idx, "--model", colbert_gguf, "--backend", backend, *T1).code == 0
        assert invoke("index", "add", idx, docs, *T1).code == 0
    assert invoke("index", "create", tmp_path / "x", "-m", colbert_gguf, "--candidates", "5", *T1).code == 2

    def hits(idx: Path, *extra: str) -> list[tuple[str, str]]:
        """(id, lang) of the hits, after checking the scores against the exact index's (float16 rounding:
        Qdrant Edge scores a float16 query)."""
        r = invoke("search", idx, QUERIES[0], "-k", "4", "--json", *extra, *T1)
        assert r.code == 0, r.exception
        found = r.json()[0]["hits"]
        scores[(str(idx), *extra)] = [h["score"] for h in found]
        return [(h["id"], h["metadata"]["lang"]) for h in found]

    scores: dict[tuple, list[float]] = {}
    fr = hits(exact, "--where", '{"lang": "fr"}')
    assert len(fr) == 4 and {lang for _, lang in fr} == {"fr"}
    assert hits(edge, "--where", '{"lang": "fr"}') == fr
    assert hits(edge, "--candidates", "0") == hits(exact)
    assert np.allclose(scores[(str(edge), "--candidates", "0")], scores[(str(exact),)], atol=5e-3)
    r = invoke("search", exact, "q", "--candidates", "0", *T1)
    assert r.code == 2 and "Qdrant indexes" in str(r.exception)
    r = invoke("search", edge, "q", "--where", '{"lang": 1.5}', *T1)
    assert r.code == 2 and "float" in str(r.exception)
    assert invoke("search", edge, "q", "--where", "[1]", *T1).code == 2

    r = invoke("index", "export", exact, "--to", copy, "--json")
    assert r.code == 0 and r.json() == {"copied": 8, "documents": 8}
    assert hits(copy) == hits(exact)
    assert invoke("index", "export", exact, "--to", copy).code == 2  # never into an existing index
    info = invoke("index", "info", copy, "--json").json()
    assert info["engine"] == "qdrant-edge" and info["documents"] == 8
    assert invoke("index", "delete", copy, "faq-0", "--json").json() == {"deleted": 1, "documents": 7}


def test_search_needs_the_model_when_it_moved(invoke, colbert_gguf, tmp_path):
    import shutil

    moved = shutil.copy(colbert_gguf, tmp_path / "model.gguf")
    idx = tmp_path / "idx"
    assert invoke("index", "create", idx, "--model", moved, *T1).code == 0
    assert invoke("index", "add", idx, "-", *T1, input="one text\nanother text\n").code == 0
    Path(moved).unlink()
    r = invoke("search", idx, "text", *T1)
    assert r.code == 2 and "pass --model" in str(r.exception)
    assert invoke("search", idx, "text", "--model", colbert_gguf, "-k", "1", *T1).code == 0


def test_weight_kernel_is_recorded_by_the_index_and_reused(invoke, colbert_gguf, tmp_path):
    """--weight-kernel loads the GGUF with that load option. The index records it in its model identity, so
    add and search on it load the same way untold (index add --ray too: tests/test_distributed.py); another
    option is refused by the index."""
    from lfm2edge.runtime.core.llama import OZAKI_F32, SPLIT_F32, weight_kernel_available

    if not (weight_kernel_available(OZAKI_F32) and weight_kernel_available(SPLIT_F32)):
        pytest.skip("this build or CPU runs no AMX weight kernels")
    idx = tmp_path / "idx"
    assert invoke("index", "create", idx, "--model", colbert_gguf, "--weight-kernel", "ozaki_f32", *T1).code == 0
    assert invoke("index", "info", idx, "--json").json()["model_identity"].endswith("+ozaki_f32")
    assert invoke("index", "add", idx, "-", *T1, input="one text\nanother text\n").code == 0
    r = invoke("search", idx, "another text", "-k", "1", "--json", *T1)
    assert r.code == 0 and r.json()[0]["hits"][0]["text"] == "another text"
    r = invoke("search", idx, "text", "--weight-kernel", "split_f32", *T1)
    assert r.code != 0 and "+ozaki_f32" in str(r.exception) and "loaded the same way" in str(r.exception)
    r = invoke("rerank", colbert_gguf, "q", "-", "--weight-kernel", "fast", *T1, input="a\nb\n")
    assert r.code == 2 and "'fast' is not a weight kernel" in str(r.exception)
    r = invoke("encode", colbert_gguf, "-", "--weight-kernel", "dynamic_int8", *T1, input="a\n")
    assert r.code != 0 and "--outtype bf16" in str(r.exception)


def test_weight_kernels_are_refused_where_the_cpu_cannot_run_them(invoke, colbert_gguf, tmp_path):
    """Without AMX-BF16 (AMD Zen 4, say) each weight kernel is a typed refusal naming itself and the way out,
    from load() and from the CLI, not a load that quietly runs the file's own kernels."""
    import lfm2edge
    from lfm2edge.convert.pipeline import convert
    from lfm2edge.convert.synthetic import TINY, make_checkpoint
    from lfm2edge.runtime.core.errors import FeatureUnavailableError
    from lfm2edge.runtime.core.llama import WEIGHT_KERNELS, weight_kernel_available

    missing = [k for k in WEIGHT_KERNELS if not weight_kernel_available(k)]
    if not missing:
        pytest.skip("this build and CPU run every weight kernel (the test above runs them)")
    files = {"F32": colbert_gguf,
             "BF16": convert(make_checkpoint(tmp_path / "ckpt", "colbert", TINY), tmp_path / "bf16.gguf", "bf16")}
    for kernel in missing:
        path = files[kernel.weight_type]
        with pytest.raises(FeatureUnavailableError, match=rf"{kernel.option} .*this build or CPU lacks.*load without"):
            lfm2edge.load(path, n_threads=1, **{kernel.option: True})
        r = invoke("encode", path, "-", "--weight-kernel", kernel.option, *T1, input="a\n")
        assert r.code != 0 and "this build or CPU lacks" in str(r.exception), r.stdout
        with lfm2edge.load(path, n_threads=1) as plain:  # the file itself still loads, on its own kernels
            assert plain.weight_kernel is None


# ----------------------------------------------------------------------------------------------------------
# rerank, serve, help, the real entry point
# ----------------------------------------------------------------------------------------------------------


def test_rerank(invoke, colbert_gguf, colbert, tmp_path):
    candidates = write_lines(tmp_path / "c.txt", DOCS[:6])
    r = invoke("rerank", colbert_gguf, QUERIES[0], candidates, "--top-n", "3", "--json", *T1)
    assert r.code == 0
    want = colbert.rerank(QUERIES[0], DOCS[:6], top_k=3)
    results = r.json()["results"]
    assert [x["index"] for x in results] == want.indices.tolist()
    assert np.allclose([x["relevance_score"] for x in results], want.scores, atol=1e-4)
    r = invoke("rerank", colbert_gguf, QUERIES[0], "-", *T1, input="\n".join(DOCS[:2]))
    assert r.code == 0 and len(r.stdout.splitlines()) == 2
    empty = write_lines(tmp_path / "empty.txt", ["", "  "])
    r = invoke("rerank", colbert_gguf, QUERIES[0], empty, *T1)
    assert r.code == 2 and "no texts" in str(r.exception)
    assert invoke("rerank", colbert_gguf, QUERIES[0], candidates, "--top-n", "0", *T1).code == 2


def test_serve_refuses_a_bad_port(invoke, colbert_gguf):
    assert invoke("serve", colbert_gguf, "--port", "70000").code == 2


@pytest.mark.parametrize(
    "command",
    [
        ["encode"],
        ["index", "create"],
        ["index", "add"],
        ["index", "delete"],
        ["index", "info"],
        ["index", "compact"],
        ["index", "export"],
        ["search"],
        ["rerank"],
        ["serve"],
    ],
)
def test_help_has_examples(invoke, command):
    r = invoke(*command, "--help")
    assert r.code == 0 and "Example" in r.stdout and "lfm2edge " + " ".join(command) in r.stdout


def test_example_search_folder(colbert_gguf, tmp_path):
    folder = tmp_path / "notes"
    (folder / ".hidden").mkdir(parents=True)
    (folder / "guides").mkdir()
    (folder / "bees.md").write_text(f"# Bees\n\n{DOCS[0]}\n\n{DOCS[3]}\n", encoding="utf-8")
    (folder / "guides" / "trains.txt").write_text(DOCS[1], encoding="utf-8")
    (folder / "bread.md").write_text(DOCS[2], encoding="utf-8")
    (folder / ".hidden" / "secret.md").write_text("not indexed", encoding="utf-8")
    (folder / "photo.jpg").write_bytes(b"\xff\xd8")
    script = Path(__file__).resolve().parents[1] / "examples" / "search_folder.py"

    def run(*queries: str) -> str:
        done = subprocess.run(
            [
                sys.executable,
                str(script),
                str(colbert_gguf),
                str(folder),
                *queries,
                "-k",
                "2",
                "--threads",
                "1",
            ],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert done.returncode == 0, done.stderr
        return done.stdout

    out = run(QUERIES[0], QUERIES[1])
    assert "index: 5 paragraphs (5 encoded now, 0 removed)" in out
    lines = out.splitlines()
    for q in QUERIES[:2]:
        hits = lines[lines.index(q) + 1 : lines.index(q) + 3]
        assert len(hits) == 2 and all(
            h.split()[1] in {"bees.md", "guides/trains.txt", "bread.md"} for h in hits
        )
    assert "secret" not in out
    (folder / "guides" / "trains.txt").write_text(DOCS[4], encoding="utf-8")
    (folder / "bread.md").unlink()
    assert "index: 4 paragraphs (1 encoded now, 2 removed)" in run(QUERIES[2])


def test_entry_point_exit_codes(tmp_path):
    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "lfm2edge.runtime.frontends.search_cli", *map(str, args)],
            capture_output=True,
            text=True,
            timeout=60,
        )

    bad_input = run("rerank", tmp_path / "missing.gguf", "q", tmp_path / "missing.txt")
    assert bad_input.returncode == 2 and bad_input.stderr.startswith("error: input file")
    not_index = run("index", "info", tmp_path)
    assert not_index.returncode != 0 and "not an lfm2edge index" in not_index.stderr
    assert run("index", "--help").returncode == 0
