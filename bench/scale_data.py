"""Catalog-like ColBERT vectors with the structure real ones have, generated in chunks.

Random unit vectors have no neighbours worth finding, and a random-weight model's outputs over a few
thousand texts cannot fill a million-document collection, so the scale bench uses this generator
(say so wherever its numbers appear). The structure it imitates is a bag of contextual words:

- ``topics`` unit centres; ``words`` word vectors, each near one topic's centre;
- a document picks a topic (and a second one for some of its words) and draws its tokens from those
  topics' words (Zipf-ranked) and from a shared pool of common words (function words, units, brand
  names); each token is its word's vector plus a little context noise, renormalised;
- a query picks a target document and draws most of its tokens from the target's own words, the rest
  from the topic, with the same noise: its best match is usually, not always, its target.

Everything is a function of (seed, chunk), so any chunk can be regenerated without the others and a
million documents never have to sit in memory at once.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

DIM = 128


@dataclass(frozen=True)
class CatalogSpec:
    documents: int
    tokens: int = 32  # per document
    query_tokens: int = 32  # ColBERT queries are expanded to 32 tokens
    topics: int = 2_000
    words_per_topic: int = 40
    common_words: int = 500
    common_share: float = 0.3  # of a document's tokens
    second_topic_share: float = 0.3  # of its topical tokens, from a second topic (products span categories)
    word_spread: float = 0.8  # how far a word sits from its topic centre
    context_noise: float = 0.4  # per-token variation of a word's vector
    seed: int = 0
    chunk: int = 10_000  # documents per generated chunk


class Catalog:
    """The vocabulary of a ``CatalogSpec``; ``chunk(i)`` and ``queries(n)`` draw from it."""

    def __init__(self, spec: CatalogSpec):
        self.spec = spec
        rng = np.random.default_rng([spec.seed, 0])
        centres = _unit(rng.standard_normal((spec.topics, DIM)))
        topic_words = centres.repeat(spec.words_per_topic, axis=0)
        topic_words = _unit(topic_words + spec.word_spread * _unit(rng.standard_normal(topic_words.shape)))
        self.words = np.concatenate([topic_words, _unit(rng.standard_normal((spec.common_words, DIM)))])
        self.words = self.words.astype(np.float32)
        ranks = np.arange(1, spec.words_per_topic + 1)
        self._topic_p = (1 / ranks) / (1 / ranks).sum()
        ranks = np.arange(1, spec.common_words + 1)
        self._common_p = (1 / ranks) / (1 / ranks).sum()

    @property
    def chunks(self) -> int:
        return -(-self.spec.documents // self.spec.chunk)

    def chunk(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """Documents ``i * chunk ...`` as (token vectors [docs, tokens, DIM] float32, word ids [docs, tokens])."""
        words = self.chunk_words(i)
        return self._tokens(np.random.default_rng([self.spec.seed, 3, i]), words), words

    def chunk_words(self, i: int) -> np.ndarray:
        """The word ids of chunk ``i`` (cheap: no vectors)."""
        s = self.spec
        n = min(s.chunk, s.documents - i * s.chunk)
        rng = np.random.default_rng([s.seed, 1, i])
        return self._draw_words(rng, rng.integers(0, s.topics, n), s.tokens)

    def queries(self, n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """``n`` queries as (token vectors [n, query_tokens, DIM], target document numbers [n])."""
        s = self.spec
        rng = np.random.default_rng([s.seed, 2, seed])
        targets = rng.integers(0, s.documents, n)
        words = np.empty((n, s.query_tokens), dtype=np.int64)
        cached: dict[int, np.ndarray] = {}
        for q, target in enumerate(targets):
            c = int(target) // s.chunk
            if c not in cached:
                cached[c] = self.chunk_words(c)
            own = cached[c][int(target) % s.chunk]
            topic = int(own[0]) // s.words_per_topic if own[0] < s.topics * s.words_per_topic else 0
            n_own = int(0.6 * s.query_tokens)
            words[q, :n_own] = rng.choice(own, n_own)
            words[q, n_own:] = topic * s.words_per_topic + rng.choice(
                s.words_per_topic, s.query_tokens - n_own, p=self._topic_p
            )
        return self._tokens(rng, words), targets

    def _draw_words(self, rng: np.random.Generator, topics: np.ndarray, tokens: int) -> np.ndarray:
        s = self.spec
        n_common = int(round(s.common_share * tokens))
        n_topical = tokens - n_common
        n_second = int(s.second_topic_share * n_topical)
        seconds = rng.integers(0, s.topics, len(topics))
        owner = np.concatenate(
            [np.repeat(topics[:, None], n_topical - n_second, 1), np.repeat(seconds[:, None], n_second, 1)], axis=1
        )
        topical = owner * s.words_per_topic + rng.choice(s.words_per_topic, owner.shape, p=self._topic_p)
        common = s.topics * s.words_per_topic + rng.choice(s.common_words, (len(topics), n_common), p=self._common_p)
        # topical words first: a document's first token names its topic (queries() relies on it)
        return np.concatenate([topical, common], axis=1)

    def _tokens(self, rng: np.random.Generator, words: np.ndarray) -> np.ndarray:
        noise = rng.standard_normal((*words.shape, DIM), dtype=np.float32)
        # noise of norm about context_noise around each word's unit vector
        return _unit(self.words[words] + (self.spec.context_noise / np.sqrt(DIM)) * noise)


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)
