"""Token ids read back as text (runtime/core/vocabulary.py), checked against llama.cpp's own tokenizer."""

from __future__ import annotations

import pytest
from tokenizers.pre_tokenizers import ByteLevel

from lfm2edge.convert.synthetic import load_sample_texts
from lfm2edge.runtime.core.errors import InvalidInputError
from lfm2edge.runtime.core.vocabulary import Vocabulary, bytes_to_unicode

SAMPLE = load_sample_texts()
TEXTS = [d["text"] for d in SAMPLE["documents"]] + [q["text"] for q in SAMPLE["queries"]]


@pytest.fixture(scope="module")
def vocab(embedding_encoder) -> Vocabulary:
    return Vocabulary.of(embedding_encoder.model_file.header)


def test_byte_table_is_gpt2s():
    assert sorted(bytes_to_unicode().values()) == sorted(ByteLevel.alphabet())


def test_ids_spell_the_text_they_came_from(vocab, embedding_encoder):
    texts = TEXTS + ["naïve café — 東京 😀", "  spaces\tand\nnewlines  "]
    for text in texts:
        ids = embedding_encoder.tokenize(text).tolist()
        assert vocab.text(ids, "t") == text  # with its leading BOS, dropped
        assert vocab.text(ids[1:], "t") == text


def test_keep_reads_a_prefix_and_never_half_a_character(vocab, embedding_encoder):
    text = "東京 😀 " * 20
    ids = embedding_encoder.tokenize(text)[1:].tolist()
    for keep in range(1, 12):
        prefix = vocab.text(ids, "t", keep)
        assert text.startswith(prefix) and len(prefix.encode()) <= len(text.encode())
    assert vocab.text(ids, "t", len(ids)) == text


def test_bad_ids_are_named(vocab, embedding_encoder):
    word, bos = embedding_encoder.tokenize("hello")[1:].tolist()[0], vocab.bos_id
    n = len(vocab)
    cases = [
        ([word, n], "t[1] is token id"),
        ([word, -5], "t[1] is token id -5"),
        ([word, 2**64], f"t[1] is token id {2**64}"),
        ([bos], "no token ids"),
        ([], "no token ids"),
        ([word, n - 1], "unused placeholder"),
    ]
    # Only a leading BOS is dropped; elsewhere a control token is its text, as "<|im_end|>" in a text is.
    assert vocab.text([bos, word, bos], "t") == vocab.text([word], "t") + vocab.tokens[bos]
    for ids, fragment in cases:
        with pytest.raises(InvalidInputError, match=fragment.replace("[", "\\[").replace("]", "\\]")):
            vocab.text(ids, "t")
    emoji = embedding_encoder.tokenize("😀")[1:].tolist()
    assert len(emoji) > 1  # its four bytes in several tokens: all but the last are not text
    with pytest.raises(InvalidInputError, match="UTF-8"):
        vocab.text(emoji[:-1], "t")
