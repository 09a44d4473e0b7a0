"""A thin layer over llama-cpp-python's low-level API: load a model, tokenize, decode for embeddings.

Never stock ``Llama.embed()``: it strides per-token rows by n_embd instead of n_embd_out and
offsets the second input on wrongly (lfm2edge's patch ``binding/0003`` fixes it for other users).
The rules this module keeps, each one a crash or wrong vectors otherwise:
- ``n_ubatch == n_batch`` and a decode never carries more tokens: a non-causal decode
  larger than n_ubatch aborts the whole process;
- memory is cleared before every decode (KV and positions would carry over);
- the attention type stays UNSPECIFIED, so the GGUF's ``lfm2.attention.causal`` decides
  for attention and the conv together (context-level causality leaves the conv causal);
- the ctypes log callback stays referenced at module level (a collected one segfaults),
  and an eval callback stays referenced by its context for the context's lifetime;
- nothing reaches llama.cpp that it would abort on: a closed model or context raises
  ``EncoderClosedError``, token ids are checked against the vocabulary before a decode, and
  a context is freed before its model (``LlamaModel.close()`` closes its contexts first).
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import sys
import threading
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import llama_cpp as ll
import numpy as np

from lfm2edge.runtime.core.build import BuildInfo, build_info
from lfm2edge.runtime.core.errors import (
    DecodeError,
    EncoderClosedError,
    FeatureUnavailableError,
    InvalidInputError,
    ModelFileError,
)

log = logging.getLogger("lfm2edge.llama")

GGML_LOG_LEVEL_ERROR = 4  # ggml.h's enum ggml_log_level, which the binding does not export
# llama.cpp's limit on sequence ids in one context (LLAMA_MAX_SEQ).
MAX_SEQUENCES = 256

# What llama_decode's return codes mean (llama.h).
_DECODE_CODES = {
    1: "no room in the context for the batch",
    2: "the computation was aborted",
    -1: "the batch was refused as invalid",
}

_backend_lock = threading.Lock()
_backend_ready = False
# Model loads, one at a time: a load with a WeightKernel turns on a process-wide switch of the CPU backend.
_load_lock = threading.Lock()


def _bind_key_mask():
    """llama_set_attn_key_mask from lfm2edge's llama.cpp patch, or None on a stock build.

    Looked up in libllama itself, so any build carrying the patch works, whatever binding
    sits on top of it.
    """
    fn = getattr(ll.llama_cpp._lib, "llama_set_attn_key_mask", None)
    if fn is not None:
        fn.argtypes = [ll.llama_context_p_ctypes, ctypes.POINTER(ctypes.c_int8), ctypes.c_int32]
        fn.restype = None
    return fn


_set_attn_key_mask = _bind_key_mask()


@dataclass(frozen=True)
class WeightKernel:
    """A load option that runs a file's matmul weights on other kernels: a switch of the CPU backend, from one
    of lfm2edge's patches, on while llama.cpp places the weights of that one load. They run on AMX tiles; one
    with a VNNI switch also runs, in the same arithmetic, on AVX512-VNNI CPUs without AMX."""

    option: str  # load()'s argument
    switch: bytes  # the backend function that turns it on
    patch: str  # the patch that adds it (a part of its file name)
    weight_type: str  # the GGUF type of the matmul weights it takes
    what: str  # what it does, for errors
    # Every matmul weight is rewritten into the AMX buffer, so a mapped f32 file would only add its pages to
    # the process (1.4 GB for the 350M models): read it instead.
    read_file: bool = False
    vnni_switch: bytes | None = None  # the same kernel in the CPU repack buffer, where there is no AMX
    vnni_patch: str | None = None

    @property
    def needs(self) -> str:
        return "AMX-BF16 or AVX512-VNNI" if self.vnni_switch else "AMX-BF16"


SPLIT_F32 = WeightKernel("split_f32", b"ggml_backend_amx_set_f32_split", "amx-f32-as-bf16-halves", "F32",
                         "runs f32 weights on AMX-BF16 tiles as two bf16 halves", read_file=True)
DYNAMIC_INT8 = WeightKernel("dynamic_int8", b"ggml_backend_amx_set_bf16_int8", "amx-int8-dynamic", "BF16",
                            "runs bf16 weights as int8 (AMX-INT8 tiles, or AVX512-VNNI)",
                            vnni_switch=b"ggml_backend_repack_set_bf16_int8", vnni_patch="vnni-int8-dynamic")
OZAKI_F32 = WeightKernel("ozaki_f32", b"ggml_backend_amx_set_f32_int8_slices", "amx-f32-as-int8-slices", "F32",
                         "runs f32 weights on AMX-INT8 tiles as four int8 slices", read_file=True)
WEIGHT_KERNELS = (SPLIT_F32, DYNAMIC_INT8, OZAKI_F32)


def weight_kernel_named(option: str) -> WeightKernel:
    """The kernel whose load option is ``option``; InvalidInputError naming the options otherwise."""
    for kernel in WEIGHT_KERNELS:
        if kernel.option == option:
            return kernel
    raise InvalidInputError(
        f"{option!r} is not a weight kernel; the options are "
        + ", ".join(f"{k.option} ({k.weight_type.lower()} files)" for k in WEIGHT_KERNELS)
    )


def weight_kernel_options(option: str | None) -> dict[str, bool]:
    """load()'s keyword for the weight kernel named ``option`` (``--weight-kernel``), or none for None."""
    return {weight_kernel_named(option).option: True} if option else {}


