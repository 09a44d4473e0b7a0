"""How an index lives on disk: segment folders, the manifest, durable writes, the writer lock.

``lfm2edge.runtime.storage.index.Index`` decides what to commit; this module writes, opens, checks and
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

Nothing on disk is trusted: the manifest is checked field by field (types, ranges, unknown or
repeated entries, segment names that could leave the folder), and each segment file against it
(kind, size, the shape and type in its .npy header) before a byte of it is mapped. A mapped file
that shrinks later would fault (SIGBUS) when read, so ``Segment.check_mapped`` re-reads each
mapping's file size before a search touches it. Every such problem is an ``IndexCorruptError``.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import mmap
import os
import re
import secrets
import shutil
import stat
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
from filelock import FileLock

from lfm2edge.runtime.core.errors import Lfm2EdgeError
from lfm2edge.runtime.core.settings import ModelKind

FORMAT = "lfm2edge-index"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
SEGMENTS = "segments"
LOCK = ".lock"
TMP_PREFIX = ".tmp-"
DTYPES = ("float16", "int8")
T = TypeVar("T")
# What lfm2edge names segments: f"{generation:08d}-{4 random bytes in hex}". Anything else (a path
# separator, "..") is refused before it is joined to a path.
SEGMENT_NAME = re.compile(r"[0-9]{8,19}-[0-9a-f]{8}")
SEGMENT_FILES = ("vectors.npy", "offsets.npy", "lines.npy", "ids.json", "docs.jsonl")  # + scales.npy (int8)
# Counts and byte sizes above this are not ones lfm2edge wrote (and JSON loses exactness beyond it).
MAX_COUNT = 2**53 - 1
MAX_DIM = 1 << 16
MAX_POOL_FACTOR = 1 << 10


class IndexCorruptError(Lfm2EdgeError):
    """The folder is not an lfm2edge index, or its files are damaged or missing."""


@dataclass(frozen=True)
class MappedFile:
    """A read-only memory map of a segment file and the size it had when checked."""

    path: Path
    size: int
    map: mmap.mmap  # holds its own duplicate of the file descriptor: size() is fstat on the mapped file

    def problem(self) -> str | None:
        """Why reading the mapping could fault now (the file shrank or changed), or None."""
        try:
            now = self.map.size()
        except (OSError, ValueError) as e:
            return f"{self.path} cannot be checked ({e})"
        if now != self.size:
            return (
                f"{self.path} changed size while the index was open "
                f"({now} bytes, the manifest says {self.size})"
            )
        return None


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
    folder: Path = Path()
    mapped: tuple[MappedFile, ...] = ()

    @property
    def live(self) -> int:
        return len(self.ids) - int(self.deleted.sum())

    @property
    def root(self) -> Path:
        return self.folder.parent.parent

    def check_mapped(self) -> None:
        """IndexCorruptError if a mapped file changed size since it was opened: reading it could fault."""
        for m in self.mapped:
            problem = m.problem()
            if problem:
                raise corrupt(self.root, problem)

    def record(self, row: int) -> dict[str, Any]:
        """Document ``row``'s {"text", "metadata"}; IndexCorruptError if lfm2edge did not write that line."""
        line = bytes(self.docs[self.lines[row] : self.lines[row + 1]])
        try:
            rec = json.loads(line)
        except (ValueError, RecursionError) as e:  # JSONDecodeError, UnicodeDecodeError, absurd nesting
            raise corrupt(
                self.root, f"{self.folder / 'docs.jsonl'} line {row} cannot be read ({e})"
            ) from None
        if (
            not isinstance(rec, dict)
            or not isinstance(rec.get("text"), (str, type(None)))
            or not isinstance(rec.get("metadata"), (dict, type(None)))
        ):
            raise corrupt(
                self.root, f"{self.folder / 'docs.jsonl'} line {row} is not a {{text, metadata}} record"
            )
        return rec

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


def writer_lock(root: Path) -> FileLock:
    """The index's lock between processes (flock on POSIX, LockFileEx on Windows: filelock's); threads
    are serialised by the Index's own lock."""
    return FileLock(root / LOCK)


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
    return open_segment(root, entry, str(vectors.dtype), int(vectors.shape[1]))


