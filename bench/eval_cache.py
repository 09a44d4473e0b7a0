"""Document encodings cached per model content and dataset, so a run with another query-side option
(or a second run) encodes only the queries.

    <cache>/gguf-<model identity>/<corpus hash>/<storage>-pool<k>/   an lfm2edge Index (no texts)
    <cache>/reference-<checkpoint hash>/<corpus hash>.npz            the PyTorch reference's float32 vectors

The model identity is the GGUF's content hash (tensors and retrieval settings, the one the Index checks);
the checkpoint hash covers every file of the folder; the corpus hash is corpus.jsonl's. An entry is built
under a temporary name and renamed when complete, so an interrupted run never leaves a partial entry
under the final name; a damaged entry is rebuilt.
"""

from __future__ import annotations

import hashlib
import os
import secrets
import shutil
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lfm2edge.bench.eval_data import Dataset
from lfm2edge.runtime.core.progress import progress_bar
from lfm2edge.runtime.storage.index import Index, IndexCorruptError

DEFAULT_CACHE_DIR = Path.home() / ".cache" / "lfm2edge" / "eval"
KEY_CHARS = 16  # of a sha256: enough to tell models and corpora apart, short enough to read


@dataclass(frozen=True)
class CachedIndex:
    path: Path
    encoded: int  # documents encoded by this call (0: the cache had them)


@dataclass(frozen=True)
class CachedVectors:
    vectors: np.ndarray  # float32 [rows, dim]; document i owns rows offsets[i]:offsets[i + 1]
    offsets: np.ndarray  # int64 [documents + 1]
    encoded: int


def folder_hash(folder: Path) -> str:
    """sha256 over every file's relative path and bytes (a checkpoint folder, links followed)."""
    h = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and ".cache" not in p.parts):
        h.update(f"{path.relative_to(folder).as_posix()}\n".encode())
        with path.open("rb") as f:
            for block in iter(lambda: f.read(1 << 22), b""):
                h.update(block)
    return h.hexdigest()


def document_index(
    cache_dir: Path,
    encoder,
    identity: str,
    dataset: Dataset,
    storage: str,
    pool_factor: int,
    progress: bool,
    log: Callable[[str], None],
) -> CachedIndex:
    """The cached Index of ``dataset``'s documents for this model and storage, built if missing."""
    final = cache_dir / f"gguf-{identity}" / dataset.fingerprint[:KEY_CHARS] / f"{storage}-pool{pool_factor}"
    if final.exists():
        if _usable(final, identity, len(dataset.doc_ids)):
            return CachedIndex(final, 0)
        log(f"the cached encodings at {final} are damaged or incomplete; encoding again")
        shutil.rmtree(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    log(f"encoding {len(dataset.doc_ids)} documents ({storage}, pool {pool_factor})")
    tmp = final.with_name(f".{final.name}.tmp-{secrets.token_hex(4)}")
    try:
        with Index.create(tmp, encoder, dtype=storage, pool_factor=pool_factor, store_texts=False) as index:
            index.add(list(dataset.doc_texts), ids=list(dataset.doc_ids), show_progress_bar=progress)
        _publish_folder(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return CachedIndex(final, len(dataset.doc_ids))


def _usable(path: Path, identity: str, n_documents: int) -> bool:
    try:
        with Index.open(path) as index:
            return index.settings.identity == identity and len(index) == n_documents
    except (IndexCorruptError, OSError):
        return False


def _publish_folder(tmp: Path, final: Path) -> None:
    try:
        os.rename(tmp, final)
    except OSError:
        if not final.is_dir():  # else another run published the same encodings meanwhile: use theirs
            raise


def reference_documents(
    cache_dir: Path,
    reference,
    checkpoint_hash: str,
    dataset: Dataset,
    progress: bool,
    log: Callable[[str], None],
) -> CachedVectors:
    """The PyTorch reference's document vectors for ``dataset`` (one row per document when dense)."""
    final = cache_dir / f"reference-{checkpoint_hash[:KEY_CHARS]}" / f"{dataset.fingerprint[:KEY_CHARS]}.npz"
    if final.is_file():
        cached = _read_vectors(final, len(dataset.doc_ids))
        if cached is not None:
            return cached
        log(f"the cached encodings at {final} are damaged; encoding again")
    log(f"encoding {len(dataset.doc_ids)} documents (PyTorch reference, float32)")
    docs = []
    bar = progress_bar(len(dataset.doc_texts), progress)
    for text in dataset.doc_texts:
        v = np.asarray(reference.encode_document(text), dtype=np.float32)
        docs.append(v if v.ndim == 2 else v[None, :])
        bar(1)
    bar(0, close=True)
    vectors = np.concatenate(docs)
    offsets = np.cumsum([0] + [len(d) for d in docs]).astype(np.int64)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f".{final.name}.tmp-{secrets.token_hex(4)}")
    try:
        with tmp.open("wb") as f:
            np.savez(f, vectors=vectors, offsets=offsets)
        os.replace(tmp, final)
    finally:
        tmp.unlink(missing_ok=True)
    return CachedVectors(vectors, offsets, len(docs))


def _read_vectors(path: Path, n_documents: int) -> CachedVectors | None:
    try:
        with np.load(path, allow_pickle=False) as data:
            vectors, offsets = data["vectors"], data["offsets"]
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
        return None
    ok = (
        vectors.ndim == 2 and vectors.dtype == np.float32 and offsets.shape == (n_documents + 1,)
        and offsets[0] == 0 and offsets[-1] == len(vectors) and bool((np.diff(offsets) > 0).all())
    )
    return CachedVectors(vectors, offsets.astype(np.int64), 0) if ok else None
