"""Index a folder of .txt and .md files, keep the index in step with it, and answer a query.

    python examples/search_folder.py LFM2.5-ColBERT-350M-Q8_0.gguf ~/notes "how do I renew my passport?"

This is the pattern a desktop app follows: open (or create) a persistent index at start-up, sync it
with the documents, then answer queries in milliseconds. Each paragraph is one document whose id is
its file, position and a hash of its text, so a later run encodes only new or edited paragraphs and
deletes those that are gone. Paragraphs longer than the model's document length (512 tokens) are
truncated by the model; split long ones further if that matters for you.

A file that cannot be read is skipped with a warning; any other failure is one ``error:`` line and
lfm2edge's exit code. An interrupted sync keeps what it committed: the next run adds the rest.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
from pathlib import Path

import lfm2edge
from lfm2edge.cli import describe_error
from lfm2edge.runtime.storage.index import Index

SUFFIXES = {".txt", ".md"}
MAX_FILE_BYTES = 64 << 20  # larger files are skipped: notes are not that big, a stray dump might be


def paragraphs(folder: Path) -> dict[str, tuple[str, dict]]:
    """id -> (text, metadata) for each paragraph of each .txt/.md file in ``folder``, hidden ones skipped."""
    found: dict[str, tuple[str, dict]] = {}
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder)
        if (
            path.suffix.lower() not in SUFFIXES
            or not path.is_file()
            or any(p.startswith(".") for p in rel.parts)
        ):
            continue
        # A file name that is not valid UTF-8 keeps its bytes visible as escapes, so ids stay stable.
        name = os.fsencode(rel.as_posix()).decode("utf-8", "backslashreplace")
        try:
            if path.stat().st_size > MAX_FILE_BYTES:
                print(f"warning: skipped {name}: over {MAX_FILE_BYTES >> 20} MiB", file=sys.stderr)
                continue
            text = path.read_text(encoding="utf-8", errors="replace")
        except OSError as e:  # removed meanwhile, unreadable: the rest of the folder still syncs
            print(f"warning: skipped {name}: {e.strerror or e}", file=sys.stderr)
            continue
        for n, para in enumerate(p.strip() for p in text.split("\n\n")):
            if para:
                digest = hashlib.sha256(para.encode()).hexdigest()[:12]
                found[f"{name}#{n}:{digest}"] = (para, {"path": name, "paragraph": n})
    return found


def sync(index: Index, folder: Path) -> tuple[int, int]:
    """Make the index hold exactly the folder's paragraphs; (added, removed)."""
    wanted = paragraphs(folder)
    stale = [d for d in index.ids() if d not in wanted]
    if stale:
        index.delete(stale)
    new = [d for d in wanted if d not in index]
    if new:
        index.add(
            [wanted[d][0] for d in new], ids=new, metadata=[wanted[d][1] for d in new], show_progress_bar=True
        )
    return len(new), len(stale)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", type=Path, help="an LFM2 retriever GGUF (ColBERT or Embedding)")
    parser.add_argument("folder", type=Path, help="the folder of .txt/.md files")
    parser.add_argument("query", nargs="+", help="one or more queries")
    parser.add_argument("--index", type=Path, help="where the index lives (default: FOLDER/.lfm2edge-index)")
    parser.add_argument("-k", type=int, default=5, help="results per query")
    parser.add_argument("--threads", type=int, help="CPU threads for the model")
    args = parser.parse_args()
    try:
        run(args)
    except Exception as e:
        message, code = describe_error(e)
        print(f"error: {message}", file=sys.stderr)
        sys.exit(code)


def run(args: argparse.Namespace) -> None:
    if not args.folder.is_dir():
        raise lfm2edge.InvalidInputError(f"{args.folder} is not a folder; give the folder of your notes")
    with lfm2edge.load(args.model, n_threads=args.threads) as encoder:
        index = Index.open_or_create(args.index or args.folder / ".lfm2edge-index", encoder)
        added, removed = sync(index, args.folder)
        print(f"index: {len(index)} paragraphs ({added} encoded now, {removed} removed)")
        for query, hits in zip(args.query, index.search_many(args.query, k=args.k), strict=True):
            print(f"\n{query}")
            for hit in hits:
                snippet = " ".join((hit.text or "").split())[:100]
                path = (hit.metadata or {}).get("path", hit.id)
                print(f"  {hit.score:8.3f}  {path}  {snippet}")


if __name__ == "__main__":
    main()