def open_segment(root: Path, entry: Mapping[str, Any], dtype: str, dim: int) -> Segment:
    """Open a committed segment whose manifest entry passed ``check_manifest``.

    Each file is checked against the entry (a regular file of the recorded size; .npy headers of
    the expected type and shape, their data exactly filling the file) before it is mapped or read,
    then the contents that index arithmetic relies on (offsets, line starts, ids).
    """
    name, n, rows = entry["name"], entry["docs"], entry["rows"]
    if not SEGMENT_NAME.fullmatch(str(name)):  # also checked with the manifest: never join a path with it
        raise corrupt(
            root, f"{MANIFEST} names a segment {str(name)!r:.80}, not a segment name lfm2edge writes"
        )
    folder = root / SEGMENTS / name
    files = {k: (int(v[0]), str(v[1])) for k, v in entry["files"].items()}
    for fname, (size, _) in files.items():
        _check_file(root, folder / fname, size)
    layouts = {
        "vectors.npy": (np.dtype(dtype), (rows, dim)),
        "offsets.npy": (np.dtype(np.int64), (n + 1,)),
        "lines.npy": (np.dtype(np.int64), (n + 1,)),
    }
    if "scales.npy" in files:
        layouts["scales.npy"] = (np.dtype(np.float32), (rows,))
    starts = {
        f: _npy_data_start(root, folder / f, want, shape, files[f][0]) for f, (want, shape) in layouts.items()
    }
    mapped: list[MappedFile] = []

    def mapped_array(fname: str, dtype_: np.dtype, shape: tuple[int, ...]) -> np.ndarray:
        m = _map(root, folder / fname, files[fname][0])
        mapped.append(m)
        count = math.prod(shape)
        return np.frombuffer(m.map, dtype=dtype_, count=count, offset=starts.get(fname, 0)).reshape(shape)

    try:
        vectors = mapped_array("vectors.npy", *layouts["vectors.npy"])
        scales = mapped_array("scales.npy", *layouts["scales.npy"]) if "scales.npy" in files else None
        docs = mapped_array("docs.jsonl", np.dtype(np.uint8), (files["docs.jsonl"][0],))
        offsets = _read_npy(folder / "offsets.npy", starts["offsets.npy"], n + 1)
        lines = _read_npy(folder / "lines.npy", starts["lines.npy"], n + 1)
        ids = json.loads((folder / "ids.json").read_bytes().decode("utf-8"))
    except (OSError, ValueError, RecursionError) as e:  # ValueError: JSONDecodeError, UnicodeDecodeError
        raise corrupt(root, f"segment {name} cannot be read ({e})") from None
    # The index arithmetic reads rows and lines by these: they must split the files exactly.
    if offsets[0] != 0 or offsets[-1] != rows or not bool(np.all(np.diff(offsets) > 0)):
        raise corrupt(root, f"{folder / 'offsets.npy'} does not split {rows} rows into {n} documents")
    if lines[0] != 0 or lines[-1] != len(docs) or not bool(np.all(np.diff(lines) > 0)):
        raise corrupt(root, f"{folder / 'lines.npy'} does not split docs.jsonl into {n} lines")
    problem = _ids_problem(ids, n)
    if problem:
        raise corrupt(root, f"{folder / 'ids.json'} {problem}")
    return Segment(
        str(name),
        tuple(ids),
        vectors,
        scales,
        offsets,
        lines,
        docs,
        np.zeros(n, dtype=bool),
        files,
        folder,
        tuple(mapped),
    )


