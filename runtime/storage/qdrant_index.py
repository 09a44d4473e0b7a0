"""The index on Qdrant: the exact index's surface over an Edge shard (a folder) or a server (a URL).

    index = Index.create("docs.qdrant", encoder, backend="qdrant")        # Qdrant Edge, in-process
    index = Index.create("http://localhost:6333", encoder, backend="qdrant", collection="docs")
    index.add(texts, ids=ids, metadata=metadata)
    hits = index.search("a question", k=10, where={"lang": "en"})

Search stays fast as the collection grows: for ColBERT, HNSW over one vector per document (the unit
mean of its token vectors) finds ``candidates`` documents, and MaxSim over their stored token vectors
ranks them (``python -m lfm2edge.bench.scale`` measures recall against exact search); ``candidates=0``
scores every document instead. Dense models search HNSW directly. Scores are the exact index's: MaxSim
over float16 token vectors, or the cosine. The MaxSim rerank runs inside Qdrant (the query over the
prefetched candidates): fetching a few hundred candidates' token vectors into Python for our kernel
would cost more than Qdrant's own MaxSim over them.

An Edge shard belongs to one process at a time (a file lock says so). Each add commits every
``commit_every`` documents as one Qdrant update, flushed before ``add`` goes on to the next batch; ids
are strings, stored in the payload (the point id is their UUID5). Keep commits small: opening a shard
replays its write-ahead log in memory (one update of 10k 256-token documents took 22 GB to reopen).
"""

from __future__ import annotations

import uuid
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from filelock import FileLock, Timeout

from lfm2edge.runtime.core.errors import InvalidInputError
from lfm2edge.runtime.core.maxsim import normalize_rows
from lfm2edge.runtime.core.progress import progress_bar
from lfm2edge.runtime.core.settings import ModelKind
from lfm2edge.runtime.core.text import check_text, check_texts
from lfm2edge.runtime.storage.documents import (
    DuplicateIdError,
    Hit,
    IndexModelMismatchError,
    IndexSettings,
    StoredDocument,
    check_add_options,
    check_id,
    check_ids,
    check_metadata,
    check_open_encoder,
    encoder_for,
    model_identity,
    query_array,
    query_list,
    vectors_to_add,
)
from lfm2edge.runtime.storage.filters import check_where
from lfm2edge.runtime.storage.qdrant_engines import (
    MEAN,
    SETTINGS_FILE,
    EdgeEngine,
    Layout,
    Plan,
    ServerEngine,
    StoredPoint,
)
from lfm2edge.runtime.storage.vector_codecs import pool_tokens

FORMAT = "lfm2edge-qdrant"
FORMAT_VERSION = 1
DEFAULT_COLLECTION = "lfm2edge"
# Documents the HNSW stage hands to MaxSim. bench/scale.py measures recall@10 against exact search
# for this value on catalog-like data; raise it per search for more recall, lower it for speed.
DEFAULT_CANDIDATES = 512
MAX_CANDIDATES = 100_000
# HNSW's search breadth (ef) per candidate asked for: looking beyond the candidates kept makes it
# return the true nearest ones more often (bench/scale.py).
HNSW_EF_PER_CANDIDATE = 2


def is_location_url(location: object) -> bool:
    return isinstance(location, str) and location.startswith(("http://", "https://"))


def holds_qdrant_index(path: Path) -> bool:
    return (path / SETTINGS_FILE).is_file()


