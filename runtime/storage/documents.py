"""What an index stores per document, whichever engine holds it: the checks on ids, metadata and vectors,
the model's identity, the settings fixed at creation and the hits a search returns.

Both engines (the exact index, ``lfm2edge.runtime.storage.index``, and Qdrant,
``lfm2edge.runtime.storage.qdrant_index``) take their input through these checks, so the same bad input
gets the same error from either.
"""

from __future__ import annotations

import json
import weakref
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from lfm2edge.runtime.core.errors import EncoderClosedError, InvalidInputError
from lfm2edge.runtime.core.settings import ModelKind
from lfm2edge.runtime.core.text import check_text

# Per-document limits. Metadata comes back with every hit, so it must stay small and shallow enough
# for any JSON encoder (a server's default nesting limits are far below Python's): an app that
# needs more stores it elsewhere and keeps a reference here. The server passes its own limits.
MAX_METADATA_DEPTH = 32
MAX_METADATA_BYTES = 64 * 1024
MAX_ID_CHARS = 1024


class IndexModelMismatchError(InvalidInputError):
    """The index was built by another model; its vectors are meaningless to this one."""


class DuplicateIdError(InvalidInputError):
    """An id being added is already in the index (or repeated in the same call)."""


@dataclass(frozen=True)
class IndexSettings:
    """What an index holds and how; fixed when it is created."""

    identity: str  # the GGUF identity hash (tensors and retrieval settings)
    kind: ModelKind
    dim: int
    dtype: str = "float16"  # "float16" | "int8"
    pool_factor: int = 1  # ColBERT token pooling: keep about 1/pool_factor of each document's vectors
    store_texts: bool = True
    model_path: str = ""  # where the model was when the index was created: a hint, not checked


@dataclass(frozen=True)
class Hit:
    id: str
    score: float
    text: str | None
    metadata: Mapping[str, Any] | None


@dataclass(frozen=True)
class StoredDocument:
    """One document as an index holds it: what ``documents()`` yields and ``add_vectors`` takes."""

    id: str
    vectors: np.ndarray  # float32 [tokens, dim] (ColBERT) or [dim] (dense)
    text: str | None
    metadata: Mapping[str, Any] | None


_IDENTITIES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def model_identity(encoder) -> str:
    """The encoder's GGUF identity, hashed once per encoder (it reads the whole file). A load option that
    runs the weights on another kernel (``encoder.weight_kernel``: split_f32, dynamic_int8, ozaki_f32) gives other
    vectors, so it is part of the identity: an index built one way refuses queries encoded the other."""
    if encoder not in _IDENTITIES:
        identity = encoder.model_file.header.identity()
        _IDENTITIES[encoder] = with_weight_kernel(identity, getattr(encoder, "weight_kernel", None))
    return _IDENTITIES[encoder]


def with_weight_kernel(file_identity: str, weight_kernel: str | None) -> str:
    """The model identity of the GGUF ``file_identity`` loaded with the load option ``weight_kernel``."""
    return f"{file_identity}+{weight_kernel}" if weight_kernel else file_identity


def recorded_weight_kernel(identity: str | None) -> str | None:
    """The load option a model identity carries (``with_weight_kernel``'s "+option"), or None."""
    return (identity or "").partition("+")[2] or None


def check_ids(ids: object, n: int) -> list[str]:
    """The ids of ``n`` documents as a list, or InvalidInputError naming the first bad one."""
    if isinstance(ids, str):
        ids = [ids]
    if isinstance(ids, (bytes, bytearray)) or not isinstance(ids, (Sequence, np.ndarray)):
        raise InvalidInputError(f"ids must be a list of strings, not {type(ids).__name__}")
    ids = list(ids)
    if len(ids) != n:
        raise InvalidInputError(f"got {n} texts but {len(ids)} ids; pass one id per text, or none")
    for i, d in enumerate(ids):
        check_id(d, f"id {i}")
    return ids


def check_id(doc_id: object, where: str) -> str:
    check_text(doc_id, where)  # a str of valid Unicode (it is written to JSON and printed), not blank
    if len(doc_id) > MAX_ID_CHARS:
        raise InvalidInputError(
            f"{where} has {len(doc_id)} characters; the id length limit is {MAX_ID_CHARS} (MAX_ID_CHARS): "
            "use a shorter key"
        )
    return doc_id


