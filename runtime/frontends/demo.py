"""``make demo``: checkpoint -> GGUF (the build's fastest type: bf16 on AMX, q8_0 on AVX512-VNNI) -> multilingual FAQ search, with query latency.

MODEL is a hub id (default LiquidAI/LFM2.5-ColBERT-350M), a checkpoint folder or a GGUF.
Where the hub cannot be reached, a full-size random checkpoint of the real shape stands in:
its rankings are meaningless and only its latency is real, and the demo says so.

The converter (and, for the stand-in, the synthetic generator with torch) is imported only when
a checkpoint has to be converted: with a GGUF the demo needs the runtime alone.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from importlib import resources
from pathlib import Path
from typing import Literal

from lfm2edge.runtime.core.errors import CheckpointError, Lfm2EdgeError

DEFAULT_MODEL = "LiquidAI/LFM2.5-ColBERT-350M"
# The random stand-in's shape: "full" is the real 350M model (real latency); "tiny" runs in seconds (tests).
StandInShape = Literal["full", "tiny"]
DEMO_QUERIES = [
    ("en", "Can I get my money back if my yearly Pro plan just renewed?"),
    ("de", "Wie schalte ich die Zwei-Faktor-Authentifizierung ein?"),
    ("ko", "Halo 스피커를 블루투스로 연결하려면 버튼을 몇 초 동안 눌러야 하나요?"),
    ("sv", "Vad händer om jag ändrar samma anteckning offline på två enheter?"),
    ("ar", "كم يومًا يستغرق الشحن العادي داخل أوروبا؟"),
    ("ja", "購入した商品は何日以内なら返品できますか？"),
    ("es", "¿Cuántos meses de garantía tiene el portátil Fjell 14?"),
    ("fr", "Quel raccourci clavier crée une nouvelle note ?"),
]


def faq_entries() -> list[dict]:
    text = resources.files("lfm2edge.runtime").joinpath("data/faq.jsonl").read_text("utf-8")
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def cache_dir() -> Path:
    return Path(os.environ.get("LFM2EDGE_CACHE", Path.home() / ".cache" / "lfm2edge")) / "demo"


def prepare_model(model: str, outtype: str, stand_in: StandInShape = "full") -> tuple[Path, bool]:
    """(a GGUF path, whether its weights are random stand-ins)."""
    if model.endswith(".gguf"):
        return Path(model), False
    from lfm2edge.convert.checkpoint import resolve
    from lfm2edge.convert.pipeline import convert

    random_weights = False
    try:
        checkpoint = resolve(model)
    except CheckpointError as e:
        if Path(model).exists() or not _hub_unreachable(e):
            raise
        print(f"!! {e}", flush=True)
        if stand_in == "full":
            print("!! Using a full-size RANDOM checkpoint of the real shape instead: rankings below are "
                  "MEANINGLESS, only the latency is real.", flush=True)
        else:
            print("!! Using a tiny RANDOM checkpoint of the real layout instead: rankings and latency below "
                  "are MEANINGLESS.", flush=True)
        checkpoint = resolve(_random_checkpoint(stand_in))
        random_weights = True
    out = cache_dir() / f"{Path(checkpoint.source).name}-{outtype}.gguf"
    if not out.exists():
        print(f"converting {checkpoint.source} to {out} ...", flush=True)
        out.parent.mkdir(parents=True, exist_ok=True)
        convert(checkpoint, out, outtype, progress=True)
    return out, random_weights


def _hub_unreachable(error: CheckpointError) -> bool:
    """Whether resolve() failed because the hub could not be reached (offline, no cached copy)."""
    from huggingface_hub.errors import LocalEntryNotFoundError

    return isinstance(error.__cause__, LocalEntryNotFoundError)


def _random_checkpoint(stand_in: StandInShape) -> Path:
    """The random ColBERT checkpoint of the real layout, generated once into the demo's cache."""
    from lfm2edge.convert.synthetic import FULL, TINY, make_checkpoint

    folder = cache_dir() / f"random-colbert-{stand_in}"
    if not (folder / "config.json").exists():
        print(f"generating {folder} ...", flush=True)
        make_checkpoint(folder, "colbert", FULL if stand_in == "full" else TINY)
    return folder


def run(
    model: str,
    outtype: str | None = None,
    threads: int | None = None,
    top_k: int = 3,
    stand_in: StandInShape = "full",
) -> None:
    import lfm2edge
    from lfm2edge.runtime.core.build import build_info

    outtype = outtype or build_info().fastest_type()

    gguf, random_weights = prepare_model(model, outtype, stand_in)
    enc = lfm2edge.load(gguf, n_threads=threads)
    print(f"model: {gguf} ({enc.kind.value}, {enc.dim}-d), {enc.build.describe()}")
    attention = "flash attention over F32 K and V" if enc.flash_attention else "no flash attention"
    expansion = f"query expansion: {enc.query_expansion}; " if getattr(enc, "query_expansion", None) else ""
    print(f"{expansion}exact mode ({attention})")
    entries = faq_entries()
    texts = [f"{e['question']} {e['answer']}" for e in entries]
    t0 = time.perf_counter()
    docs = enc.encode_document(texts, batch_size=16, show_progress_bar=True)
    print(f"indexed {len(texts)} FAQ entries in {time.perf_counter() - t0:.1f} s")
    from lfm2edge.runtime.core.maxsim import PackedDocuments

    packed = PackedDocuments.pack(docs, "float16") if enc.kind.value == "late_interaction" else docs
    enc.encode_query("warm-up")
    latencies = []
    for lang, query in DEMO_QUERIES:
        t = time.perf_counter()
        scores = enc.similarity(enc.encode_query(query), packed)
        latencies.append((time.perf_counter() - t) * 1000)
        print(f"\n[{lang}] {query}   ({latencies[-1]:.1f} ms: encode + score {len(texts)} entries)")
        for rank, i in enumerate(scores.argsort()[::-1][:top_k], 1):
            print(f"  {rank}. {scores[i]:7.3f}  [{entries[i]['lang']}/{entries[i]['topic']}] {entries[i]['question']}")
    print(f"\nquery latency over {len(latencies)} queries: p50 {statistics.median(latencies):.1f} ms, "
          f"max {max(latencies):.1f} ms ({enc.n_threads} threads)")
    if random_weights:
        real = "the latency is real" if stand_in == "full" else "so is the latency of this tiny model"
        print(f"!! Reminder: random weights. The rankings above are meaningless; {real}.")
    enc.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=DEFAULT_MODEL, help="hub id, checkpoint folder or GGUF")
    parser.add_argument("--outtype", default=None, help="GGUF type (default: the build's fastest, BuildInfo.fastest_type(): bf16 on AMX, q8_0 on AVX512-VNNI)")
    parser.add_argument("--threads", "-t", type=int, default=None,
                        help="CPU threads (default: every CPU this process may use)")
    parser.add_argument("--stand-in", choices=("full", "tiny"), default="full",
                        help="shape of the random checkpoint used where the hub cannot be reached "
                             "(tiny: seconds, for tests; its latency means nothing)")
    args = parser.parse_args(argv)
    try:
        run(args.model, args.outtype, args.threads, stand_in=args.stand_in)
    except Lfm2EdgeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
