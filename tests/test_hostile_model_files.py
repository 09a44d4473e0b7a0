"""Hostile GGUF files: every one must be refused with a ModelFileError naming the key (or the defect),
by ``lfm2edge.load`` and by ``lfm2edge inspect`` (exit code 3, an ``error:`` line), never a crash.

Cases are generated: each key llama.cpp reads for lfm2 set to NaN, negative, zero, huge, the wrong
type or a value the tensors contradict; each tokenizer key; each ``lfm2edge.*`` setting tampered
(wrong type, out of range, id outside the vocabulary, missing); structural damage patched into the
bytes; truncation at many offsets. Each runs in a child process (tests/hostile.py), so a case that
reached llama.cpp and killed it shows up as "crashed" instead of taking the suite down. The tampered
copies are written by the children themselves (helpers below), one at a time, from the tiny f32 GGUFs
of conftest.py.
"""

from __future__ import annotations

import contextlib
import io
import math
import os
import re
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest

from tests.hostile import Case, check, run_cases

T = gguf.GGUFValueType
U32, I32, F32, STR, BOOL, ARR = "T.UINT32", "T.INT32", "T.FLOAT32", "T.STRING", "T.BOOL", "T.ARRAY"
ROOT = Path(__file__).resolve().parent.parent

# --- helpers the children run -------------------------------------------------------------------------------

_READERS: dict[Path, gguf.GGUFReader] = {}


def _reader(path: Path) -> gguf.GGUFReader:
    if path not in _READERS:
        _READERS[path] = gguf.GGUFReader(path)
    return _READERS[path]


def _scratch() -> Path:
    return Path(os.environ["HOSTILE_WORK"]) / f"case-{os.getpid()}.gguf"


def variant(
    src: Path,
    set: dict[str, tuple] | None = None,  # key -> (value, GGUF type[, array element type])
    drop: tuple[str, ...] = (),
    drop_tensors: tuple[str, ...] = (),
    as_f16: tuple[str, ...] = (),
    extra_tensors: dict[str, np.ndarray] | None = None,
) -> Path:
    """A copy of ``src`` with keys changed, added or dropped and tensors dropped, retyped or added."""
    r = _reader(Path(src))
    dst = _scratch()
    w = gguf.GGUFWriter(dst, str(r.fields["general.architecture"].contents()))
    changes = dict(set or {})
    for key, field in r.fields.items():
        if key.startswith("GGUF.") or key in drop or key in changes:
            continue
        vtype = field.types[0]
        w.add_key_value(key, field.contents(), vtype, field.types[-1] if vtype == T.ARRAY else None)
    for key, (value, vtype, *sub) in changes.items():
        w.add_key_value(key, value, vtype, sub[0] if sub else None)
    if "general.architecture" in drop:
        del w.kv_data[0]["general.architecture"]
    for t in r.tensors:
        if t.name in drop_tensors:
            continue
        data = np.array(t.data)
        w.add_tensor(t.name, data.astype(np.float16) if t.name in as_f16 else data)
    for name, data in (extra_tensors or {}).items():
        w.add_tensor(name, data)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return dst


def settings_keys(src: Path) -> tuple[str, ...]:
    """Every lfm2edge.* key of ``src``: drop them all for a file as upstream's converter writes it."""
    return tuple(k for k in _reader(Path(src)).fields if k.startswith("lfm2edge."))


def truncated(src: Path, size: int) -> Path:
    dst = _scratch()
    dst.write_bytes(Path(src).read_bytes()[:size])
    return dst


def patched(src: Path, offset: int, data: bytes) -> Path:
    raw = bytearray(Path(src).read_bytes())
    raw[offset : offset + len(data)] = data
    dst = _scratch()
    dst.write_bytes(bytes(raw))
    return dst


def after(src: Path, marker: str, skip: int = 0) -> int:
    """The offset just after the first occurrence of ``marker`` (a key or tensor name) plus ``skip``."""
    return Path(src).read_bytes().index(marker.encode()) + len(marker) + skip


def tokens_of(src: Path) -> list[str]:
    return list(_reader(Path(src)).fields["tokenizer.ggml.tokens"].contents())


