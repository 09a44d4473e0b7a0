"""The binding patches, seen from a user of llama-cpp-python (lfm2edge's runtime does not use Llama)."""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from lfm2edge.convert.verify import row_cosines

from .patch_support import require_patch

TEXTS = ["the first input has a few tokens", "second", "a third input, somewhat longer than the second one"]


def _llama_embed_rows(gguf, texts, **kwargs):
    import llama_cpp

    llm = llama_cpp.Llama(model_path=str(gguf), embedding=True, flash_attn=False, verbose=False, **kwargs)
    try:
        return [np.asarray(rows, dtype=np.float32) for rows in llm.embed(texts)]
    finally:
        llm.close()


def test_llama_embed_returns_correct_colbert_rows(colbert_gguf, colbert_encoder):
    require_patch("embed-per-token-rows")
    got = _llama_embed_rows(colbert_gguf, TEXTS)
    assert len(got) == len(TEXTS)
    for text, rows in zip(TEXTS, got, strict=True):
        ids = colbert_encoder.tokenize(text)
        (expected,) = colbert_encoder._ctx.decode([ids])  # raw per-token rows, same tokens
        assert rows.shape == expected.shape == (len(ids), colbert_encoder.dim)
        assert row_cosines(rows, expected).min() >= 0.9999


def test_llama_embed_raises_instead_of_aborting_past_n_ubatch(colbert_gguf):
    require_patch("embed-per-token-rows")
    # In a child process: the unpatched binding aborts the whole process here.
    code = f"""
import llama_cpp
llm = llama_cpp.Llama(model_path={str(colbert_gguf)!r}, embedding=True, n_batch=64, n_ubatch=16, verbose=False)
rows = llm.embed(["word " * 40, "two words"])
print(len(rows[0]), len(rows[1]))
try:
    llm.embed("word " * 40, truncate=False)
except ValueError as e:
    print("ValueError", e)
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.strip().splitlines()
    first, second = map(int, lines[0].split())
    assert first == 16 and second > 0  # truncated to n_ubatch; the second input in a decode of its own
    assert lines[1].startswith("ValueError")


def test_binding_exposes_the_key_mask():
    import llama_cpp

    require_patch("bind-attn-key-mask")
    assert llama_cpp.llama_set_attn_key_mask.argtypes[-1].__name__ == "c_int"


def test_batched_encoding_without_memory_equals_one_at_a_time(colbert_encoder, embedding_encoder, sample):
    """The lfm2-embeddings-without-memory patch: many sequences in one micro-batch, same vectors."""
    require_patch("lfm2-embeddings-without-memory")
    assert not colbert_encoder._ctx.has_memory  # a bidirectional context without KV cache or conv states
    queries, documents = sample
    docs = documents[:20] + ["short", "?!", "x " * 300]  # mixed lengths in one decode
    alone = [colbert_encoder.encode_document(d) for d in docs]
    batched = colbert_encoder.encode_document(docs, batch_size=64)
    for a, b in zip(alone, batched, strict=True):
        assert a.shape == b.shape and row_cosines(a, b).min() >= 0.99999
    q_alone = [colbert_encoder.encode_query(q) for q in queries[:32]]
    q_batched = colbert_encoder.encode_query(queries[:32], batch_size=32)
    for a, b in zip(q_alone, q_batched, strict=True):
        assert row_cosines(a, b).min() >= 0.99999
    assert not embedding_encoder._ctx.has_memory
    d_alone = np.stack([embedding_encoder.encode_document(d) for d in docs])
    assert row_cosines(d_alone, embedding_encoder.encode_document(docs, batch_size=64)).min() >= 0.99999


AMX_CHILD = """
import logging, sys
import numpy as np
logging.basicConfig(level=logging.DEBUG, stream=sys.stderr, format="%(message)s")
import lfm2edge
text = "a long enough document about many different things " * 12
with lfm2edge.load(sys.argv[1], n_threads=2) as q8, lfm2edge.load(sys.argv[2], n_threads=2) as f32:
    a, b = q8.encode_document(text), f32.encode_document(text)
print(a.shape[0], float((a * b).sum(axis=1).min()))
"""


def _amx_sized_checkpoint(tmp_path, bidirectional: bool = True):
    """The real widths (1024, FFN 6656) so that ggml's AMX tile kernels take the matmuls; two layers."""
    import dataclasses

    from lfm2edge.convert.synthetic import TINY, make_checkpoint

    shape = dataclasses.replace(TINY, hidden_size=1024, num_hidden_layers=2, attention_layers=(1,),
                                num_attention_heads=16, num_key_value_heads=8, block_ff_dim=6656,
                                block_multiple_of=256)
    return make_checkpoint(tmp_path / "ckpt", "colbert", shape, bidirectional=bidirectional)


def _require_dynamic_int8() -> str:
    """Which dynamic_int8 kernel runs here, "amx" (patch amx-int8-dynamic) or "vnni" (vnni-int8-dynamic, on
    AVX512-VNNI without AMX); skip where neither can, fail where the build lacks the patch."""
    from lfm2edge.runtime.core.build import build_info

    info = build_info()
    if info.amx and "-DGGML_AMX_BF16=ON" in info.cmake_args:
        require_patch("amx-int8-dynamic")
        return "amx"
    if info.vnni_without_amx:
        require_patch("vnni-int8-dynamic")
        return "vnni"
    pytest.skip("dynamic_int8 needs AMX-BF16, or AVX512-VNNI without AMX")


def _require_amx_bf16() -> None:
    from lfm2edge.runtime.core.build import build_info

    info = build_info()
    if not info.amx or "-DGGML_AMX_BF16=ON" not in info.cmake_args:
        pytest.skip("this build has no AMX-BF16 (the CPU lacks it, or the stock path was built)")


