"""Encode a corpus on a Ray cluster: ``encode_corpus`` (to Parquet shards) and ``add_to_index``.

    import lfm2edge
    from lfm2edge.distributed import add_to_index, connect, encode_corpus

    connect("HEAD:6379")      # or ray.init(...); without either, a local Ray is found or started
    encode_corpus("colbert.gguf", "docs.jsonl", "vectors/", actors=4, cpus_per_actor=2)
    add_to_index("colbert.gguf", "docs.jsonl", lfm2edge.Index.open("docs.idx"))

The steps, in order: check the options and the model file on the driver; read and check the input
(``sources``); ask the target which ids it already holds and drop them (a rerun resumes); send the
rest as blocks of ``batch_size`` documents to a pool of ``actors`` encoder actors of
``cpus_per_actor`` CPUs each (``encode``); write each block the moment it comes back (``sinks``),
with a progress bar. Nothing is encoded twice within a run, and every block is written whole or not
at all, so an interrupted run loses at most the blocks in flight.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal

from lfm2edge.runtime.core.errors import InvalidInputError, Lfm2EdgeError, ModelFileError
from lfm2edge.runtime.core.llama import choose_weight_kernel, weight_kernel_options
from lfm2edge.runtime.core.model_file import describe
from lfm2edge.runtime.core.progress import progress_bar
from lfm2edge.runtime.distributed.encode import DocumentEncoder
from lfm2edge.runtime.distributed.ray_support import connect, require_pyarrow, require_ray, typed_remote_error
from lfm2edge.runtime.distributed.sinks import IndexSink, ParquetShards, Sink
from lfm2edge.runtime.distributed.sources import Corpus, Fields, read_corpus, to_dataset
from lfm2edge.runtime.storage.documents import (
    DuplicateIdError,
    IndexModelMismatchError,
    recorded_weight_kernel,
    with_weight_kernel,
)

# Files or folders of JSONL/Parquet, or a Corpus already read and checked by ``read_corpus``.
Sources = str | Path | Sequence[str | Path] | Corpus
OnDuplicate = Literal["skip", "error", "replace"]
ON_DUPLICATE: tuple[str, ...] = ("skip", "error", "replace")
# Documents per actor call, and so per Parquet shard or index commit: big enough that Ray's per-call
# cost (a few ms) is small next to encoding, small enough that an interruption loses little.
DEFAULT_BATCH_SIZE = 64
MAX_BATCH_SIZE = 100_000


@dataclass(frozen=True)
class ActorPool:
    """How the work is spread: ``actors`` encoders of ``cpus_per_actor`` CPUs (= llama.cpp threads) each."""

    actors: int
    cpus_per_actor: int
    batch_size: int


@dataclass(frozen=True)
class ActorModel:
    """What every actor loads, and how: the GGUF, with ``exact`` and the ``weight_kernel`` load option, and
    the model identity it must find (``model_identity``: the GGUF's, with the option)."""

    path: Path  # absolute: each node opens the same path
    identity: str
    exact: bool
    weight_kernel: str | None

    def constructor_kwargs(self) -> dict[str, object]:
        return {"model_path": str(self.path), "identity": self.identity, "exact": self.exact,
                "weight_kernel": self.weight_kernel}


@dataclass(frozen=True)
class EncodeResult:
    documents: int  # in the input
    skipped: int  # already in the target, not encoded
    encoded: int  # encoded and written by this run
    replaced: int  # of those, how many replaced a document of the same id (on_duplicate="replace")
    actors: int  # encoder actors that ran (0: nothing was left to encode)
    cpus_per_actor: int
    seconds: float  # from the first block sent to the last one written, actors' start included

    @property
    def documents_per_second(self) -> float:
        return self.encoded / self.seconds if self.seconds > 0 else 0.0


def encode_corpus(
    model: str | Path,
    sources: Sources,
    output: str | Path,
    *,
    actors: int | None = None,
    cpus_per_actor: int = 1,
    batch_size: int = DEFAULT_BATCH_SIZE,
    text_field: str = "text",
    id_field: str = "id",
    metadata_field: str = "metadata",
    input_format: str = "auto",
    exact: bool = True,
    weight_kernel: str | None = None,
    show_progress_bar: bool = False,
) -> EncodeResult:
    """Encode every document of ``sources`` (JSONL/Parquet files or folders, or a ``Corpus``) into
    Parquet shards in the folder ``output``, skipping ids already there (``sinks``: the file layout;
    ``read_vectors`` reads them back). ``actors=None`` fills the cluster's CPUs. ``weight_kernel`` is a
    load option of ``load()`` by name (e.g. "ozaki_f32"); the shards record it in the model identity."""
    require_ray()
    fields = Fields(id_field, text_field, metadata_field)
    actor_model, kind = _check_model(model, exact, weight_kernel)
    corpus = _corpus(sources, fields, input_format)
    pool = _actor_pool(actors, cpus_per_actor, batch_size)
    sink = ParquetShards(output, actor_model.identity, kind)
    try:
        return _run(actor_model, corpus, sink, pool, "skip", show_progress_bar)
    finally:
        sink.close()


def add_to_index(
    model: str | Path,
    sources: Sources,
    index,
    *,
    on_duplicate: OnDuplicate = "skip",
    actors: int | None = None,
    cpus_per_actor: int = 1,
    batch_size: int = DEFAULT_BATCH_SIZE,
    text_field: str = "text",
    id_field: str = "id",
    metadata_field: str = "metadata",
    input_format: str = "auto",
    exact: bool = True,
    weight_kernel: str | None = None,
    show_progress_bar: bool = False,
) -> EncodeResult:
    """Encode every document of ``sources`` and add it to ``index`` (an open ``Index``, or another engine
    with ``add_vectors`` and ``ids``), written from this process, one commit per block.

    ``on_duplicate``: "skip" (default) leaves ids already in the index alone, so rerunning an
    interrupted add finishes it; "error" refuses before encoding anything; "replace" re-encodes them.
    ``weight_kernel``: the load option the actors use; None takes the one the index's model identity
    records (an index built by ``load(path, ozaki_f32=True)`` gets ozaki_f32), so its vectors match.
    """
    require_ray()
    if on_duplicate not in ON_DUPLICATE:
        raise InvalidInputError(f"on_duplicate must be one of {ON_DUPLICATE}, not {on_duplicate!r}")
    fields = Fields(id_field, text_field, metadata_field)
    built_by = getattr(getattr(index, "settings", None), "identity", None)
    actor_model, _ = _check_model(model, exact, weight_kernel or recorded_weight_kernel(built_by))
    if built_by is not None and built_by != actor_model.identity:
        raise IndexModelMismatchError(
            f"the index was built by another model (identity {built_by}); {model}, loaded this way, is "
            f"{actor_model.identity}. Encode with the model that built it, loaded the same way, or build a new "
            "index for this model."
        )
    corpus = _corpus(sources, fields, input_format)
    pool = _actor_pool(actors, cpus_per_actor, batch_size)
    return _run(actor_model, corpus, IndexSink(index, on_duplicate), pool, on_duplicate, show_progress_bar)


# ----------------------------------------------------------------------------------------------------------
# Checks
# ----------------------------------------------------------------------------------------------------------


def _check_model(model: str | Path, exact: bool, weight_kernel: str | None) -> tuple[ActorModel, str]:
    """(what the actors load, kind) for a GGUF that loads as a retriever with ``weight_kernel``; before Ray is
    used, ModelFileError for a file that does not, InvalidInputError for an unknown option."""
    path = Path(model)
    if not path.is_file():
        raise ModelFileError(f"model file {path} does not exist; give the path of a retriever GGUF")
    model_file = describe(path)
    problems = model_file.problems()
    if problems or model_file.kind is None:
        raise ModelFileError(f"{path} cannot be used as a retriever:\n- " + "\n- ".join(problems))
    # The option's file type, as load() checks it (whether a node's CPU runs it is the actor's to say).
    choose_weight_kernel(model_file.matmul_weight_type, **weight_kernel_options(weight_kernel))
    identity = with_weight_kernel(model_file.header.identity(), weight_kernel)
    return ActorModel(path.resolve(), identity, exact, weight_kernel), model_file.kind.value


def _corpus(sources: Sources, fields: Fields, input_format: str) -> Corpus:
    """The input, read and checked here unless the caller already did (``read_corpus``)."""
    return sources if isinstance(sources, Corpus) else read_corpus(sources, fields, input_format)


def _positive(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InvalidInputError(f"{name} must be a positive integer, got {value!r}")
    return value


def _actor_pool(actors: int | None, cpus_per_actor: int, batch_size: int) -> ActorPool:
    """The pool that fits the cluster Ray is connected to (started here if not yet), or InvalidInputError:
    actors that can never be placed would leave the run waiting for ever."""
    cpus_per_actor = _positive("cpus_per_actor", cpus_per_actor)
    batch_size = _positive("batch_size", batch_size)
    if batch_size > MAX_BATCH_SIZE:
        raise InvalidInputError(f"batch_size must be at most {MAX_BATCH_SIZE}, got {batch_size}")
    if actors is not None:
        actors = _positive("actors", actors)
    ray = require_ray()
    if not ray.is_initialized():
        connect(None)
    node_cpus = [int(n["Resources"].get("CPU", 0)) for n in ray.nodes() if n.get("Alive")]
    largest = max(node_cpus, default=0)
    if cpus_per_actor > largest:
        raise InvalidInputError(
            f"cpus_per_actor={cpus_per_actor}: no node of this Ray cluster has that many CPUs (the largest "
            f"has {largest}); ask for {largest} or fewer"
        )
    room = sum(c // cpus_per_actor for c in node_cpus)
    if actors is None:
        actors = room
    elif actors > room:
        raise InvalidInputError(
            f"{actors} actors of {cpus_per_actor} CPU(s) do not fit this Ray cluster (nodes of {node_cpus} "
            f"CPUs: room for {room}); ask for {room} or fewer, or add nodes"
        )
    return ActorPool(actors, cpus_per_actor, batch_size)


# ----------------------------------------------------------------------------------------------------------
# The run
# ----------------------------------------------------------------------------------------------------------


def _run(
    model: ActorModel,
    corpus: Corpus,
    sink: Sink,
    pool: ActorPool,
    on_duplicate: str,
    show_progress_bar: bool,
) -> EncodeResult:
    present = sink.present(corpus.ids)
    if present and on_duplicate == "error":
        raise DuplicateIdError(
            f"{len(present)} id(s) already in the index, e.g. {sorted(present)[:5]}; nothing was encoded. "
            "Pass on_duplicate='skip' to keep them or 'replace' to re-encode them"
        )
    replacing = on_duplicate == "replace"
    todo = corpus if replacing else corpus.without(present)
    # No more actors than blocks: an actor with no block would only load the model.
    pool = replace(pool, actors=min(pool.actors, -(-len(todo) // pool.batch_size)))
    encoded, started = 0, time.perf_counter()
    if len(todo):
        encoded = _encode_and_write(model, todo, sink, pool, show_progress_bar)
    return EncodeResult(
        documents=len(corpus),
        skipped=0 if replacing else len(present),
        encoded=encoded,
        replaced=len(present) if replacing else 0,
        actors=pool.actors,
        cpus_per_actor=pool.cpus_per_actor,
        seconds=time.perf_counter() - started,
    )


def _encode_and_write(model: ActorModel, todo: Corpus, sink: Sink, pool: ActorPool, show_progress_bar: bool) -> int:
    """Stream ``todo`` through the actor pool into ``sink``; the number of documents written."""
    ray = require_ray()
    require_pyarrow()
    vectors = to_dataset(todo, pool.batch_size).map_batches(
        DocumentEncoder,
        fn_constructor_kwargs=model.constructor_kwargs(),
        batch_size=pool.batch_size,
        batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(size=pool.actors),
        num_cpus=pool.cpus_per_actor,
    )
    bar = progress_bar(len(todo), show_progress_bar, unit="doc")
    written = 0
    try:
        with _without_ray_progress_bars(ray):
            # batch_size=None: each block as an actor returned it, so one shard or commit per block.
            for block in vectors.iter_batches(batch_size=None, batch_format="pyarrow"):
                if block.num_rows:
                    sink.write(block)
                    written += block.num_rows
                    bar(block.num_rows)
    except Lfm2EdgeError:
        raise  # the sink's own errors
    except Exception as e:
        typed = typed_remote_error(e, str(model.path))
        if typed is None:
            raise
        raise typed from None
    finally:
        bar(0, close=True)
    return written


@contextmanager
def _without_ray_progress_bars(ray) -> Iterator[None]:
    """Ray Data's own bars off while ours runs (one bar, counting documents written, not blocks)."""
    context = ray.data.DataContext.get_current()
    before = context.enable_progress_bars
    context.enable_progress_bars = False
    try:
        yield
    finally:
        context.enable_progress_bars = before
