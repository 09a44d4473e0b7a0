"""How a checkpoint and a GGUF say what kind of LFM2 they hold, defined once for the converter and runtime.

The converter reads these from a checkpoint and writes them into the GGUF; the runtime reads them back
to tell a retriever from a generative model or a file converted the wrong way.
"""

from __future__ import annotations

from enum import IntEnum

# general.architecture of every LFM2 GGUF, bidirectional or not (llama.cpp's LLM_ARCH_LFM2).
GGUF_ARCH = "lfm2"
# config.json "architectures" of the bidirectional LFM2.5 retrievers (the causal LFM2-ColBERT v1 says
# "Lfm2Model"); the GGUF records it under lfm2edge.architecture.
BIDIRECTIONAL_ARCH = "Lfm2BidirectionalModel"


class Pooling(IntEnum):
    """llama.cpp's ``enum llama_pooling_type``, as a GGUF stores it in ``lfm2.pooling_type``."""

    NONE = 0  # one vector per token: ColBERT
    MEAN = 1
    CLS = 2  # the first token's vector: LFM2.5-Embedding
    LAST = 3
    RANK = 4


def pooling_name(value: int) -> str:
    """"cls", "none", ...; the number itself for a value llama.cpp does not know."""
    try:
        return Pooling(value).name.lower()
    except ValueError:
        return str(value)
