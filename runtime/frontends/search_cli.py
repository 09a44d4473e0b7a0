"""Search commands: ``encode``, ``index create|add|delete|info|compact``, ``search``, ``rerank``, ``serve``.

Texts come from a file or stdin ("-"), as text lines (one text per non-blank line) or JSONL (a JSON
string, or an object with a "text" field and optional "id" and "metadata"). ``--json`` prints one
JSON document for scripts. Exit codes are the ``lfm2edge`` ones (2: bad input, 3: unusable model,
7: a file that cannot be read or written); every failure is one ``error:`` line on stderr. Inputs
and output paths are checked before a model is loaded, and files are written under a temporary
name, then renamed: a failure never leaves a half-written output.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Annotated, Any

import numpy as np
import typer

from lfm2edge.runtime.core.errors import InvalidInputError
from lfm2edge.runtime.core.progress import progress_bar
from lfm2edge.runtime.core.text import check_text
from lfm2edge.runtime.frontends.cli_options import JsonFlag, Threads, WeightKernelOption
from lfm2edge.runtime.storage.qdrant_index import DEFAULT_COLLECTION

InputFormat = Annotated[
    str,
    typer.Option(
        "--input-format", help='auto | text | jsonl (auto: .jsonl/.json files, or lines starting with { or ")'
    ),
]
TextField = Annotated[str, typer.Option("--text-field", help="JSONL field holding the text")]


# ----------------------------------------------------------------------------------------------------------
# Input
# ----------------------------------------------------------------------------------------------------------


def read_records(source: str, fmt: str = "auto", text_field: str = "text") -> list[dict[str, Any]]:
    """Records {"text", optional "id", "metadata"} from a file or "-" (stdin), as text lines or JSONL."""
    if fmt not in ("auto", "text", "jsonl"):
        raise InvalidInputError(f"--input-format must be auto, text or jsonl, not {fmt!r}")
    name = "stdin" if source == "-" else source
    if source == "-":
        try:
            raw = sys.stdin.read()
        except UnicodeDecodeError:
            raise InvalidInputError("stdin is not UTF-8 text; convert it, e.g. with iconv") from None
    else:
        path = Path(source)
        if not path.is_file():
            raise InvalidInputError(f"input file {path} does not exist")
        try:
            raw = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise InvalidInputError(f"{path} is not UTF-8 text") from None
    lines = [(n, line) for n, line in enumerate(raw.splitlines(), 1) if line.strip()]
    if fmt == "auto":
        jsonl = source.endswith((".jsonl", ".json")) or bool(lines and lines[0][1].lstrip()[:1] in ("{", '"'))
        fmt = "jsonl" if jsonl else "text"
    if fmt == "text":
        records = [{"text": check_text(line, f"{name} line {n}")} for n, line in lines]
    else:
        records = [_json_record(n, line, name, text_field) for n, line in lines]
    if not records:
        raise InvalidInputError(f"no texts in {name}")
    return records


def _json_record(n: int, line: str, source: str, text_field: str) -> dict[str, Any]:
    try:
        value = json.loads(line)
    except json.JSONDecodeError as e:
        raise InvalidInputError(
            f"{source} line {n} is not JSON ({e.msg}); use --input-format text for plain lines"
        ) from None
    where = f"{source} line {n}"
    if isinstance(value, str):
        return {"text": check_text(value, where)}
    if not isinstance(value, dict) or not isinstance(value.get(text_field), str):
        raise InvalidInputError(
            f"{where}: expected a JSON string or an object with a string {text_field!r} field"
        )
    record = {"text": check_text(value[text_field], where)}
    if "id" in value:
        if isinstance(value["id"], bool) or not isinstance(value["id"], (str, int)) or value["id"] == "":
            raise InvalidInputError(f'{where}: "id" must be a non-empty string or an integer')
        record["id"] = check_text(str(value["id"]), f"{where}, its id")
    if value.get("metadata") is not None:
        if not isinstance(value["metadata"], dict):
            raise InvalidInputError(f'{where}: "metadata" must be a JSON object (or null)')
        record["metadata"] = value["metadata"]
    return record


def _show_progress() -> bool:
    """Progress bars only for a person watching: never into a log or a pipe."""
    return sys.stderr.isatty()


def _load(model: Path, threads: int | None, weight_kernel: str | None = None):
    """The encoder of ``model``, loaded with the ``--weight-kernel`` option if one is given."""
    from lfm2edge.runtime.core.encoders import load
    from lfm2edge.runtime.core.llama import weight_kernel_options

    return load(model, n_threads=threads, **weight_kernel_options(weight_kernel))


def _server_options(path: Path | str, collection: str) -> dict[str, str]:
    """Index.open's options for ``path``: the collection, for a Qdrant server only."""
    return {"collection": collection} if isinstance(path, str) else {}


