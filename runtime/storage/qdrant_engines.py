"""Qdrant, two ways in: an Edge shard in-process (``qdrant-edge-py``) or a server (``qdrant-client``).

Both adapters hold one collection in the same layout, so a laptop shard moves to a server by copying
its points (``lfm2edge index export``):

- ColBERT: ``tokens``, the token vectors as a MaxSim multivector (dot product, float16, no HNSW graph:
  it is only ever scored for candidates or by a full scan), and ``mean``, the unit mean of each
  document's tokens under cosine with HNSW, which finds the candidates. (An HNSW over a few centroids
  per document as a MaxSim multivector added 1% recall@10 at 100k documents for 7x the build time
  and 2x the search time: bench/scale.py.)
- Dense models: ``dense``, the unit vector under cosine with HNSW.
- Payload: ``{"id": the document's id, "text": ..., "metadata": {...}}``. A point's Qdrant id is the
  UUID5 of the document id, so any string id works and the same document lands on the same point.

The lfm2edge settings (model identity, kind, dim, storage choices) live beside the shard in
``lfm2edge-qdrant.json`` and, on a server, in the collection's metadata. Qdrant errors become
``EngineError``; a settings file that cannot be read is an ``IndexCorruptError``.
"""

from __future__ import annotations

import json
import os
import re
import uuid
import weakref
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from lfm2edge.runtime.core.errors import FeatureUnavailableError, Lfm2EdgeError
from lfm2edge.runtime.storage.filters import Where
from lfm2edge.runtime.storage.index_storage import corrupt, fsync_dir

TOKENS, MEAN, DENSE = "tokens", "mean", "dense"
SETTINGS_FILE = "lfm2edge-qdrant.json"
SHARD_FOLDER = "shard"
METADATA_KEY = "lfm2edge"  # the collection metadata entry that holds the settings on a server
_POINT_NAMESPACE = uuid.UUID("5f0b2b8e-6a4c-4c1e-9a55-2f6c9d1e7a10")
_SCROLL_PAGE = 256
# The mean vectors' HNSW graph. Documents of one subject have near-identical means, and Qdrant's default
# (m=16, ef_construct=100) left the true top 512 of 1M catalog documents out of reach at any search ef
# (recall@10 0.93 after MaxSim); m=32, ef_construct=256 reached 0.96, for 2.2x the optimize time
# (bench/scale.py).
HNSW_M, HNSW_EF_CONSTRUCT = 32, 256
# A metadata key part that Qdrant's JSON path syntax reads as written; any other is quoted ("tags[]", "a b").
_PLAIN_KEY = re.compile(r"[A-Za-z0-9_]+")
# The clients that ServerEngine.connect made from a URL: closing an index closes only those, never a
# QdrantClient the caller passed in (and may share with other indexes).
_OWNED_CLIENTS: weakref.WeakSet = weakref.WeakSet()


class EngineError(Lfm2EdgeError):
    """Qdrant refused or failed an operation (a server down, a wrong collection, a full disk...)."""


def point_id(doc_id: str) -> str:
    """The Qdrant point id of a document id."""
    return str(uuid.uuid5(_POINT_NAMESPACE, doc_id))


@dataclass(frozen=True)
class Layout:
    """The collection's vectors: a ColBERT layout (``late``) or a dense one, of ``dim`` dimensions."""

    late: bool
    dim: int

    @property
    def search_vector(self) -> str:
        return TOKENS if self.late else DENSE


@dataclass(frozen=True)
class StoredPoint:
    doc_id: str
    vectors: dict[str, np.ndarray]
    payload: dict[str, Any]


@dataclass(frozen=True)
class Plan:
    """One search: score ``vector`` on ``using``; with ``prefetch`` stages (name, vector, limit), only over
    the candidates they find (their union), walking HNSW with ``hnsw_ef`` (None: Qdrant's default);
    ``exact`` scans instead of walking HNSW."""

    using: str
    vector: np.ndarray
    limit: int
    where: Where = ()
    prefetch: tuple[tuple[str, np.ndarray, int], ...] = ()
    exact: bool = False
    hnsw_ef: int | None = None

    def params(self, m):
        if self.exact:
            return m.SearchParams(exact=True)
        return m.SearchParams(hnsw_ef=self.hnsw_ef) if self.hnsw_ef else None


def _require(module: str):
    try:
        return __import__(module, fromlist=["_"])
    except ImportError:
        raise FeatureUnavailableError(
            f"the Qdrant engine needs {module}: pip install 'lfm2edge[qdrant]'"
        ) from None


