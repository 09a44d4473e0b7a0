"""Random LFM2.5 retriever checkpoints in the exact layout of the real ones.

The real LFM2.5-ColBERT-350M and LFM2.5-Embedding-350M weights are not needed to test the converter, the
runtime or the benchmarks: every file, key, tensor name and shape, and the tokenizer's id layout and
pre-tokenizer, are reproduced here with random weights, as the published checkpoints have them.

* :func:`make_checkpoint` writes a complete Hugging Face folder (``config.json``, ``model.safetensors``, the
  tokenizer files, the sentence-transformers / PyLate module files and a stand-in
  ``modeling_lfm2_bidirectional.py``).
* :func:`build_tokenizer` writes only the tokenizer: a byte-level BPE trained on ``data/sample_texts.json``
  that splits text exactly like llama.cpp's ``lfm2`` pre-tokenizer (Llama-3 regex, byte-level,
  ``ignore_merges``, BOS only) and keeps the real id layout (specials 0-13, reserved 14-509, bytes from 510,
  then merges).
* :data:`TINY` is a small shape for fast tests, :data:`FULL` the real 350M shape.

Weights are large enough that typical porting bugs (a ``1 + w`` norm offset, a causal or mirrored conv, a
causal attention mask) change the outputs clearly. Every tensor is drawn from its own seeded generator, so a
checkpoint depends only on ``seed`` and the shape, not on write order, name prefix or dtype; for one seed the
ColBERT and Embedding checkpoints share the backbone (and the first ``base_vocab`` embedding rows).
"""

from __future__ import annotations

import functools
import json
import string
import struct
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from lfm2edge.convert.checkpoint import auto_adjusted_ff_dim
from lfm2edge.runtime.core.vocabulary import bytes_to_unicode

__all__ = [
    "BYTE_TOKEN_OFFSET",
    "DOCUMENT_MARKER",
    "FULL",
    "LFM2_SPECIAL_TOKENS",
    "LLAMA3_SPLIT_REGEX",
    "QUERY_MARKER",
    "RESERVED_END",
    "SAMPLE_TEXTS_PATH",
    "TINY",
    "SyntheticShape",
    "backbone_config",
    "build_tokenizer",
    "effective_ff_dim",
    "load_sample_texts",
    "make_checkpoint",
]

CheckpointKind = Literal["colbert", "embedding"]
ConfigStyle = Literal["current", "legacy"]

SAMPLE_TEXTS_PATH = Path(__file__).resolve().parent / "data" / "sample_texts.json"

# ------------------------------------------------------------------------------------------------------------
# Tokenizer layout (as LFM2.5's tokenizer.json has it)
# ------------------------------------------------------------------------------------------------------------

#: ids 0-13: the LFM2 special (control) tokens, in id order.
LFM2_SPECIAL_TOKENS: tuple[str, ...] = (
    "<|pad|>",
    "<|startoftext|>",
    "<|endoftext|>",
    "<|fim_pre|>",
    "<|fim_mid|>",
    "<|fim_suf|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|tool_list_start|>",
    "<|tool_list_end|>",
    "<|tool_call_start|>",
    "<|tool_call_end|>",
    "<|tool_response_start|>",
    "<|tool_response_end|>",
)
PAD_ID, BOS_ID, EOS_ID = 0, 1, 7
BOS_TOKEN, EOS_TOKEN, PAD_TOKEN = (
    LFM2_SPECIAL_TOKENS[BOS_ID],
    LFM2_SPECIAL_TOKENS[EOS_ID],
    LFM2_SPECIAL_TOKENS[PAD_ID],
)
#: ids 14..509 are ``<|reserved_{id - 10}|>`` (a real LFM2.5 GGUF lists id 14 as ``<|reserved_4|>``).
RESERVED_END = 510
RESERVED_NAME_OFFSET = 10
#: the 256 byte tokens occupy ids 510..765 in GPT-2 byte-to-unicode order; merges follow.
BYTE_TOKEN_OFFSET = RESERVED_END
FIRST_MERGE_ID = BYTE_TOKEN_OFFSET + 256
#: PyLate's markers: non-special added tokens (text with a trailing space) at ids base_vocab, base_vocab + 1.
QUERY_MARKER = "[Q] "
DOCUMENT_MARKER = "[D] "

