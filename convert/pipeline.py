"""``convert()``: a checkpoint (folder or hub id) to a GGUF of the requested type."""

from __future__ import annotations

import os
from pathlib import Path

from lfm2edge.convert.checkpoint import Checkpoint, resolve
from lfm2edge.convert.quantize import LLAMA_QUANT_TYPES, quantize_file
from lfm2edge.convert.tensors import DIRECT_TYPES
from lfm2edge.convert.writer import write_gguf
from lfm2edge.runtime.errors import InvalidInputError

OUTTYPES = tuple(DIRECT_TYPES) + tuple(LLAMA_QUANT_TYPES)


def convert(
    model: str | Path | Checkpoint,
    outfile: str | Path,
    outtype: str = "f16",
    revision: str | None = None,
    progress: bool = False,
    n_threads: int | None = None,
) -> Path:
    """Convert ``model`` to ``outfile``; f32/f16/bf16/q8_0 directly, the rest via llama.cpp's quantizer."""
    outtype = outtype.lower()
    if outtype not in OUTTYPES:
        raise InvalidInputError(f"unknown --outtype {outtype!r}; choose one of {', '.join(OUTTYPES)}")
    outfile = Path(outfile)
    if not outfile.parent.is_dir():
        raise InvalidInputError(f"the output folder {outfile.parent} does not exist")
    ckpt = model if isinstance(model, Checkpoint) else resolve(model, revision)
    settings = ckpt.retrieval_settings(ckpt.load_tokenizer())
    if outtype in DIRECT_TYPES:
        return write_gguf(ckpt, outfile, DIRECT_TYPES[outtype], settings, progress=progress)
    f32 = outfile.with_name(f".{outfile.name}.f32-{os.getpid()}")
    try:
        write_gguf(ckpt, f32, DIRECT_TYPES["f32"], settings, progress=progress)
        return quantize_file(f32, outfile, outtype, n_threads)
    finally:
        f32.unlink(missing_ok=True)
