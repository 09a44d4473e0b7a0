"""Hostile use of the encoders (issue 12): every case runs in a child process and must end in the
expected Python exception (or return), never a signal or a hang.

Covered: every public call after close() for both kinds, a ``with`` block then a call, close()
twice, close() from another thread while an encode of 200 texts runs (at a chosen decode and at
several delays), interpreter exit with a decode in flight, lone surrogates in every entry point,
empty lists, bad batch_size / n_threads / max_batch_tokens / top_k, token ids outside the
vocabulary fed to the context directly or through a GGUF's marker settings, and the low-level
model and context after their own close().
"""

from __future__ import annotations

import shutil
import struct
from pathlib import Path

import pytest

from tests.hostile import Case, check, run_cases

# Fixtures of the child process: the two tiny encoders, shared by the cases that leave them open.
PRELUDE = """
import subprocess, sys, threading, time
import numpy as np
import llama_cpp as ll
import lfm2edge
from lfm2edge.runtime.core.errors import EncoderClosedError, InvalidInputError
from lfm2edge.runtime.core.llama import EmbeddingContext

PATHS = {paths!r}
col = lfm2edge.load(PATHS["colbert"], n_threads=1)
emb = lfm2edge.load(PATHS["embedding"], n_threads=1)
TEXTS = [f"document number {{i}}, about topic {{i % 7}}" for i in range(200)]
CLOSED = "does not matter: the encoder is closed"


def fresh(kind):
    return lfm2edge.load(PATHS[kind], n_threads=1)


def closed(kind):
    enc = fresh(kind)
    enc.close()
    return enc


def settle(results):
    # Each encode either completed (all 200 results) or stopped with EncoderClosedError; anything
    # else is a defect and is raised here.
    for r in results:
        if not (r == "done" or isinstance(r, EncoderClosedError)):
            raise r


def encode_into(enc, results, batch_size):
    try:
        out = enc.encode_document(TEXTS, batch_size=batch_size)
        assert len(out) == len(TEXTS)
        results.append("done")
    except BaseException as e:
        results.append(e)


def close_after(kind, delay, batch_size=1, workers=1):
    # close() from another thread while `workers` threads encode 200 texts; then a call must raise.
    enc = fresh(kind)
    results = []
    threads = [threading.Thread(target=encode_into, args=(enc, results, batch_size)) for _ in range(workers)]
    for t in threads:
        t.start()
    time.sleep(delay)
    enc.close()
    for t in threads:
        t.join(60)
    assert not any(t.is_alive() for t in threads), "an encode did not end after close()"
    settle(results)
    assert enc.closed
    enc.encode_document(["after close"])


def close_at_decode(kind, n):
    # close() from another thread while decode call n is in flight: it waits for that decode (which
    # must still succeed on live memory), and the encode stops with EncoderClosedError before the next.
    enc = fresh(kind)
    decode, calls, started = enc._ctx.decode, [], threading.Event()

    def probe(*args, **kwargs):
        calls.append(1)
        if len(calls) == n:  # hold this decode until close() has been called
            started.set()
            deadline = time.monotonic() + 30
            while not enc.closed and time.monotonic() < deadline:
                time.sleep(0.001)
        return decode(*args, **kwargs)

    enc._ctx.decode = probe
    results = []
    worker = threading.Thread(target=encode_into, args=(enc, results, 1))
    worker.start()
    assert started.wait(60), "the encode never reached the decode"
    enc.close()
    worker.join(60)
    settle(results)
    assert results != ["done"], "the encode went on after close()"
    assert len(calls) == n, f"{{len(calls)}} decodes ran, close() came during decode {{n}}"
    raise results[0]


def run_script(code):
    # A separate interpreter: its exit (with __del__ at finalization) must be clean.
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, f"exit code {{proc.returncode}}: {{proc.stderr[-2000:]}}"
    for bad in ("Traceback", "Exception ignored"):
        assert bad not in proc.stderr, proc.stderr[-2000:]
"""

CLOSED_MATCH = r"closed.*load it again"
SURROGATE = r"surrogate"
KINDS = {"colbert": "col", "embedding": "emb"}


