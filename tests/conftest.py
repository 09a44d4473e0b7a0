"""Shared fixtures: tiny random checkpoints in the real layout, built once per test session."""

from __future__ import annotations

from pathlib import Path

import pytest

from lfm2edge.convert.synthetic import make_checkpoint


@pytest.fixture(scope="session")
def colbert_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """TINY LFM2.5-ColBERT-350M layout: bidirectional, current config style, float32, seed 0."""
    return make_checkpoint(tmp_path_factory.mktemp("synthetic") / "colbert", "colbert")


@pytest.fixture(scope="session")
def embedding_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """TINY LFM2.5-Embedding-350M layout: bidirectional, current config style, float32, seed 0."""
    return make_checkpoint(tmp_path_factory.mktemp("synthetic") / "embedding", "embedding")


@pytest.fixture(scope="session")
def causal_colbert_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """TINY causal LFM2-ColBERT-350M (v1) layout: ``architectures: ["Lfm2Model"]``, no remote code."""
    return make_checkpoint(
        tmp_path_factory.mktemp("synthetic") / "causal_colbert", "colbert", bidirectional=False
    )


def _convert(checkpoint: Path, tmp_path_factory: pytest.TempPathFactory, outtype: str) -> Path:
    from lfm2edge.convert.pipeline import convert

    out = tmp_path_factory.mktemp("gguf") / f"{checkpoint.name}-{outtype}.gguf"
    return convert(checkpoint, out, outtype)


@pytest.fixture(scope="session")
def colbert_gguf(colbert_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny ColBERT checkpoint converted by lfm2edge at f32."""
    return _convert(colbert_checkpoint, tmp_path_factory, "f32")


@pytest.fixture(scope="session")
def embedding_gguf(embedding_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny Embedding checkpoint converted by lfm2edge at f32."""
    return _convert(embedding_checkpoint, tmp_path_factory, "f32")


@pytest.fixture(scope="session")
def colbert_encoder(colbert_gguf: Path):
    import lfm2edge

    with lfm2edge.load(colbert_gguf, n_threads=2) as enc:
        yield enc


@pytest.fixture(scope="session")
def embedding_encoder(embedding_gguf: Path):
    import lfm2edge

    with lfm2edge.load(embedding_gguf, n_threads=2) as enc:
        yield enc


@pytest.fixture(scope="session")
def colbert_reference(colbert_checkpoint: Path):
    from lfm2edge.convert.reference import ReferenceEncoder

    return ReferenceEncoder.from_checkpoint(colbert_checkpoint, threads=2)


@pytest.fixture(scope="session")
def embedding_reference(embedding_checkpoint: Path):
    from lfm2edge.convert.reference import ReferenceEncoder

    return ReferenceEncoder.from_checkpoint(embedding_checkpoint, threads=2)


@pytest.fixture(scope="session")
def sample():
    """The built-in multilingual sample: (queries, documents)."""
    from lfm2edge.convert.verify import sample_texts

    return sample_texts()
