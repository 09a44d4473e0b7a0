"""Write a Checkpoint as a GGUF file: upstream's keys and tensors, plus our retrieval settings.

Tensors stream one at a time (peak memory near the largest tensor), and the file is
written under a temporary name and renamed at the end, so a failure never leaves a
half-written GGUF under the final name.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import gguf
import numpy as np

from lfm2edge.convert.checkpoint import Checkpoint
from lfm2edge.convert.tensors import DENSE_TENSOR, gguf_name, prepare, tensor_type
from lfm2edge.convert.vocab import load_vocab, write_vocab
from lfm2edge.runtime.core.architecture import GGUF_ARCH
from lfm2edge.runtime.core.errors import CheckpointError
from lfm2edge.runtime.core.gguf_file import GGUFType
from lfm2edge.runtime.core.llama_keys import Dims
from lfm2edge.runtime.core.settings import SETTINGS_BY_KEY, Key, RetrievalSettings, to_metadata

ARCHITECTURE_KEY = Key.ARCHITECTURE  # the HF architecture the file came from
FILE_TYPES = {
    gguf.GGMLQuantizationType.F32: gguf.LlamaFileType.ALL_F32,
    gguf.GGMLQuantizationType.F16: gguf.LlamaFileType.MOSTLY_F16,
    gguf.GGMLQuantizationType.BF16: gguf.LlamaFileType.MOSTLY_BF16,
    gguf.GGMLQuantizationType.Q8_0: gguf.LlamaFileType.MOSTLY_Q8_0,
}


def write_model_metadata(w: gguf.GGUFWriter, ckpt: Checkpoint, outtype: gguf.GGMLQuantizationType) -> None:
    """The keys llama.cpp reads, as upstream's converter writes them (convert_hf_to_gguf.py's LFM2 model)."""
    cfg = ckpt.config
    w.add_type(gguf.GGUFType.MODEL)
    w.add_name(ckpt.source.split("@")[0].split("/")[-1] or ckpt.path.name)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.ff_dim)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.kv_heads_per_layer())
    w.add_rope_freq_base(cfg.rope_theta)
    w.add_layer_norm_rms_eps(cfg.norm_eps)
    w.add_vocab_size(cfg.vocab_size)
    w.add_shortconv_l_cache(cfg.conv_l_cache)
    if not cfg.causal:
        w.add_causal_attention(False)
    if ckpt.pooling_type is not None:
        w.add_pooling_type(gguf.PoolingType(ckpt.pooling_type))
    dense_out = ckpt.dense_out
    if dense_out is not None:
        w.add_embedding_length_out(dense_out)
    w.add_file_type(FILE_TYPES[outtype])
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)  # upstream writes it for every type


def write_settings(w: gguf.GGUFWriter, settings: RetrievalSettings, architecture: str) -> None:
    """Our retrieval settings under the lfm2edge. namespace, each with its type from ``settings.SETTINGS``."""
    for key, value in (to_metadata(settings) | {ARCHITECTURE_KEY: architecture}).items():
        gguf_type = SETTINGS_BY_KEY[key].gguf_type
        if gguf_type is GGUFType.ARRAY:
            if len(value):  # type: ignore[arg-type]  # an empty array is not written: absent means empty
                items = [int(v) for v in value]  # type: ignore[attr-defined]
                w.add_key_value(key, items, gguf.GGUFValueType.ARRAY, gguf.GGUFValueType.INT32)
        else:
            w.add_key_value(key, value, gguf.GGUFValueType(int(gguf_type)))


def _encode(array: np.ndarray, qtype: gguf.GGMLQuantizationType) -> np.ndarray:
    if qtype is gguf.GGMLQuantizationType.F32:
        return np.ascontiguousarray(array, dtype=np.float32)
    if qtype is gguf.GGMLQuantizationType.F16:
        return np.ascontiguousarray(array, dtype=np.float16)
    return gguf.quants.quantize(np.ascontiguousarray(array, dtype=np.float32), qtype)


def _nbytes(shape: tuple[int, ...], qtype: gguf.GGMLQuantizationType) -> int:
    block, type_size = gguf.GGML_QUANT_SIZES[qtype]
    return int(np.prod(shape)) // block * type_size


def _tensor_plan(ckpt: Checkpoint, outtype: gguf.GGMLQuantizationType, bf16_parts: frozenset[str]):
    """(gguf name, numpy shape, type) per tensor, in upstream's order, from shapes alone.

    Every shape must be what config.json says (the shapes llama.cpp will expect), so a
    checkpoint whose tensors and config disagree is refused before anything is written.
    """
    plan = []
    n_layers = ckpt.config.num_hidden_layers
    for hf_name, shape in ckpt.tensor_shapes().items():
        name = gguf_name(hf_name, n_layers)
        if name is None:
            raise CheckpointError(
                f"unexpected tensor {hf_name!r} in {ckpt.path}: not a tensor of an LFM2 model of "
                f"{n_layers} layers (config.json num_hidden_layers); is this an LFM2 checkpoint?"
            )
        if name.endswith(".shortconv.conv.weight"):
            if len(shape) != 3 or shape[1] != 1:
                raise CheckpointError(f"{ckpt.path}: {hf_name} has shape {list(shape)}; a depthwise conv is [H, 1, K]")
            shape = (shape[0], shape[-1])
        plan.append((hf_name, name, shape))
    if ckpt.dense_path.exists():
        plan.append(("linear.weight", DENSE_TENSOR, (ckpt.dense_out, ckpt.config.hidden_size)))
    _check_shapes(ckpt, {name: (hf, shape) for hf, name, shape in plan})
    return [(hf, name, shape, tensor_type(name, shape, outtype, bf16_parts)) for hf, name, shape in plan]


def _check_shapes(ckpt: Checkpoint, planned: dict[str, tuple[str, tuple[int, ...]]]) -> None:
    cfg = ckpt.config
    dims = Dims(
        n_layer=cfg.num_hidden_layers, n_embd=cfg.hidden_size, n_ff=cfg.ff_dim, n_head=cfg.num_attention_heads,
        head_dim=cfg.head_dim, n_head_kv=tuple(cfg.kv_heads_per_layer()), l_cache=cfg.conv_l_cache,
        n_vocab=cfg.vocab_size, n_embd_out=ckpt.dense_out,
    )
    expected = dims.tensors()
    where = f"{ckpt.path} (config.json and the safetensors files disagree)"
    for name, (hf_name, _) in planned.items():
        if name not in expected:
            raise CheckpointError(
                f"{where}: {hf_name} is not part of the model config.json describes "
                f"(num_hidden_layers = {cfg.num_hidden_layers}, layer_types)"
            )
    for name, (shape, required, _) in expected.items():
        if name not in planned:
            if required:
                raise CheckpointError(f"{where}: tensor {name} (GGUF name) is missing")
            continue
        hf_name, numpy_shape = planned[name]
        if tuple(reversed(numpy_shape)) != shape:  # ggml lists dimensions innermost first
            raise CheckpointError(
                f"{where}: {hf_name} has shape {list(numpy_shape)}, config.json implies {list(reversed(shape))}"
            )


def write_gguf(
    ckpt: Checkpoint,
    outfile: Path,
    outtype: gguf.GGMLQuantizationType,
    settings: RetrievalSettings,
    progress: bool = False,
    bf16_parts: Sequence[str] = (),
) -> Path:
    """Write ``ckpt`` to ``outfile`` (atomically), with a progress bar on stderr when asked.

    ``bf16_parts`` (q8_0 only) names the parts whose matmul weights stay bf16 (mixing.py)."""
    outfile = Path(outfile)
    tmp = outfile.with_name(f".{outfile.name}.partial-{os.getpid()}")
    plan = _tensor_plan(ckpt, outtype, frozenset(bf16_parts))
    vocab = load_vocab(ckpt.path, ckpt.config.vocab_size)
    w = gguf.GGUFWriter(tmp, GGUF_ARCH)
    try:
        write_model_metadata(w, ckpt, outtype)
        write_vocab(w, vocab)
        write_settings(w, settings, ckpt.config.architecture)
        for _, name, shape, qtype in plan:
            w.add_tensor_info(name, shape, np.dtype(np.float32), _nbytes(shape, qtype), raw_dtype=qtype)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        by_name = {hf: (name, qtype) for hf, name, _, qtype in plan}
        total = sum(_nbytes(shape, qtype) for _, _, shape, qtype in plan)
        with _bar(progress, total, outfile.name) as bar:
            for hf_name, array in _stream(ckpt):
                name, qtype = by_name[hf_name]
                data = _encode(prepare(name, array), qtype)
                w.write_tensor_data(data)
                bar.update(data.nbytes)
        w.close()
        os.replace(tmp, outfile)
    except BaseException:
        w.close()
        tmp.unlink(missing_ok=True)
        raise
    return outfile


def _bar(enabled: bool, total: int, name: str):
    from tqdm import tqdm

    return tqdm(total=total, desc=f"writing {name}", unit="B", unit_scale=True, disable=not enabled)


def _stream(ckpt: Checkpoint):
    yield from ckpt.iter_tensors()
    dense = ckpt.dense_weight()
    if dense is not None:
        yield "linear.weight", dense