def _check_file(root: Path, path: Path, size: int) -> None:
    """A regular file of ``size`` bytes (a FIFO or device would block or lie), or IndexCorruptError."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise corrupt(root, f"{path} is missing") from None
    except OSError as e:
        raise corrupt(root, f"{path} cannot be read ({e})") from None
    if not stat.S_ISREG(st.st_mode):
        raise corrupt(root, f"{path} is not a regular file")
    if st.st_size != size:
        raise corrupt(root, f"{path} has {st.st_size} bytes, the manifest says {size}")


def _npy_data_start(root: Path, path: Path, dtype: np.dtype, shape: tuple[int, ...], size: int) -> int:
    """Where the data of a .npy file starts, after checking that its header says ``dtype`` and ``shape``
    in C order and that the data fills the rest of its ``size`` bytes exactly."""
    try:
        with open(path, "rb") as f:
            version = np.lib.format.read_magic(f)
            if version == (1, 0):
                header = np.lib.format.read_array_header_1_0(f)
            elif version == (2, 0):
                header = np.lib.format.read_array_header_2_0(f)
            else:
                raise ValueError(f"unsupported .npy version {version}")
            start = f.tell()
    except (OSError, ValueError, SyntaxError, TypeError) as e:  # numpy wraps most as ValueError
        raise corrupt(root, f"{path} is not a .npy file lfm2edge wrote ({e})") from None
    got_shape, fortran, got_dtype = header
    if got_dtype != dtype or fortran or tuple(got_shape) != shape:
        raise corrupt(
            root,
            f"{path} holds {got_dtype} {tuple(got_shape)}, the manifest implies {dtype} {shape} in C order",
        )
    if start + math.prod(shape) * dtype.itemsize != size:
        raise corrupt(root, f"{path} has {size} bytes, which its shape {shape} does not fill exactly")
    return start


def _map(root: Path, path: Path, size: int) -> MappedFile:
    with open(path, "rb") as f:
        m = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    mapped = MappedFile(path, size, m)
    problem = mapped.problem()  # the file may have changed since it was checked
    if problem:
        raise corrupt(root, problem)
    return mapped


def _read_npy(path: Path, start: int, count: int) -> np.ndarray:
    """A checked int64 .npy file read into memory (small: one entry per document), read-only."""
    with open(path, "rb") as f:
        f.seek(start)
        data = f.read(count * 8)
    if len(data) != count * 8:
        raise ValueError(f"{path.name} is shorter than its header says")
    return np.frombuffer(data, dtype=np.int64)


def _ids_problem(ids: object, n: int) -> str | None:
    if not isinstance(ids, list) or len(ids) != n:
        return f"does not list {n} ids"
    for i, d in enumerate(ids):
        if not isinstance(d, str) or not d:
            return f"entry {i} is not a non-empty string"
        try:
            d.encode("utf-8")
        except UnicodeEncodeError:
            return f"entry {i} is not valid Unicode"
    if len(set(ids)) != n:
        return "lists an id twice"
    return None


def read_manifest(path: Path) -> dict:
    """The committed manifest, checked by ``check_manifest``; IndexCorruptError for anything else."""
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
        manifest = json.loads(manifest_path.read_bytes().decode("utf-8"))
    except (OSError, ValueError, RecursionError) as e:  # ValueError: JSONDecodeError, UnicodeDecodeError
        raise corrupt(path, f"{MANIFEST} cannot be read ({e})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise IndexCorruptError(f"{path}/{MANIFEST} is not an lfm2edge index manifest (no format '{FORMAT}')")
    if manifest.get("version") != FORMAT_VERSION or isinstance(manifest.get("version"), bool):
        raise IndexCorruptError(
            f"{path} is index format version {manifest.get('version')!r:.40}; "
            f"this lfm2edge reads version {FORMAT_VERSION}. "
            "Upgrade lfm2edge or rebuild the index."
        )
    check_manifest(path, manifest)
    return manifest


def check_manifest(path: Path, manifest: object) -> None:
    """IndexCorruptError naming the first field of ``manifest`` that lfm2edge could not have written:
    a missing, unknown or mistyped field, a number out of range, a segment named twice or with a
    name that is not a plain segment name, deleted rows the segment does not have."""

    def bad(field: str, what: str) -> IndexCorruptError:
        return corrupt(path, f"{MANIFEST} lacks or mangles a field: {field} {what}")

    def fields(obj: object, field: str, required: set[str], optional: set[str] = set()) -> dict:  # noqa: B006
        if not isinstance(obj, dict):
            raise bad(field, f"must be an object, not {type(obj).__name__}")
        missing, unknown = required - obj.keys(), obj.keys() - required - optional
        if missing:
            raise bad(field, f"lacks {sorted(missing)}")
        if unknown:
            raise bad(field, f"has unknown entries {sorted(unknown)[:5]!r:.120}")
        return obj

    def integer(value: object, field: str, lo: int, hi: int = MAX_COUNT) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
            raise bad(field, f"must be an integer from {lo} to {hi}, not {value!r:.80}")
        return value

    def string(value: object, field: str) -> str:
        if not isinstance(value, str):
            raise bad(field, f"must be a string, not {type(value).__name__}")
        return value

    top = fields(
        manifest,
        "(top level)",
        {"format", "version", "generation", "model", "storage", "next_id", "segments"},
    )
    integer(top["generation"], "generation", 0)
    integer(top["next_id"], "next_id", 0)
    model = fields(top["model"], "model", {"identity", "kind", "dim"}, {"path"})
    if not string(model["identity"], "model.identity") or len(model["identity"]) > 256:
        raise bad("model.identity", "must be a model identity hash")
    if string(model["kind"], "model.kind") not in {k.value for k in ModelKind}:
        raise bad("model.kind", f"must be one of {[k.value for k in ModelKind]}, not {model['kind']!r:.80}")
    integer(model["dim"], "model.dim", 1, MAX_DIM)
    string(model.get("path", ""), "model.path")
    storage = fields(top["storage"], "storage", {"dtype", "pool_factor", "store_texts"})
    if storage["dtype"] not in DTYPES:
        raise bad("storage.dtype", f"must be one of {list(DTYPES)}, not {storage['dtype']!r:.80}")
    integer(storage["pool_factor"], "storage.pool_factor", 1, MAX_POOL_FACTOR)
    if not isinstance(storage["store_texts"], bool):
        raise bad("storage.store_texts", f"must be true or false, not {storage['store_texts']!r:.80}")
    if not isinstance(top["segments"], list):
        raise bad("segments", f"must be a list, not {type(top['segments']).__name__}")
    want_files = set(SEGMENT_FILES) | ({"scales.npy"} if storage["dtype"] == "int8" else set())
    names: set[str] = set()
    for i, entry in enumerate(top["segments"]):
        where = f"segments[{i}]"
        fields(entry, where, {"name", "docs", "rows", "files"}, {"deleted"})
        name = string(entry["name"], f"{where}.name")
        if not SEGMENT_NAME.fullmatch(name):
            raise bad(
                f"{where}.name",
                f"{name!r:.80} is not a segment name lfm2edge writes (it could leave the index)",
            )
        if name in names:
            raise bad(f"{where}.name", f"{name} names a segment already listed")
        names.add(name)
        docs = integer(entry["docs"], f"{where}.docs", 1)
        rows = integer(entry["rows"], f"{where}.rows", docs)
        if model["kind"] == ModelKind.DENSE.value and rows != docs:
            raise bad(f"{where}.rows", f"must equal docs ({docs}) for a dense model, not {rows}")
        deleted = entry.get("deleted", [])
        if not isinstance(deleted, list):
            raise bad(f"{where}.deleted", f"must be a list, not {type(deleted).__name__}")
        for j, row in enumerate(deleted):
            integer(row, f"{where}.deleted[{j}]", 0 if j == 0 else deleted[j - 1] + 1, docs - 1)
        files = fields(entry["files"], f"{where}.files", want_files)
        for fname, record in files.items():
            if not isinstance(record, list) or len(record) != 2:
                raise bad(f"{where}.files.{fname}", "must be [size, sha256]")
            integer(record[0], f"{where}.files.{fname}[0]", 0)
            if not isinstance(record[1], str) or not re.fullmatch(r"[0-9a-f]{64}", record[1]):
                raise bad(f"{where}.files.{fname}[1]", "must be a SHA-256 in hex")


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
