"""Metadata filters for search: ``where={"lang": "en", "tag": ["faq", "howto"]}``.

One meaning on both engines, Qdrant's: every key must match (AND). A key is a metadata field, dotted for
nested ones (``"product.brand"``). A value is a string, an integer or a bool, matched exactly; a list of
strings or of integers matches any of them. A stored list matches when any of its elements does; a
missing field never matches. Types are not mixed: ``1`` does not match ``True`` nor ``1.0``. Floats are
refused, because equality on them is not what anyone wants (Qdrant filters them by range), and so are
integers beyond 64 bits and keys holding ``"`` (Qdrant could not match them).

The exact index evaluates ``matches`` on each document's metadata; the Qdrant engine turns the same
``Where`` into a payload filter on ``metadata.<key>``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from lfm2edge.runtime.core.errors import InvalidInputError

Scalar = str | int | bool
MAX_WHERE_KEYS = 64
MAX_WHERE_VALUES = 1024
# Qdrant's integers are 64-bit: a wider one could never match there (and its filter refuses it).
MIN_INT, MAX_INT = -(2**63), 2**63 - 1


@dataclass(frozen=True)
class Condition:
    path: tuple[str, ...]  # the metadata field, split at dots
    values: tuple[Scalar, ...]  # one value: equality; several: any of them


Where = tuple[Condition, ...]


def check_where(where: object) -> Where:
    """The conditions of a ``where`` mapping, or InvalidInputError naming the bad key and what works."""
    if where is None:
        return ()
    if not isinstance(where, Mapping):
        raise InvalidInputError(f"where must be a dict of metadata field -> value, not {type(where).__name__}")
    if len(where) > MAX_WHERE_KEYS:
        raise InvalidInputError(f"where has {len(where)} keys; the limit is {MAX_WHERE_KEYS} (MAX_WHERE_KEYS)")
    out = []
    for key, value in where.items():
        if not isinstance(key, str) or not key or any(not part for part in key.split(".")) or '"' in key:
            raise InvalidInputError(
                f"where key {key!r} must be a metadata field name, dotted for nested fields (e.g. 'product.brand'), "
                "without '\"'"
            )
        values = tuple(value) if isinstance(value, (list, tuple)) else (value,)
        if not values or len(values) > MAX_WHERE_VALUES:
            raise InvalidInputError(
                f"where[{key!r}] must list between 1 and {MAX_WHERE_VALUES} values (MAX_WHERE_VALUES)"
            )
        for v in values:
            if not isinstance(v, (str, int)):  # bool is an int
                raise InvalidInputError(
                    f"where[{key!r}] holds {v!r} ({type(v).__name__}); match strings, integers or bools "
                    "(floats are not matched by equality)"
                )
            if not isinstance(v, (str, bool)) and not MIN_INT <= v <= MAX_INT:
                raise InvalidInputError(f"where[{key!r}] holds {v!r}, outside the 64-bit integer range that Qdrant matches")
        kinds = {_kind(v) for v in values}
        if len(values) > 1 and (len(kinds) > 1 or kinds == {bool}):
            raise InvalidInputError(
                f"where[{key!r}] lists values of several types (or bools); a list matches strings only or "
                "integers only"
            )
        out.append(Condition(tuple(key.split(".")), values))
    return tuple(out)


def matches(metadata: Mapping[str, Any] | None, where: Where) -> bool:
    """Whether one document's metadata satisfies every condition."""
    for cond in where:
        found = _field(metadata, cond.path)
        candidates = found if isinstance(found, list) else [found]
        if not any(_equal(c, v) for c in candidates for v in cond.values):
            return False
    return True


def _field(metadata: Any, path: tuple[str, ...]) -> Any:
    for part in path:
        if not isinstance(metadata, Mapping) or part not in metadata:
            return None
        metadata = metadata[part]
    return metadata


def _kind(v: object) -> type:
    return bool if isinstance(v, bool) else type(v)


def _equal(stored: object, wanted: Scalar) -> bool:
    return stored is not None and _kind(stored) is _kind(wanted) and stored == wanted
