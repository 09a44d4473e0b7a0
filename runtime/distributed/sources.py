"""The pipeline's input: JSONL or Parquet files of documents ``{id, text, metadata?}``, read and checked.

The driver reads the input itself, before any model is loaded: a bad record fails the run at once
with its file and line named, ids repeated anywhere in the input are found, and ids already in the
target are dropped before the cluster sees them. The checked documents then go to the cluster as
blocks of one actor call each (``to_dataset``). Only the driver needs the input files; texts are a
small part of the traffic next to the vectors that come back.

JSONL: one object per line, ``{"id": "doc-1", "text": "...", "metadata": {...}}`` (``id`` a string or
an integer, ``metadata`` optional). Parquet: columns ``id`` (string or integer), ``text`` (string) and
optionally ``metadata`` (a JSON string or a struct). A folder stands for its ``*.jsonl`` and
``*.parquet`` files, in name order.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lfm2edge.runtime.core.errors import InvalidInputError
from lfm2edge.runtime.core.text import check_text
from lfm2edge.runtime.distributed.ray_support import require_pyarrow, require_ray
from lfm2edge.runtime.storage.documents import MAX_ID_CHARS, check_metadata

if TYPE_CHECKING:
    import pyarrow as pa
    import ray.data

JSONL_SUFFIXES = (".jsonl", ".ndjson")
PARQUET_SUFFIXES = (".parquet", ".pq")
FORMATS = ("auto", "jsonl", "parquet")
# One record as read: (id, text, metadata as JSON text or None).
Record = tuple[str, str, str | None]


@dataclass(frozen=True)
class Fields:
    """Which input fields hold the id, the text and the metadata."""

    id: str = "id"
    text: str = "text"
    metadata: str = "metadata"


@dataclass(frozen=True)
class Corpus:
    """Checked documents: an Arrow table of ``id``, ``text`` and ``metadata`` (JSON text or null)."""

    table: pa.Table

    def __len__(self) -> int:
        return self.table.num_rows

    @property
    def ids(self) -> list[str]:
        return self.table.column("id").to_pylist()

    def without(self, present: set[str]) -> Corpus:
        """The documents whose id is not in ``present`` (a resumed run encodes only the rest)."""
        if not present:
            return self
        pa = require_pyarrow()
        keep = pa.array([d not in present for d in self.ids], type=pa.bool_())
        return Corpus(self.table.filter(keep))


def read_corpus(
    sources: str | Path | Sequence[str | Path], fields: Fields = Fields(), fmt: str = "auto"
) -> Corpus:
    """Every document of ``sources`` (files or folders), checked; InvalidInputError names the first problem.

    ``fmt`` "auto" goes by the file suffix (.jsonl/.ndjson, .parquet/.pq); "jsonl" or "parquet" reads
    every file as that.
    """
    pa = require_pyarrow()
    if fmt not in FORMATS:
        raise InvalidInputError(f"the input format must be one of {FORMATS}, not {fmt!r}")
    ids: list[str] = []
    texts: list[str] = []
    metas: list[str | None] = []
    first_seen: dict[str, str] = {}
    for path in _files(sources):
        reader = _read_parquet if _format(path, fmt) == "parquet" else _read_jsonl
        for where, (doc_id, text, meta) in reader(path, fields):
            if doc_id in first_seen:
                raise InvalidInputError(
                    f"the id {doc_id!r:.80} appears twice in the input ({first_seen[doc_id]} and {where}); "
                    "ids must be unique: drop or rename the repeat"
                )
            first_seen[doc_id] = where
            ids.append(doc_id)
            texts.append(text)
            metas.append(meta)
    if not ids:
        raise InvalidInputError(f"no documents in {_describe(sources)}")
    table = pa.table(
        {
            "id": pa.array(ids, pa.string()),
            "text": pa.array(texts, pa.string()),
            "metadata": pa.array(metas, pa.string()),
        }
    )
    return Corpus(table)


def to_dataset(corpus: Corpus, rows_per_block: int) -> ray.data.Dataset:
    """The corpus as a Ray Dataset of blocks of ``rows_per_block`` documents: one block per actor call,
    so the actors share the work (a single block would go to one actor)."""
    ray = require_ray()
    table = corpus.table
    blocks = [table.slice(start, rows_per_block) for start in range(0, table.num_rows, rows_per_block)]
    return ray.data.from_arrow(blocks)


# ----------------------------------------------------------------------------------------------------------
# Files
# ----------------------------------------------------------------------------------------------------------


def _files(sources: str | Path | Sequence[str | Path]) -> list[Path]:
    """The input files: each source itself, or a folder's JSONL and Parquet files in name order."""
    items = [sources] if isinstance(sources, (str, Path)) else list(sources)
    if not items:
        raise InvalidInputError("no input given: pass a JSONL or Parquet file, or a folder of them")
    files: list[Path] = []
    for item in items:
        path = Path(item)
        if path.is_dir():
            found = sorted(p for p in path.iterdir() if p.suffix.lower() in JSONL_SUFFIXES + PARQUET_SUFFIXES)
            if not found:
                raise InvalidInputError(f"the folder {path} holds no .jsonl or .parquet files")
            files.extend(found)
        elif path.is_file():
            files.append(path)
        else:
            raise InvalidInputError(f"input file {path} does not exist; check the path")
    return files


