"""A persistent, crash-safe index of one model's document vectors, with exact search.

    index = Index.create("docs.idx", encoder)          # or Index.open("docs.idx", encoder)
    index.add(["first text", "second text"], ids=["a", "b"], metadata=[{"lang": "en"}, None])
    hits = index.search("a question", k=10)            # [Hit(id, score, text, metadata), ...]

Scoring is exact over the stored vectors: MaxSim for ColBERT, cosine for dense models. Vectors
are stored float16 (default) or int8 with one float32 scale per row, and memory-mapped, so an
index opens instantly and only the pages a search touches are read.

An index is a folder: immutable segment folders plus ``manifest.json``, which names the model, the
storage settings and each committed segment with its checksums and deleted rows. The folder layout
and the commit protocol are documented in ``lfm2edge.runtime.storage.index_storage``, which reads and writes
those files; ``lfm2edge.runtime.storage.vector_codecs`` holds the token pooling and int8 quantization. A
commit is one manifest replacement, so every add batch, delete and merge is all-or-nothing.
Once there are more than 16 segments the 8 smallest are merged into one; ``compact()`` merges
all of them and drops deleted documents for good.

Every input is checked before anything is encoded or written: texts and ids are valid Unicode
(``lfm2edge.runtime.core.text``), ids at most MAX_ID_CHARS long, metadata at most MAX_METADATA_DEPTH
deep and MAX_METADATA_BYTES of JSON per document (``check_metadata``; the server passes its own
limits). A damaged folder is an ``IndexCorruptError`` from open, search or ``verify()``, never a
crash; an index whose encoder was closed raises ``EncoderClosedError``.
"""

from __future__ import annotations

import secrets
import threading
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from itertools import pairwise
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from lfm2edge.runtime.core.errors import InvalidInputError
from lfm2edge.runtime.core.maxsim import PackedDocuments, kernel_path, maxsim, maxsim_blocked, normalize_rows
from lfm2edge.runtime.core.progress import progress_bar
from lfm2edge.runtime.core.settings import ModelKind
from lfm2edge.runtime.core.text import check_text, check_texts