class CliMismatch(Exception):
    """``lfm2edge inspect`` did not end as promised (exit 3 and one error line naming the problem)."""


def run_cli(args: list[str]) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of the ``lfm2edge`` command run in this process."""
    from lfm2edge.cli import main

    out, err, argv = io.StringIO(), io.StringIO(), sys.argv
    sys.argv = ["lfm2edge", *args]
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            main()
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    finally:
        sys.argv = argv
    return code, out.getvalue(), err.getvalue()


def refused(path: Path, match: str) -> None:
    """``inspect`` must exit 3 with an error line matching ``match`` that names the way out; then ``load``
    raises for the harness."""
    import lfm2edge

    code, _, err = run_cli(["inspect", str(path)])
    way_out = re.search(r"lfm2edge convert|upgrade lfm2edge", err)
    if code != 3 or not err.startswith("error: ") or "Traceback" in err or not re.search(match, err, re.I | re.S) \
            or not way_out:
        raise CliMismatch(f"inspect exited {code}, stderr: {err[-800:]!r}")
    enc = lfm2edge.load(path, n_threads=1)
    enc.close()
    raise AssertionError(f"{path} loaded")


# --- the cases -----------------------------------------------------------------------------------------------


def _lit(value: object) -> str:
    if isinstance(value, float) and not math.isfinite(value):
        return f"float({str(value)!r})"
    return repr(value)


def _set(base: str, key: str, value: object, vtype: str, sub: str | None = None) -> str:
    typed = f"({_lit(value)}, {vtype}{', ' + sub if sub else ''})"
    return f"variant({base}, set={{{key!r}: {typed}}})"


def _case(name: str, file_expr: str, match: str) -> Case:
    return Case(name, f"refused({file_expr}, {match!r})", "ModelFileError", match)


def _key_cases(base: str, tag: str) -> list[Case]:
    """Every lfm2 hyperparameter llama.cpp reads: NaN, negative, zero, huge, wrong type, inconsistent."""
    cases = []
    u32_keys = {
        # key: (a value the tensors contradict, or None)
        "lfm2.block_count": 7,
        "lfm2.context_length": None,
        "lfm2.embedding_length": 32,
        "lfm2.feed_forward_length": 128,
        "lfm2.attention.head_count": 8,
        "lfm2.shortconv.l_cache": 5,
        "lfm2.vocab_size": 999,
    }
    if tag == "colbert":
        u32_keys["lfm2.embedding_length_out"] = 8
    else:
        u32_keys["lfm2.pooling_type"] = 1
    for key, contradicting in u32_keys.items():
        k = re.escape(key)
        zero_ok = key == "lfm2.pooling_type"  # 0 is "none": a dense model then lacks CLS pooling
        variants = [
            ("nan", float("nan"), F32),
            ("negative", -1, I32),
            ("zero", 0, U32),
            ("huge", 2**32 - 1, U32),
            ("string", "64", STR),
            ("float", 64.0, F32),
        ]
        for label, value, vtype in variants:
            match = r"lfm2\.pooling_type" if zero_ok and label == "zero" else k
            cases.append(_case(f"{tag} {key} {label}", _set(base, key, value, vtype), match))
        if contradicting is not None:
            cases.append(_case(f"{tag} {key} contradicts the tensors", _set(base, key, contradicting, U32), k))
    for key, bad in {
        "lfm2.attention.layer_norm_rms_epsilon": [("nan", float("nan")), ("negative", -1e-5), ("zero", 0.0),
                                                  ("inf", float("inf")), ("huge", 1e30), ("one", 1.0)],
        "lfm2.rope.freq_base": [("nan", float("nan")), ("negative", -1e6), ("zero", 0.0), ("inf", float("inf")),
                                ("huge", 1e30)],
    }.items():
        k = re.escape(key)
        for label, value in bad:
            cases.append(_case(f"{tag} {key} {label}", _set(base, key, value, F32), k))
        cases.append(_case(f"{tag} {key} as uint32", _set(base, key, 1, U32), k))
        cases.append(_case(f"{tag} {key} as string", _set(base, key, "1e-5", STR), k))
    key = "lfm2.attention.causal"
    cases.append(_case(f"{tag} {key} as uint32", _set(base, key, 0, U32), re.escape(key)))
    cases.append(_case(f"{tag} {key} as string", _set(base, key, "false", STR), re.escape(key)))
    # even conv width in a bidirectional model (the centred conv needs an odd one)
    cases.append(_case(f"{tag} lfm2.shortconv.l_cache even", _set(base, "lfm2.shortconv.l_cache", 4, U32),
                       r"lfm2\.shortconv\.l_cache"))
    kv = "lfm2.attention.head_count_kv"
    k = re.escape(kv)
    for label, value, vtype, sub in [
        ("too short", [0, 0, 2, 0, 2], ARR, I32),
        ("too long", [0, 0, 2, 0, 2, 0, 2], ARR, I32),
        ("negative", [0, 0, -2, 0, 2, 0], ARR, I32),
        ("not dividing the heads", [0, 0, 3, 0, 2, 0], ARR, I32),
        ("huge", [0, 0, 2**31 - 1, 0, 2, 0], ARR, I32),
        ("float array", [0.0, 0.0, 2.0, 0.0, 2.0, 0.0], ARR, F32),
        ("string array", ["0", "0", "2", "0", "2", "0"], ARR, STR),
        ("scalar string", "2", STR, None),
        ("scalar huge", 2**32 - 1, U32, None),
        ("all attention", [2, 2, 2, 2, 2, 2], ARR, I32),
        ("all conv", [0, 0, 0, 0, 0, 0], ARR, I32),
    ]:
        cases.append(_case(f"{tag} {kv} {label}", _set(base, kv, value, vtype, sub), k))
    for key in ("lfm2.block_count", "lfm2.context_length", "lfm2.embedding_length", "lfm2.feed_forward_length",
                "lfm2.attention.head_count", "lfm2.attention.head_count_kv",
                "lfm2.attention.layer_norm_rms_epsilon", "lfm2.shortconv.l_cache"):
        cases.append(_case(f"{tag} {key} missing", f"variant({base}, drop=({key!r},))", re.escape(key)))
    # keys llama.cpp reads for every architecture, which switch on what an LFM2 retriever lacks
    for key, value, vtype in [
        ("lfm2.expert_count", 8, U32), ("lfm2.expert_used_count", 2, U32), ("lfm2.nextn_predict_layers", 99, U32),
        ("lfm2.attention.sliding_window", 4, U32), ("lfm2.rope.scaling.type", "bogus", STR),
        ("lfm2.attention.key_length", 7, U32), ("lfm2.rope.dimension_count", 3, U32),
    ]:
        cases.append(_case(f"{tag} {key} added", _set(base, key, value, vtype), re.escape(key)))
    return cases


def _tokenizer_cases(base: str, tag: str) -> list[Case]:
    cases = []
    model = "tokenizer.ggml.model"
    for label, value, vtype in [("none", "none", STR), ("llama", "llama", STR), ("empty", "", STR),
                                ("uint32", 2, U32)]:
        cases.append(_case(f"{tag} {model} {label}", _set(base, model, value, vtype), re.escape(model)))
    tokens = "tokenizer.ggml.tokens"
    k = re.escape(tokens)
    cases += [
        # llama.cpp asserts (aborts) on a vocabulary with one token text twice
        _case(f"{tag} {tokens} duplicate", f"variant({base}, set={{{tokens!r}: "
              f"(tokens_of({base})[:5] + [tokens_of({base})[4]] + tokens_of({base})[6:], {ARR}, {STR})}})", k),
        _case(f"{tag} {tokens} empty-name clash", f"variant({base}, set={{{tokens!r}: "
              f"(['[EMPTY_1]', ''] + tokens_of({base})[2:], {ARR}, {STR})}})", k),
        _case(f"{tag} {tokens} one short", f"variant({base}, set={{{tokens!r}: "
              f"(tokens_of({base})[:-1], {ARR}, {STR})}})", k),
        _case(f"{tag} {tokens} int array", _set(base, tokens, [1, 2, 3], ARR, I32), k),
        _case(f"{tag} {tokens} scalar", _set(base, tokens, "a", STR), k),
        _case(f"{tag} {tokens} missing", f"variant({base}, drop=({tokens!r},))", k),
    ]
    for key, bad in {
        "tokenizer.ggml.token_type": [("short", [1, 1, 1], ARR, I32), ("float", [1.0] * 3, ARR, F32),
                                      ("scalar", 1, I32, None)],
        "tokenizer.ggml.merges": [("int array", [1, 2], ARR, I32), ("scalar", "a b", STR, None)],
        "tokenizer.ggml.scores": [("short", [0.0, 1.0], ARR, F32), ("string array", ["a"], ARR, STR)],
        "tokenizer.ggml.pre": [("uint32", 1, U32, None)],
        "tokenizer.ggml.add_bos_token": [("uint32", 1, U32, None), ("string", "true", STR, None)],
    }.items():
        for label, value, vtype, sub in bad:
            cases.append(_case(f"{tag} {key} {label}", _set(base, key, value, vtype, sub), re.escape(key)))
    cases.append(_case(f"{tag} tokenizer.ggml.token_type unknown type",
                       f"variant({base}, set={{'tokenizer.ggml.token_type': ([99] * len(tokens_of({base})), "
                       f"{ARR}, {I32})}})", r"tokenizer\.ggml\.token_type"))
    cases.append(_case(f"{tag} tokenizer.ggml.merges missing", f"variant({base}, drop=('tokenizer.ggml.merges',))",
                       r"tokenizer\.ggml\.merges"))
    for key in ("tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id", "tokenizer.ggml.padding_token_id"):
        k = re.escape(key)
        cases += [
            _case(f"{tag} {key} outside the vocabulary", _set(base, key, 10**6, U32), k),
            _case(f"{tag} {key} huge", _set(base, key, 2**32 - 1, U32), k),
            _case(f"{tag} {key} negative", _set(base, key, -1, I32), k),
            _case(f"{tag} {key} string", _set(base, key, "1", STR), k),
        ]
    cases.append(_case(f"{tag} tokenizer.ggml.bos_token_id missing",
                       f"variant({base}, drop=('tokenizer.ggml.bos_token_id',))", r"tokenizer\.ggml\.bos_token_id"))
    cases.append(_case(f"{tag} tokenizer.ggml.model missing", f"variant({base}, drop=('tokenizer.ggml.model',))",
                       r"tokenizer\.ggml\.model"))
    return cases


def _general_cases(base: str, tag: str) -> list[Case]:
    return [
        _case(f"{tag} general.architecture llama", _set(base, "general.architecture", "llama", STR),
              r"general\.architecture"),
        _case(f"{tag} general.architecture lfm2-bidir", _set(base, "general.architecture", "lfm2-bidir", STR),
              r"architecture 'lfm2-bidir'"),
        _case(f"{tag} general.architecture missing", f"variant({base}, drop=('general.architecture',))",
              r"general\.architecture"),
        _case(f"{tag} general.architecture uint32", _set(base, "general.architecture", 2, U32),
              r"general\.architecture"),
        _case(f"{tag} general.alignment zero", _set(base, "general.alignment", 0, U32), r"general\.alignment"),
        _case(f"{tag} general.alignment not a power of 2", _set(base, "general.alignment", 3, U32),
              r"general\.alignment"),
        _case(f"{tag} general.alignment string", _set(base, "general.alignment", "32", STR), r"general\.alignment"),
        _case(f"{tag} general.file_type string", _set(base, "general.file_type", "f32", STR), r"general\.file_type"),
        _case(f"{tag} general.name uint32", _set(base, "general.name", 1, U32), r"general\.name"),
    ]


def _tensor_cases(base: str, tag: str) -> list[Case]:
    cases = [
        _case(f"{tag} tensor missing", f"variant({base}, drop_tensors=('blk.2.attn_q.weight',))",
              r"blk\.2\.attn_q\.weight.*missing"),
        _case(f"{tag} token_embd missing", f"variant({base}, drop_tensors=('token_embd.weight',))",
              r"token_embd\.weight.*missing"),
        _case(f"{tag} norm stored as F16", f"variant({base}, as_f16=('blk.0.ffn_norm.weight',))",
              r"blk\.0\.ffn_norm\.weight.*F32"),
        _case(f"{tag} conv kernel stored as F16", f"variant({base}, as_f16=('blk.0.shortconv.conv.weight',))",
              r"blk\.0\.shortconv\.conv\.weight.*F32"),
        _case(f"{tag} extra layer's tensor", f"variant({base}, extra_tensors={{'blk.6.ffn_norm.weight': "
              f"np.ones(64, np.float32)}})", r"blk\.6\.ffn_norm\.weight.*lfm2\.block_count"),
        _case(f"{tag} foreign tensor", f"variant({base}, extra_tensors={{'output_norm.bias': "
              f"np.ones(64, np.float32)}})", r"output_norm\.bias"),
        _case(f"{tag} conv layer given attention", f"variant({base}, set={{'lfm2.attention.head_count_kv': "
              f"([2, 0, 2, 0, 2, 0], {ARR}, {I32})}})", r"lfm2\.attention\.head_count_kv"),
    ]
    if tag == "colbert":
        cases += [
            _case(f"{tag} dense_2 without embedding_length_out",
                  f"variant({base}, drop=('lfm2.embedding_length_out',))", r"embedding_length_out"),
            _case(f"{tag} embedding_length_out without dense_2", f"variant({base}, drop_tensors=('dense_2.weight',))",
                  r"dense_2\.weight"),
            _case(f"{tag} pooling on a ColBERT model", _set(base, "lfm2.pooling_type", 1, U32), r"lfm2\.pooling_type"),
        ]
    return cases


def _settings_cases(base: str, tag: str) -> list[Case]:
    """Each lfm2edge.* key: missing, wrong type, out of range, id outside the vocabulary, unknown enum."""
    cases = []
    required = ["settings_version", "kind", "query_prefix", "document_prefix", "query_prefix_id",
                "document_prefix_id", "query_length", "document_length", "do_query_expansion",
                "attend_to_expansion_tokens", "expansion_token_id", "normalize"]
    for name in required:
        key = "lfm2edge." + name
        cases.append(_case(f"{tag} {key} missing", f"variant({base}, drop=({key!r},))", re.escape(key)))
    wrong_types = {
        "settings_version": ("1", STR), "kind": (1, U32), "query_prefix": (1, U32), "document_prefix": (1.0, F32),
        "query_prefix_id": (1000, U32), "document_prefix_id": ("1001", STR), "query_length": (32, I32),
        "document_length": (512.0, F32), "do_query_expansion": (1, U32), "attend_to_expansion_tokens": ("no", STR),
        "expansion_token_id": (7, U32), "normalize": (1, I32), "source": (1, U32),
        "architecture": (1, U32),
    }
    for name, (value, vtype) in wrong_types.items():
        key = "lfm2edge." + name
        cases.append(_case(f"{tag} {key} wrong type", _set(base, key, value, vtype), re.escape(key)))
    n_vocab = f"len(tokens_of({base}))"
    out_of_range = [
        ("settings_version", "zero", 0, U32), ("settings_version", "newer", 3, U32),
        ("settings_version", "huge", 2**32 - 1, U32),
        ("kind", "unknown", "bogus", STR),
        ("query_length", "zero", 0, U32), ("query_length", "one", 1, U32), ("query_length", "3", 3, U32),
        ("query_length", "above the maximum", 8193, U32), ("query_length", "2**31", 2**31, U32),
        ("query_length", "2**32-1", 2**32 - 1, U32),
        ("document_length", "zero", 0, U32), ("document_length", "above the maximum", 8193, U32),
        ("document_length", "2**31", 2**31, U32),
        ("expansion_token_id", "negative", -1, I32), ("expansion_token_id", "int32 max", 2**31 - 1, I32),
        ("query_prefix_id", "below -1", -2, I32), ("document_prefix_id", "int32 min", -(2**31), I32),
        ("query_prefix", "too long", "q" * 2000, STR),
    ]
    for name, label, value, vtype in out_of_range:
        key = "lfm2edge." + name
        cases.append(_case(f"{tag} {key} {label}", _set(base, key, value, vtype), re.escape(key)))
    for name in ("query_prefix_id", "document_prefix_id", "expansion_token_id"):
        key = "lfm2edge." + name
        cases.append(_case(f"{tag} {key} = vocabulary size", f"variant({base}, set={{{key!r}: ({n_vocab}, {I32})}})",
                           re.escape(key) + ".*vocabulary"))
    skip = "lfm2edge.skiplist_ids"
    for label, value, vtype, sub in [
        ("negative id", [510, -5], ARR, I32), ("id outside the vocabulary", [510, 10**6], ARR, I32),
        ("float array", [510.0], ARR, F32), ("scalar", 510, I32, None), ("string array", ["!"], ARR, STR),
    ]:
        cases.append(_case(f"{tag} {skip} {label}", _set(base, skip, value, vtype, sub), re.escape(skip)))
    no_settings = f"drop=settings_keys({base})"
    if tag == "colbert":
        cases.append(_case(f"{tag} no settings and no [Q] token", f"variant({base}, {no_settings}, "
                           f"set={{'tokenizer.ggml.tokens': (['[X] ' if t == '[Q] ' else t for t in tokens_of({base})], "
                           f"{ARR}, {STR})}})", r"\[Q\]"))
    cases.append(_case(f"{tag} no settings and a context shorter than the published lengths",
                       f"variant({base}, {no_settings}, set={{'lfm2.context_length': (16, {U32})}})",
                       r"published.*lfm2edge\.\w+_length"))
    cases.append(_case(f"{tag} lfm2edge.query_length beyond the context",
                       f"variant({base}, set={{'lfm2.context_length': (16, {U32})}})", r"lfm2edge\.\w+_length"))
    if tag == "colbert":
        cases += [
            _case(f"{tag} ColBERT without query marker", _set(base, "lfm2edge.query_prefix_id", -1, I32),
                  r"lfm2edge\.query_prefix_id"),
            # the file's tensors and pooling say ColBERT: a dense model needs CLS pooling
            _case(f"{tag} ColBERT as dense", _set(base, "lfm2edge.kind", "dense", STR), r"lfm2\.pooling_type"),
        ]
    else:
        # a ColBERT model inserts marker tokens, which a dense model's settings do not name
        cases.append(_case(f"{tag} dense as ColBERT", _set(base, "lfm2edge.kind", "late_interaction", STR),
                           r"lfm2edge\.query_prefix_id"))
    return cases


def _structure_cases(base: str, tag: str) -> list[Case]:
    """Damage patched into the bytes of the header."""
    def p(offset: str, data: bytes) -> str:
        return f"patched({base}, {offset}, {data!r})"

    q = lambda v: v.to_bytes(8, "little")  # noqa: E731
    i = lambda v: v.to_bytes(4, "little")  # noqa: E731
    return [
        _case(f"{tag} bad magic", p("0", b"GGUX"), r"not a GGUF file"),
        _case(f"{tag} version 1", p("4", i(1)), r"version 1"),
        _case(f"{tag} version huge", p("4", i(2**32 - 1)), r"version"),
        _case(f"{tag} tensor count 2**63", p("8", q(2**63)), r"tensor count"),
        _case(f"{tag} tensor count a little high", p("8", q(58 if tag == "colbert" else 57)), r"truncat|tensor"),
        _case(f"{tag} key count 2**64-1", p("16", q(2**64 - 1)), r"key count"),
        _case(f"{tag} key count a little high", p("16", q(200)), r"truncat|key"),
        _case(f"{tag} first key length huge", p("24", q(2**62)), r"key 0"),
        _case(f"{tag} first value type unknown", p("52", i(99)), r"unknown GGUF value type"),
        _case(f"{tag} first string length huge", p("56", q(2**60)), r"general\.architecture"),
        _case(f"{tag} token array count huge", p(f"after({base}, 'tokenizer.ggml.tokens', 8)", q(2**40)),
              r"tokenizer\.ggml\.tokens"),
        _case(f"{tag} token string length huge", p(f"after({base}, 'tokenizer.ggml.tokens', 16)", q(2**40)),
              r"tokenizer\.ggml\.tokens"),
        _case(f"{tag} array of arrays", p(f"after({base}, 'tokenizer.ggml.merges', 4)", i(9)),
              r"tokenizer\.ggml\.merges"),
        _case(f"{tag} duplicate key", p(f"after({base}, 'general.type', -12)", b"general.name"), r"twice"),
        _case(f"{tag} tensor with 5 dimensions", p(f"after({base}, 'token_embd.weight')", i(5)),
              r"token_embd\.weight.*dimensions"),
        _case(f"{tag} tensor with 0 dimensions", p(f"after({base}, 'token_embd.weight')", i(0)),
              r"token_embd\.weight.*dimensions"),
        _case(f"{tag} tensor dimension huge", p(f"after({base}, 'token_embd.weight', 4)", q(2**62)),
              r"token_embd\.weight"),
        _case(f"{tag} tensor dimension 2**63", p(f"after({base}, 'token_embd.weight', 12)", q(2**63)),
              r"token_embd\.weight"),
        _case(f"{tag} tensor type unknown", p(f"after({base}, 'token_embd.weight', 20)", i(99)),
              r"token_embd\.weight.*type 99"),
        _case(f"{tag} tensor type with another block", p(f"after({base}, 'token_embd_norm.weight', 12)", i(12)),
              r"token_embd_norm\.weight"),
        _case(f"{tag} tensor offset lies", p(f"after({base}, 'token_embd_norm.weight', 16)", q(12345)),
              r"token_embd_norm\.weight.*offset"),
        _case(f"{tag} tensor offset huge", p(f"after({base}, 'token_embd_norm.weight', 16)", q(2**63)),
              r"token_embd_norm\.weight.*offset"),
        _case(f"{tag} duplicate tensor name", p(f"after({base}, 'blk.1.ffn_up.weight', -19)", b"blk.0"),
              r"twice"),
        _case(f"{tag} tensor name length huge", p(f"after({base}, 'token_embd.weight', -25)", q(2**50)),
              r"tensor 0|truncat"),
    ]


def cut_points(src: Path, count: int) -> list[int]:
    """``count`` truncation offsets of ``src``: three quarters over the header, the rest over the tensor data."""
    from lfm2edge.runtime.core.gguf_file import read_header

    size, header = Path(src).stat().st_size, read_header(src).data_offset
    edges = [0, 3, 4, 7, 8, 15, 16, 23, 24, 25, 31, 32, 33]
    spread = np.linspace(34, header, count * 3 // 4 - len(edges), dtype=np.int64).tolist()
    in_data = np.linspace(header + 1, size - 1, count - len(edges) - len(spread), dtype=np.int64).tolist()
    return edges + spread + in_data


def _truncation_cases(base: str, tag: str, count: int) -> list[Case]:
    """The file cut at ``count`` offsets, worked out by the child from the file itself."""
    match = "truncat|not a GGUF file"
    return [
        Case(f"{tag} truncated, point {i + 1} of {count}",
             f"refused(truncated({base}, cut_points({base}, {count})[{i}]), {match!r})", "ModelFileError", match)
        for i in range(count)
    ]


def _controls() -> list[Case]:
    """Untampered copies load and inspect cleanly: the helpers themselves break nothing."""
    code = (
        "from tests.test_hostile_model_files import run_cli\n"
        "p = variant({base})\n"
        "code, out, err = run_cli(['inspect', str(p)])\n"
        "assert code == 0 and 'problems' not in err, (code, err)\n"
        "lfm2edge.load(p, n_threads=1).close()\n"
    )
    without = (
        "p = variant({base}, drop=settings_keys({base}))\n"
        "enc = lfm2edge.load(p, n_threads=1)\n"
        "assert not enc.model_file.has_own_settings and enc.settings.query_length in (32, 512)\n"
        "enc.close()\n"
    )
    # Settings version 1 also wrote lfm2edge.similarity; such files load, and the key decides nothing
    # (the kind does), whatever it holds.
    version_1 = (
        "p = variant({base}, set={{'lfm2edge.settings_version': (1, T.UINT32), 'lfm2edge.similarity': {value}}})\n"
        "enc = lfm2edge.load(p, n_threads=1)\n"
        "assert enc.kind.value == {kind!r} and enc.model_file.has_own_settings\n"
        "q, d = enc.encode_query('a query'), enc.encode_document(['a document'])\n"
        "assert enc.similarity(q, d).shape == (1,)\n"
        "enc.close()\n"
    )
    similarity = {"COLBERT": ("late_interaction", "maxsim", "cosine"), "EMBEDDING": ("dense", "cosine", "maxsim")}
    pairs = (("COLBERT", "colbert"), ("EMBEDDING", "embedding"))
    # a header of several MiB (read in growing chunks) is still read whole
    big = f"p = variant(COLBERT, set={{'general.description': ('x' * 3_000_000, {STR})}})\n" \
          "lfm2edge.load(p, n_threads=1).close()\n"
    return [Case("colbert with a 3 MB header loads", big, None)] + [
        Case(f"{tag} untouched copy loads", code.format(base=base), None) for base, tag in pairs] + [
        Case(f"{tag} without lfm2edge settings loads with the published ones", without.format(base=base), None)
        for base, tag in pairs
    ] + [
        Case(f"{tag} settings version 1 with lfm2edge.similarity {label} loads",
             version_1.format(base=base, kind=similarity[base][0], value=value), None)
        for base, tag in pairs
        for label, value in [
            ("as written", f"({similarity[base][1]!r}, T.STRING)"),
            ("contradicting the kind", f"({similarity[base][2]!r}, T.STRING)"),
            ("of the wrong type", "(0, T.UINT32)"),
        ]
    ]


def build_cases(slow: bool) -> list[Case]:
    """The fast set (the ColBERT file, a few embedding-only rules, 40 cuts), or every case."""
    cases = _controls()
    for base, tag in [("COLBERT", "colbert")] + ([("EMBEDDING", "embedding")] if slow else []):
        cases += _key_cases(base, tag) + _tokenizer_cases(base, tag) + _general_cases(base, tag)
        cases += _tensor_cases(base, tag) + _settings_cases(base, tag) + _structure_cases(base, tag)
    if not slow:  # the embedding model's own keys and settings rules
        cases += [c for c in _key_cases("EMBEDDING", "embedding") if "pooling_type" in c.name]
        cases += [c for c in _settings_cases("EMBEDDING", "embedding") if "as ColBERT" in c.name]
    cases += _truncation_cases("COLBERT", "colbert", 300 if slow else 40)
    if slow:
        cases += _truncation_cases("EMBEDDING", "embedding", 100)
    return cases


FAST_CASES = build_cases(slow=False)
_FAST_NAMES = {c.name for c in FAST_CASES}
SLOW_CASES = [c for c in build_cases(slow=True) if c.name not in _FAST_NAMES]


def _prelude(colbert: Path, embedding: Path) -> str:
    return (
        "import sys\n"
        f"sys.path.insert(0, {str(ROOT)!r})\n"
        "import numpy as np\n"
        "from gguf import GGUFValueType as T\n"
        "from pathlib import Path\n"
        "from tests.test_hostile_model_files import variant, truncated, patched, after, tokens_of, refused, "
        "cut_points, settings_keys\n"
        "import lfm2edge\n"
        "from lfm2edge.runtime.core.build import check_build\n"
        "check_build()\n"
        f"COLBERT, EMBEDDING = Path({str(colbert)!r}), Path({str(embedding)!r})\n"
    )


def _run(cases: list[Case], colbert: Path, embedding: Path, work: Path):
    env = {"HOSTILE_WORK": str(work), "OMP_NUM_THREADS": "1"}
    return run_cases(cases, prelude=_prelude(colbert, embedding), timeout_s=60, env=env, cwd=str(ROOT))


@pytest.fixture(scope="module")
def fast_outcomes(colbert_gguf, embedding_gguf, tmp_path_factory):
    return _run(FAST_CASES, colbert_gguf, embedding_gguf, tmp_path_factory.mktemp("hostile"))


@pytest.fixture(scope="module")
def slow_outcomes(colbert_gguf, embedding_gguf, tmp_path_factory):
    return _run(SLOW_CASES, colbert_gguf, embedding_gguf, tmp_path_factory.mktemp("hostile-slow"))


@pytest.mark.parametrize("name", [c.name for c in FAST_CASES])
def test_hostile_model_file(name, fast_outcomes):
    check(fast_outcomes[name])


@pytest.mark.slow
@pytest.mark.parametrize("name", [c.name for c in SLOW_CASES])
def test_hostile_model_file_slow(name, slow_outcomes):
    check(slow_outcomes[name])
