"""The PyTorch reference (lfm2edge.convert.reference): bidirectional semantics and retrieval rules.

Everything runs on tiny random models: checkpoints in the real layout for the end-to-end rules,
and backbones built directly from a ``BackboneConfig`` where a test needs a chosen layer order.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers.models.lfm2.modeling_lfm2 import Lfm2RotaryEmbedding

from lfm2edge.convert.checkpoint import BackboneConfig, resolve
from lfm2edge.convert.reference import (
    CentredShortConv,
    ReferenceEncoder,
    ReferenceModel,
    build_backbone,
    pylate_maxsim,
)
from lfm2edge.convert.synthetic import make_checkpoint
from lfm2edge.runtime.core.errors import InvalidInputError
from lfm2edge.runtime.core.settings import ModelKind, colbert_defaults

# --- fixtures ----------------------------------------------------------------------------------------


def _make(path: Path, kind: str, **kwargs: object) -> Path:
    return make_checkpoint(path, kind=kind, seed=0, **kwargs)


# The session's tiny checkpoints (tests/conftest.py), under the names these tests use.
@pytest.fixture(scope="module")
def colbert_dir(colbert_checkpoint: Path) -> Path:
    return colbert_checkpoint


@pytest.fixture(scope="module")
def embedding_dir(embedding_checkpoint: Path) -> Path:
    return embedding_checkpoint


@pytest.fixture(scope="module")
def causal_dir(causal_colbert_checkpoint: Path) -> Path:
    return causal_colbert_checkpoint


@pytest.fixture(scope="module")
def colbert(colbert_dir: Path) -> ReferenceEncoder:
    return ReferenceEncoder.from_checkpoint(colbert_dir)


@pytest.fixture(scope="module")
def embedding(embedding_dir: Path) -> ReferenceEncoder:
    return ReferenceEncoder.from_checkpoint(embedding_dir)


def tiny_config(attention_layers: tuple[int, ...], n_layers: int, causal: bool = False) -> BackboneConfig:
    return BackboneConfig(
        hidden_size=32,
        num_hidden_layers=n_layers,
        attention_layers=attention_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        ff_dim=64,
        conv_l_cache=3,
        norm_eps=1e-5,
        rope_theta=1e6,
        max_position_embeddings=4096,
        vocab_size=50,
        bos_token_id=1,
        eos_token_id=7,
        pad_token_id=0,
        causal=causal,
        architecture="Lfm2Model" if causal else "Lfm2BidirectionalModel",
    )


def random_state(cfg: BackboneConfig, seed: int = 0) -> dict[str, torch.Tensor]:
    """Weights in the checkpoint's names, scaled so that every path visibly matters."""
    g = torch.Generator().manual_seed(seed)
    h, f, hd = cfg.hidden_size, cfg.ff_dim, cfg.head_dim

    def w(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g) / shape[-1] ** 0.5

    def norm(n: int) -> torch.Tensor:
        return 1 + 0.1 * torch.randn(n, generator=g)

    state = {
        "embed_tokens.weight": torch.randn(cfg.vocab_size, h, generator=g),
        "embedding_norm.weight": norm(h),
    }
    for i in range(cfg.num_hidden_layers):
        p = f"layers.{i}."
        state |= {p + "operator_norm.weight": norm(h), p + "ffn_norm.weight": norm(h)}
        state |= {p + "feed_forward.w1.weight": w(f, h), p + "feed_forward.w3.weight": w(f, h)}
        state[p + "feed_forward.w2.weight"] = w(h, f)
        if cfg.is_attention(i):
            a = p + "self_attn."
            state |= {a + "q_proj.weight": w(cfg.num_attention_heads * hd, h)}
            state |= {a + "k_proj.weight": w(cfg.num_key_value_heads * hd, h)}
            state |= {a + "v_proj.weight": w(cfg.num_key_value_heads * hd, h)}
            state |= {a + "out_proj.weight": w(h, cfg.num_attention_heads * hd)}
            state |= {a + "q_layernorm.weight": norm(hd), a + "k_layernorm.weight": norm(hd)}
        else:
            c = p + "conv."
            state |= {c + "in_proj.weight": w(3 * h, h), c + "out_proj.weight": w(h, h)}
            state[c + "conv.weight"] = torch.randn(h, 1, cfg.conv_l_cache, generator=g)
    return state


def direct_model(cfg: BackboneConfig, seed: int = 0, attn: str = "sdpa") -> ReferenceModel:
    backbone = build_backbone(cfg, random_state(cfg, seed), attn_implementation=attn)
    return ReferenceModel(backbone, cfg, ModelKind.DENSE, colbert_defaults())


