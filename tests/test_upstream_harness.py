"""Smoke test of tests/upstream.py: upstream llama.cpp's converter on tiny retriever checkpoints.

Each conversion is a subprocess that imports torch and transformers (about 3 s); the two f32
files are made once per session and shared by every test here.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from gguf import GGMLQuantizationType, GGUFReader
from safetensors import safe_open

try:
    from tests.upstream import convert_with_upstream, upstream_converter_dir
except ImportError:  # tests/ is not a package: pytest put it on sys.path
    from upstream import convert_with_upstream, upstream_converter_dir

from lfm2edge.convert.synthetic import make_checkpoint

pytestmark = pytest.mark.upstream

KINDS = ("colbert", "embedding")


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("upstream-ckpt")
    out = {}
    for kind in KINDS:
        out[kind] = root / kind
        make_checkpoint(out[kind], kind=kind, seed=0, bidirectional=True)
    return out


@pytest.fixture(scope="session")
def upstream_f32(tiny_checkpoints, tmp_path_factory) -> dict[str, GGUFReader]:
    """Upstream's f32 GGUF of each tiny checkpoint; the conversion time goes to the report."""
    upstream_converter_dir()  # the one-off extraction is not part of a conversion's time
    root = tmp_path_factory.mktemp("upstream-gguf")
    readers = {}
    for kind, ckpt in tiny_checkpoints.items():
        start = time.perf_counter()
        path = convert_with_upstream(ckpt, root / f"{kind}-f32.gguf", "f32")
        print(f"upstream f32 conversion of tiny {kind}: {time.perf_counter() - start:.1f} s")
        readers[kind] = GGUFReader(path)
    return readers


def _value(reader: GGUFReader, key: str):
    field = reader.get_field(key)
    assert field is not None, f"{key} missing"
    return field.contents()


def _config(ckpt: Path) -> dict:
    return json.loads((ckpt / "config.json").read_text())


def _conv_layers(config: dict) -> list[int]:
    if "layer_types" in config:
        return [i for i, lt in enumerate(config["layer_types"]) if lt == "conv"]
    return [i for i in range(config["num_hidden_layers"]) if i not in config["full_attn_idxs"]]


def test_converter_extracted_once_and_whole():
    first = upstream_converter_dir()
    assert upstream_converter_dir() == first
    for rel in ("convert_hf_to_gguf.py", "conversion/lfm2.py", "conversion/base.py", "gguf-py/gguf/__init__.py"):
        assert (first / rel).is_file(), rel


@pytest.mark.parametrize("kind", KINDS)
def test_common_metadata(upstream_f32, tiny_checkpoints, kind):
    reader, config = upstream_f32[kind], _config(tiny_checkpoints[kind])
    assert _value(reader, "general.architecture") == "lfm2"
    assert _value(reader, "lfm2.attention.causal") is False
    assert _value(reader, "general.file_type") == 0  # ALL_F32
    assert _value(reader, "lfm2.embedding_length") == config["hidden_size"]
    assert _value(reader, "lfm2.vocab_size") == config["vocab_size"]
    assert _value(reader, "tokenizer.ggml.model") == "gpt2"
    assert _value(reader, "tokenizer.ggml.pre") == "lfm2"  # the wrapper's override took effect
    assert len(_value(reader, "tokenizer.ggml.tokens")) == config["vocab_size"]


def test_embedding_pooling(upstream_f32):
    reader = upstream_f32["embedding"]
    assert _value(reader, "lfm2.pooling_type") == 2  # CLS
    assert reader.get_field("lfm2.embedding_length_out") is None
    assert "dense_2.weight" not in {t.name for t in reader.tensors}


def test_colbert_dense_head(upstream_f32, tiny_checkpoints):
    reader, ckpt = upstream_f32["colbert"], tiny_checkpoints["colbert"]
    with safe_open(ckpt / "1_Dense" / "model.safetensors", framework="numpy") as f:
        out_dim, in_dim = f.get_slice("linear.weight").get_shape()
    assert _value(reader, "lfm2.embedding_length_out") == out_dim
    assert reader.get_field("lfm2.pooling_type") is None
    dense = {t.name: t for t in reader.tensors}["dense_2.weight"]
    assert [int(n) for n in dense.shape] == [in_dim, out_dim]
    assert dense.tensor_type == GGMLQuantizationType.F32


@pytest.mark.parametrize("kind", KINDS)
def test_conv_kernels_f32(upstream_f32, tiny_checkpoints, kind):
    reader, config = upstream_f32[kind], _config(tiny_checkpoints[kind])
    hidden = config["hidden_size"]
    kernels = {t.name: t for t in reader.tensors if t.name.endswith(".shortconv.conv.weight")}
    assert sorted(kernels) == sorted(f"blk.{i}.shortconv.conv.weight" for i in _conv_layers(config))
    for name, t in kernels.items():
        assert t.tensor_type == GGMLQuantizationType.F32, name
        assert [int(n) for n in t.shape] == [config.get("conv_L_cache", 3), hidden], name


def test_embedding_placeholder_tokens(upstream_f32, tiny_checkpoints):
    """Rows past the tokenizer get upstream's placeholders: text [PAD<id>], type UNUSED (5)."""
    reader, ckpt = upstream_f32["embedding"], tiny_checkpoints["embedding"]
    tok = json.loads((ckpt / "tokenizer.json").read_text())
    known = max([*tok["model"]["vocab"].values(), *(t["id"] for t in tok["added_tokens"])]) + 1
    tokens = _value(reader, "tokenizer.ggml.tokens")
    types = _value(reader, "tokenizer.ggml.token_type")
    assert known < len(tokens), "the tiny Embedding checkpoint should pad its table past the tokenizer"
    assert tokens[known:] == [f"[PAD{i}]" for i in range(known, len(tokens))]
    assert set(types[known:]) == {5}
