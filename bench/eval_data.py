"""Retrieval datasets in the BEIR layout, read and checked line by line.

    DIR/corpus.jsonl        {"_id": "d1", "title": "...", "text": "..."}   one document per line
    DIR/queries.jsonl       {"_id": "q1", "text": "..."}                   one query per line
    DIR/qrels/<split>.tsv   query-id<TAB>corpus-id<TAB>score               after this header line

``--dataset`` names one such folder or a folder holding several (NanoBEIR: one per language and task,
at any depth). A dataset's name is its path under ``--dataset``; its table column is the first folder
under ``--dataset``, so ``lang/task`` layouts average the tasks of each language. Only the queries the
split judges are evaluated. Every problem is an InvalidInputError naming the file and the line.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from lfm2edge.runtime.core.errors import InvalidInputError
from lfm2edge.runtime.core.text import check_text
from lfm2edge.runtime.storage.index import MAX_ID_CHARS

CORPUS = "corpus.jsonl"
QUERIES = "queries.jsonl"
QRELS = "qrels"
QRELS_HEADER = ("query-id", "corpus-id", "score")
LAYOUT = "corpus.jsonl, queries.jsonl and qrels/<split>.tsv"


@dataclass(frozen=True)
class Dataset:
    name: str  # the path under --dataset ("" -> the folder's own name)
    column: str  # the table column: the first folder under --dataset
    path: Path
    doc_ids: tuple[str, ...] = field(repr=False)
    doc_texts: tuple[str, ...] = field(repr=False)  # title and text joined by a space, as BEIR does
    query_ids: tuple[str, ...] = field(repr=False)  # the queries the split judges, in queries.jsonl's order
    query_texts: tuple[str, ...] = field(repr=False)
    qrels: Mapping[str, Mapping[str, int]] = field(repr=False)  # query id -> corpus id -> relevance
    fingerprint: str  # sha256 of corpus.jsonl: the document encodings' cache key


def load_datasets(root: Path, split: str = "test") -> list[Dataset]:
    """Every dataset under ``root`` (``root`` itself if it is one), sorted by name."""
    root = Path(root)
    if not root.is_dir():
        raise InvalidInputError(
            f"--dataset {root} is not a folder; give a folder in the BEIR layout: {LAYOUT}"
        )
    if (root / CORPUS).exists():
        return [read_dataset(root, root.name, root.name, split)]
    # Hidden folders (a hub download's .cache/) hold no datasets.
    folders = sorted(
        p.parent for p in root.rglob(CORPUS) if not any(s.startswith(".") for s in p.relative_to(root).parts)
    )
    if not folders:
        raise InvalidInputError(
            f"{root} holds no dataset: expected the BEIR layout ({LAYOUT}) in it or in its subfolders "
            "(one per language or task)"
        )
    out = []
    for folder in folders:
        rel = folder.relative_to(root)
        out.append(read_dataset(folder, rel.as_posix(), rel.parts[0], split))
    return out


def read_dataset(path: Path, name: str, column: str, split: str = "test") -> Dataset:
    corpus_file, queries_file = path / CORPUS, path / QUERIES
    qrels_file = path / QRELS / f"{split}.tsv"
    for f in (corpus_file, queries_file):
        if not f.is_file():
            raise InvalidInputError(f"{f} is missing; a dataset folder holds {LAYOUT}")
    if not qrels_file.is_file():
        splits = sorted(p.stem for p in (path / QRELS).glob("*.tsv"))
        have = f"the splits there are {', '.join(splits)}: pass --split" if splits else f"it holds {LAYOUT}"
        raise InvalidInputError(f"{qrels_file} is missing (no qrels for split {split!r}); {have}")

    digest = hashlib.sha256()
    docs: dict[str, str] = {}
    doc_lines: dict[str, int] = {}
    for line_no, record in _records(corpus_file, digest):
        where = f"{corpus_file}:{line_no}"
        doc_id = _record_id(record, where, doc_lines)
        title = record.get("title") or ""
        if not isinstance(title, str):
            raise InvalidInputError(f"{where}: \"title\" must be a string, not {type(title).__name__}")
        text = _field(record, "text", where, allow_empty=bool(title.strip()))
        joined = f"{title} {text}".strip() if title.strip() else text
        docs[doc_id] = check_text(joined, f"{where}: the document")
        doc_lines[doc_id] = line_no
    if not docs:
        raise InvalidInputError(f"{corpus_file} holds no documents; give it one JSON object per line")

    queries: dict[str, str] = {}
    query_lines: dict[str, int] = {}
    for line_no, record in _records(queries_file):
        where = f"{queries_file}:{line_no}"
        query_id = _record_id(record, where, query_lines)
        queries[query_id] = _field(record, "text", where)  # checked below, once we know it is judged
        query_lines[query_id] = line_no

    qrels = _read_qrels(qrels_file, docs, queries)
    judged = [q for q in queries if q in qrels]
    for q in judged:
        check_text(queries[q], f"{queries_file}:{query_lines[q]}: query {q!r}")
    return Dataset(
        name=name,
        column=column,
        path=path,
        doc_ids=tuple(docs),
        doc_texts=tuple(docs.values()),
        query_ids=tuple(judged),
        query_texts=tuple(queries[q] for q in judged),
        qrels=qrels,
        fingerprint=digest.hexdigest(),
    )


def _lines(path: Path, digest: hashlib._Hash | None = None) -> Iterator[tuple[int, str]]:
    """(line number, text) of each non-blank line; invalid UTF-8 is refused with its line."""
    with path.open("rb") as f:
        for line_no, raw in enumerate(f, 1):
            if digest is not None:
                digest.update(raw)
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise InvalidInputError(
                    f"{path}:{line_no}: not valid UTF-8 (byte {e.start}); re-encode the file as UTF-8"
                ) from None
            if line.strip():
                yield line_no, line.rstrip("\r\n")


def _records(path: Path, digest: hashlib._Hash | None = None) -> Iterator[tuple[int, dict]]:
    for line_no, line in _lines(path, digest):
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise InvalidInputError(
                f"{path}:{line_no}: not valid JSON ({e.msg} at column {e.colno}); "
                "each line must be one JSON object"
            ) from None
        if not isinstance(record, dict):
            raise InvalidInputError(
                f"{path}:{line_no}: a JSON {type(record).__name__}, not an object; each line must be "
                '{"_id": ..., "text": ...}'
            )
        yield line_no, record


def _record_id(record: dict, where: str, seen: Mapping[str, int]) -> str:
    if "_id" not in record:
        raise InvalidInputError(f'{where}: no "_id"; every line needs an "_id" and a "text"')
    value = record["_id"]
    if isinstance(value, int) and not isinstance(value, bool):
        value = str(value)  # some BEIR exports write numeric ids
    if not isinstance(value, str) or not value.strip():
        raise InvalidInputError(f'{where}: "_id" must be a non-empty string, got {record["_id"]!r}')
    check_text(value, f'{where}: "_id"')
    if len(value) > MAX_ID_CHARS:
        raise InvalidInputError(
            f'{where}: "_id" has {len(value)} characters; at most {MAX_ID_CHARS} are allowed: shorten it'
        )
    if value in seen:
        raise InvalidInputError(f'{where}: "_id" {value!r} repeats line {seen[value]}; ids must be unique')
    return value


def _field(record: dict, key: str, where: str, allow_empty: bool = False) -> str:
    value = record.get(key)
    if value is None and allow_empty:
        return ""
    if not isinstance(value, str):
        what = "missing" if key not in record else f"a {type(value).__name__}, not a string"
        raise InvalidInputError(f'{where}: "{key}" is {what}; every line needs an "_id" and a "text"')
    if not allow_empty:
        check_text(value, f'{where}: "{key}"')
    return value


def _read_qrels(path: Path, docs: Mapping[str, str], queries: Mapping[str, str]) -> dict[str, dict[str, int]]:
    qrels: dict[str, dict[str, int]] = {}
    lines = _lines(path)
    first = next(lines, None)
    if first is None or tuple(c.strip() for c in first[1].split("\t")) != QRELS_HEADER:
        raise InvalidInputError(
            f"{path}:{first[0] if first else 1}: the first line must be the header "
            f"'query-id<TAB>corpus-id<TAB>score', got {first[1][:80] if first else 'an empty file'!r}"
        )
    for line_no, line in lines:
        where = f"{path}:{line_no}"
        cells = [c.strip() for c in line.split("\t")]
        if len(cells) != 3:
            raise InvalidInputError(
                f"{where}: {len(cells)} tab-separated columns, expected 3 (query-id, corpus-id, score)"
            )
        query_id, doc_id, score = cells
        try:
            relevance = int(score)
        except ValueError:
            raise InvalidInputError(f"{where}: the score {score!r} is not an integer") from None
        if query_id not in queries:
            raise InvalidInputError(
                f"{where}: query-id {query_id!r} is not in {path.parent.parent / QUERIES}; "
                "fix the id or add the query"
            )
        if doc_id not in docs:
            raise InvalidInputError(
                f"{where}: corpus-id {doc_id!r} is not in {path.parent.parent / CORPUS}; "
                "fix the id or add the document"
            )
        qrels.setdefault(query_id, {})[doc_id] = relevance
    if not qrels:
        raise InvalidInputError(f"{path} judges no query; add 'query-id<TAB>corpus-id<TAB>score' rows")
    return qrels