def rows_changed(a: np.ndarray, b: np.ndarray, tol: float = 1e-5) -> list[int]:
    return [int(i) for i in np.flatnonzero(np.abs(a - b).max(axis=1) > tol)]


# --- the backbone --------------------------------------------------------------------------------------


def test_causal_checkpoint_equals_plain_transformers(causal_dir: Path) -> None:
    from transformers import Lfm2Model

    ref = ReferenceModel.from_checkpoint(causal_dir)
    assert ref.config.causal
    plain = Lfm2Model.from_pretrained(causal_dir, dtype=torch.float32).eval()
    ids = np.array([1, 40, 41, 42, 43, 44, 45, 46, 47], dtype=np.int32)
    with torch.inference_mode():
        want = plain(input_ids=torch.from_numpy(ids.astype(np.int64))[None]).last_hidden_state[0].numpy()
    np.testing.assert_array_equal(ref.hidden_states(ids), want)
    # An all-True key mask goes through our explicit causal 4-D mask: same numbers.
    np.testing.assert_allclose(ref.hidden_states(ids, np.ones(len(ids), bool)), want, rtol=1e-5, atol=1e-5)
    # Causal: the last token never reaches the first.
    changed = ids.copy()
    changed[-1] = 50
    assert rows_changed(ref.hidden_states(ids), ref.hidden_states(changed)) == [len(ids) - 1]


def test_centred_conv_reaches_backwards(colbert: ReferenceEncoder) -> None:
    model = colbert.model
    assert not model.config.causal
    ids = np.array([1, 40, 41, 42, 43, 44], dtype=np.int32)
    changed = ids.copy()
    changed[-1] = 45
    assert 0 in rows_changed(model.hidden_states(ids), model.hidden_states(changed))
    # Conv only (no attention to carry it): the last token reaches exactly its left neighbour.
    conv_only = direct_model(tiny_config((), 1))
    assert rows_changed(conv_only.hidden_states(ids), conv_only.hidden_states(changed)) == [4, 5]


def test_centred_conv_matches_numpy_spec() -> None:
    cfg = tiny_config((), 1)
    conv = build_backbone(cfg, random_state(cfg, seed=3)).layers[0].conv
    assert isinstance(conv, CentredShortConv)
    x = np.random.default_rng(1).standard_normal((7, cfg.hidden_size)).astype(np.float32)
    with torch.inference_mode():
        got = conv(torch.from_numpy(x)[None])[0].numpy()

    h = cfg.hidden_size
    w_in = conv.in_proj.weight.numpy().astype(np.float64)
    w_out = conv.out_proj.weight.numpy().astype(np.float64)
    kernel = conv.conv.weight.numpy()[:, 0, :].astype(np.float64)  # [H, 3], unflipped
    bcx = x.astype(np.float64) @ w_in.T
    b, c, xt = bcx[:, :h], bcx[:, h : 2 * h], bcx[:, 2 * h :]
    u = np.vstack([np.zeros((1, h)), b * xt, np.zeros((1, h))])  # u_{-1} = u_L = 0
    z = kernel[:, 0] * u[:-2] + kernel[:, 1] * u[1:-1] + kernel[:, 2] * u[2:]
    np.testing.assert_allclose(got, (c * z) @ w_out.T, rtol=1e-5, atol=1e-5)


def test_masked_key_reaches_others_only_through_the_conv() -> None:
    # Attention first, conv second: a hidden key changes only its own row in the attention layer,
    # then the centred conv spreads it to exactly its two neighbours.
    model = direct_model(tiny_config((0,), 2))
    ids = np.array([1, 20, 21, 22, 23, 24, 25], dtype=np.int32)
    keys = np.ones(len(ids), dtype=bool)
    keys[3] = False
    changed = ids.copy()
    changed[3] = 30
    base = model.hidden_states(ids, keys)
    assert rows_changed(base, model.hidden_states(changed, keys)) == [2, 3, 4]
    # Attended, the same change reaches every row.
    assert rows_changed(model.hidden_states(ids), model.hidden_states(changed)) == list(range(len(ids)))
    # Hiding the key changes every row's attention, so the mask itself is not a no-op.
    assert rows_changed(base, model.hidden_states(ids)) == list(range(len(ids)))


