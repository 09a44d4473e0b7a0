"""HF LFM2 tensor names to GGUF names, and the type each tensor gets.

Names come from gguf's own table for LFM2 (``gguf.get_tensor_name_map``), the one upstream's
converter uses, so stock llama.cpp loads our files as it loads the official ones (tests/test_convert.py
checks the names, shapes and types against upstream's converter). Types follow upstream's rules.
"""

from __future__ import annotations

import functools

import numpy as np
from gguf import (
    MODEL_ARCH,
    MODEL_TENSOR,
    TENSOR_NAMES,
    GGMLQuantizationType,
    TensorNameMap,
    get_tensor_name_map,
)

# ColBERT's 1_Dense projection (linear.weight [out, H] in its own file), where upstream puts it.
DENSE_TENSOR = TENSOR_NAMES[MODEL_TENSOR.DENSE_2_OUT] + ".weight"

DIRECT_TYPES: dict[str, GGMLQuantizationType] = {
    name: GGMLQuantizationType[name.upper()] for name in ("f32", "f16", "bf16", "q8_0")
}


@functools.cache
def _name_map(n_blocks: int) -> TensorNameMap:
    return get_tensor_name_map(MODEL_ARCH.LFM2, n_blocks)


def gguf_name(hf_name: str, n_blocks: int) -> str | None:
    """The GGUF name of a backbone tensor, given without its ``model.`` prefix, of a model with
    ``n_blocks`` layers; None for a name LFM2 does not have (or a layer past ``n_blocks``)."""
    # gguf's table holds the names as transformers' Lfm2Model spells them, "model." included.
    return _name_map(n_blocks).get_name(f"model.{hf_name}", try_suffixes=(".weight", ".bias"))


def is_conv_kernel(name: str) -> bool:
    return name.endswith(".shortconv.conv.weight")


def prepare(name: str, array: np.ndarray) -> np.ndarray:
    """Reshape as upstream does: the depthwise conv kernel [H, 1, K] is squeezed to [H, K]."""
    if is_conv_kernel(name):
        return array.reshape(array.shape[0], array.shape[-1])
    return array


def tensor_type(name: str, shape: tuple[int, ...], outtype: GGMLQuantizationType) -> GGMLQuantizationType:
    """Norms, 1-D tensors and the conv kernel stay F32 in every type; the rest take the file's type.

    A q8_0 tensor whose rows do not split into 32-value blocks falls back to F16, as upstream's does.
    """
    if len(shape) <= 1 or name.endswith("_norm.weight") or is_conv_kernel(name):
        return GGMLQuantizationType.F32
    if outtype is GGMLQuantizationType.Q8_0 and shape[-1] % 32 != 0:
        return GGMLQuantizationType.F16
    return outtype
