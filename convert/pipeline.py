"""``convert()``: a checkpoint (folder or hub id) to a GGUF of the requested type (q8_0_mixed: mixing.py).

The checkpoint is checked as it is read (checkpoint.py), the file is written under a
temporary name, read back and checked as ``lfm2edge.load`` checks it, and only then
published (output.py): convert never leaves a file that load would refuse.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from pathlib import Path

from lfm2edge.convert.checkpoint import Checkpoint, resolve
from lfm2edge.convert.mixing import MIXED, plan_mix
from lfm2edge.convert.output import check_output, publish
from lfm2edge.convert.quantize import LLAMA_QUANT_TYPES, quantize_file
from lfm2edge.convert.tensors import DIRECT_TYPES, check_parts
from lfm2edge.convert.writer import write_gguf
from lfm2edge.runtime.core.errors import ConversionError, InvalidInputError, ModelFileError
from lfm2edge.runtime.core.model_file import describe

OUTTYPES = (*DIRECT_TYPES, MIXED, *LLAMA_QUANT_TYPES)


def convert(
    model: str | Path | Checkpoint,
    outfile: str | Path,
    outtype: str = "f16",
    revision: str | None = None,
    progress: bool = False,
    n_threads: int | None = None,
    force: bool = False,
    bf16_parts: Sequence[str] | str | None = None,
) -> Path:
    """Convert ``model`` to ``outfile``; f32/f16/bf16/q8_0 directly, the rest via llama.cpp's quantizer.

    ``q8_0_mixed`` is q8_0 with the parts in ``bf16_parts`` (``token_embd``, ``blk.<i>``, ``dense_2``) in
    bf16; without them, the parts are measured on the checkpoint (``mixing.plan_mix``, which needs the
    ``reference`` extra). An existing ``outfile`` is replaced only with ``force=True``, and only if it
    is a regular file.
    """
    if not isinstance(outtype, str) or outtype.lower() not in OUTTYPES:
        raise InvalidInputError(f"unknown --outtype {outtype!r}; choose one of {', '.join(OUTTYPES)}")
    outtype = outtype.lower()
    if bf16_parts is not None and outtype != MIXED:
        raise InvalidInputError(f"parts to keep in bf16 go with --outtype {MIXED}, not {outtype}")
    if not isinstance(model, (str, Path, Checkpoint)):
        raise InvalidInputError(f"model must be a checkpoint folder or a hub id, not {type(model).__name__}")
    outfile = Path(outfile)
    check_output(outfile, force)
    ckpt = model if isinstance(model, Checkpoint) else resolve(model, revision)
    settings = ckpt.retrieval_settings(ckpt.load_tokenizer())
    if outtype == MIXED:
        bf16_parts = _mixed_parts(ckpt, bf16_parts, progress, n_threads)
    tmp = outfile.with_name(f".{outfile.name}.partial-{os.getpid()}")
    try:
        if outtype == MIXED:
            write_gguf(ckpt, tmp, DIRECT_TYPES["q8_0"], settings, progress=progress, bf16_parts=bf16_parts)
        elif outtype in DIRECT_TYPES:
            write_gguf(ckpt, tmp, DIRECT_TYPES[outtype], settings, progress=progress)
        else:
            f32 = outfile.with_name(f".{outfile.name}.f32-{os.getpid()}")
            try:
                write_gguf(ckpt, f32, DIRECT_TYPES["f32"], settings, progress=progress)
                quantize_file(f32, tmp, outtype, n_threads)
            finally:
                f32.unlink(missing_ok=True)
        _check_written(tmp, outfile)
        publish(tmp, outfile, force)
    except OSError as e:
        raise ConversionError(
            f"cannot write {outfile}: {e.strerror or e}; check that its folder is writable and has space"
        ) from e
    finally:
        tmp.unlink(missing_ok=True)
    return outfile


def _mixed_parts(
    ckpt: Checkpoint, bf16_parts: Sequence[str] | str | None, progress: bool, n_threads: int | None
) -> tuple[str, ...]:
    """The parts a q8_0_mixed file keeps in bf16: those given, checked, or those measured on ``ckpt``."""
    colbert = ckpt.dense_path.exists()
    if isinstance(bf16_parts, str):  # "token_embd,blk.0", as the command line takes them
        bf16_parts = [p.strip() for p in bf16_parts.split(",") if p.strip()]
    if bf16_parts is not None:
        return check_parts(bf16_parts, ckpt.config.num_hidden_layers, colbert)
    try:
        from lfm2edge.convert.reference import ReferenceEncoder
    except ImportError as e:
        raise InvalidInputError(
            f"{MIXED} measures which parts to keep in bf16 with the PyTorch reference, which is not installed "
            f"({e}): pip install 'lfm2edge[reference]', or name the parts yourself (--bf16-parts)"
        ) from e
    plan = plan_mix(ReferenceEncoder.from_checkpoint(ckpt, threads=n_threads), progress=progress)
    if progress:
        print(plan.describe(), file=sys.stderr)
    return plan.bf16_parts


def _check_written(tmp: Path, outfile: Path) -> None:
    """The written file, read back as ``lfm2edge.load`` reads it, must have no problem."""
    try:
        problems = describe(tmp).problems()
    except ModelFileError as e:
        problems = [str(e)]
    if problems:
        raise ConversionError(
            f"the GGUF written for {outfile} would not load, so it was not kept:\n- " + "\n- ".join(problems)
            + "\nThis is a bug in lfm2edge's converter or a checkpoint it does not check yet: please report it."
        )