def test_key_mask_equals_explicit_minus_infinity_mask() -> None:
    cfg = tiny_config((0, 2), 3)
    sdpa, eager = direct_model(cfg, seed=5), direct_model(cfg, seed=5, attn="eager")
    ids = np.array([1, 11, 12, 13, 7, 7, 7], dtype=np.int32)
    keys = np.array([True, True, True, True, False, False, False])
    got = sdpa.hidden_states(ids, keys)
    np.testing.assert_allclose(eager.hidden_states(ids, keys), got, rtol=1e-5, atol=1e-5)

    # An independent -inf mask handed straight to transformers (through the same layers).
    mask = torch.zeros(1, 1, len(ids), len(ids))
    mask[..., ~torch.from_numpy(keys)] = float("-inf")
    with torch.inference_mode():
        out = sdpa.backbone(
            input_ids=torch.from_numpy(ids.astype(np.int64))[None],
            attention_mask={"full_attention": mask, "conv": None},
        ).last_hidden_state[0]
    np.testing.assert_allclose(out.numpy(), got, rtol=1e-6, atol=1e-6)


def test_bidirectional_attention_has_no_triangle() -> None:
    model = direct_model(tiny_config((0,), 1))  # attention only: nothing else can carry it back
    ids = np.array([1, 20, 21, 22], dtype=np.int32)
    changed = ids.copy()
    changed[-1] = 23
    assert rows_changed(model.hidden_states(ids), model.hidden_states(changed)) == [0, 1, 2, 3]


def test_bf16_weights_float32_outputs(colbert_dir: Path, colbert: ReferenceEncoder) -> None:
    bf16 = ReferenceModel.from_checkpoint(colbert_dir, dtype=torch.bfloat16, threads=2)
    assert next(bf16.backbone.parameters()).dtype == torch.bfloat16
    ids = np.array([1, 40, 41, 42, 43], dtype=np.int32)
    hidden, want = bf16.hidden_states(ids), colbert.model.hidden_states(ids)
    assert hidden.dtype == np.float32
    cos = (hidden * want).sum(1) / np.linalg.norm(hidden, axis=1) / np.linalg.norm(want, axis=1)
    assert cos.min() > 0.98
    assert bf16.token_vectors(ids).dtype == np.float32


def test_float64_model_computes_rope_angles_in_float64() -> None:
    """transformers computes RoPE's angles in float32 whatever the dtype; a float64 yardstick must not,
    while a float32 model keeps transformers' own (what PyTorch fp32 users run)."""
    cfg = tiny_config((0,), 1)
    positions = torch.arange(512).view(1, -1)
    half = cfg.head_dim // 2
    angles = np.arange(512)[:, None] * cfg.rope_theta ** (-np.arange(half) / half)
    exact = np.cos(np.concatenate([angles, angles], axis=1))

    f64 = build_backbone(cfg, random_state(cfg), dtype=torch.float64)
    cos, sin = f64.rotary_emb(torch.zeros(1, dtype=torch.float64), positions)
    assert cos.dtype == torch.float64
    assert np.abs(cos[0].numpy() - exact).max() < 1e-13
    assert np.abs(sin[0].numpy() - np.sin(np.concatenate([angles, angles], axis=1))).max() < 1e-13

    f32 = build_backbone(cfg, random_state(cfg))
    assert type(f32.rotary_emb) is Lfm2RotaryEmbedding
    cos32, _ = f32.rotary_emb(torch.zeros(1), positions)
    assert np.abs(cos32[0].numpy() - exact).max() > 1e-6  # float32 angles: the rounding float64 must not keep


def test_invalid_ids_raise(colbert: ReferenceEncoder) -> None:
    with pytest.raises(InvalidInputError):
        colbert.model.hidden_states(np.array([], dtype=np.int32))
    with pytest.raises(InvalidInputError):
        colbert.model.hidden_states(np.array([1, colbert.model.config.vocab_size]))
    with pytest.raises(InvalidInputError):
        colbert.model.hidden_states(np.array([1, 2]), np.array([False, False]))


def test_legacy_config_keys_and_prefixed_names(colbert_dir: Path, tmp_path: Path) -> None:
    # full_attn_idxs, block_ff_dim only, rope_parameters, and "model."-prefixed tensor names; same weights.
    legacy = _make(tmp_path / "legacy", "colbert", config_style="legacy", model_prefix=True)
    raw = json.loads((legacy / "config.json").read_text())
    assert "full_attn_idxs" in raw and "layer_types" not in raw and "rope_parameters" in raw
    new, old = ReferenceEncoder.from_checkpoint(colbert_dir), ReferenceEncoder.from_checkpoint(legacy)
    assert old.model.config == new.model.config
    text = "a tiny check, of legacy keys!"
    np.testing.assert_array_equal(old.encode_query(text), new.encode_query(text))
    np.testing.assert_array_equal(old.encode_document(text), new.encode_document(text))


# --- retrieval semantics ---------------------------------------------------------------------------


