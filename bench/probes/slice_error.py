"""How far a matmul through int8 slices lands from float64, against an f32 GEMM (bench/PROFILE.md, "Why the
ozaki tiles wait"): which slicings could replace ozaki_f32's four 7-bit slices and ten products and still be
nearer float64 than f32.

    python bench/probes/slice_error.py

A slicing writes x = s (q0 + q1 2^-b + q2 2^-2b + ...) per weight column / activation row, s a power of two.
"round" slices (b = 7, as patch 0014) take the nearest integer at each step, so every slice is in
[-127, 127]; "floor" slices (b = 8) take the integer below, so the first is in [-128, 127] and the rest in
[0, 255] (unsigned: AMX has TDPBSUD/TDPBUUD for them) and what is cut off is always >= 0. The product keeps the
slice pairs (i, j) with i + j <= limit, summed exactly (float64 holds these integer sums exactly here).
Printed: the relative Frobenius error against the float64 product of the same f32 operands.
"""

from __future__ import annotations

import numpy as np

K, N, M = 1024, 512, 32  # one of the model's 1024-wide matmuls, a query's rows


def slices(x: np.ndarray, axis: int, count: int, rounding: str) -> tuple[np.ndarray, list[np.ndarray], int]:
    """(scale, slices, bits per slice) of ``x`` along ``axis``."""
    amax = np.max(np.abs(x), axis=axis, keepdims=True).astype(np.float64)
    scale = np.ldexp(1.0, np.frexp(amax)[1] - 7)  # max |x| / scale in [64, 128)
    bits, step = (7, np.rint) if rounding == "round" else (8, np.floor)
    if rounding == "round":
        scale = np.where(amax / scale > 127, 2 * scale, scale)  # max |x| / scale in [63.5, 127]
    rest, out = x.astype(np.float64) / scale, []
    for _ in range(count):
        q = step(rest)
        out.append(q)
        rest = (rest - q) * 2.0**bits
    return scale, out, bits


def sliced_product(a, w, limit: int) -> np.ndarray:
    (sa, qa, bits), (sw, qw, _) = a, w
    total = sum(
        (qa[i] @ qw[j]) * 2.0 ** (-bits * (i + j)) for i in range(len(qa)) for j in range(len(qw)) if i + j <= limit
    )
    return (total * sa * sw).astype(np.float32)  # rounded to float once, as the kernel does


def main() -> None:
    rng = np.random.default_rng(0)
    weights = (rng.standard_normal((K, N)) * 0.02).astype(np.float32)
    activations = (rng.standard_normal((M, K)) * rng.uniform(0.1, 3.0, (M, 1))).astype(np.float32)
    truth = activations.astype(np.float64) @ weights.astype(np.float64)

    def error(y: np.ndarray) -> float:
        return float(np.linalg.norm(y.astype(np.float64) - truth) / np.linalg.norm(truth))

    print(f"f32 GEMM (numpy)                               {error(activations @ weights):.1e}")
    rows = [
        ("round", 4, 4, 3, "ozaki_f32 (patch 0014): 10 products, 4 B/weight"),
        ("round", 4, 3, 3, "3 weight slices: 9 products, 3 B/weight"),
        ("round", 4, 4, 2, "pairs i + j <= 2: 6 products"),
        ("floor", 3, 3, 4, "8-bit digits, 3 x 3: 9 products, 3 B/weight"),
        ("floor", 4, 4, 3, "8-bit digits, 4 x 4, i + j <= 3: 10 products"),
        ("floor", 4, 4, 2, "8-bit digits, 4 x 4, i + j <= 2: 6 products"),
    ]
    for rounding, na, nw, limit, what in rows:
        a = slices(activations, 1, na, rounding)
        w = slices(weights, 0, nw, rounding)
        print(f"{what:46s} {error(sliced_product(a, w, limit)):.1e}")


if __name__ == "__main__":
    main()