def check_metadata(
    metadata: object, n: int, max_depth: int = MAX_METADATA_DEPTH, max_bytes: int = MAX_METADATA_BYTES
) -> list[dict | None]:
    """One metadata dict (or None) per document, or InvalidInputError naming the document and the limit.

    Each must be JSON of valid Unicode, nested at most ``max_depth`` levels (``{"a": 1}`` is one) and at
    most ``max_bytes`` bytes as UTF-8 JSON. Depth and size are measured before serialising, so a
    deeply nested or huge value is refused without recursing into it or building its JSON.
    """
    if metadata is None:
        return [None] * n
    if isinstance(metadata, Mapping):
        metadata = [metadata]
    if (
        isinstance(metadata, (str, bytes, bytearray))
        or not isinstance(metadata, Sequence)
        or len(metadata) != n
    ):
        raise InvalidInputError(f"metadata must be a list of {n} dicts (or None), one per text")
    out: list[dict | None] = []
    for i, m in enumerate(metadata):
        if m is None:
            out.append(None)
            continue
        if not isinstance(m, Mapping):
            raise InvalidInputError(f"metadata {i} must be a dict or None, not {type(m).__name__}")
        depth, nodes = _nesting(m, max_depth, max_bytes)
        if depth > max_depth:
            raise InvalidInputError(
                f"metadata {i} is nested more than {max_depth} levels deep; the metadata depth limit is "
                f"{max_depth}: flatten it"
            )
        if nodes > max_bytes:  # every value takes at least one byte of JSON
            raise InvalidInputError(
                f"metadata {i} holds more than {max_bytes} values; the metadata size limit is {max_bytes} "
                "bytes of JSON per document: store large data elsewhere and keep a reference in metadata"
            )
        try:
            data = json.dumps(m, ensure_ascii=False, allow_nan=False).encode("utf-8")
        except UnicodeEncodeError as e:
            raise InvalidInputError(
                f"metadata {i} holds a string that is not valid Unicode (a lone surrogate at character "
                f"{e.start} of its JSON); decode the source with errors='replace' or remove it"
            ) from None
        except (TypeError, ValueError, RecursionError) as e:
            raise InvalidInputError(f"metadata {i} is not JSON-serialisable: {e}") from None
        if len(data) > max_bytes:
            raise InvalidInputError(
                f"metadata {i} is {len(data)} bytes of JSON; the metadata size limit is {max_bytes} bytes "
                "per document: store large data elsewhere and keep a reference in metadata"
            )
        out.append(dict(m))
    return out


def _nesting(value: object, max_depth: int, max_nodes: int) -> tuple[int, int]:
    """(deepest dict/list level, values seen) of ``value``, walked without recursion; the walk stops as soon
    as either passes its limit (so a cycle, or a huge value, costs no more than the limits)."""
    deepest, nodes, stack = 0, 0, [(value, 1)]
    while stack:
        v, depth = stack.pop()
        nodes += 1
        if isinstance(v, Mapping):
            children = v.values()
        elif isinstance(v, (list, tuple)):
            children = v
        else:
            continue
        deepest = max(deepest, depth)
        if deepest > max_depth or nodes > max_nodes:
            break
        stack.extend((c, depth + 1) for c in children)
    return deepest, nodes


def check_open_encoder(encoder) -> None:
    if getattr(encoder, "closed", False):
        raise EncoderClosedError(
            f"the encoder of {getattr(encoder, 'path', 'this model')} was closed; open the index with a "
            "loaded encoder: Index.open(path, lfm2edge.load(model_path))"
        )




def query_list(queries: object) -> list:
    if isinstance(queries, (str, bytes, bytearray)) or not isinstance(queries, (Sequence, np.ndarray)):
        raise InvalidInputError(
            f"queries must be a list of query vectors, not {type(queries).__name__}; use search() for texts"
        )
    return list(queries)


