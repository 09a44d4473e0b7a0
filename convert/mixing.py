"""``q8_0_mixed``: a q8_0 file whose most sensitive parts stay bf16, chosen by measuring the checkpoint.

Where rounding errors enter a deep network matters: on the full-size random checkpoints an error
made in the token embeddings or the first blocks grows through every later block, and one made in
the last blocks barely shows. So a file that keeps those few parts in bf16 and the rest in q8_0 has
nearly bf16's fidelity at nearly q8_0's speed. Which parts those are depends on the weights, so
they are measured here, on the checkpoint being converted, never assumed.

The measure simulates the file in the PyTorch reference: every matmul weight and the activations
going into it are rounded as llama.cpp rounds them (bf16: round to nearest even; q8_0: blocks of 32
values sharing one scale, max |x| / 127), the rest stays float32, as in llama.cpp. Its error is
the mean 1 - cosine of the output vectors against the float32 reference on a sample of queries and
documents (``verify``'s measure). The parts kept in bf16 are the fewest, most sensitive first, that
bring the mix within ``ERROR_RATIO`` times the all-bf16 file's error.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from lfm2edge.convert.tensors import DENSE_PART, EMBEDDING_PART, parts_of
from lfm2edge.convert.verify import row_cosines, sample_texts
from lfm2edge.runtime.core.errors import InvalidInputError

MIXED = "q8_0_mixed"
# The mix may lose at most this many times what the all-bf16 file loses (mean 1 - cosine).
ERROR_RATIO = 1.5


@dataclass(frozen=True)
class MixPlan:
    """What a ``q8_0_mixed`` file keeps in bf16, and the simulated errors (mean 1 - cosine) it was chosen by."""

    bf16_parts: tuple[str, ...]
    error: float  # the mix
    bf16_error: float  # every part in bf16
    q8_0_error: float  # every part in q8_0
    texts: int
    # (part, error with it alone in q8_0), most sensitive first; empty when all-q8_0 is within the budget
    sensitivity: tuple[tuple[str, float], ...] = ()

    def describe(self) -> str:
        kept = ", ".join(self.bf16_parts) or "nothing"
        return (
            f"q8_0_mixed keeps {kept} in bf16: simulated 1 - cosine {self.error:.3g} "
            f"(all bf16 {self.bf16_error:.3g}, all q8_0 {self.q8_0_error:.3g}; {self.texts} sample texts)"
        )


# --- rounding as llama.cpp rounds ------------------------------------------------------------------


def round_bf16(x):
    return x.to(_torch().bfloat16).to(x.dtype)


def round_q8_0(x):
    """q8_0 along the last dimension: 32 values per block, one scale max |x| / 127 (stored as f16)."""
    torch = _torch()
    shape = x.shape
    if shape[-1] % 32:  # such a tensor is written as f16 (tensors.tensor_type)
        return x.to(torch.float16).to(x.dtype)
    blocks = x.reshape(*shape[:-1], shape[-1] // 32, 32)
    scale = (blocks.abs().amax(dim=-1, keepdim=True) / 127).to(torch.float16).to(x.dtype)
    q = torch.round(blocks / torch.where(scale == 0, torch.ones_like(scale), scale))
    return (q * scale).reshape(shape)


def _torch():
    import torch

    return torch


@contextlib.contextmanager
def simulated(model, q8_0_parts: set[str]) -> Iterator[None]:
    """``model`` (a ReferenceModel) computes as the file would: the parts in ``q8_0_parts`` in q8_0,
    every other part in bf16. Its weights are restored on exit."""
    torch = _torch()
    nn = torch.nn
    backbone = model.backbone

    def rounding(part: str) -> Callable:
        return round_q8_0 if part in q8_0_parts else round_bf16

    saved: list[tuple[object, str, object]] = []
    hooks = []
    try:
        embed = backbone.embed_tokens
        saved.append((embed.weight, "data", embed.weight.data))
        embed.weight.data = rounding(EMBEDDING_PART)(embed.weight.data)  # a lookup: no activations
        for i, layer in enumerate(backbone.layers):
            fn = rounding(f"blk.{i}")
            for module in layer.modules():
                if isinstance(module, nn.Linear):
                    saved.append((module.weight, "data", module.weight.data))
                    module.weight.data = fn(module.weight.data)
                    hooks.append(module.register_forward_pre_hook(lambda _m, args, fn=fn: (fn(args[0]),)))
        if model.dense is not None:
            fn = rounding(DENSE_PART)
            saved.append((model, "dense", model.dense))
            model.dense = fn(model.dense)
            # The projection's input is the final norm's output; nothing else reads it.
            hooks.append(backbone.embedding_norm.register_forward_hook(lambda _m, _a, out, fn=fn: fn(out)))
        yield
    finally:
        for hook in hooks:
            hook.remove()
        for owner, attr, value in reversed(saved):
            setattr(owner, attr, value)


# --- the measure and the choice --------------------------------------------------------------------


def _outputs(encoder, queries: Sequence[str], documents: Sequence[str]) -> list[np.ndarray]:
    q, d = encoder.encode_query(list(queries)), encoder.encode_document(list(documents))
    return [*q, *d] if encoder.is_colbert else [q, d]


def _error(ours: list[np.ndarray], reference: list[np.ndarray]) -> float:
    rows = [np.concatenate([np.atleast_2d(x) for x in side]) for side in (ours, reference)]
    return float(np.mean(1.0 - row_cosines(*rows)))


def calibration_texts() -> tuple[list[str], list[str]]:
    """Every eighth query and fifth document of ``verify``'s multilingual sample (all its languages),
    without its one long document: a pass over them takes a few seconds on two cores."""
    queries, documents = sample_texts()
    return queries[::8], [d for d in documents[::5] if len(d) <= 1000]


def plan_mix(
    encoder,
    queries: Sequence[str] | None = None,
    documents: Sequence[str] | None = None,
    ratio: float = ERROR_RATIO,
    progress: bool = False,
) -> MixPlan:
    """Choose the parts of a ``q8_0_mixed`` file to keep in bf16, on ``encoder`` (a float32 ReferenceEncoder).

    Each part's sensitivity is the error with it alone in q8_0; the most sensitive parts go to bf16 one
    by one until the mix is within ``ratio`` times the all-bf16 error. Passes over the sample: two (all
    bf16, all q8_0), then one per part and one per part kept (24 for the 350M ColBERT here, 8-9 s each on
    two cores).
    """
    from tqdm import tqdm

    if not ratio >= 1.0:
        raise InvalidInputError(f"the error ratio must be at least 1 (bf16's own error), got {ratio}")
    if queries is None or documents is None:
        queries, documents = calibration_texts()
    model = encoder.model
    parts = parts_of(len(model.backbone.layers), model.dense is not None)
    reference = _outputs(encoder, queries, documents)
    bar = tqdm(desc="measuring which parts stay bf16", unit="pass", disable=not progress)

    def error(q8_0_parts: set[str]) -> float:
        with simulated(model, q8_0_parts):
            e = _error(_outputs(encoder, queries, documents), reference)
        bar.update(1)
        return e

    with bar:
        bf16_error, q8_0_error = error(set()), error(set(parts))
        budget = ratio * bf16_error
        kept: list[str] = []
        mixed = q8_0_error
        sensitivity: list[tuple[str, float]] = []
        if mixed > budget:
            sensitivity = sorted(((p, error({p})) for p in parts), key=lambda pe: -pe[1])
            for part, _ in sensitivity:
                kept.append(part)
                mixed = error(set(parts) - set(kept))
                if mixed <= budget:
                    break
    return MixPlan(
        bf16_parts=tuple(p for p in parts if p in kept),
        error=mixed,
        bf16_error=bf16_error,
        q8_0_error=q8_0_error,
        texts=len(queries) + len(documents),
        sensitivity=tuple(sensitivity),
    )
