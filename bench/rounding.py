"""How much fidelity the weights' rounding alone costs: the PyTorch reference in fp32 arithmetic with every
Linear weight rounded to bf16 or f16, per-token cosine against the unrounded model.

    python -m lfm2edge.bench.rounding CHECKPOINT [--threads N]

Separates a format's weight error from its activation error (bench/PROFILE.md, "What stands in the way").
"""

from __future__ import annotations

import argparse

import numpy as np

QUERY = "how do I reset the password on my laptop when the screen stays black after an update"
DOCUMENT = " ".join(["the quick brown fox jumps over the lazy dog and keeps running through the forest"] * 6)


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(axis=-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))


def measure(checkpoint, threads: int | None = None) -> dict[str, dict[str, np.ndarray]]:
    """Per-token cosines {weight type: {"query"|"document": [tokens]}} against the unrounded model."""
    import torch

    from lfm2edge.convert.reference import ReferenceEncoder

    ref = ReferenceEncoder.from_checkpoint(checkpoint, threads=threads)

    def encode() -> dict[str, np.ndarray]:
        return {
            "query": np.atleast_2d(ref.encode_query(QUERY)),
            "document": np.atleast_2d(ref.encode_document(DOCUMENT)),
        }

    base = encode()
    # the backbone's Linear layers: every projection but ColBERT's small output Dense
    linears = [m for m in ref.model.backbone.modules() if isinstance(m, torch.nn.Linear)]
    originals = [m.weight.data.clone() for m in linears]
    out = {}
    try:
        for name, dtype in (("bf16", torch.bfloat16), ("f16", torch.float16)):
            for m, w in zip(linears, originals, strict=True):
                m.weight.data = w.to(dtype).float()
            out[name] = {k: _cosines(v, base[k]) for k, v in encode().items()}
    finally:
        for m, w in zip(linears, originals, strict=True):
            m.weight.data = w
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m lfm2edge.bench.rounding", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("checkpoint", help="checkpoint folder or hub id")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    for name, parts in measure(args.checkpoint, args.threads).items():
        text = " | ".join(f"{k} min {c.min():.5f} mean {c.mean():.5f}" for k, c in parts.items())
        print(f"weights rounded to {name}, fp32 arithmetic: {text}", flush=True)


if __name__ == "__main__":
    main()
