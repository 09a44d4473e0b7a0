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
from pathlib import Path, PurePosixPath

import numpy as np

from lfm2edge.convert.safetensors_io import TensorEntry, read_entries, read_tensor
from lfm2edge.runtime.core.architecture import BIDIRECTIONAL_ARCH, Pooling
from lfm2edge.runtime.core.errors import CheckpointError
from lfm2edge.runtime.core.llama_keys import MAX_FF, MAX_L_CACHE, MAX_LAYERS, MAX_WIDTH
from lfm2edge.runtime.core.settings import (
    ModelKind,
    RetrievalSettings,
    check_values,
    colbert_defaults,
    embedding_defaults,
    to_metadata,
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

# sentence-transformers' Pooling module flags and the pooling llama.cpp runs for each.
POOLING_FLAGS = {
    "pooling_mode_mean_tokens": Pooling.MEAN,
    "pooling_mode_cls_token": Pooling.CLS,
    "pooling_mode_lasttoken": Pooling.LAST,
}
LAYER_TYPES = ("full_attention", "conv")


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


class _Fields:
    """Typed reads of one JSON object; anything else is a CheckpointError naming the file and the key."""

    def __init__(self, raw: object, where: Path | str):
        if not isinstance(raw, dict):
            raise CheckpointError(f"{where} holds a JSON {type(raw).__name__}, not an object; {_FIX}")
        self.raw, self.where = raw, where

    def fail(self, key: str, why: str) -> CheckpointError:
        return CheckpointError(f"{self.where}: {key} is {_show(self.raw.get(key))}; {why}. {_FIX}")

    def first(self, *keys: str) -> str:
        """The first of ``keys`` that the object has (the last one when none: its default applies)."""
        return next((k for k in keys if self.raw.get(k) is not None), keys[-1])

    def integer(self, key: str, default: int | None = None, low: int = 1, high: int = 2**31 - 1) -> int:
        value = self.raw.get(key)
        if value is None:
            if default is None:
                raise CheckpointError(f"{self.where} has no {key}; {_FIX}")
            value = default
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.fail(key, "it must be an integer")
        if not low <= value <= high:
            raise self.fail(key, f"it must be between {low:,} and {high:,}")
        return value

    def number(self, key: str, default: float, low: float, high: float) -> float:
        value = self.raw.get(key, default)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise self.fail(key, "it must be a number")
        if not (math.isfinite(value) and low < value <= high):
            raise self.fail(key, f"it must be a finite number above {low:g} and at most {high:g}")
        return float(value)

    def flag(self, key: str, default: bool) -> bool:
        value = self.raw.get(key, default)
        if not isinstance(value, bool):
            raise self.fail(key, "it must be true or false")
        return value

    def text(self, key: str, default: str) -> str:
        value = self.raw.get(key, default)
        if not isinstance(value, str):
            raise self.fail(key, "it must be a string")
        return value


_FIX = "Fix or re-download the checkpoint"


def _show(value: object) -> str:
    text = json.dumps(value, default=str)
    return text if len(text) <= 80 else text[:77] + "..."


def effective_ff_dim(raw: dict, where: Path | str = "config.json") -> int:
    """The MLP width of a raw config.json (6656 -> 4608 for the 350M models)."""
    f = _Fields(raw, where)
    key = f.first("block_ff_dim", "intermediate_size")
    if raw.get(key) is None:
        raise CheckpointError(f"{where} has neither block_ff_dim nor intermediate_size; {_FIX}")
    ff = f.integer(key, high=MAX_FF)
    auto = f.flag("block_auto_adjust_ff_dim", False)
    multiple_of = f.integer("block_multiple_of", 256, high=MAX_FF)
    multiplier = raw.get("block_ffn_dim_multiplier")
    if multiplier is not None:
        multiplier = f.number("block_ffn_dim_multiplier", 1.0, 0.0, 16.0)
    width = auto_adjusted_ff_dim(ff, multiple_of, multiplier, auto)
    if not 1 <= width <= MAX_FF:
        raise f.fail(key, f"its adjusted MLP width {width:,} is outside 1 to {MAX_FF:,}")
    return width


def parse_backbone_config(raw: object, where: Path | str = "config.json") -> BackboneConfig:
    """Normalise a raw config.json dict; raises CheckpointError naming the file, the key and the value.

    The bounds are llama.cpp's (runtime/core/llama_keys.py): a config that passes converts into a
    file that ``lfm2edge.load`` accepts.
    """
    f = _Fields(raw, where)
    archs = f.raw.get("architectures") or []
    if not isinstance(archs, list) or not all(isinstance(a, str) for a in archs):
        raise f.fail("architectures", "it must be a list of class names")
    arch = archs[0] if archs else ""
    model_type = f.raw.get("model_type")
    if model_type not in ("lfm2", "lfm2_bidirectional"):
        raise CheckpointError(
            f"config.json has model_type {model_type!r}; lfm2edge converts LFM2 checkpoints "
            "(model_type 'lfm2'), such as LiquidAI/LFM2.5-ColBERT-350M or LiquidAI/LFM2.5-Embedding-350M"
        )
    n_layers = f.integer("num_hidden_layers", high=MAX_LAYERS)
    attention = _attention_layers(f, n_layers)
    hidden = f.integer("hidden_size", high=MAX_WIDTH)
    heads_key = f.first("num_attention_heads", "num_heads")
    heads = f.integer(heads_key, high=hidden)
    if hidden % heads:
        raise f.fail(heads_key, f"it must divide hidden_size ({hidden})")
    kv_heads = f.integer("num_key_value_heads", heads, high=heads)
    if heads % kv_heads:
        raise f.fail("num_key_value_heads", f"it must divide {heads_key} ({heads})")
    head_dim = f.integer("head_dim", hidden // heads, high=hidden)
    if head_dim != hidden // heads:
        raise f.fail("head_dim", f"LFM2 (and llama.cpp) need hidden_size / {heads_key} = {hidden // heads}")
    rope = f.raw.get("rope_parameters") or {}
    rope_f = _Fields(rope, f"{where} (rope_parameters)")
    rope_theta = (
        f.number("rope_theta", 1_000_000.0, 0.0, 1e12) if "rope_theta" in f.raw
        else rope_f.number("rope_theta", 1_000_000.0, 0.0, 1e12)
    )
    conv_l = f.integer("conv_L_cache", 3, low=2, high=MAX_L_CACHE)
    bidirectional = arch == BIDIRECTIONAL_ARCH or f.raw.get("is_causal") is False or model_type == "lfm2_bidirectional"
    if bidirectional and conv_l % 2 == 0:
        raise f.fail("conv_L_cache", "it is even, and a bidirectional model's centred conv needs an odd kernel width")
    vocab = f.integer("vocab_size")
    token_ids = {key: f.integer(key, default, low=0, high=vocab - 1)
                 for key, default in (("bos_token_id", 1), ("eos_token_id", 7), ("pad_token_id", 0))}
    return BackboneConfig(
        hidden_size=hidden,
        num_hidden_layers=n_layers,
        attention_layers=attention,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=head_dim,
        ff_dim=effective_ff_dim(f.raw, where),
        conv_l_cache=conv_l,
        norm_eps=f.number(f.first("norm_eps", "block_norm_eps"), 1e-5, 0.0, 0.5),
        rope_theta=rope_theta,
        max_position_embeddings=f.integer("max_position_embeddings", 128_000),
        vocab_size=vocab,
        bos_token_id=token_ids["bos_token_id"],
        eos_token_id=token_ids["eos_token_id"],
        pad_token_id=token_ids["pad_token_id"],
        causal=not bidirectional,
        architecture=arch,
    )


def _attention_layers(f: _Fields, n_layers: int) -> tuple[int, ...]:
    """Which layers are attention (the rest are short convs), from layer_types or full_attn_idxs."""
    if "layer_types" in f.raw:
        types = f.raw["layer_types"]
        if not isinstance(types, list) or len(types) != n_layers or not all(t in LAYER_TYPES for t in types):
            raise f.fail("layer_types", f"it must list {n_layers} entries (num_hidden_layers), each one of "
                                        f"{', '.join(map(repr, LAYER_TYPES))}")
        return tuple(i for i, t in enumerate(types) if t == "full_attention")
    if "full_attn_idxs" in f.raw:
        idxs = f.raw["full_attn_idxs"]
        if (not isinstance(idxs, list) or len(set(map(repr, idxs))) != len(idxs)
                or not all(isinstance(i, int) and not isinstance(i, bool) and 0 <= i < n_layers for i in idxs)):
            raise f.fail("full_attn_idxs", f"it must list distinct layer indices from 0 to {n_layers - 1}")
        return tuple(sorted(idxs))
    raise CheckpointError(f"{f.where} has neither layer_types nor full_attn_idxs; {_FIX}")


class Checkpoint:
    """A checkpoint folder: config, kind, retrieval settings and lazily read tensors.

    Every file is checked as it is read: a malformed one is a CheckpointError naming it.
    """

    def __init__(self, path: Path, source: str = ""):
        self.path = Path(path)
        if not (self.path / "config.json").is_file():
            raise CheckpointError(f"{self.path} has no config.json: point to a checkpoint folder or a hub id")
        self.raw_config = _read_json(self.path / "config.json")
        self.config = parse_backbone_config(self.raw_config, self.path / "config.json")
        # The hub id, or the folder's name: a GGUF is shared, and must not carry a local path.
        self.source = source or self.path.name
        self.modules = self._read_modules()
        self.st_config = _read_object(self.path / "config_sentence_transformers.json")
        self.dense_path = self.path / "1_Dense" / "model.safetensors"
        self.pooling_type = self._pooling_type()
        self.kind = ModelKind.LATE_INTERACTION if self.dense_path.exists() else ModelKind.DENSE
        self._tensor_files = self._find_tensor_files()

    # --- modules -------------------------------------------------------------------------
    def _read_modules(self) -> list[dict]:
        where = self.path / "modules.json"
        modules = _read_json(where) if where.exists() else []
        if not isinstance(modules, list) or not all(
            isinstance(m, dict) and isinstance(m.get("type", ""), str) and isinstance(m.get("path", ""), str)
            for m in modules
        ):
            raise CheckpointError(f"{where} must be a list of {{\"type\": ..., \"path\": ...}} objects; {_FIX}")
        return modules

    def _pooling_type(self) -> Pooling | None:
        for module in self.modules:
            if module.get("type", "").endswith("Pooling"):
                folder = _inside(self.path, module.get("path") or "1_Pooling", self.path / "modules.json")
                cfg = _read_object(folder / "config.json")
                for flag, pooling in POOLING_FLAGS.items():
                    if cfg.get(flag) is True:
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
        if len(entry.shape) != 2 or not 1 <= entry.shape[0] <= MAX_WIDTH or entry.shape[1] != self.config.hidden_size:
            raise CheckpointError(
                f"{self.dense_path}: linear.weight has shape {list(entry.shape)}; ColBERT's projection is "
                f"[out, hidden_size = {self.config.hidden_size}] with 1 to {MAX_WIDTH:,} outputs. {_FIX}"
            )
        return entry

    def retrieval_settings(self, tokenizer=None) -> RetrievalSettings:
        """The retrieval settings from the sentence-transformers / PyLate files, checked.

        Missing keys take the published values of these models (never PyLate's generic
        document_length of 180). ``tokenizer`` (a ``tokenizers.Tokenizer``) resolves the
        marker and skiplist ids; without it the published ids are kept.
        """
        settings, where = self._retrieval_settings(tokenizer)
        n_vocab = self.config.vocab_size if tokenizer is not None else None
        problems = check_values(to_metadata(settings), n_vocab, self.config.max_position_embeddings)
        if problems:
            raise CheckpointError(f"{where} gives retrieval settings lfm2edge cannot use:\n- " + "\n- ".join(problems)
                                  + f"\n{_FIX}.")
        return settings

    def _retrieval_settings(self, tokenizer) -> tuple[RetrievalSettings, Path]:
        st = _Fields(self.st_config, self.path / "config_sentence_transformers.json")
        if self.kind is ModelKind.DENSE:
            base = embedding_defaults(self.source)
            prompts = _Fields(self.st_config.get("prompts") or {}, st.where)
            max_len = _max_seq_length(self.path, base.document_length)
            settings = RetrievalSettings(
                **{
                    **base.__dict__,
                    "query_prefix": prompts.text("query", base.query_prefix),
                    "document_prefix": prompts.text("document", base.document_prefix),
                    "query_length": max_len,
                    "document_length": max_len,
                }
            )
            return settings, self.path / "sentence_bert_config.json"
        base = colbert_defaults(self.source)
        q_prefix = st.text("query_prefix", base.query_prefix)
        d_prefix = st.text("document_prefix", base.document_prefix)
        q_id, d_id, skip = base.query_prefix_id, base.document_prefix_id, base.skiplist_ids
        if tokenizer is not None:
            q_id = _single_token_id(tokenizer, q_prefix)
            d_id = _single_token_id(tokenizer, d_prefix)
            words = self.st_config.get("skiplist_words", None)
            if words is not None:
                if not isinstance(words, list) or not all(isinstance(w, str) for w in words):
                    raise st.fail("skiplist_words", "it must be a list of strings")
                skip = tuple(sorted({i for w in words if (i := tokenizer.token_to_id(_byte_level(w))) is not None}))
        settings = RetrievalSettings(
            **{
                **base.__dict__,
                "query_prefix": q_prefix,
                "document_prefix": d_prefix,
                "query_prefix_id": q_id,
                "document_prefix_id": d_id,
                "query_length": st.integer("query_length", base.query_length, low=0),
                "document_length": st.integer("document_length", base.document_length, low=0),
                "do_query_expansion": st.flag("do_query_expansion", True),
                "attend_to_expansion_tokens": st.flag("attend_to_expansion_tokens", False),
                "expansion_token_id": self.config.eos_token_id,
                "skiplist_ids": skip,
            }
        )
        return settings, st.where  # type: ignore[return-value]

    def load_tokenizer(self):
        return read_tokenizer(self.path / "tokenizer.json")

    # --- tensors -------------------------------------------------------------------------
    def _find_tensor_files(self) -> list[Path]:
        index = self.path / "model.safetensors.index.json"
        if index.exists():
            weight_map = _read_object(index).get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map:
                raise CheckpointError(f"{index} has no weight_map object (tensor name -> file); {_FIX}")
            if not all(isinstance(v, str) for v in weight_map.values()):
                raise CheckpointError(f"{index}: weight_map values must be file names; {_FIX}")
            files = [_inside(self.path, name, index) for name in sorted(set(weight_map.values()))]
            for f in files:
                if not f.is_file():
                    raise CheckpointError(f"{index} lists {f.name}, which the checkpoint folder lacks; {_FIX}")
            return files
        files = sorted(p for p in self.path.glob("*.safetensors"))
        if not files:
            raise CheckpointError(f"{self.path} has no model.safetensors")
        return files

    def tensor_names(self) -> list[str]:
        """Backbone tensor names with any ``model.`` prefix removed."""
        return [name for name, _, _ in self._iter_backbone(load=False)]

    def tensor_shapes(self) -> dict[str, tuple[int, ...]]:
        shapes: dict[str, tuple[int, ...]] = {}
        for name, shape, _ in self._iter_backbone(load=False):
            if name in shapes:
                raise CheckpointError(f"tensor {name!r} appears twice in {self.path}'s safetensors files; {_FIX}")
            shapes[name] = shape
        return shapes

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
    except (OSError, ValueError) as e:  # ValueError: not JSON, or not UTF-8
        raise CheckpointError(f"cannot read {path}: {e}. {_FIX}") from e


def _read_object(path: Path) -> dict:
    """A JSON object file, or {} when the file does not exist."""
    if not path.exists():
        return {}
    raw = _read_json(path)
    if not isinstance(raw, dict):
        raise CheckpointError(f"{path} holds a JSON {type(raw).__name__}, not an object; {_FIX}")
    return raw


def _inside(folder: Path, name: object, where: Path) -> Path:
    """``folder / name`` for a relative name that stays inside ``folder`` (checked by its text: hub
    snapshots are symlinks into a blob store, so resolving them would leave the folder)."""
    if not isinstance(name, str) or not name or "\\" in name:
        raise CheckpointError(f"{where} names {_show(name)}, which is not a file name inside the checkpoint; {_FIX}")
    relative = PurePosixPath(name)
    if relative.is_absolute() or ".." in relative.parts:
        raise CheckpointError(
            f"{where} names {name!r}, a path outside the checkpoint folder; lfm2edge reads only files inside it. "
            f"{_FIX}"
        )
    return folder / relative


def read_tokenizer(path: Path):
    """A ``tokenizers.Tokenizer`` from tokenizer.json; CheckpointError naming the file otherwise."""
    from tokenizers import Tokenizer

    if not path.is_file():
        raise CheckpointError(f"{path.parent} has no tokenizer.json; lfm2edge needs the fast tokenizer file")
    try:
        tokenizer = Tokenizer.from_file(str(path))
    except Exception as e:  # the Rust library raises plain Exception for every malformed file
        raise CheckpointError(f"{path} is not a tokenizer file the tokenizers library reads: {e}. {_FIX}") from None
    except BaseException as e:  # a Rust panic (pyo3's PanicException) derives from BaseException
        if type(e).__name__ != "PanicException":
            raise
        raise CheckpointError(f"{path} made the tokenizers library fail ({e}). {_FIX}") from None
    if type(tokenizer.model).__name__ != "BPE":
        raise CheckpointError(f"{path} is a {type(tokenizer.model).__name__} tokenizer; LFM2's is byte-level BPE")
    return tokenizer


def _max_seq_length(path: Path, default: int) -> int:
    where = path / "sentence_bert_config.json"
    value = _read_object(where).get("max_seq_length")
    if value is None:
        return default
    return _Fields({"max_seq_length": value}, where).integer("max_seq_length", low=0)


def _byte_level(text: str) -> str:
    """A string as byte-level BPE vocabulary entries spell it (GPT-2's byte-to-unicode map, the
    tokenizers library's own)."""
    from tokenizers.pre_tokenizers import ByteLevel

    pieces = ByteLevel(add_prefix_space=False, use_regex=False).pre_tokenize_str(text)
    return "".join(piece for piece, _ in pieces)


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
