"""Write a Checkpoint as a GGUF file: upstream's keys and tensors, plus our retrieval settings.

Tensors stream one at a time (peak memory near the largest tensor), and the file is
written under a temporary name and renamed at the end, so a failure never leaves a
half-written GGUF under the final name.
"""

from __future__ import annotations

import os
from pathlib import Path

import gguf
import numpy as np

from lfm2edge.convert.checkpoint import Checkpoint
from lfm2edge.convert.tensors import DENSE_TENSOR, gguf_name, prepare, tensor_type
from lfm2edge.convert.vocab import load_vocab, write_vocab
from lfm2edge.runtime.errors import CheckpointError
from lfm2edge.runtime.settings import NAMESPACE, RetrievalSettings, to_metadata

ARCH = "lfm2"
ARCHITECTURE_KEY = NAMESPACE + "architecture"  # the HF architecture the file came from
FILE_TYPES = {
    gguf.GGMLQuantizationType.F32: gguf.LlamaFileType.ALL_F32,
    gguf.GGMLQuantizationType.F16: gguf.LlamaFileType.MOSTLY_F16,
    gguf.GGMLQuantizationType.BF16: gguf.LlamaFileType.MOSTLY_BF16,
    gguf.GGMLQuantizationType.Q8_0: gguf.LlamaFileType.MOSTLY_Q8_0,
}


def write_model_metadata(w: gguf.GGUFWriter, ckpt: Checkpoint, outtype: gguf.GGMLQuantizationType) -> None:
    """The keys llama.cpp reads, as upstream's converter writes them (notes §5.2)."""
    cfg = ckpt.config
    w.add_type(gguf.GGUFType.MODEL)
    w.add_name(ckpt.path.name if ckpt.source == str(ckpt.path) else ckpt.source.split("@")[0].split("/")[-1])
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
    """Our retrieval settings under the lfm2edge. namespace (runtime/settings.py documents them)."""
    for key, value in to_metadata(settings).items():
        if isinstance(value, np.ndarray):
            if len(value):  # GGUF has no empty arrays; the reader treats absence as empty
                w.add_array(key, [int(v) for v in value])
        elif isinstance(value, bool):
            w.add_bool(key, value)
        elif isinstance(value, int):
            (w.add_int32 if value < 0 or key.endswith("_id") else w.add_uint32)(key, value)
        else:
            w.add_string(key, str(value))
    w.add_string(ARCHITECTURE_KEY, architecture)


def _encode(array: np.ndarray, qtype: gguf.GGMLQuantizationType) -> np.ndarray:
    if qtype is gguf.GGMLQuantizationType.F32:
        return np.ascontiguousarray(array, dtype=np.float32)
    if qtype is gguf.GGMLQuantizationType.F16:
        return np.ascontiguousarray(array, dtype=np.float16)
    return gguf.quants.quantize(np.ascontiguousarray(array, dtype=np.float32), qtype)


def _nbytes(shape: tuple[int, ...], qtype: gguf.GGMLQuantizationType) -> int:
    block, type_size = gguf.GGML_QUANT_SIZES[qtype]
    return int(np.prod(shape)) // block * type_size


def _tensor_plan(ckpt: Checkpoint, outtype: gguf.GGMLQuantizationType):
    """(gguf name, numpy shape, type) per tensor, in upstream's order, from shapes alone."""
    plan = []
    for hf_name, shape in ckpt.tensor_shapes().items():
        try:
            name = gguf_name(hf_name)
        except KeyError as e:
            raise CheckpointError(f"unexpected tensor {hf_name!r} in {ckpt.path}: is this an LFM2 checkpoint?") from e
        if name.endswith(".shortconv.conv.weight"):
            shape = (shape[0], shape[-1])
        plan.append((hf_name, name, shape))
    if ckpt.dense_path.exists():
        plan.append(("linear.weight", DENSE_TENSOR, (ckpt.dense_out, ckpt.config.hidden_size)))
    return [(hf, name, shape, tensor_type(name, shape, outtype)) for hf, name, shape in plan]


def write_gguf(
    ckpt: Checkpoint,
    outfile: Path,
    outtype: gguf.GGMLQuantizationType,
    settings: RetrievalSettings,
    progress: bool = False,
) -> Path:
    """Write ``ckpt`` to ``outfile`` (atomically), with a progress bar on stderr when asked."""
    outfile = Path(outfile)
    tmp = outfile.with_name(f".{outfile.name}.partial-{os.getpid()}")
    plan = _tensor_plan(ckpt, outtype)
    vocab = load_vocab(ckpt.path, ckpt.config.vocab_size)
    w = gguf.GGUFWriter(tmp, ARCH)
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