class _Engine:
    """What both adapters do. ``m`` is the module whose classes build requests (qdrant_edge or
    qdrant_client.models: they share the names)."""

    m: Any

    def _filter(self, where: Where):
        m = self.m
        if not where:
            return None
        must = []
        for cond in where:
            # Quoted parts are literal keys, as the exact index reads them (check_where refuses '"').
            key = "metadata." + ".".join(p if _PLAIN_KEY.fullmatch(p) else f'"{p}"' for p in cond.path)
            match = (
                m.MatchValue(value=self._value(cond.values[0]))
                if len(cond.values) == 1
                else m.MatchAny(any=list(cond.values))
            )
            must.append(m.FieldCondition(key=key, match=match))
        return m.Filter(must=must)

    def _value(self, value: Any) -> Any:
        """A ``where`` value as this library's MatchValue takes it."""
        return value


class EdgeEngine(_Engine):
    """A Qdrant Edge shard in ``folder/shard``, in this process (one process at a time: the caller locks)."""

    def __init__(self, folder: Path, shard):
        self.folder, self._shard = folder, shard
        self.m = _require("qdrant_edge")

    @classmethod
    def create(cls, folder: Path, layout: Layout, settings: dict) -> EdgeEngine:
        qe = _require("qdrant_edge")
        try:
            shard = qe.EdgeShard.create(str(folder / SHARD_FOLDER), qe.EdgeConfig(vectors=_edge_vectors(qe, layout)))
        except Exception as e:  # the binding raises plain Exceptions
            raise EngineError(f"Qdrant Edge could not create a shard in {folder}: {e}") from None
        _write_json(folder / SETTINGS_FILE, settings)  # last: a folder without it holds no index yet
        return cls(folder, shard)

    @classmethod
    def load(cls, folder: Path) -> tuple[EdgeEngine, dict]:
        qe = _require("qdrant_edge")
        settings = read_settings_file(folder)
        try:
            shard = qe.EdgeShard.load(str(folder / SHARD_FOLDER))
        except Exception as e:
            raise corrupt(folder, f"Qdrant Edge could not load its shard ({e})") from None
        return cls(folder, shard), settings

    def upsert(self, points: Sequence[StoredPoint]) -> None:
        qe = self.m
        ops = [qe.Point(id=point_id(p.doc_id), vector=p.vectors, payload=p.payload) for p in points]
        self._call("write", lambda: self._shard.update(qe.UpdateOperation.upsert_points(ops)))
        self._call("flush", self._shard.flush)  # acknowledged writes survive a kill

    def delete(self, doc_ids: Sequence[str]) -> None:
        qe = self.m
        op = qe.UpdateOperation.delete_points([point_id(d) for d in doc_ids])
        self._call("delete", lambda: self._shard.update(op))
        self._call("flush", self._shard.flush)

    def present(self, doc_ids: Sequence[str]) -> set[str]:
        records = self._call(
            "read", lambda: self._shard.retrieve([point_id(d) for d in doc_ids], ["id"], False)
        )
        return {r.payload["id"] for r in records}

    def count(self) -> int:
        return self._call("count", lambda: self._shard.count(self.m.CountRequest(exact=True)))

    def search(self, plans: Sequence[Plan]) -> list[list[tuple[float, dict]]]:
        qe = self.m
        requests = []
        for plan in plans:
            flt = self._filter(plan.where)
            params = plan.params(qe)
            prefetches = [
                qe.Prefetch(limit=limit, query=qe.Query.Nearest(vector, using=name), filter=flt, params=params)
                for name, vector, limit in plan.prefetch
            ] or None
            requests.append(
                qe.QueryRequest(
                    limit=plan.limit,
                    query=qe.Query.Nearest(plan.vector, using=plan.using),
                    prefetches=prefetches,
                    filter=flt,
                    params=params,
                    with_payload=True,
                )
            )
        found = self._call("search", lambda: self._shard.query_batch(qe.QueryBatchRequest(requests)))
        return [[(p.score, p.payload) for p in points] for points in found]

    def scroll(self, with_vectors: bool) -> Iterator[list[StoredPoint]]:
        qe, offset = self.m, None
        while True:
            request = qe.ScrollRequest(offset=offset, limit=_SCROLL_PAGE, with_payload=True, with_vector=with_vectors)
            records, offset = self._call("scroll", lambda r=request: self._shard.scroll(r))
            yield [StoredPoint(r.payload["id"], _arrays(r.vector), r.payload) for r in records]
            if offset is None:
                return

    def _value(self, value: Any) -> Any:
        # qdrant_edge reads a Python bool as the integer 0 or 1 (bool is an int, tried first), so
        # where={"flag": True} would match 1 and not true; numpy's bool reaches it as a bool.
        return np.bool_(value) if isinstance(value, bool) else value

    def optimize(self) -> None:
        self._call("optimize", self._shard.optimize)

    def close(self) -> None:
        self._shard.close()

    def _call(self, what: str, fn):
        try:
            return fn()
        except Exception as e:
            raise EngineError(f"Qdrant Edge failed to {what} in {self.folder}: {e}") from None