def _switch_symbol(kernel: WeightKernel, info: BuildInfo) -> bytes | None:
    """The backend function that turns ``kernel`` on here: its AMX one (its patch, built with AMX-BF16), else
    its VNNI one (its VNNI patch, AVX512-VNNI and no AMX); None where neither runs."""
    if info.bf16_on_amx and info.has_patch(kernel.patch):
        return kernel.switch
    vnni = kernel.vnni_patch is not None and info.vnni_without_amx and info.has_patch(kernel.vnni_patch)
    return kernel.vnni_switch if vnni else None


def weight_kernel_available(kernel: WeightKernel, info: BuildInfo | None = None) -> bool:
    """Whether this build and CPU run ``kernel``: on AMX-BF16, or on AVX512-VNNI where it has a VNNI kernel."""
    return _switch_symbol(kernel, info or build_info()) is not None


def _bind_switch(symbol: bytes):
    """The CPU backend's function ``symbol``, or None where the loaded backend lacks it. Asked of the backend
    itself (its get_proc_address), so a release build's CPU variant, chosen at run time, answers for itself.
    The ggml functions are looked up through libllama: a wheel's libggml.so is a copy of libggml.so.0, with
    a registry of its own."""
    lib = ll.llama_cpp._lib
    lib.ggml_backend_reg_by_name.argtypes = [ctypes.c_char_p]
    lib.ggml_backend_reg_by_name.restype = ctypes.c_void_p
    lib.ggml_backend_reg_get_proc_address.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
    lib.ggml_backend_reg_get_proc_address.restype = ctypes.c_void_p
    reg = lib.ggml_backend_reg_by_name(b"CPU")
    address = reg and lib.ggml_backend_reg_get_proc_address(reg, symbol)
    return ctypes.CFUNCTYPE(None, ctypes.c_bool)(address) if address else None


def choose_weight_kernel(weight_type: str | None, split_f32: bool = False, dynamic_int8: bool = False,
                         ozaki_f32: bool = False) -> WeightKernel | None:
    """The kernel the load options ask for, checked against the file's matmul weight type (None: the
    file's own kernels); InvalidInputError for more than one, ModelFileError for a file of another type."""
    flags = {SPLIT_F32: split_f32, DYNAMIC_INT8: dynamic_int8, OZAKI_F32: ozaki_f32}
    asked = [k for k, on in flags.items() if on]
    if len(asked) > 1:
        takes = ", ".join(f"{k.option} takes {k.weight_type.lower()} files" for k in WEIGHT_KERNELS)
        raise InvalidInputError(f"{' and '.join(k.option for k in asked)} were asked for together ({takes}); "
                                "pass one of them")
    if not asked:
        return None
    kernel = asked[0]
    if weight_type != kernel.weight_type:
        raise ModelFileError(
            f"{kernel.option} {kernel.what}, and this file's matmul weights are {weight_type or 'of no known type'}; "
            f"convert the checkpoint with `lfm2edge convert --outtype {kernel.weight_type.lower()}`, or load "
            f"without {kernel.option}"
        )
    return kernel


