"""Encoding at scale: a Ray Data pipeline of GGUF encoders writing to an index or Parquet.

Needs the ``distributed`` extra (``pip install 'lfm2edge[distributed]'``: Ray Data and pyarrow). The
modules import without it; the first call that needs Ray raises ``FeatureUnavailableError``.

- ``pipeline``: ``encode_corpus`` (to Parquet shards) and ``add_to_index``, the public entry points;
- ``sources``: the JSONL/Parquet input, read and checked on the driver;
- ``encode``: the encoder actor (one GGUF per actor, threads = its CPUs);
- ``arrow_vectors``: vectors as Arrow columns, between actors, driver and shards;
- ``sinks``: Parquet shards and the index, each knowing which ids it holds (for resuming);
- ``ray_support``: Ray imported lazily, joining a cluster, actor errors back as lfm2edge errors.
"""

from lfm2edge.runtime.distributed.pipeline import (
    ActorPool,
    EncodeResult,
    add_to_index,
    encode_corpus,
)
from lfm2edge.runtime.distributed.ray_support import connect
from lfm2edge.runtime.distributed.sinks import read_vectors
from lfm2edge.runtime.distributed.sources import Corpus, Fields, read_corpus

__all__ = [
    "ActorPool",
    "Corpus",
    "EncodeResult",
    "Fields",
    "add_to_index",
    "connect",
    "encode_corpus",
    "read_corpus",
    "read_vectors",
]
