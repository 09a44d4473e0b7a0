"""How an index lives on disk: segment folders, the manifest, durable writes, the writer lock.

``lfm2edge.runtime.index.Index`` decides what to commit; this module writes, opens, checks and
cleans up the files. Folder layout (format version 1)::

    INDEX/
      manifest.json     the committed state, replaced atomically (temp file, fsync, os.replace, fsync dir)
      .lock             inter-process writer lock
      segments/NAME/    one immutable batch of documents; fully written and fsynced before the
                        manifest names it, so a crash leaves at most an unnamed folder (removed later)
        vectors.npy     [rows, dim] float16 | int8. ColBERT: the kept token vectors; dense: one row per doc
        scales.npy      [rows] float32, int8 only: the stored vector is vectors[r] * scales[r]
        offsets.npy     [docs + 1] int64: document i owns rows offsets[i]:offsets[i + 1]
        ids.json        [docs] document ids
        docs.jsonl      one {"text", "metadata"} object per document
        lines.npy       [docs + 1] int64 byte offsets of those lines

``manifest.json`` names the model (the GGUF identity hash, kind, dim), the storage settings, and
each committed segment with its file sizes and SHA-256 and its deleted rows (tombstones). A
commit is one manifest replacement (``write_manifest``), so every add batch, delete and merge is
all-or-nothing.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import secrets
import shutil
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from lfm2edge.runtime.errors import Lfm2EdgeError
from lfm2edge.runtime.settings import ModelKind

try:  # POSIX
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]
    import msvcrt

FORMAT = "lfm2edge-index"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
SEGMENTS = "segments"
LOCK = ".lock"
TMP_PREFIX = ".tmp-"
DTYPES = ("float16", "int8")
T = TypeVar("T")


class IndexCorruptError(Lfm2EdgeError):
    """The folder is not an lfm2edge index, or its files are damaged or missing."""


@dataclass(frozen=True)
class Segment:
    """One committed, immutable batch of documents, memory-mapped; ``deleted`` is this commit's tombstones."""

    name: str
    ids: tuple[str, ...]
    vectors: np.ndarray
    scales: np.ndarray | None
    offsets: np.ndarray
    lines: np.ndarray
    docs: np.ndarray  # docs.jsonl as uint8, memory-mapped: stays readable after a merge unlinks it
    deleted: np.ndarray  # bool [docs]
    files: Mapping[str, tuple[int, str]]  # file name -> (size, sha256)

    @property
    def live(self) -> int:
        return len(self.ids) - int(self.deleted.sum())

    def record(self, row: int) -> dict[str, Any]:
        return json.loads(bytes(self.docs[self.lines[row] : self.lines[row + 1]]))

    def rows(self, lo: int, hi: int) -> np.ndarray:
        """Stored vectors lo:hi widened to float32 (dequantized when int8)."""
        block = self.vectors[lo:hi].astype(np.float32)
        if self.scales is not None:
            block *= self.scales[lo:hi, None]
        return block


def replace_deleted(seg: Segment, deleted: np.ndarray) -> Segment:
    return replace(seg, deleted=deleted)


def corrupt(path: Path, problem: str) -> IndexCorruptError:
    return IndexCorruptError(
        f"the index at {path} is damaged: {problem}. It was changed by something other than lfm2edge "
        "(or the disk lost data); restore the folder from a backup or rebuild it with "
        "`lfm2edge index create`."
    )


# ----------------------------------------------------------------------------------------------------------
# Files: durable writes, checksums, the writer lock
# ----------------------------------------------------------------------------------------------------------


def fsync_dir(path: Path) -> None:
    if os.name == "nt":  # pragma: no cover - directories cannot be opened for fsync there
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_durable(path: Path, data: bytes) -> tuple[int, str]:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    return len(data), hashlib.sha256(data).hexdigest()


def _npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(array), allow_pickle=False)
    return buf.getvalue()


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


@contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """An exclusive lock between processes (threads are serialised by the Index's own lock)."""
    with open(path, "a+b") as f:
        if fcntl is not None:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        else:  # pragma: no cover - Windows
            f.seek(0)
            while True:
                try:
                    msvcrt.locking(f.fileno(), msvcrt.LK_LOCK, 1)
                    break
                except OSError:
                    continue
        try:
            yield
        finally:
            if fcntl is not None:
                fcntl.flock(f.fileno(), fcntl.LOCK_UN)
            else:  # pragma: no cover - Windows
                f.seek(0)
                msvcrt.locking(f.fileno(), msvcrt.LK_UNLCK, 1)


# ----------------------------------------------------------------------------------------------------------
# Segments and the manifest on disk
# ----------------------------------------------------------------------------------------------------------


def record_line(text: str | None, metadata: Mapping | None) -> bytes:
    return (
        json.dumps({"text": text, "metadata": metadata}, ensure_ascii=False, allow_nan=False).encode() + b"\n"
    )


def write_segment(
    root: Path,
    name: str,
    vectors: np.ndarray,
    scales: np.ndarray | None,
    lengths: np.ndarray,
    ids: Sequence[str],
    lines: Sequence[bytes],
) -> Segment:
    """Write a segment folder durably (temp name, fsync, rename) and open it; the caller commits it."""
    tmp = root / SEGMENTS / f"{TMP_PREFIX}{name}"
    final = root / SEGMENTS / name
    tmp.mkdir(parents=True)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    arrays = {"vectors.npy": vectors, "offsets.npy": offsets}
    if scales is not None:
        arrays["scales.npy"] = scales.astype(np.float32)
    arrays["lines.npy"] = np.concatenate([[0], np.cumsum([len(x) for x in lines])]).astype(np.int64)
    files = {fname: write_durable(tmp / fname, _npy_bytes(a)) for fname, a in arrays.items()}
    files["ids.json"] = write_durable(tmp / "ids.json", json.dumps(list(ids), ensure_ascii=False).encode())
    files["docs.jsonl"] = write_durable(tmp / "docs.jsonl", b"".join(lines))
    fsync_dir(tmp)
    os.replace(tmp, final)
    fsync_dir(final.parent)
    entry = {"name": name, "docs": len(ids), "rows": int(offsets[-1]), "files": files}
    return open_segment(root, entry, {"storage": {"dtype": str(vectors.dtype)}})


def open_segment(root: Path, entry: dict, manifest: dict) -> Segment:
    """Open a committed segment, checking it against its manifest entry (cheap checks: sizes, shapes)."""
    folder = root / SEGMENTS / str(entry.get("name"))
    files = {k: (int(v[0]), str(v[1])) for k, v in entry["files"].items()}
    for fname, (size, _) in files.items():
        p = folder / fname
        if not p.is_file():
            raise corrupt(root, f"{p} is missing")
        if p.stat().st_size != size:
            raise corrupt(root, f"{p} has {p.stat().st_size} bytes, the manifest says {size}")
    try:
        vectors = np.load(folder / "vectors.npy", mmap_mode="r", allow_pickle=False)
        scales = (
            np.load(folder / "scales.npy", mmap_mode="r", allow_pickle=False)
            if "scales.npy" in files
            else None
        )
        offsets = np.load(folder / "offsets.npy", allow_pickle=False)
        lines = np.load(folder / "lines.npy", allow_pickle=False)
        ids = tuple(json.loads((folder / "ids.json").read_text(encoding="utf-8")))
        docs = np.memmap(folder / "docs.jsonl", dtype=np.uint8, mode="r")
    except (OSError, ValueError) as e:
        raise corrupt(root, f"segment {folder.name} cannot be read ({e})") from None
    n, rows, dtype = int(entry["docs"]), int(entry["rows"]), manifest["storage"]["dtype"]
    ok = (
        vectors.ndim == 2
        and vectors.shape[0] == rows
        and vectors.dtype == np.dtype(dtype)
        and (scales is None) == (dtype != "int8")
        and (scales is None or scales.shape == (rows,))
        and offsets.shape == (n + 1,)
        and offsets[0] == 0
        and offsets[-1] == rows
        and bool(np.all(np.diff(offsets) > 0))
        and lines.shape == (n + 1,)
        and lines[-1] == len(docs)
        and len(ids) == n
        and all(isinstance(d, str) for d in ids)
    )
    if not ok:
        raise corrupt(root, f"segment {folder.name} is inconsistent with the manifest")
    return Segment(
        str(entry["name"]), ids, vectors, scales, offsets, lines, docs, np.zeros(n, dtype=bool), files
    )