def _open_index(path: Path | str, model: Path | None, threads: int | None, collection: str = DEFAULT_COLLECTION,
                weight_kernel: str | None = None):
    """The index and an encoder for it: ``model``, or the GGUF the index was created from, loaded with
    ``weight_kernel``, or else with the load option the index's model identity records."""
    from lfm2edge.runtime.storage.documents import recorded_weight_kernel
    from lfm2edge.runtime.storage.index import Index

    index = Index.open(path, **_server_options(path, collection))
    recorded = index.settings.model_path
    weight_kernel = weight_kernel or recorded_weight_kernel(index.settings.identity)
    index.close()  # opened again with its encoder (a Qdrant Edge shard takes one opener at a time)
    if model is None:
        if not recorded or not Path(recorded).is_file():
            raise InvalidInputError(
                f"the index was built from {recorded or 'an unrecorded path'}, which is not there now; "
                "pass --model"
            )
        model = Path(recorded)
    encoder = _load(model, threads, weight_kernel)
    try:
        return Index.open(path, encoder, **_server_options(path, collection)), encoder
    except Exception:
        encoder.close()
        raise


def _recorded_load_option(path: Path | str, collection: str) -> str | None:
    """The load option (``--weight-kernel``) the index at ``path`` records in its model identity, or None."""
    from lfm2edge.runtime.storage.documents import recorded_weight_kernel
    from lfm2edge.runtime.storage.index import Index

    index = Index.open(path, **_server_options(path, collection))
    try:
        return recorded_weight_kernel(index.settings.identity)
    finally:
        index.close()


def _where_json(where: str | None) -> dict | None:
    """--where's JSON object (checked further by the index)."""
    if where is None:
        return None
    try:
        value = json.loads(where)
    except ValueError as e:
        raise InvalidInputError(f'--where is not JSON ({e}); e.g. --where \'{{"lang": "en"}}\'') from None
    if not isinstance(value, dict):
        raise InvalidInputError('--where must be a JSON object of metadata field -> value, e.g. {"lang": "en"}')
    return value


def _echo_json(value: Any) -> None:
    typer.echo(json.dumps(value, indent=2, ensure_ascii=False))


def _check_queries(queries: list[str]) -> list[str]:
    return [check_text(q, f"query {i + 1}") for i, q in enumerate(queries)]


@contextmanager
def _output_file(output: Path) -> Iterator[IO[bytes]]:
    """A file beside ``output``, created before any work (a path that cannot be written fails at once),
    renamed over ``output`` once complete; on an error nothing is left under either name."""
    if output.exists() and not output.is_file():
        raise InvalidInputError(f"--output {output} exists and is not a regular file; give a file path")
    parent = output.parent
    if not parent.is_dir():
        raise InvalidInputError(
            f"the folder of --output, {parent}, does not exist or is not a folder; create it first"
        )
    fd, tmp = tempfile.mkstemp(prefix=f".{output.name}.", suffix=".tmp", dir=parent)
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, output)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _check_new_folder(path: Path) -> None:
    """Refuse, before loading a model, a place where the folder ``path`` cannot be created."""
    probe = path
    while not probe.exists() and probe.parent != probe:
        probe = probe.parent
    if probe != path and not probe.is_dir():
        raise InvalidInputError(f"cannot create {path}: {probe} is a file, not a folder; choose another path")
    if probe != path and not os.access(probe, os.W_OK | os.X_OK):
        raise InvalidInputError(
            f"cannot create {path}: no permission to write in {probe}; choose another path"
        )


# ----------------------------------------------------------------------------------------------------------
# encode
# ----------------------------------------------------------------------------------------------------------


def encode(
    model: Annotated[Path, typer.Argument(help="a retriever GGUF", show_default=False)],
    source: Annotated[str, typer.Argument(help="a text or JSONL file; - for stdin")] = "-",
    output: Annotated[
        Path | None,
        typer.Option(
            "--output",
            "-o",
            help=".npy (dense), .npz (packed vectors + offsets) or .jsonl; default: JSONL to stdout",
        ),
    ] = None,
    as_queries: Annotated[
        bool, typer.Option("--queries", help="encode as queries (default: documents)")
    ] = False,
    input_format: InputFormat = "auto",
    text_field: TextField = "text",
    threads: Threads = None,
    weight_kernel: WeightKernelOption = None,
    as_json: JsonFlag = False,
) -> None:
    """Encode texts to vectors: one per text (dense) or one per token (ColBERT).

    .npy holds a dense model's n x dim float32 matrix. .npz holds "vectors" (every text's rows stacked)
    and "offsets" (text i owns rows offsets(i) to offsets(i+1)), for either kind. .jsonl holds one
    {"index", "embedding"} object per text.
    """
    records = read_records(source, input_format, text_field)
    suffix = output.suffix.lower() if output else ".jsonl"
    if suffix not in (".npy", ".npz", ".jsonl"):
        raise InvalidInputError(f"--output must end in .npy, .npz or .jsonl, not {suffix!r}")
    if output is None:
        with _load(model, threads, weight_kernel) as encoder:
            vectors, summary = _encode(encoder, records, as_queries, suffix)
            for i, v in enumerate(vectors):
                typer.echo(json.dumps({"index": i, "embedding": v.tolist()}))
        return
    with _output_file(output) as f, _load(model, threads, weight_kernel) as encoder:
        vectors, summary = _encode(encoder, records, as_queries, suffix)
        if suffix == ".npy":
            np.save(f, np.stack(vectors))
        elif suffix == ".npz":
            rows = [v[None] if v.ndim == 1 else v for v in vectors]
            offsets = np.concatenate([[0], np.cumsum([len(r) for r in rows])])
            np.savez(f, vectors=np.concatenate(rows), offsets=offsets)
        else:
            for i, v in enumerate(vectors):
                f.write((json.dumps({"index": i, "embedding": v.tolist()}) + "\n").encode("utf-8"))
    summary["output"] = str(output)
    if as_json:
        _echo_json(summary)
    else:
        typer.echo(f"encoded {len(vectors)} texts ({summary['kind']}, dim {summary['dim']}) to {output}")


