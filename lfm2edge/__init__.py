"""lfm2edge: LiquidAI's bidirectional LFM2 retrievers on a laptop CPU or a Mac, through llama.cpp.

    import lfm2edge
    enc = lfm2edge.load("colbert-q8_0.gguf")
    q = enc.encode_query("how do I reset my password?")
    ranking = enc.rerank("how do I reset my password?", ["...", "..."])

The package root is thin: the work lives in ``lfm2edge.convert`` (checkpoint to GGUF),
``lfm2edge.runtime`` (encoders, MaxSim) and ``lfm2edge.bench`` — the folders convert/,
runtime/ and bench/. Names are imported lazily so ``import lfm2edge`` stays cheap.
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

_EXPORTS = {
    "load": "lfm2edge.runtime.encoders",
    "DenseEncoder": "lfm2edge.runtime.encoders",
    "ColBERTEncoder": "lfm2edge.runtime.encoders",
    "Ranking": "lfm2edge.runtime.encoders",
    "maxsim": "lfm2edge.runtime.maxsim",
    "PackedDocuments": "lfm2edge.runtime.maxsim",
    "build_info": "lfm2edge.runtime.build",
    "Lfm2EdgeError": "lfm2edge.runtime.errors",
    "InvalidInputError": "lfm2edge.runtime.errors",
    "ModelFileError": "lfm2edge.runtime.errors",
    "UnsupportedBuildError": "lfm2edge.runtime.errors",
    "FeatureUnavailableError": "lfm2edge.runtime.errors",
    "EncoderClosedError": "lfm2edge.runtime.errors",
    "DecodeError": "lfm2edge.runtime.errors",
    "convert": "lfm2edge.convert.pipeline",
    "Index": "lfm2edge.runtime.index",
    "Hit": "lfm2edge.runtime.index",
    "IndexCorruptError": "lfm2edge.runtime.index",
    "IndexModelMismatchError": "lfm2edge.runtime.index",
    "DuplicateIdError": "lfm2edge.runtime.index",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'lfm2edge' has no attribute {name!r}")