#: llama.cpp's ``lfm2`` pre-tokenizer is the Llama-3 split regex (``LLAMA_VOCAB_PRE_TYPE_LLAMA3``), as written
#: in Llama-3's tokenizer.json; llama.cpp spells the contractions ``'[sS]|...`` instead of ``(?i:...)``.
LLAMA3_SPLIT_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# transformers writes this value for "no limit"; real LFM2 tokenizer configs carry a large one too.
_MODEL_MAX_LENGTH = 1000000000000000019884624838656


def _reserved_token(token_id: int) -> str:
    return f"<|reserved_{token_id - RESERVED_NAME_OFFSET}|>"


def _filler_token(token_id: int) -> str:
    # Ordinary vocab entries that no text can reach: the split regex always cuts "<filler", "_", digits and
    # ">" into separate pieces, and BPE (and ignore_merges' whole-piece lookup) works inside one piece.
    return f"<filler_{token_id}>"


def load_sample_texts(path: Path = SAMPLE_TEXTS_PATH) -> dict[str, list[dict[str, str]]]:
    """The verification sample: ``{"queries": [{"lang", "text"}...], "documents": [...]}``."""
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _pre_tokenizer() -> pre_tokenizers.PreTokenizer:
    return pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(LLAMA3_SPLIT_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False),
        ]
    )


@functools.lru_cache(maxsize=4)
def _vocab_and_merges(base_vocab: int) -> tuple[tuple[tuple[str, int], ...], tuple[tuple[str, str], ...]]:
    """Train merges on the sample texts and lay out the vocabulary like LFM2's (cached per ``base_vocab``)."""
    max_merges = base_vocab - FIRST_MERGE_ID
    if max_merges < 0:
        raise ValueError(f"base_vocab must be at least {FIRST_MERGE_ID} (specials + reserved + 256 bytes)")
    samples = load_sample_texts()
    texts = [entry["text"] for key in ("queries", "documents") for entry in samples[key]]

    trainee = Tokenizer(models.BPE())
    trainee.pre_tokenizer = _pre_tokenizer()
    trainer = trainers.BpeTrainer(
        vocab_size=256 + max_merges,
        min_frequency=2,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[],
    )
    trainee.train_from_iterator(texts, trainer=trainer)
    raw_merges = json.loads(trainee.to_str())["model"]["merges"]
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ", 1)) for m in raw_merges]

    vocab: dict[str, int] = {}
    for token_id, token in enumerate(LFM2_SPECIAL_TOKENS):
        vocab[token] = token_id
    for token_id in range(len(LFM2_SPECIAL_TOKENS), RESERVED_END):
        vocab[_reserved_token(token_id)] = token_id
    for char in bytes_to_unicode().values():
        vocab[char] = len(vocab)
    for left, right in merges:
        vocab.setdefault(left + right, len(vocab))
    if len(vocab) > base_vocab:
        raise AssertionError(f"trained vocabulary overflows base_vocab: {len(vocab)} > {base_vocab}")
    while len(vocab) < base_vocab:
        vocab[_filler_token(len(vocab))] = len(vocab)
    return tuple(vocab.items()), tuple(merges)  # type: ignore[return-value]


def _make_tokenizer(base_vocab: int, colbert: bool) -> Tokenizer:
    vocab_items, merges = _vocab_and_merges(base_vocab)
    tok = Tokenizer(
        models.BPE(
            vocab=dict(vocab_items),
            merges=list(merges),
            ignore_merges=True,
            byte_fallback=False,
            fuse_unk=False,
        )
    )
    tok.pre_tokenizer = _pre_tokenizer()
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS_TOKEN} $A",
        pair=f"{BOS_TOKEN} $A $B:1",
        special_tokens=[(BOS_TOKEN, BOS_ID)],
    )
    # Ids 0-13 are special added tokens (CONTROL in a GGUF); the reserved ids stay plain vocab entries (NORMAL
    # in LiquidAI's GGUFs, so they are not added tokens in the real tokenizer.json).
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in LFM2_SPECIAL_TOKENS])
    if colbert:
        # What PyLate does on load: tokenizer.add_tokens([query_prefix, document_prefix]), i.e. plain added
        # tokens.
        tok.add_tokens(
            [AddedToken(m, special=False, normalized=True) for m in (QUERY_MARKER, DOCUMENT_MARKER)]
        )
    expected = base_vocab + (2 if colbert else 0)
    if tok.get_vocab_size(with_added_tokens=True) != expected:
        raise AssertionError(
            f"tokenizer has {tok.get_vocab_size(with_added_tokens=True)} ids, expected {expected}"
        )
    return tok


