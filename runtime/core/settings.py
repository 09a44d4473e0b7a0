"""Retrieval settings: how a model turns texts into vectors and scores them.

The converter writes these into the GGUF under the ``lfm2edge.`` key namespace so that one
file is the whole model for an app; the runtime reads them back. A GGUF without them
(Liquid's official files, upstream conversions) gets the published defaults below.

Keys (all optional, written together; ``lfm2edge.settings_version`` marks their presence):

| key | GGUF type | meaning |
|---|---|---|
| lfm2edge.settings_version | uint32 | 2 (1 is read too) |
| lfm2edge.kind | string | "dense" or "late_interaction" |
| lfm2edge.query_prefix / document_prefix | string | prompt text ("query: ") or marker token text ("[Q] ") |
| lfm2edge.query_prefix_id / document_prefix_id | int32 | marker id inserted after BOS; -1: prefix is prepended as text |
| lfm2edge.query_length / document_length | uint32 | token limits, BOS and marker included: 4 to 8,192, at most the context length |
| lfm2edge.do_query_expansion | bool | pad queries to query_length with the expansion token |
| lfm2edge.attend_to_expansion_tokens | bool | whether the pads are attention keys (PyLate: false) |
| lfm2edge.expansion_token_id | int32 | the pad id of query expansion (EOS, 7) |
| lfm2edge.skiplist_ids | int32 array | standalone token ids dropped from documents |
| lfm2edge.normalize | bool | L2-normalise the outputs |
| lfm2edge.source | string | where the weights came from: the hub id (and revision) or the folder's name |
| lfm2edge.architecture | string | the checkpoint's HF architecture (Lfm2BidirectionalModel, ...) |

How a model scores is not a setting: its kind decides (dense: cosine of the CLS vectors; ColBERT:
MaxSim over the token vectors). Version 1 files also carry ``lfm2edge.similarity``, which always
said the same; it is read as an unknown key would be: ignored, whatever it holds.

``SETTINGS`` below is the one table of these keys (GGUF type, bounds, choices): the converter
writes from it and the runtime reads and checks every key against it, so a tampered value
is a ModelFileError naming the key, never a KeyError or a crash later. Lengths are bounded
by ``MAX_SEQUENCE_TOKENS`` (and the model's context length): the encoder sizes its llama.cpp
context from them. Ids must lie inside the vocabulary.
"""

from __future__ import annotations

import enum
import string
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from lfm2edge.runtime.core.errors import ModelFileError
from lfm2edge.runtime.core.gguf_file import GGUFType

NAMESPACE = "lfm2edge."
# 2: lfm2edge.similarity is no longer written (an older lfm2edge, which requires it, then asks
# for an upgrade instead of naming a missing key); version 1 files are read as before.
SETTINGS_VERSION = 2
# Query and document lengths (tokens, BOS and marker included): room for BOS, a marker and
# some text at least; at most what one llama.cpp context is sized for without surprises.
MIN_SEQUENCE_TOKENS = 4
MAX_SEQUENCE_TOKENS = 8192
MAX_PREFIX_CHARS = 1024
REMEDY = "re-convert the checkpoint with `lfm2edge convert`"


class ModelKind(enum.StrEnum):
    DENSE = "dense"
    LATE_INTERACTION = "late_interaction"


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
    NORMALIZE = NAMESPACE + "normalize"
    SOURCE = NAMESPACE + "source"
    ARCHITECTURE = NAMESPACE + "architecture"


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


def skiplist_ids_from_vocabulary(tokens: Sequence[str]) -> tuple[int, ...]:
    """The ids whose token is one of ``SKIPLIST_WORDS``, as PyLate maps them (``convert_tokens_to_ids``).

    A byte-level vocabulary spells printable ASCII as itself, so this is the token list looked up; on
    LFM2's layout it gives ``default_skiplist_ids()``, elsewhere the ids that vocabulary really has.
    """
    words = frozenset(SKIPLIST_WORDS)
    return tuple(i for i, token in enumerate(tokens) if token in words)


def embedding_defaults(source: str = "") -> RetrievalSettings:
    """LFM2.5-Embedding-350M as published: prompts, 512 tokens, CLS (scored by cosine)."""
    return RetrievalSettings(
        kind=ModelKind.DENSE,
        query_prefix="query: ",
        document_prefix="document: ",
        query_prefix_id=None,
        document_prefix_id=None,
        query_length=512,
        document_length=512,
        source=source,
    )