# The documents' checks and types are shared by both engines; this module re-exports them (__all__).
from lfm2edge.runtime.storage.documents import (
    MAX_ID_CHARS,
    MAX_METADATA_BYTES,
    MAX_METADATA_DEPTH,
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
from lfm2edge.runtime.storage.filters import Where, check_where, matches
from lfm2edge.runtime.storage.index_storage import (
    DTYPES,
    FORMAT,
    FORMAT_VERSION,
    MANIFEST,
    SEGMENTS,
    Segment,
    check_manifest,
    consistently,
    corrupt,
    fsync_dir,
    manifest_stamp,
    open_segment,
    read_manifest,
    record_line,
    remove_orphans,
    replace_deleted,
    sha256,
    write_manifest,
    write_segment,
    writer_lock,
)
from lfm2edge.runtime.storage.index_storage import (
    IndexCorruptError as IndexCorruptError,  # re-exported: defined with the storage layer
)
from lfm2edge.runtime.storage.vector_codecs import pool_tokens, quantize_int8

__all__ = [
    "Index", "Hit", "IndexSettings", "IndexCorruptError", "IndexModelMismatchError", "DuplicateIdError",
    "MAX_ID_CHARS", "MAX_METADATA_BYTES", "MAX_METADATA_DEPTH", "check_ids", "check_metadata", "model_identity",
]

Backend = Literal["exact", "qdrant"]
BACKENDS: tuple[str, ...] = ("exact", "qdrant")
if TYPE_CHECKING:
    from lfm2edge.runtime.storage.qdrant_index import QdrantIndex

OnDuplicate = Literal["error", "skip", "replace"]
# Merge the MERGE_WIDTH smallest segments once there are more than MAX_SEGMENTS: a log-structured
# policy, so many small commits stay cheap to search and each vector is rewritten O(log n) times.
MAX_SEGMENTS = 16
MERGE_WIDTH = 8
# Queries scored together: one pass over the stored vectors serves all of them.
QUERY_GROUP = 16


def _same_files(seg: Segment, entry: Mapping[str, Any]) -> bool:
    """Whether an open segment is the one a manifest entry describes (else it is opened and checked again)."""
    files = {k: (v[0], v[1]) for k, v in entry["files"].items()}
    return (
        dict(seg.files) == files and len(seg.ids) == entry["docs"] and int(seg.offsets[-1]) == entry["rows"]
    )


# ----------------------------------------------------------------------------------------------------------
# The index
# ----------------------------------------------------------------------------------------------------------


class Index:
    """Document vectors of one model in a folder; exact search. Create with ``create`` or ``open``.

    Thread-safe: searches run concurrently with each other and with writes (they score the segments
    committed when they started); writes are serialised, across processes too, and a search first
    adopts what other processes committed. ``encoder`` may be None to inspect or delete without
    loading a model; adding and searching need it.

    Memory: the vectors stay memory-mapped. Where the MaxSim kernel screens in int8 (``coded_path``:
    AVX512-VNNI without AMX), the first search of a float16 ColBERT segment makes int8 codes of its rows
    (55% of the vectors' size, in memory) and keeps them until the segment is merged away or ``close()``.
    """

    def __init__(self, path: Path, manifest: dict, encoder=None):
        self.path = path
        self.encoder = encoder
        self._write_lock = threading.RLock()
        self._manifest: dict = {}
        self._segments: tuple[Segment, ...] = ()
        self._where: dict[str, tuple[str, int]] = {}
        self._seen: tuple[int, int] | None = None  # the manifest file our state reflects (None: unknown)
        self._metadata: dict[str, list] = {}  # segment name -> its documents' metadata, for filters
        # segment name -> (its float16 vectors, them packed for the MaxSim kernel, which keeps int8 codes there)
        self._packed: dict[str, tuple[np.ndarray, PackedDocuments]] = {}
        self._closed = False
        check_manifest(path, manifest)
        self._install(manifest)

    # -- opening ------------------------------------------------------------------------------------------

    @classmethod
    def create(
        cls,
        path: str | Path,
        encoder,
        *,
        backend: Backend = "exact",
        dtype: str = "float16",
        pool_factor: int = 1,
        store_texts: bool = True,
        **qdrant_options: Any,
    ) -> Index | QdrantIndex:
        """A new, empty index at ``path`` (a missing or empty folder) for ``encoder``'s model.

        ``dtype="int8"`` halves the vectors again (one float32 scale per row); ``pool_factor=2`` (ColBERT)
        keeps about half of each document's token vectors. tests/test_index.py measures both.

        ``backend="qdrant"`` keeps the documents in Qdrant instead (``QdrantIndex``, same surface): a
        folder holds a Qdrant Edge shard, an http(s) URL names a server (``collection=``, ``api_key=``,
        ``candidates=``: see ``lfm2edge.runtime.storage.qdrant_index``).
        """
        if backend == "qdrant":
            from lfm2edge.runtime.storage.qdrant_index import QdrantIndex

            if dtype != "float16":
                raise InvalidInputError("the Qdrant engine stores float16 token vectors; dtype applies to 'exact'")
            return QdrantIndex.create(
                path, encoder, pool_factor=pool_factor, store_texts=store_texts, **qdrant_options
            )
        if backend != "exact":
            raise InvalidInputError(f"backend must be one of {BACKENDS}, not {backend!r}")
        if qdrant_options:
            raise InvalidInputError(f"{sorted(qdrant_options)} apply to backend='qdrant' only")
        if not isinstance(path, (str, Path)) or str(path).startswith(("http://", "https://")):
            raise InvalidInputError(f"the exact index lives in a folder, not {path!r}; for a server use backend='qdrant'")
        path = Path(path)
        check_open_encoder(encoder)
        if dtype not in DTYPES:
            raise InvalidInputError(f"dtype must be one of {DTYPES}, not {dtype!r}")
        if not isinstance(pool_factor, int) or pool_factor < 1:
            raise InvalidInputError(f"pool_factor must be a positive integer, not {pool_factor!r}")
        if pool_factor > 1 and encoder.kind is not ModelKind.LATE_INTERACTION:
            raise InvalidInputError("token pooling (pool_factor > 1) applies to ColBERT models only")
        if (path / MANIFEST).exists():
            raise InvalidInputError(f"{path} already holds an index; open it with Index.open")
        # An empty segments/ folder is what a create interrupted before its manifest leaves.
        leftovers = (
            [p for p in path.iterdir() if p.name != SEGMENTS or not p.is_dir() or any(p.iterdir())]
            if path.is_dir()
            else []
        )
        if path.exists() and (not path.is_dir() or leftovers):
            raise InvalidInputError(
                f"{path} exists and is not an empty folder; choose a new path for the index"
            )
        settings = IndexSettings(
            identity=model_identity(encoder),
            kind=encoder.kind,
            dim=int(encoder.dim),
            dtype=dtype,
            pool_factor=pool_factor,
            store_texts=store_texts,
            model_path=str(Path(encoder.path).resolve()),
        )
        (path / SEGMENTS).mkdir(parents=True, exist_ok=True)
        manifest = {
            "format": FORMAT,
            "version": FORMAT_VERSION,
            "generation": 0,
            "model": {
                "identity": settings.identity,
                "kind": settings.kind.value,
                "dim": settings.dim,
                "path": settings.model_path,
            },
            "storage": {"dtype": dtype, "pool_factor": pool_factor, "store_texts": store_texts},
            "next_id": 0,
            "segments": [],
        }
        write_manifest(path, manifest)
        fsync_dir(path.parent if path.parent != path else path)
        return cls(path, manifest, encoder)

    @classmethod
    def open(cls, path: str | Path, encoder=None, **qdrant_options: Any) -> Index | QdrantIndex:
        """Open an existing index; refuses an encoder whose model did not build it. A folder that holds
        a Qdrant Edge shard, or an http(s) URL, opens a ``QdrantIndex``."""
        from lfm2edge.runtime.storage.qdrant_index import QdrantIndex, holds_qdrant_index, is_location_url

        if is_location_url(path) or type(path).__name__ == "QdrantClient" or (
            isinstance(path, (str, Path)) and holds_qdrant_index(Path(path))
        ):
            return QdrantIndex.open(path, encoder, **qdrant_options)
        if qdrant_options:
            raise InvalidInputError(f"{sorted(qdrant_options)} apply to Qdrant indexes only")
        path = Path(path)
        if encoder is not None:
            check_open_encoder(encoder)
        index = consistently(path, lambda manifest: cls(path, manifest, None))
        if encoder is not None:
            index._check_model(encoder)
            index.encoder = encoder
        return index

    @classmethod
    def open_or_create(cls, path: str | Path, encoder, **create_options) -> Index | QdrantIndex:
        """Open ``path`` if it holds an index, else create one there with ``create_options``."""
        from lfm2edge.runtime.storage.qdrant_index import QdrantIndex, holds_qdrant_index, is_location_url

        if is_location_url(path) or type(path).__name__ == "QdrantClient":
            where = {k: create_options[k] for k in ("collection", "api_key") if k in create_options}
            if QdrantIndex.exists(path, **where):
                return QdrantIndex.open(path, encoder, **where)
            return cls.create(path, encoder, **{"backend": "qdrant", **create_options})
        if (Path(path) / MANIFEST).exists() or holds_qdrant_index(Path(path)):
            return cls.open(path, encoder)
        return cls.create(path, encoder, **create_options)

    def _check_model(self, encoder) -> None:
        s = self.settings
        ours = model_identity(encoder)
        if ours != s.identity:
            raise IndexModelMismatchError(
                f"the index at {self.path} was built by another model "
                f"(identity {s.identity}, {s.kind.value}, "
                f"dim {s.dim}, from {s.model_path or 'an unknown path'}); {encoder.path} is {ours} "
                f"({encoder.kind.value}, dim {encoder.dim}). Open it with the model that built it, loaded the "
                "same way (split_f32, dynamic_int8 and ozaki_f32 give other vectors), or build a new index for this model."
            )

    # -- state --------------------------------------------------------------------------------------------

    @property
    def settings(self) -> IndexSettings:
        m, s = self._manifest["model"], self._manifest["storage"]
        return IndexSettings(
            identity=m["identity"],
            kind=ModelKind(m["kind"]),
            dim=int(m["dim"]),
            dtype=s["dtype"],
            pool_factor=int(s["pool_factor"]),
            store_texts=bool(s["store_texts"]),
            model_path=m.get("path", ""),
        )

    @property
    def generation(self) -> int:
        return int(self._manifest["generation"])

    def __len__(self) -> int:
        return sum(s.live for s in self._segments)

    def __contains__(self, doc_id: object) -> bool:
        return doc_id in self._where

    def ids(self) -> list[str]:
        """Every live id, in insertion order (per segment)."""
        return [d for s in self._segments for d, gone in zip(s.ids, s.deleted, strict=True) if not gone]

    def documents(self) -> Iterator[StoredDocument]:
        """Every live document with its stored vectors as float32 (what ``index export`` copies)."""
        self._need_open()
        late = self.settings.kind is ModelKind.LATE_INTERACTION
        for seg in self._segments:
            seg.check_mapped()
            for row in np.flatnonzero(~seg.deleted):
                a, b = int(seg.offsets[row]), int(seg.offsets[row + 1])
                vectors = np.asarray(seg.vectors[a:b], dtype=np.float32)
                if seg.scales is not None:
                    vectors = vectors * seg.scales[a:b, None]
                rec = seg.record(int(row))
                yield StoredDocument(seg.ids[row], vectors if late else vectors[0], rec.get("text"), rec.get("metadata"))

    def _install(self, manifest: dict) -> None:
        """Make ``manifest`` (checked by ``check_manifest``) the current state, reusing open segments."""
        open_now = {s.name: s for s in self._segments}
        storage, dim = manifest["storage"]["dtype"], manifest["model"]["dim"]
        segments = []
        for entry in manifest["segments"]:
            seg = open_now.get(entry["name"])
            if seg is None or not _same_files(seg, entry):
                seg = open_segment(self.path, entry, storage, dim)
            deleted = np.zeros(len(seg.ids), dtype=bool)
            deleted[entry.get("deleted", [])] = True  # rows checked to be in range by check_manifest
            deleted.flags.writeable = False
            segments.append(replace_deleted(seg, deleted))
        where = {}
        for seg in segments:
            for row, (doc_id, gone) in enumerate(zip(seg.ids, seg.deleted, strict=True)):
                if gone:
                    continue
                if doc_id in where:
                    raise corrupt(
                        self.path,
                        f"the id {doc_id!r:.80} is live in two segments ({where[doc_id][0]}, {seg.name})",
                    )
                where[doc_id] = (seg.name, row)
        self._manifest, self._segments, self._where = manifest, tuple(segments), where
        self._metadata = {s.name: m for s in segments if (m := self._metadata.get(s.name)) is not None}
        self._packed = {s.name: p for s in segments if (p := self._packed.get(s.name)) and p[0] is s.vectors}

    def refresh(self) -> bool:
        """Pick up commits made by other processes; True when something changed."""

        def adopt(manifest: dict) -> bool:
            if manifest["generation"] == self.generation:
                return False
            self._install(manifest)
            return True

        with self._write_lock:
            # Taken before reading: a commit in between only costs a re-read.
            stamp = manifest_stamp(self.path)
            changed = consistently(self.path, adopt)
            self._seen = stamp
            return changed

    def _refresh_if_changed(self) -> None:
        """Adopt another process's commits before a search; one stat when nothing changed, never blocking."""
        try:
            if manifest_stamp(self.path) == self._seen or not self._write_lock.acquire(blocking=False):
                return  # unchanged, or a writer here is busy and will adopt the latest state itself
        except OSError:
            return  # the folder went away: keep answering from what is mapped
        try:
            self.refresh()
        finally:
            self._write_lock.release()

    @contextmanager
    def _writing(self) -> Iterator[None]:
        """Serialise writers (threads and processes), starting from the latest committed state."""
        with self._write_lock, writer_lock(self.path):
            self._seen = manifest_stamp(self.path)
            manifest = read_manifest(self.path)
            if manifest["generation"] != self.generation:
                self._install(manifest)
            remove_orphans(self.path, {s.name for s in self._segments})
            yield
            remove_orphans(self.path, {s.name for s in self._segments})  # what a merge or delete superseded

    def _commit(self, segments: Sequence[Segment], next_id: int | None = None) -> None:
        """Write the manifest naming ``segments`` (the commit point), then adopt it."""
        manifest = dict(self._manifest)
        manifest["generation"] = self.generation + 1
        if next_id is not None:
            manifest["next_id"] = next_id
        manifest["segments"] = [
            {
                "name": s.name,
                "docs": len(s.ids),
                "rows": int(s.offsets[-1]),
                "deleted": np.flatnonzero(s.deleted).tolist(),
                "files": {k: list(v) for k, v in s.files.items()},
            }
            for s in segments
        ]
        write_manifest(self.path, manifest)
        self._seen = manifest_stamp(self.path)  # under the writer lock: nobody else committed since
        self._install(manifest)

    # -- writing ------------------------------------------------------------------------------------------

    def _need_open(self) -> None:
        if self._closed:
            raise InvalidInputError(
                f"this Index of {self.path} was closed; open it again with Index.open(path, encoder)"
            )

    def _need_encoder(self, what: str):
        self._need_open()
        return encoder_for(self.encoder, what, "Index.open(path, encoder)")

    def add(
        self,
        texts: Sequence[str] | str,
        ids: Sequence[str] | str | None = None,
        metadata: Sequence[Mapping | None] | Mapping | None = None,
        *,
        on_duplicate: OnDuplicate = "error",
        batch_size: int = 32,
        commit_every: int = 256,
        show_progress_bar: bool = False,
    ) -> list[str]:
        """Encode and store documents; returns their ids (generated when ``ids`` is None).

        Commits every ``commit_every`` texts: a crash keeps every batch committed before it, and
        re-running the same add with ``on_duplicate="skip"`` resumes it. An id already present
        raises ``DuplicateIdError`` before anything is written (``"error"``), is left as it is
        (``"skip"``, and not encoded), or is deleted and re-added in the same commit (``"replace"``).
        """
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
        on_duplicate: OnDuplicate = "error",
        commit_every: int = 256,
    ) -> list[str]:
        """Store documents encoded elsewhere (e.g. by ``lfm2edge.distributed``) by this index's model:
        [tokens, dim] arrays (ColBERT) or [dim] vectors (dense). Otherwise as ``add``; ``texts`` are
        stored for the hits when given."""
        self._need_open()
        s = self.settings
        vecs, text_list, metas = vectors_to_add(vectors, texts, metadata, s.kind is ModelKind.LATE_INTERACTION, s.dim)
        return self._add(
            len(vecs), ids, text_list, metas, lambda rows: [vecs[r] for r in rows], on_duplicate, commit_every
        )

    def _add(
        self,
        n: int,
        ids: object,
        texts: Sequence[str | None],
        metas: list[dict | None],
        vectors_of: Callable[[list[int]], list[np.ndarray]],
        on_duplicate: str,
        commit_every: int,
        show_progress_bar: bool = False,
    ) -> list[str]:
        """Store ``n`` documents in commits of ``commit_every``; ``vectors_of`` gives the vectors of the
        positions being committed (encoding them, for ``add``), so skipped ids are never encoded."""
        check_add_options(on_duplicate, commit_every)
        if ids is not None:
            check_ids(ids, n)  # before any work; checked again with the index under the writer lock
        id_list: list[str] = []
        bar = progress_bar(n, show_progress_bar)
        for start in range(0, n, commit_every):
            end = min(start + commit_every, n)
            with self._writing():
                next_id = None
                if start == 0:  # checked under the same lock as the first commit, which reserves generated ids
                    id_list, next_id = self._ids_for(ids, n, on_duplicate)
                rows = [
                    r for r in range(start, end) if on_duplicate != "skip" or id_list[r] not in self._where
                ]
                if start > 0 and on_duplicate == "error" and any(id_list[r] in self._where for r in rows):
                    raise DuplicateIdError(
                        "another writer added some of these ids meanwhile; nothing more was added"
                    )
                if rows:
                    batch = [(id_list[r], texts[r], metas[r]) for r in rows]
                    self._write_batch(batch, vectors_of(rows), next_id)
                    self._merge_small_segments()
            bar(end - start)
        bar(0, close=True)
        return id_list

    def _ids_for(self, ids: object, n: int, on_duplicate: str) -> tuple[list[str], int | None]:
        """The ids of an add (checked, or generated) and the id counter to commit (None: unchanged)."""
        if ids is None:
            return self._new_ids(n)
        id_list = check_ids(ids, n)
        repeated = [d for d, count in Counter(id_list).items() if count > 1]
        if repeated:
            raise DuplicateIdError(f"ids repeated within this call: {repeated[:5]}")
        present = [d for d in id_list if d in self._where]
        if present and on_duplicate == "error":
            raise DuplicateIdError(
                f"{len(present)} id(s) already in the index, e.g. {present[:5]}; pass "
                "on_duplicate='replace' to update them or 'skip' to keep them"
            )
        return id_list, None

    def _new_ids(self, n: int) -> tuple[list[str], int]:
        """``n`` fresh ids ("0", "1", ...) from the manifest's counter, and the counter after them."""
        out, counter = [], int(self._manifest["next_id"])
        while len(out) < n:
            if str(counter) not in self._where:
                out.append(str(counter))
            counter += 1
        return out, counter

    def _write_batch(
        self, batch: list[tuple[str, str | None, dict | None]], vectors: list[np.ndarray], next_id: int | None
    ) -> None:
        """Write one segment of ``batch`` (id, text, metadata) with its vectors and commit it, replacing
        the documents of the same ids."""
        s = self.settings
        if s.kind is ModelKind.LATE_INTERACTION:
            docs = [pool_tokens(d, s.pool_factor) for d in vectors] if s.pool_factor > 1 else vectors
            rows, lengths = np.concatenate(docs), np.array([len(d) for d in docs])
        else:
            rows = normalize_rows(np.stack(vectors))
            lengths = np.ones(len(rows), dtype=np.int64)
        if s.dtype == "int8":
            stored, scales = quantize_int8(rows)
        else:
            stored, scales = rows.astype(np.float16), None
        seg = write_segment(
            self.path,
            f"{self.generation + 1:08d}-{secrets.token_hex(4)}",
            stored,
            scales,
            lengths,
            [d for d, _, _ in batch],
            [record_line(t if s.store_texts else None, m) for _, t, m in batch],
        )
        replaced = self._tombstoned({d for d, _, _ in batch if d in self._where})
        self._commit([*replaced, seg], next_id)

    def _tombstoned(self, doc_ids: set[str]) -> list[Segment]:
        """The current segments with ``doc_ids`` marked deleted."""
        rows: dict[str, list[int]] = {}
        for d in doc_ids:
            name, row = self._where[d]
            rows.setdefault(name, []).append(row)
        out = []
        for seg in self._segments:
            if seg.name in rows:
                deleted = seg.deleted.copy()
                deleted[rows[seg.name]] = True
                seg = replace_deleted(seg, deleted)
            out.append(seg)
        return out

    def delete(self, ids: Sequence[str] | str, missing_ok: bool = False) -> int:
        """Delete documents by id in one commit; returns how many were deleted.

        Unknown ids raise ``InvalidInputError`` (nothing is deleted) unless ``missing_ok``.
        """
        self._need_open()
        if isinstance(ids, str):
            ids = [ids]
        if isinstance(ids, (bytes, bytearray)) or not isinstance(ids, (Sequence, np.ndarray)):
            raise InvalidInputError(f"ids must be a string or a list of strings, not {type(ids).__name__}")
        ids = [check_id(d, f"id {i}") for i, d in enumerate(ids)]
        with self._writing():
            missing = [d for d in ids if d not in self._where]
            if missing and not missing_ok:
                raise InvalidInputError(
                    f"{len(missing)} id(s) are not in the index, e.g. {missing[:5]}; nothing was deleted"
                )
            present = {d for d in ids if d in self._where}
            if present:
                self._commit([s for s in self._tombstoned(present) if s.live])
        return len(present)

    def compact(self) -> None:
        """Rewrite every live document into one segment, reclaiming deleted space."""
        self._need_open()
        with self._writing():
            if len(self._segments) > 1 or any(s.deleted.any() for s in self._segments):
                self._merge(list(self._segments))

    def _merge_small_segments(self) -> None:
        """Keep at most MAX_SEGMENTS segments (the caller holds the write lock)."""
        while len(self._segments) > MAX_SEGMENTS:
            by_size = sorted(self._segments, key=lambda s: int(s.offsets[-1]))
            self._merge(by_size[:MERGE_WIDTH])

    def _merge(self, group: list[Segment]) -> None:
        """Replace ``group`` by one segment of its live documents (stored rows copied, never re-quantized)."""
        names = {s.name for s in group}
        parts: list[tuple[np.ndarray, np.ndarray | None, np.ndarray]] = []
        ids: list[str] = []
        lines: list[bytes] = []
        for seg in group:
            seg.check_mapped()  # its files are about to be read through their mappings
            keep = ~seg.deleted
            if not keep.any():
                continue
            lengths = np.diff(seg.offsets)
            rows = np.repeat(keep, lengths)
            parts.append((seg.vectors[rows], None if seg.scales is None else seg.scales[rows], lengths[keep]))
            ids.extend(d for d, k in zip(seg.ids, keep, strict=True) if k)
            lines.extend(bytes(seg.docs[seg.lines[r] : seg.lines[r + 1]]) for r in np.flatnonzero(keep))
        kept = [s for s in self._segments if s.name not in names]
        if parts:
            kept.append(
                write_segment(
                    self.path,
                    f"{self.generation + 1:08d}-{secrets.token_hex(4)}",
                    np.concatenate([p[0] for p in parts]),
                    None if parts[0][1] is None else np.concatenate([p[1] for p in parts]),
                    np.concatenate([p[2] for p in parts]),
                    ids,
                    lines,
                )
            )
        self._commit(kept)

    # -- searching ----------------------------------------------------------------------------------------

    def search(self, query: str, k: int = 10, *, where: Mapping[str, Any] | None = None) -> list[Hit]:
        """The ``k`` best documents for ``query``, best first; ``where`` keeps only documents whose
        metadata matches (``lfm2edge.runtime.storage.filters``)."""
        if not isinstance(query, str):
            raise InvalidInputError(
                f"query must be a string, not {type(query).__name__}; use search_many for lists"
            )
        return self.search_many([check_text(query, "query")], k, where=where)[0]

    def search_many(
        self,
        queries: Sequence[str],
        k: int = 10,
        batch_size: int = 32,
        *,
        where: Mapping[str, Any] | None = None,
    ) -> list[list[Hit]]:
        """One hit list per query; queries are encoded in batches and scored together."""
        encoder = self._need_encoder("searching")
        queries, _ = check_texts(queries, "query")
        if not isinstance(k, int) or isinstance(k, bool) or k < 1:
            raise InvalidInputError(f"k must be a positive integer, got {k!r}")
        check_where(where)  # before the queries are encoded
        if not queries:
            return []
        vectors = encoder.encode_query(queries, batch_size=batch_size)
        return self.search_vectors(vectors if isinstance(vectors, list) else list(vectors), k, where=where)

    def search_vectors(
        self, queries: Sequence[np.ndarray], k: int = 10, *, where: Mapping[str, Any] | None = None
    ) -> list[list[Hit]]:
        """Search with query vectors already encoded: [tokens, dim] matrices (ColBERT) or [dim] vectors."""
        self._need_open()
        if not isinstance(k, int) or isinstance(k, bool) or k < 1:
            raise InvalidInputError(f"k must be a positive integer, got {k!r}")
        conditions = check_where(where)
        late = self.settings.kind is ModelKind.LATE_INTERACTION
        qs = [query_array(q, i, late, self.settings.dim) for i, q in enumerate(query_list(queries))]
        self._refresh_if_changed()
        segments = self._segments  # one consistent snapshot, even while others write
        for seg in segments:
            seg.check_mapped()  # a file that shrank under its mapping would fault (SIGBUS) when read
        hits: list[list[Hit]] = []
        for g in range(0, len(qs), QUERY_GROUP):
            hits.extend(self._search_group(segments, qs[g : g + QUERY_GROUP], k, late, conditions))
        return hits

    def _excluded(self, seg: Segment, conditions: Where) -> np.ndarray:
        """The rows of ``seg`` that are deleted or whose metadata fails ``conditions``."""
        if not conditions:
            return seg.deleted
        metadata = self._metadata.get(seg.name)
        if metadata is None:  # segments are immutable: parse their metadata once
            metadata = [seg.record(r).get("metadata") for r in range(len(seg.ids))]
            self._metadata[seg.name] = metadata
        failing = np.fromiter((not matches(m, conditions) for m in metadata), dtype=bool, count=len(metadata))
        return seg.deleted | failing

    def _score_segment(self, seg: Segment, qcat: np.ndarray, starts: np.ndarray, late: bool) -> np.ndarray:
        """Scores [docs, queries] of one segment for the queries stacked in ``qcat`` (query i from row
        ``starts[i]``): MaxSim for ColBERT, dot products of unit vectors for dense models."""
        n_docs = len(seg.ids)
        if late and seg.scales is None and n_docs and kernel_path(seg.vectors.shape[1]):
            # float16 MaxSim: the kernel reads the mapped segment in place, one query at a time. The packed
            # segment is kept: the kernel keeps the rows' int8 codes with it (segments never change).
            held = self._packed.get(seg.name)
            if held is None or held[0] is not seg.vectors:
                held = self._packed[seg.name] = (seg.vectors, PackedDocuments(seg.vectors, seg.offsets))
            packed = held[1]
            out = np.empty((n_docs, len(starts)), dtype=np.float32)
            for i, (a, b) in enumerate(pairwise([*starts, len(qcat)])):
                out[:, i] = maxsim(qcat[a:b], packed, backend="kernel")
            return out
        return maxsim_blocked(qcat, starts, seg.offsets, seg.rows)

    def _search_group(
        self, segments: tuple[Segment, ...], qs: list[np.ndarray], k: int, late: bool, conditions: Where
    ) -> list[list[Hit]]:
        if late:
            qcat = np.concatenate(qs)
            starts = np.cumsum([0] + [len(q) for q in qs[:-1]])
        else:  # one unit vector per query against one row per document: MaxSim is the cosine
            qcat = normalize_rows(np.stack(qs))
            starts = np.arange(len(qs))
        parts = []
        for seg in segments:
            scores = self._score_segment(seg, qcat, starts, late)
            scores[self._excluded(seg, conditions)] = -np.inf
            parts.append(scores)
        if not parts:
            return [[] for _ in qs]
        scores = np.concatenate(parts)  # [docs, queries]
        bounds = np.cumsum([0] + [len(s.ids) for s in segments])
        k = min(k, sum(s.live for s in segments))
        out = []
        for col in range(len(qs)):
            column = scores[:, col]
            top = np.argpartition(-column, k - 1)[:k] if 0 < k < len(column) else np.arange(len(column))
            top = top[np.lexsort((top, -column[top]))]  # best first; ties in index order
            found = []
            for pos in top[:k]:
                if not np.isfinite(column[pos]):
                    continue
                s = int(np.searchsorted(bounds, pos, side="right")) - 1
                seg, row = segments[s], int(pos - bounds[s])
                rec = seg.record(row)
                found.append(Hit(seg.ids[row], float(column[pos]), rec.get("text"), rec.get("metadata")))
            out.append(found)
        return out

    # -- inspecting ---------------------------------------------------------------------------------------

    def info(self) -> dict[str, Any]:
        s = self.settings
        segments = self._segments
        return {
            "path": str(self.path),
            "format_version": self._manifest["version"],
            "generation": self.generation,
            "kind": s.kind.value,
            "dim": s.dim,
            "dtype": s.dtype,
            "pool_factor": s.pool_factor,
            "store_texts": s.store_texts,
            "model_identity": s.identity,
            "model_path": s.model_path,
            "documents": sum(x.live for x in segments),
            "deleted": sum(int(x.deleted.sum()) for x in segments),
            "segments": len(segments),
            "vectors": sum(int(x.offsets[-1]) for x in segments),
            "bytes": sum(size for x in segments for size, _ in x.files.values()),
        }

    def verify(self) -> list[str]:
        """Check the index on disk against its manifest and re-hash every segment file; the problems
        found (empty: intact). A damaged manifest is reported here, not raised."""
        self._need_open()
        problems = []
        try:
            self.refresh()  # re-reads and checks the manifest, and adopts other processes' commits
        except (IndexCorruptError, OSError) as e:
            problems.append(str(e))
        for seg in self._segments:
            problems += [problem for m in seg.mapped if (problem := m.problem())]
            for fname, (size, digest) in seg.files.items():
                p = self.path / SEGMENTS / seg.name / fname
                try:
                    if not p.is_file():
                        problems.append(f"{p} is missing")
                    elif p.stat().st_size != size or sha256(p) != digest:
                        problems.append(f"{p} does not match its checksum")
                except OSError as e:
                    problems.append(f"{p} cannot be read ({e})")
        return problems

    def close(self) -> None:
        """Drop the memory maps; the index object is unusable afterwards."""
        self._segments, self._where, self.encoder, self._closed = (), {}, None, True
        self._metadata, self._packed = {}, {}

    def __enter__(self) -> Index:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        s = self.settings
        return (
            f"Index({str(self.path)!r}, {len(self)} documents, {s.kind.value}, {s.dtype}, "
            f"pool_factor={s.pool_factor})"
        )