@pytest.mark.parametrize(
    ("outtype", "bidirectional"), [("q8_0", True), ("q8_0", False), ("bf16", True)]
)
def test_models_run_on_amx(outtype, bidirectional, tmp_path):
    """AMX runs the matmuls, right: q8_0 (amx-tile-config patch: no SIGILL; on the bf16 tiles with the
    amx-q8_0 patch) and bf16 on the AMX-BF16 kernel (amx-bf16-matmul patch), fed as the amx-bf16-tile-order
    patch feeds it: activations in tile order, and at K = 4608 (the FFN's down projection) 32 weight panels
    walked in groups of 3, the last one partial."""
    from lfm2edge.convert.pipeline import convert
    from lfm2edge.runtime.core.build import build_info

    info = build_info()
    if not info.amx:
        pytest.skip("this build has no AMX (the CPU lacks it, or the stock path was built)")
    if outtype == "bf16":
        _require_amx_bf16()
        require_patch("amx-bf16-matmul")
    ckpt = _amx_sized_checkpoint(tmp_path, bidirectional)
    model, f32 = convert(ckpt, tmp_path / "m.gguf", outtype), convert(ckpt, tmp_path / "f32.gguf", "f32")
    proc = subprocess.run([sys.executable, "-c", AMX_CHILD, str(model), str(f32)], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, f"exit {proc.returncode}: {proc.stderr[-1500:]}"
    assert "AMX model buffer size" in proc.stderr  # the AMX path was taken
    rows, cosine = proc.stdout.split()
    # a row count that is not a multiple of the kernels' 32-row blocks; agrees with f32 (no AMX)
    assert int(rows) % 32 and int(rows) > 32 and float(cosine) >= 0.99


MAXSIM_BETWEEN_ENCODES = """
import sys
import numpy as np
import lfm2edge
from lfm2edge.runtime.core import maxsim as m
text = "a long enough document about many different things " * 12
rng = np.random.default_rng(0)
docs = m.PackedDocuments.pack([m.normalize_rows(rng.standard_normal((40, 128))) for _ in range(30)])
with lfm2edge.load(sys.argv[1], n_threads=2) as enc:
    first = enc.encode_document(text)  # llama.cpp configures the tiles of this thread, its worker 0
    q = m.normalize_rows(rng.standard_normal((32, 128)).astype(np.float32))
    scores = m._maxsim_kernel(q, docs, "amx", threads=1)  # the AMX MaxSim on the same thread
    again = enc.encode_document(text)
print(int(np.array_equal(first, again)), int(np.isfinite(scores).all()))
"""


TORCH_BETWEEN_ENCODES = """
import sys
import numpy as np
import torch
import lfm2edge
text = "a long enough document about many different things " * 12
with lfm2edge.load(sys.argv[1], n_threads=1, concurrent_decodes=False) as enc:
    first = enc.encode_document(text)  # llama.cpp configures the tiles of this thread
    torch.set_num_threads(1)
    x, w = torch.randn(256, 1024, dtype=torch.bfloat16), torch.randn(1024, 1024, dtype=torch.bfloat16)
    for _ in range(3):
        (x @ w).sum()  # oneDNN's AMX kernels on the same thread, which release the tiles after
    again = enc.encode_document(text)
print(int(np.array_equal(first, again)))
"""


def test_pytorch_bf16_between_encodes_leaves_llama_cpp_able_to_run(tmp_path):
    """The amx-tile-config-check patch: PyTorch's bf16 matmuls release the AMX tiles of the thread they run
    on; llama.cpp's next encode on that thread must load its configuration again, not fault (SIGILL)."""
    from lfm2edge.convert.pipeline import convert

    _require_amx_bf16()
    require_patch("amx-tile-config-check")
    model = convert(_amx_sized_checkpoint(tmp_path), tmp_path / "bf16.gguf", "bf16")
    proc = subprocess.run([sys.executable, "-c", TORCH_BETWEEN_ENCODES, str(model)], capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, f"exit {proc.returncode}: {proc.stderr[-1500:]}"
    assert proc.stdout.split() == ["1"]


def test_amx_maxsim_between_encodes_leaves_llama_cpp_tiles_configured(tmp_path):
    """The MaxSim kernel's AMX path puts back the thread's tile configuration: llama.cpp configures its
    tiles once per thread, so a MaxSim between two encodes on the same thread would otherwise make the
    second one fault (SIGILL) or multiply with MaxSim's tile shapes."""
    from lfm2edge.convert.pipeline import convert
    from lfm2edge.runtime.core.maxsim import kernel_path

    if kernel_path(128) != "amx":
        pytest.skip("the MaxSim kernel has no AMX path here")
    _require_amx_bf16()
    for outtype in ("q8_0", "bf16"):  # llama.cpp's int8 and bf16 tile configurations
        model = convert(_amx_sized_checkpoint(tmp_path / outtype), tmp_path / f"{outtype}.gguf", outtype)
        proc = subprocess.run([sys.executable, "-c", MAXSIM_BETWEEN_ENCODES, str(model)], capture_output=True,
                              text=True, timeout=300)
        assert proc.returncode == 0, f"{outtype}: exit {proc.returncode}: {proc.stderr[-1500:]}"
        assert proc.stdout.split() == ["1", "1"], outtype


def test_q8_0_on_amx_keeps_bf16_activations(tmp_path):
    """The amx-q8_0 patch: q8_0 weights on the bf16 tiles, activations rounded to bf16 instead of quantized
    to int8, so the vectors are closer to f32 than llama.cpp's own q8_0 path (extra buffers off) gives."""
    import lfm2edge
    from lfm2edge.convert.pipeline import convert

    _require_amx_bf16()
    require_patch("amx-q8_0-on-bf16-tiles")
    ckpt = _amx_sized_checkpoint(tmp_path)
    q8, f32 = convert(ckpt, tmp_path / "q8.gguf", "q8_0"), convert(ckpt, tmp_path / "f32.gguf", "f32")
    text = "a long enough document about many different things " * 12
    with lfm2edge.load(q8, n_threads=2) as tiles, lfm2edge.load(q8, n_threads=2, extra_buffers=False) as int8, \
            lfm2edge.load(f32, n_threads=2) as exact:
        assert tiles.extra_buffers and not int8.extra_buffers
        reference = exact.encode_document(text)
        error_tiles = float((1 - row_cosines(tiles.encode_document(text), reference)).mean())
        error_int8 = float((1 - row_cosines(int8.encode_document(text), reference)).mean())
    # measured: 0.61-0.69e-3 against 0.89-1.03e-3 (three seeds); ggml's int8 AMX kernels equal the latter
    assert error_tiles < 0.85 * error_int8


def _amx_buffer_logged(caplog) -> bool:
    return any("AMX model buffer size" in r.getMessage() for r in caplog.records)


def test_split_f32_runs_f32_weights_on_the_bf16_tiles(tmp_path, caplog):
    """The amx-f32 patch: load(split_f32=True) places an f32 file's matmul weights in the AMX buffer and
    runs them as bf16 halves: near ggml's f32 kernels, far nearer than bf16. The switch is on for that load
    only: the next load of the same file keeps the f32 kernels."""
    import lfm2edge
    from lfm2edge.convert.pipeline import convert

    _require_amx_bf16()
    require_patch("amx-f32-as-bf16-halves")
    ckpt = _amx_sized_checkpoint(tmp_path)
    f32, bf16 = convert(ckpt, tmp_path / "f32.gguf", "f32"), convert(ckpt, tmp_path / "bf16.gguf", "bf16")
    text = "a long enough document about many different things " * 12
    with caplog.at_level(logging.DEBUG, logger="lfm2edge.llama"):
        with lfm2edge.load(f32, n_threads=2, split_f32=True) as split:
            assert split.split_f32 and _amx_buffer_logged(caplog)
            halves = split.encode_document(text)
        caplog.clear()
        with lfm2edge.load(f32, n_threads=2) as plain:
            assert not plain.split_f32 and not _amx_buffer_logged(caplog)
            reference = plain.encode_document(text)
    with lfm2edge.load(bf16, n_threads=2) as tiles:
        rounded = tiles.encode_document(text)
    error_split = float((1 - row_cosines(halves, reference)).mean())
    error_bf16 = float((1 - row_cosines(rounded, reference)).mean())
    assert np.abs(halves - reference).max() > 0  # another kernel ran
    # measured: 2.5e-10 against bf16's 8.7e-5
    assert error_split < 1e-8 and error_split < 1e-4 * error_bf16


def test_split_f32_needs_the_extra_buffers(colbert_gguf):
    import lfm2edge
    from lfm2edge.runtime.core.errors import FeatureUnavailableError

    with pytest.raises(FeatureUnavailableError, match="split_f32"):
        lfm2edge.load(colbert_gguf, n_threads=2, extra_buffers=False, split_f32=True)


def test_dynamic_int8_runs_bf16_weights_as_int8_for_that_load_only(tmp_path):
    """The amx-int8-dynamic patch: load(dynamic_int8=True) runs a bf16 file's matmuls as int8 on the AMX tiles,
    with int8's error against f32. The switch is on for that load only: loads of the same file before and
    after give bf16's vectors bit for bit."""
    import lfm2edge
    from lfm2edge.convert.pipeline import convert

    _require_amx_bf16()
    require_patch("amx-int8-dynamic")
    ckpt = _amx_sized_checkpoint(tmp_path)
    f32, bf16 = convert(ckpt, tmp_path / "f32.gguf", "f32"), convert(ckpt, tmp_path / "bf16.gguf", "bf16")
    query, text = "which things are different?", "a long enough document about many different things " * 12

    def encode(path, **options):
        with lfm2edge.load(path, n_threads=2, **options) as enc:
            return enc.dynamic_int8, enc.encode_query(query), enc.encode_document(text)

    _, *before = encode(bf16)
    on, *int8 = encode(bf16, dynamic_int8=True)
    off, *after = encode(bf16)
    _, *exact = encode(f32)
    assert on and not off
    for b, a in zip(before, after, strict=True):
        np.testing.assert_array_equal(b, a)
    for quantized, rounded, reference in zip(int8, before, exact, strict=True):
        error = float((1 - row_cosines(quantized, reference)).mean())
        error_bf16 = float((1 - row_cosines(rounded, reference)).mean())
        # measured (query, document): 2.1e-3 and 2.4e-3, against bf16's 7.2e-5 and 8.7e-5
        assert 10 * error_bf16 < error < 0.005


# A decode of 183 tokens: the register tiles' leftovers all run (8-token tiles leave 4 + 2 + 1, 4-token groups 3).
LEFTOVER_TEXT = "a document of some forty tokens about different things " * 6 + "and three more of"


def _watched_decode(path, text: str, record, **options) -> None:
    """One document decode with ``record(address, ask)`` as llama.cpp's eval callback: it sees every node."""
    import lfm2edge
    from lfm2edge.runtime.core.llama import EmbeddingContext

    with lfm2edge.load(path, n_threads=2, **options) as enc:
        ids = enc.prepare_document(text)
        ctx = EmbeddingContext(enc._model, enc.max_batch_tokens, 1, 2, eval_callback=record)
        try:
            ctx.decode([ids], None)
        finally:
            ctx.close()


def _floats(t, dims: int = 2) -> np.ndarray:
    """A float32 tensor of ``dims`` (2 or 3) dimensions as llama.cpp left it, copied out through its strides."""
    import ctypes

    assert t.type == 0  # GGML_TYPE_F32
    shape = (t.ne[2], t.ne[1], t.ne[0])
    strides = (t.nb[2], t.nb[1], t.nb[0])
    size = sum((n - 1) * b for n, b in zip(shape, strides, strict=True)) + 4
    raw = (ctypes.c_char * size).from_address(t.data)
    out = np.ndarray(shape, np.float32, raw, strides=strides).copy()
    return out if dims == 3 else out.reshape(shape[1:])


def _captured_matmuls(path, weights, buffers: dict[str, str] | None = None,
                      text: str = "a document of some forty tokens about different things " * 6,
                      **options) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """For every matmul over ``weights`` in one document decode: its input and output as llama.cpp computed
    them (float32 rows, read through the eval callback); ``buffers`` gets each weight's buffer type."""
    import ctypes

    from llama_cpp._ggml import libggml

    from lfm2edge.bench.profile import GgmlTensor

    captured: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    buffer_name = libggml.ggml_backend_buffer_name
    buffer_name.argtypes, buffer_name.restype = [ctypes.c_void_p], ctypes.c_char_p

    def record(address: int, ask: bool) -> bool:
        node = GgmlTensor.from_address(address)
        weight = GgmlTensor.from_address(node.src[0]).name.decode() if node.src[0] else ""
        if not ask and weight in weights and weight != "token_embd.weight":
            captured[weight] = _floats(GgmlTensor.from_address(node.src[1])), _floats(node)
            if buffers is not None:
                buffers[weight] = buffer_name(GgmlTensor.from_address(node.src[0]).buffer).decode()
        return True

    _watched_decode(path, text, record, **options)
    return captured


def _int8_product(x: np.ndarray, weight: np.ndarray) -> np.ndarray:
    """x [M, K] . weight [N, K]^T as patch amx-int8-dynamic defines it, in float32 where the kernel is:
    q = round(v * (127 / max |v|)) per row of each, integer sums exact, then sum * (s_x s_w)."""
    def quantize(v):
        amax = np.abs(v).max(axis=1, keepdims=True)
        inv = np.where(amax > 0, np.float32(127) / np.where(amax > 0, amax, 1), 0).astype(np.float32)
        return np.clip(np.rint(v * inv), -127, 127).astype(np.int64), amax / np.float32(127)

    qx, sx = quantize(x.astype(np.float32))
    qw, sw = quantize(weight.astype(np.float32))
    return (qx @ qw.T).astype(np.float32) * (sx * sw.T)


def test_dynamic_int8_matmuls_are_the_int8_products_bit_for_bit(tmp_path):
    """Every matmul the int8 kernel takes (N a multiple of 32) in a decode under load(dynamic_int8=True), taken
    from the graph as llama.cpp computed it: its output is the int8 product of its own input and the bf16
    file's weight, bit for bit, on AMX's tiles and on AVX512-VNNI alike."""
    import gguf

    from lfm2edge.convert.pipeline import convert

    kernel = _require_dynamic_int8()
    bf16 = convert(_amx_sized_checkpoint(tmp_path), tmp_path / "bf16.gguf", "bf16")
    weights = {t.name: t for t in gguf.GGUFReader(bf16).tensors
               if t.tensor_type == gguf.GGMLQuantizationType.BF16 and t.shape[1] % 32 == 0}
    buffers: dict[str, str] = {}
    captured = _captured_matmuls(bf16, weights, buffers, "a document of some forty tokens " * 9 + "and one",
                                 dynamic_int8=True)
    # every matmul weight of both layers (the test model's 16-wide dense_2 stays on the bf16 kernel)
    assert len(captured) == 12 and {"blk.0.shortconv.in_proj.weight", "blk.1.attn_v.weight"} <= captured.keys()
    if kernel == "vnni":
        assert set(buffers.values()) == {"CPU_REPACK"}, buffers
        assert len(next(iter(captured.values()))[0]) % 4 != 0  # rows left over after the groups of 4 too
    for name, (x, out) in captured.items():
        rows = weights[name].data.view(np.uint16).astype(np.uint32) << 16  # bf16 to float32, exactly
        np.testing.assert_array_equal(out, _int8_product(x, rows.view(np.float32)), err_msg=name)


def _bf16_round(x: np.ndarray) -> np.ndarray:
    """float32 to the nearest bf16 (ties to even), as ggml converts activations for a bf16 matmul."""
    bits = x.astype(np.float32).view(np.uint32).astype(np.uint64)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16 << 16
    return bits.astype(np.uint32).view(np.float32)


def _product_errors(x: np.ndarray, w: np.ndarray, out: np.ndarray) -> tuple[float, float]:
    """How far a float32 matmul output is from the float64 product x . w^T: the largest error as a share of
    sum |x w| (float32 sums of K terms err by a small multiple of it; a wrong accumulator by its own size),
    and the relative rms error."""
    x, w = x.astype(np.float64), w.astype(np.float64)
    exact, bound = x @ w.T, np.abs(x) @ np.abs(w).T
    worst = float((np.abs(out - exact) / np.maximum(bound, 1e-30)).max())
    return worst, float(np.sqrt(np.mean((out - exact) ** 2) / np.mean(exact**2)))


@pytest.mark.parametrize("kernel", ["tinyblas", "panels"])
def test_bf16_matmuls_without_amx_are_the_float32_products(tmp_path, kernel):
    """Where bf16 runs on VDPBF16PS without AMX, every matmul of a decode is its input rounded to bf16 times the
    file's bf16 weight, within float32's rounding of the sum; an output summed from the wrong accumulator is
    off by its own size. Both kernels: tinyBLAS's tile (patch tinyblas-bf16-tile-in-registers, extra buffers
    off) and the repack buffer's panels (patch bf16-f32-avx512-panels, extra buffers on), with their 8-token
    tiles, leftover tiles of 4, 2 and 1 tokens, and tails of 1 and 2 groups of 16 rows."""
    import gguf

    from lfm2edge.convert.pipeline import convert
    from lfm2edge.runtime.core.build import build_info

    if "AVX512_BF16 = 1" not in build_info().system_info:
        pytest.skip("this build or CPU has no AVX512-BF16, so bf16 does not run on VDPBF16PS")
    if kernel == "panels" and build_info().bf16_on_amx:
        pytest.skip("AMX takes bf16 before the repack buffer on this build")
    require_patch("tinyblas-bf16-tile-in-registers" if kernel == "tinyblas" else "bf16-f32-avx512-panels")
    bf16 = convert(_amx_sized_checkpoint(tmp_path), tmp_path / "bf16.gguf", "bf16")
    weights = {t.name: t for t in gguf.GGUFReader(bf16).tensors if t.tensor_type == gguf.GGMLQuantizationType.BF16}
    buffers: dict[str, str] = {}
    captured = _captured_matmuls(bf16, weights, buffers, LEFTOVER_TEXT, extra_buffers=kernel == "panels")
    assert {"blk.0.shortconv.in_proj.weight", "blk.1.attn_v.weight", "blk.1.ffn_down.weight"} <= captured.keys()
    assert (set(buffers.values()) == {"CPU_REPACK"}) == (kernel == "panels"), buffers
    assert len(next(iter(captured.values()))[0]) % 8 == 7  # leftover tiles of 4, 2 and 1 tokens
    for name, (x, out) in captured.items():
        w = (weights[name].data.view(np.uint16).astype(np.uint32) << 16).view(np.float32)
        worst, _ = _product_errors(_bf16_round(x), w, out)
        assert worst <= 1e-5, (name, worst)


def test_f32_matmuls_on_avx512_panels_are_the_products_and_as_accurate_as_tinyblas(tmp_path):
    """Where f32 runs on the repack buffer's AVX-512 panels (patch bf16-f32-avx512-panels), every matmul of a
    decode is the float64 product within float32's rounding of the sum, and the decode's matmuls are on
    average no less accurate than tinyBLAS's (extra buffers off), whose 16 lanes each sum a sixteenth of K:
    the panels add their sums into the outputs every 64 values. One float32 sum over the whole K would be
    about 4x less accurate here, and f32 is the type that stands for PyTorch fp32."""
    import gguf

    from lfm2edge.convert.pipeline import convert
    from lfm2edge.runtime.core.build import build_info

    if "AVX512 = 1" not in build_info().system_info:
        pytest.skip("this build or CPU has no AVX-512, so f32 does not run on the panels")
    require_patch("bf16-f32-avx512-panels")
    f32 = convert(_amx_sized_checkpoint(tmp_path), tmp_path / "f32.gguf", "f32")
    weights = {t.name: t for t in gguf.GGUFReader(f32).tensors
               if t.tensor_type == gguf.GGMLQuantizationType.F32 and len(t.shape) == 2}
    errors = {}
    for kernel in ("panels", "tinyblas"):
        buffers: dict[str, str] = {}
        captured = _captured_matmuls(f32, weights, buffers, LEFTOVER_TEXT, extra_buffers=kernel == "panels")
        assert {"blk.0.shortconv.in_proj.weight", "blk.1.attn_v.weight", "blk.1.ffn_down.weight"} <= captured.keys()
        assert (set(buffers.values()) == {"CPU_REPACK"}) == (kernel == "panels"), buffers
        relative = []
        for name, (x, out) in captured.items():
            worst, rms = _product_errors(x, np.asarray(weights[name].data).reshape(-1, x.shape[1]), out)
            assert worst <= 1e-5, (kernel, name, worst)
            relative.append(rms)
        errors[kernel] = float(np.mean(relative))
    assert errors["panels"] <= 1.25 * errors["tinyblas"], errors


def _q8_0_product(x: np.ndarray, blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """x [M, K] . W^T for a GGUF q8_0 weight (raw rows of 34-byte blocks: an fp16 scale, 32 int8 values) as
    ggml defines q8_0 x q8_0 on x86: x quantized per 32 values (scale max |v| / 127 stored as fp16, values
    v * (127 / max |v|) rounded to nearest even), exact integer block dots, each times the two fp16 scales;
    in float64, with the bound sum |x w| of its terms."""
    rows = blocks.reshape(len(blocks), -1, 34)
    dw = rows[..., :2].copy().view(np.float16)[..., 0].astype(np.float64)  # [N, B]
    qw = rows[..., 2:].view(np.int8).astype(np.float64)  # [N, B, 32]
    xb = x.astype(np.float32).reshape(len(x), -1, 32)
    amax = np.abs(xb).max(axis=2, keepdims=True)
    inv = np.where(amax > 0, np.float32(127) / np.where(amax > 0, amax, 1), 0).astype(np.float32)
    qx = np.rint(xb * inv).astype(np.float64)  # [M, B, 32]
    dx = (amax[..., 0] / np.float32(127)).astype(np.float16).astype(np.float64)  # [M, B]
    out, bound = np.zeros((len(x), len(rows))), np.zeros((len(x), len(rows)))
    for b in range(rows.shape[1]):
        scale = dx[:, b, None] * dw[None, :, b]
        out += scale * (qx[:, b] @ qw[:, b].T)
        bound += np.abs(scale) * (np.abs(qx[:, b]) @ np.abs(qw[:, b]).T)
    return out, bound


def test_q8_0_matmuls_on_avx512_vnni_are_the_q8_0_products(tmp_path):
    """Where q8_0 runs on AVX512-VNNI (patch q8_0-on-avx512-vnni: the CPU repack buffer on CPUs without AMX),
    every matmul of a decode is ggml's q8_0 product of its input and the file's weight, within float32's
    rounding of the sum. The decode's 4-token groups and its leftover tokens (their own kernel) and the
    column tails of 1 and 2 groups of 16 all run; an output from the wrong accumulator is off by its size."""
    import gguf

    from lfm2edge.convert.pipeline import convert
    from lfm2edge.runtime.core.build import build_info

    if not build_info().vnni_without_amx:
        pytest.skip("q8_0 runs on AVX512-VNNI only where the build and CPU have it and AMX does not take q8_0")
    require_patch("q8_0-on-avx512-vnni")
    q8 = convert(_amx_sized_checkpoint(tmp_path), tmp_path / "q8_0.gguf", "q8_0")
    weights = {t.name: t for t in gguf.GGUFReader(q8).tensors if t.tensor_type == gguf.GGMLQuantizationType.Q8_0}
    buffers: dict[str, str] = {}
    captured = _captured_matmuls(q8, weights, buffers, LEFTOVER_TEXT, extra_buffers=True)
    assert {"blk.0.shortconv.in_proj.weight", "blk.1.attn_v.weight", "blk.1.ffn_down.weight"} <= captured.keys()
    assert set(buffers.values()) == {"CPU_REPACK"}, buffers
    assert len(next(iter(captured.values()))[0]) % 4 != 0  # leftover tokens too
    for name, (x, out) in captured.items():
        expected, bound = _q8_0_product(x, np.asarray(weights[name].data))
        ratio = np.abs(out - expected) / np.maximum(bound, 1e-30)
        assert ratio.max() <= 1e-5, (name, float(ratio.max()))


def test_an_index_built_on_bf16_refuses_a_dynamic_int8_encoder(tmp_path):
    """dynamic_int8's vectors are not the file's own: it is part of the model identity, so an index built one
    way refuses the other encoder with a typed error instead of mixing the two."""
    import lfm2edge
    from lfm2edge.convert.pipeline import convert
    from lfm2edge.convert.synthetic import TINY, make_checkpoint
    from lfm2edge.runtime.storage.index import Index, IndexModelMismatchError, model_identity

    _require_dynamic_int8()
    bf16 = convert(make_checkpoint(tmp_path / "ckpt", "colbert", TINY), tmp_path / "bf16.gguf", "bf16")
    with lfm2edge.load(bf16, n_threads=2) as plain, lfm2edge.load(bf16, n_threads=2, dynamic_int8=True) as int8:
        assert int8.weight_kernel == "dynamic_int8" and plain.weight_kernel is None
        assert model_identity(int8) == model_identity(plain) + "+dynamic_int8"
        with Index.create(tmp_path / "index", plain) as index:
            index.add(["a document about things"], ids=["d"])
        with pytest.raises(IndexModelMismatchError, match=r"\+dynamic_int8.*loaded the same way"):
            Index.open(tmp_path / "index", int8)


def test_weight_kernels_need_their_file_type_and_one_at_a_time(colbert_gguf):
    import lfm2edge
    from lfm2edge.runtime.core.errors import InvalidInputError, ModelFileError

    with pytest.raises(ModelFileError, match=r"dynamic_int8 .* matmul weights are F32; convert .* --outtype bf16"):
        lfm2edge.load(colbert_gguf, n_threads=2, dynamic_int8=True)
    with pytest.raises(InvalidInputError, match="split_f32 and dynamic_int8 were asked for together .* pass one of them"):
        lfm2edge.load(colbert_gguf, n_threads=2, dynamic_int8=True, split_f32=True)
    with pytest.raises(InvalidInputError, match="split_f32 and ozaki_f32 were asked for together"):
        lfm2edge.load(colbert_gguf, n_threads=2, ozaki_f32=True, split_f32=True)


def test_dynamic_int8_needs_the_extra_buffers(tmp_path):
    import lfm2edge
    from lfm2edge.convert.pipeline import convert
    from lfm2edge.convert.synthetic import TINY, make_checkpoint
    from lfm2edge.runtime.core.errors import FeatureUnavailableError

    _require_dynamic_int8()
    bf16 = convert(make_checkpoint(tmp_path / "ckpt", "colbert", TINY), tmp_path / "bf16.gguf", "bf16")
    with pytest.raises(FeatureUnavailableError, match="dynamic_int8 places .* extra_buffers=False"):
        lfm2edge.load(bf16, n_threads=2, extra_buffers=False, dynamic_int8=True)


def _sliced_product(x: np.ndarray, weight: np.ndarray) -> np.ndarray:
    """x [M, K] . weight [N, K]^T as patch amx-f32-as-int8-slices defines it: per row of each a power-of-two
    scale s with max |v| / s in [63.5, 127], four int8 slices of v / s in steps of 2^-7 (float32 steps, exact),
    the slice products with index sum d < 4 summed exactly, times 2^-7d s_x s_w in float64, rounded once."""
    def slices(v):
        amax = np.abs(v).max(axis=1, keepdims=True)
        _, e = np.frexp(amax)
        s = np.ldexp(np.float32(1), e - 7).astype(np.float32)
        s = np.where(amax / s > 127, 2 * s, s)
        s = np.where(amax >= np.float32(1e-30), s, np.float32(0))
        x = v * np.where(s > 0, np.float32(1) / np.where(s > 0, s, 1), 0).astype(np.float32)
        out = []
        for _ in range(4):
            q = np.rint(x)
            out.append(q.astype(np.int64))
            x = (x - q) * np.float32(128)
        return out, s.astype(np.float64)

    (qx, sx), (qw, sw) = slices(x.astype(np.float32)), slices(weight.astype(np.float32))
    total = sum(sum(qx[i] @ qw[d - i].T for i in range(d + 1)).astype(np.float64) * 2.0 ** (-7 * d)
                for d in range(4))
    return (total * (sx * sw.T)).astype(np.float32)


def test_ozaki_f32_matmuls_are_the_exact_slice_products_bit_for_bit(tmp_path):
    """Every matmul the AMX buffer takes (N a multiple of 32) in a decode under load(ozaki_f32=True), taken
    from the graph as llama.cpp computed it: its output is the sliced product of its own input and the f32
    file's weight, bit for bit, and differs from the plain f32 kernels' (another kernel ran)."""
    import gguf

    from lfm2edge.convert.pipeline import convert

    _require_amx_bf16()
    require_patch("amx-f32-as-int8-slices")
    f32 = convert(_amx_sized_checkpoint(tmp_path), tmp_path / "f32.gguf", "f32")
    weights = {t.name: t for t in gguf.GGUFReader(f32).tensors
               if t.tensor_type == gguf.GGMLQuantizationType.F32 and len(t.shape) == 2 and t.shape[1] % 32 == 0}
    captured = _captured_matmuls(f32, weights, ozaki_f32=True)
    # every matmul weight of both layers (the test model's 16-wide dense_2 stays on the f32 kernels)
    assert len(captured) == 12 and {"blk.0.shortconv.in_proj.weight", "blk.1.attn_v.weight"} <= captured.keys()
    plain = _captured_matmuls(f32, weights)
    for name, (x, out) in captured.items():
        w = np.asarray(weights[name].data, dtype=np.float32)
        np.testing.assert_array_equal(out, _sliced_product(x, w), err_msg=name)
        px, pout = plain[name]
        if name == "blk.0.shortconv.in_proj.weight":  # the first matmul: the same input both ways
            np.testing.assert_array_equal(px, x)
            assert np.abs(pout - out).max() > 0


def test_ozaki_f32_is_nearer_float64_than_llama_cpp_f32_for_that_load_only(tmp_path):
    """load(ozaki_f32=True) brings an f32 file's vectors nearer a float64 PyTorch reference than llama.cpp's
    own f32 kernels do, and far nearer than split_f32's bf16 halves; loads before and after keep f32's
    vectors bit for bit."""
    import torch

    import lfm2edge
    from lfm2edge.convert.pipeline import convert
    from lfm2edge.convert.reference import ReferenceEncoder

    _require_amx_bf16()
    require_patch("amx-f32-as-int8-slices")
    ckpt = _amx_sized_checkpoint(tmp_path)
    f32 = convert(ckpt, tmp_path / "f32.gguf", "f32")
    query, text = "which things are different?", "a long enough document about many different things " * 12
    reference = ReferenceEncoder.from_checkpoint(ckpt, dtype=torch.float64)
    truth = reference.encode_query(query), reference.encode_document(text)

    def encode(**options):
        with lfm2edge.load(f32, n_threads=2, **options) as enc:
            return enc.ozaki_f32, (enc.encode_query(query), enc.encode_document(text))

    _, before = encode()
    on, sliced = encode(ozaki_f32=True)
    off, after = encode()
    _, halves = encode(split_f32=True)
    assert on and not off
    for b, a in zip(before, after, strict=True):
        np.testing.assert_array_equal(b, a)
    for i, kind in enumerate(("query", "document")):
        error = {name: float((1 - row_cosines(v[i], truth[i])).mean())
                 for name, v in (("ozaki", sliced), ("f32", before), ("split", halves))}
        # measured (query, document): 1.4e-13 and 8.1e-13, against f32's 3.6e-13 and 1.1e-12, split's 3.6e-10 and 2.5e-10
        assert error["ozaki"] < error["f32"] and error["ozaki"] < 0.01 * error["split"], (kind, error)


def test_ozaki_f32_needs_an_f32_file_and_the_extra_buffers(tmp_path, colbert_gguf):
    import lfm2edge
    from lfm2edge.convert.pipeline import convert
    from lfm2edge.convert.synthetic import TINY, make_checkpoint
    from lfm2edge.runtime.core.errors import FeatureUnavailableError, ModelFileError
    from lfm2edge.runtime.storage.documents import model_identity

    bf16 = convert(make_checkpoint(tmp_path / "ckpt", "colbert", TINY), tmp_path / "bf16.gguf", "bf16")
    with pytest.raises(ModelFileError, match=r"ozaki_f32 .* matmul weights are BF16; convert .* --outtype f32"):
        lfm2edge.load(bf16, n_threads=2, ozaki_f32=True)
    _require_amx_bf16()
    require_patch("amx-f32-as-int8-slices")
    with pytest.raises(FeatureUnavailableError, match="ozaki_f32 places .* extra_buffers=False"):
        lfm2edge.load(colbert_gguf, n_threads=2, extra_buffers=False, ozaki_f32=True)
    with lfm2edge.load(colbert_gguf, n_threads=2) as plain, \
            lfm2edge.load(colbert_gguf, n_threads=2, ozaki_f32=True) as sliced:
        assert sliced.weight_kernel == "ozaki_f32" and sliced.ozaki_f32 and not plain.ozaki_f32
        assert model_identity(sliced) == model_identity(plain) + "+ozaki_f32"


def test_exact_mode_runs_flash_attention_over_f32(colbert_gguf, colbert_reference, sample):
    """The flash-attention-f32 patch: exact mode runs flash attention, K and V stay F32, and the vectors
    keep the exact bar against the reference (a cast to F16 costs about 1e-3 per token)."""
    import lfm2edge

    require_patch("flash-attention-f32")
    texts = list(sample[1][:24])
    with lfm2edge.load(colbert_gguf, n_threads=2) as exact, lfm2edge.load(colbert_gguf, n_threads=2,
                                                                          exact=False) as fast:
        assert exact.flash_attention and fast.flash_attention
        ours, theirs = exact.encode_document(texts), colbert_reference.encode_document(texts)
        f16 = fast.encode_document(texts)
    worst = min(row_cosines(a, b).min() for a, b in zip(ours, theirs, strict=True))
    worst_f16 = min(row_cosines(a, b).min() for a, b in zip(f16, theirs, strict=True))
    assert worst >= 0.99999
    assert worst_f16 < worst  # F16 K and V round; F32 do not


def _captured_ropes(path, text: str) -> list[tuple]:
    """Every RoPE of one document decode: its input and output [tokens, heads, head_dim], the positions,
    (n_dims, mode) and (freq_base, freq_scale, ext_factor) from its op parameters."""
    import ctypes

    from lfm2edge.bench.profile import GgmlTensor, _ggml_base

    op_desc = _ggml_base().ggml_op_desc
    captured = []
    inputs: list[np.ndarray] = []

    def record(address: int, ask: bool) -> bool:
        # Asked about every node, so each is computed alone: when the scheduler asks about a RoPE, its input
        # is there untouched (ggml may compute a RoPE in place, over its input's memory).
        if op_desc(address) != b"ROPE":
            return True
        node = GgmlTensor.from_address(address)
        if ask:
            inputs.append(_floats(GgmlTensor.from_address(node.src[0]), 3))
            return True
        positions = GgmlTensor.from_address(node.src[1])
        pos = np.ctypeslib.as_array((ctypes.c_int32 * positions.ne[0]).from_address(positions.data)).copy()
        floats = np.frombuffer(bytes(node.op_params), dtype=np.float32)
        captured.append((inputs.pop(), pos, _floats(node, 3),
                         (node.op_params[1], node.op_params[2]), tuple(float(f) for f in floats[5:8])))
        return True

    _watched_decode(path, text, record)
    return captured


def test_rope_rotates_by_the_exact_angles_to_float_rounding(colbert_gguf):
    """The rope-angles-in-double patch: every RoPE of a 300-position decode is the rotation by the exact angles
    p * base^(-i / half), within 2^-22 of |x_i| + |x_(i+half)| per output. Float angles are off by up to
    half their ulp (1.5e-5 rad at 255): the build before this patch failed the bound at 16x."""
    require_patch("rope-angles-in-double")
    ropes = _captured_ropes(colbert_gguf, "a document that runs long enough to rotate by big angles " * 30)
    assert ropes
    for x, pos, y, (n_dims, mode), (base, freq_scale, ext_factor) in ropes:
        assert (mode, freq_scale, ext_factor) == (2, 1.0, 0.0)  # NEOX (transformers' rotate_half), no scaling
        assert pos.max() >= 255 and len(pos) == x.shape[0]
        half = n_dims // 2
        angles = (pos[:, None] * np.float64(base) ** (-np.arange(half) / half))[:, None, :]
        a, b = x[..., :half].astype(np.float64), x[..., half:n_dims].astype(np.float64)
        cos, sin = np.cos(angles), np.sin(angles)
        want = np.concatenate([a * cos - b * sin, a * sin + b * cos], -1)
        bound = 2.0**-22 * np.concatenate([np.abs(a) + np.abs(b)] * 2, -1)
        excess = np.abs(y[..., :n_dims] - want) / np.maximum(bound, 1e-30)
        worst = pos[excess.max(axis=(1, 2)).argmax()]
        assert excess.max() <= 1.0, f"a rotation is {excess.max():.1f}x the bound at position {worst}"
        assert np.array_equal(y[..., n_dims:], x[..., n_dims:])


HUGE_PAGES_CHILD = """
import sys
import lfm2edge
with lfm2edge.load(sys.argv[1], n_threads=2) as enc:
    enc.encode_document("a long enough document about many different things " * 12)
    rollup = open("/proc/self/smaps_rollup").read().splitlines()
print(next(int(line.split()[1]) for line in rollup if line.startswith("AnonHugePages:")))
"""


def _transparent_huge_pages() -> str | None:
    """The kernel's THP mode (always, madvise or never), None where there is no such setting."""
    try:
        setting = Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text()
    except OSError:
        return None
    return setting[setting.index("[") + 1:setting.index("]")]


def test_cpu_buffers_are_on_huge_pages(tmp_path):
    """The cpu-buffers-on-huge-pages patch: the encoder's large CPU buffers ask for transparent huge pages.
    Only where THP is in madvise mode: there nothing gets them unasked (with "always" everything does)."""
    from lfm2edge.convert.pipeline import convert

    if _transparent_huge_pages() != "madvise":
        pytest.skip("transparent huge pages are not in madvise mode here")
    require_patch("cpu-buffers-on-huge-pages")
    model = convert(_amx_sized_checkpoint(tmp_path), tmp_path / "m.gguf", "f32")
    proc = subprocess.run([sys.executable, "-c", HUGE_PAGES_CHILD, str(model)], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, f"exit {proc.returncode}: {proc.stderr[-1500:]}"
    assert int(proc.stdout.split()[-1]) >= 2048  # kB: at least one 2 MB page
