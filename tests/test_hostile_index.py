"""Hostile cases for MaxSim and the index (issue 12): each runs in a child process and must end in the
expected Python exception (or return normally), never in a signal or a hang.

Covered: PackedDocuments changed after its checks, bad query arrays, every segment file truncated at
several offsets (before open, before open with the manifest updated to match, and while the index is
open and mapped), manifests tampered field by field (wrong types, unknown fields, a segment listed
twice, names that leave the folder), garbage JSON, missing and non-regular files, surrogates in texts,
ids and metadata, deep, cyclic and large metadata, and a closed encoder or index.

The parent builds three small indexes once (ColBERT float16 in two segments, ColBERT int8, dense);
each case copies one into its own folder and damages the copy.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lfm2edge.convert.synthetic import load_sample_texts
from tests.hostile import Case, check, run_cases

CORRUPT = "IndexCorruptError"
INVALID = "InvalidInputError"
RECOVER = r"restore the folder from a backup or rebuild it"

PRELUDE = r"""
import json, os, re, shutil, warnings
from pathlib import Path
import numpy as np
import lfm2edge
from lfm2edge.runtime.storage.index import Index, check_metadata
from lfm2edge.runtime.core.maxsim import PackedDocuments, maxsim

SETUP = json.loads(SETUP_JSON)
BASE = {k: Path(v) for k, v in SETUP["bases"].items()}
MODEL = SETUP["models"]
WORK = Path(SETUP["work"])
_encoders = {}
_copies = [0]


def enc(kind="cb"):
    # One encoder per model per child, n_threads=1: the machine's cores are shared.
    if MODEL[kind] not in _encoders:
        _encoders[MODEL[kind]] = lfm2edge.load(MODEL[kind], n_threads=1)
    return _encoders[MODEL[kind]]


def fresh(kind="cb"):
    _copies[0] += 1
    dst = WORK / f"{os.getpid()}-{_copies[0]}-{kind}"
    shutil.copytree(BASE[kind], dst)
    return dst


def manifest(p):
    return json.loads((p / "manifest.json").read_text())


def put_manifest(p, m):
    (p / "manifest.json").write_text(json.dumps(m))


def seg(p, i=0):
    return p / "segments" / manifest(p)["segments"][i]["name"]


def resize(p, fname, at, i=0):
    # Truncate a segment file and record the new size in the manifest: the deeper checks must see it.
    os.truncate(seg(p, i) / fname, at)
    m = manifest(p)
    m["segments"][i]["files"][fname][0] = at
    put_manifest(p, m)


def opened(kind="cb", p=None):
    return Index.open(p or fresh(kind), enc(kind))


def search(index):
    return index.search("how do I reset my password?", k=3)