def _encode(encoder, records: list[dict], as_queries: bool, suffix: str) -> tuple[list[np.ndarray], dict]:
    """The vectors of every record, and the summary printed with --json."""
    if suffix == ".npy" and encoder.kind.value == "late_interaction":
        raise InvalidInputError(
            "a ColBERT model gives a matrix per text, which .npy cannot hold; use .npz or .jsonl"
        )
    method = encoder.encode_query if as_queries else encoder.encode_document
    vectors = list(method([r["text"] for r in records], show_progress_bar=_show_progress()))
    summary = {
        "texts": len(vectors),
        "kind": encoder.kind.value,
        "dim": encoder.dim,
        "output": None,
        "side": "query" if as_queries else "document",
    }
    return vectors, summary


# ----------------------------------------------------------------------------------------------------------
# index
# ----------------------------------------------------------------------------------------------------------

def index_location(value: str) -> Path | str:
    """An index argument: a folder, or the http(s) URL of a Qdrant server (kept as typed)."""
    return value if value.startswith(("http://", "https://")) else Path(value)


IndexDir = Annotated[
    Any,  # Path | str: Typer takes no unions, the parser decides
    typer.Argument(
        parser=index_location, metavar="INDEX", show_default=False,
        help="the index folder, or a Qdrant server URL (http://HOST:6333; QDRANT_API_KEY for its key)",
    ),
]
Collection = Annotated[
    str, typer.Option("--collection", help="the collection, when INDEX is a Qdrant server URL")
]
ModelOption = Annotated[
    Path | None, typer.Option("--model", "-m", help="the GGUF (default: the one the index was built from)")
]


def index_create(
    path: IndexDir,
    model: Annotated[
        Path, typer.Option("--model", "-m", help="the retriever GGUF whose vectors the index holds")
    ],
    backend: Annotated[
        str,
        typer.Option(help="exact (lfm2edge's own files, exact search) | qdrant (Qdrant Edge in the folder, "
                     "or the server at a URL; HNSW candidates, then exact MaxSim)"),
    ] = "exact",
    dtype: Annotated[
        str, typer.Option(help="float16 | int8 (int8: half the size, scores within about 1%; exact only)")
    ] = "float16",
    pool_factor: Annotated[
        int, typer.Option(help="ColBERT token pooling: 2 keeps about half the vectors")
    ] = 1,
    store_texts: Annotated[
        bool, typer.Option("--store-texts/--no-texts", help="keep the texts to return with hits")
    ] = True,
    candidates: Annotated[
        int | None,
        typer.Option(help="qdrant, ColBERT: documents the HNSW stage hands to MaxSim [default: 512]",
                     show_default=False),
    ] = None,
    collection: Collection = DEFAULT_COLLECTION,
    threads: Threads = None,
    weight_kernel: WeightKernelOption = None,
    as_json: JsonFlag = False,
) -> None:
    """Create an empty index for a model: in a new (or empty) folder, or as a collection on a Qdrant server."""
    from lfm2edge.runtime.storage.index import Index

    options: dict[str, Any] = {}
    if backend == "qdrant" or isinstance(path, str):
        options = _server_options(path, collection) | ({"candidates": candidates} if candidates is not None else {})
        backend = "qdrant"
    elif candidates is not None:
        raise InvalidInputError("--candidates applies to --backend qdrant only")
    if isinstance(path, Path):
        _check_new_folder(path)
    with _load(model, threads, weight_kernel) as encoder:
        index = Index.create(
            path, encoder, backend=backend, dtype=dtype, pool_factor=pool_factor, store_texts=store_texts, **options
        )
        info = index.info()
        index.close()
    if as_json:
        _echo_json(info)
    else:
        where = f"{path} (collection {collection})" if isinstance(path, str) else str(path)
        typer.echo(
            f"created {where}: {backend}, {info['kind']}, dim {info['dim']}, {info['dtype']}, "
            f"pool factor {info['pool_factor']}"
        )


