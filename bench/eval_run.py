"""Run retrievers over BEIR datasets: one ranked run and its metrics per (table row, dataset).

A row is a model with one set of options. GGUFs rank through ``lfm2edge.runtime.storage.index.Index`` (its
documents cached by ``eval_cache``), so ``--pool-factor`` and ``--storage`` act exactly as they do for
users: MaxSim for ColBERT, cosine for dense models. ``--query-expansion`` loads the ColBERT model once per
mode; the documents are encoded once for all modes. A checkpoint runs through the PyTorch reference
(float32, exact MaxSim or cosine over its own cached vectors): the row the GGUFs are compared with.
Dense models have no query expansion and no token pooling; their rows differ by storage only.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from lfm2edge.bench.eval_cache import DEFAULT_CACHE_DIR, document_index, folder_hash, reference_documents
from lfm2edge.bench.eval_data import Dataset
from lfm2edge.bench.eval_metrics import Run, run_depth, score_run
from lfm2edge.runtime.core.errors import FeatureUnavailableError, InvalidInputError
from lfm2edge.runtime.core.settings import ModelKind

QUERY_EXPANSIONS = ("pylate", "attended", "none")
STORAGES = ("float16", "int8")
REFERENCE_STORAGE = "float32"


@dataclass(frozen=True)
class Options:
    query_expansions: tuple[str, ...] = ()  # empty: each ColBERT model's default mode
    pool_factors: tuple[int, ...] = (1,)
    storages: tuple[str, ...] = ("float16",)
    recall_ks: tuple[int, ...] = (20, 100)
    threads: int | None = None
    batch_size: int = 32
    cache_dir: Path = DEFAULT_CACHE_DIR
    progress: bool = True

    def __post_init__(self) -> None:
        bad = [m for m in self.query_expansions if m not in QUERY_EXPANSIONS]
        if bad:
            raise InvalidInputError(f"--query-expansion takes {', '.join(QUERY_EXPANSIONS)}, not {bad[0]!r}")
        bad = [s for s in self.storages if s not in STORAGES]
        if bad or not self.storages:
            raise InvalidInputError(f"--storage takes {', '.join(STORAGES)}, not {(bad or [''])[0]!r}")
        for name, values in (("--pool-factor", self.pool_factors), ("--recall-k", self.recall_ks)):
            if not values or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in values):
                raise InvalidInputError(f"{name} takes positive integers, got {values!r}")


@dataclass(frozen=True)
class ModelSpec:
    label: str  # the table's name for it: the GGUF's file name, or "<checkpoint> (reference)"
    source: str  # as given: a GGUF path, a checkpoint folder or a hub id
    reference: bool  # a checkpoint, run through the PyTorch reference
    weight_kernel: str | None = None  # a GGUF loaded with this load option (split_f32, dynamic_int8, ozaki_f32) set


@dataclass(frozen=True)
class Row:
    """One model with one set of options: a row of the table."""

    model: str
    source: str
    kind: str  # "colbert" | "dense"
    query_expansion: str | None  # None: dense (no expansion)
    pool_factor: int | None  # None: the reference (no index)
    storage: str  # "float16" | "int8" | "float32" (the reference)

    @property
    def label(self) -> str:
        parts = [self.query_expansion]
        if self.pool_factor is not None and self.kind == "colbert":
            parts.append(f"pool {self.pool_factor}")
        parts.append(self.storage)
        return f"{self.model} [{', '.join(p for p in parts if p)}]"


@dataclass(frozen=True)
class DatasetResult:
    row: Row
    dataset: str
    column: str
    metrics: Mapping[str, float]
    queries: int
    documents: int
    encoded_documents: int  # 0 when the cache held the document encodings
    run: Run = field(repr=False)


def model_specs(models: Sequence[str], weight_kernels: Sequence[str] = ()) -> list[ModelSpec]:
    """What each MODEL argument is: a GGUF file, or a checkpoint folder / hub id for the reference; then, for
    each of ``weight_kernels`` (load options), every GGUF of the type it takes again, loaded with it."""
    specs = []
    for given in models:
        path = Path(given).expanduser()
        if path.is_file():
            specs.append(ModelSpec(path.name.removesuffix(".gguf"), str(path), reference=False))
        elif path.is_dir() or (given.count("/") == 1 and not given.startswith((".", "/", "~"))):
            specs.append(ModelSpec(f"{path.name} (reference)", given, reference=True))
        else:
            raise InvalidInputError(
                f"MODEL {given!r} is neither a GGUF file, a checkpoint folder nor a hub id; check the path"
            )
    labels = [s.label for s in specs]
    # Two files of the same name (f16/model.gguf, q8_0/model.gguf): name them by the path given instead.
    specs = [
        ModelSpec(s.source if labels.count(s.label) > 1 else s.label, s.source, s.reference) for s in specs
    ]
    return specs + _weight_kernel_specs(specs, weight_kernels)


def _weight_kernel_specs(specs: Sequence[ModelSpec], options: Sequence[str]) -> list[ModelSpec]:
    """A row per (load option, GGUF of the type it takes); InvalidInputError for an unknown option or one
    that no GGUF given takes, FeatureUnavailableError where this build or CPU cannot run it."""
    from lfm2edge.runtime.core.llama import weight_kernel_available, weight_kernel_named
    from lfm2edge.runtime.core.model_file import describe

    out = []
    for option in options:
        kernel = weight_kernel_named(option)
        takers = [s for s in specs if not s.reference and describe(s.source).matmul_weight_type == kernel.weight_type]
        if not takers:
            raise InvalidInputError(
                f"--weight-kernel {option} takes {kernel.weight_type} GGUFs, and none was given; add one "
                f"(`lfm2edge convert --outtype {kernel.weight_type.lower()}`)"
            )
        if not weight_kernel_available(kernel):
            raise FeatureUnavailableError(
                f"--weight-kernel {option} {kernel.what}, which this build or CPU lacks; leave it out"
            )
        out += [ModelSpec(f"{s.label} {option}", s.source, False, option) for s in takers]
    return out


def evaluate(
    specs: Sequence[ModelSpec],
    datasets: Sequence[Dataset],
    options: Options,
    log: Callable[[str], None] = lambda _: None,
) -> list[DatasetResult]:
    """Every row of every model on every dataset, models in the order given."""
    _check_before_work(specs, options, log)
    results: list[DatasetResult] = []
    for spec in specs:
        run_model = _evaluate_reference if spec.reference else _evaluate_gguf
        results.extend(run_model(spec, datasets, options, log))
    return results


def _check_before_work(specs: Sequence[ModelSpec], options: Options, log: Callable[[str], None]) -> None:
    """Refuse what would fail halfway through (a damaged file, a mode this build lacks) before encoding."""
    from lfm2edge.runtime.core.model_file import describe

    kinds = [describe(s.source).kind for s in specs if not s.reference]
    colbert = ModelKind.LATE_INTERACTION in kinds
    if "pylate" in options.query_expansions and colbert:
        from lfm2edge.runtime.core.llama import supports_key_mask

        if not supports_key_mask():
            raise FeatureUnavailableError(
                "--query-expansion pylate needs lfm2edge's attention-key-mask patch, which this llama.cpp "
                "build lacks; build it with `make setup`, or evaluate attended,none"
            )
    if options.query_expansions and ModelKind.DENSE in kinds:
        log("note: --query-expansion and --pool-factor apply to ColBERT models only; "
            "dense rows differ by storage")


def _evaluate_gguf(
    spec: ModelSpec, datasets: Sequence[Dataset], opt: Options, log: Callable[[str], None]
) -> Iterator[DatasetResult]:
    import lfm2edge
    from lfm2edge.runtime.core.model_file import describe
    from lfm2edge.runtime.storage.index import Index, model_identity

    colbert = describe(spec.source).kind is ModelKind.LATE_INTERACTION
    modes: Sequence[str | None] = (opt.query_expansions or (None,)) if colbert else (None,)
    pool_factors = opt.pool_factors if colbert else (1,)
    depth = run_depth(opt.recall_ks)
    identity = None
    done_modes: set[str] = set()
    for mode in modes:
        kernel = {spec.weight_kernel: True} if spec.weight_kernel else {}
        with lfm2edge.load(spec.source, n_threads=opt.threads, query_expansion=mode, **kernel) as encoder:
            if colbert and encoder.query_expansion in done_modes:
                # A file without query expansion runs every mode as "none": one row is enough.
                log(f"{spec.label}: query expansion {mode!r} runs as {encoder.query_expansion!r}, "
                    "already evaluated")
                continue
            done_modes.add(encoder.query_expansion if colbert else "")
            # the content hash (with the load option, whose vectors differ): read once per model
            identity = identity or model_identity(encoder)
            for ds in datasets:
                cached = {
                    (storage, pf): document_index(
                        opt.cache_dir, encoder, identity, ds, storage, pf, opt.progress,
                        lambda m, ds=ds: log(f"{spec.label}: {ds.name}: {m}"),
                    )
                    for storage in opt.storages
                    for pf in pool_factors
                }
                log(f"{spec.label}: {ds.name}: encoding {len(ds.query_ids)} queries")
                queries = encoder.encode_query(list(ds.query_texts), opt.batch_size, opt.progress)
                for (storage, pf), entry in cached.items():
                    with Index.open(entry.path) as index:
                        hits = index.search_vectors(list(queries), k=depth)
                    run = {
                        q: {h.id: h.score for h in found} for q, found in zip(ds.query_ids, hits, strict=True)
                    }
                    row = Row(
                        spec.label, spec.source, "colbert" if colbert else "dense",
                        encoder.query_expansion if colbert else None, pf, storage,
                    )
                    yield _result(row, ds, run, entry.encoded, opt)


def _evaluate_reference(
    spec: ModelSpec, datasets: Sequence[Dataset], opt: Options, log: Callable[[str], None]
) -> Iterator[DatasetResult]:
    try:
        from lfm2edge.convert.checkpoint import resolve
        from lfm2edge.convert.reference import ReferenceEncoder
    except ImportError as e:
        raise FeatureUnavailableError(
            f"the PyTorch reference for {spec.source} needs torch and transformers ({e.name} is missing): "
            "pip install 'lfm2edge[reference]', or evaluate GGUF files only"
        ) from None
    from lfm2edge.runtime.core.maxsim import PackedDocuments, maxsim

    checkpoint = resolve(spec.source)
    reference = ReferenceEncoder.from_checkpoint(checkpoint, threads=opt.threads)
    checkpoint_hash = folder_hash(checkpoint.path)
    colbert = reference.is_colbert
    modes: Sequence[str | None] = (opt.query_expansions or ("pylate",)) if colbert else (None,)
    depth = run_depth(opt.recall_ks)
    for ds in datasets:
        docs = reference_documents(
            opt.cache_dir, reference, checkpoint_hash, ds, opt.progress,
            lambda m, ds=ds: log(f"{spec.label}: {ds.name}: {m}"),
        )
        packed = PackedDocuments(docs.vectors, docs.offsets) if colbert else None
        for i, mode in enumerate(modes):
            log(f"{spec.label}: {ds.name}: encoding {len(ds.query_ids)} queries")
            run = {}
            for query_id, text in zip(ds.query_ids, ds.query_texts, strict=True):
                q = reference.encode_query(text, expansion=mode or "pylate")
                scores = maxsim(q, packed) if colbert else docs.vectors @ np.asarray(q, dtype=np.float32)
                top = np.argsort(-scores, kind="stable")[:depth]
                run[query_id] = {ds.doc_ids[i]: float(scores[i]) for i in top}
            kind = "colbert" if colbert else "dense"
            row = Row(spec.label, spec.source, kind, mode, None, REFERENCE_STORAGE)
            yield _result(row, ds, run, docs.encoded if i == 0 else 0, opt)


def _result(row: Row, ds: Dataset, run: Run, encoded: int, opt: Options) -> DatasetResult:
    return DatasetResult(
        row=row,
        dataset=ds.name,
        column=ds.column,
        metrics=score_run(ds.qrels, run, opt.recall_ks),
        queries=len(ds.query_ids),
        documents=len(ds.doc_ids),
        encoded_documents=encoded,
        run=run,
    )
