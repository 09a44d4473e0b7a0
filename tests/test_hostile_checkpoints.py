"""Hostile checkpoints and output paths for the converter.

Every malformed checkpoint file (config.json with wrong types or impossible values, safetensors
headers that lie, a weight map pointing outside the folder, broken tokenizer or sentence-transformers
files) must be a CheckpointError naming the file, from ``convert()`` and from ``lfm2edge convert``
(exit code 3, an ``error:`` line, no traceback), and must leave no file behind. Each case runs in a
child process (tests/hostile.py) on its own copy of the tiny checkpoints of conftest.py.

The output-path rules (refuse an existing file unless forced, never replace anything but a regular
file) are plain Python and run as ordinary tests below.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from tests.hostile import Case, check, run_cases
from tests.test_hostile_model_files import run_cli

ROOT = Path(__file__).resolve().parent.parent

# --- helpers the children run -------------------------------------------------------------------------------


def copy_ckpt(src: Path) -> Path:
    """A fresh copy of the checkpoint ``src`` to damage."""
    dst = Path(os.environ["HOSTILE_WORK"]) / f"ckpt-{os.getpid()}"
    shutil.rmtree(dst, ignore_errors=True)
    shutil.copytree(src, dst)
    return dst


def edit_json(path: Path, drop: tuple[str, ...] = (), **changes: object) -> None:
    """Set (or drop) top-level keys of a JSON object file; NaN and Infinity are written as Python's json does."""
    raw = json.loads(path.read_text())
    for key in drop:
        raw.pop(key, None)
    raw.update(changes)
    path.write_text(json.dumps(raw))


def edit_safetensors(path: Path, change) -> None:
    """Rewrite a safetensors header through ``change(header_dict)``, keeping the data bytes as they are."""
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    change(header)
    data = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(data)) + data + raw[8 + n :])


def convert_refused(folder: Path, match: str) -> None:
    """``lfm2edge convert`` must exit 3 with an error line matching ``match``; then ``convert()`` raises."""
    from lfm2edge.convert.pipeline import convert

    out = folder.parent / f"out-{os.getpid()}.gguf"
    code, _, err = run_cli(["convert", str(folder), "-o", str(out), "--outtype", "f32"])
    if code != 3 or "error: " not in err or "Traceback" in err or not re.search(match, err, re.I | re.S):
        raise AssertionError(f"convert exited {code}, stderr: {err[-800:]!r}")
    try:
        convert(folder, out, "f32")
    finally:
        left = [p.name for p in out.parent.iterdir() if p.name.startswith((out.name, f".{out.name}"))]
        if left:
            raise AssertionError(f"files left behind: {left}")
    raise AssertionError("the checkpoint converted")


# --- the cases -----------------------------------------------------------------------------------------------

NAN, INF = "float('nan')", "float('inf')"


def _case(name: str, base: str, edit: str, match: str) -> Case:
    code = f"f = copy_ckpt({base})\n{edit}\nconvert_refused(f, {match!r})\n"
    return Case(name, code, "CheckpointError", match)


