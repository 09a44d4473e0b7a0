"""The CLI on its error paths: each ends with its documented exit code and an ``error:`` line, no traceback.

The cases run ``lfm2edge.cli.main()`` in hostile child processes (tests/hostile.py): a case ends by
raising ``CliExit("<exit code>|<first error: line>")``, which its regex checks; a traceback on stderr,
an exception that escaped main(), a signal or a hang fails it. A few run the real entry point in a
subprocess too, to check the process's own exit status and stderr end to end.
"""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.hostile import Case, check, run_cases

# Every case can use: MODEL (ColBERT GGUF), DENSE, TMP (a scratch folder), TEXTS (a good text file),
# AFILE (a regular file), IDX (a ColBERT index with documents), BUSY_PORT (a port someone listens on).
PRELUDE = r"""
import contextlib, io, json, os, socket, sys
from pathlib import Path

from lfm2edge.cli import main

MODEL, DENSE, TMP = os.environ["H_MODEL"], os.environ["H_DENSE"], os.environ["H_TMP"]
TEXTS, AFILE, IDX = f"{TMP}/texts.txt", f"{TMP}/afile", f"{TMP}/idx"
Path(TEXTS).write_text("first text\nsecond text\n", encoding="utf-8")
Path(AFILE).write_text("not a folder\n", encoding="utf-8")
Path(f"{TMP}/latin1.txt").write_bytes(b"caf\xe9 au lait\n")
Path(f"{TMP}/surrogate.jsonl").write_text('{"text": "ok"}\n{"text": "a\\ud800b"}\n', encoding="utf-8")
Path(f"{TMP}/surrogate-id.jsonl").write_text('{"id": "x\\udfff", "text": "a"}\n', encoding="utf-8")
Path(f"{TMP}/nan.jsonl").write_text('{"id": "n", "text": "a", "metadata": {"x": NaN}}\n', encoding="utf-8")
Path(f"{TMP}/listmeta.jsonl").write_text('{"id": "l", "text": "a", "metadata": [1]}\n', encoding="utf-8")
Path(f"{TMP}/mixed.jsonl").write_text('{"id": "a", "text": "x"}\n{"text": "y"}\n', encoding="utf-8")
Path(f"{TMP}/blank.txt").write_text("\n   \n", encoding="utf-8")
Path(f"{TMP}/notgguf.gguf").write_bytes(b"GGUF" + b"\0" * 3)
Path(f"{TMP}/full").mkdir(exist_ok=True)
Path(f"{TMP}/full/keep.txt").write_text("x", encoding="utf-8")
BUSY = socket.socket()
BUSY.bind(("127.0.0.1", 0))
BUSY.listen()
BUSY_PORT = str(BUSY.getsockname()[1])


class CliExit(Exception):
    "How the command ended: '<exit code>|<its first error: line>'."


def cli(*args, stdin=None):
    err, out, old_stdin = io.StringIO(), io.StringIO(), sys.stdin
    sys.argv = ["lfm2edge", *map(str, args)]
    if stdin is not None:
        sys.stdin = io.StringIO(stdin)
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
            main()
        code = 0
    except SystemExit as e:
        code = e.code
    finally:
        sys.stdin = old_stdin
    text = err.getvalue()
    if "Traceback" in text:
        raise AssertionError("a traceback on stderr:\n" + text)
    errors = [line for line in text.splitlines() if line.startswith("error:")]
    raise CliExit(f"{code}|{errors[0] if errors else text.strip()[:300]}")


def absent(path):
    assert not Path(path).exists(), f"{path} was left behind"
    leftovers = [p.name for p in Path(path).parent.glob(f".{Path(path).name}.*")]
    assert not leftovers, f"temporary files left: {leftovers}"


with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
    if not Path(IDX).exists():
        try:
            cli("index", "create", IDX, "-m", MODEL, "--threads", "1")
        except CliExit:
            pass
        try:
            cli("index", "add", IDX, TEXTS, "--threads", "1")
        except CliExit:
            pass
"""

T1 = '"--threads", "1"'


def case(name: str, code: str, exit_code: int | str, match: str) -> Case:
    """A CLI case: ``code`` calls cli(...); it must end with ``exit_code`` (a regex class) and ``match``."""
    return Case(name, code, "CliExit", rf"^{exit_code}\|error: .*{match}")