def _added_token_entry(content: str, special: bool) -> dict[str, object]:
    return {
        "content": content,
        "lstrip": False,
        "normalized": not special,
        "rstrip": False,
        "single_word": False,
        "special": special,
    }


def build_tokenizer(path: Path, base_vocab: int, colbert: bool) -> None:
    """Write ``tokenizer.json``, ``tokenizer_config.json`` and ``special_tokens_map.json`` into ``path``.

    ``len(tokenizer)`` is ``base_vocab`` (+2 for ColBERT's ``"[Q] "``/``"[D] "`` at ``base_vocab``,
    ``base_vocab + 1``). Training takes well under a second and is cached per ``base_vocab``.
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tok = _make_tokenizer(base_vocab, colbert)
    tok.save(str(path / "tokenizer.json"), pretty=True)

    added: dict[str, dict[str, object]] = {
        str(i): _added_token_entry(t, special=True) for i, t in enumerate(LFM2_SPECIAL_TOKENS)
    }
    if colbert:
        added[str(base_vocab)] = _added_token_entry(QUERY_MARKER, special=False)
        added[str(base_vocab + 1)] = _added_token_entry(DOCUMENT_MARKER, special=False)
    # The Embedding tokenizer pads with <|pad|> (id 0). PyLate sets the ColBERT pad token to the mask token
    # or, as LFM2 has none, to EOS, and saves it that way: pad = <|im_end|> (id 7).
    pad_token = EOS_TOKEN if colbert else PAD_TOKEN
    config = {
        "add_bos_token": True,
        "add_eos_token": False,
        "added_tokens_decoder": added,
        "bos_token": BOS_TOKEN,
        "clean_up_tokenization_spaces": False,
        "eos_token": EOS_TOKEN,
        "extra_special_tokens": {},
        "legacy": False,
        "model_input_names": ["input_ids", "attention_mask"],
        "model_max_length": _MODEL_MAX_LENGTH,
        "pad_token": pad_token,
        "tokenizer_class": "PreTrainedTokenizerFast",
        "use_default_system_prompt": False,
    }
    _write_json(path / "tokenizer_config.json", config)

    def special(content: str) -> dict[str, object]:
        entry = _added_token_entry(content, special=True)
        del entry["special"]
        return entry

    _write_json(
        path / "special_tokens_map.json",
        {"bos_token": special(BOS_TOKEN), "eos_token": special(EOS_TOKEN), "pad_token": special(pad_token)},
    )


# ------------------------------------------------------------------------------------------------------------
# Backbone shape
# ------------------------------------------------------------------------------------------------------------


# LFM2's MLP width rule (block_auto_adjust_ff_dim) lives with the converter that reads it back.
effective_ff_dim = auto_adjusted_ff_dim


@dataclass(frozen=True)
class SyntheticShape:
    """Backbone dimensions of a synthetic checkpoint."""

    hidden_size: int
    num_hidden_layers: int
    attention_layers: tuple[int, ...]
    num_attention_heads: int
    num_key_value_heads: int
    block_ff_dim: int
    """Stored FFN width, before auto-adjust (real: 6656, effective 4608)."""
    base_vocab: int
    """``len(tokenizer)`` before ColBERT's ``[Q]``/``[D]`` (real: 64400)."""
    dense_out: int
    """ColBERT Dense output features (real: 128)."""
    block_multiple_of: int = 256
    embedding_vocab: int | None = None
    """Rows of the Embedding model's padded table; ``None``: next multiple of 128 >= ``base_vocab + 64``."""

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_attention_heads:
            raise ValueError("hidden_size must be divisible by num_attention_heads")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError("num_attention_heads must be divisible by num_key_value_heads")
        if any(not 0 <= i < self.num_hidden_layers for i in self.attention_layers):
            raise ValueError("attention layer index out of range")
        if self.embedding_vocab is not None and self.embedding_vocab < self.base_vocab:
            raise ValueError("embedding_vocab must be at least base_vocab")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def ff_dim(self) -> int:
        """The effective (auto-adjusted) FFN width: the width of the stored w1/w2/w3 tensors."""
        return effective_ff_dim(self.block_ff_dim, self.block_multiple_of)

    @property
    def layer_types(self) -> list[str]:
        return [
            "full_attention" if i in self.attention_layers else "conv" for i in range(self.num_hidden_layers)
        ]

    def vocab_size(self, kind: CheckpointKind) -> int:
        """Rows of ``embed_tokens``: ColBERT ``base_vocab + 2``; Embedding the padded table (real: 65536)."""
        if kind == "colbert":
            return self.base_vocab + 2
        if self.embedding_vocab is not None:
            return self.embedding_vocab
        return 128 * ((self.base_vocab + 64 + 127) // 128)

    def backbone_tensor_shapes(self) -> dict[str, tuple[int, ...]]:
        """Backbone tensors (names without ``model.``) and shapes, except ``embed_tokens.weight``."""
        h, f, d = self.hidden_size, self.ff_dim, self.head_dim
        shapes: dict[str, tuple[int, ...]] = {}
        for i in range(self.num_hidden_layers):
            p = f"layers.{i}."
            if i in self.attention_layers:
                shapes[p + "self_attn.q_proj.weight"] = (self.num_attention_heads * d, h)
                shapes[p + "self_attn.k_proj.weight"] = (self.num_key_value_heads * d, h)
                shapes[p + "self_attn.v_proj.weight"] = (self.num_key_value_heads * d, h)
                shapes[p + "self_attn.out_proj.weight"] = (h, self.num_attention_heads * d)
                shapes[p + "self_attn.q_layernorm.weight"] = (d,)
                shapes[p + "self_attn.k_layernorm.weight"] = (d,)
            else:
                shapes[p + "conv.in_proj.weight"] = (3 * h, h)
                shapes[p + "conv.conv.weight"] = (h, 1, 3)
                shapes[p + "conv.out_proj.weight"] = (h, h)
            shapes[p + "operator_norm.weight"] = (h,)
            shapes[p + "ffn_norm.weight"] = (h,)
            shapes[p + "feed_forward.w1.weight"] = (f, h)
            shapes[p + "feed_forward.w2.weight"] = (h, f)
            shapes[p + "feed_forward.w3.weight"] = (f, h)
        shapes["embedding_norm.weight"] = (h,)
        return shapes

    def tensor_shapes(self, kind: CheckpointKind) -> dict[str, tuple[int, ...]]:
        """Every tensor of ``model.safetensors`` (names without ``model.``), in file order."""
        return {
            "embed_tokens.weight": (self.vocab_size(kind), self.hidden_size),
            **self.backbone_tensor_shapes(),
        }

    def non_embedding_parameters(self) -> int:
        """Backbone parameters without the embedding table (real: 287,375,104)."""
        total = 0
        for shape in self.backbone_tensor_shapes().values():
            n = 1
            for dim in shape:
                n *= dim
            total += n
        return total


TINY = SyntheticShape(
    hidden_size=64,
    num_hidden_layers=6,
    attention_layers=(2, 4),
    num_attention_heads=4,
    num_key_value_heads=2,
    block_ff_dim=256,  # int(2 * 256 / 3) = 170, rounded up to 192: auto-adjust really rounds
    base_vocab=1000,  # not a round number, like 64400; the Embedding table pads to 1152 rows
    dense_out=16,
    block_multiple_of=32,
)

FULL = SyntheticShape(
    hidden_size=1024,
    num_hidden_layers=16,
    attention_layers=(2, 5, 8, 10, 12, 14),
    num_attention_heads=16,
    num_key_value_heads=8,
    block_ff_dim=6656,  # effective 4608
    base_vocab=64400,
    dense_out=128,
    block_multiple_of=256,
    embedding_vocab=65536,
)


# ------------------------------------------------------------------------------------------------------------
# Weights
# ------------------------------------------------------------------------------------------------------------

# Mean of each conv tap on top of N(0, 0.5): three clearly different taps, so a mirrored or causal kernel
# shows.
_CONV_TAP_MEANS = (0.25, 1.0, -0.5)
# Norm weights are 1 + N(0, 0.2), so a "1 + w" offset bug doubles them. The per-head q/k norms are twice that
# (2 + N(0, 0.4)): attention logits then have std ~4 instead of ~1, so attention is selective rather than a
# flat average, and the attention path (v_proj, out_proj) gets twice the usual gain. Without both, position 0
# (the Embedding model's CLS token) is dominated by the BOS embedding and its neighbour and texts that merely
# start alike get CLS cosines above 0.99; with them the cosines stay below ~0.75 on the sample texts.
_NORM_STD = 0.2
_QK_NORM_SCALE = 2.0
_ATTENTION_VALUE_GAIN = 2.0
_SAFETENSORS_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}