class QdrantIndex:
    """Document vectors in Qdrant; the same add/delete/search/len/ids surface as the exact ``Index``."""

    def __init__(self, engine, settings: dict, encoder=None, lock: FileLock | None = None):
        self._engine, self._settings, self._lock = engine, settings, lock
        self.encoder = encoder
        self.location = str(getattr(engine, "folder", None) or engine.where)
        self._closed = False
        try:
            self._layout = Layout(self.settings.kind is ModelKind.LATE_INTERACTION, self.settings.dim)
            _check_candidates(self.candidates)  # read by every search: a bad value is found here, not there
        except (KeyError, TypeError, ValueError) as e:  # InvalidInputError is a ValueError
            self.close()
            raise InvalidInputError(f"{self.location} holds unreadable lfm2edge settings ({e!r})") from None

    # -- opening ------------------------------------------------------------------------------------------

    @classmethod
    def create(
        cls,
        location: str | Path | Any,
        encoder,
        *,
        collection: str = DEFAULT_COLLECTION,
        pool_factor: int = 1,
        store_texts: bool = True,
        candidates: int = DEFAULT_CANDIDATES,
        api_key: str | None = None,
    ) -> QdrantIndex:
        """A new, empty index: in the folder ``location`` (Qdrant Edge), or as ``collection`` on the server
        at an http(s) URL or behind a ``QdrantClient``."""
        check_open_encoder(encoder)
        model = IndexSettings(
            identity=model_identity(encoder),
            kind=encoder.kind,
            dim=int(encoder.dim),
            pool_factor=pool_factor,
            store_texts=store_texts,
            model_path=str(Path(encoder.path).resolve()),
        )
        return cls.create_for(location, model, encoder, collection=collection, candidates=candidates, api_key=api_key)

    @classmethod
    def create_for(
        cls,
        location: str | Path | Any,
        model: IndexSettings,
        encoder=None,
        *,
        collection: str = DEFAULT_COLLECTION,
        candidates: int = DEFAULT_CANDIDATES,
        api_key: str | None = None,
    ) -> QdrantIndex:
        """A new index for the model that ``model`` describes (``index export`` copies one this way)."""
        if not isinstance(model.pool_factor, int) or model.pool_factor < 1:
            raise InvalidInputError(f"pool_factor must be a positive integer, not {model.pool_factor!r}")
        if model.pool_factor > 1 and model.kind is not ModelKind.LATE_INTERACTION:
            raise InvalidInputError("token pooling (pool_factor > 1) applies to ColBERT models only")
        _check_candidates(candidates)
        settings = {
            "format": FORMAT,
            "version": FORMAT_VERSION,
            "model": {"identity": model.identity, "kind": model.kind.value, "dim": model.dim, "path": model.model_path},
            "storage": {"pool_factor": model.pool_factor, "store_texts": model.store_texts, "candidates": candidates},
        }
        layout = Layout(model.kind is ModelKind.LATE_INTERACTION, model.dim)
        if _is_server(location):
            client = ServerEngine.connect(location, api_key)
            return cls(ServerEngine.create(client, _collection(collection), layout, settings), settings, encoder)
        folder = Path(location)
        if folder.exists() and (not folder.is_dir() or any(folder.iterdir())):
            raise InvalidInputError(f"{folder} exists and is not an empty folder; choose a new path for the index")
        folder.mkdir(parents=True, exist_ok=True)
        lock = _lock(folder)
        try:
            return cls(EdgeEngine.create(folder, layout, settings), settings, encoder, lock)
        except BaseException:
            lock.release()
            raise

    @classmethod
    def open(
        cls,
        location: str | Path | Any,
        encoder=None,
        *,
        collection: str = DEFAULT_COLLECTION,
        api_key: str | None = None,
    ) -> QdrantIndex:
        """Open an existing index; refuses an encoder whose model did not build it."""
        if encoder is not None:
            check_open_encoder(encoder)
        if _is_server(location):
            client = ServerEngine.connect(location, api_key)
            engine, settings = ServerEngine.load(client, _collection(collection))
            index = cls(engine, _checked(settings, engine.where))
        else:
            folder = Path(location)
            if not holds_qdrant_index(folder):
                raise InvalidInputError(f"{folder} holds no Qdrant index ({SETTINGS_FILE} is missing)")
            lock = _lock(folder)
            try:
                engine, settings = EdgeEngine.load(folder)
                index = cls(engine, _checked(settings, str(folder)), None, lock)
            except BaseException:
                lock.release()
                raise
        if encoder is not None:
            index._check_model(encoder)
            index.encoder = encoder
        return index

    @staticmethod
    def exists(
        location: str | Path | Any, *, collection: str = DEFAULT_COLLECTION, api_key: str | None = None
    ) -> bool:
        """Whether ``location`` (a folder, or ``collection`` on a server) holds a collection already."""
        if not _is_server(location):
            return holds_qdrant_index(Path(location))
        return ServerEngine.exists(ServerEngine.connect(location, api_key), _collection(collection))

    def _check_model(self, encoder) -> None:
        s, ours = self.settings, model_identity(encoder)
        if ours != s.identity:
            self.close()
            raise IndexModelMismatchError(
                f"the index at {self.location} was built by another model (identity {s.identity}, {s.kind.value}, "
                f"dim {s.dim}, from {s.model_path or 'an unknown file'}); {encoder.path} is {ours}. Open it with "
                "the model that built it, loaded the same way (split_f32, dynamic_int8 and ozaki_f32 give other vectors), "
                "or build a new index for this model."
            )

    # -- state --------------------------------------------------------------------------------------------

    @property
    def settings(self) -> IndexSettings:
        m, s = self._settings["model"], self._settings["storage"]
        return IndexSettings(
            identity=m["identity"],
            kind=ModelKind(m["kind"]),
            dim=int(m["dim"]),
            pool_factor=int(s["pool_factor"]),
            store_texts=bool(s["store_texts"]),
            model_path=m.get("path", ""),
        )

    @property
    def candidates(self) -> int:
        return int(self._settings["storage"]["candidates"])

    def __len__(self) -> int:
        self._need_open()
        return self._engine.count()

    def __contains__(self, doc_id: object) -> bool:
        self._need_open()
        return isinstance(doc_id, str) and bool(self._engine.present([doc_id]))

    def ids(self) -> list[str]:
        """Every id (in Qdrant's point order, not insertion order)."""
        self._need_open()
        return [p.doc_id for page in self._engine.scroll(with_vectors=False) for p in page]

    def documents(self) -> Iterator[StoredDocument]:
        """Every document with its stored vectors as float32 (what ``index export`` copies)."""
        self._need_open()
        name = self._layout.search_vector
        for page in self._engine.scroll(with_vectors=[name]):
            for p in page:
                yield StoredDocument(p.doc_id, p.vectors[name], p.payload.get("text"), p.payload.get("metadata"))

    def _need_open(self) -> None:
        if self._closed:
            raise InvalidInputError(f"the index at {self.location} was closed; open it again with Index.open")

    def _need_encoder(self, what: str):
        self._need_open()
        return encoder_for(self.encoder, what, "Index.open(location, lfm2edge.load(model_path))")

    # -- writing ------------------------------------------------------------------------------------------

    def add(
        self,
        texts: Sequence[str] | str,
        ids: Sequence[str] | str | None = None,
        metadata: Sequence[Mapping | None] | Mapping | None = None,
        *,
        on_duplicate: str = "error",
        batch_size: int = 32,
        commit_every: int = 256,
        show_progress_bar: bool = False,
    ) -> list[str]:
        """Encode and store documents; returns their ids (random UUID hex strings when ``ids`` is None).
        ``on_duplicate`` and ``commit_every`` work as in the exact index."""
        encoder = self._need_encoder("adding documents")
        texts, _ = check_texts(texts, "text")
        metas = check_metadata(metadata, len(texts))

        def encode(rows: list[int]) -> list[np.ndarray]:
            return list(encoder.encode_document([texts[r] for r in rows], batch_size=batch_size))

        return self._add(len(texts), ids, texts, metas, encode, on_duplicate, commit_every, show_progress_bar)

    def add_vectors(
        self,
        vectors: Sequence[np.ndarray] | np.ndarray,
        ids: Sequence[str] | str | None = None,
        texts: Sequence[str] | None = None,
        metadata: Sequence[Mapping | None] | Mapping | None = None,
        *,
        on_duplicate: str = "error",
        commit_every: int = 256,
    ) -> list[str]:
        """Store documents encoded elsewhere by this index's model, as the exact index's ``add_vectors``."""
        self._need_open()
        vecs, text_list, metas = vectors_to_add(vectors, texts, metadata, self._layout.late, self._layout.dim)
        return self._add(
            len(vecs), ids, text_list, metas, lambda rows: [vecs[r] for r in rows], on_duplicate, commit_every
        )

    def _add(self, n, ids, texts, metas, vectors_of, on_duplicate, commit_every, show_progress_bar=False):
        check_add_options(on_duplicate, commit_every)
        if ids is None:
            id_list = [uuid.uuid4().hex for _ in range(n)]
        else:
            id_list = check_ids(ids, n)
            repeated = sorted(d for d, count in Counter(id_list).items() if count > 1)
            if repeated:
                raise DuplicateIdError(f"ids repeated within this call: {repeated[:5]}")
            if on_duplicate == "error":
                present = self._present(id_list)
                if present:
                    raise DuplicateIdError(
                        f"{len(present)} id(s) already in the index, e.g. {sorted(present)[:5]}; pass "
                        "on_duplicate='replace' to update them or 'skip' to keep them"
                    )
        store_texts = self.settings.store_texts
        bar = progress_bar(n, show_progress_bar)
        for start in range(0, n, commit_every):
            rows = list(range(start, min(start + commit_every, n)))
            if on_duplicate == "skip":
                present = self._engine.present([id_list[r] for r in rows])
                rows = [r for r in rows if id_list[r] not in present]
            if rows:
                named = self._point_vectors(vectors_of(rows))
                points = [
                    StoredPoint(
                        id_list[r],
                        v,
                        {"id": id_list[r], "text": texts[r] if store_texts else None, "metadata": metas[r]},
                    )
                    for r, v in zip(rows, named, strict=True)
                ]
                self._engine.upsert(points)
            bar(min(start + commit_every, n) - start)
        bar(0, close=True)
        return id_list

    def _present(self, doc_ids: list[str]) -> set[str]:
        found: set[str] = set()
        for start in range(0, len(doc_ids), 1024):
            found |= self._engine.present(doc_ids[start : start + 1024])
        return found

    def _point_vectors(self, documents: list[np.ndarray]) -> list[dict[str, np.ndarray]]:
        """Each document's named vectors: its tokens (pooled if asked) and their unit mean, or its unit vector."""
        name = self._layout.search_vector
        if not self._layout.late:
            return [{name: v} for v in normalize_rows(np.stack(documents))]
        pool = self.settings.pool_factor
        tokens = [(pool_tokens(d, pool) if pool > 1 else d).astype(np.float32) for d in documents]
        return [{name: t, MEAN: _unit_mean(t)} for t in tokens]

    def delete(self, ids: Sequence[str] | str, missing_ok: bool = False) -> int:
        """Delete documents by id; returns how many were deleted. Unknown ids raise ``InvalidInputError``
        (nothing is deleted) unless ``missing_ok``."""
        self._need_open()
        if isinstance(ids, str):
            ids = [ids]
        if isinstance(ids, (bytes, bytearray)) or not isinstance(ids, (Sequence, np.ndarray)):
            raise InvalidInputError(f"ids must be a string or a list of strings, not {type(ids).__name__}")
        ids = [check_id(d, f"id {i}") for i, d in enumerate(ids)]
        present = self._present(ids)
        missing = [d for d in ids if d not in present]
        if missing and not missing_ok:
            raise InvalidInputError(
                f"{len(missing)} id(s) are not in the index, e.g. {missing[:5]}; nothing was deleted"
            )
        if present:
            self._engine.delete(sorted(present))
        return len(present)

    def compact(self) -> None:
        """Let Qdrant merge segments, build HNSW and drop deleted points now (Edge: blocks until done)."""
        self._need_open()
        self._engine.optimize()

    # -- searching ----------------------------------------------------------------------------------------

    def search(self, query: str, k: int = 10, *, where: Mapping[str, Any] | None = None) -> list[Hit]:
        """The ``k`` best documents for ``query``, best first; ``where`` filters on metadata."""
        if not isinstance(query, str):
            raise InvalidInputError(f"query must be a string, not {type(query).__name__}; use search_many for lists")
        return self.search_many([check_text(query, "query")], k, where=where)[0]

    def search_many(
        self, queries: Sequence[str], k: int = 10, batch_size: int = 32, *, where: Mapping[str, Any] | None = None
    ) -> list[list[Hit]]:
        encoder = self._need_encoder("searching")
        queries, _ = check_texts(queries, "query")
        _check_k(k)
        check_where(where)
        if not queries:
            return []
        vectors = encoder.encode_query(queries, batch_size=batch_size)
        return self.search_vectors(vectors if isinstance(vectors, list) else list(vectors), k, where=where)

    def search_vectors(
        self,
        queries: Sequence[np.ndarray],
        k: int = 10,
        *,
        where: Mapping[str, Any] | None = None,
        candidates: int | None = None,
    ) -> list[list[Hit]]:
        """Search with query vectors already encoded. ``candidates`` overrides the index's setting for
        ColBERT (0: score every document); dense models always search HNSW."""
        self._need_open()
        _check_k(k)
        conditions = check_where(where)
        candidates = self.candidates if candidates is None else _check_candidates(candidates)
        late, dim = self._layout.late, self._layout.dim
        qs = [query_array(q, i, late, dim) for i, q in enumerate(query_list(queries))]
        plans = []
        for q in qs:
            if not late:
                plans.append(Plan(self._layout.search_vector, normalize_rows(q[None, :])[0], k, conditions))
                continue
            limit = max(candidates, k)
            prefetch = ((MEAN, _unit_mean(q), limit),) if candidates else ()
            ef = HNSW_EF_PER_CANDIDATE * limit
            plans.append(Plan(self._layout.search_vector, q, k, conditions, prefetch, not candidates, ef))
        found = self._engine.search(plans) if plans else []
        return [
            [Hit(p["id"], float(score), p.get("text"), p.get("metadata")) for score, p in points]
            for points in found
        ]

    # -- inspecting ---------------------------------------------------------------------------------------

    def info(self) -> dict[str, Any]:
        s = self.settings
        return {
            "path": self.location,
            "engine": "qdrant-edge" if isinstance(self._engine, EdgeEngine) else "qdrant",
            "format_version": self._settings["version"],
            "kind": s.kind.value,
            "dim": s.dim,
            "dtype": "float16" if self._layout.late else "float32",
            "pool_factor": s.pool_factor,
            "store_texts": s.store_texts,
            "candidates": self.candidates,
            "model_identity": s.identity,
            "model_path": s.model_path,
            "documents": len(self),
        }

    def verify(self) -> list[str]:
        """Qdrant checks its own files when it loads them; this re-reads every point's payload."""
        self._need_open()
        problems = []
        for page in self._engine.scroll(with_vectors=False):
            problems += [f"point {p.doc_id!r} has a malformed payload" for p in page if not isinstance(p.doc_id, str)]
        return problems

    def close(self) -> None:
        """Close the shard or the connection; the index object is unusable afterwards."""
        if self._closed:
            return
        self._closed = True
        self.encoder = None
        try:
            self._engine.close()
        finally:
            if self._lock is not None:
                self._lock.release()

    def __enter__(self) -> QdrantIndex:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        s = self.settings
        return f"QdrantIndex({self.location!r}, {s.kind.value}, pool_factor={s.pool_factor})"


