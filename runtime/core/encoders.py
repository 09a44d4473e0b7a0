"""Dense and ColBERT encoders over llama.cpp, with one encode surface named as in sentence-transformers.

``lfm2edge.load(path)`` picks the encoder from the GGUF. ``encode_query`` / ``encode_document``
take a string (one result) or a list of strings (a float32 array [n, d] for dense models, a
list of float32 arrays [tokens_i, d] for ColBERT). Texts are prepared exactly as
sentence-transformers (dense: prompt, strip, BOS, CLS) and PyLate (ColBERT: [Q]/[D] marker
after BOS, EOS padding of queries, skiplist of standalone punctuation in documents) prepare them;
``prepare_query`` / ``prepare_document`` return the token ids one text is decoded as (prompt or
marker, truncation and padding included), on both encoders.

Thread safety: an encoder's llama.cpp contexts are guarded by one lock, so calls from several
threads are safe and run one at a time (llama.cpp already uses every thread you give it inside
one decode). Within one call that needs several decodes (many texts), ``concurrent_decodes``
(default) runs up to one decode per granted thread at once, each in a context of its own: no
barrier between threads inside a decode, the same vectors.

Lifecycle: ``close()`` takes the same lock, so it waits for a decode in flight, then frees the
model; every later call (and the rest of an encode that was running) raises
``EncoderClosedError``. An empty list of texts gives an empty result of the usual shape.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor, wait
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from lfm2edge.runtime.core.build import BuildInfo, check_build
from lfm2edge.runtime.core.cpu import ThreadPolicy, default_threads
from lfm2edge.runtime.core.errors import (
    EncoderClosedError,
    FeatureUnavailableError,
    InvalidInputError,
    ModelFileError,
)
from lfm2edge.runtime.core.llama import (
    DYNAMIC_INT8,
    OZAKI_F32,
    SPLIT_F32,
    EmbeddingContext,
    LlamaModel,
    choose_weight_kernel,
    supports_key_mask,
)
from lfm2edge.runtime.core.maxsim import PackedDocuments, maxsim, normalize_rows
from lfm2edge.runtime.core.model_file import ModelFile, describe
from lfm2edge.runtime.core.progress import progress_bar
from lfm2edge.runtime.core.settings import ModelKind, RetrievalSettings
from lfm2edge.runtime.core.text import check_text, check_texts

QueryExpansion = Literal["pylate", "attended", "none"]
QUERY_EXPANSION_MODES: tuple[str, ...] = ("pylate", "attended", "none")
# The context's token capacity per decode (at least the longest sequence).
DEFAULT_BATCH_TOKENS = 512
# The most max_batch_tokens may ask for: llama.cpp sizes the context and its compute buffer for
# this many tokens at load (without flash attention the attention scores grow with its square),
# and the longest sequence of either model is 512 tokens.
MAX_BATCH_TOKENS = 32768
# ggml's thread limit (GGML_MAX_N_THREADS).
MAX_THREADS = 512
# Sequences are packed into decode calls of about this many tokens. With the no-memory patch
# a call's sequences share one micro-batch whose attention spans all of its tokens (masked
# block-diagonally): on the 350M model 8 queries (256 tokens) per call beat one per call by
# 1.16x (f16) to 1.31x (q8_0), while 32 per call (1,024 tokens) gain little or lose
# (bench/batching.py).
PACK_TOKENS = 256
MAX_SEQUENCES_PER_CALL = 64
# The most decodes one encode call runs at once (measured on 2 cores only). There, 32 bf16
# documents of 256 tokens per call went 1.18x faster than one decode at a time on both threads
# (median of 6 alternated rounds; vectors bit-identical): a decode's threads wait for each other
# at every op, and a vCPU the host takes stalls them all. Each extra context holds its own compute
# buffer (~90 MB for the 350M models at the default max_batch_tokens).
MAX_CONCURRENT_DECODES = 4
# Calls per context in one round of concurrent decodes: the lock is released between rounds.
CALLS_PER_CONTEXT = 4


# One decode call: its sequences, and their attention-key flags where the caller gives them.
Call = tuple[list[np.ndarray], list[np.ndarray] | None]


@dataclass(frozen=True)
class Ranking:
    """A ranked candidate list: ``indices`` into the input, best first, with their scores."""

    indices: np.ndarray  # int64
    scores: np.ndarray  # float32


def _check_count(name: str, value: object, high: int | None = None, hint: str = "") -> int:
    """``value`` as an int in [1, high], or InvalidInputError naming the bound (bools are not counts)."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise InvalidInputError(f"{name} must be an int, not {type(value).__name__}")
    if value < 1 or (high is not None and value > high):
        bound = "at least 1" if high is None else f"between 1 and {high}"
        raise InvalidInputError(f"{name} must be {bound}, got {value}{hint}")
    return int(value)