def _generator(seed: int, name: str) -> torch.Generator:
    return torch.Generator().manual_seed((seed * 0x9E3779B1 + zlib.crc32(name.encode())) % (1 << 63))


def _random_tensor(name: str, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """The float32 value of one tensor; depends only on (seed, unprefixed name, shape)."""
    g = _generator(seed, name)
    if name == "embed_tokens.weight":
        return torch.randn(shape, generator=g)
    if name.endswith(("q_layernorm.weight", "k_layernorm.weight")):
        return _QK_NORM_SCALE * (1.0 + _NORM_STD * torch.randn(shape, generator=g))
    if name.endswith("norm.weight"):  # operator_norm, ffn_norm, embedding_norm
        return 1.0 + _NORM_STD * torch.randn(shape, generator=g)
    if name.endswith("conv.conv.weight"):
        return 0.5 * torch.randn(shape, generator=g) + torch.tensor(_CONV_TAP_MEANS)
    if len(shape) == 2:  # linear [out, in]: std 1/sqrt(fan_in) keeps the activation scale
        gain = (
            _ATTENTION_VALUE_GAIN
            if name.endswith(("self_attn.v_proj.weight", "self_attn.out_proj.weight"))
            else 1.0
        )
        return gain * torch.randn(shape, generator=g) / shape[1] ** 0.5
    raise ValueError(f"no initialiser for {name} {shape}")


def _write_safetensors(
    path: Path,
    shapes: dict[str, tuple[int, ...]],
    tensors: Iterator[tuple[str, torch.Tensor]],
    dtype: torch.dtype,
) -> None:
    """Stream tensors into a safetensors file one at a time (the header is computed from the shapes)."""
    if dtype not in _SAFETENSORS_DTYPES:
        raise ValueError(f"unsupported dtype {dtype}; use one of {list(_SAFETENSORS_DTYPES)}")
    itemsize = torch.tensor([], dtype=dtype).element_size()
    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, shape in shapes.items():
        nbytes = itemsize
        for dim in shape:
            nbytes *= dim
        header[name] = {
            "dtype": _SAFETENSORS_DTYPES[dtype],
            "shape": list(shape),
            "data_offsets": [offset, offset + nbytes],
        }
        offset += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        written = 0
        for name, tensor in tensors:
            if tuple(tensor.shape) != shapes[name]:
                raise AssertionError(f"{name}: {tuple(tensor.shape)} != {shapes[name]}")
            data = tensor.to(dtype).contiguous().reshape(-1).view(torch.uint8).numpy()
            f.write(data.data)
            written += data.nbytes
    if written != offset:
        raise AssertionError(f"wrote {written} bytes of tensor data, header promises {offset}")


# ------------------------------------------------------------------------------------------------------------
# Configuration files
# ------------------------------------------------------------------------------------------------------------


def _write_json(path: Path, obj: object) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, sort_keys=True, ensure_ascii=False)
        f.write("\n")