def index_export(
    path: IndexDir,
    to: Annotated[
        Any,
        typer.Option("--to", parser=index_location, metavar="DEST", show_default=False,
                     help="a Qdrant server URL, or a new folder for a Qdrant Edge shard"),
    ],
    collection: Collection = DEFAULT_COLLECTION,
    to_collection: Annotated[
        str | None, typer.Option("--to-collection", help="the collection to create at DEST [default: --collection]",
                                 show_default=False),
    ] = None,
    candidates: Annotated[
        int | None, typer.Option(help="DEST's candidate count [default: 512]", show_default=False)
    ] = None,
    batch: Annotated[int, typer.Option(help="documents per write")] = 256,
    as_json: JsonFlag = False,
) -> None:
    """Copy every document of an index, with its stored vectors, text and metadata, into a new Qdrant
    collection (a server, or an Edge shard folder): how a laptop index moves to a server. No model needed."""
    from lfm2edge.runtime.storage.index import Index
    from lfm2edge.runtime.storage.qdrant_index import QdrantIndex

    if isinstance(to, Path):
        _check_new_folder(to)
    source = Index.open(path, **_server_options(path, collection))
    options = _server_options(to, to_collection or collection) | (
        {"candidates": candidates} if candidates is not None else {}
    )
    target = QdrantIndex.create_for(to, source.settings, **options)
    copied = 0
    bar = progress_bar(len(source), _show_progress(), unit="document")
    try:
        for group in _batched(source.documents(), batch):
            target.add_vectors(
                [d.vectors for d in group], [d.id for d in group],
                [d.text for d in group] if source.settings.store_texts else None,
                [d.metadata for d in group], on_duplicate="replace",
            )
            copied += len(group)
            bar(len(group))
        total = len(target)
    finally:
        bar(0, close=True)
        target.close()
        source.close()
    if as_json:
        _echo_json({"copied": copied, "documents": total})
    else:
        typer.echo(f"copied {copied} documents to {to}; it holds {total}")


def _batched(items: Iterator, n: int) -> Iterator[list]:
    group: list = []
    for item in items:
        group.append(item)
        if len(group) == n:
            yield group
            group = []
    if group:
        yield group


def index_add(
    path: IndexDir,
    source: Annotated[
        str, typer.Argument(help="a text or JSONL file; - for stdin (with --ray: JSONL or Parquet files, or a folder)")
    ] = "-",
    model: ModelOption = None,
    on_duplicate: Annotated[
        str | None,
        typer.Option(
            help="error | skip | replace, for ids already in the index [default: error; with --ray: skip, "
            "so running the same command again resumes]",
            show_default=False,
        ),
    ] = None,
    input_format: InputFormat = "auto",
    text_field: TextField = "text",
    commit_every: Annotated[
        int | None,
        typer.Option(help="texts per durable commit [default: 256; with --ray: 64, one actor call each]",
                     show_default=False),
    ] = None,
    threads: Threads = None,
    ray: Annotated[
        bool,
        typer.Option("--ray", help="encode on Ray: joins the cluster RAY_ADDRESS names or one running on this "
                     "machine, else starts a local one; needs lfm2edge[distributed]"),
    ] = False,
    ray_address: Annotated[
        str | None,
        typer.Option("--ray-address", help="encode on the Ray cluster at this address (HOST:PORT, "
                     "ray://HOST:PORT, auto or local); implies --ray", show_default=False),
    ] = None,
    actors: Annotated[
        int | None,
        typer.Option(help="with --ray: encoder actors [default: as many as the cluster's CPUs hold]",
                     show_default=False),
    ] = None,
    cpus_per_actor: Annotated[
        int | None,
        typer.Option(help="with --ray: CPUs, and so llama.cpp threads, per actor [default: 1]", show_default=False),
    ] = None,
    collection: Collection = DEFAULT_COLLECTION,
    weight_kernel: WeightKernelOption = None,
    as_json: JsonFlag = False,
) -> None:
    """Encode texts and add them to an index (JSONL objects may carry "id" and "metadata").

    With --ray the texts are encoded by a pool of actors on a Ray cluster (each node needs
    lfm2edge[distributed] and the GGUF at the same path) and written here; every record needs an id,
    and ids already in the index are skipped, so an interrupted run is finished by running it again.
    """
    if ray or ray_address is not None:
        _index_add_ray(path, source, model, on_duplicate or "skip", input_format, text_field, commit_every,
                       threads, ray_address, actors, cpus_per_actor, weight_kernel, as_json)
        return
    if actors is not None or cpus_per_actor is not None:
        raise InvalidInputError("--actors and --cpus-per-actor apply with --ray only")
    on_duplicate = on_duplicate or "error"
    commit_every = 256 if commit_every is None else commit_every
    records = read_records(source, input_format, text_field)
    with_ids = [r for r in records if "id" in r]
    if with_ids and len(with_ids) != len(records):
        raise InvalidInputError('give every JSONL record an "id", or none (the index then numbers them)')
    given = [r["id"] for r in records] if with_ids else None
    index, encoder = _open_index(path, model, threads, collection, weight_kernel)
    with encoder:
        before = len(index)
        present = sum(1 for d in set(given) if d in index) if given else 0  # skipped or replaced
        try:
            ids = index.add(
                [r["text"] for r in records],
                ids=given,
                metadata=[r.get("metadata") for r in records],
                on_duplicate=on_duplicate,  # type: ignore[arg-type]
                commit_every=commit_every,
                show_progress_bar=_show_progress(),
            )
        except BaseException:
            # Commits before the failure stay: say what is in the index now, and how to resume.
            if len(index) != before:
                typer.echo(
                    f"note: the index now holds {len(index)} documents ({len(index) - before:+d} before the "
                    "failure); run the same command with --on-duplicate skip to add the rest",
                    err=True,
                )
            raise
        total = len(index)
    skipped = present if on_duplicate == "skip" else 0
    replaced = present if on_duplicate == "replace" else 0
    added = len(ids) - skipped - replaced
    if as_json:
        _echo_json({"ids": ids, "documents": total, "added": added, "skipped": skipped, "replaced": replaced})
    else:
        extra = f", {skipped} skipped (already in the index)" if skipped else ""
        extra += f", {replaced} replaced" if replaced else ""
        typer.echo(f"added {added} texts{extra}; the index holds {total} documents")