def supports_key_mask() -> bool:
    """Whether this llama.cpp can mask tokens as attention keys (exact PyLate queries)."""
    return _set_attn_key_mask is not None


@ll.llama_log_callback
def _log_callback(level: int, text: bytes, _user: ctypes.c_void_p) -> None:
    message = text.decode("utf-8", errors="replace").rstrip()
    if message:
        log.log(logging.ERROR if level == GGML_LOG_LEVEL_ERROR else logging.DEBUG, message)


def init_backend() -> None:
    """Initialise llama.cpp once per process, its log routed to the ``lfm2edge.llama`` logger."""
    global _backend_ready
    with _backend_lock:
        if not _backend_ready:
            ll.llama_log_set(_log_callback, ctypes.c_void_p(0))
            ll.llama_backend_init()
            _backend_ready = True


class LlamaModel:
    """Model weights and vocabulary, loaded once and shared by the encoder's context.

    ``extra_buffers`` is llama.cpp's ``use_extra_bufts``: whether the CPU backend may place
    weights in its extra buffer types (AMX on x86 CPUs with AMX, the CPU repack buffer), whose
    matmul kernels differ from the plain CPU ones. None lets the build decide (on, except on
    unpatched AMX builds); False forces the plain CPU kernels; True forces them on (an unpatched
    AMX build then crashes on quantized models, llama.cpp #20824). ``self.extra_buffers`` is
    the value in effect. ``weight_kernel`` (``choose_weight_kernel``) runs the matmul weights on
    another AMX kernel of lfm2edge's patches; it needs that patch and the extra buffers.
    """

    def __init__(self, path: Path, n_gpu_layers: int | None = None, extra_buffers: bool | None = None,
                 weight_kernel: WeightKernel | None = None):
        init_backend()
        params = ll.llama_model_default_params()
        if n_gpu_layers is not None:  # None keeps llama.cpp's default: offload where a GPU backend exists
            params.n_gpu_layers = n_gpu_layers
        # Whether layers run on a GPU backend rather than on this process's CPU threads.
        self.offloaded = bool(ll.llama_supports_gpu_offload()) and params.n_gpu_layers != 0
        info = build_info()
        if extra_buffers is not None:
            params.use_extra_bufts = extra_buffers
        elif info.amx and not info.has_patch("amx-tile-config"):
            # Stock ggml's AMX path dies with SIGILL on every quantized model (llama.cpp #20824);
            # lfm2edge's patch fixes it, so only unpatched AMX builds skip the AMX buffers.
            params.use_extra_bufts = False
        self.extra_buffers = bool(params.use_extra_bufts)
        switch = None
        if weight_kernel is not None:
            switch = _switch_for(weight_kernel, info, self.extra_buffers)
        if weight_kernel is not None and weight_kernel.read_file:
            params.load_mode = ll.LLAMA_LOAD_MODE_NONE
        self.weight_kernel = weight_kernel
        self.path = Path(path)
        # Contexts made on this model: closed before the weights they point into are freed.
        self._contexts: weakref.WeakSet[EmbeddingContext] = weakref.WeakSet()
        with _load_lock, _switched_on(switch):
            self._model = ll.llama_model_load_from_file(str(path).encode(), params)
        if not self._model:
            raise ModelFileError(f"llama.cpp could not load {path}; run `lfm2edge inspect {path}` to see why")
        self._vocab = ll.llama_model_get_vocab(self._model)
        self.n_embd = int(ll.llama_model_n_embd(self._model))
        self.n_embd_out = int(ll.llama_model_n_embd_out(self._model))
        self.n_vocab = int(ll.llama_vocab_n_tokens(self._vocab))
        self.bos_id = int(ll.llama_vocab_bos(self._vocab))

    @property
    def closed(self) -> bool:
        return not getattr(self, "_model", None)

    def check_open(self) -> None:
        """EncoderClosedError once closed: llama.cpp would dereference freed memory."""
        if self.closed:
            raise EncoderClosedError(
                f"the model {self.path} was closed; load it again (lfm2edge.load) to keep using it"
            )

    def tokenize(self, text: str, add_bos: bool = True) -> np.ndarray:
        """Token ids as the HF tokenizer gives them: BOS first, special and added tokens matched."""
        self.check_open()
        try:
            raw = text.encode("utf-8")
        except UnicodeEncodeError as e:
            raise InvalidInputError(
                f"the text is not valid Unicode (a lone surrogate at character {e.start}); "
                "decode the source with errors='replace' or remove it"
            ) from None
        capacity = len(raw) + 2
        for _ in range(2):
            buf = (ll.llama_token * capacity)()
            n = ll.llama_tokenize(self._vocab, raw, len(raw), buf, capacity, add_bos, True)
            if n >= 0:
                return np.ctypeslib.as_array(buf)[:n].astype(np.int32)
            capacity = -n
        raise InvalidInputError(f"llama.cpp could not tokenize a text of {len(raw)} bytes")

    def token_text(self, token: int) -> str:
        self.check_open()
        if isinstance(token, bool) or not isinstance(token, (int, np.integer)):
            raise InvalidInputError(f"a token id must be an int, not {type(token).__name__}")
        if not 0 <= token < self.n_vocab:
            raise _out_of_vocabulary(int(token), self.n_vocab)
        return (ll.llama_vocab_get_text(self._vocab, int(token)) or b"").decode("utf-8", errors="replace")

    def close(self) -> None:
        """Free the weights, after every context made on them; idempotent."""
        if self.closed:
            return
        for ctx in list(self._contexts):
            ctx.close()
        model, self._model, self._vocab = self._model, None, None
        ll.llama_model_free(model)

    def __del__(self) -> None:
        _close_unless_exiting(self)