def colbert_defaults(source: str = "") -> RetrievalSettings:
    """LFM2.5-ColBERT-350M as published (PyLate): [Q]/[D] markers, 32/512 tokens (scored by MaxSim)."""
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
        source=source,
    )


@dataclass(frozen=True)
class Setting:
    """One lfm2edge.* key: how it is stored and which values are valid."""

    key: str
    gguf_type: GGUFType  # ARRAY: an array of int32
    required: bool = True
    low: int | None = None
    high: int | None = None  # for strings: the most characters
    choices: tuple[str, ...] = ()
    token_id: bool = False  # must name a token of the vocabulary (or be -1 where low is -1)

    def problem(self, value: object, n_vocab: int | None) -> str | None:
        """What is wrong with ``value`` for this key, or None."""
        if self.gguf_type is GGUFType.STRING:
            text = str(value)
            if self.choices and text not in self.choices:
                return f"{self.key} is {_show(value)}; it must be one of {', '.join(map(repr, self.choices))}"
            if self.high is not None and len(text) > self.high:
                return f"{self.key} has {len(text):,} characters; at most {self.high:,} are allowed"
            return None
        if self.gguf_type is GGUFType.BOOL:
            return None
        values = [int(v) for v in np.asarray(value).ravel()]
        for v in values:
            if (self.low is not None and v < self.low) or (self.high is not None and v > self.high):
                return f"{self.key} is {_show(value)}; it must be between {self.low} and {self.high}"
            if self.token_id and n_vocab is not None and v >= n_vocab and not (v == -1 == self.low):
                where = "holds" if len(values) > 1 else "is"
                return (f"{self.key} {where} token id {v}, outside the vocabulary of {n_vocab:,} tokens "
                        f"(ids 0 to {n_vocab - 1})")
        return None


_I32_MAX = 2**31 - 1
SETTINGS: tuple[Setting, ...] = (
    Setting(Key.SETTINGS_VERSION, GGUFType.UINT32, low=1, high=SETTINGS_VERSION),
    Setting(Key.KIND, GGUFType.STRING, choices=tuple(k.value for k in ModelKind)),
    Setting(Key.QUERY_PREFIX, GGUFType.STRING, high=MAX_PREFIX_CHARS),
    Setting(Key.DOCUMENT_PREFIX, GGUFType.STRING, high=MAX_PREFIX_CHARS),
    Setting(Key.QUERY_PREFIX_ID, GGUFType.INT32, low=-1, high=_I32_MAX, token_id=True),
    Setting(Key.DOCUMENT_PREFIX_ID, GGUFType.INT32, low=-1, high=_I32_MAX, token_id=True),
    Setting(Key.QUERY_LENGTH, GGUFType.UINT32, low=MIN_SEQUENCE_TOKENS, high=MAX_SEQUENCE_TOKENS),
    Setting(Key.DOCUMENT_LENGTH, GGUFType.UINT32, low=MIN_SEQUENCE_TOKENS, high=MAX_SEQUENCE_TOKENS),
    Setting(Key.DO_QUERY_EXPANSION, GGUFType.BOOL),
    Setting(Key.ATTEND_TO_EXPANSION_TOKENS, GGUFType.BOOL),
    Setting(Key.EXPANSION_TOKEN_ID, GGUFType.INT32, low=0, high=_I32_MAX, token_id=True),
    # an empty skiplist is not written (GGUF arrays are not empty): absent means none
    Setting(Key.SKIPLIST_IDS, GGUFType.ARRAY, required=False, low=0, high=_I32_MAX, token_id=True),
    Setting(Key.NORMALIZE, GGUFType.BOOL),
    Setting(Key.SOURCE, GGUFType.STRING, required=False),
    Setting(Key.ARCHITECTURE, GGUFType.STRING, required=False),
)
SETTINGS_BY_KEY = {s.key: s for s in SETTINGS}


def _show(value: object) -> str:
    if isinstance(value, np.ndarray):
        return f"[{', '.join(str(v) for v in value.ravel()[:8].tolist())}{', ...' if value.size > 8 else ''}]"
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def to_metadata(s: RetrievalSettings) -> dict[str, object]:
    """The GGUF key/value pairs for these settings; ``SETTINGS`` gives each key's GGUF type."""
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
        Key.NORMALIZE: s.normalize,
        Key.SOURCE: s.source,
    }


