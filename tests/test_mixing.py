"""q8_0_mixed: q8_0 files whose most sensitive parts stay bf16, the parts measured on the checkpoint."""

from __future__ import annotations

import numpy as np
import pytest

import lfm2edge
from lfm2edge.convert.mixing import MIXED, plan_mix, simulated
from lfm2edge.convert.pipeline import convert
from lfm2edge.convert.tensors import parts_of
from lfm2edge.runtime.core.errors import InvalidInputError
from lfm2edge.runtime.core.model_file import describe

QUERIES = ["how do bees make honey", "night train from Vienna to Venice", "Wie entsteht ein Vulkan?"]
DOCUMENTS = [
    "Bees collect nectar from flowers and turn it into honey inside the hive by evaporating its water.",
    "The night train leaves Vienna in the evening and reaches Venice early the next morning.",
    "Ein Vulkan entsteht, wenn Magma aus dem Erdinneren an die Oberfläche steigt.",
]


def _types(path) -> dict[str, str]:
    return {t.name: t.type_name for t in describe(path).header.tensors}


def _error(ours: list[np.ndarray], theirs: list[np.ndarray]) -> float:
    a, b = np.concatenate(ours).astype(np.float64), np.concatenate(theirs).astype(np.float64)
    return float(np.mean(1 - (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))))


def _vectors(encoder) -> list[np.ndarray]:
    """ColBERT: one [L, d] array per text; Embedding: the queries' and the documents' [n, H]."""
    q, d = encoder.encode_query(QUERIES), encoder.encode_document(DOCUMENTS)
    return [*q, *d] if isinstance(q, list) else [q, d]


def test_a_mixed_file_keeps_the_named_parts_in_bf16_and_loads(colbert_checkpoint, tmp_path):
    path = convert(colbert_checkpoint, tmp_path / "mixed.gguf", MIXED, bf16_parts=["blk.1", "token_embd"])
    same = convert(colbert_checkpoint, tmp_path / "same.gguf", MIXED, bf16_parts="token_embd, blk.1")
    types = _types(path)
    assert _types(same) == types
    assert types["token_embd.weight"] == "BF16"
    assert {t for n, t in types.items() if n.startswith("blk.1.") and t != "F32"} == {"BF16"}
    for name, kind in types.items():
        if name.startswith(("blk.0.", "blk.2.", "dense_2.")) and kind != "F32":
            assert kind == "Q8_0", name
        if name.endswith("_norm.weight") or ".shortconv.conv." in name:
            assert kind == "F32", name
    assert describe(path).matmul_weight_type == "Q8_0"  # the bulk, not blk.0's
    with lfm2edge.load(path, n_threads=2) as enc:
        assert all(np.isfinite(v).all() for v in _vectors(enc))


def test_parts_are_checked_before_anything_is_written(colbert_checkpoint, tmp_path):
    with pytest.raises(InvalidInputError, match=r"'blk\.99'.*token_embd, blk\.0 \.\.\. blk\.\d+ and dense_2"):
        convert(colbert_checkpoint, tmp_path / "a.gguf", MIXED, bf16_parts=["blk.99"])
    with pytest.raises(InvalidInputError, match="go with --outtype q8_0_mixed, not q8_0"):
        convert(colbert_checkpoint, tmp_path / "b.gguf", "q8_0", bf16_parts=["blk.0"])
    assert not list(tmp_path.iterdir())


def test_the_simulation_rounds_as_the_files_do(colbert_checkpoint, colbert_reference, tmp_path):
    """The error the simulation predicts for all-bf16, all-q8_0 and a mix is the real file's, within 25%."""
    model = colbert_reference.model
    parts = parts_of(len(model.backbone.layers), colbert=True)
    reference = _vectors(colbert_reference)
    cases = {"bf16": set(), "q8_0": set(parts), MIXED: set(parts) - {"token_embd", "blk.0"}}
    for outtype, q8_0_parts in cases.items():
        bf16_parts = ["token_embd", "blk.0"] if outtype == MIXED else None
        path = convert(colbert_checkpoint, tmp_path / f"{outtype}.gguf", outtype, bf16_parts=bf16_parts)
        with lfm2edge.load(path, n_threads=2) as enc:
            real = _error(_vectors(enc), reference)
        with simulated(model, q8_0_parts):
            predicted = _error(_vectors(colbert_reference), reference)
        assert real > 0 and predicted == pytest.approx(real, rel=0.25), outtype
    # and the weights are the checkpoint's again
    assert all(np.array_equal(a, b) for a, b in zip(_vectors(colbert_reference), reference, strict=True))


@pytest.mark.parametrize("kind", ["colbert", "embedding"])
def test_the_plan_keeps_the_fewest_most_sensitive_parts_within_the_budget(kind, request):
    encoder = request.getfixturevalue(f"{kind}_reference")
    model = encoder.model
    parts = parts_of(len(model.backbone.layers), colbert=kind == "colbert")
    strict = plan_mix(encoder, QUERIES, DOCUMENTS, ratio=1.0)
    assert strict.error <= strict.bf16_error < strict.q8_0_error
    # the most sensitive parts, and no fewer: without the last one it added, the mix is over the budget
    reference = _vectors(encoder)
    order = [p for p, _ in strict.sensitivity]
    assert sorted(order) == sorted(parts) and set(strict.bf16_parts) == set(order[: len(strict.bf16_parts)])
    with simulated(model, set(parts) - set(order[: len(strict.bf16_parts) - 1])):
        assert _error(_vectors(encoder), reference) > strict.bf16_error
    loose = plan_mix(encoder, QUERIES, DOCUMENTS, ratio=1e9)
    assert loose.bf16_parts == () and loose.error == loose.q8_0_error
    middle = plan_mix(encoder, QUERIES, DOCUMENTS, ratio=(strict.q8_0_error / strict.bf16_error + 1) / 2)
    assert middle.error <= middle.bf16_error * (strict.q8_0_error / strict.bf16_error + 1) / 2
    assert len(middle.bf16_parts) <= len(strict.bf16_parts)
    with pytest.raises(InvalidInputError, match="at least 1"):
        plan_mix(encoder, QUERIES, DOCUMENTS, ratio=0.5)


def test_convert_measures_the_parts_when_none_are_named(colbert_checkpoint, colbert_reference, tmp_path, capsys):
    path = convert(colbert_checkpoint, tmp_path / "auto.gguf", MIXED, progress=True, n_threads=2)
    plan = plan_mix(colbert_reference)
    assert f"keeps {', '.join(plan.bf16_parts) or 'nothing'} in bf16" in capsys.readouterr().err
    bf16 = {n.split(".")[0] if not n.startswith("blk.") else ".".join(n.split(".")[:2])
            for n, t in _types(path).items() if t == "BF16"}
    assert bf16 == set(plan.bf16_parts)