class Encoder:
    """What dense and ColBERT encoders share: checks, tokenization, batched decoding, the lock."""

    kind: ModelKind

    def __init__(
        self,
        model_file: ModelFile,
        model: LlamaModel,
        build: BuildInfo,
        n_threads: int,
        exact: bool,
        max_batch_tokens: int,
        adaptive_threads: bool = True,
        concurrent_decodes: bool = True,
    ):
        assert model_file.settings is not None
        self.path: Path = model_file.path
        self.model_file = model_file
        self.settings: RetrievalSettings = model_file.settings
        self.build = build
        self.n_threads = n_threads
        self.thread_policy = ThreadPolicy(n_threads, adaptive_threads)
        self.exact = exact
        self._model = model
        self.max_batch_tokens = max(max_batch_tokens, _longest_sequence(self.settings, self.path))
        self._ctx = EmbeddingContext(model, self.max_batch_tokens, MAX_SEQUENCES_PER_CALL, n_threads, exact)
        # Decodes at once per call: one per granted thread, on the CPU only (a GPU runs one at a time).
        self.concurrent_decodes = concurrent_decodes and not model.offloaded and n_threads > 1
        # The contexts beside self._ctx that concurrent decodes use, made on first need, and the
        # threads that drive them (the calling thread drives self._ctx).
        self._extra: list[EmbeddingContext] = []
        self._pool: ThreadPoolExecutor | None = None
        # Held for every use of llama.cpp (tokenize, decode) and by close(): nothing is freed in use.
        self._lock = threading.Lock()
        self._closed = False

    @property
    def closed(self) -> bool:
        """Whether close() was called: calls now raise EncoderClosedError."""
        return self._closed

    def _check_open(self) -> None:
        if self._closed:
            raise EncoderClosedError(
                f"this encoder of {self.path} is closed; load it again with "
                f"lfm2edge.load({str(self.path)!r}) to keep using it"
            )

    @contextmanager
    def _llama(self) -> Iterator[None]:
        """The lock, with the model open: checked under the lock, so close() cannot free it meanwhile."""
        with self._lock:
            self._check_open()
            yield

    def _start(self, texts: object, batch_size: object, what: str = "text") -> tuple[list[str], bool]:
        """(the checked texts, whether one string came in), once the encoder is open and the options valid."""
        self._check_open()
        items, single = check_texts(texts, what)
        _check_count("batch_size", batch_size, hint="; it is the number of texts per decode")
        return items, single

    @property
    def dim(self) -> int:
        return self._model.n_embd_out

    @property
    def flash_attention(self) -> bool:
        """Whether decodes run llama.cpp's flash attention (in exact mode over F32 K and V, patch 0005)."""
        return self._ctx.flash_attention

    @property
    def extra_buffers(self) -> bool:
        """Whether llama.cpp's CPU extra buffer types (AMX, repack) are in use for this model."""
        return self._model.extra_buffers

    @property
    def split_f32(self) -> bool:
        """Whether f32 weights run on the AMX tiles as bf16 halves (``load(..., split_f32=True)``)."""
        return self._model.weight_kernel is SPLIT_F32

    @property
    def dynamic_int8(self) -> bool:
        """Whether bf16 weights run as int8 on the AMX tiles (``load(..., dynamic_int8=True)``)."""
        return self._model.weight_kernel is DYNAMIC_INT8

    @property
    def ozaki_f32(self) -> bool:
        """Whether f32 weights run as int8 slices on the AMX tiles (``load(..., ozaki_f32=True)``)."""
        return self._model.weight_kernel is OZAKI_F32

    @property
    def weight_kernel(self) -> str | None:
        """The load option that runs the weights on another kernel ("split_f32", "dynamic_int8", "ozaki_f32"), or None."""
        kernel = self._model.weight_kernel
        return kernel.option if kernel else None

    def tokenize(self, text: str) -> np.ndarray:
        """Token ids as the model's HF tokenizer gives them (BOS first, added tokens matched)."""
        if not isinstance(text, str):
            raise InvalidInputError(f"tokenize takes a str, not {type(text).__name__}")
        with self._llama():  # the vocabulary is freed by close()
            return self._model.tokenize(text, add_bos=True)

    def _decode_all(
        self,
        sequences: list[np.ndarray],
        batch_size: int,
        show_progress_bar: bool,
        keys: list[np.ndarray] | None = None,
    ) -> list[np.ndarray]:
        """Decode every sequence, packing consecutive ones into calls of bounded tokens and count."""
        calls = self._pack(sequences, batch_size)
        outputs: list[np.ndarray] = []
        bar = progress_bar(len(sequences), show_progress_bar)
        done = 0
        while done < len(calls):
            # Checked before every round: a close() from another thread ends a long encode here, and
            # other threads' calls get the lock between rounds.
            with self._llama():
                threads = self.thread_policy.threads()
                width = min(threads, len(calls) - done, MAX_CONCURRENT_DECODES) if self.concurrent_decodes else 1
                end = min(len(calls), done + width * CALLS_PER_CONTEXT) if width > 1 else done + 1
                batch = [(sequences[a:b], None if keys is None else keys[a:b]) for a, b in calls[done:end]]
                for rows in self._decode_round(batch, width, threads):
                    outputs.extend(rows)
            bar(calls[end - 1][1] - calls[done][0])
            done = end
        bar(0, close=True)
        return outputs

    def _pack(self, sequences: list[np.ndarray], batch_size: int) -> list[tuple[int, int]]:
        """[start, end) of each decode call: consecutive sequences up to the token and count budgets."""
        per_call = min(batch_size, MAX_SEQUENCES_PER_CALL)
        calls = []
        start = 0
        while start < len(sequences):
            end, tokens = start, 0
            budget = min(self.max_batch_tokens, max(PACK_TOKENS, len(sequences[start])))
            while end < len(sequences) and end - start < per_call and tokens + len(sequences[end]) <= budget:
                tokens += len(sequences[end])
                end += 1
            calls.append((start, end))
            start = end
        return calls

    def _decode_round(self, batch: list[Call], width: int, threads: int) -> list[list[np.ndarray]]:
        """Decode the round's calls, ``width`` at once with the threads shared out; the caller holds the lock.

        Each context takes the next call as soon as its last one ends: a short document does not wait
        for a long one, and one stalled thread (a core taken by the host or another process) holds up
        only its own decode.
        """
        contexts = self._contexts(width)
        if len(contexts) == 1:  # one at a time, on every thread
            self._ctx.set_threads(threads)
            return [self._ctx.decode(*call) for call in batch]
        for i, ctx in enumerate(contexts):
            ctx.set_threads(threads // len(contexts) + (i < threads % len(contexts)))
        results: list[list[np.ndarray] | None] = [None] * len(batch)
        taken = iter(range(len(batch)))  # next() on a range iterator is atomic under the GIL
        failed = threading.Event()

        def drain(ctx: EmbeddingContext) -> None:
            try:
                for i in taken:
                    if failed.is_set() or self._closed:  # close() waits for the decodes in flight only
                        return
                    results[i] = ctx.decode(*batch[i])
            except BaseException:
                failed.set()  # the others stop after their current decode
                raise

        if self._pool is None:
            self._pool = ThreadPoolExecutor(MAX_CONCURRENT_DECODES - 1, thread_name_prefix="lfm2edge-decode")
        futures = []
        for ctx in contexts[1:]:
            try:
                futures.append(self._pool.submit(drain, ctx))
            except RuntimeError:  # the interpreter is exiting (or the pool shut down): decode here alone
                break
        try:
            drain(self._ctx)
        finally:
            wait(futures)  # no context is freed (close() waits on the lock) while one still decodes
        for f in futures:
            f.result()  # a worker's error, as raised
        if any(r is None for r in results):
            self._check_open()  # the calls left undone were left for close(): EncoderClosedError
        return results  # type: ignore[return-value]  # every call ran

    def _contexts(self, n: int) -> list[EmbeddingContext]:
        """self._ctx and up to n - 1 contexts beside it, made on first need (fewer if llama.cpp cannot)."""
        while len(self._extra) < n - 1:
            try:
                self._extra.append(EmbeddingContext(
                    self._model, self.max_batch_tokens, MAX_SEQUENCES_PER_CALL, 1, self.exact))
            except ModelFileError:  # out of memory for another compute buffer: no more concurrency
                self.concurrent_decodes = False
                break
        return [self._ctx, *self._extra[: n - 1]]

    def rerank(
        self, query: str, documents: Sequence[str], top_k: int | None = None, batch_size: int = 32
    ) -> Ranking:
        """Rank raw candidate texts by the model's similarity to the query, with no index (none: empty)."""
        if top_k is not None:
            _check_count("top_k", top_k)
        check_text(query, "query")
        if isinstance(documents, str):
            raise InvalidInputError("documents must be a list of strings, not one string; wrap it: [text]")
        items, _ = self._start(documents, batch_size, "document")
        if not items:
            return Ranking(np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.float32))
        docs = self.encode_document(items, batch_size=batch_size)
        return _rank(self.similarity(self.encode_query(query), docs), top_k)

    def close(self) -> None:
        """Free the model and its context once the decode in flight (if any) ends. Idempotent."""
        # Flagged before the lock: an encode in progress stops at its next call instead of racing
        # close() for the lock through the rest of its texts.
        self._closed = True
        with self._lock:
            for ctx in (self._ctx, *self._extra):
                ctx.close()  # idempotent, as the model's close
            self._model.close()
            if self._pool is not None:
                self._pool.shutdown()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class DenseEncoder(Encoder):
    """LFM2.5-Embedding: prompt + text, BOS, CLS (position 0), L2-normalised by default."""

    kind = ModelKind.DENSE

    def prepare_query(self, text: str) -> np.ndarray:
        """Query ids as decoded: BOS, the query prompt and the text, truncated to query_length."""
        s = self.settings
        return self._prepare(check_text(text, "query"), s.query_prefix, s.query_length)

    def prepare_document(self, text: str) -> np.ndarray:
        """Document ids as decoded: BOS, the document prompt and the text, truncated to document_length."""
        s = self.settings
        return self._prepare(check_text(text, "document"), s.document_prefix, s.document_length)

    def _prepare(self, text: str, prompt: str, limit: int) -> np.ndarray:
        # sentence-transformers prepends the prompt, then strips the whole string.
        return self.tokenize((prompt + text).strip())[:limit].astype(np.int32)

    def _encode(self, texts, side: str, batch_size: int, show_progress_bar: bool, normalize: bool | None):
        items, single = self._start(texts, batch_size)
        if not items:
            return np.zeros((0, self.dim), dtype=np.float32)
        prepare = self.prepare_query if side == "query" else self.prepare_document
        sequences = [prepare(t) for t in items]
        vectors = np.stack(self._decode_all(sequences, batch_size, show_progress_bar)).astype(np.float32)
        if self.settings.normalize if normalize is None else normalize:
            vectors = normalize_rows(vectors)
        return vectors[0] if single else vectors

    def encode_query(self, texts, batch_size: int = 32, show_progress_bar: bool = False, normalize: bool | None = None):
        """[n, d] float32 (or [d] for one string); ``normalize=False`` returns the raw CLS vectors."""
        return self._encode(texts, "query", batch_size, show_progress_bar, normalize)

    def encode_document(self, texts, batch_size: int = 32, show_progress_bar: bool = False, normalize: bool | None = None):
        return self._encode(texts, "document", batch_size, show_progress_bar, normalize)

    def similarity(self, query: np.ndarray, documents: np.ndarray) -> np.ndarray:
        """Cosine scores of one query vector against [n, d] document vectors."""
        documents = np.asarray(documents, dtype=np.float32)
        query = normalize_rows(np.asarray(query, dtype=np.float32))
        return (normalize_rows(documents) @ query).astype(np.float32)