def _is_server(location: object) -> bool:
    return is_location_url(location) or type(location).__name__ == "QdrantClient"


def _collection(name: object) -> str:
    if not isinstance(name, str) or not name or len(name) > 255 or "/" in name:
        raise InvalidInputError(f"collection must be a non-empty name without '/', not {name!r}")
    return name


def _lock(folder: Path) -> FileLock:
    """The shard's process lock: Qdrant Edge must not be opened by two processes (or twice in one)."""
    lock = FileLock(folder / ".lock", is_singleton=False)
    try:
        lock.acquire(timeout=0)
    except Timeout:
        raise InvalidInputError(
            f"{folder} is open in another process (or elsewhere in this one); a Qdrant Edge shard has one "
            "user at a time: close it there, or serve it with `lfm2edge serve` and query the server"
        ) from None
    return lock


def _checked(settings: dict, where: str) -> dict:
    if settings.get("format") != FORMAT or settings.get("version") != FORMAT_VERSION:
        raise InvalidInputError(
            f"{where} holds format {settings.get('format')!r} version {settings.get('version')!r}; this "
            f"lfm2edge reads {FORMAT!r} version {FORMAT_VERSION}"
        )
    return settings


def _check_k(k: object) -> None:
    if not isinstance(k, int) or isinstance(k, bool) or k < 1:
        raise InvalidInputError(f"k must be a positive integer, got {k!r}")


def _check_candidates(candidates: object) -> int:
    if not isinstance(candidates, int) or isinstance(candidates, bool) or not 0 <= candidates <= MAX_CANDIDATES:
        raise InvalidInputError(
            f"candidates must be an integer from 0 (score every document) to {MAX_CANDIDATES}, got {candidates!r}"
        )
    return candidates


def _unit_mean(tokens: np.ndarray) -> np.ndarray:
    return normalize_rows(tokens.mean(axis=0, keepdims=True))[0]