def _config_cases() -> list[Case]:
    cfg = "edit_json(f / 'config.json', {})"
    values = {
        "norm_eps": [NAN, "-1e-5", "0", INF, "'1e-5'", "True"],
        "hidden_size": ["0", "-64", "'64'", "64.5", "10**12", "66", "None"],
        "num_hidden_layers": ["0", "-1", "10**6", "'6'", "7", "None"],
        "num_attention_heads": ["0", "-4", "5", "128"],
        "num_key_value_heads": ["0", "3", "8"],
        "head_dim": ["32", "0"],
        "layer_types": ["'conv'", "['conv'] * 5", "['conv', 'conv', 'bogus', 'conv', 'full_attention', 'conv']"],
        "block_multiple_of": ["0", "-32"],
        "block_ffn_dim_multiplier": [NAN, INF, "1e308", "-1.0"],
        "block_ff_dim": ["-1", "0", "'256'", "10**9"],
        "vocab_size": ["0", "'x'", "-5"],
        "bos_token_id": ["99999", "-1"],
        "eos_token_id": ["10**6"],
        "conv_L_cache": ["0", "4", "1000"],
        "rope_theta": [NAN, "-1.0", "0"],
        "max_position_embeddings": ["0", "-1"],
        "architectures": ["'Lfm2BidirectionalModel'", "[1]"],
        "block_auto_adjust_ff_dim": ["'yes'"],
    }
    cases = []
    for key, bad in values.items():
        for value in bad:
            cases.append(_case(f"config.json {key} = {value}", "COLBERT", cfg.format(f"{key}={value}"),
                               rf"config\.json.*{key}"))
    cases += [
        _case("config.json model_type missing", "COLBERT", "edit_json(f / 'config.json', drop=('model_type',))",
              r"model_type"),
        _case("config.json without ff width", "COLBERT",
              "edit_json(f / 'config.json', drop=('block_ff_dim', 'intermediate_size'))", r"config\.json.*ff_dim"),
        _case("config.json without layer types", "COLBERT", "edit_json(f / 'config.json', drop=('layer_types',))",
              r"config\.json.*layer_types"),
        _case("config.json full_attn_idxs out of range", "COLBERT",
              "edit_json(f / 'config.json', drop=('layer_types',), full_attn_idxs=[2, 9])", r"full_attn_idxs"),
        _case("config.json full_attn_idxs twice", "COLBERT",
              "edit_json(f / 'config.json', drop=('layer_types',), full_attn_idxs=[2, 2])", r"full_attn_idxs"),
        _case("config.json rope_parameters a list", "COLBERT",
              "edit_json(f / 'config.json', drop=('rope_theta',), rope_parameters=[1])", r"rope_parameters"),
        _case("config.json vocab smaller than the tokenizer", "COLBERT", cfg.format("vocab_size=500"),
              r"vocab|config\.json"),
        _case("config.json context shorter than the documents", "COLBERT", cfg.format("max_position_embeddings=16"),
              r"document_length"),
    ]
    for label, data in [("not JSON", b"{not json"), ("a list", b"[1, 2]"), ("not UTF-8", b"\xff\xfe{}"),
                        ("empty", b""), ("a number", b"42")]:
        cases.append(_case(f"config.json {label}", "COLBERT", f"(f / 'config.json').write_bytes({data!r})",
                           r"config\.json"))
    return cases


def _safetensors_cases() -> list[Case]:
    st = "(f / 'model.safetensors')"
    m = r"model\.safetensors"

    def header(code: str) -> str:
        return f"edit_safetensors({st}, lambda h: {code})"

    return [
        _case("safetensors garbage", "COLBERT", f"{st}.write_bytes(bytes(range(256)) * 8)", m),
        _case("safetensors header length 2**64-1", "COLBERT",
              f"{st}.write_bytes(b'\\xff' * 8 + {st}.read_bytes()[8:])", m),
        _case("safetensors header length beyond the file", "COLBERT",
              f"{st}.write_bytes((10**7).to_bytes(8, 'little') + {st}.read_bytes()[8:])", m),
        _case("safetensors truncated to 4 bytes", "COLBERT", f"{st}.write_bytes({st}.read_bytes()[:4])", m),
        _case("safetensors truncated in the header", "COLBERT", f"{st}.write_bytes({st}.read_bytes()[:100])", m),
        _case("safetensors truncated in the data", "COLBERT", f"{st}.write_bytes({st}.read_bytes()[:-1000])", m),
        _case("safetensors empty", "COLBERT", f"{st}.write_bytes(b'')", m),
        _case("safetensors header a list", "COLBERT",
              f"{st}.write_bytes((6).to_bytes(8, 'little') + b'[1, 2]')", m),
        _case("safetensors header not JSON", "COLBERT",
              f"{st}.write_bytes((6).to_bytes(8, 'little') + b'{{nope' + bytes(100))", m),
        _case("safetensors offsets past the end", "COLBERT",
              header("h['embed_tokens.weight'].update(data_offsets=[0, 10**12])"), m + r".*embed_tokens"),
        _case("safetensors offsets reversed", "COLBERT",
              header("h['embed_tokens.weight'].update(data_offsets=[256512, 0])"), m + r".*embed_tokens"),
        _case("safetensors offsets negative", "COLBERT",
              header("h['embed_tokens.weight'].update(data_offsets=[-8, 256504])"), m + r".*embed_tokens"),
        _case("safetensors shape lies about the bytes", "COLBERT",
              header("h['embed_tokens.weight'].update(shape=[1002, 65])"), m + r".*embed_tokens"),
        _case("safetensors shape huge", "COLBERT",
              header("h['embed_tokens.weight'].update(shape=[10**30, 10**30])"), m + r".*embed_tokens"),
        _case("safetensors shape negative", "COLBERT",
              header("h['embed_tokens.weight'].update(shape=[-1002, -64])"), m + r".*embed_tokens"),
        _case("safetensors dtype unknown", "COLBERT", header("h['embed_tokens.weight'].update(dtype='I64')"),
              m + r".*dtype"),
        _case("safetensors entry not an object", "COLBERT", header("h.update({'embed_tokens.weight': 5})"),
              m + r".*embed_tokens"),
        _case("safetensors tensor transposed", "COLBERT",
              header("h['layers.0.ffn_norm.weight'].update(shape=[1, 64])"), r"layers\.0\.ffn_norm\.weight"),
        _case("safetensors tensor missing", "COLBERT", header("h.pop('layers.2.self_attn.q_proj.weight')"),
              r"attn_q\.weight.*missing|missing"),
        _case("safetensors unknown tensor", "COLBERT",
              header("h.update({'foo.weight': h.pop('layers.0.ffn_norm.weight')})"), r"foo\.weight"),
        _case("safetensors tensor of a layer config.json lacks", "COLBERT",
              header("h.update({'layers.9.ffn_norm.weight': h.pop('layers.0.ffn_norm.weight')})"),
              r"layers\.9\.ffn_norm\.weight"),
        _case("safetensors conv kernel flattened", "COLBERT",
              header("h['layers.0.conv.conv.weight'].update(shape=[64, 3])"), r"layers\.0\.conv\.conv\.weight"),
        _case("safetensors tensor twice (prefixed)", "COLBERT",
              header("h.update({'model.embed_tokens.weight': dict(h['embed_tokens.weight'])})"),
              r"embed_tokens\.weight.*twice"),
        _case("dense projection garbage", "COLBERT", "(f / '1_Dense' / 'model.safetensors').write_bytes(b'x' * 64)",
              r"1_Dense"),
        _case("dense projection of the wrong width", "COLBERT",
              "edit_safetensors(f / '1_Dense' / 'model.safetensors', "
              "lambda h: h['linear.weight'].update(shape=[32, 32]))", r"1_Dense.*linear\.weight"),
        _case("dense projection without linear.weight", "COLBERT",
              "edit_safetensors(f / '1_Dense' / 'model.safetensors', "
              "lambda h: h.update({'other.weight': h.pop('linear.weight')}))", r"linear\.weight"),
    ]