CASES = [
    # encode: the output path is checked before the model is even loaded
    case(
        "encode output folder missing (checked first)",
        'cli("encode", f"{TMP}/no-model.gguf", TEXTS, "-o", f"{TMP}/nodir/x.npz")',
        2,
        "nodir.*does not exist",
    ),
    case(
        "encode output is an existing folder named .npz",
        'os.makedirs(f"{TMP}/d.npz", exist_ok=True)\n'
        f'cli("encode", MODEL, TEXTS, "-o", f"{{TMP}}/d.npz", {T1})',
        2,
        "not a regular file",
    ),
    case(
        "encode output under a regular file",
        f'cli("encode", MODEL, TEXTS, "-o", f"{{AFILE}}/x.npz", {T1})',
        2,
        "is not a folder",
    ),
    case(
        "encode output is a fifo",
        'p = f"{TMP}/fifo.npz"\nos.path.exists(p) or os.mkfifo(p)\n'
        f'cli("encode", MODEL, TEXTS, "-o", p, {T1})',
        2,
        "not a regular file",
    ),
    case(
        "encode colbert to npy leaves nothing",
        f'try:\n    cli("encode", MODEL, TEXTS, "-o", f"{{TMP}}/c.npy", {T1})\n'
        'finally:\n    absent(f"{TMP}/c.npy")',
        2,
        "npy cannot hold",
    ),
    case("encode input not utf-8", f'cli("encode", MODEL, f"{{TMP}}/latin1.txt", {T1})', 2, "not UTF-8"),
    case(
        "encode jsonl lone surrogate",
        f'cli("encode", MODEL, f"{{TMP}}/surrogate.jsonl", {T1})',
        2,
        "line 2.*surrogate",
    ),
    case(
        "encode stdin lone surrogate",
        f'cli("encode", MODEL, "-", {T1}, stdin="good\\nbad \\udcff\\n")',
        2,
        "stdin line 2.*surrogate",
    ),
    case("encode stdin empty", f'cli("encode", MODEL, "-", {T1}, stdin="")', 2, "no texts in stdin"),
    case("encode blank file", f'cli("encode", MODEL, f"{{TMP}}/blank.txt", {T1})', 2, "no texts"),
    case("encode missing input", f'cli("encode", MODEL, f"{{TMP}}/missing.txt", {T1})', 2, "does not exist"),
    case("encode model is a folder", f'cli("encode", TMP, TEXTS, {T1})', "[37]", ""),
    case("encode model is not gguf", f'cli("encode", AFILE, TEXTS, {T1})', 3, "GGUF"),
    case("encode model truncated", f'cli("encode", f"{{TMP}}/notgguf.gguf", TEXTS, {T1})', "[37]", ""),
    case("encode model missing", f'cli("encode", f"{{TMP}}/none.gguf", TEXTS, {T1})', 3, ""),
    case("encode bad suffix", f'cli("encode", MODEL, TEXTS, "-o", f"{{TMP}}/v.csv", {T1})', 2, ".csv"),
    case("encode bad input format", f'cli("encode", MODEL, TEXTS, "--input-format", "xml", {T1})', 2, "xml"),
    # index create: an unwritable place is refused before the model loads
    case(
        "index create under a regular file",
        f'cli("index", "create", f"{{AFILE}}/idx", "-m", MODEL, {T1})',
        2,
        "is a file",
    ),
    case(
        "index create deep under a regular file",
        f'cli("index", "create", f"{{AFILE}}/a/b/idx", "-m", MODEL, {T1})',
        2,
        "is a file",
    ),
    case(
        "index create on a file",
        f'cli("index", "create", AFILE, "-m", MODEL, {T1})',
        2,
        "not an empty folder",
    ),
    case(
        "index create non-empty folder",
        f'cli("index", "create", f"{{TMP}}/full", "-m", MODEL, {T1})',
        2,
        "not an empty",
    ),
    case("index create existing index", f'cli("index", "create", IDX, "-m", MODEL, {T1})', 2, "already"),
    case(
        "index create in /proc",
        f'cli("index", "create", "/proc/lfm2edge-x/idx", "-m", MODEL, {T1})',
        "[27]",
        "cannot",
    ),
    case(
        "index create bad dtype",
        f'cli("index", "create", f"{{TMP}}/i2", "-m", MODEL, "--dtype", "f8", {T1})',
        2,
        "dtype",
    ),
    case(
        "index create model missing",
        f'cli("index", "create", f"{{TMP}}/i3", "-m", f"{{TMP}}/none.gguf", {T1})',
        3,
        "",
    ),
    # index add, delete, info
    case("index add not an index", f'cli("index", "add", TMP, TEXTS, {T1})', 6, "not an lfm2edge index"),
    case("index add to a file", f'cli("index", "add", AFILE, TEXTS, {T1})', 6, "not a folder"),
    case(
        "index add surrogate",
        f'cli("index", "add", IDX, f"{{TMP}}/surrogate.jsonl", {T1})',
        2,
        "line 2.*surrogate",
    ),
    case(
        "index add surrogate id",
        f'cli("index", "add", IDX, f"{{TMP}}/surrogate-id.jsonl", {T1})',
        2,
        "id.*surrogate",
    ),
    case("index add NaN metadata", f'cli("index", "add", IDX, f"{{TMP}}/nan.jsonl", {T1})', 2, "metadata"),
    case(
        "index add list metadata", f'cli("index", "add", IDX, f"{{TMP}}/listmeta.jsonl", {T1})', 2, "metadata"
    ),
    case(
        "index add mixed ids",
        f'cli("index", "add", IDX, f"{{TMP}}/mixed.jsonl", {T1})',
        2,
        "every JSONL record",
    ),
    case("index add other model", f'cli("index", "add", IDX, TEXTS, "-m", DENSE, {T1})', 2, "another model"),
    case(
        "index add bad on-duplicate",
        f'cli("index", "add", IDX, TEXTS, "--on-duplicate", "merge", {T1})',
        2,
        "",
    ),
    case("index delete missing id", 'cli("index", "delete", IDX, "no-such-id")', 2, "not in the index"),
    case(
        "index delete ids file not utf-8",
        'cli("index", "delete", IDX, "--ids-from", f"{TMP}/latin1.txt")',
        2,
        "UTF-8",
    ),
    case("index delete nothing", 'cli("index", "delete", IDX)', 2, "no ids"),
    case("index info on a file", 'cli("index", "info", AFILE)', 6, ""),
    case("index info missing", 'cli("index", "info", f"{TMP}/nothing-here")', 6, ""),
    case("index compact not an index", 'cli("index", "compact", TMP)', 6, ""),
    # search and rerank
    case("search surrogate query", f'cli("search", IDX, "bad \\udcff", {T1})', 2, "query 1.*surrogate"),
    case("search blank query", f'cli("search", IDX, "  ", {T1})', 2, "query 1"),
    case("search no query", f'cli("search", IDX, {T1})', 2, "no query"),
    case("search zero k", f'cli("search", IDX, "q", "-k", "0", {T1})', 2, ""),
    case("search other model", f'cli("search", IDX, "q", "-m", DENSE, {T1})', 2, "another model"),
    case(
        "search queries file not utf-8",
        f'cli("search", IDX, "--queries-from", f"{{TMP}}/latin1.txt", {T1})',
        2,
        "UTF-8",
    ),
    case("rerank surrogate query", f'cli("rerank", MODEL, "q \\ud800", TEXTS, {T1})', 2, "query.*surrogate"),
    case(
        "rerank surrogate candidates",
        f'cli("rerank", MODEL, "q", f"{{TMP}}/surrogate.jsonl", {T1})',
        2,
        "surrogate",
    ),
    case("rerank zero top-n", f'cli("rerank", MODEL, "q", TEXTS, "--top-n", "0", {T1})', 2, "top-n"),
    case(
        "rerank missing candidates",
        f'cli("rerank", MODEL, "q", f"{{TMP}}/none.txt", {T1})',
        2,
        "does not exist",
    ),
    # serve: every refusal before it listens
    case("serve bad port", 'cli("serve", MODEL, "--port", "70000")', 2, "port"),
    case("serve port in use", f'cli("serve", MODEL, "--port", BUSY_PORT, {T1})', 2, "cannot listen"),
    case("serve public bind without key", 'cli("serve", MODEL, "--host", "0.0.0.0")', 2, "API key"),
    case("serve short key", 'cli("serve", MODEL, "--host", "0.0.0.0", "--api-key", "abc")', 2, "at least 8"),
    case(
        "serve unknown host",
        'cli("serve", MODEL, "--host", "no such host!", "--api-key", "0123456789ab", "--port", "0")',
        2,
        "cannot listen",
    ),
    case("serve zero max tokens", 'cli("serve", MODEL, "--max-tokens", "0")', 2, "max-tokens"),
    case(
        "serve zero shutdown timeout", 'cli("serve", MODEL, "--shutdown-timeout", "0")', 2, "shutdown-timeout"
    ),
    case("serve model missing", f'cli("serve", f"{{TMP}}/none.gguf", "--port", "0", {T1})', 3, ""),
    case("serve index is a file", f'cli("serve", MODEL, "--index", AFILE, "--port", "0", {T1})', 6, ""),
    case(
        "serve index other model",
        f'cli("serve", DENSE, "--index", IDX, "--port", "0", {T1})',
        2,
        "another model",
    ),
]