def check_values(values: dict[str, object], n_vocab: int | None, n_ctx: int | None) -> list[str]:
    """Every problem with these lfm2edge.* values (as ``to_metadata`` gives them), each naming its key.

    ``n_vocab`` bounds the ids, ``n_ctx`` (the model's context length) the lengths; None skips that check.
    """
    found = []
    version = values.get(Key.SETTINGS_VERSION)
    if isinstance(version, int) and not isinstance(version, bool) and version > SETTINGS_VERSION:
        return [f"{Key.SETTINGS_VERSION} is {version}: the file was written by a newer lfm2edge (this one "
                f"reads version {SETTINGS_VERSION}); upgrade lfm2edge"]
    for key, value in values.items():
        setting = SETTINGS_BY_KEY.get(key)
        problem = setting.problem(value, n_vocab) if setting is not None else None
        if problem:
            found.append(problem)
    if found:
        return found
    for key in (Key.QUERY_LENGTH, Key.DOCUMENT_LENGTH):
        if n_ctx is not None and int(values[key]) > n_ctx:  # type: ignore[call-overload]
            found.append(f"{key} is {values[key]}, longer than the model's context length ({n_ctx})")
    kind = values[Key.KIND]
    if kind == ModelKind.LATE_INTERACTION:
        for key in (Key.QUERY_PREFIX_ID, Key.DOCUMENT_PREFIX_ID):
            if int(values[key]) < 0:  # type: ignore[call-overload]
                found.append(f"{key} is {values[key]}; a ColBERT model inserts this marker token, so it must "
                             "be a token id")
    return found


def from_metadata(
    meta: dict[str, object],
    types: dict[str, tuple[GGUFType, GGUFType | None]],
    n_vocab: int | None = None,
    n_ctx: int | None = None,
) -> RetrievalSettings | None:
    """Settings stored in a GGUF's metadata, or None when the file has none of ours.

    ``types`` is how each key is stored (``GGUFHeader.types``). Raises ModelFileError naming
    every key that is missing, of the wrong type or out of bounds, with the way out.
    """
    present = [s for s in SETTINGS if s.key in meta]
    if not present:
        return None
    found = []
    for s in SETTINGS:
        if s.key not in meta:
            if s.required:
                found.append(f"{s.key} is missing")
            continue
        vtype, etype = types.get(s.key, (None, None))
        want = (GGUFType.ARRAY, GGUFType.INT32) if s.gguf_type is GGUFType.ARRAY else (s.gguf_type, None)
        if (vtype, etype) != want:
            stored = f"array of {etype.name.lower()}" if etype is not None else str(getattr(vtype, "name", vtype)).lower()
            wanted = "array of int32" if s.gguf_type is GGUFType.ARRAY else s.gguf_type.name.lower()
            found.append(f"{s.key} is stored as {stored} ({_show(meta[s.key])}); it must be {wanted}")
    if Key.SETTINGS_VERSION not in meta:
        found = [f"{Key.SETTINGS_VERSION} is missing, but the file has other lfm2edge.* keys"] + found
    if not found:
        found = check_values({s.key: meta[s.key] for s in present}, n_vocab, n_ctx)
    if found:
        way_out = "" if any("upgrade lfm2edge" in f for f in found) else f"\nThe way out: {REMEDY}."
        raise ModelFileError("its lfm2edge retrieval settings cannot be used:\n- " + "\n- ".join(found) + way_out)

    def opt_id(key: str) -> int | None:
        value = int(meta[key])  # type: ignore[call-overload]
        return None if value < 0 else value

    return RetrievalSettings(
        kind=ModelKind(str(meta[Key.KIND])),
        query_prefix=str(meta[Key.QUERY_PREFIX]),
        document_prefix=str(meta[Key.DOCUMENT_PREFIX]),
        query_prefix_id=opt_id(Key.QUERY_PREFIX_ID),
        document_prefix_id=opt_id(Key.DOCUMENT_PREFIX_ID),
        query_length=int(meta[Key.QUERY_LENGTH]),  # type: ignore[call-overload]
        document_length=int(meta[Key.DOCUMENT_LENGTH]),  # type: ignore[call-overload]
        do_query_expansion=bool(meta[Key.DO_QUERY_EXPANSION]),
        attend_to_expansion_tokens=bool(meta[Key.ATTEND_TO_EXPANSION_TOKENS]),
        expansion_token_id=int(meta[Key.EXPANSION_TOKEN_ID]),  # type: ignore[call-overload]
        skiplist_ids=tuple(int(i) for i in np.asarray(meta.get(Key.SKIPLIST_IDS, ())).ravel()),
        normalize=bool(meta[Key.NORMALIZE]),
        source=str(meta.get(Key.SOURCE, "")),
    )