def _index_cases() -> list[Case]:
    idx = "(f / 'model.safetensors.index.json')"
    m = r"model\.safetensors\.index\.json"

    def weight_map(value: str) -> str:
        return f"{idx}.write_text(json.dumps({{'weight_map': {value}}}))"

    return [
        _case("weight map escapes the folder", "COLBERT",
              weight_map("{'embed_tokens.weight': '../outside.safetensors'}"), m + r".*outside"),
        _case("weight map escapes deeper", "COLBERT",
              weight_map("{'embed_tokens.weight': 'sub/../../x.safetensors'}"), m + r".*outside"),
        _case("weight map absolute path", "COLBERT", weight_map("{'embed_tokens.weight': '/etc/passwd'}"),
              m + r".*outside"),
        _case("weight map backslashes", "COLBERT", weight_map("{'embed_tokens.weight': '..\\\\x.safetensors'}"),
              m),
        _case("weight map a list", "COLBERT", weight_map("['model.safetensors']"), m + r".*weight_map"),
        _case("weight map empty", "COLBERT", weight_map("{}"), m + r".*weight_map"),
        _case("weight map file missing", "COLBERT", weight_map("{'a': 'model-00002-of-00002.safetensors'}"),
              m + r".*model-00002"),
        _case("weight map a number", "COLBERT", weight_map("{'a': 5}"), m),
        _case("weight map not JSON", "COLBERT", f"{idx}.write_text('{{oops')", m),
    ]