def backbone_config(
    kind: CheckpointKind,
    shape: SyntheticShape = TINY,
    *,
    bidirectional: bool = True,
    config_style: ConfigStyle = "current",
) -> dict[str, object]:
    """The ``config.json`` that :func:`make_checkpoint` writes; no ``is_causal`` key, ever (the real ones
    have none: bidirectionality shows only in ``architectures``)."""
    h = shape.hidden_size
    config: dict[str, object] = {
        "architectures": ["Lfm2BidirectionalModel" if bidirectional else "Lfm2Model"],
        "model_type": "lfm2",
        "hidden_size": h,
        "block_dim": h,
        "conv_dim": h,
        "conv_dim_out": h,
        "num_hidden_layers": shape.num_hidden_layers,
        "num_attention_heads": shape.num_attention_heads,
        "num_heads": shape.num_attention_heads,
        "num_key_value_heads": shape.num_key_value_heads,
        "block_ff_dim": shape.block_ff_dim,
        "block_auto_adjust_ff_dim": True,
        "block_ffn_dim_multiplier": 1.0,
        "block_multiple_of": shape.block_multiple_of,
        "block_mlp_init_scale": 1.0,
        "block_out_init_scale": 1.0,
        "block_use_swiglu": True,
        "block_use_xavier_init": True,
        "block_norm_eps": 1e-5,
        "conv_L_cache": 3,
        "conv_bias": False,
        "conv_use_xavier_init": True,
        "norm_eps": 1e-5,
        "initializer_range": 0.02,
        "max_position_embeddings": 128000,
        "vocab_size": shape.vocab_size(kind),
        "bos_token_id": BOS_ID,
        "eos_token_id": EOS_ID,
        "pad_token_id": PAD_ID,
        "tie_embedding": True,
        "dtype": "bfloat16",
        "use_cache": False,
        "use_pos_enc": True,
        "transformers_version": "4.57.1",
    }
    if bidirectional:
        config["auto_map"] = {"AutoModel": "modeling_lfm2_bidirectional.Lfm2BidirectionalModel"}
    if kind == "colbert":
        config["disable_flash_attention"] = True
    if config_style == "current":
        config["layer_types"] = shape.layer_types
        config["intermediate_size"] = shape.block_ff_dim
        config["rope_theta"] = 1000000.0
    elif config_style == "legacy":
        config["full_attn_idxs"] = list(shape.attention_layers)
        config["rope_parameters"] = {"rope_theta": 1000000.0, "rope_type": "default"}
    else:
        raise ValueError(f"config_style must be 'current' or 'legacy', not {config_style!r}")
    return config


