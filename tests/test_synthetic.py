"""lfm2edge.convert.synthetic: random checkpoints in the exact layout of the real LFM2.5 retrievers.

Checks the files and keys of notes §1, the FFN arithmetic of §2.2, the tokenizer id layout and splitting of
§4, and that the random weights are strong enough to expose the usual porting bugs of §2.
"""

from __future__ import annotations

import json
import string
from pathlib import Path

import pytest
import regex
import torch
import torch.nn.functional as F
from safetensors import safe_open
from transformers import AutoTokenizer, Lfm2Config, Lfm2Model
from transformers.models.lfm2.modeling_lfm2 import Lfm2MLP

from lfm2edge.convert.synthetic import (
    DOCUMENT_MARKER,
    FULL,
    LFM2_SPECIAL_TOKENS,
    LLAMA3_SPLIT_REGEX,
    QUERY_MARKER,
    TINY,
    SyntheticShape,
    backbone_config,
    build_tokenizer,
    effective_ff_dim,
    load_sample_texts,
    make_checkpoint,
)
from lfm2edge.runtime.core.vocabulary import bytes_to_unicode

LANGUAGES = ("ar", "de", "en", "es", "fr", "it", "ja", "ko", "no", "pt", "sv")
CHECKPOINTS = ("colbert_checkpoint", "embedding_checkpoint", "causal_colbert_checkpoint")


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(path), framework="pt") as f:
        return {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118 (safe_open is not a dict)


def _config(folder: Path) -> dict:
    return json.loads((folder / "config.json").read_text())


def _all_texts() -> list[dict[str, str]]:
    samples = load_sample_texts()
    return samples["queries"] + samples["documents"]


# --- shapes and arithmetic (notes §1.1, §1.3, §2.2) ---------------------------------------------------------


def test_full_shape_matches_the_real_parameter_count() -> None:
    assert effective_ff_dim(6656, 256) == FULL.ff_dim == 4608
    assert FULL.head_dim == 64
    assert [i for i, t in enumerate(FULL.layer_types) if t == "full_attention"] == [2, 5, 8, 10, 12, 14]
    assert FULL.non_embedding_parameters() == 287_375_104
    assert FULL.vocab_size("colbert") == 64_402 and FULL.vocab_size("embedding") == 65_536
    assert FULL.non_embedding_parameters() + 64_402 * 1024 == 353_322_752  # the ColBERT count MTEB lists
    assert len(FULL.tensor_shapes("colbert")) == 148  # 10 conv x 8 + 6 attention x 11 + 2
    # transformers derives the same width from the config we write (meta device: nothing is allocated).
    config = Lfm2Config(**backbone_config("embedding", FULL))
    with torch.device("meta"):
        mlp = Lfm2MLP(config)
    assert (mlp.w1.out_features, mlp.w2.in_features) == (4608, 4608)


def test_tiny_shape_exercises_the_auto_adjust() -> None:
    assert int(2 * TINY.block_ff_dim / 3) % TINY.block_multiple_of != 0  # the round-up really happens
    assert TINY.ff_dim % TINY.block_multiple_of == 0 and TINY.ff_dim == 192
    assert TINY.head_dim == 16 and TINY.num_attention_heads // TINY.num_key_value_heads == 2
    assert TINY.vocab_size("colbert") == TINY.base_vocab + 2
    assert TINY.vocab_size("embedding") % 128 == 0 and TINY.vocab_size("embedding") >= TINY.base_vocab + 64
    with pytest.raises(ValueError):
        SyntheticShape(64, 2, (5,), 4, 2, 256, 1000, 16)


# --- config.json and the module files (notes §1.1, §1.2) ----------------------------------------------------


@pytest.mark.parametrize("fixture", CHECKPOINTS)
def test_config_loads_in_transformers(fixture: str, request: pytest.FixtureRequest) -> None:
    folder: Path = request.getfixturevalue(fixture)
    raw = _config(folder)
    kind = "embedding" if "embedding" in fixture else "colbert"
    bidirectional = "causal" not in fixture
    assert raw["model_type"] == "lfm2"
    assert raw["architectures"] == (["Lfm2BidirectionalModel"] if bidirectional else ["Lfm2Model"])
    assert ("auto_map" in raw) == bidirectional == (folder / "modeling_lfm2_bidirectional.py").exists()
    if bidirectional:
        assert raw["auto_map"] == {"AutoModel": "modeling_lfm2_bidirectional.Lfm2BidirectionalModel"}
    assert not {"is_causal", "conv_causal", "full_attn_idxs", "rope_parameters"} & raw.keys()
    assert raw["intermediate_size"] == raw["block_ff_dim"] == TINY.block_ff_dim
    assert raw["rope_theta"] == 1e6 and raw["max_position_embeddings"] == 128000
    assert (raw["bos_token_id"], raw["eos_token_id"], raw["pad_token_id"]) == (1, 7, 0)
    assert raw["dtype"] == "bfloat16" and raw["tie_embedding"] is True and raw["use_cache"] is False
    assert raw["block_dim"] == raw["conv_dim"] == raw["hidden_size"] == TINY.hidden_size
    assert raw["vocab_size"] == TINY.vocab_size(kind)

    config = Lfm2Config.from_pretrained(folder)
    assert config.layer_types == TINY.layer_types
    assert config.num_key_value_heads == TINY.num_key_value_heads and config.norm_eps == 1e-5
    assert config.rope_parameters["rope_theta"] == 1e6
    assert Lfm2MLP(config).w1.out_features == TINY.ff_dim


def test_legacy_config_style(tmp_path: Path) -> None:
    folder = make_checkpoint(tmp_path / "legacy", "embedding", config_style="legacy")
    raw = _config(folder)
    assert raw["full_attn_idxs"] == list(TINY.attention_layers)
    assert raw["rope_parameters"] == {"rope_theta": 1e6, "rope_type": "default"}
    assert not {"layer_types", "intermediate_size", "rope_theta"} & raw.keys()
    assert raw["block_ff_dim"] == TINY.block_ff_dim
    config = Lfm2Config.from_pretrained(folder)
    assert config.layer_types == TINY.layer_types
    assert config.intermediate_size == TINY.block_ff_dim
    assert config.rope_parameters["rope_theta"] == 1e6
    assert Lfm2MLP(config).w1.out_features == TINY.ff_dim


def test_embedding_module_files(embedding_checkpoint: Path) -> None:
    folder = embedding_checkpoint
    modules = json.loads((folder / "modules.json").read_text())
    assert [(m["idx"], m["path"], m["type"]) for m in modules] == [
        (0, "", "sentence_transformers.models.Transformer"),
        (1, "1_Pooling", "sentence_transformers.models.Pooling"),
    ]
    pooling = json.loads((folder / "1_Pooling" / "config.json").read_text())
    assert pooling["word_embedding_dimension"] == TINY.hidden_size
    assert {k for k, v in pooling.items() if k.startswith("pooling_mode_") and v} == {
        "pooling_mode_cls_token"
    }
    st = json.loads((folder / "config_sentence_transformers.json").read_text())
    assert st["prompts"] == {"query": "query: ", "document": "document: "}
    assert st["similarity_fn_name"] == "cosine" and st["default_prompt_name"] is None
    assert json.loads((folder / "sentence_bert_config.json").read_text()) == {
        "max_seq_length": 512,
        "do_lower_case": False,
    }
    assert not (folder / "1_Dense").exists()


def test_colbert_module_files(colbert_checkpoint: Path) -> None:
    folder = colbert_checkpoint
    modules = json.loads((folder / "modules.json").read_text())
    assert [(m["idx"], m["path"], m["type"]) for m in modules] == [
        (0, "", "sentence_transformers.models.Transformer"),
        (1, "1_Dense", "pylate.models.Dense.Dense"),
    ]
    dense = json.loads((folder / "1_Dense" / "config.json").read_text())
    assert dense == {
        "in_features": TINY.hidden_size,
        "out_features": TINY.dense_out,
        "bias": False,
        "activation_function": "torch.nn.modules.linear.Identity",
        "use_residual": False,
    }
    weights = _tensors(folder / "1_Dense" / "model.safetensors")
    assert {n: tuple(t.shape) for n, t in weights.items()} == {
        "linear.weight": (TINY.dense_out, TINY.hidden_size)
    }
    st = json.loads((folder / "config_sentence_transformers.json").read_text())
    assert (st["query_prefix"], st["document_prefix"]) == ("[Q] ", "[D] ")
    assert (st["query_length"], st["document_length"]) == (32, 512)
    assert st["attend_to_expansion_tokens"] is False and st["do_query_expansion"] is True
    assert st["skiplist_words"] == list(string.punctuation)
    assert (st["similarity_fn_name"], st["prompts"], st["model_type"]) == ("MaxSim", {}, "ColBERT")
    assert not (folder / "1_Pooling").exists()


# --- model.safetensors (notes §1.3) -------------------------------------------------------------------------


def _expected_backbone(shape: SyntheticShape, vocab: int) -> dict[str, tuple[int, ...]]:
    """Written out independently of SyntheticShape.tensor_shapes, from the table in notes §1.3."""
    h, f, d = shape.hidden_size, shape.ff_dim, shape.head_dim
    want = {"embed_tokens.weight": (vocab, h), "embedding_norm.weight": (h,)}
    for i in range(shape.num_hidden_layers):
        p = f"layers.{i}."
        want |= {p + "operator_norm.weight": (h,), p + "ffn_norm.weight": (h,)}
        want |= {p + "feed_forward.w1.weight": (f, h), p + "feed_forward.w3.weight": (f, h)}
        want[p + "feed_forward.w2.weight"] = (h, f)
        if i in shape.attention_layers:
            a = p + "self_attn."
            want |= {a + "q_proj.weight": (shape.num_attention_heads * d, h), a + "out_proj.weight": (h, h)}
            want |= {a + "k_proj.weight": (shape.num_key_value_heads * d, h)}
            want |= {a + "v_proj.weight": (shape.num_key_value_heads * d, h)}
            want |= {a + "q_layernorm.weight": (d,), a + "k_layernorm.weight": (d,)}
        else:
            c = p + "conv."
            want |= {
                c + "in_proj.weight": (3 * h, h),
                c + "conv.weight": (h, 1, 3),
                c + "out_proj.weight": (h, h),
            }
    return want


@pytest.mark.parametrize("fixture", CHECKPOINTS)
def test_safetensors_names_and_shapes(fixture: str, request: pytest.FixtureRequest) -> None:
    folder: Path = request.getfixturevalue(fixture)
    weights = _tensors(folder / "model.safetensors")
    vocab = _config(folder)["vocab_size"]
    assert {n: tuple(t.shape) for n, t in weights.items()} == _expected_backbone(TINY, vocab)
    assert all(t.dtype == torch.float32 for t in weights.values())
    assert not any(n.startswith("model.") or "bias" in n or "lm_head" in n for n in weights)


def test_model_prefix_variant_and_dtype(tmp_path: Path, colbert_checkpoint: Path) -> None:
    plain = _tensors(colbert_checkpoint / "model.safetensors")
    folder = make_checkpoint(tmp_path / "prefixed", "colbert", model_prefix=True, dtype=torch.bfloat16)
    prefixed = _tensors(folder / "model.safetensors")
    assert all(n.startswith("model.") for n in prefixed)
    assert {n.removeprefix("model.") for n in prefixed} == set(plain)
    # Same seed, same values: only the name prefix and the dtype differ.
    for name, tensor in plain.items():
        assert prefixed["model." + name].dtype == torch.bfloat16
        assert torch.equal(prefixed["model." + name], tensor.to(torch.bfloat16)), name
    dense = _tensors(folder / "1_Dense" / "model.safetensors")["linear.weight"]
    assert dense.dtype == torch.bfloat16
    other = _tensors(make_checkpoint(tmp_path / "seed1", "colbert", seed=1) / "model.safetensors")
    assert not torch.equal(other["embed_tokens.weight"], plain["embed_tokens.weight"])


# --- the weights expose porting bugs (notes §2) -------------------------------------------------------------


def _forward(
    sd: dict[str, torch.Tensor],
    ids: list[int],
    shape: SyntheticShape = TINY,
    *,
    conv: str = "centred",
    causal: bool = False,
    norm_offset: float = 0.0,
) -> torch.Tensor:
    """Final hidden states [L, H] of one unpadded sequence (notes §2.1-2.3).

    ``conv`` is "centred" (correct), "causal" or "mirrored"; ``causal`` adds a causal attention mask;
    ``norm_offset=1`` is the ``1 + w`` bug.
    """
    n, h_dim, d = len(ids), shape.hidden_size, shape.head_dim
    nh, nkv = shape.num_attention_heads, shape.num_key_value_heads

    def rms(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return (w + norm_offset) * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5))

    angles = torch.arange(n, dtype=torch.float64)[:, None] * 1e6 ** (-torch.arange(0, d, 2) / d)[None]
    cos = torch.cat([angles.cos()] * 2, -1).float()[:, None]
    sin = torch.cat([angles.sin()] * 2, -1).float()[:, None]

    def rope(x: torch.Tensor) -> torch.Tensor:
        return x * cos + torch.cat([-x[..., d // 2 :], x[..., : d // 2]], -1) * sin

    h = sd["embed_tokens.weight"][torch.tensor(ids)]
    for i in range(shape.num_hidden_layers):
        p = f"layers.{i}."
        x = rms(h, sd[p + "operator_norm.weight"])
        if i in shape.attention_layers:
            a = p + "self_attn."
            q = rope(rms((x @ sd[a + "q_proj.weight"].T).view(n, nh, d), sd[a + "q_layernorm.weight"]))
            k = rope(rms((x @ sd[a + "k_proj.weight"].T).view(n, nkv, d), sd[a + "k_layernorm.weight"]))
            v = (x @ sd[a + "v_proj.weight"].T).view(n, nkv, d)
            k, v = k.repeat_interleave(nh // nkv, dim=1), v.repeat_interleave(nh // nkv, dim=1)
            scores = torch.einsum("qhd,khd->hqk", q, k) / d**0.5
            if causal:
                scores = scores.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), float("-inf"))
            attended = torch.einsum("hqk,khd->qhd", scores.softmax(-1), v).reshape(n, nh * d)
            mixed = attended @ sd[a + "out_proj.weight"].T
        else:
            c = p + "conv."
            b, gate, xt = (x @ sd[c + "in_proj.weight"].T).chunk(3, dim=-1)
            u = b * xt
            w = sd[c + "conv.weight"][:, 0, :]
            if conv == "mirrored":
                w = w.flip(-1)
            left = 2 if conv == "causal" else 1
            padded = torch.cat([u.new_zeros(left, h_dim), u, u.new_zeros(2 - left, h_dim)])
            z = sum(w[:, j] * padded[j : j + n] for j in range(3))
            mixed = (gate * z) @ sd[c + "out_proj.weight"].T
        h = h + mixed
        f = p + "feed_forward."
        y = rms(h, sd[p + "ffn_norm.weight"])
        h = h + (F.silu(y @ sd[f + "w1.weight"].T) * (y @ sd[f + "w3.weight"].T)) @ sd[f + "w2.weight"].T
    return rms(h, sd["embedding_norm.weight"])


def test_weights_load_into_transformers(causal_colbert_checkpoint: Path) -> None:
    """The causal v1 layout is exactly transformers' Lfm2Model; this also validates _forward."""
    model, info = Lfm2Model.from_pretrained(
        causal_colbert_checkpoint, dtype=torch.float32, output_loading_info=True
    )
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs")), (
        info
    )
    tok = AutoTokenizer.from_pretrained(causal_colbert_checkpoint)
    ids = tok("Night trains are coming back across Europe.")["input_ids"]
    with torch.inference_mode():
        want = model.eval()(input_ids=torch.tensor([ids])).last_hidden_state[0]
    sd = _tensors(causal_colbert_checkpoint / "model.safetensors")
    got = _forward(sd, ids, conv="causal", causal=True)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert torch.isfinite(want).all() and 0.3 < want.std() < 10


def _cosine_matrix(x: torch.Tensor) -> torch.Tensor:
    x = F.normalize(x, dim=-1)
    return x @ x.T


def test_outputs_vary_and_porting_bugs_show(embedding_checkpoint: Path, colbert_checkpoint: Path) -> None:
    tok = AutoTokenizer.from_pretrained(embedding_checkpoint)
    sd = _tensors(embedding_checkpoint / "model.safetensors")
    samples = load_sample_texts()["documents"]
    texts = [next(e["text"] for e in samples if e["lang"] == lang) for lang in LANGUAGES]
    with torch.inference_mode():
        outputs = [_forward(sd, tok(t)["input_ids"]) for t in texts]
        cls = torch.stack([o[0] for o in outputs])
        # No collapse: the CLS (BOS) vector depends clearly on the text.
        off_diagonal = _cosine_matrix(cls)[~torch.eye(len(texts), dtype=torch.bool)]
        assert off_diagonal.max() < 0.9, off_diagonal.max()

        # Each typical bug moves the CLS vector a long way (cosine to the correct one well below 1).
        ids = tok(texts[2])["input_ids"]
        right = outputs[2][0]
        for bug in ({"conv": "causal"}, {"conv": "mirrored"}, {"causal": True}, {"norm_offset": 1.0}):
            wrong = _forward(sd, ids, **bug)[0]
            assert F.cosine_similarity(right, wrong, dim=0) < 0.95, bug

        # ColBERT: per-token Dense vectors differ between tokens and between texts.
        ctok = AutoTokenizer.from_pretrained(colbert_checkpoint)
        csd = _tensors(colbert_checkpoint / "model.safetensors")
        dense = _tensors(colbert_checkpoint / "1_Dense" / "model.safetensors")["linear.weight"]
        vectors = F.normalize(_forward(csd, ctok(texts[2])["input_ids"]) @ dense.T, dim=-1)
        token_cos = _cosine_matrix(vectors)[~torch.eye(len(vectors), dtype=torch.bool)]
        assert token_cos.abs().mean() < 0.5 and token_cos.max() < 0.99


# --- tokenizer (notes §4) -----------------------------------------------------------------------------------


def test_tokenizer_id_layout(embedding_checkpoint: Path) -> None:
    tok = AutoTokenizer.from_pretrained(embedding_checkpoint)
    assert len(tok) == TINY.base_vocab
    assert tok.convert_ids_to_tokens(list(range(14))) == list(LFM2_SPECIAL_TOKENS)
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (1, 7, 0)
    assert set(tok.added_tokens_decoder) == set(range(14))
    assert all(t.special for t in tok.added_tokens_decoder.values())
    assert tok.convert_ids_to_tokens([14, 509]) == ["<|reserved_4|>", "<|reserved_499|>"]
    byte_chars = list(bytes_to_unicode().values())
    assert tok.convert_ids_to_tokens(list(range(510, 766))) == byte_chars
    assert tok.convert_tokens_to_ids(["!", "~", "A", "a"]) == [510, 603, 65 + 477, 97 + 477]
    for char in string.printable[:94]:  # printable ASCII without whitespace: id = code point + 477
        assert tok.convert_tokens_to_ids(char) == ord(char) + 477
    # PyLate's skiplist matches standalone punctuation tokens by id (notes §3.2).
    skip_ids = sorted(tok.convert_tokens_to_ids(list(string.punctuation)))
    ranges = [*range(510, 525), *range(535, 542), *range(568, 574), *range(600, 604)]
    assert skip_ids == ranges
    assert tok("!")["input_ids"] == [1, 510]

    raw = json.loads((embedding_checkpoint / "tokenizer.json").read_text())
    assert raw["model"]["type"] == "BPE" and raw["model"]["ignore_merges"] is True
    assert raw["model"]["byte_fallback"] is False
    assert len(raw["model"]["merges"]) > 100  # merges exist and follow the bytes
    assert min(raw["model"]["vocab"][a + b] for a, b in raw["model"]["merges"]) == 766
    config = json.loads((embedding_checkpoint / "tokenizer_config.json").read_text())
    assert (config["bos_token"], config["eos_token"], config["pad_token"]) == (
        "<|startoftext|>",
        "<|im_end|>",
        "<|pad|>",
    )
    assert config["add_bos_token"] is True and config["add_eos_token"] is False
    assert config["tokenizer_class"] == "PreTrainedTokenizerFast"
    special_map = json.loads((embedding_checkpoint / "special_tokens_map.json").read_text())
    assert special_map["bos_token"]["content"] == "<|startoftext|>"


def test_tokenizer_adds_bos_only_and_round_trips(embedding_checkpoint: Path) -> None:
    tok = AutoTokenizer.from_pretrained(embedding_checkpoint)
    entries = _all_texts()
    for lang in LANGUAGES:
        texts = [e["text"] for e in entries if e["lang"] == lang]
        assert len(texts) >= 6
        for text in texts:
            ids = tok(text)["input_ids"]
            assert ids[0] == 1 and 1 not in ids[1:] and ids[-1] != 7
            assert tok.decode(ids[1:]) == text
            assert tok.decode(ids, skip_special_tokens=True) == text
            assert max(ids) < TINY.base_vocab
    for entry in entries:  # edge cases too (special tokens in the text stay special on the HF side)
        ids = tok(entry["text"])["input_ids"]
        assert tok.decode(ids[1:]) == entry["text"]
    assert tok("")["input_ids"] == [1]
    assert tok("a", "b")["input_ids"][0] == 1


def test_pre_tokenizer_is_the_llama3_split(embedding_checkpoint: Path) -> None:
    """The HF pre-tokenizer splits exactly like the Llama-3 regex that llama.cpp's ``lfm2`` pre-type uses."""
    tok = AutoTokenizer.from_pretrained(embedding_checkpoint)
    pattern = regex.compile(LLAMA3_SPLIT_REGEX)
    byte_map = bytes_to_unicode()
    for entry in _all_texts():
        text = entry["text"]
        want = ["".join(byte_map[b] for b in piece.encode()) for piece in pattern.findall(text)]
        got = [piece for piece, _ in tok.backend_tokenizer.pre_tokenizer.pre_tokenize_str(text)]
        assert got == want, text


def _vocab_only_gguf(folder: Path, out: Path) -> None:
    """A tokenizer-only GGUF written the way upstream's converter writes the vocabulary (notes §4, §5.2)."""
    gguf = pytest.importorskip("gguf")
    tok = AutoTokenizer.from_pretrained(folder)
    config, raw = _config(folder), json.loads((folder / "tokenizer.json").read_text())
    by_id = {i: t for t, i in tok.get_vocab().items()}
    added = tok.added_tokens_decoder
    tokens, types = [], []
    for i in range(config["vocab_size"]):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
            continue
        tokens.append(by_id[i])
        if i not in added:
            types.append(gguf.TokenType.NORMAL)
        else:
            types.append(gguf.TokenType.CONTROL if added[i].special else gguf.TokenType.USER_DEFINED)
    w = gguf.GGUFWriter(str(out), "lfm2")
    w.add_block_count(config["num_hidden_layers"])
    w.add_context_length(config["max_position_embeddings"])
    w.add_embedding_length(config["hidden_size"])
    w.add_feed_forward_length(TINY.ff_dim)
    w.add_head_count(config["num_attention_heads"])
    w.add_head_count_kv([TINY.num_key_value_heads if t != "conv" else 0 for t in config["layer_types"]])
    w.add_rope_freq_base(1e6)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(config["vocab_size"])
    w.add_shortconv_l_cache(3)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("lfm2")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges([" ".join(m) for m in raw["model"]["merges"]])
    w.add_bos_token_id(1)
    w.add_eos_token_id(7)
    w.add_pad_token_id(0)
    w.add_add_bos_token(True)
    w.add_add_eos_token(False)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_llama_cpp_tokenizes_like_transformers(colbert_checkpoint: Path, tmp_path: Path) -> None:
    """llama.cpp's ``lfm2`` pre-type (Llama-3 regex, ignore_merges, add BOS) gives the HF ids on every sample."""
    llama_cpp = pytest.importorskip("llama_cpp")
    out = tmp_path / "vocab.gguf"
    _vocab_only_gguf(colbert_checkpoint, out)
    llm = llama_cpp.Llama(str(out), vocab_only=True, verbose=False)
    hf = AutoTokenizer.from_pretrained(colbert_checkpoint)
    extra = [
        "I'M SURE",
        "x [Q] y",
        "[D] z",
        "<|reserved_4|>",
        "<filler_999>",
        "12345678",
        " \t\n x",
        "a\u00a0b",
    ]
    for text in [e["text"] for e in _all_texts()] + extra:
        want = hf(text)["input_ids"]
        # HF matches special added tokens in raw text, llama.cpp only with special parsing on (notes §4).
        assert llm.tokenize(text.encode(), add_bos=True, special=True) == want, text
        if "<|" not in text:
            assert llm.tokenize(text.encode(), add_bos=True, special=False) == want, text


def test_colbert_markers(colbert_checkpoint: Path, embedding_checkpoint: Path) -> None:
    tok = AutoTokenizer.from_pretrained(colbert_checkpoint)
    base = TINY.base_vocab
    assert len(tok) == base + 2
    assert tok.convert_tokens_to_ids([QUERY_MARKER, DOCUMENT_MARKER]) == [base, base + 1]
    assert {i: (t.content, t.special) for i, t in tok.added_tokens_decoder.items() if i >= base} == {
        base: ("[Q] ", False),
        base + 1: ("[D] ", False),
    }
    assert tok("[Q] bees")["input_ids"][:2] == [1, base]  # one token that consumes its space
    assert tok("[Q] bees")["input_ids"][2:] == tok("bees")["input_ids"][1:]
    assert tok.pad_token == "<|im_end|>"  # as PyLate saves it
    plain = AutoTokenizer.from_pretrained(embedding_checkpoint)
    assert QUERY_MARKER not in plain.get_vocab() and DOCUMENT_MARKER not in plain.get_vocab()
    assert base not in plain("[Q] bees")["input_ids"]


def test_full_vocabulary_tokenizer(tmp_path: Path) -> None:
    build_tokenizer(tmp_path, FULL.base_vocab, colbert=True)
    tok = AutoTokenizer.from_pretrained(tmp_path)
    assert len(tok) == 64_402
    assert tok.convert_tokens_to_ids(["[Q] ", "[D] "]) == [64_400, 64_401]
    assert tok.convert_ids_to_tokens([1, 510, 64_399]) == ["<|startoftext|>", "!", "<filler_64399>"]
    text = "Fillers are unreachable: <filler_64399> stays in pieces."
    ids = tok(text)["input_ids"]
    assert max(ids) < 64_400 and tok.decode(ids[1:]) == text


# --- the verification sample --------------------------------------------------------------------------------


def test_sample_texts_cover_languages_and_edge_cases(embedding_checkpoint: Path) -> None:
    samples = load_sample_texts()
    for key in ("queries", "documents"):
        langs = [e["lang"] for e in samples[key]]
        assert all(langs.count(lang) >= 3 for lang in LANGUAGES), key
        assert set(langs) == {*LANGUAGES, "mixed"}
    texts = [e["text"] for e in _all_texts()]
    assert "?!..." in texts
    assert any("<|im_end|>" in t for t in texts) and any("[Q] " in t for t in texts)
    assert any("[D] " in t for t in texts)
    assert any(t != t.strip() for t in texts) and any("    " in t for t in texts)
    assert any(regex.search(r"\p{Extended_Pictographic}", t) for t in texts)
    assert any(regex.search(r"\p{Latin}", t) and regex.search(r"\p{Han}", t) for t in texts)
    # Long enough for ANY tokenizer with this split: every regex piece is at least one token.
    pieces = regex.compile(LLAMA3_SPLIT_REGEX)
    assert max(len(pieces.findall(e["text"])) for e in samples["documents"]) > 600
    assert max(len(pieces.findall(e["text"])) for e in samples["queries"]) > 40
    tok = AutoTokenizer.from_pretrained(embedding_checkpoint)
    assert max(len(tok(e["text"])["input_ids"]) for e in samples["documents"]) > 600