def _switch_for(kernel: WeightKernel, info: BuildInfo, extra_buffers: bool):
    """The kernel's switch, or FeatureUnavailableError naming why it cannot run here."""
    symbol = _switch_symbol(kernel, info)
    switch = _bind_switch(symbol) if symbol else None
    if switch is None:
        raise FeatureUnavailableError(
            f"{kernel.option} {kernel.what}, which this build or CPU lacks ({info.describe()}); load without "
            f"{kernel.option}, or build with `make setup` on a CPU with {kernel.needs}"
        )
    if not extra_buffers:
        raise FeatureUnavailableError(
            f"{kernel.option} places weights in llama.cpp's extra buffers (AMX, or the CPU repack buffer), and "
            "extra_buffers=False turns those buffers off; drop one of the two"
        )
    return switch


@contextlib.contextmanager
def _switched_on(switch):
    """A WeightKernel's switch (None: no switch) on while llama.cpp places this model's weights (``_load_lock``
    keeps other loads out meanwhile); a weight placed in an extra buffer keeps its kernel once it is off."""
    if switch is None:
        yield
        return
    switch(True)
    try:
        yield
    finally:
        switch(False)


def _close_unless_exiting(obj: LlamaModel | EmbeddingContext) -> None:
    """``__del__``: free now, except at interpreter exit, where llama.cpp may be half torn down or a
    daemon thread still inside a decode; the OS takes the memory back then."""
    if sys is None or sys.is_finalizing():
        return
    try:
        obj.close()
    except Exception:  # nothing may escape __del__
        pass


def check_token_ids(tokens: np.ndarray, n_vocab: int) -> None:
    """InvalidInputError for an id outside [0, n_vocab): llama.cpp would read out of bounds or abort."""
    if tokens.size == 0:
        return
    low, high = int(tokens.min()), int(tokens.max())
    if low < 0 or high >= n_vocab:
        raise _out_of_vocabulary(low if low < 0 else high, n_vocab)


def _out_of_vocabulary(token: int, n_vocab: int) -> InvalidInputError:
    return InvalidInputError(
        f"token id {token} is outside this model's vocabulary of {n_vocab} tokens (ids 0 to {n_vocab - 1}); "
        "pass ids from this model's tokenizer, or re-convert a GGUF whose lfm2edge.* marker ids are wrong"
    )