def _tokenizer_and_module_cases() -> list[Case]:
    tok = "(f / 'tokenizer.json')"
    st = "(f / 'config_sentence_transformers.json')"
    return [
        _case("tokenizer.json missing", "COLBERT", f"{tok}.unlink()", r"tokenizer\.json"),
        _case("tokenizer.json not JSON", "COLBERT", f"{tok}.write_text('{{not json')", r"tokenizer\.json"),
        _case("tokenizer.json empty object", "COLBERT", f"{tok}.write_text('{{}}')", r"tokenizer\.json"),
        _case("tokenizer.json model garbage", "COLBERT", f"edit_json({tok}, model={{'type': 'BPE', 'vocab': 5}})",
              r"tokenizer\.json"),
        _case("tokenizer.json a WordLevel model", "COLBERT",
              f"edit_json({tok}, model={{'type': 'WordLevel', 'vocab': {{'a': 0}}, 'unk_token': 'a'}})",
              r"tokenizer\.json"),
        _case("tokenizer_config.json not JSON", "COLBERT", "(f / 'tokenizer_config.json').write_text('{{oops')",
              r"tokenizer_config\.json"),
        _case("modules.json not JSON", "COLBERT", "(f / 'modules.json').write_text('[oops')", r"modules\.json"),
        _case("modules.json an object", "COLBERT", "(f / 'modules.json').write_text('{}')", r"modules\.json"),
        _case("modules.json pooling outside", "EMBEDDING",
              "(f / 'modules.json').write_text(json.dumps([{'type': 'sentence_transformers.models.Pooling', "
              "'path': '../../etc'}]))", r"modules\.json.*outside"),
        _case("1_Pooling config not JSON", "EMBEDDING", "(f / '1_Pooling' / 'config.json').write_text('{{oops')",
              r"1_Pooling"),
        _case("1_Pooling config a list", "EMBEDDING", "(f / '1_Pooling' / 'config.json').write_text('[]')",
              r"1_Pooling"),
        _case("sentence_bert_config max_seq_length zero", "EMBEDDING",
              "edit_json(f / 'sentence_bert_config.json', max_seq_length=0)", r"sentence_bert_config\.json.*length"),
        _case("sentence_bert_config max_seq_length string", "EMBEDDING",
              "edit_json(f / 'sentence_bert_config.json', max_seq_length='512')", r"sentence_bert_config\.json"),
        _case("sentence_bert_config max_seq_length huge", "EMBEDDING",
              "edit_json(f / 'sentence_bert_config.json', max_seq_length=10**6)", r"sentence_bert_config\.json"),
        _case("sentence_bert_config not JSON", "EMBEDDING", "(f / 'sentence_bert_config.json').write_text('x')",
              r"sentence_bert_config\.json"),
        _case("prompts a list", "EMBEDDING", "edit_json(f / 'config_sentence_transformers.json', prompts=[1])",
              r"config_sentence_transformers\.json"),
        _case("prompt not a string", "EMBEDDING",
              "edit_json(f / 'config_sentence_transformers.json', prompts={'query': 5})", r"query"),
        _case("query_length zero", "COLBERT", f"edit_json({st}, query_length=0)", r"query_length"),
        _case("query_length string", "COLBERT", f"edit_json({st}, query_length='32')", r"query_length"),
        _case("query_length huge", "COLBERT", f"edit_json({st}, query_length=2**40)", r"query_length"),
        _case("document_length negative", "COLBERT", f"edit_json({st}, document_length=-1)", r"document_length"),
        _case("document_length above the maximum", "COLBERT", f"edit_json({st}, document_length=100000)",
              r"document_length"),
        _case("do_query_expansion a string", "COLBERT", f"edit_json({st}, do_query_expansion='yes')",
              r"do_query_expansion"),
        _case("skiplist_words a number", "COLBERT", f"edit_json({st}, skiplist_words=5)", r"skiplist_words"),
        _case("query prefix not a token", "COLBERT", f"edit_json({st}, query_prefix='[X] ')", r"prefix"),
        _case("query prefix not a string", "COLBERT", f"edit_json({st}, query_prefix=1)", r"query_prefix"),
        _case("sentence-transformers config not JSON", "COLBERT", f"{st}.write_text('{{oops')",
              r"config_sentence_transformers\.json"),
        _case("sentence-transformers config a list", "COLBERT", f"{st}.write_text('[]')",
              r"config_sentence_transformers\.json"),
    ]


CASES = _config_cases() + _safetensors_cases() + _index_cases() + _tokenizer_and_module_cases()


def _prelude(colbert: Path, embedding: Path) -> str:
    return (
        "import sys, json\n"
        f"sys.path.insert(0, {str(ROOT)!r})\n"
        "from pathlib import Path\n"
        "from tests.test_hostile_checkpoints import copy_ckpt, edit_json, edit_safetensors, convert_refused\n"
        f"COLBERT, EMBEDDING = Path({str(colbert)!r}), Path({str(embedding)!r})\n"
    )


@pytest.fixture(scope="module")
def outcomes(colbert_checkpoint, embedding_checkpoint, tmp_path_factory):
    env = {"HOSTILE_WORK": str(tmp_path_factory.mktemp("hostile-ckpt"))}
    return run_cases(CASES, prelude=_prelude(colbert_checkpoint, embedding_checkpoint), timeout_s=60, env=env,
                     cwd=str(ROOT))


@pytest.mark.parametrize("name", [c.name for c in CASES])
def test_hostile_checkpoint(name, outcomes):
    check(outcomes[name])


# --- files we write ------------------------------------------------------------------------------------------


