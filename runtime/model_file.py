"""What a GGUF file is, and what is wrong with it, before llama.cpp loads it.

``describe()`` decides the kind (dense or ColBERT) and the retrieval settings: ours when
the file carries them, else from pooling / embedding_length_out with the published defaults.
``problems()`` names each reason a file will not work, with the way out.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from lfm2edge.runtime.errors import ModelFileError
from lfm2edge.runtime.gguf_file import GGUFHeader, read_header
from lfm2edge.runtime.settings import (
    NAMESPACE,
    ModelKind,
    RetrievalSettings,
    colbert_defaults,
    embedding_defaults,
    from_metadata,
)

POOLING_NAMES = {0: "none", 1: "mean", 2: "cls", 3: "last", 4: "rank"}
ARCHITECTURE_KEY = NAMESPACE + "architecture"
BIDIRECTIONAL_ARCH = "Lfm2BidirectionalModel"


@dataclass(frozen=True)
class ModelFile:
    header: GGUFHeader
    kind: ModelKind | None  # None: neither a dense nor a ColBERT retriever
    settings: RetrievalSettings | None
    has_own_settings: bool  # False: published defaults were assumed

    @property
    def path(self) -> Path:
        return self.header.path

    @property
    def causal(self) -> bool:
        return bool(self.header.arch_key("attention.causal", True))

    @property
    def pooling(self) -> int:
        return int(self.header.arch_key("pooling_type", 0))  # type: ignore[arg-type]

    def problems(self) -> list[str]:
        """Every reason this file will not work as a retriever, each with the way out."""
        h, found = self.header, []
        if h.architecture == "lfm2-bidir":
            return [
                "architecture 'lfm2-bidir' comes from the superseded llama.cpp PR #24782; upstream llama.cpp "
                "rejects it. Re-convert the checkpoint with `lfm2edge convert`, or download the re-uploaded "
                "official GGUF (LiquidAI/LFM2.5-ColBERT-350M-GGUF, LiquidAI/LFM2.5-Embedding-350M-GGUF)."
            ]
        if h.architecture != "lfm2":
            return [f"architecture {h.architecture!r} is not 'lfm2': this is not an LFM2 retriever"]
        source_arch = str(h.metadata.get(ARCHITECTURE_KEY, ""))
        if self.causal and source_arch == BIDIRECTIONAL_ARCH:
            found.append(
                "the checkpoint is bidirectional (Lfm2BidirectionalModel) but the file was converted as causal "
                "(no lfm2.attention.causal=false): its vectors are wrong. Re-convert with `lfm2edge convert`."
            )
        if self.kind is None:
            found.append(
                "the file has no pooling and no ColBERT projection (dense_2.weight with "
                "lfm2.embedding_length_out): it is a generative LFM2 or a ColBERT file whose projection was lost. "
                "Re-convert the retriever checkpoint with `lfm2edge convert`."
            )
        if self.kind is ModelKind.LATE_INTERACTION and (
            h.tensor("dense_2.weight") is None or h.arch_key("embedding_length_out") is None
        ):
            found.append(
                "a ColBERT model needs its 1_Dense projection (dense_2.weight and lfm2.embedding_length_out), "
                "which this file lacks. Re-convert with `lfm2edge convert` from the PyLate checkpoint folder."
            )
        if self.kind is ModelKind.DENSE and self.pooling != 2:
            found.append(
                f"a dense model needs CLS pooling (lfm2.pooling_type = 2); this file has "
                f"{POOLING_NAMES.get(self.pooling, self.pooling)}. Re-convert with `lfm2edge convert`."
            )
        return found

    def tensor_type_summary(self) -> dict[str, int]:
        return dict(Counter(t.type_name for t in self.header.tensors))


def _infer_kind(h: GGUFHeader) -> ModelKind | None:
    if h.arch_key("embedding_length_out") is not None or h.tensor("dense_2.weight") is not None:
        return ModelKind.LATE_INTERACTION
    if int(h.arch_key("pooling_type", 0)) != 0:  # type: ignore[arg-type]
        return ModelKind.DENSE
    return None


def describe(path: str | Path) -> ModelFile:
    """Read ``path``'s header and work out its kind and retrieval settings."""
    h = read_header(path)
    own = from_metadata(h.metadata)
    if own is not None:
        return ModelFile(h, own.kind, own, True)
    kind = _infer_kind(h)
    settings = None
    if kind is ModelKind.DENSE:
        settings = embedding_defaults(str(h.path))
    elif kind is ModelKind.LATE_INTERACTION:
        settings = _colbert_defaults_for(h)
    return ModelFile(h, kind, settings, False)


def _colbert_defaults_for(h: GGUFHeader) -> RetrievalSettings:
    """Published ColBERT settings, with the marker ids looked up in the file's own vocabulary."""
    defaults = colbert_defaults(str(h.path))
    tokens = h.metadata.get("tokenizer.ggml.tokens")
    if not isinstance(tokens, list):
        return defaults
    index = {t: i for i, t in enumerate(tokens)}
    q_id, d_id = index.get(defaults.query_prefix), index.get(defaults.document_prefix)
    if q_id is None or d_id is None:
        raise ModelFileError(
            f"{h.path} looks like a ColBERT model but its vocabulary has no '[Q] '/'[D] ' tokens; "
            "re-convert it with `lfm2edge convert` so the file carries its retrieval settings"
        )
    from dataclasses import replace

    return replace(defaults, query_prefix_id=q_id, document_prefix_id=d_id)
