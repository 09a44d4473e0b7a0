"""The models a run measures, and the cache that keeps them between runs.

``MODEL`` is a GGUF (measured as is), a checkpoint folder or a hub id (converted to each
requested format), or nothing: then random checkpoints of the real shape (both ColBERT and
Embedding) are generated. Generated checkpoints and every conversion live under the cache
folder (default ``~/.cache/lfm2edge/bench``), keyed by shape, seed, format and a digest of
the generator / converter source, so a second run reuses them and a changed converter
re-converts. Writes are atomic (a temporary name, then a rename).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from lfm2edge.runtime.core.errors import InvalidInputError

DEFAULT_FORMATS: dict[str, tuple[str, ...]] = {"late_interaction": ("f16", "q8_0"), "dense": ("q8_0",)}
MODEL_NAMES = {"late_interaction": "ColBERT", "dense": "Embedding"}
SYNTHETIC_KINDS = {"late_interaction": "colbert", "dense": "embedding"}
Status = Callable[[str], None]


@dataclass(frozen=True)
class ModelSpec:
    """One model to measure: its GGUFs per format and, where known, the checkpoint for PyTorch."""

    name: str
    kind: str  # "late_interaction" / "dense"
    ggufs: tuple[tuple[str, Path], ...]  # (format, file)
    checkpoint: Path | None
    source: str
    random_weights: bool
    conversions: tuple[tuple[str, float | None], ...] = ()  # (format, seconds converted now; None: cached)


def default_cache_dir() -> Path:
    root = os.environ.get("LFM2EDGE_CACHE")
    return (Path(root) if root else Path.home() / ".cache" / "lfm2edge") / "bench"


def _digest(*parts: object) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(repr(p).encode() + b"\x00")
    return h.hexdigest()[:12]


def _source_digest(modules: Sequence[str]) -> str:
    """A digest of the named lfm2edge.convert modules' source (a changed converter invalidates the cache)."""
    import lfm2edge.convert as pkg

    folder = Path(pkg.__file__).parent
    return _digest(*[(folder / f"{m}.py").read_bytes() for m in modules if (folder / f"{m}.py").exists()])


CONVERTER_MODULES = ("checkpoint", "pipeline", "quantize", "tensors", "vocab", "writer")
# q8_0_mixed also measures, through the PyTorch reference, which parts stay bf16.
MIXING_MODULES = ("mixing", "reference", "verify")


def _converter_digest(fmt: str) -> str:
    from lfm2edge.convert.mixing import MIXED
    from lfm2edge.runtime.core.build import build_info

    modules = CONVERTER_MODULES + (MIXING_MODULES if fmt == MIXED else ())
    return _digest(_source_digest(modules), build_info().binding_version)


def shape_name(shape) -> str:
    from lfm2edge.convert.synthetic import FULL, TINY

    base = "full" if shape == FULL else "tiny" if shape == TINY else "custom"
    return f"{base}-{_digest(shape)[:8]}"


def synthetic_checkpoint(cache: Path, kind: str, shape, seed: int, status: Status) -> Path:
    """A random checkpoint of ``shape`` in the real layout, generated once per (kind, shape, seed, generator)."""
    from lfm2edge.convert.synthetic import make_checkpoint

    folder = cache / "synthetic" / f"{SYNTHETIC_KINDS[kind]}-{shape_name(shape)}-seed{seed}-{_source_digest(['synthetic'])[:8]}"
    final = folder / "checkpoint"
    if (final / "config.json").exists():
        return final
    status(f"generating a random {MODEL_NAMES[kind]} checkpoint ({shape_name(shape)})")
    tmp = folder / f".checkpoint-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    make_checkpoint(tmp, SYNTHETIC_KINDS[kind], shape, seed=seed)
    try:
        os.replace(tmp, final)
    except OSError:  # another run finished first
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def converted(cache_folder: Path, checkpoint: Path, fmt: str, threads: int, status: Status) -> tuple[Path, float | None]:
    """(the GGUF of ``checkpoint`` in ``fmt``, seconds spent converting it now or None when cached)."""
    from lfm2edge.convert.pipeline import OUTTYPES, convert

    fmt = fmt.lower()
    if fmt not in OUTTYPES:
        raise InvalidInputError(f"unknown format {fmt!r}; choose among {', '.join(OUTTYPES)}")
    out = cache_folder / f"{fmt}-{_converter_digest(fmt)[:8]}.gguf"
    if out.exists():
        return out, None
    cache_folder.mkdir(parents=True, exist_ok=True)
    status(f"converting {checkpoint.name if checkpoint.name != 'checkpoint' else cache_folder.name} to {fmt}")
    tmp = out.with_name(f".{out.name}.{os.getpid()}.gguf")
    t0 = time.perf_counter()
    try:
        convert(checkpoint, tmp, fmt, n_threads=threads)
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return out, time.perf_counter() - t0


