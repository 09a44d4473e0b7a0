"""What a GGUF file is, and what is wrong with it, before llama.cpp loads it.

``describe()`` decides the kind (dense or ColBERT) and the retrieval settings: ours when
the file carries them, else from pooling / embedding_length_out with the published defaults.
``problems()`` names each reason a file will not work, with the way out: first every key or
tensor llama.cpp would abort on or refuse (``llama_keys``), then what makes a readable LFM2 file
no retriever. ``describe()`` itself refuses a damaged header or damaged lfm2edge.* settings.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path

from lfm2edge.runtime.core import llama_keys
from lfm2edge.runtime.core.architecture import BIDIRECTIONAL_ARCH, GGUF_ARCH, Pooling, pooling_name
from lfm2edge.runtime.core.errors import ModelFileError
from lfm2edge.runtime.core.gguf_file import GGUFHeader, GGUFType, read_header
from lfm2edge.runtime.core.settings import (
    Key,
    ModelKind,
    RetrievalSettings,
    check_values,
    colbert_defaults,
    embedding_defaults,
    from_metadata,
    skiplist_ids_from_vocabulary,
    to_metadata,
)

ARCHITECTURE_KEY = Key.ARCHITECTURE


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
        return self.header.arch_key("attention.causal", True) is not False

    @property
    def pooling(self) -> int:
        return _pooling(self.header)

    def problems(self) -> list[str]:
        """Every reason this file will not work as a retriever, each with the way out."""
        h, found = self.header, []
        if h.architecture == "lfm2-bidir":
            return [
                "architecture 'lfm2-bidir' comes from the superseded llama.cpp PR #24782; upstream llama.cpp "
                "rejects it. Re-convert the checkpoint with `lfm2edge convert`, or download the re-uploaded "
                "official GGUF (LiquidAI/LFM2.5-ColBERT-350M-GGUF, LiquidAI/LFM2.5-Embedding-350M-GGUF)."
            ]
        if h.architecture != GGUF_ARCH:
            return [f"general.architecture is {h.architecture!r}, not 'lfm2': this is not an LFM2 retriever; convert "
                    "an LFM2 retriever checkpoint with `lfm2edge convert`"]
        found.extend(llama_keys.check(h))
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
        if self.kind is ModelKind.LATE_INTERACTION and self.pooling != Pooling.NONE:
            found.append(
                f"a ColBERT model outputs one vector per token, so lfm2.pooling_type must be 0 (none); this file "
                f"has {pooling_name(self.pooling)}. Re-convert with `lfm2edge convert`."
            )
        if self.kind is ModelKind.DENSE and self.pooling != Pooling.CLS:
            found.append(
                f"a dense model needs CLS pooling (lfm2.pooling_type = 2); this file has "
                f"{pooling_name(self.pooling)}. Re-convert with `lfm2edge convert`."
            )
        return found

    @property
    def matmul_weight_type(self) -> str | None:
        """The GGUF type of most FFN weights, the file's bulk (what `--outtype` chose: q8_0 in a q8_0_mixed
        file, whose first blocks may be bf16); None without them."""
        ffn = Counter(t.type_name for t in self.header.tensors if t.name.endswith("ffn_up.weight"))
        return ffn.most_common(1)[0][0] if ffn else None

    def tensor_type_summary(self) -> dict[str, int]:
        return dict(Counter(t.type_name for t in self.header.tensors))


def _pooling(h: GGUFHeader) -> int:
    """The pooling type as stored; 0 (none) when it is missing or not a uint32 (problems() names that)."""
    key = f"{h.architecture}.pooling_type"
    return int(h.metadata[key]) if h.types.get(key) == (GGUFType.UINT32, None) else 0  # type: ignore[call-overload]


def _infer_kind(h: GGUFHeader) -> ModelKind | None:
    if h.arch_key("embedding_length_out") is not None or h.tensor("dense_2.weight") is not None:
        return ModelKind.LATE_INTERACTION
    if _pooling(h) != Pooling.NONE:
        return ModelKind.DENSE
    return None


def _uint(h: GGUFHeader, key: str) -> int | None:
    return int(h.metadata[key]) if h.types.get(key) == (GGUFType.UINT32, None) else None  # type: ignore[call-overload]


def _n_vocab(h: GGUFHeader) -> int | None:
    tokens = h.metadata.get("tokenizer.ggml.tokens")
    return len(tokens) if h.types.get("tokenizer.ggml.tokens") == (GGUFType.ARRAY, GGUFType.STRING) else None  # type: ignore[arg-type]


def describe(path: str | Path) -> ModelFile:
    """Read ``path``'s header and work out its kind and retrieval settings.

    Raises ModelFileError when the header cannot be read or the lfm2edge.* settings are damaged.
    """
    h = read_header(path)
    # The vocabulary and context bound our settings only once llama.cpp's keys check out; otherwise
    # problems() names those keys, the root cause.
    trusted = h.architecture == GGUF_ARCH and not llama_keys.check(h)
    n_vocab = _n_vocab(h) if trusted else None
    n_ctx = _uint(h, f"{h.architecture}.context_length") if trusted else None
    try:
        own = from_metadata(h.metadata, h.types, n_vocab, n_ctx)
    except ModelFileError as e:
        raise ModelFileError(f"{h.path}: {e}") from None
    if own is not None:
        return ModelFile(h, own.kind, own, True)
    kind = _infer_kind(h)
    settings = None
    if kind is ModelKind.DENSE:
        settings = embedding_defaults(str(h.path))
    elif kind is ModelKind.LATE_INTERACTION:
        settings = _colbert_defaults_for(h)
    unfit = check_values(to_metadata(settings), n_vocab, n_ctx) if settings is not None else []
    if unfit:
        raise ModelFileError(
            f"{h.path} has no lfm2edge settings, and the published ones do not fit it:\n- " + "\n- ".join(unfit)
            + "\nRe-convert the checkpoint with `lfm2edge convert` so the file carries its own settings."
        )
    return ModelFile(h, kind, settings, False)


def _colbert_defaults_for(h: GGUFHeader) -> RetrievalSettings:
    """Published ColBERT settings, with the marker and skiplist ids looked up in the file's own vocabulary
    (never LFM2's byte layout assumed: there the skiplist could hold the marker ids)."""
    defaults = colbert_defaults(str(h.path))
    tokens = h.metadata.get("tokenizer.ggml.tokens")
    if _n_vocab(h) is None or not isinstance(tokens, list):
        return defaults
    index = {t: i for i, t in enumerate(tokens)}
    q_id, d_id = index.get(defaults.query_prefix), index.get(defaults.document_prefix)
    if q_id is None or d_id is None:
        raise ModelFileError(
            f"{h.path} looks like a ColBERT model but its vocabulary has no '[Q] '/'[D] ' tokens; "
            "re-convert it with `lfm2edge convert` so the file carries its retrieval settings"
        )
    skiplist = skiplist_ids_from_vocabulary(tokens)
    return replace(defaults, query_prefix_id=q_id, document_prefix_id=d_id, skiplist_ids=skiplist)