def _lifecycle_cases() -> list[Case]:
    cases = []
    calls = {
        "encode_query": 'enc.encode_query("q")',
        "encode_query list": 'enc.encode_query(["q", "r"])',
        "encode_query empty": "enc.encode_query([])",
        "encode_document": 'enc.encode_document("d")',
        "encode_document list": 'enc.encode_document(["d", "e"])',
        "encode_document empty": "enc.encode_document([])",
        "tokenize": 'enc.tokenize("t")',
        "rerank": 'enc.rerank("q", ["a", "b"])',
        "rerank empty": 'enc.rerank("q", [])',
        "prepare_query": 'enc.prepare_query("x")',
        "prepare_document": 'enc.prepare_document("x")',
    }
    for kind in KINDS:
        for name, call in calls.items():
            cases.append(Case(f"{kind}: {name} after close", f'enc = closed("{kind}")\n{call}',
                              "EncoderClosedError", CLOSED_MATCH))
        cases.append(Case(f"{kind}: with block then a call", (
            f'with fresh("{kind}") as enc:\n'
            '    enc.encode_query("inside")\n'
            'enc.encode_query("after")'), "EncoderClosedError", CLOSED_MATCH))
        cases.append(Case(f"{kind}: close twice, closed says so", (
            f'enc = fresh("{kind}")\n'
            "assert not enc.closed\n"
            "enc.close()\n"
            "enc.close()\n"
            "assert enc.closed"), None))
        cases.append(Case(f"{kind}: similarity still works after close", (
            f'enc = fresh("{kind}")\n'
            'q, d = enc.encode_query("q"), enc.encode_document(["a", "b"])\n'
            "enc.close()\n"
            "assert enc.similarity(q, d).shape == (2,)"), None))
        cases.append(Case(f"{kind}: Index.add after close", (
            "import tempfile, pathlib\n"
            f'enc = fresh("{kind}")\n'
            'index = lfm2edge.Index.create(pathlib.Path(tempfile.mkdtemp()) / "ix", enc)\n'
            'enc.close()\nindex.add(["a document"])'), "Lfm2EdgeError", "closed"))
    cases.append(Case("colbert: close from inside a text's strip()", (
        'enc = fresh("colbert")\n'
        "class Closing(str):\n"
        "    def strip(self, *a):\n"
        "        enc.close()\n"
        "        return str(self)\n"
        'enc.encode_document(["first", Closing("closes the encoder"), "third"])'),
        "EncoderClosedError", CLOSED_MATCH))
    return cases


def _concurrency_cases() -> list[Case]:
    cases = []
    for kind in KINDS:
        for n in (1, 37, 150):
            cases.append(Case(f"{kind}: close during decode {n} of 200", f'close_at_decode("{kind}", {n})',
                              "EncoderClosedError", CLOSED_MATCH))
        for delay in (0.0, 0.002, 0.02, 0.08):
            cases.append(Case(f"{kind}: close after {delay} s of encoding 200 texts",
                              f'close_after("{kind}", {delay})', "EncoderClosedError", CLOSED_MATCH))
        cases.append(Case(f"{kind}: close during 4 threads encoding (batch 8)",
                          f'close_after("{kind}", 0.03, batch_size=8, workers=4)', "EncoderClosedError",
                          CLOSED_MATCH))
    for delay in (0.05, 0.3):
        cases.append(Case(f"interpreter exit with a decode in flight ({delay} s)", (
            "run_script(f'''\n"
            "import threading, time, lfm2edge\n"
            'enc = lfm2edge.load({PATHS["colbert"]!r}, n_threads=2)\n'
            "def work():\n"
            "    while True:\n"
            '        enc.encode_document(["some text to encode"] * 64)\n'
            "threading.Thread(target=work, daemon=True).start()\n"
            f"time.sleep({delay})\n"
            "''')"), None))
    cases.append(Case("interpreter exit with encoders in a reference cycle", (
        "run_script(f'''\n"
        "import lfm2edge\n"
        'a = lfm2edge.load({PATHS["colbert"]!r}, n_threads=1)\n'
        'b = lfm2edge.load({PATHS["embedding"]!r}, n_threads=1)\n'
        "a.other, b.other = b, a\n"
        'a.encode_query("x"); b.encode_query("y")\n'
        "''')"), None))
    return cases