def checkpoint_key(path: Path) -> str:
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in (".json", ".safetensors"))
    return _digest(str(path.resolve()), *[(str(p.relative_to(path)), p.stat().st_size, p.stat().st_mtime_ns)
                                         for p in files])


def _formats_for(kind: str, formats: Sequence[str] | None) -> tuple[str, ...]:
    if formats:
        return tuple(formats)
    from lfm2edge.bench.machine import bf16_native

    # Where the CPU multiplies bf16 natively (AMX, AVX512-BF16) it is the fast format with the better
    # fidelity: measure it too.
    return ("bf16", *DEFAULT_FORMATS[kind]) if bf16_native() else DEFAULT_FORMATS[kind]


def from_checkpoint(
    checkpoint: Path, source: str, formats: Sequence[str] | None, cache: Path, threads: int, status: Status,
    random_weights: bool, folder: Path | None = None,
) -> ModelSpec:
    from lfm2edge.convert.checkpoint import Checkpoint

    kind = Checkpoint(checkpoint).kind.value
    folder = folder or cache / "converted" / f"{checkpoint.name}-{checkpoint_key(checkpoint)}"
    ggufs, conversions = [], []
    for fmt in _formats_for(kind, formats):
        path, seconds = converted(folder, checkpoint, fmt, threads, status)
        ggufs.append((fmt.lower(), path))
        conversions.append((fmt.lower(), seconds))
    return ModelSpec(MODEL_NAMES[kind], kind, tuple(ggufs), checkpoint, source, random_weights, tuple(conversions))


def synthetic_models(
    shape, seed: int, formats: Sequence[str] | None, cache: Path, threads: int, status: Status,
) -> list[ModelSpec]:
    """Random ColBERT and Embedding checkpoints of ``shape`` and their conversions."""
    specs = []
    for kind in ("late_interaction", "dense"):
        ckpt = synthetic_checkpoint(cache, kind, shape, seed, status)
        source = f"synthetic {SYNTHETIC_KINDS[kind]} checkpoint, shape {shape_name(shape)}, seed {seed} (random weights)"
        specs.append(from_checkpoint(ckpt, source, formats, cache, threads, status, True, ckpt.parent))
    return specs


def from_argument(
    model: str, formats: Sequence[str] | None, reference: str | None, cache: Path, threads: int, status: Status,
) -> ModelSpec:
    """A GGUF (measured as is; ``reference`` names its checkpoint for the PyTorch side), a folder or a hub id."""
    from lfm2edge.convert.checkpoint import resolve
    from lfm2edge.runtime.core.model_file import describe

    path = Path(model).expanduser()
    if path.is_file():
        mf = describe(path)
        problems = mf.problems()
        if problems or mf.kind is None:
            raise InvalidInputError(f"{path} cannot be benchmarked:\n- " + "\n- ".join(problems or ["not a retriever"]))
        from lfm2edge.convert.verify import FILE_TYPE_NAMES

        fmt = FILE_TYPE_NAMES.get(int(mf.header.metadata.get("general.file_type", -1)), path.suffix.lstrip("."))
        ref = resolve(reference).path if reference else None
        return ModelSpec(MODEL_NAMES[mf.kind.value], mf.kind.value, ((str(fmt).lower(), path),), ref, str(path), False)
    ckpt = resolve(model)
    return from_checkpoint(ckpt.path, ckpt.source, formats, cache, threads, status, False)