def _index_add_ray(
    path: Path,
    source: str,
    model: Path | None,
    on_duplicate: str,
    input_format: str,
    text_field: str,
    commit_every: int | None,
    threads: int | None,
    address: str | None,
    actors: int | None,
    cpus_per_actor: int | None,
    weight_kernel: str | None,
    as_json: bool,
) -> None:
    """``index add --ray``: the input checked, then Ray joined, then the pipeline (lfm2edge.distributed)."""
    from lfm2edge.runtime.distributed import Fields, add_to_index, connect, read_corpus
    from lfm2edge.runtime.distributed.pipeline import DEFAULT_BATCH_SIZE
    from lfm2edge.runtime.distributed.ray_support import check_address, require_ray
    from lfm2edge.runtime.storage.index import Index

    if source == "-":
        raise InvalidInputError("--ray reads JSONL or Parquet files (or a folder of them), not stdin; save the "
                                "input to a file first")
    if threads is not None:
        raise InvalidInputError("--threads sets the in-process encoder; with --ray each actor runs as many "
                                "threads as its --cpus-per-actor")
    if input_format == "text":
        raise InvalidInputError("--ray reads records with ids (JSONL or Parquet), not text lines; give each "
                                'text an id: {"id": "doc-1", "text": "..."}')
    ray = require_ray()
    if address is not None:
        check_address(address)
    corpus = read_corpus(source, Fields(text=text_field), input_format)  # before Ray starts: fails fast
    index = Index.open(path)
    if model is None:
        recorded = index.settings.model_path
        if not recorded or not Path(recorded).is_file():
            raise InvalidInputError(
                f"the index was built from {recorded or 'an unrecorded path'}, which is not there now; pass --model"
            )
        model = Path(recorded)
    before = len(index)
    started = connect(address)
    try:
        result = add_to_index(
            model,
            corpus,
            index,
            on_duplicate=on_duplicate,  # type: ignore[arg-type]
            actors=actors,
            cpus_per_actor=1 if cpus_per_actor is None else cpus_per_actor,
            batch_size=DEFAULT_BATCH_SIZE if commit_every is None else commit_every,
            weight_kernel=weight_kernel,  # None: the option the index records, as without --ray
            show_progress_bar=_show_progress(),
        )
    except BaseException:
        if len(index) != before:  # each block was committed whole: say what is there and how to go on
            typer.echo(
                f"note: the index now holds {len(index)} documents ({len(index) - before:+d} before the "
                "failure); run the same command again to add the rest",
                err=True,
            )
        raise
    finally:
        if started:
            ray.shutdown()
    added = result.encoded - result.replaced
    summary = {
        "ids": corpus.ids,
        "documents": len(index),
        "added": added,
        "skipped": result.skipped,
        "replaced": result.replaced,
        "actors": result.actors,
        "cpus_per_actor": result.cpus_per_actor,
    }
    if as_json:
        _echo_json(summary)
    else:
        extra = f", {result.skipped} skipped (already in the index)" if result.skipped else ""
        extra += f", {result.replaced} replaced" if result.replaced else ""
        pool = f" by {result.actors} Ray actor(s) of {result.cpus_per_actor} CPU(s)" if result.actors else ""
        typer.echo(f"added {added} texts{pool}{extra}; the index holds {len(index)} documents")