class ColBERTEncoder(Encoder):
    """LFM2.5-ColBERT: [Q]/[D] markers after BOS, query expansion, skiplist, per-token L2 vectors."""

    kind = ModelKind.LATE_INTERACTION

    def __init__(self, *args, query_expansion: QueryExpansion | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self._check_marker_ids()
        self.key_mask_supported = supports_key_mask()
        self.query_expansion: QueryExpansion = self._choose_expansion(query_expansion)
        self._skiplist = self.settings.skiplist_array()

    def _check_marker_ids(self) -> None:
        """The ids this encoder puts into sequences itself must be in the vocabulary (llama.cpp aborts)."""
        s, n_vocab = self.settings, self._model.n_vocab
        used = {"query_prefix_id": s.query_prefix_id, "document_prefix_id": s.document_prefix_id}
        if s.do_query_expansion:
            used["expansion_token_id"] = s.expansion_token_id
        for key, value in used.items():
            if value is None or not 0 <= value < n_vocab:
                raise ModelFileError(
                    f"{self.path}: lfm2edge.{key} is {'absent' if value is None else value}, not a token id "
                    f"of this model's vocabulary (0 to {n_vocab - 1}); re-convert the checkpoint with "
                    "`lfm2edge convert`"
                )

    def _choose_expansion(self, requested: str | None) -> QueryExpansion:
        s = self.settings
        if requested is not None and requested not in QUERY_EXPANSION_MODES:
            raise InvalidInputError(f"query_expansion must be one of {QUERY_EXPANSION_MODES}, not {requested!r}")
        if not s.do_query_expansion:
            return "none"
        if requested == "pylate" and not self.key_mask_supported:
            raise FeatureUnavailableError(
                "query_expansion='pylate' (expansion tokens in the conv but masked as attention keys, exactly "
                "PyLate's queries) needs lfm2edge's attention-key-mask patch, which this llama.cpp build lacks "
                f"({self.build.describe()}). Build the patched binding with `make setup`, or choose "
                "query_expansion='attended' (pads attended) or 'none' (no padding)."
            )
        if requested is not None:
            return requested  # type: ignore[return-value]
        if s.attend_to_expansion_tokens:
            return "attended"
        # The most faithful mode this build runs: PyLate's exact masking where patched; otherwise keep
        # PyLate's 32 query vectors with the pads attended (classic ColBERT query augmentation).
        return "pylate" if self.key_mask_supported else "attended"

    def prepare_query(self, text: str) -> np.ndarray:
        """Query ids as decoded: BOS, [Q], the text truncated, expansion pads per the mode."""
        return self.prepare_query_with_keys(text)[0]

    def prepare_query_with_keys(self, text: str) -> tuple[np.ndarray, np.ndarray]:
        """The query ids and which of them are attention keys.

        In "pylate" mode the pads are in the sequence but not keys; otherwise every token is a key.
        """
        s = self.settings
        ids = self.tokenize(check_text(text, "query").strip())[: s.query_length - 1]
        ids = np.insert(ids, 1, s.query_prefix_id).astype(np.int32)
        n_text = len(ids)
        if self.query_expansion != "none" and n_text < s.query_length:
            ids = np.concatenate([ids, np.full(s.query_length - n_text, s.expansion_token_id, dtype=np.int32)])
        keys = np.ones(len(ids), dtype=bool)
        if self.query_expansion == "pylate":
            keys[n_text:] = False
        return ids, keys

    def prepare_document(self, text: str) -> np.ndarray:
        """Document ids: BOS, [D], text truncated so the whole fits document_length."""
        s = self.settings
        ids = self.tokenize(check_text(text, "document").strip())[: s.document_length - 1]
        return np.insert(ids, 1, s.document_prefix_id).astype(np.int32)

    def encode_query(self, texts, batch_size: int = 32, show_progress_bar: bool = False):
        """One [tokens, d] float32 array per text (query_length rows when expanded), rows L2-normalised."""
        items, single = self._start(texts, batch_size)
        prepared = [self.prepare_query_with_keys(t) for t in items]
        sequences = [ids for ids, _ in prepared]
        keys = [k for _, k in prepared] if self.query_expansion == "pylate" else None
        vectors = [self._finish(v) for v in self._decode_all(sequences, batch_size, show_progress_bar, keys)]
        return vectors[0] if single else vectors

    def encode_document(self, texts, batch_size: int = 32, show_progress_bar: bool = False):
        """One [kept tokens, d] float32 array per text: standalone skiplist tokens dropped, rows L2-normalised."""
        items, single = self._start(texts, batch_size)
        sequences = [self.prepare_document(t) for t in items]
        outputs = self._decode_all(sequences, batch_size, show_progress_bar)
        vectors = [self._finish(v[~np.isin(ids, self._skiplist)]) for ids, v in zip(sequences, outputs, strict=True)]
        return vectors[0] if single else vectors

    def _finish(self, rows: np.ndarray) -> np.ndarray:
        rows = rows.astype(np.float32, copy=False)
        return normalize_rows(rows) if self.settings.normalize else rows

    def similarity(self, query: np.ndarray, documents: Sequence[np.ndarray] | PackedDocuments) -> np.ndarray:
        """MaxSim scores of one query matrix against each document matrix."""
        return maxsim(query, documents)


def _rank(scores: np.ndarray, top_k: int | None) -> Ranking:
    order = np.argsort(-scores, kind="stable")[:top_k]
    return Ranking(order.astype(np.int64), scores[order].astype(np.float32))


def _longest_sequence(settings: RetrievalSettings, path: Path) -> int:
    """The longest sequence the settings ask for; past MAX_BATCH_TOKENS refused (llama.cpp allocates it)."""
    longest = max(settings.query_length, settings.document_length)
    if longest > MAX_BATCH_TOKENS:
        raise ModelFileError(
            f"{path}: lfm2edge.query_length / document_length ask for {longest} tokens per sequence, "
            f"more than the {MAX_BATCH_TOKENS} this runtime allows; re-convert the checkpoint with "
            "`lfm2edge convert`"
        )
    return longest


def load(
    path: str | Path,
    n_threads: int | None = None,
    query_expansion: QueryExpansion | None = None,
    exact: bool = True,
    max_batch_tokens: int = DEFAULT_BATCH_TOKENS,
    n_gpu_layers: int | None = None,
    extra_buffers: bool | None = None,
    adaptive_threads: bool = True,
    concurrent_decodes: bool = True,
    split_f32: bool = False,
    dynamic_int8: bool = False,
    ozaki_f32: bool = False,
) -> DenseEncoder | ColBERTEncoder:
    """Open a GGUF as a DenseEncoder or a ColBERTEncoder, chosen from the file.

    ``exact=True`` (default) keeps attention's K and V in F32: about 2e-6 relative error
    against the PyTorch reference. With lfm2edge's patch ``llama.cpp/0005`` that runs through
    flash attention (stock llama.cpp would feed it F16 copies); without the patch flash
    attention stays off. ``exact=False`` runs flash attention over F16 K and V (about 1e-3
    per token). ``encoder.flash_attention`` tells which is in use. ``query_expansion`` (ColBERT)
    is "pylate", "attended" or "none"; by default the most faithful mode the build supports,
    reported by ``encoder.query_expansion``. ``extra_buffers`` chooses llama.cpp's CPU extra
    buffer types (AMX on CPUs with AMX, the CPU repack buffer): None lets the build decide (on,
    except on unpatched AMX builds), False runs the plain CPU kernels, True forces them on;
    ``encoder.extra_buffers`` tells which is in effect. ``n_threads`` is 1 to 512 (ggml's limit;
    None: every CPU this process may use); ``max_batch_tokens``, the most tokens one decode holds,
    is 1 to 32768 and raised to the model's longest sequence. ``adaptive_threads`` (default)
    runs each decode on the cores other processes leave free, up to ``n_threads``
    (``lfm2edge.runtime.core.cpu``): on a busy machine that is faster than fighting for the busy core;
    False always uses ``n_threads``. ``concurrent_decodes`` (default; CPU only): a call with more
    texts than one decode holds runs up to one decode per granted thread at once, each in a
    llama.cpp context of its own (the same vectors, more documents per second; each extra context
    holds a compute buffer, ~90 MB for the 350M models at the default ``max_batch_tokens``);
    False runs one decode at a time on every thread. ``split_f32`` (f32 files, CPUs with AMX-BF16,
    patch ``llama.cpp/0012``): each f32 weight and activation runs as two bf16 halves on the AMX
    tiles, 16 of f32's 24 mantissa bits, three of the four products of the halves summed in float32:
    near-f32 vectors (1 - cosine 3-9e-8 per token against PyTorch fp32 on the bench's random ColBERT,
    against f32's 8e-10) at 1.6x the query and 2.1x the document speed of llama.cpp's f32 kernels here;
    FeatureUnavailableError where the build or CPU cannot. ``dynamic_int8`` (bf16 files, CPUs with
    AMX-BF16, patch ``llama.cpp/0013``, or AVX512-VNNI without AMX, patch ``llama.cpp/0018``, in the same
    arithmetic): the weights are quantized at load to int8, one scale per output column, and each
    matmul's activations to int8, one scale per token, on the AMX-INT8 tiles or VPDPBUSD: 0.57x
    bf16's query time here, far less faithful (per-token cosine 0.72 against PyTorch fp32 on the bench's
    random ColBERT, bf16 0.97, ONNX Runtime's dynamic int8 0.56); a file that is not bf16 raises
    ModelFileError. ``ozaki_f32`` (f32 files, CPUs with AMX-BF16, patch ``llama.cpp/0014``): Ozaki's
    scheme, each f32 weight and activation written as four int8 slices under one power-of-two scale per
    column and per token (28 bits below the largest value), every slice product summed exactly in int32
    on the AMX-INT8 tiles and each output rounded to float once: nearer a float64 reference than f32
    itself (1 - cosine 2.3e-10 per token on the bench's random ColBERT, f32 3.3e-10, ONNX Runtime fp32
    4.2e-10), at about the fp32 peers' speed here; a file that is not f32 raises ModelFileError.
    """
    if n_threads is not None:
        n_threads = _check_count("n_threads", n_threads, MAX_THREADS, f"; {MAX_THREADS} is ggml's limit, and "
                                 f"n_threads=None uses this machine's {default_threads()} CPUs")
    max_batch_tokens = _check_count("max_batch_tokens", max_batch_tokens, MAX_BATCH_TOKENS,
                                    f"; the default is {DEFAULT_BATCH_TOKENS}")
    build = check_build()
    model_file = describe(path)
    problems = model_file.problems()
    if problems:
        raise ModelFileError(f"{path} cannot be used as a retriever:\n- " + "\n- ".join(problems))
    if query_expansion is not None and model_file.kind is ModelKind.DENSE:
        raise InvalidInputError("query_expansion applies to ColBERT models only; this file is a dense model")
    weight_kernel = choose_weight_kernel(model_file.matmul_weight_type, split_f32, dynamic_int8, ozaki_f32)
    model = LlamaModel(Path(path), n_gpu_layers, extra_buffers, weight_kernel)
    common = dict(
        model_file=model_file,
        model=model,
        build=build,
        n_threads=n_threads or default_threads(),
        exact=exact,
        max_batch_tokens=max_batch_tokens,
        adaptive_threads=adaptive_threads,
        concurrent_decodes=concurrent_decodes,
    )
    try:
        if model_file.kind is ModelKind.LATE_INTERACTION:
            return ColBERTEncoder(query_expansion=query_expansion, **common)
        return DenseEncoder(**common)
    except BaseException:
        model.close()  # and any context already made on it: nothing is left for the garbage collector
        raise
