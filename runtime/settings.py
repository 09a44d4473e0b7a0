"""Retrieval settings: how a model turns texts into vectors and scores them.

The converter writes these into the GGUF under the ``lfm2edge.`` key namespace so that one
file is the whole model for an app; the runtime reads them back. A GGUF without them
(Liquid's official files, upstream conversions) gets the published defaults below.

Keys (all optional, written together; ``lfm2edge.settings_version`` marks their presence):

| key | GGUF type | meaning |
|---|---|---|
| lfm2edge.settings_version | uint32 | 1 |
| lfm2edge.kind | string | "dense" or "late_interaction" |
| lfm2edge.query_prefix / document_prefix | string | prompt text ("query: ") or marker token text ("[Q] ") |
| lfm2edge.query_prefix_id / document_prefix_id | int32 | marker id inserted after BOS; -1: prefix is prepended as text |
| lfm2edge.query_length / document_length | uint32 | token limits, BOS and marker included |
| lfm2edge.do_query_expansion | bool | pad queries to query_length with the expansion token |
| lfm2edge.attend_to_expansion_tokens | bool | whether the pads are attention keys (PyLate: false) |
| lfm2edge.expansion_token_id | int32 | the pad id of query expansion (EOS, 7) |
| lfm2edge.skiplist_ids | int32 array | standalone token ids dropped from documents |
| lfm2edge.similarity | string | "cosine" or "maxsim" |
| lfm2edge.normalize | bool | L2-normalise the outputs |
| lfm2edge.source | string | where the weights came from (repo id or folder, and revision) |
"""

from __future__ import annotations

import enum
import string
from dataclasses import dataclass, field

import numpy as np

NAMESPACE = "lfm2edge."
SETTINGS_VERSION = 1


class ModelKind(enum.StrEnum):
    DENSE = "dense"
    LATE_INTERACTION = "late_interaction"


class Similarity(enum.StrEnum):
    COSINE = "cosine"
    MAXSIM = "maxsim"


class Key:
    """GGUF metadata key names of the lfm2edge namespace."""

    SETTINGS_VERSION = NAMESPACE + "settings_version"
    KIND = NAMESPACE + "kind"
    QUERY_PREFIX = NAMESPACE + "query_prefix"
    DOCUMENT_PREFIX = NAMESPACE + "document_prefix"
    QUERY_PREFIX_ID = NAMESPACE + "query_prefix_id"
    DOCUMENT_PREFIX_ID = NAMESPACE + "document_prefix_id"
    QUERY_LENGTH = NAMESPACE + "query_length"
    DOCUMENT_LENGTH = NAMESPACE + "document_length"
    DO_QUERY_EXPANSION = NAMESPACE + "do_query_expansion"
    ATTEND_TO_EXPANSION_TOKENS = NAMESPACE + "attend_to_expansion_tokens"
    EXPANSION_TOKEN_ID = NAMESPACE + "expansion_token_id"
    SKIPLIST_IDS = NAMESPACE + "skiplist_ids"
    SIMILARITY = NAMESPACE + "similarity"
    NORMALIZE = NAMESPACE + "normalize"
    SOURCE = NAMESPACE + "source"


# PyLate's default skiplist: the 32 characters of string.punctuation, matched by token id.
SKIPLIST_WORDS = tuple(string.punctuation)
# LFM2's byte-level vocabulary puts printable ASCII at code point + 477 (so "!" is 510).
LFM2_BYTE_OFFSET = 477
EOS_ID = 7


@dataclass(frozen=True)
class RetrievalSettings:
    kind: ModelKind
    query_prefix: str
    document_prefix: str
    # ColBERT inserts marker ids right after BOS; None means the prefix is prepended as text.
    query_prefix_id: int | None
    document_prefix_id: int | None
    query_length: int
    document_length: int
    do_query_expansion: bool = False
    attend_to_expansion_tokens: bool = False
    expansion_token_id: int = EOS_ID
    skiplist_ids: tuple[int, ...] = field(default_factory=tuple)
    similarity: Similarity = Similarity.COSINE
    normalize: bool = True
    source: str = ""

    @property
    def is_colbert(self) -> bool:
        return self.kind is ModelKind.LATE_INTERACTION

    def skiplist_array(self) -> np.ndarray:
        return np.asarray(self.skiplist_ids, dtype=np.int32)