def index_delete(
    path: IndexDir,
    ids: Annotated[list[str] | None, typer.Argument(help="ids to delete", show_default=False)] = None,
    ids_from: Annotated[Path | None, typer.Option("--ids-from", help="a file of ids, one per line")] = None,
    missing_ok: Annotated[
        bool, typer.Option("--missing-ok", help="ignore ids that are not in the index")
    ] = False,
    collection: Collection = DEFAULT_COLLECTION,
    as_json: JsonFlag = False,
) -> None:
    """Delete documents by id, in one commit (no model needed)."""
    from lfm2edge.runtime.storage.index import Index

    wanted = list(ids or [])
    if ids_from is not None:
        if not ids_from.is_file():
            raise InvalidInputError(f"--ids-from {ids_from} does not exist")
        try:
            text = ids_from.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise InvalidInputError(f"--ids-from {ids_from} is not UTF-8 text") from None
        wanted += [line.strip() for line in text.splitlines() if line.strip()]
    if not wanted:
        raise InvalidInputError("no ids given: pass them as arguments or with --ids-from")
    index = Index.open(path, **_server_options(path, collection))
    deleted = index.delete(wanted, missing_ok=missing_ok)
    if as_json:
        _echo_json({"deleted": deleted, "documents": len(index)})
    else:
        typer.echo(f"deleted {deleted} documents; the index holds {len(index)}")


def index_info(
    path: IndexDir,
    verify: Annotated[bool, typer.Option("--verify", help="re-hash every file against the manifest")] = False,
    collection: Collection = DEFAULT_COLLECTION,
    as_json: JsonFlag = False,
) -> None:
    """Show what an index holds; with --verify, check every file's checksum (exit 1 on a mismatch)."""
    from lfm2edge.runtime.storage.index import Index, IndexCorruptError

    index = Index.open(path, **_server_options(path, collection))
    info = index.info()
    problems = index.verify() if verify else None
    if as_json:
        _echo_json(info | ({"problems": problems} if verify else {}))
    else:
        for key, value in info.items():
            typer.echo(f"{key:16} {value}")
        if verify:
            typer.echo("verify           " + ("ok" if not problems else f"{len(problems)} problem(s)"))
    if problems:
        raise IndexCorruptError("the index failed verification:\n- " + "\n- ".join(problems))


def index_compact(
    path: IndexDir, collection: Collection = DEFAULT_COLLECTION, as_json: JsonFlag = False
) -> None:
    """Rewrite the live documents into one segment, reclaiming the space of deleted ones."""
    from lfm2edge.runtime.storage.index import Index

    index = Index.open(path, **_server_options(path, collection))
    index.compact()
    info = index.info()
    if as_json:
        _echo_json(info)
    else:
        size = f", {info['bytes']} bytes" if "bytes" in info else ""
        typer.echo(f"compacted {path}: {info['documents']} documents{size}")


# ----------------------------------------------------------------------------------------------------------
# search, rerank, serve
# ----------------------------------------------------------------------------------------------------------


def search(
    path: IndexDir,
    queries: Annotated[
        list[str] | None, typer.Argument(help="one or more queries", show_default=False)
    ] = None,
    queries_from: Annotated[
        str | None, typer.Option("--queries-from", help="a text or JSONL file of queries; - for stdin")
    ] = None,
    k: Annotated[int, typer.Option("-k", "--top-k", help="hits per query")] = 10,
    where: Annotated[
        str | None,
        typer.Option(help='only documents whose metadata matches, as JSON: {"lang": "en", "tag": ["a", "b"]}',
                     show_default=False),
    ] = None,
    candidates: Annotated[
        int | None,
        typer.Option(help="Qdrant, ColBERT: candidates for MaxSim (0: score every document) [default: the "
                     "index's]", show_default=False),
    ] = None,
    model: ModelOption = None,
    collection: Collection = DEFAULT_COLLECTION,
    threads: Threads = None,
    weight_kernel: WeightKernelOption = None,
    as_json: JsonFlag = False,
) -> None:
    """Search an index: the k best documents per query by MaxSim (ColBERT) or cosine (dense); exact on the
    exact engine, over HNSW candidates on Qdrant."""
    texts = list(queries or [])
    if queries_from is not None:
        texts += [r["text"] for r in read_records(queries_from)]
    if not texts:
        raise InvalidInputError("no query given: pass one as an argument or use --queries-from")
    texts = _check_queries(texts)
    conditions = _where_json(where)
    index, encoder = _open_index(path, model, threads, collection, weight_kernel)
    with encoder:
        if candidates is None:
            results = index.search_many(texts, k=k, where=conditions)
        elif not hasattr(index, "candidates"):
            raise InvalidInputError("--candidates applies to Qdrant indexes; the exact index scores every document")
        else:
            queries = encoder.encode_query(texts)
            results = index.search_vectors(list(queries), k=k, where=conditions, candidates=candidates)
        index.close()
    if as_json:
        _echo_json(
            [
                {
                    "query": q,
                    "hits": [
                        {"id": h.id, "score": h.score, "text": h.text, "metadata": h.metadata} for h in hits
                    ],
                }
                for q, hits in zip(texts, results, strict=True)
            ]
        )
        return
    for q, hits in zip(texts, results, strict=True):
        typer.echo(f"{q}")
        for rank, h in enumerate(hits, 1):
            snippet = (h.text or "").replace("\n", " ")
            typer.echo(f"  {rank:3}. {h.score:9.4f}  {h.id}  {snippet[:80]}")