_ST_VERSIONS = {"sentence_transformers": "5.1.2", "transformers": "4.57.1", "pytorch": "2.8.0"}

_MODELING_PLACEHOLDER = '''"""Stand-in for LiquidAI's remote code (modeling_lfm2_bidirectional.py).

Written by lfm2edge.convert.synthetic so that a synthetic checkpoint lists the same files as the real
repositories. It defines nothing: the real file holds Lfm2BidirectionalModel, which lfm2edge never imports.
"""
'''


def _write_sentence_transformers_files(
    path: Path, kind: CheckpointKind, shape: SyntheticShape, seed: int, dtype: torch.dtype
) -> None:
    _write_json(path / "sentence_bert_config.json", {"max_seq_length": 512, "do_lower_case": False})
    transformer = {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"}
    if kind == "embedding":
        pooling = {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}
        _write_json(path / "modules.json", [transformer, pooling])
        _write_json(
            path / "1_Pooling" / "config.json",
            {
                "word_embedding_dimension": shape.hidden_size,
                "pooling_mode_cls_token": True,
                "pooling_mode_mean_tokens": False,
                "pooling_mode_max_tokens": False,
                "pooling_mode_mean_sqrt_len_tokens": False,
                "pooling_mode_weightedmean_tokens": False,
                "pooling_mode_lasttoken": False,
                "include_prompt": True,
            },
        )
        _write_json(
            path / "config_sentence_transformers.json",
            {
                "__version__": _ST_VERSIONS,
                "model_type": "SentenceTransformer",
                "prompts": {"query": "query: ", "document": "document: "},
                "default_prompt_name": None,
                "similarity_fn_name": "cosine",
            },
        )
        return

    dense = {"idx": 1, "name": "1", "path": "1_Dense", "type": "pylate.models.Dense.Dense"}
    _write_json(path / "modules.json", [transformer, dense])
    _write_json(
        path / "1_Dense" / "config.json",
        {
            "in_features": shape.hidden_size,
            "out_features": shape.dense_out,
            "bias": False,
            "activation_function": "torch.nn.modules.linear.Identity",
            "use_residual": False,
        },
    )
    dense_shapes = {"linear.weight": (shape.dense_out, shape.hidden_size)}
    _write_safetensors(
        path / "1_Dense" / "model.safetensors",
        dense_shapes,
        ((n, _random_tensor("1_Dense/" + n, s, seed)) for n, s in dense_shapes.items()),
        dtype,
    )
    _write_json(
        path / "config_sentence_transformers.json",
        {
            "__version__": {**_ST_VERSIONS, "pylate": "1.3.0"},
            "prompts": {},
            "default_prompt_name": None,
            "similarity_fn_name": "MaxSim",
            "query_prefix": QUERY_MARKER,
            "document_prefix": DOCUMENT_MARKER,
            "query_length": 32,
            "document_length": 512,
            "attend_to_expansion_tokens": False,
            "skiplist_words": list(string.punctuation),
            "do_query_expansion": True,
            "model_type": "ColBERT",
        },
    )


def make_checkpoint(
    path: Path,
    kind: CheckpointKind,
    shape: SyntheticShape = TINY,
    *,
    seed: int = 0,
    bidirectional: bool = True,
    config_style: ConfigStyle = "current",
    model_prefix: bool = False,
    dtype: torch.dtype = torch.float32,
) -> Path:
    """Write a complete random checkpoint folder in the real layout and return its path.

    Args:
        path: the folder to write (created; existing files are overwritten).
        kind: ``"colbert"`` (LFM2.5-ColBERT-350M: ``1_Dense``, vocab ``base_vocab + 2``, ``[Q] ``/``[D] ``
            tokens) or ``"embedding"`` (LFM2.5-Embedding-350M: CLS ``1_Pooling``, padded vocab).
        shape: :data:`TINY` (seconds) or :data:`FULL` (the real 350M shape; ~1.4 GB in float32, streamed).
        seed: weights depend only on the seed and the shape.
        bidirectional: ``False`` writes the causal LFM2-ColBERT v1 marker ``architectures: ["Lfm2Model"]``
            and no remote code.
        config_style: ``"current"``: ``layer_types``, ``intermediate_size`` + ``block_ff_dim``, top-level
            ``rope_theta``; ``"legacy"``: ``full_attn_idxs``, ``block_ff_dim`` only, ``rope_parameters``.
        model_prefix: write every backbone tensor name with a ``model.`` prefix (a variant seen in the wild).
        dtype: tensor dtype of the safetensors files (float32, bfloat16, float16); config.json says bfloat16.
    """
    if kind not in ("colbert", "embedding"):
        raise ValueError(f"kind must be 'colbert' or 'embedding', not {kind!r}")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    config = backbone_config(kind, shape, bidirectional=bidirectional, config_style=config_style)
    _write_json(path / "config.json", config)

    shapes = shape.tensor_shapes(kind)
    prefix = "model." if model_prefix else ""
    _write_safetensors(
        path / "model.safetensors",
        {prefix + n: s for n, s in shapes.items()},
        ((prefix + n, _random_tensor(n, s, seed)) for n, s in shapes.items()),
        dtype,
    )
    build_tokenizer(path, shape.base_vocab, colbert=kind == "colbert")
    _write_sentence_transformers_files(path, kind, shape, seed, dtype)
    if bidirectional:
        (path / "modeling_lfm2_bidirectional.py").write_text(_MODELING_PLACEHOLDER, encoding="utf-8")
    return path
