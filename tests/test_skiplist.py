"""The ColBERT skiplist of a GGUF without lfm2edge settings comes from its own vocabulary.

The file here is the tiny ColBERT GGUF without its lfm2edge.* keys and with its vocabulary laid out
unlike LFM2's bytes: "[Q] " and "[D] " moved to the ids of "!" and "#" (510 and 512, inside the
code point + 477 layout), the punctuation moved to the markers' old ids.
"""

from __future__ import annotations

import string
from pathlib import Path

import gguf
import numpy as np
import pytest

import lfm2edge
from lfm2edge.runtime.core.model_file import describe
from lfm2edge.runtime.core.settings import default_skiplist_ids, skiplist_ids_from_vocabulary

PER_TOKEN_KEYS = ("tokenizer.ggml.tokens", "tokenizer.ggml.token_type", "tokenizer.ggml.scores")


def _rewrite(src: Path, dst: Path, swaps: dict[int, int]) -> Path:
    """``src`` without lfm2edge.* keys, with the vocabulary entries of each (a, b) in ``swaps`` exchanged."""
    r = gguf.GGUFReader(src)
    w = gguf.GGUFWriter(dst, str(r.fields["general.architecture"].contents()))
    for key, field in r.fields.items():
        if key.startswith(("GGUF.", "lfm2edge.", "general.architecture")):
            continue
        value = field.contents()
        if key in PER_TOKEN_KEYS:
            for a, b in swaps.items():
                value[a], value[b] = value[b], value[a]
        vtype = field.types[0]
        w.add_key_value(key, value, vtype, field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None)
    for t in r.tensors:
        w.add_tensor(t.name, np.array(t.data), raw_dtype=t.tensor_type)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return dst


@pytest.fixture(scope="module")
def moved_markers(colbert_gguf: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    tokens = gguf.GGUFReader(colbert_gguf).fields["tokenizer.ggml.tokens"].contents()
    q_id, d_id = tokens.index("[Q] "), tokens.index("[D] ")
    assert tokens[510] == "!" and tokens[512] == "#"  # the tiny vocabulary has LFM2's byte layout
    out = tmp_path_factory.mktemp("skiplist") / "moved.gguf"
    return _rewrite(colbert_gguf, out, {510: q_id, 512: d_id})


def test_lfm2_layout_gives_the_published_ids():
    tokens = [f"<t{i}>" for i in range(1000)]
    for c in string.punctuation:
        tokens[ord(c) + 477] = c
    assert skiplist_ids_from_vocabulary(tokens) == default_skiplist_ids()
    assert skiplist_ids_from_vocabulary(["a", "!", "!!", " !", "[Q] ", "."]) == (1, 5)


def test_skiplist_follows_the_vocabulary_not_the_byte_layout(moved_markers: Path):
    mf = describe(moved_markers)
    s = mf.settings
    assert not mf.has_own_settings and mf.problems() == []
    assert (s.query_prefix_id, s.document_prefix_id) == (510, 512)
    tokens = mf.header.metadata["tokenizer.ggml.tokens"]
    assert sorted(tokens[i] for i in s.skiplist_ids) == sorted(string.punctuation)
    assert 510 not in s.skiplist_ids and 512 not in s.skiplist_ids
    assert set(s.skiplist_ids) != set(default_skiplist_ids())


def test_documents_keep_their_marker_and_drop_punctuation(moved_markers: Path):
    with lfm2edge.load(moved_markers, n_threads=1) as enc:
        text = "Hello, world! (a test; of: punctuation)."
        ids = enc.prepare_document(text)
        punctuation = np.isin(ids, enc.settings.skiplist_array())
        assert ids[1] == 512 and not punctuation[1] and punctuation.sum() >= 5
        rows = enc.encode_document(text)
        assert rows.shape[0] == len(ids) - punctuation.sum()
