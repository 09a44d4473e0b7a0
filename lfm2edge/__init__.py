"""lfm2edge: LiquidAI's bidirectional LFM2 retrievers on a laptop CPU or a Mac, through llama.cpp.

    import lfm2edge
    enc = lfm2edge.load("colbert-q8_0.gguf")
    q = enc.encode_query("how do I reset my password?")
    ranking = enc.rerank("how do I reset my password?", ["...", "..."])

    lfm2edge.convert_checkpoint("LiquidAI/LFM2.5-ColBERT-350M", "colbert-q8_0.gguf", "q8_0")

The package root is thin: the work lives in the subpackages ``lfm2edge.convert`` (checkpoint to
GGUF), ``lfm2edge.runtime`` (encoders, MaxSim, the index) and ``lfm2edge.bench`` — the folders
convert/, runtime/ and bench/ — and ``lfm2edge.distributed``, the public face of
``lfm2edge.runtime.distributed`` (encoding on a Ray cluster). Each name means one thing:
``lfm2edge.convert`` is always the subpackage, the function is ``lfm2edge.convert_checkpoint``. Names are imported lazily so
``import lfm2edge`` stays cheap.
"""

from __future__ import annotations

import importlib
import os

__version__ = "0.1.0"

# llama.cpp's OpenMP workers (libgomp) keep spinning after each decode: the default spin count
# times Sapphire Rapids' slow `pause` lasts milliseconds, during which they take a core from
# whatever runs next, such as MaxSim's threads (query + MaxSim measured 3-7 ms slower than its
# parts). A shorter spin removed that and left decodes as fast. It must be set before llama_cpp
# loads libgomp, hence here; a value already in the environment wins.
os.environ.setdefault("GOMP_SPINCOUNT", "20000")

# exported name -> (module, its name there)
_EXPORTS: dict[str, tuple[str, str]] = {
    name: (module, name)
    for module, names in {
        "lfm2edge.runtime.core.encoders": ("load", "DenseEncoder", "ColBERTEncoder", "Ranking"),
        "lfm2edge.runtime.core.maxsim": ("maxsim", "PackedDocuments"),
        "lfm2edge.runtime.core.build": ("build_info",),
        "lfm2edge.runtime.core.errors": (
            "Lfm2EdgeError", "InvalidInputError", "ModelFileError", "CheckpointError", "ConversionError",
            "UnsupportedBuildError", "FeatureUnavailableError", "EncoderClosedError", "DecodeError",
            "VerificationError",
        ),
        "lfm2edge.runtime.storage.index": (
            "Index", "Hit", "IndexCorruptError", "IndexModelMismatchError", "DuplicateIdError",
        ),
        "lfm2edge.runtime.storage.qdrant_index": ("QdrantIndex",),
        "lfm2edge.runtime.storage.qdrant_engines": ("EngineError",),
    }.items()
    for name in names
} | {"convert_checkpoint": ("lfm2edge.convert.pipeline", "convert")}
_SUBPACKAGES = ("convert", "runtime", "bench", "distributed")
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        module, attribute = _EXPORTS[name]
        return getattr(importlib.import_module(module), attribute)
    if name in _SUBPACKAGES:  # what importing lfm2edge.<name>.* binds here anyway
        return importlib.import_module(f"lfm2edge.{name}")
    raise AttributeError(f"module 'lfm2edge' has no attribute {name!r}")