class ServerEngine(_Engine):
    """A collection on a Qdrant server or cluster, through qdrant-client (also its local mode, for tests)."""

    def __init__(self, client, collection: str, where: str):
        self._client, self.collection, self.where = client, collection, where
        self.m = _require("qdrant_client.models")

    @staticmethod
    def connect(location: object, api_key: str | None):
        """A client for ``location``: an http(s) URL, or a QdrantClient already made."""
        qc = _require("qdrant_client")
        if isinstance(location, qc.QdrantClient):
            return location
        try:
            client = qc.QdrantClient(url=str(location), api_key=api_key or os.environ.get("QDRANT_API_KEY"))
        except Exception as e:
            raise EngineError(f"cannot reach Qdrant at {location}: {e}") from None
        _OWNED_CLIENTS.add(client)
        return client

    @classmethod
    def exists(cls, client, collection: str) -> bool:
        engine = cls(client, collection, _where(client, collection))
        return bool(engine._call("check", lambda: client.collection_exists(collection)))

    @classmethod
    def create(cls, client, collection: str, layout: Layout, settings: dict) -> ServerEngine:
        m = _require("qdrant_client.models")
        engine = cls(client, collection, _where(client, collection))
        if engine._call("check", lambda: client.collection_exists(collection)):
            raise EngineError(
                f"{engine.where} already exists; open it with Index.open, or choose another collection name"
            )
        engine._call(
            "create",
            lambda: client.create_collection(
                collection, vectors_config=_server_vectors(m, layout), metadata={METADATA_KEY: settings}
            ),
        )
        return engine

    @classmethod
    def load(cls, client, collection: str) -> tuple[ServerEngine, dict]:
        engine = cls(client, collection, _where(client, collection))
        if not engine._call("check", lambda: client.collection_exists(collection)):
            raise EngineError(f"{engine.where} does not exist; create it with Index.create(..., backend='qdrant')")
        info = engine._call("read", lambda: client.get_collection(collection))
        settings = (info.config.metadata or {}).get(METADATA_KEY)
        if not isinstance(settings, dict):
            raise EngineError(
                f"{engine.where} was not made by lfm2edge (no '{METADATA_KEY}' metadata); open a collection "
                "that Index.create made, or copy documents in with `lfm2edge index export`"
            )
        return engine, settings

    def upsert(self, points: Sequence[StoredPoint]) -> None:
        m = self.m
        structs = [
            m.PointStruct(
                id=point_id(p.doc_id), vector={k: v.tolist() for k, v in p.vectors.items()}, payload=p.payload
            )
            for p in points
        ]
        self._call("write", lambda: self._client.upsert(self.collection, structs, wait=True))

    def delete(self, doc_ids: Sequence[str]) -> None:
        ids = [point_id(d) for d in doc_ids]
        self._call("delete", lambda: self._client.delete(self.collection, self.m.PointIdsList(points=ids), wait=True))

    def present(self, doc_ids: Sequence[str]) -> set[str]:
        records = self._call(
            "read",
            lambda: self._client.retrieve(
                self.collection, [point_id(d) for d in doc_ids], with_payload=["id"], with_vectors=False
            ),
        )
        return {r.payload["id"] for r in records}

    def count(self) -> int:
        return self._call("count", lambda: self._client.count(self.collection, exact=True).count)

    def search(self, plans: Sequence[Plan]) -> list[list[tuple[float, dict]]]:
        m = self.m
        requests = []
        for plan in plans:
            flt = self._filter(plan.where)
            params = plan.params(m)
            prefetch = [
                m.Prefetch(query=vector.tolist(), using=name, limit=limit, filter=flt, params=params)
                for name, vector, limit in plan.prefetch
            ] or None
            requests.append(
                m.QueryRequest(
                    query=plan.vector.tolist(), using=plan.using, prefetch=prefetch, filter=flt,
                    params=params, limit=plan.limit, with_payload=True,
                )
            )
        found = self._call("search", lambda: self._client.query_batch_points(self.collection, requests))
        return [[(p.score, p.payload) for p in r.points] for r in found]

    def scroll(self, with_vectors: bool) -> Iterator[list[StoredPoint]]:
        offset = None
        while True:
            records, offset = self._call(
                "scroll",
                lambda o=offset: self._client.scroll(
                    self.collection, limit=_SCROLL_PAGE, offset=o, with_payload=True, with_vectors=with_vectors
                ),
            )
            yield [StoredPoint(r.payload["id"], _arrays(r.vector), r.payload) for r in records]
            if offset is None:
                return

    def optimize(self) -> None:
        """A server optimizes on its own schedule."""

    def close(self) -> None:
        if self._client in _OWNED_CLIENTS:  # a client the caller passed in stays theirs to close
            self._client.close()

    def _call(self, what: str, fn):
        try:
            return fn()
        except Lfm2EdgeError:
            raise
        except Exception as e:
            raise EngineError(f"Qdrant failed to {what} {self.where}: {e}") from None


