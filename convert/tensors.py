"""HF LFM2 tensor names to GGUF names, and the type each tensor gets.

Names come from gguf's own table for LFM2 (``gguf.get_tensor_name_map``), the one upstream's
converter uses, so stock llama.cpp loads our files as it loads the official ones (tests/test_convert.py
checks the names, shapes and types against upstream's converter). Types follow upstream's rules,
except in a q8_0_mixed file, whose most sensitive parts stay bf16.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Sequence

import numpy as np
from gguf import (
    MODEL_ARCH,
    MODEL_TENSOR,
    TENSOR_NAMES,
    GGMLQuantizationType,
    TensorNameMap,
    get_tensor_name_map,
)

from lfm2edge.runtime.core.errors import InvalidInputError

# ColBERT's 1_Dense projection (linear.weight [out, H] in its own file), where upstream puts it.
DENSE_TENSOR = TENSOR_NAMES[MODEL_TENSOR.DENSE_2_OUT] + ".weight"

DIRECT_TYPES: dict[str, GGMLQuantizationType] = {
    name: GGMLQuantizationType[name.upper()] for name in ("f32", "f16", "bf16", "q8_0")
}

# Parts, which a q8_0_mixed file keeps in bf16 or not (mixing.py), are named by their tensors' GGUF
# names: token_embd, blk.<i>, dense_2.
EMBEDDING_PART = TENSOR_NAMES[MODEL_TENSOR.TOKEN_EMBD]
DENSE_PART = DENSE_TENSOR.split(".")[0]
_BLOCK = re.compile(r"blk\.(\d+)\.")


def part_of(tensor_name: str) -> str:
    """The part a GGUF tensor belongs to: ``blk.<i>`` for a block's tensors, else the name's first field."""
    block = _BLOCK.match(tensor_name)
    return f"blk.{block.group(1)}" if block else tensor_name.split(".")[0]


def parts_of(n_layers: int, colbert: bool) -> tuple[str, ...]:
    """Every part a model's matmul weights fall in, in file order."""
    return (EMBEDDING_PART, *(f"blk.{i}" for i in range(n_layers)), *((DENSE_PART,) if colbert else ()))


def check_parts(parts: Sequence[str], n_layers: int, colbert: bool) -> tuple[str, ...]:
    """``parts`` in file order, each checked; an unknown name raises and lists the valid ones."""
    valid = parts_of(n_layers, colbert)
    unknown = [p for p in parts if p not in valid]
    if unknown:
        raise InvalidInputError(
            f"unknown part(s) to keep in bf16: {', '.join(map(repr, unknown))}; this model has "
            f"{EMBEDDING_PART}, blk.0 ... blk.{n_layers - 1}" + (f" and {DENSE_PART}" if colbert else "")
        )
    return tuple(p for p in valid if p in set(parts))


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


def tensor_type(
    name: str, shape: tuple[int, ...], outtype: GGMLQuantizationType, bf16_parts: frozenset[str] = frozenset()
) -> GGMLQuantizationType:
    """Norms, 1-D tensors and the conv kernel stay F32 in every type; the rest take the file's type.

    A q8_0 tensor whose rows do not split into 32-value blocks falls back to F16, as upstream's does.
    A q8_0 tensor in one of ``bf16_parts`` (``token_embd``, ``blk.<i>``, ``dense_2``) is BF16 (mixing.py).
    """
    if len(shape) <= 1 or name.endswith("_norm.weight") or is_conv_kernel(name):
        return GGMLQuantizationType.F32
    if outtype is GGMLQuantizationType.Q8_0 and part_of(name) in bf16_parts:
        return GGMLQuantizationType.BF16
    if outtype is GGMLQuantizationType.Q8_0 and shape[-1] % 32 != 0:
        return GGMLQuantizationType.F16
    return outtype