def rerank(
    model: Annotated[Path, typer.Argument(help="a retriever GGUF", show_default=False)],
    query: Annotated[str, typer.Argument(help="the query", show_default=False)],
    candidates: Annotated[str, typer.Argument(help="a text or JSONL file of candidates; - for stdin")] = "-",
    top_n: Annotated[int | None, typer.Option("--top-n", "-n", help="keep only the best n")] = None,
    input_format: InputFormat = "auto",
    text_field: TextField = "text",
    threads: Threads = None,
    weight_kernel: WeightKernelOption = None,
    as_json: JsonFlag = False,
) -> None:
    """Rank candidate texts against a query, with no index (MaxSim or cosine)."""
    check_text(query, "the query")
    records = read_records(candidates, input_format, text_field)
    docs = [r["text"] for r in records]
    if top_n is not None and top_n < 1:
        raise InvalidInputError(f"--top-n must be at least 1, got {top_n}")
    with _load(model, threads, weight_kernel) as encoder:
        ranking = encoder.rerank(query, docs, top_k=top_n)
    results = [
        {"index": int(i), "relevance_score": float(s), "document": {"text": docs[i]}}
        | ({"id": records[i]["id"]} if "id" in records[i] else {})
        for i, s in zip(ranking.indices, ranking.scores, strict=True)
    ]
    if as_json:
        _echo_json({"query": query, "results": results})
        return
    for rank, r in enumerate(results, 1):
        typer.echo(f"{rank:3}. {r['relevance_score']:9.4f}  [{r['index']}]  {r['document']['text'][:80]}")


def serve(
    model: Annotated[Path, typer.Argument(help="a retriever GGUF", show_default=False)],
    index: Annotated[
        Any,
        typer.Option("--index", parser=index_location, metavar="INDEX", show_default=False,
                     help="an index for /search and /documents: a folder, or a Qdrant server URL"),
    ] = None,
    create_index: Annotated[
        bool, typer.Option("--create-index", help="create the --index folder if it is missing")
    ] = False,
    host: Annotated[
        str, typer.Option(help="address to bind; anything but loopback (127.0.0.0/8, ::1) needs --api-key")
    ] = "127.0.0.1",
    port: Annotated[
        int, typer.Option(help="TCP port (0: any free port, named in the listening line)")
    ] = 8000,
    api_key: Annotated[
        str | None,
        typer.Option(
            "--api-key",
            envvar="LFM2EDGE_API_KEY",
            show_envvar=True,
            help="require `Authorization: Bearer KEY` on every endpoint but /health (prefer the variable: "
            "arguments show in the process list)",
        ),
    ] = None,
    allowed_host: Annotated[
        list[str] | None,
        typer.Option(
            "--allowed-host",
            help="a Host name clients may use besides localhost and the bound address (repeatable; *: any)",
        ),
    ] = None,
    max_body_bytes: Annotated[int, typer.Option(help="largest request body accepted")] = 8 << 20,
    max_inputs: Annotated[int, typer.Option(help="most texts per embedding or /documents request")] = 256,
    max_tokens: Annotated[
        int, typer.Option(help="most tokens per request (counted as UTF-8 bytes, at most the model's length)")
    ] = 131_072,
    max_embed_vectors: Annotated[int, typer.Option(help="most vectors in one /embed answer")] = 16_384,
    header_timeout: Annotated[
        float, typer.Option(help="seconds a connection has to send complete request headers")
    ] = 10.0,
    body_timeout: Annotated[float, typer.Option(help="seconds a request has to send its whole body")] = 30.0,
    shutdown_timeout: Annotated[
        float,
        typer.Option(help="on SIGINT/SIGTERM, seconds requests get to finish before they are cancelled"),
    ] = 10.0,
    collection: Collection = DEFAULT_COLLECTION,
    threads: Threads = None,
    weight_kernel: WeightKernelOption = None,
) -> None:
    """Run the local HTTP server a desktop app talks to (OpenAI embeddings, Cohere/Jina rerank, search).

    Stops on SIGINT or SIGTERM: requests get --shutdown-timeout seconds to finish, then are cancelled,
    and the model is freed only once no decode runs (exit status 0).
    """
    from lfm2edge.runtime.frontends.server import ServerLimits, check_api_key, is_loopback
    from lfm2edge.runtime.frontends.server import serve as run_server

    for name, value in (
        ("--max-body-bytes", max_body_bytes),
        ("--max-inputs", max_inputs),
        ("--max-tokens", max_tokens),
        ("--max-embed-vectors", max_embed_vectors),
    ):
        if value < 1:
            raise InvalidInputError(f"{name} must be at least 1, got {value}")
    for name, seconds in (
        ("--header-timeout", header_timeout),
        ("--body-timeout", body_timeout),
        ("--shutdown-timeout", shutdown_timeout),
    ):
        if not 0 < seconds <= 3600:
            raise InvalidInputError(f"{name} must be more than 0 and at most 3600 seconds, got {seconds}")
    api_key = check_api_key(host, api_key)  # before anything is loaded or bound
    if not is_loopback(host):
        typer.echo(
            f"warning: binding {host}: HTTP is not encrypted; put a TLS proxy in front on untrusted networks",
            err=True,
        )
    if weight_kernel is None and index is not None and not create_index:
        weight_kernel = _recorded_load_option(index, collection)
    limits = ServerLimits(
        max_body_bytes=max_body_bytes,
        max_inputs=max_inputs,
        max_tokens=max_tokens,
        max_embed_vectors=max_embed_vectors,
        header_timeout_s=header_timeout,
        body_timeout_s=body_timeout,
        shutdown_timeout_s=shutdown_timeout,
    )
    run_server(
        model,
        index,
        host=host,
        port=port,
        n_threads=threads,
        limits=limits,
        create_index=create_index,
        index_options=_server_options(index, collection) if index is not None else None,
        api_key=api_key,
        allowed_hosts=allowed_host or (),
        weight_kernel=weight_kernel,
    )


