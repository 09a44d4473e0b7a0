"""The PyTorch reference: ground truth the GGUF runtime is tested and verified against.

It is transformers' causal ``Lfm2Model`` with exactly two changes for bidirectional checkpoints,
the two things their remote code (``modeling_lfm2_bidirectional.py``) changes:

1. attention gets a padding-only 4-D additive mask (key mask, no causal triangle);
2. every short conv is centred: zero padding of ``(L_cache - 1) / 2`` on each side, so that
   ``z_t = w0*u_{t-1} + w1*u_t + w2*u_{t+1}`` with the stored kernel, unflipped.

Causal checkpoints (LFM2-ColBERT v1) keep transformers' behaviour unchanged. In float64 only, RoPE's
angles are float64 too (``Float64RotaryEmbedding``): transformers computes them in float32 whatever
the dtype, which a float64 yardstick must not.

The model runs **one unpadded sequence at a time**, exactly what llama.cpp computes. A key mask
(PyLate's query expansion) hides positions as attention keys only: they stay in the sequence,
in the conv, and produce output rows. The conv input is never zeroed at padded positions (as on
transformers 4.56, which the published checkpoints target).

``ReferenceEncoder`` adds the retrieval semantics of sentence-transformers (Embedding: prompts, CLS,
L2) and PyLate (ColBERT: [Q]/[D] markers, query expansion, skiplist, per-token L2) on top.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np
import torch
import torch.nn.functional as F
from transformers import Lfm2Config, Lfm2Model
from transformers.models.lfm2.modeling_lfm2 import Lfm2Attention, Lfm2RotaryEmbedding, Lfm2ShortConv

from lfm2edge.convert.checkpoint import BackboneConfig, Checkpoint, resolve
from lfm2edge.runtime.core.errors import CheckpointError, InvalidInputError
from lfm2edge.runtime.core.settings import ModelKind, RetrievalSettings

if TYPE_CHECKING:
    from tokenizers import Tokenizer

Expansion = Literal["pylate", "attended", "none"]
EXPANSION_MODES: tuple[str, ...] = ("pylate", "attended", "none")


# --- the two changes to transformers' Lfm2 -------------------------------------------------------


class CentredShortConv(Lfm2ShortConv):
    """``Lfm2ShortConv`` with a centred (non-causal) depthwise conv; same parameters, same names.

    Installed by swapping ``__class__`` on the modules transformers built, so no weights move.
    No cache, no padding mask: the reference runs one unpadded sequence per call.
    """

    def forward(  # type: ignore[override]
        self,
        hidden_states: torch.Tensor,
        cache: object | None = None,
        attention_mask: torch.Tensor | None = None,
        **kwargs: object,
    ) -> torch.Tensor:
        if cache is not None:
            raise RuntimeError("the bidirectional reference has no cache: run whole sequences")
        bcx = self.in_proj(hidden_states).transpose(-1, -2)  # [B, 3H, L]
        b, c, x = bcx.chunk(3, dim=-2)
        u = b * x
        # conv1d is a cross-correlation: with padding p = K // 2, out[t] = sum_k w[k] * u[t + k - p],
        # i.e. w0*u[t-1] + w1*u[t] + w2*u[t+1] for K = 3, and exactly L outputs for an odd K.
        z = F.conv1d(
            u, self.conv.weight, self.conv.bias, padding=self.conv_kernel_size // 2, groups=u.shape[1]
        )
        y = (c * z).transpose(-1, -2).contiguous()
        return self.out_proj(y)


class Float64RotaryEmbedding(Lfm2RotaryEmbedding):
    """``Lfm2RotaryEmbedding`` with its angles and their cos/sin in float64, for float64 models.

    transformers computes the angles in float32 whatever the model's dtype (``.float()``), so its float64
    model kept float32's rounding of angles of a few hundred radians (cos/sin off by 5.6e-7 rms over 256
    positions): the rounding PyTorch fp32 makes, which then looked nearer "float64" than it is. Installed
    by swapping ``__class__``; float32 and bfloat16 models keep transformers' own, what their users run.
    """

    def forward(  # type: ignore[override]
        self, x: torch.Tensor, position_ids: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        half = self.inv_freq.shape[0]
        base = torch.tensor(float(self.config.rope_parameters["rope_theta"]), dtype=torch.float64)
        inv_freq = base ** (-torch.arange(half, dtype=torch.float64, device=x.device) / half)
        angles = position_ids[..., None].to(torch.float64) * inv_freq
        emb = torch.cat((angles, angles), dim=-1)
        scale = self.attention_scaling
        return (emb.cos() * scale).to(x.dtype), (emb.sin() * scale).to(x.dtype)


def additive_key_mask(key_mask: torch.Tensor, dtype: torch.dtype, causal: bool = False) -> torch.Tensor:
    """A [1, 1, L, L] additive mask: 0 where query i may read key j, the dtype's minimum elsewhere.

    ``key_mask[j]`` False hides key j from every query; ``causal`` adds the triangle j <= i.
    The finite minimum (as transformers uses) keeps an all-masked row finite instead of NaN.
    """
    n = key_mask.shape[0]
    allowed = key_mask.view(1, n).expand(n, n)
    if causal:
        allowed = allowed & torch.ones(n, n, dtype=torch.bool, device=key_mask.device).tril()
    mask = torch.zeros(n, n, dtype=dtype, device=key_mask.device)
    mask.masked_fill_(~allowed, torch.finfo(dtype).min)
    return mask.view(1, 1, n, n)


def to_lfm2_config(config: BackboneConfig, attn_implementation: str = "sdpa") -> Lfm2Config:
    """Our resolved ``BackboneConfig`` as a transformers ``Lfm2Config``.

    The FFN width is the already auto-adjusted one (6656 -> 4608) with transformers' own auto-adjust turned
    off, so the width is never adjusted twice. Written for transformers 5.x (``rope_parameters``).
    """
    if attn_implementation not in ("sdpa", "eager"):
        # Other backends (flash, flex) build their own masks and would ignore our 4-D mask.
        raise ValueError(f"attn_implementation must be 'sdpa' or 'eager', not {attn_implementation!r}")
    return Lfm2Config(
        vocab_size=config.vocab_size,
        hidden_size=config.hidden_size,
        intermediate_size=config.ff_dim,
        block_auto_adjust_ff_dim=False,
        num_hidden_layers=config.num_hidden_layers,
        num_attention_heads=config.num_attention_heads,
        num_key_value_heads=config.num_key_value_heads,
        head_dim=config.head_dim,
        layer_types=[
            "full_attention" if config.is_attention(i) else "conv" for i in range(config.num_hidden_layers)
        ],
        rope_parameters={"rope_type": "default", "rope_theta": config.rope_theta},
        norm_eps=config.norm_eps,
        conv_L_cache=config.conv_l_cache,
        conv_bias=False,
        max_position_embeddings=config.max_position_embeddings,
        bos_token_id=config.bos_token_id,
        eos_token_id=config.eos_token_id,
        pad_token_id=config.pad_token_id,
        tie_word_embeddings=False,
        use_cache=False,
        attn_implementation=attn_implementation,
    )


def build_backbone(
    config: BackboneConfig,
    state_dict: dict[str, torch.Tensor],
    dtype: torch.dtype = torch.float32,
    attn_implementation: str = "sdpa",
) -> Lfm2Model:
    """An eval-mode ``Lfm2Model`` holding ``state_dict`` (names without ``model.``), made
    bidirectional unless ``config.causal``. Loading is strict: a missing or extra tensor raises."""
    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # older transformers: random init is only slower
        no_init_weights = contextlib.nullcontext  # type: ignore[assignment]
    hf_config = to_lfm2_config(config, attn_implementation)
    with no_init_weights():
        model = Lfm2Model(hf_config)
    try:
        model.load_state_dict(state_dict, strict=True)
    except RuntimeError as e:
        raise CheckpointError(
            f"the checkpoint's tensors do not match an LFM2 backbone of this config: {e}"
        ) from e
    if not config.causal:
        for module in model.modules():
            if isinstance(module, Lfm2ShortConv):
                module.__class__ = CentredShortConv
            elif isinstance(module, Lfm2Attention):
                # Only read when no mask is passed; we always pass one, this is a second guard.
                module.is_causal = False
    if dtype == torch.float64:
        model.rotary_emb.__class__ = Float64RotaryEmbedding
    return model.to(dtype).eval().requires_grad_(False)


# --- the model -------------------------------------------------------------------------------------


class ReferenceModel:
    """The backbone plus ColBERT's Dense head, one unpadded sequence per call."""

    def __init__(
        self,
        backbone: Lfm2Model,
        config: BackboneConfig,
        kind: ModelKind,
        settings: RetrievalSettings,
        dense_weight: np.ndarray | None = None,
        dtype: torch.dtype = torch.float32,
        checkpoint: Checkpoint | None = None,
    ) -> None:
        self.backbone = backbone
        self.checkpoint = checkpoint
        self.config = config
        self.kind = kind
        self.settings = settings
        self.dtype = dtype
        self.dense: torch.Tensor | None = (
            None if dense_weight is None else torch.from_numpy(np.ascontiguousarray(dense_weight)).to(dtype)
        )
        if kind is ModelKind.LATE_INTERACTION and self.dense is None:
            raise CheckpointError("a ColBERT model needs its 1_Dense/model.safetensors projection")

    @classmethod
    def from_checkpoint(
        cls,
        checkpoint: Checkpoint | str | Path,
        dtype: torch.dtype = torch.float32,
        threads: int | None = None,
        attn_implementation: str = "sdpa",
    ) -> ReferenceModel:
        """Load a checkpoint folder or hub id; ``dtype`` is the weights' dtype (float32 or bfloat16)."""
        if threads is not None:
            torch.set_num_threads(int(threads))
        ckpt = checkpoint if isinstance(checkpoint, Checkpoint) else resolve(checkpoint)
        state = {name: torch.from_numpy(array) for name, array in ckpt.iter_tensors()}
        backbone = build_backbone(ckpt.config, state, dtype=dtype, attn_implementation=attn_implementation)
        del state
        tokenizer = ckpt.load_tokenizer() if (ckpt.path / "tokenizer.json").exists() else None
        model = cls(
            backbone,
            ckpt.config,
            ckpt.kind,
            ckpt.retrieval_settings(tokenizer),
            dense_weight=ckpt.dense_weight(),
            dtype=dtype,
            checkpoint=ckpt,
        )
        return model

    @property
    def hidden_size(self) -> int:
        return self.config.hidden_size

    @property
    def output_dim(self) -> int:
        """Width of one output vector: the Dense rows for ColBERT, the hidden size otherwise."""
        return self.hidden_size if self.dense is None else int(self.dense.shape[0])

    def _check(
        self, ids: np.ndarray, key_mask: np.ndarray | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        ids = np.asarray(ids)
        if ids.ndim != 1 or ids.size == 0:
            raise InvalidInputError(f"ids must be one non-empty sequence [L], got shape {ids.shape}")
        if not np.issubdtype(ids.dtype, np.integer):
            raise InvalidInputError(f"ids must be integers, got {ids.dtype}")
        if ids.min() < 0 or ids.max() >= self.config.vocab_size:
            raise InvalidInputError(
                f"token ids must lie in [0, {self.config.vocab_size}), got {ids.min()}..{ids.max()}"
            )
        mask = None
        if key_mask is not None:
            key_mask = np.asarray(key_mask, dtype=bool)
            if key_mask.shape != ids.shape:
                raise InvalidInputError(f"key_mask has shape {key_mask.shape}, ids {ids.shape}")
            if not key_mask.any():
                raise InvalidInputError("key_mask hides every position: at least one key must be attended")
            mask = torch.from_numpy(key_mask.copy())
        return torch.from_numpy(ids.astype(np.int64)), mask

    @torch.inference_mode()
    def _forward(self, ids: np.ndarray, key_mask: np.ndarray | None = None) -> torch.Tensor:
        """Final normed hidden states [L, H] in the model dtype."""
        input_ids, mask = self._check(ids, key_mask)
        if self.config.causal and mask is None:
            # Plain transformers, untouched: its own causal mask.
            out = self.backbone(input_ids=input_ids[None], use_cache=False)
        else:
            keys = mask if mask is not None else torch.ones(input_ids.shape[0], dtype=torch.bool)
            attn = additive_key_mask(keys, self.dtype, causal=self.config.causal)
            # A dict bypasses transformers' mask builders: attention gets our 4-D mask as is, and
            # the conv gets None, so the conv input is never zeroed at masked positions.
            out = self.backbone(
                input_ids=input_ids[None],
                attention_mask={"full_attention": attn, "conv": None},
                use_cache=False,
            )
        return out.last_hidden_state[0]

    def hidden_states(self, ids: np.ndarray, key_mask: np.ndarray | None = None) -> np.ndarray:
        """One unpadded sequence [L] -> the final normed hidden states [L, H], float32.

        ``key_mask[j]`` False hides position j as an attention key only (PyLate's expansion pads):
        it stays in the sequence and the conv, and still produces an output row.
        """
        return self._forward(ids, key_mask).float().numpy()

    @torch.inference_mode()
    def token_vectors(self, ids: np.ndarray, key_mask: np.ndarray | None = None) -> np.ndarray:
        """ColBERT: Dense (no bias) on every token, then per-token L2 -> [L, dense_out] float32."""
        if self.dense is None:
            raise InvalidInputError("token_vectors needs a ColBERT model (one with a 1_Dense projection)")
        # Dense in the model dtype, as PyLate runs it; the normalisation in float32.
        projected = (self._forward(ids, key_mask) @ self.dense.T).float()
        return F.normalize(projected, p=2.0, dim=-1).numpy()

    def cls_vector(self, ids: np.ndarray) -> np.ndarray:
        """Embedding: the final hidden state at position 0 (BOS), raw (not normalised), [H] float32."""
        return self._forward(ids)[0].float().numpy()


# --- retrieval semantics ---------------------------------------------------------------------------


class ReferenceEncoder:
    """sentence-transformers (Embedding) and PyLate (ColBERT) semantics, one unpadded sequence at a time.

    Texts are tokenised HF-style: the tokenizer's post-processor adds BOS, and added/special tokens
    written in the text are matched. An empty (or all-whitespace) text still yields BOS, plus the
    marker for ColBERT, plus the expansion pads for a ColBERT query: what PyLate produces for "".
    ``model=None`` (with ``settings``) prepares texts only (``tokenize_query`` / ``tokenize_document``):
    what engines that run an exported graph of the reference need.
    """

    def __init__(
        self, model: ReferenceModel | None, tokenizer: Tokenizer, settings: RetrievalSettings | None = None
    ) -> None:
        from tokenizers import Tokenizer

        if model is None and settings is None:
            raise InvalidInputError("a ReferenceEncoder without a model needs the retrieval settings")
        self.model = model
        self.settings = settings if settings is not None else model.settings  # type: ignore[union-attr]
        # A private copy without any truncation/padding stored in tokenizer.json: we cut ourselves.
        self.tokenizer = Tokenizer.from_str(tokenizer.to_str())
        self.tokenizer.no_truncation()
        self.tokenizer.no_padding()

    @classmethod
    def from_checkpoint(
        cls,
        checkpoint: Checkpoint | str | Path,
        dtype: torch.dtype = torch.float32,
        threads: int | None = None,
    ) -> ReferenceEncoder:
        ckpt = checkpoint if isinstance(checkpoint, Checkpoint) else resolve(checkpoint)
        return cls(ReferenceModel.from_checkpoint(ckpt, dtype=dtype, threads=threads), ckpt.load_tokenizer())

    @property
    def is_colbert(self) -> bool:
        return self.settings.is_colbert

    def _encode(self, text: str, max_len: int) -> list[int]:
        """Ids with BOS (from the post-processor), truncated to ``max_len`` tokens with BOS kept first."""
        if max_len < 1:
            raise InvalidInputError(f"a token limit of {max_len} leaves no room for BOS")
        return self.tokenizer.encode(text).ids[:max_len]

    def _with_marker(self, text: str, length: int, marker: int | None) -> list[int]:
        """PyLate: tokenise to ``length - 1`` tokens, then insert the marker id at position 1."""
        if marker is None:
            raise InvalidInputError("this ColBERT setting has no marker id to insert")
        ids = self._encode(text.strip(), length - 1)
        return ids[:1] + [marker] + ids[1:]

    def tokenize_query(self, text: str, expansion: Expansion = "pylate") -> tuple[np.ndarray, np.ndarray]:
        """(ids int32 [L], key_mask bool [L]) of one query.

        ColBERT: ``"pylate"`` follows the settings (published: padded with the expansion id to exactly
        query_length, pads hidden as keys); ``"attended"`` pads and attends the pads; ``"none"`` does not
        pad. Embedding: prompt + text, stripped; ``expansion`` is ignored and every key is attended.
        """
        if expansion not in EXPANSION_MODES:
            raise InvalidInputError(f"expansion must be one of {EXPANSION_MODES}, not {expansion!r}")
        s = self.settings
        if not self.is_colbert:
            ids = self._encode((s.query_prefix + text).strip(), s.query_length)
            return np.asarray(ids, dtype=np.int32), np.ones(len(ids), dtype=bool)
        ids = self._with_marker(text, s.query_length, s.query_prefix_id)
        keys = [True] * len(ids)
        pad = expansion == "attended" or (expansion == "pylate" and s.do_query_expansion)
        if pad:
            n_pad = s.query_length - len(ids)
            attend = expansion == "attended" or s.attend_to_expansion_tokens
            ids += [s.expansion_token_id] * n_pad
            keys += [attend] * n_pad
        return np.asarray(ids, dtype=np.int32), np.asarray(keys, dtype=bool)

    def tokenize_document(self, text: str) -> tuple[np.ndarray, np.ndarray]:
        """(ids int32 [L], keep bool [L]): ``keep`` marks the output rows that survive the skiplist
        (ColBERT, matched by id; BOS and the marker are not in it). Embedding keeps its one CLS row."""
        s = self.settings
        if not self.is_colbert:
            ids = self._encode((s.document_prefix + text).strip(), s.document_length)
            keep = np.zeros(len(ids), dtype=bool)
            keep[0] = True
            return np.asarray(ids, dtype=np.int32), keep
        ids = np.asarray(self._with_marker(text, s.document_length, s.document_prefix_id), dtype=np.int32)
        return ids, ~np.isin(ids, s.skiplist_array())

    def _dense(self, ids: np.ndarray) -> np.ndarray:
        vec = self._model().cls_vector(ids).astype(np.float64)
        if self.settings.normalize:
            vec /= max(np.linalg.norm(vec), 1e-12)  # sentence-transformers' normalize clamps the same way
        return vec.astype(np.float32)

    def encode_query(
        self, texts: str | Sequence[str], expansion: Expansion = "pylate"
    ) -> np.ndarray | list[np.ndarray]:
        """Embedding: [n, H] (or [H] for one str), L2-normalised. ColBERT: one [L_i, d] array per
        text (a single array for one str), unit rows, every row kept (expansion rows included)."""
        single = isinstance(texts, str)
        batch = [texts] if single else list(texts)
        out: list[np.ndarray] = []
        for text in batch:
            ids, keys = self.tokenize_query(text, expansion)
            out.append(self._model().token_vectors(ids, keys) if self.is_colbert else self._dense(ids))
        return self._pack(out, single)

    def encode_document(self, texts: str | Sequence[str]) -> np.ndarray | list[np.ndarray]:
        """Embedding: [n, H] (or [H]), L2-normalised. ColBERT: [L_i, d] per text with the skiplist
        rows removed (a single array for one str)."""
        single = isinstance(texts, str)
        batch = [texts] if single else list(texts)
        out: list[np.ndarray] = []
        for text in batch:
            ids, keep = self.tokenize_document(text)
            out.append(self._model().token_vectors(ids)[keep] if self.is_colbert else self._dense(ids))
        return self._pack(out, single)

    def _pack(self, out: list[np.ndarray], single: bool) -> np.ndarray | list[np.ndarray]:
        if single:
            return out[0]
        if self.is_colbert:
            return out
        return np.stack(out) if out else np.zeros((0, self._model().hidden_size), dtype=np.float32)

    def _model(self) -> ReferenceModel:
        if self.model is None:
            raise InvalidInputError("this ReferenceEncoder prepares texts only: load one with a model to encode")
        return self.model


def pylate_maxsim(query: np.ndarray, documents: Sequence[np.ndarray]) -> np.ndarray:
    """Exact MaxSim per document: sum over query rows of the max dot product over document rows.

    Accumulated in float64 over kept rows only (no zero-vector padding as in PyLate's rerank); a
    document without rows scores 0. Returns float64 [n_documents].
    """
    q = np.asarray(query, dtype=np.float64)
    scores = np.zeros(len(documents), dtype=np.float64)
    for i, doc in enumerate(documents):
        d = np.asarray(doc, dtype=np.float64)
        if d.shape[0]:
            scores[i] = (q @ d.T).max(axis=1).sum()
    return scores
