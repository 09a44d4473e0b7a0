"""lfm2edge.distributed on a real local Ray (2 CPUs) with the tiny ColBERT and Embedding models.

What is checked: the vectors the actors write (Parquet shards, an exact index, a Qdrant Edge shard)
are the in-process encoder's; a rerun skips the ids already written, so every id is there once;
bad input fails before anything is encoded, with a typed error naming the file, the line and the
fix; an error inside an actor comes back as the lfm2edge error it was; ``lfm2edge index add --ray``
works end to end; without the extra the error says what to install.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ray = pytest.importorskip("ray")
pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")

import lfm2edge  # noqa: E402
from lfm2edge.convert.synthetic import load_sample_texts  # noqa: E402
from lfm2edge.distributed import add_to_index, encode_corpus, read_corpus, read_vectors  # noqa: E402
from lfm2edge.runtime.core.errors import InvalidInputError, ModelFileError  # noqa: E402
from lfm2edge.runtime.distributed import pipeline  # noqa: E402
from lfm2edge.runtime.distributed.sinks import SCHEMA_KEY, ParquetShards  # noqa: E402
from lfm2edge.runtime.storage.documents import DuplicateIdError  # noqa: E402
from lfm2edge.runtime.storage.index import Index  # noqa: E402

SAMPLE = load_sample_texts()
DOCS = [d["text"] for d in SAMPLE["documents"]][:12]
QUERIES = [q["text"] for q in SAMPLE["queries"]][:3]
RECORDS = [{"id": f"d{i}", "text": t, "metadata": {"n": i} if i % 2 else None} for i, t in enumerate(DOCS)]


@pytest.fixture(scope="module")
def ray_cluster():
    ray.init(num_cpus=2, include_dashboard=False, logging_level=logging.WARNING)
    yield
    ray.shutdown()


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path


def shards(folder: Path) -> list[pa.Table]:
    return [pq.read_table(p) for p in sorted(folder.glob("part-*.parquet"))]


# ----------------------------------------------------------------------------------------------------------
# Parquet shards
# ----------------------------------------------------------------------------------------------------------


def test_colbert_shards_hold_the_encoders_vectors_and_a_rerun_resumes(
    ray_cluster, colbert_gguf, colbert_encoder, tmp_path
):
    out = tmp_path / "vectors"
    half = encode_corpus(colbert_gguf, write_jsonl(tmp_path / "half.jsonl", RECORDS[:5]), out,
                         actors=2, batch_size=2)
    assert (half.documents, half.skipped, half.encoded, half.actors) == (5, 0, 5, 2)
    full = encode_corpus(colbert_gguf, write_jsonl(tmp_path / "all.jsonl", RECORDS), out, actors=2, batch_size=2)
    assert (full.documents, full.skipped, full.encoded) == (12, 5, 7)

    ids, vectors = read_vectors(out)
    assert sorted(ids) == sorted(r["id"] for r in RECORDS)  # every id once
    assert not list(out.glob(".*.tmp"))
    by_id = {r["id"]: r for r in RECORDS}
    for table in shards(out):
        header = json.loads(table.schema.metadata[SCHEMA_KEY])
        assert header["kind"] == "late_interaction" and header["dim"] == colbert_encoder.dim
        texts = table.column("text").to_pylist()
        # Each shard is one actor call: the same texts through the in-process encoder give the same vectors.
        want = colbert_encoder.encode_document(texts)
        got = [vectors[ids.index(d)] for d in table.column("id").to_pylist()]
        for g, w in zip(got, want, strict=True):
            assert g.dtype == np.float32 and g.shape == w.shape
            np.testing.assert_allclose(g, w, rtol=0, atol=1e-6)
        for d, text, meta in zip(table.column("id").to_pylist(), texts, table.column("metadata").to_pylist(),
                                 strict=True):
            assert text == by_id[d]["text"]
            assert (None if meta is None else json.loads(meta)) == by_id[d]["metadata"]

    again = encode_corpus(colbert_gguf, tmp_path / "all.jsonl", out, actors=1)
    assert (again.skipped, again.encoded) == (12, 0)


def test_dense_shards_from_parquet_input(ray_cluster, embedding_gguf, embedding_encoder, tmp_path):
    source = tmp_path / "docs.parquet"
    pq.write_table(pa.table({"id": list(range(len(DOCS))), "text": DOCS}), source)  # integer ids
    result = encode_corpus(embedding_gguf, source, tmp_path / "out", actors=1, cpus_per_actor=2, batch_size=5)
    assert (result.encoded, result.actors, result.cpus_per_actor) == (len(DOCS), 1, 2)
    ids, vectors = read_vectors(tmp_path / "out")
    assert sorted(ids, key=int) == [str(i) for i in range(len(DOCS))]
    for table in shards(tmp_path / "out"):
        want = embedding_encoder.encode_document(table.column("text").to_pylist())
        got = np.stack([vectors[ids.index(d)] for d in table.column("id").to_pylist()])
        assert got.shape == want.shape == (len(want), embedding_encoder.dim)
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)


# ----------------------------------------------------------------------------------------------------------
# Indexes
# ----------------------------------------------------------------------------------------------------------


def test_colbert_into_an_exact_index_resumes_and_scores_as_float16(
    ray_cluster, colbert_gguf, colbert_encoder, tmp_path
):
    index = Index.create(tmp_path / "idx", colbert_encoder)
    first = add_to_index(colbert_gguf, write_jsonl(tmp_path / "half.jsonl", RECORDS[:6]), index, actors=2,
                         batch_size=3)
    assert first.encoded == 6 and len(index) == 6
    source = write_jsonl(tmp_path / "all.jsonl", RECORDS)
    with pytest.raises(DuplicateIdError, match="nothing was encoded"):
        add_to_index(colbert_gguf, source, index, on_duplicate="error")
    rest = add_to_index(colbert_gguf, source, index, actors=2, batch_size=3)
    assert (rest.skipped, rest.encoded) == (6, 6)
    assert sorted(index.ids()) == sorted(r["id"] for r in RECORDS)

    # The index stores float16: its scores are MaxSim over the encoder's vectors rounded to float16.
    docs = [d.astype(np.float16).astype(np.float32) for d in colbert_encoder.encode_document(DOCS)]
    for q, hits in zip(QUERIES, index.search_many(QUERIES, k=len(DOCS)), strict=True):
        want = colbert_encoder.similarity(colbert_encoder.encode_query(q), docs)
        got = {h.id: h.score for h in hits}
        np.testing.assert_allclose([got[f"d{i}"] for i in range(len(DOCS))], want, rtol=1e-4, atol=1e-4)
    hit = index.search_many([QUERIES[0]], k=len(DOCS))[0]
    assert {h.id: h.metadata for h in hit} == {r["id"]: r["metadata"] for r in RECORDS}


def test_dense_into_a_qdrant_edge_shard(ray_cluster, embedding_gguf, embedding_encoder, tmp_path):
    pytest.importorskip("qdrant_edge")
    index = Index.create(tmp_path / "qdrant", embedding_encoder, backend="qdrant")
    result = add_to_index(embedding_gguf, write_jsonl(tmp_path / "docs.jsonl", RECORDS), index, actors=2,
                          batch_size=4)
    assert result.encoded == len(RECORDS) and sorted(index.ids()) == sorted(r["id"] for r in RECORDS)
    query = embedding_encoder.encode_query(QUERIES[0])
    want = embedding_encoder.similarity(query, embedding_encoder.encode_document(DOCS))
    hits = index.search(QUERIES[0], k=3)
    assert [h.id for h in hits] == [f"d{i}" for i in np.argsort(-want)[:3]]


def test_a_load_option_reaches_every_actor(ray_cluster, colbert_gguf, tmp_path):
    """weight_kernel: each actor loads the GGUF with that option of load(). Its vectors are the in-process
    ozaki_f32 encoder's, bit for bit, not the plain load's, and the shards record the option in the identity
    (an actor that loaded plainly would find another identity and refuse). add_to_index takes the option an
    index records; another is refused, and so are an unknown option and a file of another type, before Ray."""
    from lfm2edge.runtime.core.llama import OZAKI_F32, weight_kernel_available
    from lfm2edge.runtime.storage.documents import IndexModelMismatchError

    if not weight_kernel_available(OZAKI_F32):
        pytest.skip("this build or CPU runs no AMX weight kernels")
    source = write_jsonl(tmp_path / "docs.jsonl", RECORDS[:4])
    result = encode_corpus(colbert_gguf, source, tmp_path / "out", weight_kernel="ozaki_f32", actors=1,
                           cpus_per_actor=2, batch_size=4)
    assert result.encoded == 4
    (table,) = shards(tmp_path / "out")
    assert json.loads(table.schema.metadata[SCHEMA_KEY])["model_identity"].endswith("+ozaki_f32")
    ids, vectors = read_vectors(tmp_path / "out")
    texts = table.column("text").to_pylist()
    got = [vectors[ids.index(d)] for d in table.column("id").to_pylist()]
    with lfm2edge.load(colbert_gguf, n_threads=2, ozaki_f32=True) as ozaki, \
            lfm2edge.load(colbert_gguf, n_threads=2) as plain:
        for g, want, other in zip(got, ozaki.encode_document(texts), plain.encode_document(texts), strict=True):
            assert np.array_equal(g, want) and not np.array_equal(g, other)
        index = Index.create(tmp_path / "idx", ozaki)
    added = add_to_index(colbert_gguf, source, index, actors=1, batch_size=4)  # the index's option, untold
    assert added.encoded == 4 and len(index) == 4
    with pytest.raises(IndexModelMismatchError, match=r"\+split_f32.*loaded the same way"):
        add_to_index(colbert_gguf, source, index, weight_kernel="split_f32")
    with pytest.raises(InvalidInputError, match="'fast' is not a weight kernel"):
        encode_corpus(colbert_gguf, source, tmp_path / "out2", weight_kernel="fast")
    with pytest.raises(ModelFileError, match="--outtype bf16"):
        encode_corpus(colbert_gguf, source, tmp_path / "out2", weight_kernel="dynamic_int8")
    assert not (tmp_path / "out2").exists() or not list((tmp_path / "out2").iterdir())


# ----------------------------------------------------------------------------------------------------------
# Errors
# ----------------------------------------------------------------------------------------------------------

BAD_INPUTS = {
    "missing text": ('{"id": "a", "body": "x"}\n', "line 1: the text field 'text' is missing"),
    "duplicate id": ('{"id": "a", "text": "x"}\n{"id": "b", "text": "y"}\n{"id": "a", "text": "z"}\n',
                     "the id 'a' appears twice in the input"),
    "not UTF-8": (b'{"id": "a", "text": "x"}\n{"id": "b", "text": "caf\xe9"}\n',
                  "line 2 is not UTF-8"),
    "not JSON": ('{"id": "a", "text": "x"}\n{"id": "b", "text": \n', "line 2 is not JSON"),
    "no id": ('{"text": "x"}\n', "has no 'id'"),
    "blank text": ('{"id": "a", "text": "  "}\n', "line 1 is empty or only whitespace"),
    "empty": ("\n\n", "no documents in"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_fails_before_encoding_naming_the_problem(case, colbert_gguf, tmp_path):
    content, message = BAD_INPUTS[case]
    source = tmp_path / "docs.jsonl"
    source.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(InvalidInputError, match=message):
        encode_corpus(colbert_gguf, source, tmp_path / "out")
    assert not (tmp_path / "out").exists()  # nothing written, not even the folder


def test_bad_files_and_models(colbert_gguf, tmp_path):
    with pytest.raises(InvalidInputError, match="missing.jsonl does not exist"):
        read_corpus(tmp_path / "missing.jsonl")
    (tmp_path / "docs.csv").write_text("id,text\n")
    with pytest.raises(InvalidInputError, match="name it .jsonl or .parquet"):
        read_corpus(tmp_path / "docs.csv")
    pq.write_table(pa.table({"id": ["a"], "body": ["x"]}), tmp_path / "docs.parquet")
    with pytest.raises(InvalidInputError, match="has no 'text' column"):
        read_corpus(tmp_path / "docs.parquet")
    source = write_jsonl(tmp_path / "ok.jsonl", RECORDS[:1])
    with pytest.raises(ModelFileError, match="does not exist"):
        encode_corpus(tmp_path / "missing.gguf", source, tmp_path / "out")


def test_an_address_nothing_answers_on_is_refused_at_once():
    from lfm2edge.runtime.distributed.ray_support import check_address, check_reachable

    with pytest.raises(InvalidInputError, match="nothing answers at the Ray address 127.0.0.1:1"):
        check_reachable("127.0.0.1:1", timeout_s=2)
    with pytest.raises(InvalidInputError, match="is not a Ray address"):
        check_address("docs.jsonl")


def test_pools_that_cannot_be_placed_are_refused(ray_cluster, colbert_gguf, tmp_path):
    source = write_jsonl(tmp_path / "docs.jsonl", RECORDS[:2])
    with pytest.raises(InvalidInputError, match="no node of this Ray cluster has that many CPUs"):
        encode_corpus(colbert_gguf, source, tmp_path / "out", cpus_per_actor=3)
    with pytest.raises(InvalidInputError, match="room for 2"):
        encode_corpus(colbert_gguf, source, tmp_path / "out", actors=3)
    with pytest.raises(InvalidInputError, match="batch_size must be a positive integer"):
        encode_corpus(colbert_gguf, source, tmp_path / "out", batch_size=0)


def test_an_actors_error_comes_back_as_its_lfm2edge_error(ray_cluster, colbert_gguf, tmp_path):
    # An actor that finds another model at the path (as on a node with a stale copy) refuses to start.
    corpus = read_corpus(write_jsonl(tmp_path / "docs.jsonl", RECORDS[:2]))
    shards_out = ParquetShards(tmp_path / "out", "0" * 32, "late_interaction")
    try:
        with pytest.raises(ModelFileError, match="is another model") as caught:
            stale = pipeline.ActorModel(Path(colbert_gguf).resolve(), "0" * 32, exact=True, weight_kernel=None)
            pipeline._run(stale, corpus, shards_out, pipeline.ActorPool(1, 1, 2), "skip", False)
    finally:
        shards_out.close()
    assert "every node needs" in str(caught.value)
    assert not list((tmp_path / "out").glob("part-*"))


def test_without_the_extra_the_error_says_what_to_install(colbert_gguf, tmp_path):
    source = write_jsonl(tmp_path / "docs.jsonl", RECORDS[:1])
    code = (
        "import sys; sys.modules['ray'] = None\n"  # import ray now fails, as without the extra
        "import lfm2edge.distributed as d\n"
        "from lfm2edge import FeatureUnavailableError\n"
        "try:\n"
        f"    d.encode_corpus({str(colbert_gguf)!r}, {str(source)!r}, {str(tmp_path / 'out')!r})\n"
        "except FeatureUnavailableError as e:\n"
        "    print(e)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "pip install 'lfm2edge[distributed]'" in proc.stdout


# ----------------------------------------------------------------------------------------------------------
# The command line
# ----------------------------------------------------------------------------------------------------------


def test_index_add_ray_from_the_command_line(ray_cluster, colbert_gguf, tmp_path):
    import typer
    from typer.testing import CliRunner

    from lfm2edge.cli import exit_code
    from lfm2edge.runtime.frontends.search_cli import register

    app = typer.Typer(pretty_exceptions_enable=False, add_completion=False)
    register(app)
    runner = CliRunner()

    def run(*args) -> tuple[int, str, BaseException | None]:
        r = runner.invoke(app, [str(a) for a in args])
        error = r.exception if isinstance(r.exception, lfm2edge.Lfm2EdgeError) else None
        return (exit_code(error) if error else r.exit_code), r.stdout, error

    idx = tmp_path / "idx"
    assert run("index", "create", idx, "--model", colbert_gguf, "--threads", "1")[0] == 0
    source = write_jsonl(tmp_path / "docs.jsonl", RECORDS[:6])
    code, out, error = run("index", "add", idx, source, "--ray", "--actors", "2", "--commit-every", "2", "--json")
    assert code == 0, error
    summary = json.loads(out)
    assert summary["added"] == 6 and summary["documents"] == 6 and summary["actors"] == 2
    assert summary["ids"] == [r["id"] for r in RECORDS[:6]]
    code, out, _ = run("index", "add", idx, source, "--ray")  # a rerun resumes: nothing left to add
    assert code == 0 and "added 0 texts, 6 skipped" in out

    assert run("index", "add", idx, source, "--ray-address", "docs.jsonl")[0] == 2  # not an address
    assert run("index", "add", idx, "-", "--ray")[0] == 2  # stdin
    assert run("index", "add", idx, source, "--actors", "2")[0] == 2  # --actors without --ray
