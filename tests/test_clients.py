"""The official clients users already have, against a real ``lfm2edge serve`` on 127.0.0.1.

``openai`` (embeddings: texts and token ids, float and base64) and ``cohere`` (rerank through
``cohere.Client``, which calls /v1/rerank, and ``cohere.ClientV2``, which calls /v2/rerank). Every
client gets the server's 127.0.0.1 URL, a dummy key (the server asks none on loopback), no retries
and an HTTP client that ignores proxy settings: nothing is sent anywhere else.
"""

from __future__ import annotations

import base64
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest

from lfm2edge.runtime.core.maxsim import maxsim

from .test_server import DOCS, QUERIES, Server

cohere = pytest.importorskip("cohere")
openai = pytest.importorskip("openai")

KEY = "not-a-real-key"  # the clients insist on one; a loopback server checks none


@pytest.fixture(scope="module")
def dense_url(embedding_gguf: Path) -> Iterator[str]:
    server = Server(str(embedding_gguf))
    yield server.url
    assert server.stop() == 0, server.stderr()


@pytest.fixture(scope="module")
def colbert_url(colbert_gguf: Path) -> Iterator[str]:
    server = Server(str(colbert_gguf))
    yield server.url
    assert server.stop() == 0, server.stderr()


@pytest.fixture(scope="module")
def oai(dense_url: str):
    http = openai.DefaultHttpxClient(trust_env=False, timeout=60)
    with openai.OpenAI(base_url=dense_url + "/v1", api_key=KEY, max_retries=0, http_client=http) as client:
        yield client


def _cohere(client_class, url: str):
    http = httpx.Client(trust_env=False, timeout=60)
    return client_class(api_key=KEY, base_url=url, max_retries=0, httpx_client=http)


def _decoded_tokens(enc, texts: list[str], side: str = "document") -> int:
    """What the encoder decodes for ``texts``: BOS, prompt and text, truncated."""
    prepare = enc.prepare_query if side == "query" else enc.prepare_document
    return sum(len(prepare(t)) for t in texts)


# ----------------------------------------------------------------------------------------------------------
# openai
# ----------------------------------------------------------------------------------------------------------


def test_openai_texts_float_and_base64(oai, embedding_encoder):
    texts = DOCS[:4]
    want = embedding_encoder.encode_document(texts)
    floats = oai.embeddings.create(model="lfm2", input=texts, encoding_format="float")
    assert [d.index for d in floats.data] == [0, 1, 2, 3] and floats.model == "lfm2"
    assert np.allclose([d.embedding for d in floats.data], want, atol=1e-5)
    tokens = _decoded_tokens(embedding_encoder, texts)
    assert floats.usage.prompt_tokens == floats.usage.total_tokens == tokens

    # Without encoding_format the client asks for base64 and decodes it itself.
    default = oai.embeddings.create(model="lfm2", input=texts)
    assert np.allclose([d.embedding for d in default.data], want, atol=1e-5)
    raw = oai.embeddings.create(model="lfm2", input=texts[0], encoding_format="base64")
    vector = np.frombuffer(base64.b64decode(raw.data[0].embedding), dtype="<f4")
    assert np.allclose(vector, want[0], atol=1e-5)


def test_openai_token_ids(oai, embedding_encoder):
    texts = [DOCS[5], QUERIES[3]]
    ids = [embedding_encoder.tokenize(t)[1:].tolist() for t in texts]  # without BOS: the server adds it
    many = oai.embeddings.create(model="lfm2", input=ids, encoding_format="float")
    assert np.allclose([d.embedding for d in many.data], embedding_encoder.encode_document(texts), atol=1e-5)
    assert many.usage.prompt_tokens == _decoded_tokens(embedding_encoder, texts)
    one = oai.embeddings.create(model="lfm2", input=ids[1], encoding_format="base64")
    vector = np.frombuffer(base64.b64decode(one.data[0].embedding), dtype="<f4")
    assert np.allclose(vector, embedding_encoder.encode_document(texts[1]), atol=1e-5)

    with pytest.raises(openai.BadRequestError, match="input\\[0\\]\\[1\\] is token id 99999999"):
        oai.embeddings.create(model="lfm2", input=[[ids[0][0], 99_999_999]])


def test_openai_queries_through_extra_body(oai, embedding_encoder):
    q = QUERIES[0]
    as_query = oai.embeddings.create(model="lfm2", input=q, extra_body={"input_type": "query"})
    plain = oai.embeddings.create(model="lfm2", input=q)  # what every OpenAI client sends: the document side
    assert np.allclose(as_query.data[0].embedding, embedding_encoder.encode_query(q), atol=1e-5)
    assert np.allclose(plain.data[0].embedding, embedding_encoder.encode_document(q), atol=1e-5)
    assert as_query.usage.prompt_tokens == _decoded_tokens(embedding_encoder, [q], "query")


# ----------------------------------------------------------------------------------------------------------
# cohere
# ----------------------------------------------------------------------------------------------------------


def _raw_scores(enc, query: str, docs: list[str]) -> np.ndarray:
    if enc.kind.value == "late_interaction":
        return maxsim(enc.encode_query(query), enc.encode_document(docs))
    return enc.similarity(enc.encode_query(query), enc.encode_document(docs))


def _check_results(results, raw: np.ndarray, top_n: int) -> None:
    """Results parsed, relevance in [0, 1] and in the order of the raw scores."""
    assert len(results) == top_n
    order = np.argsort(-raw, kind="stable")
    relevance = [r.relevance_score for r in results]
    assert all(0.0 <= x <= 1.0 for x in relevance) and relevance == sorted(relevance, reverse=True)
    scores = [r.score for r in results]  # the raw score, an extra field both clients keep
    assert np.allclose(scores, raw[[r.index for r in results]], atol=1e-4)
    assert np.allclose(scores, raw[order[:top_n]], atol=1e-4)  # the best raw scores, best first


@pytest.mark.parametrize("kind", ["colbert", "dense"])
def test_cohere_v1_client(kind, colbert_url, dense_url, colbert_encoder, embedding_encoder):
    url, enc = (colbert_url, colbert_encoder) if kind == "colbert" else (dense_url, embedding_encoder)
    docs = DOCS[10:30]
    client = _cohere(cohere.Client, url)
    r = client.rerank(model="rerank-v3.5", query=QUERIES[4], documents=docs, top_n=5, return_documents=True)
    _check_results(r.results, _raw_scores(enc, QUERIES[4], docs), 5)
    assert [x.document.text for x in r.results] == [docs[x.index] for x in r.results]
    assert r.meta.api_version.version == "1" and r.meta.billed_units.search_units == 1 and r.id


@pytest.mark.parametrize("kind", ["colbert", "dense"])
def test_cohere_v2_client(kind, colbert_url, dense_url, colbert_encoder, embedding_encoder):
    url, enc = (colbert_url, colbert_encoder) if kind == "colbert" else (dense_url, embedding_encoder)
    docs = DOCS[30:50]
    client = _cohere(cohere.ClientV2, url)
    r = client.rerank(model="rerank-v3.5", query=QUERIES[5], documents=docs, top_n=7)
    _check_results(r.results, _raw_scores(enc, QUERIES[5], docs), 7)
    assert r.meta.api_version.version == "2" and r.meta.billed_units.search_units == 1 and r.id
    assert r.usage["total_tokens"] > len(docs)  # Jina's field, kept as an extra

    with pytest.raises(cohere.errors.BadRequestError):
        client.rerank(model="rerank-v3.5", query=" ", documents=docs)