class EmbeddingContext:
    """One llama.cpp context in embedding mode. Not thread-safe: the encoder holds a lock.

    ``exact=True`` keeps K and V in F32 (about 2e-6 relative error per token against the
    reference): with lfm2edge's patch ``llama.cpp/0005`` through flash attention, whose CPU
    kernel then reads them in F32 and gives the same vectors faster; without it, flash
    attention stays off, because stock llama.cpp casts K and V to F16 for it.
    ``exact=False`` uses flash attention with F16 K and V (about 1e-3).

    ``eval_callback`` (profiling, e.g. ``lfm2edge.bench.profile``; None in normal use) becomes
    llama.cpp's ``cb_eval``: called as ``eval_callback(tensor_address, ask)`` for each graph
    node. Answering True to ``ask=True`` makes the scheduler compute that node alone and call
    again with ``ask=False`` once it is done; returning False then stops the decode. It
    slows every decode; the outputs stay the same (bit-identical in tests/test_profile.py).
    """

    def __init__(
        self,
        model: LlamaModel,
        n_batch: int,
        n_seq_max: int,
        n_threads: int,
        exact: bool = True,
        eval_callback: Callable[[int, bool], bool] | None = None,
    ):
        model.check_open()
        self.model = model
        self.n_batch = n_batch
        self.n_seq_max = min(n_seq_max, MAX_SEQUENCES)
        p = ll.llama_context_default_params()
        p.n_ctx = n_batch  # one unified KV cache holds every token of one decode, no more
        p.n_batch = p.n_ubatch = n_batch
        p.n_seq_max = self.n_seq_max
        p.n_threads = p.n_threads_batch = n_threads
        self.n_threads = n_threads
        p.embeddings = True
        p.pooling_type = ll.LLAMA_POOLING_TYPE_UNSPECIFIED  # the GGUF decides (CLS or NONE)
        p.attention_type = ll.LLAMA_ATTENTION_TYPE_UNSPECIFIED  # the GGUF decides, conv included
        p.kv_unified = True
        p.no_perf = True
        if exact:
            p.type_k = p.type_v = ll.GGML_TYPE_F32
            self.flash_attention = build_info().has_patch("flash-attention-f32")
        else:
            self.flash_attention = True
        p.flash_attn_type = (
            ll.LLAMA_FLASH_ATTN_TYPE_ENABLED if self.flash_attention else ll.LLAMA_FLASH_ATTN_TYPE_DISABLED
        )
        self._eval_callback = None
        if eval_callback is not None:
            # Held by the context: llama.cpp calls it on every decode, and a collected ctypes
            # callback segfaults.
            self._eval_callback = ll.ggml_backend_sched_eval_callback(
                lambda tensor, ask, _user: bool(eval_callback(tensor, ask))
            )
            p.cb_eval = self._eval_callback
            p.cb_eval_user_data = None
        self._ctx = ll.llama_init_from_model(model._model, p)
        if not self._ctx:
            raise ModelFileError(
                f"llama.cpp could not create a context of {n_batch} tokens for {model.path} (out of "
                "memory?); lower max_batch_tokens, or run `lfm2edge inspect` on the file"
            )
        model._contexts.add(self)
        self.pooling = int(ll.llama_pooling_type(self._ctx))
        # With lfm2edge's no-memory patch a bidirectional LFM2 context has no KV cache or conv
        # states: one decode computes all its sequences in one micro-batch.
        self.has_memory = bool(ll.llama_get_memory(self._ctx))

    @property
    def closed(self) -> bool:
        return not getattr(self, "_ctx", None)

    def set_threads(self, n_threads: int) -> None:
        """Threads for the following decodes (llama.cpp reads them per decode)."""
        if n_threads != self.n_threads and not self.closed:
            ll.llama_set_n_threads(self._ctx, n_threads, n_threads)
            self.n_threads = n_threads

    def decode(self, sequences: list[np.ndarray], keys: list[np.ndarray] | None = None) -> list[np.ndarray]:
        """Per-token rows [len_i, n_embd_out] (pooling NONE) or one pooled row [n_embd_out] per sequence.

        ``keys`` (one bool array per sequence, False = in the sequence but not an attention
        key) needs the key-mask patch (``supports_key_mask()``).
        """
        if self.closed:
            raise EncoderClosedError(
                f"the llama.cpp context of {self.model.path} was closed; load the model again (lfm2edge.load)"
            )
        # Everything below is checked here because llama.cpp would abort the process, not raise.
        arrays = [_token_array(s, i) for i, s in enumerate(sequences)]
        lengths = np.array([len(s) for s in arrays], dtype=np.int64)
        if not arrays or lengths.min() == 0:
            raise InvalidInputError("decode needs at least one non-empty sequence")
        total = int(lengths.sum())
        if total > self.n_batch or len(arrays) > self.n_seq_max:
            raise InvalidInputError(
                f"{total} tokens in {len(arrays)} sequences exceed this context's {self.n_batch} tokens / "
                f"{self.n_seq_max} sequences"
            )
        all_ids = np.concatenate(arrays)
        check_token_ids(all_ids, self.model.n_vocab)
        tokens = np.ascontiguousarray(all_ids, dtype=np.int32)
        starts = np.repeat(np.cumsum(lengths) - lengths, lengths)
        pos = (np.arange(total) - starts).astype(np.int32)
        seq = np.repeat(np.arange(len(sequences)), lengths).astype(np.int32)
        n_seq_id = np.ones(total, dtype=np.int32)
        # seq_id is an int32** (one pointer per token): point each into the seq array.
        seq_ptrs = (seq.ctypes.data + seq.itemsize * np.arange(total, dtype=np.uint64)).astype(np.uintp)
        outputs = np.ones(total, dtype=np.int8)
        batch = ll.llama_batch(
            n_tokens=total,
            token=tokens.ctypes.data_as(ctypes.POINTER(ll.llama_token)),
            embd=None,
            pos=pos.ctypes.data_as(ctypes.POINTER(ll.llama_pos)),
            n_seq_id=n_seq_id.ctypes.data_as(ctypes.POINTER(ctypes.c_int32)),
            seq_id=seq_ptrs.ctypes.data_as(ctypes.POINTER(ctypes.POINTER(ll.llama_seq_id))),
            logits=outputs.ctypes.data_as(ctypes.POINTER(ctypes.c_int8)),
        )
        key_flags = None
        if keys is not None:
            if _set_attn_key_mask is None:
                raise FeatureUnavailableError(
                    "this llama.cpp build cannot mask attention keys (it lacks lfm2edge's attention-key-mask "
                    "patch): build the patched binding with `make setup`, or decode without keys"
                )
            if len(keys) != len(arrays) or any(len(k) != n for k, n in zip(keys, lengths, strict=False)):
                raise InvalidInputError("keys must hold one flag per token of each sequence")
            key_flags = np.ascontiguousarray(np.concatenate(keys), dtype=np.int8)
        if self.has_memory:
            ll.llama_memory_clear(ll.llama_get_memory(self._ctx), True)
        if key_flags is not None:
            _set_attn_key_mask(self._ctx, key_flags.ctypes.data_as(ctypes.POINTER(ctypes.c_int8)), total)
        rc = ll.llama_decode(self._ctx, batch)
        if rc != 0:
            raise DecodeError(
                f"llama.cpp could not decode {total} tokens ({len(arrays)} sequences) of {self.model.path} "
                f"(llama_decode returned {rc}: {_DECODE_CODES.get(rc, 'an internal error')}); "
                "try a smaller batch_size or max_batch_tokens, and run `lfm2edge inspect` on the file"
            )
        n_out = self.model.n_embd_out
        if self.pooling == ll.LLAMA_POOLING_TYPE_NONE:
            rows = self._copy(ll.llama_get_embeddings(self._ctx), (total, n_out))
            return np.split(rows, np.cumsum(lengths)[:-1])
        return [self._copy(ll.llama_get_embeddings_seq(self._ctx, i), (n_out,)) for i in range(len(arrays))]

    def _copy(self, ptr, shape: tuple[int, ...]) -> np.ndarray:
        if not ptr:  # as_array would read address 0
            raise DecodeError(f"llama.cpp gave no embeddings for {self.model.path}; run `lfm2edge inspect`")
        return np.ctypeslib.as_array(ptr, shape=shape).copy()

    def close(self) -> None:
        """Free the context; idempotent."""
        if self.closed:
            return
        ctx, self._ctx = self._ctx, None
        ll.llama_free(ctx)

    def __del__(self) -> None:
        _close_unless_exiting(self)


def _token_array(sequence: object, index: int) -> np.ndarray:
    """One sequence as a 1-D integer array (not yet narrowed to int32: a wider id must not wrap)."""
    ids = np.asarray(sequence)
    if ids.ndim != 1 or not (ids.size == 0 or np.issubdtype(ids.dtype, np.integer)):
        raise InvalidInputError(
            f"sequence {index} must be a 1-D array of integer token ids, not {ids.dtype} of shape {ids.shape}"
        )
    return ids
