"""The quantization ladder below q8_0, through llama.cpp's own quantizer (llama_model_quantize).

We write f32 ourselves and let llama.cpp quantize it: its k-quant mixes are what users get
from the official files, it keeps every metadata key (our settings included), and it never
quantizes the conv kernel or the norms.
"""

from __future__ import annotations

import ctypes
import os
from pathlib import Path

from gguf import LlamaFileType

from lfm2edge.runtime.core.errors import ConversionError, InvalidInputError

# outtype -> llama_ftype, named by gguf. IQ types are left out: they need an importance matrix.
LLAMA_QUANT_TYPES: dict[str, int] = {
    name: int(LlamaFileType[f"MOSTLY_{name.upper()}"])
    for name in (
        "q4_0", "q4_1", "q5_0", "q5_1", "q2_k", "q3_k_s", "q3_k_m", "q3_k_l", "q4_k_s", "q4_k_m", "q5_k_s",
        "q5_k_m", "q6_k",
    )
}


def quantize_file(src: Path, dst: Path, outtype: str, n_threads: int | None = None) -> Path:
    """Quantize the GGUF ``src`` into ``dst`` (atomically) with llama.cpp's quantizer."""
    if outtype not in LLAMA_QUANT_TYPES:
        raise InvalidInputError(f"unknown quantization type {outtype!r}; choose one of {', '.join(LLAMA_QUANT_TYPES)}")
    import llama_cpp as ll

    from lfm2edge.runtime.core.cpu import default_threads
    from lfm2edge.runtime.core.llama import init_backend

    init_backend()
    params = ll.llama_model_quantize_default_params()
    params.ftype = LLAMA_QUANT_TYPES[outtype]
    params.nthread = n_threads or default_threads()
    tmp = dst.with_name(f".{dst.name}.partial-{os.getpid()}")
    try:
        rc = ll.llama_model_quantize(str(src).encode(), str(tmp).encode(), ctypes.byref(params))
        if rc != 0:
            raise ConversionError(f"llama.cpp's quantizer failed ({rc}) turning {src} into {outtype}")
        os.replace(tmp, dst)
    finally:
        tmp.unlink(missing_ok=True)
    return dst