def _text_cases() -> list[Case]:
    cases = []
    for kind, enc in KINDS.items():
        calls = {
            "encode_query str": f'{enc}.encode_query("a\\ud800b")',
            "encode_query list": f'{enc}.encode_query(["fine", "a\\udfffb"])',
            "encode_document str": f'{enc}.encode_document("\\ud800")',
            "encode_document list": f'{enc}.encode_document(["fine", "x \\udc80 y"])',
            "rerank query": f'{enc}.rerank("q\\ud800", ["a"])',
            "rerank document": f'{enc}.rerank("q", ["a", "b\\ud800"])',
            "rerank query, no documents": f'{enc}.rerank("q\\ud800", [])',
            "tokenize": f'{enc}.tokenize("a\\ud800")',
            "prepare_query": f'{enc}.prepare_query("a\\ud800")',
            "prepare_document": f'{enc}.prepare_document("a\\ud800")',
        }
        for name, call in calls.items():
            cases.append(Case(f"{kind}: surrogate in {name}", call, "InvalidInputError", SURROGATE))
        cases.append(Case(f"{kind}: rerank of one string, not a list", f'{enc}.rerank("q", "a document")',
                          "InvalidInputError", r"list of strings.*\[text\]"))
        cases.append(Case(f"{kind}: tokenize bytes", f'{enc}.tokenize(b"x")', "InvalidInputError", "bytes"))
    cases.append(Case("still encodes after refused texts", (
        'assert col.encode_query("fine").shape == (col.settings.query_length, col.dim)\n'
        'assert emb.encode_query("fine").shape == (emb.dim,)'), None))
    return cases


def _empty_cases() -> list[Case]:
    dense = "assert r.dtype == np.float32 and r.shape == (0, emb.dim), (r.dtype, r.shape)"
    ranking = ("assert r.indices.dtype == np.int64 and r.scores.dtype == np.float32\n"
               "assert r.indices.shape == r.scores.shape == (0,)")
    return [
        Case("embedding: encode_query([])", f"r = emb.encode_query([])\n{dense}", None),
        Case("embedding: encode_document([])", f"r = emb.encode_document([])\n{dense}", None),
        Case("embedding: encode_document(())", f"r = emb.encode_document(())\n{dense}", None),
        Case("embedding: encode_document(empty ndarray)",
             f"r = emb.encode_document(np.array([], dtype=str))\n{dense}", None),
        Case("colbert: encode_query([])", "r = col.encode_query([])\nassert r == [], r", None),
        Case("colbert: encode_document([])", "r = col.encode_document([])\nassert r == [], r", None),
        Case("embedding: rerank(q, [])", f'r = emb.rerank("q", [])\n{ranking}', None),
        Case("colbert: rerank(q, [])", f'r = col.rerank("q", [], top_k=3)\n{ranking}', None),
        Case("embedding: rerank of an empty query, no documents", 'emb.rerank("  ", [])', "InvalidInputError",
             "query is empty"),
    ]