@pytest.fixture(scope="module")
def outcomes(colbert_gguf: Path, embedding_gguf: Path, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("hostile-cli")
    env = {"H_MODEL": str(colbert_gguf), "H_DENSE": str(embedding_gguf), "H_TMP": str(tmp)}
    return run_cases(CASES, prelude=PRELUDE, timeout_s=60, env=env | {"LFM2EDGE_API_KEY": ""})


@pytest.mark.parametrize("name", [c.name for c in CASES])
def test_cli_error_path(outcomes, name):
    check(outcomes[name])


# ----------------------------------------------------------------------------------------------------------
# The real entry point: exit status and stderr of the process itself
# ----------------------------------------------------------------------------------------------------------


def run_entry_point(*args: str | bytes) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "lfm2edge.cli", *args], capture_output=True, text=True, timeout=120
    )


def assert_error_exit(done: subprocess.CompletedProcess, code: int, fragment: str) -> None:
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert done.returncode == code and len(errors) == 1 and fragment in errors[0], done.stderr
    assert "Traceback" not in done.stderr


def test_entry_point_encode_to_missing_folder(colbert_gguf, tmp_path):
    texts = tmp_path / "t.txt"
    texts.write_text("one\ntwo\n", encoding="utf-8")
    done = run_entry_point("encode", str(colbert_gguf), str(texts), "-o", str(tmp_path / "nodir" / "x.npz"))
    assert_error_exit(done, 2, "does not exist")
    assert not (tmp_path / "nodir").exists()


