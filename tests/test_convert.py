"""The converter: upstream compatibility, exactness, config variants, quantization, failures."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import gguf
import numpy as np
import pytest

import lfm2edge
from lfm2edge.convert import writer as writer_module
from lfm2edge.convert.checkpoint import Checkpoint, resolve
from lfm2edge.convert.pipeline import convert
from lfm2edge.convert.synthetic import make_checkpoint
from lfm2edge.convert.verify import verify
from lfm2edge.runtime.core.errors import CheckpointError, InvalidInputError
from lfm2edge.runtime.core.model_file import describe
from lfm2edge.runtime.core.settings import NAMESPACE, ModelKind

from .upstream import convert_with_upstream


def read(path: Path) -> tuple[dict[str, object], dict[str, gguf.ReaderTensor]]:
    reader = gguf.GGUFReader(path)
    fields = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    return fields, {t.name: t for t in reader.tensors}


# --- upstream compatibility -------------------------------------------------------------


@pytest.mark.upstream
@pytest.mark.parametrize("kind", ["colbert", "embedding"])
@pytest.mark.parametrize("outtype", ["f32", "f16"])
def test_same_file_as_upstream(kind, outtype, request, tmp_path):
    ckpt = request.getfixturevalue(f"{kind}_checkpoint")
    ours_meta, ours_t = read(convert(ckpt, tmp_path / "ours.gguf", outtype))
    up_meta, up_t = read(convert_with_upstream(ckpt, tmp_path / "upstream.gguf", outtype))

    assert set(ours_t) == set(up_t)
    for name, t in up_t.items():
        mine = ours_t[name]
        assert tuple(mine.shape) == tuple(t.shape), name
        assert mine.tensor_type == t.tensor_type, name
        assert np.array_equal(np.asarray(mine.data).view(np.uint8), np.asarray(t.data).view(np.uint8)), name
    # Every key llama.cpp reads is equal; general.* naming keys are informational only.
    informational = {"general.name", "general.size_label", "general.basename", "general.finetune"}
    for key, value in up_meta.items():
        if key in informational:
            continue
        assert key in ours_meta, key
        assert ours_meta[key] == value, key
    extra = {k for k in ours_meta if k not in up_meta and k not in informational}
    assert extra and all(k.startswith(NAMESPACE) for k in extra), extra


def test_conv_kernels_and_norms_stay_f32(colbert_checkpoint, tmp_path):
    _, tensors = read(convert(colbert_checkpoint, tmp_path / "q8.gguf", "q8_0"))
    for name, t in tensors.items():
        if name.endswith("_norm.weight") or ".shortconv.conv." in name:
            assert t.tensor_type == gguf.GGMLQuantizationType.F32, name
        elif name.endswith(("ffn_up.weight", "attn_q.weight", "dense_2.weight")):
            assert t.tensor_type == gguf.GGMLQuantizationType.Q8_0, name


# --- exactness ----------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["colbert", "embedding"])
def test_f32_and_f16_match_the_reference(kind, request, tmp_path):
    ckpt = request.getfixturevalue(f"{kind}_checkpoint")
    reference = request.getfixturevalue(f"{kind}_reference")
    f32 = verify(request.getfixturevalue(f"{kind}_gguf"), reference, n_threads=2)
    assert f32.passed and f32.cosine_min >= 0.99999, f32
    f16 = verify(convert(ckpt, tmp_path / "f16.gguf", "f16"), reference, n_threads=2)
    # ggml rounds activations to f16 inside f16 matmuls: the mean holds 0.9999, single tokens dip lower.
    assert f16.passed and f16.cosine_mean >= 0.9999 and f16.cosine_min >= 0.999, f16


def test_verify_fails_against_another_checkpoint(colbert_gguf, tmp_path):
    other = make_checkpoint(tmp_path / "other", "colbert", seed=1)
    report = verify(colbert_gguf, other, n_threads=2)
    assert not report.passed and report.cosine_mean < 0.9


# --- checkpoint variants -------------------------------------------------------------------


def test_legacy_config_and_prefixed_names_give_the_same_file(tmp_path, colbert_gguf):
    legacy = make_checkpoint(tmp_path / "legacy", "colbert", config_style="legacy", model_prefix=True)
    _, ours = read(convert(legacy, tmp_path / "legacy.gguf", "f32"))
    _, reference = read(colbert_gguf)
    assert set(ours) == set(reference)
    for name in ours:
        assert np.array_equal(np.asarray(ours[name].data), np.asarray(reference[name].data)), name


def test_causal_backbone_converts_as_causal(causal_colbert_checkpoint, tmp_path):
    from lfm2edge.convert.reference import ReferenceEncoder

    path = convert(causal_colbert_checkpoint, tmp_path / "v1.gguf", "f32")
    meta, _ = read(path)
    assert "lfm2.attention.causal" not in meta  # llama.cpp's default: causal, conv included
    mf = describe(path)
    assert mf.causal and mf.problems() == []
    ref = ReferenceEncoder.from_checkpoint(causal_colbert_checkpoint)
    with lfm2edge.load(path, query_expansion="none") as enc:
        text = "a causal model still encodes"
        ours, theirs = enc.encode_document(text), ref.encode_document(text)
        assert ours.shape == theirs.shape
        assert (ours * theirs).sum(axis=1).min() >= 0.9999


def test_settings_are_written_into_the_file(colbert_gguf, embedding_gguf, colbert_checkpoint):
    colbert = describe(colbert_gguf)
    assert colbert.has_own_settings and colbert.kind is ModelKind.LATE_INTERACTION
    expected = Checkpoint(colbert_checkpoint)
    s = colbert.settings
    assert s == expected.retrieval_settings(expected.load_tokenizer())
    assert (s.query_length, s.document_length, s.query_prefix) == (32, 512, "[Q] ")
    assert s.skiplist_ids == tuple(range(510, 525)) + tuple(range(535, 542)) + tuple(range(568, 574)) + tuple(
        range(600, 604)
    )
    dense = describe(embedding_gguf).settings
    assert dense.kind is ModelKind.DENSE and dense.query_prefix == "query: " and dense.skiplist_ids == ()


def test_missing_document_length_keeps_512(tmp_path):
    ckpt = make_checkpoint(tmp_path / "c", "colbert")
    cfg_path = ckpt / "config_sentence_transformers.json"
    cfg = json.loads(cfg_path.read_text())
    del cfg["document_length"]
    cfg_path.write_text(json.dumps(cfg))
    assert Checkpoint(ckpt).retrieval_settings().document_length == 512  # never PyLate's generic 180


# --- quantization ladder ---------------------------------------------------------------


@pytest.mark.parametrize("outtype", ["bf16", "q8_0", "q4_k_m"])
def test_quantized_files_keep_settings_and_load(outtype, colbert_checkpoint, colbert_reference, tmp_path):
    path = convert(colbert_checkpoint, tmp_path / f"{outtype}.gguf", outtype)
    mf = describe(path)
    assert mf.has_own_settings and mf.problems() == []
    for t in mf.header.tensors:
        if t.name.endswith("_norm.weight") or ".shortconv.conv." in t.name:
            assert t.type_name == "F32", t.name
    report = verify(path, colbert_reference, n_threads=2)
    assert report.passed, report
    assert not list(tmp_path.glob(".*"))  # no intermediate or partial file left behind


# --- failures -------------------------------------------------------------------------------


def test_failure_mid_write_leaves_no_file(colbert_checkpoint, tmp_path, monkeypatch):
    calls = {"n": 0}
    real = writer_module._encode

    def failing(array, qtype):
        calls["n"] += 1
        if calls["n"] == 5:
            raise RuntimeError("disk full")
        return real(array, qtype)

    monkeypatch.setattr(writer_module, "_encode", failing)
    out = tmp_path / "model.gguf"
    with pytest.raises(RuntimeError, match="disk full"):
        convert(colbert_checkpoint, out, "f16")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "model, message",
    [
        ("./no/such/folder", "neither an existing folder nor a hub id"),
        ("LiquidAI/this-repo-is-not-cached-here", "cannot reach the Hugging Face hub"),
    ],
)
def test_bad_model_argument(model, message, monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(CheckpointError, match=message):
        resolve(model)


def test_file_instead_of_folder_and_missing_files(tmp_path, colbert_checkpoint):
    (tmp_path / "x.gguf").write_bytes(b"GGUF")
    with pytest.raises(CheckpointError, match="is a file"):
        resolve(tmp_path / "x.gguf")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="no config.json"):
        resolve(tmp_path / "empty")
    broken = tmp_path / "broken"
    shutil.copytree(colbert_checkpoint, broken)
    (broken / "tokenizer.json").unlink()
    with pytest.raises(CheckpointError, match="no tokenizer.json"):
        convert(broken, tmp_path / "out.gguf")


def test_not_an_lfm2_checkpoint(tmp_path, colbert_checkpoint):
    other = tmp_path / "llama"
    shutil.copytree(colbert_checkpoint, other)
    cfg = json.loads((other / "config.json").read_text())
    cfg["model_type"] = "llama"
    (other / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="model_type 'llama'"):
        resolve(other)


def test_bad_outtype_and_outfile(colbert_checkpoint, tmp_path):
    with pytest.raises(InvalidInputError, match="unknown --outtype 'q3'"):
        convert(colbert_checkpoint, tmp_path / "x.gguf", "q3")
    with pytest.raises(InvalidInputError, match="does not exist"):
        convert(colbert_checkpoint, tmp_path / "nope" / "x.gguf", "f16")


# --- files that will not work ----------------------------------------------------------------


def _write_minimal(path: Path, arch: str, **keys) -> Path:
    w = gguf.GGUFWriter(path, arch)
    for key, value in keys.items():
        w.add_uint32(key, value)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    w.close()
    return path


def test_problems_are_named(colbert_checkpoint, tmp_path):
    bidir = _write_minimal(tmp_path / "old.gguf", "lfm2-bidir")
    assert "superseded llama.cpp PR #24782" in describe(bidir).problems()[0]

    ckpt = Checkpoint(colbert_checkpoint)
    settings = ckpt.retrieval_settings(ckpt.load_tokenizer())
    as_causal = dataclasses.replace(ckpt.config, causal=True)
    object.__setattr__(ckpt, "config", as_causal)
    causal = writer_module.write_gguf(ckpt, tmp_path / "causal.gguf", gguf.GGMLQuantizationType.F32, settings)
    assert any("converted as causal" in p for p in describe(causal).problems())

    ckpt = Checkpoint(colbert_checkpoint)
    ckpt.dense_path = tmp_path / "missing.safetensors"
    no_head = writer_module.write_gguf(ckpt, tmp_path / "nohead.gguf", gguf.GGMLQuantizationType.F32, settings)
    assert any("1_Dense projection" in p for p in describe(no_head).problems())
    with pytest.raises(lfm2edge.ModelFileError, match="1_Dense projection"):
        lfm2edge.load(no_head)

    plain = _write_minimal(tmp_path / "plain.gguf", "lfm2")
    assert any("generative LFM2" in p for p in describe(plain).problems())


def test_not_a_gguf(tmp_path):
    (tmp_path / "x.gguf").write_bytes(b"not a gguf at all")
    with pytest.raises(lfm2edge.ModelFileError, match="not a GGUF file"):
        lfm2edge.load(tmp_path / "x.gguf")
    with pytest.raises(lfm2edge.ModelFileError, match="does not exist"):
        lfm2edge.load(tmp_path / "missing.gguf")