def _option_cases() -> list[Case]:
    cases = []
    bad_counts = {"0": "0", "-1": "-1", "2**31": "2**31", "str": '"8"', "float": "2.0", "bool": "True",
                  "None": "None"}
    for label, value in bad_counts.items():
        expect = r"must be an int" if label in ("str", "float", "bool", "None") else r"between 1 and"
        if label != "None":  # None is n_threads' default
            cases.append(Case(f"load n_threads={label}",
                              f'lfm2edge.load(PATHS["colbert"], n_threads={value})', "InvalidInputError",
                              "n_threads.*" + expect))
        cases.append(Case(f"load max_batch_tokens={label}",
                          f'lfm2edge.load(PATHS["embedding"], max_batch_tokens={value})', "InvalidInputError",
                          r"max_batch_tokens.*" + (expect if label != "2**31" else r"between 1 and 32768")))
        if label != "2**31":  # a huge batch_size is only a cap: it works (below)
            expect_b = r"must be an int" if label in ("str", "float", "bool", "None") else r"at least 1"
            for kind, enc in KINDS.items():
                cases.append(Case(f"{kind}: encode_document batch_size={label}",
                                  f'{enc}.encode_document(["a"], batch_size={value})', "InvalidInputError",
                                  r"batch_size.*" + expect_b))
    cases.append(Case("embedding: rerank batch_size=0", 'emb.rerank("q", ["a"], batch_size=0)',
                      "InvalidInputError", "batch_size.*at least 1"))
    for kind, enc in KINDS.items():
        cases.append(Case(f"{kind}: batch_size=2**31 is a cap, not an error",
                          f'assert len({enc}.encode_document(["a", "b", "c"], batch_size=2**31)) == 3', None))
    for label, value in {"0": "0", "-2": "-2", "str": '"3"', "float": "2.5"}.items():
        cases.append(Case(f"colbert: rerank top_k={label}", f'col.rerank("q", ["a"], top_k={value})',
                          "InvalidInputError", "top_k"))
    cases.append(Case("load n_threads=numpy int works", (
        'enc = lfm2edge.load(PATHS["colbert"], n_threads=np.int64(1), max_batch_tokens=np.int32(64))\n'
        'assert enc.max_batch_tokens == enc.settings.document_length and enc.encode_query("q").shape[0] > 0'),
        None))
    return cases


def _decode_cases() -> list[Case]:
    vocab = r"outside this model's vocabulary of \d+ tokens"
    refused = {  # ids and shapes llama.cpp must never see: name -> (sequences, error match)
        "id = n_vocab": ("[np.array([1, col._model.n_vocab])]", vocab),
        "id -1": ("[np.array([1, -1, 5])]", "id -1 .*" + vocab),
        "id 2**31 (negative as int32)": ("[np.array([1, 2**31], dtype=np.int64)]", vocab),
        "id 2**32 + 5 (5 as int32)": ("[np.array([1, 2**32 + 5], dtype=np.int64)]", vocab),
        "uint64 max": ("[np.array([2**64 - 1], dtype=np.uint64)]", vocab),
        "bad id in the second sequence": ("[np.array([1, 2]), [1, 10**6]]", "1000000"),
        "float ids": ("[np.array([1.0, 2.0])]", "integer"),
        "2-D ids": ("[np.ones((2, 3), dtype=np.int32)]", "1-D"),
        "an empty sequence": ("[np.array([1]), []]", "non-empty"),
        "no sequences": ("[]", "non-empty"),
        "too many tokens": ("[np.ones(col._ctx.n_batch + 1, dtype=np.int32)]", "exceed this context"),
        "too many sequences": ("[np.array([1])] * (col._ctx.n_seq_max + 1)", "exceed this context"),
    }
    cases = [Case(f"context: {name}", f"col._ctx.decode({seqs})", "InvalidInputError", match)
             for name, (seqs, match) in refused.items()]
    cases += [
        Case("context: key flags of the wrong length",
             "col._ctx.decode([np.array([1, 2, 3])], [np.ones(2, bool)])", "Lfm2EdgeError",
             "key|attention-key-mask"),
        Case("model: token_text out of vocabulary", "col._model.token_text(10**9)", "InvalidInputError",
             vocab),
        Case("model: token_text of a str", 'col._model.token_text("7")', "InvalidInputError", "int"),
        Case("context still decodes after refused ids", (
            "(row,) = col._ctx.decode([np.array([1, 2, 3], dtype=np.int32)])\n"
            "assert row.shape == (3, col._model.n_embd_out)"), None),
        # llama.cpp's own abort callback makes llama_decode return 2: a real failed decode.
        Case("llama_decode failure is a typed error, then the context works again", (
            'enc = fresh("embedding")\n'
            'state = {"abort": True}\n'
            'cb = ll.ggml_abort_callback(lambda _data: state["abort"])\n'
            "ll.llama_set_abort_callback(enc._ctx._ctx, cb, None)\n"
            "try:\n"
            '    enc.encode_query("aborted")\n'
            '    raise AssertionError("the aborted decode returned")\n'
            "except lfm2edge.Lfm2EdgeError as e:\n"
            '    assert "llama_decode returned 2" in str(e) and "batch_size" in str(e), e\n'
            'state["abort"] = False\n'
            'assert enc.encode_query("fine").shape == (enc.dim,)\n'
            'state["abort"] = True\n'
            'enc.encode_query("aborted again")'), "Lfm2EdgeError", r"could not decode.*aborted"),
    ]
    # The low-level objects after their own close(): llama.cpp got NULL or freed memory before.
    after_close = {
        "model: tokenize after close": 'm = enc._model\nm.close()\nm.tokenize("x")',
        "model: token_text after close": "m = enc._model\nm.close()\nm.token_text(1)",
        "context: decode after close (closed twice)": "c = enc._ctx\nc.close()\nc.close()\n"
                                                      "c.decode([[1, 2]])",
        "context: decode after its model's close": "c = enc._ctx\nenc._model.close()\nassert c.closed\n"
                                                   "c.decode([[1, 2]])",
        "context: a new one on a closed model": "enc._model.close()\nEmbeddingContext(enc._model, 64, 4, 1)",
        "encoder: a call after its model was closed underneath": 'enc._model.close()\nenc.encode_query("q")',
    }
    cases += [Case(name, f'enc = fresh("colbert")\n{code}', "EncoderClosedError", "closed")
              for name, code in after_close.items()]
    # GGUFs whose marker ids fall outside the vocabulary (settings a converter would never write).
    for key in ("query_prefix_id", "document_prefix_id", "expansion_token_id"):
        cases.append(Case(f"gguf: lfm2edge.{key} out of vocabulary", f'lfm2edge.load(PATHS["{key}"])',
                          "ModelFileError", key))
    cases.append(Case("gguf: lfm2edge.document_length 2**31", 'lfm2edge.load(PATHS["document_length"])',
                      "ModelFileError", "document_length"))
    return cases


