"""Read a Hugging Face LFM2 retriever checkpoint: a local folder or a hub id.

One ``Checkpoint`` holds everything the converter and the PyTorch reference need: the
normalised backbone config (every variant seen in the wild folds into ``BackboneConfig``),
the model kind with its retrieval settings, and lazy access to the tensors.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lfm2edge.convert.safetensors_io import TensorEntry, read_entries, read_tensor
from lfm2edge.runtime.errors import CheckpointError
from lfm2edge.runtime.settings import (
    ModelKind,
    RetrievalSettings,
    Similarity,
    colbert_defaults,
    embedding_defaults,
)

# Files the converter and the reference read; a hub download fetches nothing else.
CHECKPOINT_FILES = [
    "config.json",
    "*.safetensors",
    "model.safetensors.index.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "modules.json",
    "config_sentence_transformers.json",
    "sentence_bert_config.json",
    "1_Pooling/config.json",
    "1_Dense/config.json",
    "1_Dense/model.safetensors",
]

BIDIRECTIONAL_ARCH = "Lfm2BidirectionalModel"
CAUSAL_ARCHS = ("Lfm2Model", "Lfm2ForCausalLM")
# Pooling module flags and llama.cpp's pooling types (MEAN 1, CLS 2, LAST 3).
POOLING_TYPES = {"pooling_mode_mean_tokens": 1, "pooling_mode_cls_token": 2, "pooling_mode_lasttoken": 3}


@dataclass(frozen=True)
class BackboneConfig:
    """LFM2 backbone dimensions, with every config variant resolved."""

    hidden_size: int
    num_hidden_layers: int
    attention_layers: tuple[int, ...]
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    ff_dim: int  # effective width, after auto-adjust
    conv_l_cache: int
    norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    vocab_size: int
    bos_token_id: int
    eos_token_id: int
    pad_token_id: int
    causal: bool
    architecture: str

    def is_attention(self, layer: int) -> bool:
        return layer in self.attention_layers

    def kv_heads_per_layer(self) -> list[int]:
        """llama.cpp's per-layer head_count_kv: 0 marks a conv layer."""
        return [self.num_key_value_heads if self.is_attention(i) else 0 for i in range(self.num_hidden_layers)]


def auto_adjusted_ff_dim(
    block_ff_dim: int, multiple_of: int, multiplier: float | None = 1.0, auto_adjust: bool = True
) -> int:
    """LFM2's MLP width: ``int(2 ff / 3)``, ``int(multiplier * ff)``, rounded up to ``multiple_of``."""
    if not auto_adjust:
        return block_ff_dim
    ff = int(2 * block_ff_dim / 3)
    if multiplier is not None:
        ff = int(multiplier * ff)
    return multiple_of * math.ceil(ff / multiple_of)


def effective_ff_dim(raw: dict) -> int:
    """The MLP width of a raw config.json (6656 -> 4608 for the 350M models)."""
    ff = int(raw.get("block_ff_dim", raw.get("intermediate_size", 0)))
    if ff <= 0:
        raise CheckpointError("config.json has neither block_ff_dim nor intermediate_size")
    return auto_adjusted_ff_dim(
        ff,
        int(raw.get("block_multiple_of", 256)),
        raw.get("block_ffn_dim_multiplier"),
        bool(raw.get("block_auto_adjust_ff_dim", False)),
    )


