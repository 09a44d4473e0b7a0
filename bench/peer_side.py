"""The peers' sides: ONNX Runtime and OpenVINO, the two CPU backends one flag away in sentence-transformers.

Both run a graph exported from lfm2edge's PyTorch reference (``convert.reference``), so they compute
what the reference computes, on the same token ids, with the same thread count:

- ``onnxruntime fp32``: ``torch.onnx.export`` (dynamo, opset 18); ``onnxruntime int8``: that graph through
  ``onnxruntime.quantization.quantize_dynamic`` (int8 weights, activations quantized per call);
- ``openvino default``: ``openvino.convert_model`` of the torch module, run at OpenVINO's default precision
  (bf16 on CPUs with AMX or AVX512-BF16); ``openvino f32``: the same IR with the precision hint f32;
  ``openvino int8``: weights compressed by ``nncf.compress_weights`` (INT8_ASYM), default precision.

One unpadded sequence per call, as the reference runs (padding changes LFM2's conv): document figures use
batch size 1. Exports are cached beside the checkpoint's conversions and made once, in their own process.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from lfm2edge.bench.memory import rss
from lfm2edge.bench.regimes import Progress, SideSpec, run_measurements
from lfm2edge.bench.results import ENGINE_ONNXRUNTIME, ENGINE_OPENVINO, SideOutput

PEER_FORMATS: dict[str, tuple[str, ...]] = {
    ENGINE_ONNXRUNTIME: ("fp32", "int8"),
    ENGINE_OPENVINO: ("default", "f32", "int8"),
}
# The python modules each peer needs (the ``peers`` extra).
PEER_MODULES: dict[str, tuple[str, ...]] = {
    ENGINE_ONNXRUNTIME: ("onnxruntime", "onnx", "onnxscript"),
    ENGINE_OPENVINO: ("openvino", "nncf"),
}


def parse_peers(text: str | None) -> tuple[str, ...]:
    """``--peers onnxruntime,openvino`` -> the engine names, checked."""
    from lfm2edge.runtime.core.errors import InvalidInputError

    names = tuple(p.strip().lower() for p in (text or "").split(",") if p.strip())
    for name in names:
        if name not in PEER_FORMATS:
            raise InvalidInputError(f"unknown peer {name!r}; choose among {', '.join(PEER_FORMATS)}")
    return names


def missing_modules(peer: str) -> list[str]:
    import importlib.util

    return [m for m in PEER_MODULES[peer] if importlib.util.find_spec(m) is None]


# --- export (its own process: torch and the full-size model stay out of the bench's parent) -------------


def export_folder(cache_dir: Path, checkpoint: Path) -> Path:
    """Where this checkpoint's peer graphs live: keyed by the checkpoint's files and the exporting code."""
    import importlib.util

    from lfm2edge.bench.artifacts import checkpoint_key

    reference = importlib.util.find_spec("lfm2edge.convert.reference").origin  # read, not imported: no torch here
    code = hashlib.sha256(Path(__file__).read_bytes() + Path(str(reference)).read_bytes()).hexdigest()[:10]
    return cache_dir / "peers" / f"{checkpoint.name}-{checkpoint_key(checkpoint)}-{code}"


def graph_path(folder: Path, peer: str, fmt: str) -> Path:
    if peer == ENGINE_ONNXRUNTIME:
        return folder / ("model.onnx" if fmt == "fp32" else "model-int8.onnx")
    return folder / ("model-int8.xml" if fmt == "int8" else "model.xml")


def _export_module(checkpoint: Path):
    """The reference as one torch module: (input_ids [1, L] int64, key_mask [1, L] bool) -> vectors.

    ColBERT: every token's projected, L2-normalised vector [L, d]; Embedding: the raw CLS row [1, H].
    """
    import torch
    import torch.nn.functional as F

    from lfm2edge.convert.reference import ReferenceModel, additive_key_mask

    ref = ReferenceModel.from_checkpoint(checkpoint, dtype=torch.float32)

    class Exported(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.backbone = ref.backbone
            self.dense = None if ref.dense is None else torch.nn.Parameter(ref.dense, requires_grad=False)

        def forward(self, input_ids: torch.Tensor, key_mask: torch.Tensor) -> torch.Tensor:
            attn = additive_key_mask(key_mask[0], torch.float32)
            hidden = self.backbone(
                input_ids=input_ids, attention_mask={"full_attention": attn, "conv": None}, use_cache=False
            ).last_hidden_state[0]
            if self.dense is None:
                return hidden[:1]
            return F.normalize(hidden @ self.dense.T, p=2.0, dim=-1)

    return Exported().eval(), ref.config.vocab_size


def export(checkpoint: Path, folder: Path, peers: Sequence[str]) -> None:
    """Write every missing graph of ``peers`` into ``folder`` (atomically: a temp name, then rename)."""
    import torch

    need = [(p, f) for p in peers for f in PEER_FORMATS[p] if not graph_path(folder, p, f).exists()]
    if not need:
        return
    folder.mkdir(parents=True, exist_ok=True)
    module, vocab = _export_module(checkpoint)
    ids = torch.randint(0, vocab, (1, 16), dtype=torch.int64)
    keys = torch.ones(1, 16, dtype=torch.bool)
    tmp = folder / f".tmp-{os.getpid()}"
    tmp.mkdir(exist_ok=True)
    try:
        with torch.inference_mode():
            if ENGINE_ONNXRUNTIME in peers:
                _export_onnx(module, ids, keys, tmp, folder)
            if ENGINE_OPENVINO in peers:
                _export_openvino(module, ids, keys, tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _export_onnx(module, ids, keys, tmp: Path, folder: Path) -> None:
    import torch

    fp32 = graph_path(folder, ENGINE_ONNXRUNTIME, "fp32")
    if not fp32.exists():
        seq = torch.export.Dim("seq", min=1, max=8192)
        path = tmp / fp32.name
        torch.onnx.export(
            module, (ids, keys), str(path), dynamo=True, opset_version=18, input_names=["input_ids", "key_mask"],
            output_names=["vectors"], dynamic_shapes={"input_ids": {1: seq}, "key_mask": {1: seq}},
            external_data=False,
        )
        os.replace(path, fp32)
    int8 = graph_path(folder, ENGINE_ONNXRUNTIME, "int8")
    if not int8.exists():
        from onnxruntime.quantization import QuantType, quantize_dynamic

        path = tmp / int8.name
        quantize_dynamic(str(fp32), str(path), weight_type=QuantType.QInt8)
        os.replace(path, int8)


def _export_openvino(module, ids, keys, tmp: Path, folder: Path) -> None:
    import openvino as ov

    model = None
    for fmt in PEER_FORMATS[ENGINE_OPENVINO]:
        final = graph_path(folder, ENGINE_OPENVINO, fmt)
        if final.exists():
            continue
        if model is None:
            model = ov.convert_model(module, example_input=(ids, keys))
        out = model
        if fmt == "int8":
            import nncf

            out = nncf.compress_weights(model.clone(), mode=nncf.CompressWeightsMode.INT8_ASYM)
        path = tmp / final.name
        ov.save_model(out, str(path), compress_to_fp16=False)
        # The .bin first: a reader that finds the .xml finds its weights too.
        os.replace(path.with_suffix(".bin"), final.with_suffix(".bin"))
        os.replace(path, final)


# --- the engines ------------------------------------------------------------------------------------


class GraphEngine:
    """``regimes.Engine`` over an exported graph; texts are prepared exactly as the reference prepares them."""

    def __init__(self, checkpoint: Path, run_graph, query_expansion: str | None):
        from lfm2edge.convert.checkpoint import resolve
        from lfm2edge.convert.reference import ReferenceEncoder

        ckpt = resolve(checkpoint)
        tokenizer = ckpt.load_tokenizer()
        # Only the reference's text preparation (tokenize_query / tokenize_document): no torch model.
        self.prep = ReferenceEncoder(None, tokenizer, ckpt.retrieval_settings(tokenizer))
        self.settings = self.prep.settings
        self.colbert = self.settings.is_colbert
        self._run = run_graph
        self.query_expansion = (query_expansion or "pylate") if self.colbert else None
        probe = self._vectors(*self.prep.tokenize_document("dimension probe"))
        self.dim = int(probe.shape[-1])

    def _vectors(self, ids: np.ndarray, keys: np.ndarray) -> np.ndarray:
        return self._run(ids.astype(np.int64)[None], keys.astype(bool)[None])

    def _count(self, text: str) -> int:
        return len(self.prep.tokenizer.encode(text).ids)

    def query_length(self, text: str) -> int:
        s = self.settings
        return self._count(text.strip()) + 1 if self.colbert else self._count((s.query_prefix + text).strip())

    def document_length(self, text: str) -> int:
        s = self.settings
        return self._count(text.strip()) + 1 if self.colbert else self._count((s.document_prefix + text).strip())

    def prepared_query_length(self, text: str) -> int:
        return len(self.prep.tokenize_query(text, self.query_expansion or "pylate")[0])

    def prepared_document_length(self, text: str) -> int:
        return len(self.prep.tokenize_document(text)[0])

    def _dense(self, row: np.ndarray) -> np.ndarray:
        v = row.reshape(-1).astype(np.float32)
        return v / max(float(np.linalg.norm(v)), 1e-12) if self.settings.normalize else v

    def encode_query(self, text: str) -> np.ndarray:
        ids, keys = self.prep.tokenize_query(text, self.query_expansion or "pylate")
        out = self._vectors(ids, keys)
        return out.astype(np.float32) if self.colbert else self._dense(out)

    def encode_documents(self, texts: Sequence[str], batch_size: int) -> list[np.ndarray]:
        out = []
        for text in texts:
            ids, keep = self.prep.tokenize_document(text)
            vectors = self._vectors(ids, np.ones(len(ids), dtype=bool))
            out.append(vectors[keep].astype(np.float32) if self.colbert else self._dense(vectors))
        return out

    def rerank(self, query: str, documents: Sequence[str], top_k: int) -> np.ndarray:
        from lfm2edge.runtime.core.maxsim import maxsim

        q = self.encode_query(query)
        docs = self.encode_documents(documents, 1)
        scores = maxsim(q, docs) if self.colbert else np.stack(docs) @ q
        return np.argsort(-scores, kind="stable")[:top_k]


def onnxruntime_graph(graph: Path, threads: int):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    session = ort.InferenceSession(str(graph), opts, providers=["CPUExecutionProvider"])

    def run(ids: np.ndarray, keys: np.ndarray) -> np.ndarray:
        return session.run(None, {"input_ids": ids, "key_mask": keys})[0]

    return run, {"onnxruntime_version": ort.__version__}


def openvino_graph(graph: Path, fmt: str, threads: int):
    import openvino as ov
    import openvino.properties as props
    import openvino.properties.hint as hints

    core = ov.Core()
    config = {props.inference_num_threads: threads, hints.performance_mode: hints.PerformanceMode.LATENCY}
    if fmt == "f32":
        config[hints.inference_precision] = ov.Type.f32
    compiled = core.compile_model(str(graph), "CPU", config)
    request = compiled.create_infer_request()

    def run(ids: np.ndarray, keys: np.ndarray) -> np.ndarray:
        return np.array(request.infer({0: ids, 1: keys})[0], copy=True)

    precision = compiled.get_property(hints.inference_precision)
    precision = precision.get_type_name() if hasattr(precision, "get_type_name") else str(precision)
    return run, {"openvino_version": ov.get_version(), "inference_precision": precision}


def run(spec: SideSpec, progress: Progress) -> SideOutput:
    """One peer side: ``spec.path`` is the graph, ``spec.reference`` the checkpoint for text preparation."""
    progress("loading")
    rss_before, _ = rss()
    graph = Path(spec.path)
    t0 = time.perf_counter()
    if spec.engine == ENGINE_ONNXRUNTIME:
        run_graph, details = onnxruntime_graph(graph, spec.threads)
    else:
        run_graph, details = openvino_graph(graph, spec.format, spec.threads)
    assert spec.checkpoint is not None
    engine = GraphEngine(Path(spec.checkpoint), run_graph, spec.query_expansion)
    load_s = time.perf_counter() - t0
    rss_after_load, _ = rss()
    # An OpenVINO IR keeps its weights in the .bin beside the .xml; an ONNX graph is one file.
    size = graph.stat().st_size + (graph.with_suffix(".bin").stat().st_size if graph.suffix == ".xml" else 0)
    return run_measurements(spec, engine, progress, rss, load_s, rss_before, rss_after_load, size, details)