def test_colbert_query_modes(colbert: ReferenceEncoder) -> None:
    s = colbert.settings
    bos = colbert.model.config.bos_token_id
    for mode in ("pylate", "attended"):
        ids, keys = colbert.tokenize_query("  what is a tiny model?  ", mode)
        assert len(ids) == s.query_length and ids[0] == bos and ids[1] == s.query_prefix_id
        n_text = len(colbert.tokenizer.encode("what is a tiny model?").ids) + 1  # + the marker
        assert n_text < s.query_length and (ids[n_text:] == s.expansion_token_id).all()
        assert keys[:n_text].all()
        assert keys[n_text:].all() if mode == "attended" else not keys[n_text:].any()
    ids, keys = colbert.tokenize_query("what is a tiny model?", "none")
    assert len(ids) < s.query_length and keys.all()

    # Truncation keeps BOS and leaves room for the marker: exactly query_length tokens.
    long_ids, long_keys = colbert.tokenize_query(" ".join(["word"] * 200))
    assert len(long_ids) == s.query_length and long_keys.all() and long_ids[0] == bos

    # The empty query is BOS, marker, pads (what PyLate builds for "").
    empty, empty_keys = colbert.tokenize_query("   ")
    assert empty[:2].tolist() == [bos, s.query_prefix_id] and not empty_keys[2:].any()

    vecs = colbert.encode_query("what is a tiny model?")
    assert vecs.shape == (s.query_length, colbert.model.output_dim)
    np.testing.assert_allclose(np.linalg.norm(vecs, axis=1), 1.0, rtol=1e-5)
    batch = colbert.encode_query(["what is a tiny model?", "x"])
    assert isinstance(batch, list) and len(batch) == 2
    np.testing.assert_array_equal(batch[0], vecs)
    # The rows are the model's token vectors with the masked expansion keys.
    ids, keys = colbert.tokenize_query("what is a tiny model?")
    np.testing.assert_array_equal(vecs, colbert.model.token_vectors(ids, keys))
    assert not np.allclose(vecs, colbert.encode_query("what is a tiny model?", "attended"))


def test_colbert_documents_drop_skiplist_rows(colbert: ReferenceEncoder) -> None:
    s = colbert.settings
    text = "  Hello, world! A tiny test.  "
    ids, keep = colbert.tokenize_document(text)
    assert ids[0] == colbert.model.config.bos_token_id and ids[1] == s.document_prefix_id
    skipped = np.isin(ids, s.skiplist_array())
    assert skipped.sum() >= 2 and keep.tolist() == (~skipped).tolist() and keep[:2].all()
    vecs = colbert.encode_document(text)
    assert vecs.shape == (int(keep.sum()), colbert.model.output_dim)
    np.testing.assert_allclose(np.linalg.norm(vecs, axis=1), 1.0, rtol=1e-5)
    np.testing.assert_array_equal(vecs, colbert.model.token_vectors(ids)[keep])

    long_ids, _ = colbert.tokenize_document(" ".join(["word"] * 2000))
    assert len(long_ids) == s.document_length and long_ids[1] == s.document_prefix_id


def test_embedding_prompt_and_cls(embedding: ReferenceEncoder) -> None:
    s = embedding.settings
    assert embedding.model.kind is ModelKind.DENSE and s.query_prefix
    ids, keys = embedding.tokenize_query("  tiny model  ")
    assert (
        ids.tolist() == embedding.tokenizer.encode((s.query_prefix + "  tiny model  ").strip()).ids
        and keys.all()
    )
    assert ids[0] == embedding.model.config.bos_token_id
    doc_ids, _ = embedding.tokenize_document("tiny model")
    assert doc_ids.tolist() == embedding.tokenizer.encode(s.document_prefix + "tiny model").ids
    assert len(embedding.tokenize_document(" ".join(["word"] * 2000))[0]) == s.document_length

    q = embedding.encode_query("  tiny model  ")
    cls = embedding.model.cls_vector(ids)
    np.testing.assert_allclose(q, cls / np.linalg.norm(cls), rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(cls, embedding.model.hidden_states(ids)[0])
    assert not np.allclose(q, embedding.encode_document("  tiny model  "))  # the prompts differ
    batch = embedding.encode_query(["tiny model", "  tiny model  "])
    assert batch.shape == (2, embedding.model.hidden_size)
    np.testing.assert_array_equal(batch[1], q)


def test_pylate_maxsim() -> None:
    q = np.array([[1.0, 0.0], [0.0, 1.0]])
    docs = [np.array([[1.0, 0.0], [0.6, 0.8]]), np.zeros((0, 2)), np.array([[-1.0, 0.0]])]
    np.testing.assert_allclose(pylate_maxsim(q, docs), [1.8, 0.0, -1.0])


def test_resolve_accepts_checkpoint_objects(embedding_dir: Path) -> None:
    model = ReferenceModel.from_checkpoint(resolve(embedding_dir))
    assert model.checkpoint is not None and model.kind is ModelKind.DENSE