def parse_backbone_config(raw: dict) -> BackboneConfig:
    """Normalise a raw config.json dict; raises CheckpointError naming what is wrong."""
    archs = raw.get("architectures") or []
    arch = archs[0] if archs else ""
    if raw.get("model_type") not in ("lfm2", "lfm2_bidirectional"):
        raise CheckpointError(
            f"config.json has model_type {raw.get('model_type')!r}; lfm2edge converts LFM2 checkpoints "
            "(model_type 'lfm2'), such as LiquidAI/LFM2.5-ColBERT-350M or LiquidAI/LFM2.5-Embedding-350M"
        )
    n_layers = int(raw["num_hidden_layers"])
    if "layer_types" in raw:
        attention = tuple(i for i, t in enumerate(raw["layer_types"]) if t == "full_attention")
    elif "full_attn_idxs" in raw:
        attention = tuple(sorted(int(i) for i in raw["full_attn_idxs"]))
    else:
        raise CheckpointError("config.json has neither layer_types nor full_attn_idxs")
    rope = raw.get("rope_parameters") or {}
    rope_theta = float(raw.get("rope_theta", rope.get("rope_theta", 1_000_000.0)))
    heads = int(raw.get("num_attention_heads", raw.get("num_heads", 0)))
    hidden = int(raw["hidden_size"])
    conv_l = int(raw.get("conv_L_cache", 3))
    bidirectional = arch == BIDIRECTIONAL_ARCH or raw.get("is_causal") is False or raw["model_type"] == "lfm2_bidirectional"
    if bidirectional and conv_l % 2 == 0:
        raise CheckpointError(f"conv_L_cache {conv_l} is even: a centred conv needs an odd kernel width")
    return BackboneConfig(
        hidden_size=hidden,
        num_hidden_layers=n_layers,
        attention_layers=attention,
        num_attention_heads=heads,
        num_key_value_heads=int(raw.get("num_key_value_heads", heads)),
        head_dim=int(raw.get("head_dim") or hidden // heads),
        ff_dim=effective_ff_dim(raw),
        conv_l_cache=conv_l,
        norm_eps=float(raw.get("norm_eps", raw.get("block_norm_eps", 1e-5))),
        rope_theta=rope_theta,
        max_position_embeddings=int(raw.get("max_position_embeddings", 128_000)),
        vocab_size=int(raw["vocab_size"]),
        bos_token_id=int(raw.get("bos_token_id", 1)),
        eos_token_id=int(raw.get("eos_token_id", 7)),
        pad_token_id=int(raw.get("pad_token_id", 0)),
        causal=not bidirectional,
        architecture=arch,
    )


class Checkpoint:
    """A checkpoint folder: config, kind, retrieval settings and lazily read tensors."""

    def __init__(self, path: Path, source: str = ""):
        self.path = Path(path)
        if not (self.path / "config.json").is_file():
            raise CheckpointError(f"{self.path} has no config.json: point to a checkpoint folder or a hub id")
        self.raw_config = _read_json(self.path / "config.json")
        self.config = parse_backbone_config(self.raw_config)
        self.source = source or str(self.path)
        self.modules = _read_json(self.path / "modules.json") if (self.path / "modules.json").exists() else []
        self.st_config = (
            _read_json(self.path / "config_sentence_transformers.json")
            if (self.path / "config_sentence_transformers.json").exists()
            else {}
        )
        self.dense_path = self.path / "1_Dense" / "model.safetensors"
        self.pooling_type = self._pooling_type()
        self.kind = ModelKind.LATE_INTERACTION if self.dense_path.exists() else ModelKind.DENSE
        self._tensor_files = self._find_tensor_files()

    # --- modules -------------------------------------------------------------------------
    def _pooling_type(self) -> int | None:
        for module in self.modules:
            if module.get("type", "").endswith("Pooling"):
                cfg_path = self.path / module.get("path", "1_Pooling") / "config.json"
                if cfg_path.exists():
                    cfg = _read_json(cfg_path)
                    for flag, pooling in POOLING_TYPES.items():
                        if cfg.get(flag):
                            return pooling
        return None

    @property
    def dense_out(self) -> int | None:
        """Rows of ColBERT's 1_Dense projection, or None without one."""
        if not self.dense_path.exists():
            return None
        return self._dense_entry().shape[0]

    def _dense_entry(self) -> TensorEntry:
        entry = next((e for e in read_entries(self.dense_path) if e.name == "linear.weight"), None)
        if entry is None:
            raise CheckpointError(f"{self.dense_path} has no 'linear.weight' tensor")
        return entry

    def retrieval_settings(self, tokenizer=None) -> RetrievalSettings:
        """The retrieval settings from the sentence-transformers / PyLate files.

        Missing keys take the published values of these models (never PyLate's generic
        document_length of 180). ``tokenizer`` (a ``tokenizers.Tokenizer``) resolves the
        marker and skiplist ids; without it the published ids are kept.
        """
        st = self.st_config
        if self.kind is ModelKind.DENSE:
            base = embedding_defaults(self.source)
            prompts = st.get("prompts") or {}
            max_len = _max_seq_length(self.path, base.document_length)
            return RetrievalSettings(
                **{
                    **base.__dict__,
                    "query_prefix": prompts.get("query", base.query_prefix),
                    "document_prefix": prompts.get("document", base.document_prefix),
                    "query_length": max_len,
                    "document_length": max_len,
                    "similarity": Similarity.COSINE,
                }
            )
        base = colbert_defaults(self.source)
        q_prefix = st.get("query_prefix", base.query_prefix)
        d_prefix = st.get("document_prefix", base.document_prefix)
        q_id, d_id, skip = base.query_prefix_id, base.document_prefix_id, base.skiplist_ids
        if tokenizer is not None:
            q_id = _single_token_id(tokenizer, q_prefix)
            d_id = _single_token_id(tokenizer, d_prefix)
            words = st.get("skiplist_words", None)
            if words is not None:
                skip = tuple(sorted({i for w in words if (i := tokenizer.token_to_id(_byte_level(w))) is not None}))
        return RetrievalSettings(
            **{
                **base.__dict__,
                "query_prefix": q_prefix,
                "document_prefix": d_prefix,
                "query_prefix_id": q_id,
                "document_prefix_id": d_id,
                "query_length": int(st.get("query_length", base.query_length)),
                "document_length": int(st.get("document_length", base.document_length)),
                "do_query_expansion": bool(st.get("do_query_expansion", True)),
                "attend_to_expansion_tokens": bool(st.get("attend_to_expansion_tokens", False)),
                "expansion_token_id": self.config.eos_token_id,
                "skiplist_ids": skip,
            }
        )

    def load_tokenizer(self):
        from tokenizers import Tokenizer

        path = self.path / "tokenizer.json"
        if not path.exists():
            raise CheckpointError(f"{self.path} has no tokenizer.json")
        return Tokenizer.from_file(str(path))

    # --- tensors -------------------------------------------------------------------------
    def _find_tensor_files(self) -> list[Path]:
        index = self.path / "model.safetensors.index.json"
        if index.exists():
            names = sorted(set(_read_json(index)["weight_map"].values()))
            return [self.path / n for n in names]
        files = sorted(p for p in self.path.glob("*.safetensors"))
        if not files:
            raise CheckpointError(f"{self.path} has no model.safetensors")
        return files

    def tensor_names(self) -> list[str]:
        """Backbone tensor names with any ``model.`` prefix removed."""
        return [name for name, _, _ in self._iter_backbone(load=False)]

    def tensor_shapes(self) -> dict[str, tuple[int, ...]]:
        return {name: shape for name, shape, _ in self._iter_backbone(load=False)}

    def iter_tensors(self) -> Iterator[tuple[str, np.ndarray]]:
        """(name, float32 array) one at a time, so memory stays near the largest tensor."""
        for name, _, array in self._iter_backbone(load=True):
            yield name, array

    def dense_weight(self) -> np.ndarray | None:
        if not self.dense_path.exists():
            return None
        return read_tensor(self.dense_path, self._dense_entry())

    def _iter_backbone(self, load: bool):
        for path in self._tensor_files:
            for entry in read_entries(path):
                name = entry.name.removeprefix("model.")
                if name.startswith("lm_head."):
                    continue
                yield name, entry.shape, (read_tensor(path, entry) if load else None)


def _read_json(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"cannot read {path}: {e}") from e


def _max_seq_length(path: Path, default: int) -> int:
    cfg = path / "sentence_bert_config.json"
    if cfg.exists():
        return int(_read_json(cfg).get("max_seq_length") or default)
    return default


def _byte_level(text: str) -> str:
    """A string as byte-level BPE vocabulary entries spell it (GPT-2 byte-to-unicode)."""
    table = _bytes_to_unicode()
    return "".join(table[b] for b in text.encode("utf-8"))


def _bytes_to_unicode() -> dict[int, str]:
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    chars = list(printable)
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(c) for c in chars), strict=True))


