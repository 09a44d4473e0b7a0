"""The runtime against the PyTorch reference, on tiny f32 GGUFs of both kinds."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

import lfm2edge
from lfm2edge.convert.reference import pylate_maxsim
from lfm2edge.convert.verify import row_cosines
from lfm2edge.runtime.core.errors import EncoderClosedError, FeatureUnavailableError, InvalidInputError
from lfm2edge.runtime.core.maxsim import PackedDocuments, maxsim

from .patch_support import require_patch

EXTRA_TEXTS = [
    "   leading and trailing whitespace   ",
    "runs   of    spaces\tand\ttabs",
    "?!...",
    "emoji 🎉🚀 and mixed scripts: Привет, 世界, مرحبا",
    "literal special tokens <|im_end|> and [Q] inside",
    "long " * 700,
]


def all_texts(sample):
    queries, documents = sample
    return queries + documents + EXTRA_TEXTS


# --- tokenization ----------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["colbert", "embedding"])
def test_llama_tokenization_equals_hf(kind, sample, request):
    enc = request.getfixturevalue(f"{kind}_encoder")
    ref = request.getfixturevalue(f"{kind}_reference")
    for text in all_texts(sample):
        ours = enc.tokenize(text)
        theirs = np.array(ref.tokenizer.encode(text).ids)
        assert np.array_equal(ours, theirs), text


def test_added_tokens_in_text_are_matched_as_hf_does(colbert_encoder, colbert_reference):
    ids = colbert_encoder.tokenize("a <|im_end|> b [Q] c")
    assert 7 in ids  # <|im_end|> as one special token
    assert colbert_encoder.settings.query_prefix_id in ids  # "[Q] " as one added token
    assert np.array_equal(ids, colbert_reference.tokenizer.encode("a <|im_end|> b [Q] c").ids)


# --- exactness against the reference ----------------------------------------------------


def test_colbert_documents_match_reference(colbert_encoder, colbert_reference, sample):
    texts = all_texts(sample)
    ours = colbert_encoder.encode_document(texts)
    theirs = colbert_reference.encode_document(texts)
    for text, a, b in zip(texts, ours, theirs, strict=True):
        assert a.shape == b.shape, text
        assert row_cosines(a, b).min() >= 0.9999, text
        assert np.allclose(np.linalg.norm(a, axis=1), 1.0, atol=1e-5)


@pytest.mark.parametrize("mode", ["attended", "none"])
def test_colbert_queries_match_reference(mode, colbert_gguf, colbert_reference, sample):
    with lfm2edge.load(colbert_gguf, n_threads=2, query_expansion=mode) as enc:
        assert enc.query_expansion == mode
        texts = all_texts(sample)
        ours = enc.encode_query(texts)
        theirs = colbert_reference.encode_query(texts, expansion=mode)
        for text, a, b in zip(texts, ours, theirs, strict=True):
            assert a.shape == b.shape, text
            assert row_cosines(a, b).min() >= 0.9999, text
            if mode == "attended":
                assert a.shape[0] == enc.settings.query_length


def test_maxsim_scores_and_order_match_reference(colbert_encoder, colbert_reference, sample):
    queries, documents = sample
    d_ours = colbert_encoder.encode_document(documents)
    d_ref = colbert_reference.encode_document(documents)
    packed = PackedDocuments.pack(d_ours, np.float32)
    for q_ours, q_ref in zip(
        colbert_encoder.encode_query(queries),
        colbert_reference.encode_query(queries, expansion=colbert_encoder.query_expansion),
        strict=True,
    ):
        ours, theirs = maxsim(q_ours, packed), pylate_maxsim(q_ref, d_ref)
        assert np.allclose(ours, theirs, rtol=1e-3)
        assert np.array_equal(np.argsort(-ours, kind="stable")[:10], np.argsort(-theirs, kind="stable")[:10])


def test_dense_matches_reference(embedding_encoder, embedding_reference, sample):
    texts = all_texts(sample)
    for encode in ("encode_query", "encode_document"):
        ours = getattr(embedding_encoder, encode)(texts)
        theirs = getattr(embedding_reference, encode)(texts)
        assert ours.shape == theirs.shape == (len(texts), embedding_encoder.dim)
        assert ours.dtype == np.float32
        assert row_cosines(ours, theirs).min() >= 0.9999
        assert np.allclose(np.linalg.norm(ours, axis=1), 1.0, atol=1e-5)


def test_dense_raw_vectors_on_request(embedding_encoder, embedding_reference):
    raw = embedding_encoder.encode_query("raw vector please", normalize=False)
    ids, _ = embedding_reference.tokenize_query("raw vector please")
    assert np.allclose(raw, embedding_reference.model.cls_vector(ids), rtol=1e-4, atol=1e-5)
    assert abs(np.linalg.norm(raw) - 1.0) > 1e-3


# --- shapes, truncation, single-vs-list -------------------------------------------------


def test_single_string_gives_single_result(colbert_encoder, embedding_encoder):
    assert isinstance(colbert_encoder.encode_query("one"), np.ndarray)
    assert isinstance(colbert_encoder.encode_document(["one", "two"]), list)
    assert embedding_encoder.encode_query("one").shape == (embedding_encoder.dim,)
    assert embedding_encoder.encode_document(["one", "two"]).shape == (2, embedding_encoder.dim)


def test_long_texts_are_truncated_not_aborted(colbert_encoder, embedding_encoder):
    long_text = "a long sentence with many words " * 400
    doc = colbert_encoder.encode_document(long_text)
    assert doc.shape[0] <= colbert_encoder.settings.document_length
    assert colbert_encoder.encode_query(long_text).shape[0] == colbert_encoder.settings.query_length
    assert embedding_encoder.encode_document([long_text] * 3).shape == (3, embedding_encoder.dim)


def test_skiplist_tokens_are_dropped_from_documents(colbert_encoder):
    ids = colbert_encoder.prepare_document("hello , world !")
    kept = ~np.isin(ids, colbert_encoder.settings.skiplist_array())
    assert kept.sum() < len(ids)  # standalone punctuation present
    assert colbert_encoder.encode_document("hello , world !").shape[0] == kept.sum()


def test_query_layout(colbert_encoder):
    s = colbert_encoder.settings
    ids, keys = colbert_encoder.prepare_query_with_keys("short query")
    assert ids[0] == colbert_encoder.tokenize("x")[0]  # BOS
    assert ids[1] == s.query_prefix_id
    assert len(ids) == s.query_length and ids[-1] == s.expansion_token_id
    n_text = len(colbert_encoder.tokenize("short query")) + 1
    if colbert_encoder.query_expansion == "pylate":
        assert keys[:n_text].all() and not keys[n_text:].any()
    else:
        assert keys.all()


# --- batch invariance and threads -------------------------------------------------------


@pytest.mark.parametrize("kind", ["colbert", "embedding"])
def test_prepare_gives_the_ids_that_encode_decodes(kind, request, monkeypatch):
    enc = request.getfixturevalue(f"{kind}_encoder")
    decoded: list[np.ndarray] = []
    decode_all = enc._decode_all

    def spy(sequences, *args, **kwargs):
        decoded.extend(sequences)
        return decode_all(sequences, *args, **kwargs)

    monkeypatch.setattr(enc, "_decode_all", spy)
    texts = ["short", "  spaces around  ", "word " * 2000]  # the last is truncated
    s = enc.settings
    for side, length in (("query", s.query_length), ("document", s.document_length)):
        decoded.clear()
        getattr(enc, f"encode_{side}")(texts)
        prepared = [getattr(enc, f"prepare_{side}")(t) for t in texts]
        assert len(decoded) == len(prepared)
        assert all(np.array_equal(a, b) and b.dtype == np.int32 for a, b in zip(decoded, prepared, strict=True))
        assert len(prepared[2]) == length and prepared[0][0] == enc.tokenize("x")[0]  # truncated; BOS first
    assert np.array_equal(enc.prepare_query("short"), enc.prepare_query("short \n"))  # stripped, as encoded
    if kind == "colbert":
        ids, keys = enc.prepare_query_with_keys("short")
        assert np.array_equal(ids, enc.prepare_query("short")) and len(keys) == len(ids)


def test_outputs_are_batch_invariant(colbert_encoder, sample):
    texts = sample[1][:12]
    alone = [colbert_encoder.encode_document(t) for t in texts]
    batched = colbert_encoder.encode_document(texts, batch_size=5)
    reversed_ = colbert_encoder.encode_document(texts[::-1], batch_size=12)[::-1]
    for a, b, c in zip(alone, batched, reversed_, strict=True):
        assert np.allclose(a, b, atol=1e-6) and np.allclose(a, c, atol=1e-6)


def test_two_threads_get_the_same_vectors(embedding_encoder, sample):
    texts = sample[1][:10]
    expected = embedding_encoder.encode_document(texts)
    results: dict[int, np.ndarray] = {}

    def work(i: int) -> None:
        results[i] = embedding_encoder.encode_document(texts if i % 2 == 0 else texts[::-1])

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i, got in results.items():
        assert np.allclose(got if i % 2 == 0 else got[::-1], expected, atol=1e-6)


@pytest.mark.parametrize("kind", ["colbert", "embedding"])
def test_concurrent_decodes_give_the_vectors_of_one_at_a_time(kind, colbert_gguf, embedding_gguf, sample):
    """A call of several decodes runs two at once, one thread each, in contexts of their own: same vectors."""
    path = colbert_gguf if kind == "colbert" else embedding_gguf
    docs = sample[1][:9] + ["x " * 300]  # an odd count: the last round has one decode, on both threads
    queries = sample[0][:20]  # ColBERT: 32-token queries, 8 per decode
    with lfm2edge.load(path, n_threads=2, adaptive_threads=False) as both, lfm2edge.load(
        path, n_threads=2, adaptive_threads=False, concurrent_decodes=False
    ) as serial:
        got, want = both.encode_document(docs, batch_size=1), serial.encode_document(docs, batch_size=1)
        q_got, q_want = both.encode_query(queries, batch_size=8), serial.encode_query(queries, batch_size=8)
        assert len(both._extra) == 1 and not serial._extra  # the second decode of a round had its own context
        extra = both._extra[0]
    assert extra.closed  # close() freed it with the first
    for a, b in zip([*got, *q_got], [*want, *q_want], strict=True):
        assert a.shape == b.shape and np.array_equal(a, b)


def test_an_error_in_a_concurrent_decode_reaches_the_caller(colbert_gguf):
    """A decode that fails on a pool thread raises its typed error in the caller; the encoder goes on."""
    with lfm2edge.load(colbert_gguf, n_threads=2, adaptive_threads=False) as enc:
        good = enc.prepare_document("a document about rivers")
        bad = good.copy()
        bad[-1] = enc._model.n_vocab  # one past the vocabulary: llama.cpp would abort on it
        calls = [good, good, good, bad, good]  # the bad call lands on either context
        with pytest.raises(InvalidInputError, match="vocab"):
            enc._decode_all(calls, batch_size=1, show_progress_bar=False)
        assert len(enc._extra) == 1
        again = enc._decode_all([good, good, good], batch_size=1, show_progress_bar=False)
        assert all(np.array_equal(a, again[0]) for a in again)


def test_concurrent_decodes_run_on_the_caller_when_the_pool_takes_no_work(colbert_gguf, sample):
    """At interpreter exit concurrent.futures refuses new work; an encode still running in a daemon thread
    then decodes on its own thread instead of raising (the hostile "interpreter exit" case hit it by timing).
    A shut-down pool refuses work the same way."""
    docs = sample[1][:6]
    with lfm2edge.load(colbert_gguf, n_threads=2, adaptive_threads=False) as enc:
        want = enc.encode_document(docs, batch_size=1)  # two contexts at once: the pool exists
        assert enc._pool is not None and len(enc._extra) == 1
        enc._pool.shutdown()
        got = enc.encode_document(docs, batch_size=1)
    for a, b in zip(got, want, strict=True):
        assert np.array_equal(a, b)


def test_close_during_concurrent_decodes_ends_the_encode_after_those_in_flight(colbert_gguf, sample):
    """close() mid-encode: each context finishes its decode in flight, starts no more, and the encode raises."""
    enc = lfm2edge.load(colbert_gguf, n_threads=2, adaptive_threads=False)
    enc.encode_document(sample[1][:2], batch_size=1)  # makes the second context
    after_close = {"first": 0, "second": 0}
    held = threading.Event()

    def watched(name, decode, hold_at=None):
        calls = [0]

        def run(*args):
            calls[0] += 1
            if enc.closed:
                after_close[name] += 1
            if calls[0] == hold_at:  # keep this decode in flight until close() has been called
                held.set()
                while not enc.closed:
                    time.sleep(0.001)
            return decode(*args)

        return run

    enc._ctx.decode = watched("first", enc._ctx.decode, hold_at=3)
    enc._extra[0].decode = watched("second", enc._extra[0].decode)
    outcome = []

    def encode():
        try:
            enc.encode_document(sample[1][:20] * 3, batch_size=1)
            outcome.append("done")
        except EncoderClosedError as e:
            outcome.append(e)

    worker = threading.Thread(target=encode)
    worker.start()
    assert held.wait(60)
    enc.close()
    worker.join(60)
    assert not worker.is_alive() and isinstance(outcome[0], EncoderClosedError)
    assert after_close["first"] == 0 and after_close["second"] <= 1  # at most the one it had just taken


# --- bad input --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "bad, message",
    [
        (None, "None"),
        (b"bytes", "bytes"),
        (42, "int"),
        ([""], "empty"),
        (["ok", "   "], "text 1 is empty"),
        (["ok", None], "text 1 is NoneType"),
        (["ok", b"x"], "decode bytes"),
    ],
)
def test_bad_input_gets_a_clear_error(bad, message, colbert_encoder, embedding_encoder):
    for enc in (colbert_encoder, embedding_encoder):
        with pytest.raises(InvalidInputError, match=message):
            enc.encode_document(bad)
        with pytest.raises(InvalidInputError, match=message):
            enc.encode_query(bad)
    assert colbert_encoder.encode_query("still alive").shape[0] > 0


def test_bad_options(colbert_gguf, embedding_gguf, colbert_encoder):
    with pytest.raises(InvalidInputError, match="query_expansion must be one of"):
        lfm2edge.load(colbert_gguf, query_expansion="sometimes")
    with pytest.raises(InvalidInputError, match="ColBERT models only"):
        lfm2edge.load(embedding_gguf, query_expansion="none")
    with pytest.raises(InvalidInputError, match="batch_size"):
        colbert_encoder.encode_document(["x"], batch_size=0)
    with pytest.raises(InvalidInputError, match="top_k"):
        colbert_encoder.rerank("q", ["a"], top_k=0)


def test_pylate_queries_match_the_reference(colbert_gguf, colbert_reference, sample):
    """The attention-key-mask patch: expansion pads in the conv, masked as keys, exactly as PyLate."""
    require_patch("attention-key-mask")
    with lfm2edge.load(colbert_gguf, n_threads=2) as enc:
        assert enc.key_mask_supported  # llama_set_attn_key_mask is in the library
        assert enc.query_expansion == "pylate"  # the default where the build supports it
        texts = all_texts(sample)
        ours = enc.encode_query(texts)
        theirs = colbert_reference.encode_query(texts, expansion="pylate")
        attended = colbert_reference.encode_query(texts[:5], expansion="attended")
        for text, a, b in zip(texts, ours, theirs, strict=True):
            assert a.shape == b.shape == (enc.settings.query_length, enc.dim), text
            assert row_cosines(a, b).min() >= 0.9999, text
        # and it is not the attended computation
        assert min(row_cosines(a, b).min() for a, b in zip(ours[:5], attended, strict=True)) < 0.999
        # batch-invariant with the mask too
        again = enc.encode_query(texts[::-1], batch_size=7)[::-1]
        assert all(np.allclose(a, b, atol=1e-6) for a, b in zip(ours, again, strict=True))


def test_stock_build_falls_back_from_pylate(colbert_gguf, colbert_encoder):
    if colbert_encoder.key_mask_supported:
        pytest.skip("this build carries the attention-key-mask patch")
    with pytest.raises(FeatureUnavailableError, match="attention-key-mask patch"):
        lfm2edge.load(colbert_gguf, query_expansion="pylate")
    assert colbert_encoder.query_expansion == "attended"


# --- MaxSim and rerank ------------------------------------------------------------------


def test_maxsim_equals_pylate_for_float32_and_float16():
    rng = np.random.default_rng(0)
    q = rng.standard_normal((32, 16)).astype(np.float32)
    docs = [rng.standard_normal((int(n), 16)).astype(np.float32) for n in rng.integers(1, 40, 300)]
    expected = pylate_maxsim(q, docs)
    assert np.allclose(maxsim(q, docs), expected, rtol=1e-5, atol=1e-4)
    half = PackedDocuments.pack(docs, np.float16)
    assert half.vectors.dtype == np.float16
    expected_half = pylate_maxsim(q, [d.astype(np.float16).astype(np.float32) for d in docs])
    assert np.allclose(maxsim(q, half), expected_half, rtol=1e-5, atol=1e-4)


def test_maxsim_blocks_cover_every_document(monkeypatch):
    import lfm2edge.runtime.core.maxsim as m

    monkeypatch.setattr(m, "BLOCK_TOKENS", 7)  # forces many blocks, some smaller than a document
    rng = np.random.default_rng(1)
    q = rng.standard_normal((4, 8)).astype(np.float32)
    docs = [rng.standard_normal((int(n), 8)).astype(np.float32) for n in rng.integers(1, 20, 50)]
    assert np.allclose(m.maxsim(q, docs, backend="numpy"), pylate_maxsim(q, docs), rtol=1e-5, atol=1e-4)


def test_maxsim_rejects_bad_shapes():
    with pytest.raises(InvalidInputError, match="dims"):
        maxsim(np.zeros((2, 4)), [np.zeros((3, 5))])
    with pytest.raises(InvalidInputError, match="no vectors"):
        maxsim(np.zeros((2, 4)), [np.zeros((0, 4))])
    assert maxsim(np.zeros((2, 4)), []).shape == (0,)


@pytest.mark.parametrize("kind", ["colbert", "embedding"])
def test_rerank_orders_by_score(kind, sample, request):
    enc = request.getfixturevalue(f"{kind}_encoder")
    query, docs = sample[0][0], sample[1][:15]
    ranking = enc.rerank(query, docs, top_k=5)
    assert len(ranking.indices) == 5
    assert np.all(np.diff(ranking.scores) <= 0)
    scores = enc.similarity(enc.encode_query(query), enc.encode_document(docs))
    assert np.array_equal(ranking.indices, np.argsort(-scores, kind="stable")[:5])


def test_extra_buffers_can_be_switched_off(colbert_gguf):
    # llama.cpp's CPU extra buffer types (AMX, repack) off: the plain kernels, the same vectors (f32 weights).
    with lfm2edge.load(colbert_gguf, n_threads=1, extra_buffers=False) as off, \
            lfm2edge.load(colbert_gguf, n_threads=1) as default:
        assert off.extra_buffers is False and isinstance(default.extra_buffers, bool)
        np.testing.assert_allclose(off.encode_query("reset my password"), default.encode_query("reset my password"),
                                   atol=1e-5)


def test_openmp_spin_is_shortened_unless_the_user_set_it():
    import os
    import subprocess
    import sys

    code = "import lfm2edge, os; print(os.environ['GOMP_SPINCOUNT'])"
    env = {k: v for k, v in os.environ.items() if k != "GOMP_SPINCOUNT"}
    assert subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          check=True).stdout.strip() == "20000"
    env["GOMP_SPINCOUNT"] = "5"
    assert subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          check=True).stdout.strip() == "5"
