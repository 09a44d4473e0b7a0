"""bench.rounding: the weight-rounding diagnostic of bench/PROFILE.md."""

from __future__ import annotations

from lfm2edge.bench.rounding import measure


def test_f16_weights_cost_less_than_bf16(colbert_checkpoint):
    result = measure(colbert_checkpoint, threads=1)
    assert set(result) == {"bf16", "f16"}
    for parts in result.values():
        assert set(parts) == {"query", "document"}
        for cos in parts.values():
            assert len(cos) > 1 and (cos <= 1 + 1e-5).all()
    # f16 keeps 3 more mantissa bits than bf16: its error is smaller on every part
    for part in ("query", "document"):
        assert result["f16"][part].mean() > result["bf16"][part].mean()
        assert result["f16"][part].min() > 0.999
