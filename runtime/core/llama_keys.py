"""The keys and tensors llama.cpp reads from an lfm2 GGUF, checked before llama.cpp sees them.

llama.cpp takes a GGUF's word for its hyperparameters: some values make it abort the whole
process (a NaN or negative norm epsilon, an unknown pooling type, tokenizer "none", the same
token twice in the vocabulary: GGML_ASSERTs), others size its allocations. ``check(header)``
names every such key that is missing, stored with another type than llama.cpp reads (it
reads exact GGUF types), out of range, or inconsistent with the tensors, each with its value
and the way out. The bounds follow llama.cpp b9777 (src/llama-model.cpp, models/lfm2.cpp,
src/llama-vocab.cpp).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from lfm2edge.runtime.core.architecture import GGUF_ARCH, Pooling, pooling_name
from lfm2edge.runtime.core.gguf_file import GGUFHeader, GGUFType

REMEDY = "re-convert the checkpoint with `lfm2edge convert`"
ARCH = GGUF_ARCH
MAX_LAYERS = 512  # LLAMA_MAX_LAYERS
MAX_WIDTH = 1 << 16  # embedding, head and output widths; the 350M models use 1,024
MAX_FF = 1 << 20
MAX_L_CACHE = 64
# The pooling types a retriever can use.
POOLING_TYPES = {int(p): pooling_name(p) for p in (Pooling.NONE, Pooling.MEAN, Pooling.CLS, Pooling.LAST)}
ROPE_SCALING_TYPES = ("none", "linear", "yarn", "longrope")
# Token types llama.cpp knows (LLAMA_TOKEN_TYPE_*): undefined, normal, unknown, control,
# user defined, unused, byte.
TOKEN_TYPES = range(0, 7)
# Matrix types llama.cpp's CPU matmul runs; Q8_1 and Q8_K are its internal activation types.
MATRIX_TYPES = frozenset(
    {0, 1, 2, 3, 6, 7, 8, 10, 11, 12, 13, 14, 16, 17, 18, 19, 20, 21, 22, 23, 29, 30, 34, 35, 39, 40, 41, 42}
)
F32 = 0
_TOKEN_ID_KEY = re.compile(r"^tokenizer\.ggml\.\w+_token_id$")
_TOKENIZER_BOOLS = (
    "tokenizer.ggml.add_bos_token", "tokenizer.ggml.add_eos_token", "tokenizer.ggml.add_sep_token",
    "tokenizer.ggml.add_space_prefix", "tokenizer.ggml.remove_extra_whitespaces",
)


@dataclass(frozen=True)
class Dims:
    """The dimensions the tensors must have, once the keys check out."""

    n_layer: int
    n_embd: int
    n_ff: int
    n_head: int
    head_dim: int
    n_head_kv: tuple[int, ...]  # per layer; 0: a short-conv layer
    l_cache: int
    n_vocab: int
    n_embd_out: int | None

    def tensors(self) -> dict[str, tuple[tuple[int, ...], bool, str]]:
        """GGUF tensor name -> (ggml shape, required, the keys its shape comes from)."""
        e, emb = self.n_embd, f"{ARCH}.embedding_length"
        ff, vocab = f"{ARCH}.feed_forward_length", "tokenizer.ggml.tokens"
        heads = f"{ARCH}.embedding_length / {ARCH}.attention.head_count"
        shapes: dict[str, tuple[tuple[int, ...], bool, str]] = {
            "token_embd.weight": ((e, self.n_vocab), True, f"{emb}, {vocab}"),
            "token_embd_norm.weight": ((e,), True, emb),
            "output.weight": ((e, self.n_vocab), False, f"{emb}, {vocab}"),
        }
        for i, kv in enumerate(self.n_head_kv):
            b = f"blk.{i}."
            shapes |= {
                b + "attn_norm.weight": ((e,), True, emb),
                b + "ffn_norm.weight": ((e,), True, emb),
                b + "ffn_gate.weight": ((e, self.n_ff), True, f"{emb}, {ff}"),
                b + "ffn_up.weight": ((e, self.n_ff), True, f"{emb}, {ff}"),
                b + "ffn_down.weight": ((self.n_ff, e), True, f"{ff}, {emb}"),
            }
            if kv:
                kv_keys = f"{emb}, {ARCH}.attention.head_count_kv[{i}] = {kv} (an attention layer), {heads}"
                shapes |= {
                    b + "attn_q_norm.weight": ((self.head_dim,), True, heads),
                    b + "attn_k_norm.weight": ((self.head_dim,), True, heads),
                    b + "attn_q.weight": ((e, self.n_head * self.head_dim), True, f"{emb}, {heads}"),
                    b + "attn_k.weight": ((e, kv * self.head_dim), True, kv_keys),
                    b + "attn_v.weight": ((e, kv * self.head_dim), True, kv_keys),
                    b + "attn_output.weight": ((e, e), True, emb),
                }
            else:
                conv = f"{ARCH}.attention.head_count_kv[{i}] = 0 (a conv layer)"
                shapes |= {
                    b + "shortconv.conv.weight": ((self.l_cache, e), True, f"{ARCH}.shortconv.l_cache, {emb}, {conv}"),
                    b + "shortconv.in_proj.weight": ((e, 3 * e), True, f"{emb}, {conv}"),
                    b + "shortconv.out_proj.weight": ((e, e), True, f"{emb}, {conv}"),
                }
        if self.n_embd_out is not None:
            out = f"{ARCH}.embedding_length_out"
            shapes |= {"dense_2.weight": ((e, self.n_embd_out), True, f"{emb}, {out}"),
                       "dense_2.bias": ((self.n_embd_out,), False, out)}
        return shapes


def _show(value: object) -> str:
    if isinstance(value, np.ndarray):
        head = ", ".join(str(v) for v in value.ravel()[:8].tolist())
        return f"[{head}{', ...' if value.size > 8 else ''}]"
    if isinstance(value, list):
        return f"a list of {len(value):,} strings"
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


class _Checker:
    """Collects the problems of one header, each naming its key, its value and the way out."""

    def __init__(self, h: GGUFHeader):
        self.h, self.found = h, []

    def add(self, message: str) -> None:
        self.found.append(f"{message}; {REMEDY}")

    def bad(self, key: str, why: str) -> None:
        value = self.h.metadata.get(key)
        self.add(f"{key} is {_show(value)} ({self.h.type_name(key)}): {why}")

    def typed(self, key: str, vtype: GGUFType, required: bool) -> bool:
        """Whether ``key`` is present and stored as ``vtype``; names it when it is not."""
        if key not in self.h.types:
            if required:
                self.add(f"{key} is missing; llama.cpp needs it")
            return False
        if self.h.types[key] != (vtype, None):
            self.bad(key, f"llama.cpp reads it as {vtype.name.lower()}")
            return False
        return True

    def uint(self, key: str, low: int, high: int, required: bool = True) -> int | None:
        if not self.typed(key, GGUFType.UINT32, required):
            return None
        value = int(self.h.metadata[key])  # type: ignore[call-overload]
        if not low <= value <= high:
            self.bad(key, f"it must be between {low:,} and {high:,}")
            return None
        return value

    def real(self, key: str, ok: Callable[[float], bool], rule: str, required: bool = True) -> float | None:
        if not self.typed(key, GGUFType.FLOAT32, required):
            return None
        value = float(self.h.metadata[key])  # type: ignore[arg-type]
        if not (math.isfinite(value) and ok(value)):
            self.bad(key, f"it must be a finite number {rule}")
            return None
        return value

    def boolean(self, key: str) -> None:
        self.typed(key, GGUFType.BOOL, required=False)

    def string(self, key: str, required: bool) -> str | None:
        return str(self.h.metadata[key]) if self.typed(key, GGUFType.STRING, required) else None


def check(h: GGUFHeader) -> list[str]:
    """Every problem llama.cpp would abort on, allocate from or refuse, for an ``lfm2`` file."""
    c = _Checker(h)
    _check_general_keys(c)
    dims = _check_arch_keys(c)
    n_vocab = _check_tokenizer(c)
    if c.found or dims is None or n_vocab is None:
        return c.found
    _check_tensors(c, Dims(**{**dims, "n_vocab": n_vocab}))
    return c.found


def _check_general_keys(c: _Checker) -> None:
    c.string("general.name", required=False)
    c.uint("general.file_type", 0, 2**31 - 1, required=False)
    c.uint("general.quantization_version", 0, 2**31 - 1, required=False)


def _check_arch_keys(c: _Checker) -> dict | None:
    k = f"{ARCH}."
    n_layer = c.uint(k + "block_count", 1, MAX_LAYERS)
    c.uint(k + "context_length", 1, 2**31 - 1)
    n_embd = c.uint(k + "embedding_length", 1, MAX_WIDTH)
    n_ff = c.uint(k + "feed_forward_length", 1, MAX_FF)
    n_head = c.uint(k + "attention.head_count", 1, MAX_WIDTH)
    c.real(k + "attention.layer_norm_rms_epsilon", lambda v: 0 < v < 1, "above 0 and below 1")
    c.real(k + "rope.freq_base", lambda v: 0 < v <= 1e12, "above 0 and at most 1e12", required=False)
    l_cache = c.uint(k + "shortconv.l_cache", 2, MAX_L_CACHE)
    c.uint(k + "vocab_size", 1, 2**31 - 1, required=False)
    n_embd_out = c.uint(k + "embedding_length_out", 1, MAX_WIDTH, required=False)
    if c.typed(k + "pooling_type", GGUFType.UINT32, required=False):
        if int(c.h.metadata[k + "pooling_type"]) not in POOLING_TYPES:  # type: ignore[call-overload]
            names = ", ".join(f"{v} ({n})" for v, n in POOLING_TYPES.items())
            c.bad(k + "pooling_type", f"it must be one of {names}")
    c.boolean(k + "attention.causal")
    causal = c.h.metadata.get(k + "attention.causal", True)
    if l_cache is not None and causal is False and l_cache % 2 == 0:
        c.bad(k + "shortconv.l_cache", "a bidirectional model's centred conv needs an odd width")
    # Keys llama.cpp reads for every architecture; LFM2 retrievers have none of what they switch on.
    for name in ("expert_count", "expert_used_count", "expert_group_count", "expert_group_used_count",
                 "nextn_predict_layers", "attention.sliding_window"):
        if k + name in c.h.metadata:
            c.uint(k + name, 0, 0)
    if c.string(k + "rope.scaling.type", required=False) not in (None, *ROPE_SCALING_TYPES):
        c.bad(k + "rope.scaling.type", f"it must be one of {', '.join(ROPE_SCALING_TYPES)}")
    head_count_kv = _head_count_kv(c, n_layer, n_head)
    if n_embd is None or n_head is None or n_layer is None or n_ff is None or l_cache is None:
        return None
    if n_embd % n_head:
        c.bad(k + "attention.head_count", f"it must divide {k}embedding_length ({n_embd})")
        return None
    head_dim = n_embd // n_head
    for name in ("attention.key_length", "attention.value_length"):
        if k + name in c.h.metadata:
            c.uint(k + name, head_dim, head_dim)
    if k + "rope.dimension_count" in c.h.metadata:
        rot = c.uint(k + "rope.dimension_count", 2, head_dim)
        if rot is not None and rot % 2:
            c.bad(k + "rope.dimension_count", "it must be even")
    if head_count_kv is None:
        return None
    return dict(n_layer=n_layer, n_embd=n_embd, n_ff=n_ff, n_head=n_head, head_dim=head_dim,
                n_head_kv=head_count_kv, l_cache=l_cache, n_embd_out=n_embd_out)


def _head_count_kv(c: _Checker, n_layer: int | None, n_head: int | None) -> tuple[int, ...] | None:
    """Per-layer KV heads: an int32/uint32 array of block_count values (0: a conv layer), or one uint32."""
    key = f"{ARCH}.attention.head_count_kv"
    if key not in c.h.types:
        c.add(f"{key} is missing; llama.cpp needs it to tell attention layers (> 0) from conv layers (0)")
        return None
    vtype, etype = c.h.types[key]
    if vtype is GGUFType.ARRAY:
        if etype not in (GGUFType.INT32, GGUFType.UINT32):
            c.bad(key, "llama.cpp reads an array of int32 or uint32")
            return None
        values = tuple(int(v) for v in np.asarray(c.h.metadata[key]).ravel())
        if n_layer is not None and len(values) != n_layer:
            c.bad(key, f"it has {len(values)} values, llama.cpp needs one per block ({ARCH}.block_count = {n_layer})")
            return None
    elif c.uint(key, 0, MAX_WIDTH) is not None and n_layer is not None:
        values = (int(c.h.metadata[key]),) * n_layer  # type: ignore[call-overload]
    else:
        return None
    if n_head is not None and any(v < 0 or (v and (v > n_head or n_head % v)) for v in values):
        c.bad(key, f"each value must be 0 (a conv layer) or divide the head count ({n_head})")
        return None
    return values


def _check_tokenizer(c: _Checker) -> int | None:
    """The number of tokens, once the tokenizer keys check out."""
    model = c.string("tokenizer.ggml.model", required=True)
    if model is not None and model != "gpt2":
        c.bad("tokenizer.ggml.model", "LFM2's tokenizer is byte-level BPE, 'gpt2'")
    c.string("tokenizer.ggml.pre", required=False)
    n_vocab = _token_list(c)
    _string_array(c, "tokenizer.ggml.merges", required=True)
    for key, element_types in (("tokenizer.ggml.token_type", (GGUFType.INT32,)),
                               ("tokenizer.ggml.scores", (GGUFType.FLOAT32, GGUFType.INT32))):
        if key not in c.h.types:
            continue
        vtype, etype = c.h.types[key]
        if vtype is not GGUFType.ARRAY or etype not in element_types:
            c.bad(key, f"llama.cpp reads an array of {' or '.join(t.name.lower() for t in element_types)}")
        elif n_vocab is not None and len(c.h.metadata[key]) != n_vocab:  # type: ignore[arg-type]
            c.bad(key, f"it has {len(c.h.metadata[key]):,} values for {n_vocab:,} tokens")  # type: ignore[arg-type]
        elif key.endswith("token_type") and not np.isin(c.h.metadata[key], TOKEN_TYPES).all():
            c.bad(key, f"token types are {TOKEN_TYPES.start} to {TOKEN_TYPES.stop - 1}")
        elif key.endswith("scores") and not np.isfinite(c.h.metadata[key]).all():  # type: ignore[call-overload]
            c.bad(key, "every score must be finite")
    for key in sorted(k for k in c.h.metadata if _TOKEN_ID_KEY.match(k)):
        if c.typed(key, GGUFType.UINT32, required=False) and n_vocab is not None:
            if int(c.h.metadata[key]) >= n_vocab:  # type: ignore[call-overload]
                c.bad(key, f"it is outside the vocabulary of {n_vocab:,} tokens")
    if "tokenizer.ggml.bos_token_id" not in c.h.metadata:
        c.add("tokenizer.ggml.bos_token_id is missing; every LFM2 text starts with its BOS token")
    for key in _TOKENIZER_BOOLS:
        c.boolean(key)
    if "tokenizer.ggml.token_type_count" in c.h.metadata:
        c.uint("tokenizer.ggml.token_type_count", 0, 2**31 - 1)
    vocab_size = c.h.metadata.get(f"{ARCH}.vocab_size")
    if n_vocab is not None and isinstance(vocab_size, int) and vocab_size != n_vocab:
        c.bad(f"{ARCH}.vocab_size", f"tokenizer.ggml.tokens has {n_vocab:,} tokens")
    return n_vocab


def _string_array(c: _Checker, key: str, required: bool) -> list[str] | None:
    if key not in c.h.types:
        if required:
            c.add(f"{key} is missing; llama.cpp needs it")
        return None
    if c.h.types[key] != (GGUFType.ARRAY, GGUFType.STRING):
        c.bad(key, "llama.cpp reads an array of strings")
        return None
    return c.h.metadata[key]  # type: ignore[return-value]


def _token_list(c: _Checker) -> int | None:
    key = "tokenizer.ggml.tokens"
    tokens = _string_array(c, key, required=True)
    if tokens is None:
        return None
    if not 1 <= len(tokens) < 2**31:
        c.bad(key, "a vocabulary needs 1 to 2**31 - 1 tokens")
        return None
    # llama.cpp renames empty tokens and asserts (aborts) when two tokens share a text.
    texts = [t or f"[EMPTY_{i}]" for i, t in enumerate(tokens)]
    if len(set(texts)) != len(texts):
        seen: set[str] = set()
        dup = next(t for t in texts if t in seen or seen.add(t))  # type: ignore[func-returns-value]
        c.bad(key, f"the token {dup!r} appears twice; every token text must be unique")
        return None
    return len(tokens)


def _check_tensors(c: _Checker, dims: Dims, shown: int = 5) -> None:
    """Each tensor llama.cpp will create, against the keys; a few problems, then how many more."""
    expected = dims.tensors()
    present = {t.name: t for t in c.h.tensors}
    found = []
    for name, (shape, required, keys) in expected.items():
        t = present.get(name)
        if t is None:
            if required:
                found.append(f"tensor {name} is missing, though {keys} call for it")
            continue
        if t.shape != shape:
            found.append(f"tensor {name} has shape {list(t.shape)}; expected {list(shape)} from {keys}")
        elif (len(shape) == 1 or ".shortconv.conv." in name) and t.type_id != F32:
            found.append(f"tensor {name} is {t.type_name}; norms, biases and the conv kernel must be F32")
        elif t.type_id not in MATRIX_TYPES:
            found.append(f"tensor {name} is {t.type_name}, a type llama.cpp cannot multiply with")
    for name in present:
        if name not in expected:
            found.append(f"tensor {name} is not part of an LFM2 model with these keys "
                         f"({ARCH}.block_count = {dims.n_layer}, {ARCH}.attention.head_count_kv, "
                         f"{ARCH}.embedding_length_out = {dims.n_embd_out})")
    for problem in found[:shown]:
        c.add(problem)
    if len(found) > shown:
        c.add(f"... and {len(found) - shown} more tensor problems like these")