rng = np.random.default_rng(0)
DIM = 128  # a dimension the C kernel takes (AVX-512 or AVX2) where it runs
docs = [rng.standard_normal((n, DIM)).astype(np.float32) for n in (3, 1, 7, 2)]
q = rng.standard_normal((5, DIM)).astype(np.float32)
"""


def _maxsim_cases() -> list[Case]:
    ro = r"read-only"
    c = [
        # Mutations of a PackedDocuments after its checks: read-only, or refused at the kernel boundary.
        Case(
            "packed: offsets[0] = -1e9",
            "p = PackedDocuments.pack(docs); p.offsets[0] = -10**9; maxsim(q, p)",
            "ValueError",
            ro,
        ),
        Case(
            "packed: offsets[1] = -1000",
            "p = PackedDocuments.pack(docs); p.offsets[1] = -1000; maxsim(q, p)",
            "ValueError",
            ro,
        ),
        Case(
            "packed: offsets[-1] grown",
            "p = PackedDocuments.pack(docs); p.offsets[-1] = 10**6; maxsim(q, p)",
            "ValueError",
            ro,
        ),
        Case(
            "packed: offsets made writeable",
            "p = PackedDocuments.pack(docs); p.offsets.flags.writeable = True\n"
            "p.offsets[1] = -1000; maxsim(q, p)",
            "ValueError",
            "WRITEABLE",
        ),
        Case(
            "packed: vectors written",
            "p = PackedDocuments.pack(docs); p.vectors[0, 0] = 1; maxsim(q, p)",
            "ValueError",
            ro,
        ),
        Case(
            "packed: vectors made writeable",
            "p = PackedDocuments.pack(docs); p.vectors.flags.writeable = True",
            "ValueError",
            "WRITEABLE",
        ),
        Case(
            "packed: offsets attribute replaced",
            "p = PackedDocuments.pack(docs)\n"
            "object.__setattr__(p, 'offsets', np.array([-10**9, 3, 4, 11, 13]))\nmaxsim(q, p)",
            INVALID,
            "offsets from 0",
        ),
        Case(
            "packed: offsets replaced out of bounds",
            "p = PackedDocuments.pack(docs)\n"
            "object.__setattr__(p, 'offsets', np.array([0, 3, 4, 11, 10**6]))\nmaxsim(q, p)",
            INVALID,
            "offsets from 0",
        ),
        Case(
            "packed: offsets replaced decreasing",
            "p = PackedDocuments.pack(docs)\n"
            "object.__setattr__(p, 'offsets', np.array([0, 8, 4, 11, 13]))\nmaxsim(q, p)",
            INVALID,
            "offsets must increase",
        ),
        Case(
            "packed: offsets replaced by floats",
            "p = PackedDocuments.pack(docs)\n"
            "object.__setattr__(p, 'offsets', np.array([0, 3.0, 4, 11, 13]))\nmaxsim(q, p)",
            INVALID,
            "integer offsets",
        ),
        Case(
            "packed: vectors replaced shorter",
            "p = PackedDocuments.pack(docs)\nobject.__setattr__(p, 'vectors', p.vectors[:5])\nmaxsim(q, p)",
            INVALID,
            "offsets from 0",
        ),
        Case(
            "packed: vectors reshaped in place",
            "p = PackedDocuments.pack(docs)\nwarnings.simplefilter('ignore')\n"
            "p.vectors.shape = (26, 64)\nmaxsim(q[:, :64], p)",
            INVALID,
            "offsets from 0",
        ),
        Case(
            "packed: vectors replaced by a list",
            "p = PackedDocuments.pack(docs)\n"
            "object.__setattr__(p, 'vectors', [[0.0] * DIM] * 13)\nmaxsim(q, p)",
            INVALID,
            "numpy arrays",
        ),
        Case(
            "packed: caller's arrays changed after construction",
            "v = np.concatenate(docs).astype(np.float16); o = np.array([0, 3, 4, 11, 13])\n"
            "p = PackedDocuments(v, o); before = maxsim(q, p)\n"
            "o[1] = -10**9; o[-1] = 10**9\n"
            "assert np.array_equal(maxsim(q, p), before)\n"
            "assert v.flags.writeable and o.flags.writeable  # the caller's flags are untouched",
            None,
        ),
        Case(
            "packed: caller's vectors written after construction",
            "v = np.concatenate(docs).astype(np.float16)\n"
            "p = PackedDocuments(v, np.array([0, 3, 4, 11, 13]))\n"
            "v[:] = np.nan\nassert np.isnan(maxsim(q, p)).all()",
            None,
        ),
        # Construction refusals.
        Case(
            "packed: negative offsets",
            "PackedDocuments(np.zeros((13, DIM), np.float16), np.array([-1000, 13]))",
            INVALID,
            "offsets from 0",
        ),
        Case(
            "packed: offsets past the end",
            "PackedDocuments(np.zeros((13, DIM), np.float16), np.array([0, 14]))",
            INVALID,
            "offsets from 0",
        ),
        Case(
            "packed: uint64 offsets that wrap",
            "PackedDocuments(np.zeros((13, DIM), np.float16), np.array([0, 2**64 - 1, 13], dtype=np.uint64))",
            INVALID,
            "offsets",
        ),
        Case(
            "packed: 2-d offsets",
            "PackedDocuments(np.zeros((13, DIM), np.float16), np.array([[0, 13]]))",
            INVALID,
            "1-d integer offsets",
        ),
        Case(
            "packed: int8 vectors",
            "PackedDocuments(np.zeros((13, DIM), np.int8), np.array([0, 13]))",
            INVALID,
            "float16 or float32",
        ),
        Case(
            "packed: 3-d vectors",
            "PackedDocuments(np.zeros((1, 13, DIM), np.float16), np.array([0, 1]))",
            INVALID,
            "float16 or float32",
        ),
        Case(
            "packed: zero-width vectors",
            "PackedDocuments(np.zeros((13, 0), np.float16), np.array([0, 13]))",
            INVALID,
            "dim >= 1",
        ),
        Case(
            "pack: a document with NaN",
            "d = [x.copy() for x in docs]; d[2][1, 5] = np.nan; maxsim(q, d)",
            INVALID,
            "document 2 .*NaN",
        ),
        Case(
            "pack: a value infinite in float16",
            "d = [x.copy() for x in docs]; d[0][0, 0] = 1e6; PackedDocuments.pack(d)",
            INVALID,
            "infinite",
        ),
        Case(
            "pack: a 1-d document",
            "maxsim(q, [docs[0], docs[1][0]])",
            INVALID,
            r"document 1 .*\[tokens, dim\]",
        ),
        Case("pack: an empty document", "maxsim(q, [docs[0], np.zeros((0, DIM))])", INVALID, "no vectors"),
        Case("pack: ragged nested lists", "maxsim(q, [[[1.0, 2.0], [3.0]]])", INVALID, "not a numeric array"),
        Case("pack: one matrix instead of a list", "maxsim(q, docs[0])", INVALID, "list of"),
        Case("pack: int8 storage", "PackedDocuments.pack(docs, np.int8)", INVALID, "float16 or float32"),
        Case("pack: unknown dtype", "PackedDocuments.pack(docs, 'junk')", INVALID, "float16 or float32"),
        Case(
            "pack: documents of different sizes",
            "maxsim(q, [docs[0], docs[1][:, :64]])",
            INVALID,
            "different vector sizes",
        ),
        # Query arrays.
        Case(
            "query: NaN",
            "x = q.copy(); x[1, 2] = np.nan; maxsim(x, PackedDocuments.pack(docs))",
            INVALID,
            "NaN",
        ),
        Case("query: inf", "x = q.copy(); x[0, 0] = np.inf; maxsim(x, docs)", INVALID, "infinite"),
        Case(
            "query: float64 beyond float32",
            "x = q.astype(np.float64); x[0, 0] = 1e300; maxsim(x, docs)",
            INVALID,
            "infinite",
        ),
        Case("query: 1-d", "maxsim(q[0], docs)", INVALID, r"\[tokens, dim\]"),
        Case("query: 3-d", "maxsim(q[None], docs)", INVALID, r"\[tokens, dim\]"),
        Case("query: wrong dim", "maxsim(q[:, :64], PackedDocuments.pack(docs))", INVALID, "64 dims"),
        Case("query: no rows", "maxsim(q[:0], docs)", INVALID, "non-empty"),
        Case("query: zero width", "maxsim(np.zeros((3, 0), np.float32), docs)", INVALID, "dim >= 1"),
        Case("query: object dtype", "maxsim(q.astype(object), docs)", INVALID, "dtype object"),
        Case("query: strings", "maxsim([['a', 'b']], docs)", INVALID, "dtype <U1"),
        Case("query: complex", "maxsim(q.astype(np.complex64), docs)", INVALID, "dtype complex64"),
        Case("query: None", "maxsim(None, docs)", INVALID, "dtype object"),
        Case("query: ragged", "maxsim([[1.0] * DIM, [1.0]], docs)", INVALID, "not a numeric array"),
        Case("maxsim: threads as a string", "maxsim(q, docs, threads='2')", INVALID, "threads"),
        Case("maxsim: zero threads", "maxsim(q, docs, threads=0)", INVALID, "threads"),
        Case(
            "maxsim: every backend agrees",
            "p = PackedDocuments.pack(docs)\n"
            "assert np.allclose(maxsim(q, p), maxsim(q, p, backend='numpy'), atol=1e-3)",
            None,
        ),
    ]
    return c


# Segment files, each truncated at these fractions of its size (0 and 1 byte included).
SEGMENT_FILES = ["vectors.npy", "offsets.npy", "lines.npy", "ids.json", "docs.jsonl"]
CUTS = {"start": "0", "one byte": "1", "in the header": "60", "half": "size // 2", "last byte": "size - 1"}


def _truncation_cases() -> list[Case]:
    c = []
    for kind, files in (
        ("cb", SEGMENT_FILES),
        ("cb8", ["scales.npy", "vectors.npy"]),
        ("dn", ["vectors.npy"]),
    ):
        for fname in files:
            for cut, at in CUTS.items():
                size = f"size = (seg(p) / {fname!r}).stat().st_size"
                # Before open: the manifest's recorded size tells.
                c.append(
                    Case(
                        f"truncated before open: {kind} {fname} at {cut}",
                        f"p = fresh({kind!r}); {size}\n"
                        f"os.truncate(seg(p) / {fname!r}, {at}); opened({kind!r}, p)",
                        CORRUPT,
                        rf"{fname} has \d+ bytes, the manifest says .*{RECOVER}",
                    )
                )
                # The manifest updated to match: the header, shape and content checks must tell.
                if cut in ("one byte", "half", "last byte") or kind == "cb":
                    c.append(
                        Case(
                            f"truncated with its manifest size: {kind} {fname} at {cut}",
                            f"p = fresh({kind!r}); {size}; resize(p, {fname!r}, {at}); opened({kind!r}, p)",
                            CORRUPT,
                            rf"{fname}|segment .* cannot be read",
                        )
                    )
            # While open: the mapped files must not fault (SIGBUS) at the next search.
            for cut, at in (("start", "0"), ("half", "size // 2"), ("last byte", "size - 1")):
                mapped = fname in ("vectors.npy", "scales.npy", "docs.jsonl")
                code = (
                    f"p = fresh({kind!r}); index = opened({kind!r}, p); assert len(search(index)) == 3\n"
                    f"{size}; os.truncate(seg(p) / {fname!r}, {at})\n"
                )
                if mapped:
                    c.append(
                        Case(
                            f"truncated while open: {kind} {fname} at {cut}",
                            code + "search(index)",
                            CORRUPT,
                            rf"{fname} changed size while the index was open.*{RECOVER}",
                        )
                    )
                elif cut == "half":  # read into memory at open: searching goes on, verify() reports it
                    c.append(
                        Case(
                            f"truncated while open, not mapped: {kind} {fname}",
                            code + f"assert len(search(index)) == 3\nproblems = index.verify()\n"
                            f"assert any({fname!r} in x for x in problems), problems",
                            None,
                        )
                    )
    c.append(
        Case(
            "grown while open: vectors.npy",
            "p = fresh(); index = opened('cb', p); search(index)\n"
            "with open(seg(p) / 'vectors.npy', 'ab') as f: f.write(b'x' * 4096)\nsearch(index)",
            CORRUPT,
            "changed size while the index was open",
        )
    )
    c.append(
        Case(
            "truncated while open: verify reports it",
            "p = fresh(); index = opened('cb', p); search(index); os.truncate(seg(p) / 'vectors.npy', 10)\n"
            "problems = index.verify()\n"
            "assert any('changed size' in x for x in problems), problems\n"
            "assert any('checksum' in x for x in problems), problems",
            None,
        )
    )
    c.append(
        Case(
            "truncated while open: compact refuses before reading",
            "p = fresh(); index = opened('cb', p); os.truncate(seg(p) / 'docs.jsonl', 5); index.compact()",
            CORRUPT,
            "docs.jsonl changed size",
        )
    )
    return c


def _manifest_cases() -> list[Case]:
    def tamper(name: str, edit: str, match: str, kind: str = "cb") -> Case:
        return Case(
            f"manifest: {name}",
            f"p = fresh({kind!r}); m = manifest(p)\n{edit}\nput_manifest(p, m)\nopened({kind!r}, p)",
            CORRUPT,
            match,
        )

    s0 = "m['segments'][0]"
    c = [
        tamper("a segment listed twice", "m['segments'].append(dict(m['segments'][0]))", "already listed"),
        tamper("a segment named ../../x", f"{s0}['name'] = '../../x'", "not a segment name"),
        tamper(
            "a segment named with a slash",
            f"{s0}['name'] = '00000001-aaaa/../../../etc'",
            "not a segment name",
        ),
        tamper("a segment named absolute", f"{s0}['name'] = '/etc'", "not a segment name"),
        tamper("a segment named .", f"{s0}['name'] = '.'", "not a segment name"),
        tamper("a segment named that is not there", f"{s0}['name'] = '00000009-deadbeef'", "is missing"),
        tamper("an unknown top-level field", "m['extra'] = 1", "unknown entries"),
        tamper("an unknown segment field", f"{s0}['evil'] = '../x'", "unknown entries"),
        tamper("a missing top-level field", "del m['storage']", r"lacks \['storage'\]"),
        tamper("a missing segment field", f"del {s0}['rows']", r"lacks \['rows'\]"),
        tamper("an unknown segment file", f"{s0}['files']['evil.npy'] = [1, '0' * 64]", "unknown entries"),
        tamper("a segment file unlisted", f"del {s0}['files']['ids.json']", "lacks"),
        tamper(
            "scales listed for float16", f"{s0}['files']['scales.npy'] = [1, '0' * 64]", "unknown entries"
        ),
        tamper("scales unlisted for int8", f"del {s0}['files']['scales.npy']", "lacks", kind="cb8"),
        tamper("docs disagree with the files", f"{s0}['docs'] -= 1", "offsets.npy holds"),
        tamper("rows disagree with the files", f"{s0}['rows'] += 1", "vectors.npy holds"),
        tamper("dense rows unlike docs", f"{s0}['rows'] += 1", "must equal docs", kind="dn"),
        tamper("negative docs", f"{s0}['docs'] = -3", "docs must be an integer from 1"),
        tamper("negative rows", f"{s0}['rows'] = -1", "rows must be an integer"),
        tamper("huge rows", f"{s0}['rows'] = 10**30", "rows must be an integer"),
        tamper("a negative file size", f"{s0}['files']['vectors.npy'][0] = -1", r"vectors.npy\[0\]"),
        tamper("a file size as a string", f"{s0}['files']['vectors.npy'][0] = '12'", r"vectors.npy\[0\]"),
        tamper("a digest that is not hex", f"{s0}['files']['vectors.npy'][1] = 5", "SHA-256"),
        tamper(
            "a file record as a dict", f"{s0}['files']['vectors.npy'] = {{'size': 1}}", r"\[size, sha256\]"
        ),
        tamper("deleted row out of range", f"{s0}['deleted'] = [99]", r"deleted\[0\]"),
        tamper("deleted row negative", f"{s0}['deleted'] = [-1]", r"deleted\[0\]"),
        tamper("deleted row twice", f"{s0}['deleted'] = [0, 0]", r"deleted\[1\]"),
        tamper("deleted row as a float", f"{s0}['deleted'] = [1.5]", r"deleted\[0\]"),
        tamper("deleted as a string", f"{s0}['deleted'] = '1'", "deleted must be a list"),
        tamper(
            "the same id live in two segments",
            "import hashlib\nsrc = json.loads((seg(p, 0) / 'ids.json').read_text())\n"
            "ids = json.loads((seg(p, 1) / 'ids.json').read_text()); ids[0] = src[0]\n"
            "data = json.dumps(ids).encode(); (seg(p, 1) / 'ids.json').write_bytes(data)\n"
            "m['segments'][1]['files']['ids.json'] = [len(data), hashlib.sha256(data).hexdigest()]",
            "live in two segments",
        ),
    ]
    fields = {
        "generation": ("'1'", "-1", "True", "1.5"),
        "next_id": ("None", "-5", "2**70"),
        "model": ("'colbert'", "[]"),
        "model.identity": ("5", "''"),
        "model.kind": ("'other'", "None"),
        "model.dim": ("'16'", "0", "10**9", "16.0"),
        "model.path": ("5",),
        "storage": ("None",),
        "storage.dtype": ("'float32'", "None"),
        "storage.pool_factor": ("'2'", "0", "10**9"),
        "storage.store_texts": ("'yes'", "1"),
        "segments": ("{}", "'x'", "[[]]"),
        "segments[0].name": ("5", "None"),
        "segments[0].docs": ("'3'", "None", "3.0"),
        "segments[0].files": ("[]",),
    }
    for field, values in fields.items():
        target = "m" + "".join(
            f"[{part.split('[')[0]!r}][{part.split('[')[1][:-1]}]" if "[" in part else f"[{part!r}]"
            for part in field.split(".")
        )
        for v in values:
            c.append(tamper(f"{field} = {v}", f"{target} = {v}", "lacks or mangles a field"))
    c += [
        tamper("version 2", "m['version'] = 2", "format version 2"),
        tamper("version true", "m['version'] = True", "format version True"),
        tamper("no format", "del m['format']", "not an lfm2edge index manifest"),
    ]

    def garbage(name: str, data: str) -> Case:
        return Case(
            f"manifest garbage: {name}",
            f"p = fresh(); (p / 'manifest.json').write_bytes({data})\nopened('cb', p)",
            CORRUPT,
            "manifest",
        )

    c += [
        garbage("torn JSON", "(p / 'manifest.json').read_bytes()[:100]"),
        garbage("binary", "bytes(range(256)) * 4"),
        garbage("not UTF-8", 'b\'{"format": "\\xff\\xfe"}\''),
        garbage("a list", "b'[]'"),
        garbage("null", "b'null'"),
        garbage("empty", "b''"),
        garbage("nested 100000 deep", "b'[' * 100000 + b']' * 100000"),
        garbage(
            "a number too big for a float",
            "re.sub(rb'\"dim\": \\d+', b'\"dim\": 1e400', (p / 'manifest.json').read_bytes())",
        ),
        garbage(
            "NaN",
            "re.sub(rb'\"generation\": \\d+', b'\"generation\": NaN', (p / 'manifest.json').read_bytes())",
        ),
    ]
    # Tampered while open: the next search adopts the new manifest, so it must refuse it.
    c += [
        Case(
            "manifest tampered while open: a segment listed twice",
            "p = fresh(); index = opened('cb', p); search(index)\nm = manifest(p); m['generation'] += 1\n"
            "m['segments'].append(dict(m['segments'][0])); put_manifest(p, m)\nsearch(index)",
            CORRUPT,
            "already listed",
        ),
        Case(
            "manifest tampered while open: verify reports it",
            "p = fresh(); index = opened('cb', p)\nm = manifest(p); m['segments'][0]['name'] = '../../x'\n"
            "put_manifest(p, m)\nproblems = index.verify()\n"
            "assert any('not a segment name' in x for x in problems), problems",
            None,
        ),
        Case(
            "manifest torn while open",
            "p = fresh(); index = opened('cb', p); search(index)\n"
            "(p / 'manifest.json').write_text('{\"format\": ')\nsearch(index)",
            CORRUPT,
            "cannot be read",
        ),
    ]
    return c


def _segment_content_cases() -> list[Case]:
    def content(name: str, edit: str, match: str, at_search: bool = False) -> Case:
        # Same size as before (so the manifest's size check passes) or with the manifest updated.
        tail = "search(opened('cb', p))" if at_search else "opened('cb', p)"
        return Case(f"segment content: {name}", f"p = fresh(); d = seg(p)\n{edit}\n{tail}", CORRUPT, match)

    def rewrite(fname: str, expr: str) -> str:
        return (
            f"data = {expr}\n(d / {fname!r}).write_bytes(data)\nm = manifest(p)\n"
            f"m['segments'][0]['files'][{fname!r}][0] = len(data); put_manifest(p, m)"
        )

    def npy(fname: str, array: str) -> str:
        return f"import io\nb = io.BytesIO(); np.save(b, {array}); " + rewrite(fname, "b.getvalue()")

    offs = "np.load(d / 'offsets.npy')"
    lines = "np.load(d / 'lines.npy')"
    return [
        content(
            "offsets going backwards",
            npy("offsets.npy", f"{offs}[::-1].copy()"),
            "offsets.npy does not split",
        ),
        content(
            "offsets beyond the rows", npy("offsets.npy", f"{offs} * 1000"), "offsets.npy does not split"
        ),
        content(
            "offsets as float64",
            npy("offsets.npy", f"{offs}.astype(np.float64)"),
            "offsets.npy holds float64",
        ),
        content(
            "offsets in Fortran order 2-d",
            npy("offsets.npy", f"np.asfortranarray({offs}[None].repeat(2, 0))"),
            "offsets.npy holds",
        ),
        content("lines beyond docs.jsonl", npy("lines.npy", f"{lines} * 1000"), "lines.npy does not split"),
        content(
            "lines going backwards", npy("lines.npy", f"{lines}[::-1].copy()"), "lines.npy does not split"
        ),
        content(
            "vectors as float32",
            npy("vectors.npy", "np.load(d / 'vectors.npy').astype(np.float32)"),
            "vectors.npy holds float32",
        ),
        content(
            "vectors as a pickled object array",
            npy("vectors.npy", "np.array([None, 1], dtype=object)"),
            "vectors.npy",
        ),
        content(
            "vectors with a huge shape in the header",
            rewrite(
                "vectors.npy",
                "(d / 'vectors.npy').read_bytes().replace(b\"'shape': (\", b\"'shape': (99999999999\", 1)",
            ),
            "vectors.npy",
        ),
        content(
            "vectors with a garbage header",
            rewrite("vectors.npy", "b'\\x93NUMPY\\x01\\x00\\x10\\x00{garbage}' + b' ' * 40"),
            "not a .npy file",
        ),
        content("ids not a list", rewrite("ids.json", "b'{\"a\": 1}'"), "ids.json does not list"),
        content(
            "ids not strings", rewrite("ids.json", "json.dumps(list(range(3))).encode()"), "ids.json entry 0"
        ),
        content("ids repeated", rewrite("ids.json", "json.dumps(['x'] * 3).encode()"), "lists an id twice"),
        content(
            "ids with a surrogate", rewrite("ids.json", 'b\'["\\\\ud800", "b", "c"]\''), "not valid Unicode"
        ),
        content("ids garbage", rewrite("ids.json", "b'\\xff' * 10"), "cannot be read"),
        content("ids nested deep", rewrite("ids.json", "b'[' * 100000 + b']' * 100000"), "cannot be read"),
        content(
            "docs.jsonl garbled at the same size",
            "n = (d / 'docs.jsonl').stat().st_size; (d / 'docs.jsonl').write_bytes(b'\\xff' * n)",
            r"docs.jsonl line \d+ cannot be read",
            at_search=True,
        ),
        content(
            "docs.jsonl records of the wrong shape",
            "n = (d / 'docs.jsonl').stat().st_size\n"
            "(d / 'docs.jsonl').write_bytes(b'[' + b' ' * (n - 3) + b']\\n')",
            r"docs.jsonl line \d+",
            at_search=True,
        ),
        Case(
            "segment content: a file replaced by a folder",
            "p = fresh(); f = seg(p) / 'vectors.npy'; f.unlink(); f.mkdir(); opened('cb', p)",
            CORRUPT,
            "not a regular file",
        ),
        Case(
            "segment content: a file replaced by a FIFO (must not block)",
            "p = fresh(); f = seg(p) / 'docs.jsonl'; f.unlink(); os.mkfifo(f); opened('cb', p)",
            CORRUPT,
            "not a regular file",
        ),
        Case(
            "segment content: a file replaced by a link to /dev/zero",
            "p = fresh(); f = seg(p) / 'vectors.npy'; f.unlink(); f.symlink_to('/dev/zero'); opened('cb', p)",
            CORRUPT,
            "not a regular file",
        ),
        Case(
            "segment content: a missing file",
            "p = fresh(); (seg(p) / 'offsets.npy').unlink(); opened('cb', p)",
            CORRUPT,
            f"offsets.npy is missing.*{RECOVER}",
        ),
        Case(
            "segment content: a missing folder",
            "p = fresh(); shutil.rmtree(seg(p, 1)); opened('cb', p)",
            CORRUPT,
            "is missing",
        ),
        Case(
            "segment content: the segments folder missing",
            "p = fresh(); index = opened('cb', p); shutil.rmtree(p / 'segments')\nindex.add(['x'])",
            CORRUPT,
            "segments/ folder is missing",
        ),
    ]


def _input_cases() -> list[Case]:
    return [
        Case("text: surrogate in add", "opened().add(['fine', 'a\\ud800b'])", INVALID, r"text 1 .*surrogate"),
        Case("text: surrogate as a single add", "opened().add('\\udfff')", INVALID, "surrogate"),
        Case("text: surrogate in search", "opened().search('a\\ud800b')", INVALID, r"query .*surrogate"),
        Case("text: surrogate in search_many", "opened().search_many(['ok', '\\udc00'])", INVALID, "query 1"),
        Case("text: surrogate in dense add", "opened('dn').add(['\\ud83d'])", INVALID, "surrogate"),
        Case("text: bytes in add", "opened().add([b'abc'])", INVALID, "decode"),
        Case("text: blank in search", "opened().search('   ')", INVALID, "whitespace"),
        Case(
            "text: nothing is added after a refusal",
            "index = opened(); n = len(index)\n"
            "try:\n    index.add(['ok', 'x\\ud800'])\nexcept lfm2edge.InvalidInputError:\n    pass\n"
            "assert len(index) == n and index.verify() == []",
            None,
        ),
        Case("id: surrogate", "opened().add(['ok'], ids=['x\\udc00'])", INVALID, r"id 0 .*surrogate"),
        Case("id: surrogate in delete", "opened().delete(['\\ud800'])", INVALID, "surrogate"),
        Case("id: too long", "opened().add(['ok'], ids=['x' * 5000])", INVALID, "id length limit is 1024"),
        Case("id: bytes", "opened().add(['ok'], ids=b'abc')", INVALID, "ids must be"),
        Case("id: not a string", "opened().add(['ok'], ids=[7])", INVALID, "id 0 is int"),
        Case("id: blank", "opened().add(['ok'], ids=[' '])", INVALID, "id 0"),
        Case(
            "metadata: surrogate value",
            "opened().add(['ok'], metadata=[{'k': 'a\\ud800'}])",
            INVALID,
            r"metadata 0 .*not valid Unicode",
        ),
        Case(
            "metadata: surrogate key",
            "opened().add(['ok'], metadata=[{'\\udfff': 1}])",
            INVALID,
            "not valid Unicode",
        ),
        Case(
            "metadata: nested 254 deep",
            "m = {}\ncur = m\nfor _ in range(254):\n    cur['a'] = {}\n    cur = cur['a']\n"
            "opened().add(['ok'], metadata=[m])",
            INVALID,
            "depth limit is 32",
        ),
        Case(
            "metadata: nested 100000 deep in lists",
            "m = []\nfor _ in range(100000):\n    m = [m]\nopened().add(['ok'], metadata=[{'a': m}])",
            INVALID,
            "depth limit is 32",
        ),
        Case(
            "metadata: a cycle",
            "m = {}; m['self'] = m; opened().add(['ok'], metadata=[m])",
            INVALID,
            "depth limit",
        ),
        Case(
            "metadata: one large string",
            "opened().add(['ok'], metadata=[{'k': 'x' * 100_000}])",
            INVALID,
            "size limit is 65536 bytes",
        ),
        Case(
            "metadata: a million small values",
            "opened().add(['ok'], metadata=[{'k': [0] * 1_000_000}])",
            INVALID,
            "size limit is 65536",
        ),
        Case(
            "metadata: NaN",
            "opened().add(['ok'], metadata=[{'k': float('nan')}])",
            INVALID,
            "not JSON-serialisable",
        ),
        Case(
            "metadata: at the limits is stored and returned",
            "m = {}\ncur = m\nfor _ in range(31):\n    cur['a'] = {}\n    cur = cur['a']\n"
            "cur['a'] = 1\nindex = opened(); index.add(['ok'], ids=['deep'], metadata=[m])\n"
            "hit = [h for h in index.search('ok', k=100) if h.id == 'deep'][0]\nassert hit.metadata == m",
            None,
        ),
        Case(
            "metadata: the server's own depth limit",
            "check_metadata([{'a': {'b': {'c': 1}}}], 1, max_depth=2)",
            INVALID,
            "depth limit is 2",
        ),
        Case(
            "metadata: the server's own size limit",
            "check_metadata([{'a': 'x' * 50}], 1, max_bytes=32)",
            INVALID,
            "size limit is 32 bytes",
        ),
        Case(
            "metadata: one dict for two texts",
            "opened().add(['a', 'b'], metadata={'k': 1})",
            INVALID,
            "list of 2 dicts",
        ),
        Case(
            "search_vectors: NaN query",
            "index = opened(); x = np.full((4, index.settings.dim), np.nan, np.float32)\n"
            "index.search_vectors([x])",
            INVALID,
            "finite",
        ),
        Case(
            "search_vectors: empty ColBERT query",
            "index = opened(); index.search_vectors([np.zeros((0, index.settings.dim), np.float32)])",
            INVALID,
            "non-empty",
        ),
        Case("search_vectors: string query", "opened().search_vectors(['abc'])", INVALID, "real numbers"),
        Case(
            "search_vectors: ragged query",
            "opened().search_vectors([[[1.0, 2.0], [1.0]]])",
            INVALID,
            "real numbers",
        ),
        Case("search_vectors: a bare string", "opened().search_vectors('abc')", INVALID, "use search"),
        Case("search: k as a bool", "opened().search('ok', k=True)", INVALID, "k must be"),
    ]


def _lifecycle_cases() -> list[Case]:
    return [
        Case(
            "closed encoder: search",
            "e = lfm2edge.load(MODEL['cb'], n_threads=1); index = Index.open(fresh(), e); e.close()\n"
            "index.search('q')",
            "EncoderClosedError",
            "closed.*open the index with a loaded encoder",
        ),
        Case(
            "closed encoder: add",
            "e = lfm2edge.load(MODEL['dn'], n_threads=1); index = Index.open(fresh('dn'), e); e.close()\n"
            "index.add(['x'])",
            "EncoderClosedError",
            "closed.*open the index with a loaded encoder",
        ),
        Case(
            "closed encoder: search_many after a with block",
            "with lfm2edge.load(MODEL['cb'], n_threads=1) as e:\n    index = Index.open(fresh(), e)\n"
            "index.search_many(['q'])",
            "EncoderClosedError",
            "closed",
        ),
        Case(
            "closed encoder: open",
            "e = lfm2edge.load(MODEL['cb'], n_threads=1); e.close(); Index.open(fresh(), e)",
            "EncoderClosedError",
            "open the index with a loaded encoder",
        ),
        Case(
            "closed encoder: create",
            "e = lfm2edge.load(MODEL['cb'], n_threads=1); e.close()\n"
            "Index.create(WORK / f'new-{os.getpid()}', e)",
            "EncoderClosedError",
            "closed",
        ),
        Case(
            "closed encoder: search_vectors still answers",
            "e = lfm2edge.load(MODEL['cb'], n_threads=1); index = Index.open(fresh(), e)\n"
            "v = e.encode_query(['q']); e.close()\nassert len(index.search_vectors(v, k=2)[0]) == 2",
            None,
        ),
        Case(
            "closed index: search",
            "index = opened(); index.close(); index.search('q')",
            INVALID,
            "was closed; open it again",
        ),
        Case(
            "closed index: delete",
            "index = opened(); index.close(); index.delete(['a'])",
            INVALID,
            "was closed",
        ),
    ]


CASES = _maxsim_cases() + _truncation_cases() + _manifest_cases() + _segment_content_cases() + _input_cases()
CASES += _lifecycle_cases()


@pytest.fixture(scope="module")
def outcomes(colbert_encoder, embedding_encoder, colbert_gguf, embedding_gguf, tmp_path_factory):
    from lfm2edge.runtime.storage.index import Index

    sample = load_sample_texts()
    texts = [d["text"] for d in sample["documents"]][:6]
    root = tmp_path_factory.mktemp("hostile-index")
    bases = {}
    for kind, encoder, options in (
        ("cb", colbert_encoder, {}),
        ("cb8", colbert_encoder, {"dtype": "int8"}),
        ("dn", embedding_encoder, {}),
    ):
        index = Index.create(root / f"base-{kind}", encoder, **options)
        index.add(
            texts, ids=[f"d{i}" for i in range(6)], metadata=[{"n": i} for i in range(6)], commit_every=3
        )
        assert index.info()["segments"] == 2  # listings and live ids across segments are tested
        bases[kind] = str(index.path)
    (root / "work").mkdir()
    setup = {
        "bases": bases,
        "models": {"cb": str(colbert_gguf), "cb8": str(colbert_gguf), "dn": str(embedding_gguf)},
        "work": str(root / "work"),
    }
    prelude = f"SETUP_JSON = {json.dumps(json.dumps(setup))}\n" + PRELUDE
    return run_cases(CASES, prelude=prelude, timeout_s=60, cwd=str(Path(__file__).resolve().parent.parent))


def test_there_are_enough_cases():
    assert len(CASES) >= 60


@pytest.mark.parametrize("name", [c.name for c in CASES])
def test_hostile_index(outcomes, name):
    check(outcomes[name])