def _convert(*args, **kwargs):
    from lfm2edge.convert.pipeline import convert

    return convert(*args, **kwargs)


def test_existing_output_is_kept_unless_forced(colbert_checkpoint, tmp_path):
    from lfm2edge.runtime.core.errors import ConversionError

    out = tmp_path / "m.gguf"
    out.write_bytes(b"precious")
    with pytest.raises(ConversionError, match=r"m\.gguf already exists.*--force"):
        _convert(colbert_checkpoint, out, "f32")
    assert out.read_bytes() == b"precious"
    _convert(colbert_checkpoint, out, "f32", force=True)
    assert out.read_bytes()[:4] == b"GGUF"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.gguf"]


@pytest.mark.parametrize("force", [False, True])
def test_never_replaces_anything_but_a_regular_file(colbert_checkpoint, tmp_path, force):
    from lfm2edge.runtime.core.errors import ConversionError

    folder = tmp_path / "dir.gguf"
    folder.mkdir()
    with pytest.raises(ConversionError, match=r"dir\.gguf is a folder"):
        _convert(colbert_checkpoint, folder, "f32", force=force)
    target = tmp_path / "target.gguf"
    target.write_bytes(b"keep")
    link = tmp_path / "link.gguf"
    link.symlink_to(target)
    with pytest.raises(ConversionError, match=r"link\.gguf is a symbolic link"):
        _convert(colbert_checkpoint, link, "f32", force=force)
    fifo = tmp_path / "fifo.gguf"
    os.mkfifo(fifo)
    with pytest.raises(ConversionError, match=r"fifo\.gguf is not a regular file"):
        _convert(colbert_checkpoint, fifo, "f32", force=force)
    assert folder.is_dir() and link.is_symlink() and target.read_bytes() == b"keep"
    assert fifo.is_fifo()  # still a fifo, not a file renamed over it
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dir.gguf", "fifo.gguf", "link.gguf", "target.gguf"]


def test_written_file_is_checked_before_it_is_kept(colbert_gguf, tmp_path):
    """The last guard: a written file that load() would refuse is not published."""
    from lfm2edge.convert.pipeline import _check_written
    from lfm2edge.runtime.core.errors import ConversionError

    broken = tmp_path / "broken.gguf"
    raw = bytearray(colbert_gguf.read_bytes())
    at = raw.index(b"lfm2edge.query_length") + len("lfm2edge.query_length") + 4
    raw[at : at + 4] = (0).to_bytes(4, "little")
    broken.write_bytes(bytes(raw))
    with pytest.raises(ConversionError, match=r"(?s)would not load.*lfm2edge\.query_length"):
        _check_written(broken, tmp_path / "out.gguf")
    _check_written(colbert_gguf, tmp_path / "out.gguf")  # a good file passes


def test_source_is_not_a_local_path(colbert_gguf, colbert_checkpoint):
    from lfm2edge.runtime.core.model_file import describe

    source = describe(colbert_gguf).settings.source
    assert source == colbert_checkpoint.name and "/" not in source


def test_cli_errors_are_one_line_with_the_exit_code(colbert_checkpoint, colbert_gguf, tmp_path):
    """The real command, in a fresh process: an error line and the documented code, never a traceback."""
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(colbert_gguf.read_bytes()[:5000])
    folder = tmp_path / "out.gguf"
    folder.mkdir()
    runs = {
        ("inspect", str(broken)): 3,
        ("convert", str(colbert_checkpoint), "-o", str(folder), "--outtype", "f32"): 7,  # ConversionError
        ("convert", str(tmp_path / "no-such"), "-o", str(tmp_path / "x.gguf")): 3,  # CheckpointError
        ("verify", str(broken), "--reference", str(colbert_checkpoint)): 3,
    }
    for args, code in runs.items():
        proc = subprocess.run([sys.executable, "-m", "lfm2edge.cli", *args], capture_output=True, text=True,
                              timeout=300, cwd=ROOT)
        assert proc.returncode == code, (args, proc.returncode, proc.stderr[-2000:])
        assert proc.stderr.startswith("error: ") and "Traceback" not in proc.stderr, (args, proc.stderr[-2000:])


def test_in_process_cli_matches(colbert_gguf, tmp_path):
    """``run_cli`` (which the hostile cases use) sees what the real command shows."""
    code, out, err = run_cli(["inspect", str(colbert_gguf)])
    assert code == 0 and "late_interaction" in out and err == ""
    code, _, err = run_cli(["inspect", str(tmp_path / "missing.gguf")])
    assert code == 3 and re.match(r"error: .*missing\.gguf does not exist", err)
