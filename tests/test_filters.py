"""lfm2edge.runtime.storage.filters: the ``where`` checks, ``matches``, and one meaning on every engine.

The table at the end is the important part: the same where-clauses over documents with varied metadata
(ints, bools, strings, floats, lists, nested dicts, missing keys, odd key names) select the same ids in
the exact index, in Qdrant Edge and in qdrant-client's local mode (standing in for a server), and those
ids are the ones written down here, which are what the module docstring promises.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest

from lfm2edge import InvalidInputError
from lfm2edge.runtime.storage.filters import (
    MAX_WHERE_KEYS,
    MAX_WHERE_VALUES,
    Condition,
    check_where,
    matches,
)
from lfm2edge.runtime.storage.index import Index

# ----------------------------------------------------------------------------------------------------------
# check_where
# ----------------------------------------------------------------------------------------------------------


def test_check_where_accepts_and_splits():
    assert check_where(None) == ()
    assert check_where({}) == ()
    assert check_where({"lang": "en"}) == (Condition(("lang",), ("en",)),)
    assert check_where({"product.brand": "acme", "n": [1, 2]}) == (
        Condition(("product", "brand"), ("acme",)),
        Condition(("n",), (1, 2)),
    )
    assert check_where({"flag": True}) == (Condition(("flag",), (True,)),)
    assert check_where({"tag": ("a", "b")}) == (Condition(("tag",), ("a", "b")),)  # a tuple is a list
    assert check_where({"n": [7]}) == (Condition(("n",), (7,)),)
    assert check_where({"s": ""}) == (Condition(("s",), ("",)),)  # the empty string is a value
    assert check_where({"tags[]": "a", "x y": 1, "é": "ü"})[0].path == ("tags[]",)  # any character but '"'
    # the limits themselves are allowed; 64-bit integers are
    assert len(check_where({f"k{i}": 1 for i in range(MAX_WHERE_KEYS)})) == MAX_WHERE_KEYS
    assert len(check_where({"n": list(range(MAX_WHERE_VALUES))})[0].values) == MAX_WHERE_VALUES
    assert check_where({"n": [2**63 - 1, -(2**63)]})[0].values == (2**63 - 1, -(2**63))


@pytest.mark.parametrize(
    ("where", "match"),
    [
        (["lang", "en"], "must be a dict"),
        ("lang=en", "must be a dict"),
        (42, "must be a dict"),
        ({"": "x"}, "where key ''"),
        ({"a..b": "x"}, "where key 'a..b'"),
        ({".a": "x"}, "where key '.a'"),
        ({"a.": "x"}, "where key 'a.'"),
        ({1: "x"}, "where key 1"),
        ({'a"b': "x"}, "without '\"'"),
        ({"price": 1.5}, r"where\['price'\] holds 1.5 \(float\)"),
        ({"price": 1.0}, "floats are not matched"),
        ({"n": [1, 2.5]}, r"where\['n'\] holds 2.5"),
        ({"n": None}, r"where\['n'\] holds None"),
        ({"n": {"a": 1}}, r"where\['n'\] holds \{'a': 1\}"),
        ({"n": b"bytes"}, r"where\['n'\] holds b'bytes'"),
        ({"n": []}, r"where\['n'\] must list between 1 and"),
        ({"n": list(range(MAX_WHERE_VALUES + 1))}, "MAX_WHERE_VALUES"),
        ({f"k{i}": 1 for i in range(MAX_WHERE_KEYS + 1)}, "MAX_WHERE_KEYS"),
        ({"n": ["1", 1]}, "several types"),
        ({"n": [True, 1]}, "several types"),
        ({"n": [True, False]}, "bools"),
        ({"n": 2**63}, "64-bit"),
        ({"n": [1, -(2**63) - 1]}, "64-bit"),
    ],
)
def test_check_where_refuses(where, match):
    with pytest.raises(InvalidInputError, match=match):
        check_where(where)


# ----------------------------------------------------------------------------------------------------------
# matches
# ----------------------------------------------------------------------------------------------------------


def m(where: dict) -> Callable[[object], bool]:
    """``matches`` for one where-clause."""
    return lambda metadata: matches(metadata, check_where(where))


def test_matches_equality_and_any_of():
    assert m({"lang": "en"})({"lang": "en"}) and not m({"lang": "en"})({"lang": "de"})
    assert m({"lang": "en"})({"lang": "en", "other": 1})  # other fields do not matter
    assert not m({"lang": "en"})({"lang": "EN"})  # exact, case-sensitive
    assert m({"lang": ["en", "de"]})({"lang": "de"}) and not m({"lang": ["en", "de"]})({"lang": "fr"})
    assert m({"n": [1, 2]})({"n": 2}) and not m({"n": [1, 2]})({"n": 3})
    assert m({"s": ""})({"s": ""}) and not m({"s": ""})({"s": " "})
    # every key must match (AND)
    both = m({"lang": "en", "n": 1})
    assert both({"lang": "en", "n": 1}) and not both({"lang": "en", "n": 2}) and not both({"lang": "en"})
    assert m({})({"anything": 1}) and m({})(None)  # no conditions: everything matches


def test_matches_nested_keys():
    doc = {"product": {"brand": "acme", "size": {"eu": 42}}, "product.brand": "literal"}
    assert m({"product.brand": "acme"})(doc)  # a dotted key is a path, not the literal key
    assert not m({"product.brand": "literal"})(doc)
    assert m({"product.size.eu": 42})(doc)
    assert not m({"product.size": 42})(doc)  # a dict is not equal to a scalar
    assert not m({"product.brand.x": "acme"})(doc)  # walking into a string finds nothing
    # a list of objects is not walked into (one meaning on both engines; see the table below)
    assert not m({"items.name": "a"})({"items": [{"name": "a"}]})


def test_matches_stored_lists():
    assert m({"tags": "a"})({"tags": ["b", "a"]})  # any element of a stored list
    assert not m({"tags": "c"})({"tags": ["b", "a"]})
    assert m({"tags": ["c", "a"]})({"tags": ["b", "a"]})  # any-of against a stored list
    assert not m({"tags": "a"})({"tags": []})
    assert not m({"tags": "a"})({"tags": [["a"]]})  # lists inside lists are not flattened
    assert m({"mixed": 1})({"mixed": ["a", 1, True]}) and m({"mixed": True})({"mixed": ["a", 1, True]})
    assert not m({"mixed": 2})({"mixed": ["a", 1, True]})


def test_matches_missing_fields_never_match():
    for metadata in (None, {}, {"other": 1}, {"n": None}, {"n": [None]}):
        assert not m({"n": 1})(metadata), metadata
        assert not m({"n": "x"})(metadata), metadata
        assert not m({"n": ["x", "y"]})(metadata), metadata


def test_matches_types_are_strict():
    assert not m({"n": 1})({"n": True}) and not m({"n": True})({"n": 1})  # bool is not int
    assert not m({"n": 0})({"n": False}) and not m({"n": False})({"n": 0})
    assert m({"n": True})({"n": True}) and m({"n": False})({"n": False})
    assert not m({"n": 1})({"n": 1.0})  # nor a float
    assert not m({"n": 1})({"n": "1"}) and not m({"n": "1"})({"n": 1})  # nor a string
    assert not m({"n": [1, 2]})({"n": [True]})
    assert m({"n": -(2**63)})({"n": -(2**63)})


# ----------------------------------------------------------------------------------------------------------
# One meaning on every engine
# ----------------------------------------------------------------------------------------------------------

METADATA = {
    "int1": {"n": 1, "lang": "en"},
    "bool_true": {"n": True, "lang": "de"},
    "float1": {"n": 1.0},
    "str1": {"n": "1", "lang": "en"},
    "int_list": {"n": [1, 2], "tags": ["a", "b"]},
    "bool_list": {"n": [True], "tags": "a"},
    "null": {"n": None, "tags": ["c"]},
    "empty": {},
    "none": None,
    "zero": {"n": 0, "lang": "fr"},
    "false": {"n": False},
    "big": {"n": 2**40, "neg": -3},
    "nested": {"p": {"b": "x", "c": {"d": 3}}, "lang": "en"},
    "p_scalar": {"p": "x"},
    "p_objects": {"p": [{"b": "x"}, {"b": "y"}]},
    "dotted_key": {"p.b": "x"},
    "list_in_list": {"tags": [["a"]]},
    "bracket_key": {"tags[]": "a", "x y": "s", "é": "ü"},
    "mixed_list": {"mixed": ["a", 1, True], "s": ""},
    "case": {"s": "A", "lang": "EN"},
}

# (where, the ids it selects): written down from the semantics, not computed.
TABLE = [
    ({"n": 1}, {"int1", "int_list"}),
    ({"n": True}, {"bool_true", "bool_list"}),
    ({"n": False}, {"false"}),
    ({"n": 0}, {"zero"}),
    ({"n": "1"}, {"str1"}),
    ({"n": [1, 2]}, {"int1", "int_list"}),
    ({"n": [0, 1]}, {"int1", "int_list", "zero"}),
    ({"n": 2**40}, {"big"}),
    ({"neg": -3}, {"big"}),
    ({"n": 2}, {"int_list"}),
    ({"lang": "en"}, {"int1", "str1", "nested"}),
    ({"lang": ["de", "fr"]}, {"bool_true", "zero"}),
    ({"lang": "en", "n": 1}, {"int1"}),
    ({"lang": "en", "n": "1"}, {"str1"}),
    ({"lang": "de", "n": True}, {"bool_true"}),
    ({"tags": "a"}, {"int_list", "bool_list"}),
    ({"tags": ["c", "zz"]}, {"null"}),
    ({"tags": "zz"}, set()),
    ({"p.b": "x"}, {"nested"}),
    ({"p.c.d": 3}, {"nested"}),
    ({"p": "x"}, {"p_scalar"}),
    ({"p.b": "y"}, set()),
    ({"tags[]": "a"}, {"bracket_key"}),
    ({"x y": "s"}, {"bracket_key"}),
    ({"é": "ü"}, {"bracket_key"}),
    ({"mixed": 1}, {"mixed_list"}),
    ({"mixed": True}, {"mixed_list"}),
    ({"mixed": "a"}, {"mixed_list"}),
    ({"s": ""}, {"mixed_list"}),
    ({"s": "a"}, set()),
    ({"lang": "EN"}, {"case"}),
    ({"missing": 1}, set()),
    ({"missing.deeper": "x"}, set()),
    ({"n": 2**63 - 1}, set()),
]
IDS = list(METADATA)


def test_table_is_what_matches_says():
    for where, want in TABLE:
        conditions = check_where(where)
        assert {d for d in IDS if matches(METADATA[d], conditions)} == want, where


@pytest.fixture(scope="module")
def engines(embedding_encoder, tmp_path_factory):
    """The same documents (random unit vectors, METADATA) in the exact index, a Qdrant Edge shard and a
    qdrant-client local-mode collection."""
    from qdrant_client import QdrantClient

    enc = embedding_encoder
    vectors = np.random.default_rng(0).standard_normal((len(IDS), enc.dim)).astype(np.float32)
    root = tmp_path_factory.mktemp("filters")
    client = QdrantClient(":memory:")
    out = {
        "exact": Index.create(root / "exact", enc),
        "edge": Index.create(root / "edge", enc, backend="qdrant"),
        "server": Index.create(client, enc, backend="qdrant", collection="filters"),
    }
    metadata = [METADATA[d] for d in IDS]
    for index in out.values():
        assert index.add_vectors(vectors, ids=IDS, metadata=metadata) == IDS
    yield out
    for index in out.values():
        index.close()
    client.close()


@pytest.mark.parametrize("engine", ["exact", "edge", "server"])
def test_engines_select_the_same_ids(engine, engines):
    index = engines[engine]
    query = np.random.default_rng(1).standard_normal(index.settings.dim).astype(np.float32)
    wrong = []
    for where, want in TABLE:
        got = {h.id for h in index.search_vectors([query], k=len(IDS), where=where)[0]}
        if got != want:
            wrong.append((where, sorted(got), sorted(want)))
    assert not wrong, f"{engine} selects other ids: {wrong}"


@pytest.mark.parametrize("engine", ["exact", "edge", "server"])
def test_hits_carry_the_stored_metadata(engine, engines):
    index = engines[engine]
    query = np.ones(index.settings.dim, dtype=np.float32)
    hits = index.search_vectors([query], k=len(IDS))[0]
    assert {h.id: h.metadata for h in hits} == METADATA
    # a filtered search ranks the selected documents as the unfiltered one does
    selected = [h for h in hits if h.id in {"int1", "int_list", "zero"}]
    got = index.search_vectors([query], k=len(IDS), where={"n": [0, 1]})[0]
    assert [h.id for h in got] == [h.id for h in selected]
    assert np.allclose([h.score for h in got], [h.score for h in selected], rtol=0, atol=1e-6)


@pytest.mark.parametrize("engine", ["exact", "edge", "server"])
def test_engines_refuse_the_same_bad_where(engine, engines):
    index = engines[engine]
    query = np.ones(index.settings.dim, dtype=np.float32)
    for where in ({"n": 1.5}, {"": 1}, {"n": ["a", 1]}, ["n", 1], {"n": 2**64}, {'a"b': 1}):
        with pytest.raises(InvalidInputError, match="where"):
            index.search_vectors([query], where=where)
