"""One check for the texts every entry point takes (encoders, index, server, CLI).

A text must be a ``str`` of valid Unicode scalar values with some non-whitespace content.
Lone surrogates (``"a\\ud800b"``, which JSON and Python both allow) cannot be encoded to
UTF-8 for the tokenizer, so they are refused here with the text's position named.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from lfm2edge.runtime.core.errors import InvalidInputError


def check_text(text: object, where: str) -> str:
    """``text`` itself, or InvalidInputError naming ``where`` (e.g. "text 3", "input[2]")."""
    if not isinstance(text, str):
        hint = " (decode bytes first, e.g. data.decode('utf-8'))" if isinstance(text, (bytes, bytearray)) else ""
        raise InvalidInputError(f"{where} is {type(text).__name__}, not str{hint}")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise InvalidInputError(
            f"{where} is not valid Unicode: a lone surrogate {text[e.start]!r} at character {e.start}; "
            "decode the source with errors='replace' or remove it"
        ) from None
    if not text.strip():
        raise InvalidInputError(f"{where} is empty or only whitespace; remove it or give it content")
    return text


def check_texts(texts: object, what: str = "text") -> tuple[list[str], bool]:
    """(the texts as a list, whether a single string came in); a clear error for anything else.

    An empty list is allowed: callers return an empty result of the right shape.
    """
    if isinstance(texts, str):
        return [check_text(texts, what)], True
    if isinstance(texts, (bytes, bytearray)):
        raise InvalidInputError(f"{what}s must be str, not bytes: decode them first, e.g. data.decode('utf-8')")
    if texts is None:
        raise InvalidInputError(f"{what}s is None: pass a string or a list of strings")
    if not isinstance(texts, (Sequence, np.ndarray)):
        raise InvalidInputError(f"{what}s must be a string or a list of strings, not {type(texts).__name__}")
    items = list(texts)
    return [check_text(t, f"{what} {i}") for i, t in enumerate(items)], False