CASES = [
    *_lifecycle_cases(), *_concurrency_cases(), *_text_cases(), *_empty_cases(), *_option_cases(),
    *_decode_cases(),
]


def _set_int(path: Path, key: str, value: int) -> None:
    """Overwrite the int32 / uint32 value of GGUF metadata ``key`` in place."""
    data = bytearray(path.read_bytes())
    name = key.encode()
    at = data.index(struct.pack("<Q", len(name)) + name) + 8 + len(name)
    (vtype,) = struct.unpack_from("<I", data, at)
    fmt = {4: "<I", 5: "<i"}[vtype]  # GGUF_TYPE_UINT32, GGUF_TYPE_INT32
    struct.pack_into(fmt, data, at + 4, value)
    path.write_bytes(bytes(data))


@pytest.fixture(scope="module")
def outcomes(colbert_gguf: Path, embedding_gguf: Path, tmp_path_factory: pytest.TempPathFactory):
    folder = tmp_path_factory.mktemp("hostile_encoders")
    paths = {"colbert": str(colbert_gguf), "embedding": str(embedding_gguf)}
    tampered_values = {"query_prefix_id": 10**6, "document_prefix_id": -5, "expansion_token_id": 2**31 - 1,
                       "document_length": 2**31}
    for key, value in tampered_values.items():
        tampered = folder / f"{key}.gguf"
        shutil.copyfile(colbert_gguf, tampered)
        _set_int(tampered, f"lfm2edge.{key}", value)
        paths[key] = str(tampered)
    return run_cases(CASES, prelude=PRELUDE.format(paths=paths), timeout_s=60)


@pytest.mark.parametrize("name", [c.name for c in CASES])
def test_hostile_encoder_case(name: str, outcomes) -> None:
    check(outcomes[name])


def test_enough_cases() -> None:
    assert len(CASES) >= 40