def test_entry_point_undecodable_argument(colbert_gguf, tmp_path):
    # An argument that is not UTF-8 reaches Python as a lone surrogate (surrogateescape).
    done = run_entry_point("rerank", str(colbert_gguf).encode(), b"caf\xe9", str(tmp_path / "none.txt"))
    assert_error_exit(done, 2, "surrogate")


def test_entry_point_index_create_under_a_file(colbert_gguf, tmp_path):
    (tmp_path / "file").write_text("x", encoding="utf-8")
    done = run_entry_point("index", "create", str(tmp_path / "file" / "idx"), "-m", str(colbert_gguf))
    assert_error_exit(done, 2, "is a file")


def test_entry_point_serve_port_in_use(colbert_gguf):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        done = run_entry_point("serve", str(colbert_gguf), "--port", str(busy.getsockname()[1]))
    assert_error_exit(done, 2, "cannot listen")


def test_encode_writes_atomically(colbert_gguf, tmp_path):
    """A successful encode leaves exactly the output, no temporary file beside it."""
    texts = tmp_path / "t.txt"
    texts.write_text("one\ntwo\n", encoding="utf-8")
    done = run_entry_point(
        "encode", str(colbert_gguf), str(texts), "-o", str(tmp_path / "v.npz"), "--threads", "1"
    )
    assert done.returncode == 0, done.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.txt", "v.npz"]


def test_example_search_folder_hostile(colbert_gguf, tmp_path):
    """examples/search_folder.py: an undecodable file name is indexed, bad arguments are error lines."""
    script = Path(__file__).resolve().parents[1] / "examples" / "search_folder.py"
    folder = tmp_path / "notes"
    folder.mkdir()
    (folder / "ok.md").write_text("Bees make honey.\n\nTrains run on rails.", encoding="utf-8")
    with open(bytes(folder) + b"/caf\xe9.txt", "wb") as f:
        f.write(b"Bread needs flour, water and time.")
    (folder / "dangling.md").symlink_to(tmp_path / "nowhere.md")

    def run(*args: str | bytes) -> subprocess.CompletedProcess:
        cmd = [sys.executable, str(script), str(colbert_gguf), *args, "--threads", "1"]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=120)

    done = run(str(folder), "bread", "-k", "3")
    assert done.returncode == 0, done.stderr
    assert "index: 3 paragraphs (3 encoded now, 0 removed)" in done.stdout and "caf\\xe9.txt" in done.stdout
    assert_error_exit(run(str(tmp_path / "missing"), "q"), 2, "is not a folder")
    assert_error_exit(run(str(folder), b"caf\xe9"), 2, "surrogate")