# ----------------------------------------------------------------------------------------------------------
# The layout in each library's terms
# ----------------------------------------------------------------------------------------------------------


def _edge_vectors(qe, layout: Layout) -> dict:
    if not layout.late:
        return {DENSE: qe.EdgeVectorParams(size=layout.dim, distance=qe.Distance.Cosine)}
    return {
        TOKENS: qe.EdgeVectorParams(
            size=layout.dim,
            distance=qe.Distance.Dot,  # MaxSim over the vectors as stored, like the exact index
            multivector_config=qe.MultiVectorConfig(qe.MultiVectorComparator.MaxSim),
            datatype=qe.VectorStorageDatatype.Float16,
            hnsw_config=qe.HnswIndexConfig(m=0, ef_construct=100, full_scan_threshold=10_000),
            memory=qe.Memory.Cold,  # memory-mapped: only the candidates' pages are read
        ),
        MEAN: qe.EdgeVectorParams(
            size=layout.dim,
            distance=qe.Distance.Cosine,
            datatype=qe.VectorStorageDatatype.Float16,
            hnsw_config=qe.HnswIndexConfig(m=HNSW_M, ef_construct=HNSW_EF_CONSTRUCT, full_scan_threshold=10_000),
        ),
    }


def _server_vectors(m, layout: Layout) -> dict:
    if not layout.late:
        return {DENSE: m.VectorParams(size=layout.dim, distance=m.Distance.COSINE)}
    return {
        TOKENS: m.VectorParams(
            size=layout.dim,
            distance=m.Distance.DOT,
            multivector_config=m.MultiVectorConfig(comparator=m.MultiVectorComparator.MAX_SIM),
            datatype=m.Datatype.FLOAT16,
            hnsw_config=m.HnswConfigDiff(m=0),
            on_disk=True,
        ),
        MEAN: m.VectorParams(
            size=layout.dim,
            distance=m.Distance.COSINE,
            datatype=m.Datatype.FLOAT16,
            hnsw_config=m.HnswConfigDiff(m=HNSW_M, ef_construct=HNSW_EF_CONSTRUCT),
        ),
    }


def _arrays(vector: Any) -> dict[str, np.ndarray]:
    if not isinstance(vector, dict):
        return {}
    return {k: np.asarray(v, dtype=np.float32) for k, v in vector.items()}


def _where(client, collection: str) -> str:
    url = getattr(getattr(client, "_client", None), "rest_uri", None) or "a local qdrant-client"
    return f"collection {collection!r} at {url}"


# ----------------------------------------------------------------------------------------------------------
# The settings file beside an Edge shard
# ----------------------------------------------------------------------------------------------------------


def read_settings_file(folder: Path) -> dict:
    path = folder / SETTINGS_FILE
    try:
        settings = json.loads(path.read_bytes())
    except FileNotFoundError:
        raise corrupt(folder, f"{path} is missing") from None
    except (OSError, ValueError, RecursionError) as e:
        raise corrupt(folder, f"{path} cannot be read ({e})") from None
    if not isinstance(settings, dict):
        raise corrupt(folder, f"{path} is not a JSON object")
    return settings


def _write_json(path: Path, value: dict) -> None:
    """Write ``value`` to ``path`` atomically (a temporary file renamed over it)."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        f.write(json.dumps(value, indent=1).encode())
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)