def query_array(q: object, i: int, late: bool, dim: int) -> np.ndarray:
    """Query ``i`` as a finite float32 [tokens >= 1, dim] (ColBERT) or [dim] (dense) array."""
    want = f"[tokens, {dim}]" if late else f"[{dim}]"
    try:
        a = np.asarray(q)
        ok = a.dtype.kind in "fiu"
        a = a.astype(np.float32) if ok else a
    except (TypeError, ValueError):  # ragged lists, objects numpy cannot hold
        ok = False
    if not ok:
        raise InvalidInputError(f"query {i} must be a {want} array of real numbers, got {type(q).__name__}")
    if a.ndim != (2 if late else 1) or a.shape[-1] != dim or a.size == 0 or not np.isfinite(a).all():
        raise InvalidInputError(f"query {i} must be a finite, non-empty {want} array, got shape {a.shape}")
    return a


def document_vectors(vectors: object, n: int, late: bool, dim: int) -> list[np.ndarray]:
    """``n`` documents' vectors encoded elsewhere as float32 arrays: [tokens >= 1, dim] each (ColBERT) or
    [dim] each (dense), finite; InvalidInputError names the first bad one."""
    want = f"[tokens, {dim}]" if late else f"[{dim}]"
    if isinstance(vectors, np.ndarray) and not late and vectors.ndim == 2:
        vectors = list(vectors)  # a [documents, dim] matrix of dense vectors
    if isinstance(vectors, (str, bytes, bytearray)) or not isinstance(vectors, (Sequence, np.ndarray)):
        raise InvalidInputError(f"vectors must be a list of {want} arrays, not {type(vectors).__name__}")
    vectors = list(vectors)
    if len(vectors) != n:
        raise InvalidInputError(f"got {len(vectors)} vectors for {n} ids; pass one array per document")
    out = []
    for i, v in enumerate(vectors):
        try:
            a = np.asarray(v)
            ok = a.dtype.kind in "fiu"
        except (TypeError, ValueError):  # ragged lists, objects numpy cannot hold
            ok = False
        if not ok:
            raise InvalidInputError(f"vectors {i} must be a {want} array of real numbers, got {type(v).__name__}")
        a = a.astype(np.float32)
        if a.ndim != (2 if late else 1) or a.shape[-1] != dim or a.size == 0 or not np.isfinite(a).all():
            raise InvalidInputError(f"vectors {i} must be a finite, non-empty {want} array, got shape {a.shape}")
        out.append(a)
    return out


ON_DUPLICATE: tuple[str, ...] = ("error", "skip", "replace")


def check_add_options(on_duplicate: object, commit_every: object) -> None:
    """The options ``add`` and ``add_vectors`` share, on either engine."""
    if on_duplicate not in ON_DUPLICATE:
        raise InvalidInputError(f"on_duplicate must be one of {ON_DUPLICATE}, not {on_duplicate!r}")
    if isinstance(commit_every, bool) or not isinstance(commit_every, int) or commit_every < 1:
        raise InvalidInputError(f"commit_every must be a positive integer, got {commit_every!r}")


def vectors_to_add(
    vectors: object, texts: object, metadata: object, late: bool, dim: int
) -> tuple[list[np.ndarray], list[str | None], list[dict | None]]:
    """``add_vectors``' input, checked: the vectors as float32 arrays, a text (or None) and a metadata
    dict (or None) per document."""
    from lfm2edge.runtime.core.text import check_texts

    n = len(vectors) if isinstance(vectors, (Sequence, np.ndarray)) else 0
    vecs = document_vectors(vectors, n, late, dim)
    text_list: list[str | None] = [None] * len(vecs)
    if texts is not None:
        text_list = list(check_texts(texts, "text")[0])
        if len(text_list) != len(vecs):
            raise InvalidInputError(f"got {len(vecs)} vectors but {len(text_list)} texts; pass one each")
    return vecs, text_list, check_metadata(metadata, len(vecs))


def encoder_for(encoder, what: str, opened_with: str):
    """The index's encoder for ``what`` (adding, searching), or the typed error saying how to get one."""
    if encoder is None:
        raise InvalidInputError(f"{what} needs the model: open the index with {opened_with}")
    try:
        check_open_encoder(encoder)
    except EncoderClosedError as e:
        raise EncoderClosedError(f"{what} needs the model, but {e}") from None
    return encoder
