"""Where the pipeline's vectors go: Parquet shards in a folder, or an index. Each sink also says which
ids it already holds, so that a rerun encodes only the rest.

Parquet shards: one file per block of documents, ``part-<hash of its ids>.parquet``, with the columns
``id``, ``text``, ``metadata`` (JSON text or null) and ``embedding`` (``arrow_vectors``: float32, a
[tokens, dim] matrix per document for ColBERT, a [dim] vector for a dense model). Each file is
written under a temporary name, flushed to disk and renamed: a file under its final name is whole.
The model's identity is in every file's schema metadata; a folder of another model's vectors is
refused. One run writes to a folder at a time (a lock file says so).

An index (``Index``, or any engine with the same ``add_vectors``/``ids`` surface, such as the Qdrant
one) is written from the driver, one commit per block.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
from filelock import FileLock, Timeout

from lfm2edge.runtime.core.errors import InvalidInputError
from lfm2edge.runtime.distributed.arrow_vectors import to_vectors
from lfm2edge.runtime.distributed.ray_support import require_pyarrow
from lfm2edge.runtime.storage.documents import IndexModelMismatchError
from lfm2edge.runtime.storage.index_storage import IndexCorruptError, fsync_dir

if TYPE_CHECKING:
    import pyarrow as pa

SHARD_GLOB = "part-*.parquet"
FORMAT = "lfm2edge-vectors"
FORMAT_VERSION = 1
SCHEMA_KEY = b"lfm2edge"  # the shard's schema metadata: format, model identity, kind, dim
LOCK_NAME = ".lfm2edge-writer.lock"


class Sink(Protocol):
    def present(self, ids: Sequence[str]) -> set[str]:
        """Which of ``ids`` the target already holds."""
        ...

    def write(self, block: pa.Table) -> None:
        """Store one encoded block (``id``, ``text``, ``metadata``, ``embedding``) for good."""
        ...

    def close(self) -> None: ...


# ----------------------------------------------------------------------------------------------------------
# Parquet shards
# ----------------------------------------------------------------------------------------------------------


class ParquetShards:
    """A folder of Parquet shards of one model's vectors; holds the folder's writer lock until ``close``."""

    def __init__(self, folder: str | Path, identity: str, kind: str):
        self.folder = Path(folder)
        self.identity, self.kind = identity, kind
        if self.folder.exists() and not self.folder.is_dir():
            raise InvalidInputError(f"{self.folder} is a file; give a folder for the Parquet shards")
        self.folder.mkdir(parents=True, exist_ok=True)
        self._lock = FileLock(self.folder / LOCK_NAME)
        try:
            self._lock.acquire(timeout=0)
        except Timeout:
            raise InvalidInputError(
                f"another run is writing to {self.folder}; wait for it to finish or choose another folder"
            ) from None
        # Under the lock, a temporary file can only be what an interrupted run left behind.
        for leftover in self.folder.glob(".part-*.tmp"):
            leftover.unlink(missing_ok=True)

    def present(self, ids: Sequence[str]) -> set[str]:
        wanted, found = set(ids), set()
        for shard in sorted(self.folder.glob(SHARD_GLOB)):
            shard_ids, header = _read_ids(shard)
            if header.get("model_identity") != self.identity:
                raise IndexModelMismatchError(
                    f"{self.folder} holds vectors of another model ({shard.name}: identity "
                    f"{header.get('model_identity')}, this model is {self.identity}); write to another folder"
                )
            found |= wanted.intersection(shard_ids)
        return found

    def write(self, block: pa.Table) -> None:
        import pyarrow.parquet as pq

        ids = block.column("id").to_pylist()
        header = {
            "format": FORMAT,
            "version": FORMAT_VERSION,
            "model_identity": self.identity,
            "kind": self.kind,
            "dim": _dim(block.schema.field("embedding").type),
        }
        table = block.replace_schema_metadata({SCHEMA_KEY: json.dumps(header).encode()})
        # Named by its documents: a rerun that writes the same block again replaces it, never doubles it.
        name = f"part-{hashlib.sha256(chr(0).join(ids).encode()).hexdigest()[:24]}.parquet"
        tmp = self.folder / f".{name}.{os.getpid()}.tmp"
        try:
            with tmp.open("wb") as f:
                pq.write_table(table, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.folder / name)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        fsync_dir(self.folder)

    def close(self) -> None:
        self._lock.release()


def _read_ids(shard: Path) -> tuple[list[str], dict[str, Any]]:
    """A shard's ids and its lfm2edge header; IndexCorruptError when it cannot be read."""
    pa = require_pyarrow()
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(shard, columns=["id"])
        header = json.loads((table.schema.metadata or {}).get(SCHEMA_KEY, b"{}"))
    except (pa.ArrowException, OSError, ValueError) as e:
        raise IndexCorruptError(
            f"{shard} cannot be read ({e}); delete it and run again (its documents are encoded again)"
        ) from None
    return table.column("id").to_pylist(), header if isinstance(header, dict) else {}


def _dim(vector_type: pa.DataType) -> int:
    pa = require_pyarrow()
    return vector_type.list_size if pa.types.is_fixed_size_list(vector_type) else vector_type.value_type.list_size


def read_vectors(folder: str | Path) -> tuple[list[str], list[np.ndarray]]:
    """Every id and its float32 vectors ([tokens, dim] for ColBERT, [dim] for a dense model) in a shard folder."""
    import pyarrow.parquet as pq

    require_pyarrow()
    ids: list[str] = []
    vectors: list[np.ndarray] = []
    for shard in sorted(Path(folder).glob(SHARD_GLOB)):
        table = pq.read_table(shard, columns=["id", "embedding"])
        ids += table.column("id").to_pylist()
        vectors += to_vectors(table.column("embedding"))
    return ids, vectors


# ----------------------------------------------------------------------------------------------------------
# An index
# ----------------------------------------------------------------------------------------------------------


class IndexSink:
    """Writes blocks to an index with ``add_vectors``, one commit each, from the driver process."""

    def __init__(self, index, on_duplicate: str):
        self.index, self.on_duplicate = index, on_duplicate

    def present(self, ids: Sequence[str]) -> set[str]:
        return set(self.index.ids()).intersection(ids)

    def write(self, block: pa.Table) -> None:
        metadata = [None if m is None else json.loads(m) for m in block.column("metadata").to_pylist()]
        self.index.add_vectors(
            to_vectors(block.column("embedding")),
            block.column("id").to_pylist(),
            block.column("text").to_pylist(),
            metadata,
            on_duplicate=self.on_duplicate,
        )

    def close(self) -> None:
        pass  # the index stays open: it belongs to the caller