def default_skiplist_ids() -> tuple[int, ...]:
    """Ids of the standalone punctuation bytes in LFM2's vocabulary (510-524, 535-541, ...)."""
    return tuple(sorted(ord(c) + LFM2_BYTE_OFFSET for c in SKIPLIST_WORDS))


def embedding_defaults(source: str = "") -> RetrievalSettings:
    """LFM2.5-Embedding-350M as published: prompts, 512 tokens, CLS, cosine."""
    return RetrievalSettings(
        kind=ModelKind.DENSE,
        query_prefix="query: ",
        document_prefix="document: ",
        query_prefix_id=None,
        document_prefix_id=None,
        query_length=512,
        document_length=512,
        similarity=Similarity.COSINE,
        source=source,
    )


def colbert_defaults(source: str = "") -> RetrievalSettings:
    """LFM2.5-ColBERT-350M as published (PyLate): [Q]/[D] markers, 32/512 tokens, MaxSim."""
    return RetrievalSettings(
        kind=ModelKind.LATE_INTERACTION,
        query_prefix="[Q] ",
        document_prefix="[D] ",
        query_prefix_id=64400,
        document_prefix_id=64401,
        query_length=32,
        document_length=512,
        do_query_expansion=True,
        attend_to_expansion_tokens=False,
        expansion_token_id=EOS_ID,
        skiplist_ids=default_skiplist_ids(),
        similarity=Similarity.MAXSIM,
        source=source,
    )


def to_metadata(s: RetrievalSettings) -> dict[str, object]:
    """The GGUF key/value pairs for these settings (ints, bools, strings, int32 arrays)."""
    return {
        Key.SETTINGS_VERSION: SETTINGS_VERSION,
        Key.KIND: s.kind.value,
        Key.QUERY_PREFIX: s.query_prefix,
        Key.DOCUMENT_PREFIX: s.document_prefix,
        Key.QUERY_PREFIX_ID: -1 if s.query_prefix_id is None else s.query_prefix_id,
        Key.DOCUMENT_PREFIX_ID: -1 if s.document_prefix_id is None else s.document_prefix_id,
        Key.QUERY_LENGTH: s.query_length,
        Key.DOCUMENT_LENGTH: s.document_length,
        Key.DO_QUERY_EXPANSION: s.do_query_expansion,
        Key.ATTEND_TO_EXPANSION_TOKENS: s.attend_to_expansion_tokens,
        Key.EXPANSION_TOKEN_ID: s.expansion_token_id,
        Key.SKIPLIST_IDS: s.skiplist_array(),
        Key.SIMILARITY: s.similarity.value,
        Key.NORMALIZE: s.normalize,
        Key.SOURCE: s.source,
    }


def from_metadata(meta: dict[str, object]) -> RetrievalSettings | None:
    """Settings stored in a GGUF's metadata, or None when the file has none of ours."""
    if Key.SETTINGS_VERSION not in meta:
        return None

    def opt_id(key: str) -> int | None:
        value = int(meta[key])  # type: ignore[arg-type]
        return None if value < 0 else value

    return RetrievalSettings(
        kind=ModelKind(str(meta[Key.KIND])),
        query_prefix=str(meta[Key.QUERY_PREFIX]),
        document_prefix=str(meta[Key.DOCUMENT_PREFIX]),
        query_prefix_id=opt_id(Key.QUERY_PREFIX_ID),
        document_prefix_id=opt_id(Key.DOCUMENT_PREFIX_ID),
        query_length=int(meta[Key.QUERY_LENGTH]),  # type: ignore[arg-type]
        document_length=int(meta[Key.DOCUMENT_LENGTH]),  # type: ignore[arg-type]
        do_query_expansion=bool(meta[Key.DO_QUERY_EXPANSION]),
        attend_to_expansion_tokens=bool(meta[Key.ATTEND_TO_EXPANSION_TOKENS]),
        expansion_token_id=int(meta[Key.EXPANSION_TOKEN_ID]),  # type: ignore[arg-type]
        # an empty array is not written (dense models): absent means no skiplist
        skiplist_ids=tuple(int(i) for i in np.asarray(meta.get(Key.SKIPLIST_IDS, ())).ravel()),
        similarity=Similarity(str(meta[Key.SIMILARITY])),
        normalize=bool(meta[Key.NORMALIZE]),
        source=str(meta.get(Key.SOURCE, "")),
    )
