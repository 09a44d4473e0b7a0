"""Declarative map from HF LFM2 tensor names to GGUF names, and the type each tensor gets.

Names and types follow upstream's converter exactly (notes §1.3), so stock llama.cpp loads
our files as it loads the official ones.
"""

from __future__ import annotations

import re

import numpy as np
from gguf import GGMLQuantizationType

# HF name (without "model.", layer index as {i}) -> GGUF name.
BACKBONE_TENSORS: dict[str, str] = {
    "embed_tokens.weight": "token_embd.weight",
    # upstream writes the final norm under this odd name and loads it as the output norm
    "embedding_norm.weight": "token_embd_norm.weight",
    "layers.{i}.operator_norm.weight": "blk.{i}.attn_norm.weight",
    "layers.{i}.ffn_norm.weight": "blk.{i}.ffn_norm.weight",
    "layers.{i}.feed_forward.w1.weight": "blk.{i}.ffn_gate.weight",
    "layers.{i}.feed_forward.w2.weight": "blk.{i}.ffn_down.weight",
    "layers.{i}.feed_forward.w3.weight": "blk.{i}.ffn_up.weight",
    "layers.{i}.conv.in_proj.weight": "blk.{i}.shortconv.in_proj.weight",
    "layers.{i}.conv.conv.weight": "blk.{i}.shortconv.conv.weight",
    "layers.{i}.conv.out_proj.weight": "blk.{i}.shortconv.out_proj.weight",
    "layers.{i}.self_attn.q_proj.weight": "blk.{i}.attn_q.weight",
    "layers.{i}.self_attn.k_proj.weight": "blk.{i}.attn_k.weight",
    "layers.{i}.self_attn.v_proj.weight": "blk.{i}.attn_v.weight",
    "layers.{i}.self_attn.out_proj.weight": "blk.{i}.attn_output.weight",
    "layers.{i}.self_attn.q_layernorm.weight": "blk.{i}.attn_q_norm.weight",
    "layers.{i}.self_attn.k_layernorm.weight": "blk.{i}.attn_k_norm.weight",
}
# ColBERT's 1_Dense projection: linear.weight [out, H].
DENSE_TENSOR = "dense_2.weight"

_PATTERNS = [
    (re.compile("^" + re.escape(hf).replace(r"\{i\}", r"(\d+)") + "$"), gguf) for hf, gguf in BACKBONE_TENSORS.items()
]

DIRECT_TYPES: dict[str, GGMLQuantizationType] = {
    "f32": GGMLQuantizationType.F32,
    "f16": GGMLQuantizationType.F16,
    "bf16": GGMLQuantizationType.BF16,
    "q8_0": GGMLQuantizationType.Q8_0,
}


def gguf_name(hf_name: str) -> str:
    """The GGUF name of a backbone tensor; KeyError names the tensor we do not know."""
    for pattern, target in _PATTERNS:
        m = pattern.match(hf_name)
        if m:
            return target.format(i=m.group(1)) if m.groups() else target
    raise KeyError(hf_name)


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