def read_manifest(path: Path) -> dict:
    manifest_path = path / MANIFEST
    if not path.is_dir():
        raise IndexCorruptError(
            f"{path} does not exist or is not a folder; create an index with `lfm2edge index create`"
        )
    if not manifest_path.is_file():
        raise IndexCorruptError(
            f"{path} is not an lfm2edge index (it has no {MANIFEST}); "
            "create one with `lfm2edge index create` "
            "or Index.create"
        )
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise corrupt(path, f"{MANIFEST} cannot be read ({e})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise IndexCorruptError(f"{path}/{MANIFEST} is not an lfm2edge index manifest (no format '{FORMAT}')")
    if manifest.get("version") != FORMAT_VERSION:
        raise IndexCorruptError(
            f"{path} is index format version {manifest.get('version')}; "
            f"this lfm2edge reads version {FORMAT_VERSION}. "
            "Upgrade lfm2edge or rebuild the index."
        )
    try:
        ModelKind(manifest["model"]["kind"])
        int(manifest["model"]["dim"]), str(manifest["model"]["identity"]), int(manifest["generation"])
        if manifest["storage"]["dtype"] not in DTYPES:
            raise ValueError(f"unknown dtype {manifest['storage']['dtype']!r}")
        int(manifest["storage"]["pool_factor"]), int(manifest["next_id"])
        for e in manifest["segments"]:
            str(e["name"]), int(e["docs"]), int(e["rows"]), dict(e["files"]), list(e.get("deleted", []))
    except (KeyError, TypeError, ValueError) as e:
        raise corrupt(path, f"{MANIFEST} lacks or mangles a field ({e!r})") from None
    return manifest


def manifest_stamp(path: Path) -> tuple[int, int]:
    """Identifies one manifest file: each commit replaces it by a new file (new inode)."""
    st = os.stat(path / MANIFEST)
    return st.st_ino, st.st_mtime_ns


def consistently(path: Path, use: Callable[[dict], T]) -> T:
    """``use(manifest)`` on the current manifest, again if a commit elsewhere removed a segment meanwhile."""
    for attempt in range(3):
        manifest = read_manifest(path)
        try:
            return use(manifest)
        except IndexCorruptError:
            if attempt == 2 or read_manifest(path)["generation"] == manifest["generation"]:
                raise
    raise AssertionError("unreachable")


def write_manifest(path: Path, manifest: dict) -> None:
    """The commit point: the new manifest is complete on disk before it replaces the old one."""
    tmp = path / f"{MANIFEST}{TMP_PREFIX}{os.getpid()}-{secrets.token_hex(4)}"
    write_durable(tmp, json.dumps(manifest, indent=1, ensure_ascii=False).encode())
    os.replace(tmp, path / MANIFEST)
    fsync_dir(path)


def remove_orphans(path: Path, committed: set[str]) -> None:
    """Delete what crashed or superseded writes left: temp manifests, unnamed or merged segments."""
    for p in path.glob(f"{MANIFEST}{TMP_PREFIX}*"):
        p.unlink(missing_ok=True)
    segments = path / SEGMENTS
    if not segments.is_dir():
        raise corrupt(path, f"the {SEGMENTS}/ folder is missing")
    for p in segments.iterdir():
        if p.is_dir() and p.name not in committed:
            shutil.rmtree(p, ignore_errors=True)  # a reader elsewhere keeps its memory maps alive