# ----------------------------------------------------------------------------------------------------------
# Registration
# ----------------------------------------------------------------------------------------------------------

EXAMPLES = {
    "encode": "lfm2edge encode model.gguf texts.txt -o vectors.npz\n\n"
    "  cat queries.jsonl | lfm2edge encode model.gguf - --queries > vectors.jsonl",
    "index create": "lfm2edge index create docs.idx -m colbert.gguf --dtype int8 --pool-factor 2\n\n"
    "  lfm2edge index create catalog.qdrant -m colbert.gguf --backend qdrant   # Qdrant Edge, in-process\n\n"
    "  lfm2edge index create http://localhost:6333 -m colbert.gguf --collection catalog   # a Qdrant server",
    "index add": 'lfm2edge index add docs.idx docs.jsonl   # {"id": "faq-1", "text": "...", "metadata": {}}'
    "\n\n"
    "  lfm2edge index add docs.idx notes.txt --on-duplicate skip   # resume an interrupted add"
    "\n\n"
    "  lfm2edge index add docs.idx corpus.parquet --ray --actors 8 --cpus-per-actor 2   # on a Ray cluster",
    "index delete": "lfm2edge index delete docs.idx faq-1 faq-7",
    "index info": "lfm2edge index info docs.idx --verify --json",
    "index compact": "lfm2edge index compact docs.idx",
    "index export": "lfm2edge index export docs.idx --to http://qdrant.internal:6333 --to-collection docs",
    "search": 'lfm2edge search docs.idx "how do I reset my password" -k 5 --json\n\n'
    '  lfm2edge search catalog.qdrant "waterproof jacket" --where \'{"brand": ["nordlys", "fjell"]}\'',
    "rerank": 'lfm2edge rerank model.gguf "reset password" candidates.txt --top-n 3',
    "serve": "lfm2edge serve model.gguf --index docs.idx --port 8123\n\n"
    "  curl -s localhost:8123/search -H 'content-type: application/json' "
    '-d \'{"query": "reset password"}\'',
}


def _epilog(name: str) -> str:
    return "Example:\n\n  " + EXAMPLES[name]


def register(app: typer.Typer) -> None:
    app.command(epilog=_epilog("encode"))(encode)
    index_app = typer.Typer(
        help="Persistent indexes: one model's document vectors in a folder; exact search, crash-safe writes.",
        no_args_is_help=True,
    )
    index_app.command("create", epilog=_epilog("index create"))(index_create)
    index_app.command("add", epilog=_epilog("index add"))(index_add)
    index_app.command("delete", epilog=_epilog("index delete"))(index_delete)
    index_app.command("info", epilog=_epilog("index info"))(index_info)
    index_app.command("compact", epilog=_epilog("index compact"))(index_compact)
    index_app.command("export", epilog=_epilog("index export"))(index_export)
    app.add_typer(index_app, name="index")
    app.command(epilog=_epilog("search"))(search)
    app.command(epilog=_epilog("rerank"))(rerank)
    app.command(epilog=_epilog("serve"))(serve)


if __name__ == "__main__":
    # `python -m lfm2edge.runtime.frontends.search_cli` is `python -m lfm2edge`. Only this script entry reaches up to
    # the root app (this file then runs as __main__): importing the module never imports lfm2edge.cli.
    from lfm2edge.cli import main

    main()