def _format(path: Path, fmt: str) -> str:
    if fmt != "auto":
        return fmt
    suffix = path.suffix.lower()
    if suffix in JSONL_SUFFIXES:
        return "jsonl"
    if suffix in PARQUET_SUFFIXES:
        return "parquet"
    raise InvalidInputError(
        f"{path}: cannot tell its format from the suffix {suffix or '(none)'}; name it .jsonl or "
        ".parquet, or give the format (--input-format jsonl)"
    )


def _describe(sources: object) -> str:
    return str(sources) if isinstance(sources, (str, Path)) else ", ".join(map(str, sources))  # type: ignore[arg-type]


def _read_jsonl(path: Path, fields: Fields) -> Iterator[tuple[str, Record]]:
    """(where, record) for each non-blank line; the line is read as bytes so bad UTF-8 is named by line."""
    with path.open("rb") as f:
        for n, raw in enumerate(f, 1):
            where = f"{path} line {n}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise InvalidInputError(
                    f"{where} is not UTF-8 text (byte {e.start} of the line); re-encode the file as UTF-8, "
                    "e.g. iconv -f latin1 -t utf-8"
                ) from None
            if not line.strip():
                continue
            try:
                value = json.loads(line)
            except json.JSONDecodeError as e:
                raise InvalidInputError(
                    f"{where} is not JSON ({e.msg} at column {e.colno}); each line must be one object like "
                    '{"id": "doc-1", "text": "..."}'
                ) from None
            if not isinstance(value, dict):
                raise InvalidInputError(
                    f'{where} is a JSON {type(value).__name__}, not an object like {{"id": "doc-1", "text": "..."}}'
                )
            yield where, _record(value, where, fields)


def _read_parquet(path: Path, fields: Fields) -> Iterator[tuple[str, Record]]:
    """(where, record) for each row, reading only the id, text and metadata columns."""
    pa = require_pyarrow()
    import pyarrow.parquet as pq

    try:
        file = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as e:
        raise InvalidInputError(f"{path} is not a readable Parquet file ({e}); check or rewrite it") from None
    names = set(file.schema_arrow.names)
    for name, what in ((fields.text, "text"), (fields.id, "id")):
        if name not in names:
            raise InvalidInputError(
                f"{path} has no {name!r} column (its columns: {sorted(names)}); each document needs its "
                f"{what} there, or name the column that holds it"
            )
    columns = [fields.id, fields.text] + ([fields.metadata] if fields.metadata in names else [])
    row = 0
    try:
        for batch in file.iter_batches(columns=columns):
            for values in batch.to_pylist():
                row += 1
                yield f"{path} row {row}", _record(values, f"{path} row {row}", fields)
    except pa.ArrowException as e:
        raise InvalidInputError(f"{path} cannot be read past row {row} ({e}); check or rewrite it") from None


def _record(value: dict[str, Any], where: str, fields: Fields) -> Record:
    """One document's (id, text, metadata JSON), or InvalidInputError naming ``where`` and the fix."""
    text = value.get(fields.text)
    if not isinstance(text, str):
        got = "missing" if text is None else f"a {type(text).__name__}"
        raise InvalidInputError(
            f"{where}: the text field {fields.text!r} is {got}; each document needs its text as a string "
            "there (or name the field that holds it: --text-field)"
        )
    check_text(text, where)
    return _id(value.get(fields.id), where, fields), text, _metadata(value.get(fields.metadata), where)


def _id(value: object, where: str, fields: Fields) -> str:
    if value is None:
        raise InvalidInputError(
            f"{where} has no {fields.id!r}: the distributed pipeline needs an id per document, so that a "
            "rerun skips what is done; add one (e.g. the line number) to every record"
        )
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise InvalidInputError(f"{where}: the id must be a string or an integer, not {type(value).__name__}")
    doc_id = check_text(str(value), f"{where}, its id")
    if len(doc_id) > MAX_ID_CHARS:
        raise InvalidInputError(
            f"{where}: the id has {len(doc_id)} characters, more than the {MAX_ID_CHARS} an index keeps; "
            "use a shorter key"
        )
    return doc_id


def _metadata(value: object, where: str) -> str | None:
    """Metadata as JSON text (a dict, or a JSON object in a string column), within the index's limits."""
    if value is None:
        return None
    if isinstance(value, str):  # Parquet files often hold metadata as JSON text
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            raise InvalidInputError(f"{where}: the metadata string is not JSON; store a JSON object") from None
    if not isinstance(value, dict):
        raise InvalidInputError(f"{where}: metadata must be an object (or null), not {type(value).__name__}")
    try:
        check_metadata([value], 1)
    except InvalidInputError as e:
        raise InvalidInputError(f"{where}: {str(e).removeprefix('metadata 0 ')}") from None
    return json.dumps(value, ensure_ascii=False, allow_nan=False)
