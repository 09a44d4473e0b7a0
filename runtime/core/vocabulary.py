"""The model's vocabulary as its GGUF stores it: token ids checked, and read back as the text they spell.

The server takes token-id input (OpenAI's ``input: [[id, ...]]``) as the text those ids spell in this
model's vocabulary and encodes that text exactly as a text input: prompt or marker, BOS, truncation.
So ids from this model's tokenizer give the same vector as their text, and ids that no text
tokenizes to (unused placeholder rows) are refused rather than decoded into something the model
never saw. Reading ids back follows llama.cpp's ``token_to_piece`` for a byte-level BPE ("gpt2")
vocabulary: a NORMAL token is GPT-2 byte-level text, a CONTROL or USER_DEFINED one its literal
text (which the tokenizer matches back to that token, as it does in any text).
"""

from __future__ import annotations

import codecs
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache

import numpy as np

from lfm2edge.runtime.core.errors import InvalidInputError
from lfm2edge.runtime.core.gguf_file import GGUFHeader

# gguf's TokenType values (tokenizer.ggml.token_type).
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
_TYPE_NAMES = {UNKNOWN: "the unknown token", UNUSED: "an unused placeholder row", BYTE: "a byte token"}
_LITERAL = np.array([CONTROL, USER_DEFINED])  # spelled as written


@cache
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map (the byte-level BPE alphabet)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    others = [b for b in range(256) if b not in printable]  # they take 256, 257, ... in byte order
    table = {b: chr(b) for b in printable}
    table.update({b: chr(256 + i) for i, b in enumerate(others)})
    return table


@cache
def _unicode_to_bytes() -> dict[str, int]:
    return {c: b for b, c in bytes_to_unicode().items()}


@dataclass(frozen=True)
class Vocabulary:
    tokens: Sequence[str]
    types: np.ndarray  # int32, one gguf TokenType per token
    bos_id: int | None

    @classmethod
    def of(cls, header: GGUFHeader) -> Vocabulary:
        """The vocabulary of a file llama.cpp has loaded (its tokenizer keys were checked then)."""
        tokens = header.metadata["tokenizer.ggml.tokens"]
        assert isinstance(tokens, list)
        types = header.metadata.get("tokenizer.ggml.token_type")
        types = np.full(len(tokens), NORMAL, np.int32) if types is None else np.asarray(types, np.int32)
        bos = header.metadata.get("tokenizer.ggml.bos_token_id")
        return cls(tokens, types, None if bos is None else int(bos))  # type: ignore[call-overload]

    def __len__(self) -> int:
        return len(self.tokens)

    def text(self, ids: Sequence[int], where: str, keep: int | None = None) -> str:
        """The text ``ids`` spell, read from at most the first ``keep`` of them (all are checked against
        the vocabulary; a character cut by ``keep`` is left out).

        One leading BOS is dropped (the encoder adds its own); an id outside the vocabulary, or one that
        no text tokenizes to, is an InvalidInputError naming ``where`` and the id's position.
        """
        start = 1 if len(ids) and ids[0] == self.bos_id else 0
        if len(ids) <= start:
            raise InvalidInputError(f"{where} holds no token ids; send the text's tokens, at least one")
        n = len(self.tokens)
        try:
            array = np.fromiter(ids, dtype=np.int64, count=len(ids))
            bad = np.flatnonzero((array < 0) | (array >= n))
            first_bad = int(bad[0]) if bad.size else None
        except OverflowError:  # an id past int64: found the slow way, still named
            first_bad = next(i for i, t in enumerate(ids) if not 0 <= t < n)
        if first_bad is not None:
            raise InvalidInputError(
                f"{where}[{first_bad}] is token id {ids[first_bad]}, outside this model's vocabulary of "
                f"{n:,} tokens (0 to {n - 1:,}); send ids from this model's tokenizer (tiktoken ids are "
                "OpenAI's: LangChain's OpenAIEmbeddings needs check_embedding_ctx_length=False), or the text"
            )
        ids_np = array[start : None if keep is None else start + keep]
        types = self.types[ids_np]
        odd = np.flatnonzero((types != NORMAL) & ~np.isin(types, _LITERAL))
        if odd.size:
            i = int(odd[0])
            raise InvalidInputError(
                f"{where}[{i + start}] is token id {ids_np[i]}, {_TYPE_NAMES.get(int(types[i]), 'not text')} "
                f"({self.tokens[ids_np[i]][:40]!r}), which no text tokenizes to; send the ids this "
                "model's tokenizer gives for the text, or the text"
            )
        to_byte = _unicode_to_bytes()
        raw = bytearray()
        for token_id, kind in zip(ids_np.tolist(), types.tolist(), strict=True):
            piece = self.tokens[token_id]
            if kind != NORMAL:
                raw += piece.encode("utf-8")
                continue
            try:
                raw += bytes(to_byte[c] for c in piece)
            except KeyError:
                raise InvalidInputError(
                    f"{where}: token id {token_id} ({piece[:40]!r}) is not byte-level text in this "
                    "vocabulary; send the text instead"
                ) from None
        cut = len(ids_np) < len(ids) - start
        try:
            return codecs.getincrementaldecoder("utf-8")().decode(bytes(raw), final=not cut)
        except UnicodeDecodeError as e:
            raise InvalidInputError(
                f"{where}: the token ids do not spell UTF-8 text (a character is cut at byte {e.start}); "
                "send the tokens of whole characters, or the text"
            ) from None