def _single_token_id(tokenizer, text: str) -> int:
    token_id = tokenizer.token_to_id(text)
    if token_id is None:
        raise CheckpointError(
            f"the tokenizer has no single token for the prefix {text!r}; PyLate adds it as an added token. "
            "Is this a PyLate ColBERT checkpoint?"
        )
    return int(token_id)


def resolve(model: str | Path, revision: str | None = None) -> Checkpoint:
    """A Checkpoint from a local folder or a hub id (downloading only the needed files)."""
    path = Path(model).expanduser()
    if path.exists():
        if not path.is_dir():
            raise CheckpointError(f"{path} is a file; give a checkpoint folder (GGUF files are already converted)")
        return Checkpoint(path)
    model = str(model)
    if model.count("/") != 1 or model.startswith((".", "/")):
        raise CheckpointError(f"{model} is neither an existing folder nor a hub id like 'LiquidAI/LFM2.5-ColBERT-350M'")
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError
    except ImportError as e:
        raise CheckpointError("downloading from the hub needs huggingface_hub: pip install 'lfm2edge[convert]'") from e
    try:
        local = snapshot_download(model, revision=revision, allow_patterns=CHECKPOINT_FILES)
    except RepositoryNotFoundError as e:
        raise CheckpointError(
            f"the hub has no repository {model!r} (or it is private: log in with `hf auth login`)"
        ) from e
    except LocalEntryNotFoundError as e:
        raise CheckpointError(
            f"cannot reach the Hugging Face hub to download {model!r} and it is not in the local cache. "
            "Connect to the network, or download the checkpoint elsewhere and pass its folder."
        ) from e
    except (HfHubHTTPError, OSError) as e:
        raise CheckpointError(f"downloading {model!r} failed: {e}") from e
    source = f"{model}@{revision}" if revision else model
    return Checkpoint(Path(local), source=source)
