"""Property tests: our compiled filters agree with karton-core 5.9.1, case by case.

The strategies draw keys and values from deliberately tiny alphabets so that checks
match often and the quirks (coercion, list containment, unanchored wildcards,
negation vetoes, dotted fan-out...) are exercised, not just the "no match" path.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping
from typing import Any

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from asynckarton._errors import QueryError
from asynckarton._wire._query import BindIndex, compile_filters

if os.environ.get("CI"):
    from karton.core import query as karton_query  # must be installed under CI
else:
    karton_query = pytest.importorskip("karton.core.query")

RAISED = "raised"
COMPILE_ERROR = "compile error"

# ---------------------------------------------------------------- strategies

WORDS = ["a", "ab", "ba", "xbar", "5", "True", "None", ""]
WILDCARDS = ["a*", "*a", "?a", "ba*", "b?", "[ab]*", "*", "x*r", "[!a]*", "a!", "5*"]
KEYS = ["type", "kind", "x", "a"]
DOTTED = ["a.b", "a.0", "x.0", "a.b.0", "a.-1", "x.b"]
REGEXES = ["^a", "a$", "b", "/^A/i", "x.*r", "/A$/im", ""]
TYPES = ["string", "number", "array", "bool", "int", "null", "object", 2, 16]
# Operands that compile_filters rejects (karton-core raises when it reaches them).
INVALID_OPERATORS = [
    {"$in": "a"},
    {"$nin": 5},
    {"$size": "1"},
    {"$bogus": 1},
    {"$regex": 5},
    {"$type": "bogus"},
    {"$and": {"a": 1}},
]
INVALID_MARKERS: tuple[str, ...] = (
    '"$in": "a"',
    '"$nin": 5',
    '"$size": "1"',
    "$bogus",
    '"$regex": 5',
)
INVALID_MARKERS += ('"$type": "bogus"', '"$and": {"a": 1}')

scalars = st.one_of(
    st.sampled_from(WORDS),
    st.sampled_from([5, 0, 1, 5.0]),
    st.booleans(),
    st.none(),
)
small_lists = st.lists(scalars, max_size=3)
header_values = st.recursive(
    st.one_of(scalars, small_lists),
    lambda inner: st.one_of(
        st.lists(inner, max_size=3),
        st.dictionaries(st.sampled_from(["b", "0", "c"]), inner, max_size=2),
    ),
    max_leaves=6,
)
headers_strategy = st.dictionaries(st.sampled_from(KEYS), header_values, max_size=4)


def _operators(inner: st.SearchStrategy[Any]) -> st.SearchStrategy[dict[str, Any]]:
    """One Mongo operator mapping; ``inner`` draws nested conditions."""
    comparison = st.sampled_from(["$gt", "$gte", "$lt", "$lte", "$eq", "$ne"])
    return st.one_of(
        st.builds(lambda op, v: {op: v}, comparison, st.one_of(scalars, small_lists)),
        st.builds(lambda v: {"$in": v}, small_lists),
        st.builds(lambda v: {"$nin": v}, small_lists),
        st.builds(lambda v: {"$exists": v}, st.booleans()),
        st.builds(lambda v, w: {"$exists": v, "$ne": w}, st.booleans(), scalars),
        st.builds(lambda v: {"$not": v}, inner),
        st.builds(lambda v: {"$or": v}, st.lists(inner, max_size=3)),
        st.builds(lambda v: {"$and": v}, st.lists(inner, max_size=3)),
        st.builds(lambda v: {"$nor": v}, st.lists(inner, max_size=2)),
        st.builds(lambda v: {"$size": v}, st.integers(0, 2)),
        st.builds(lambda v: {"$regex": v}, st.sampled_from(REGEXES)),
        st.builds(lambda v: {"$all": v}, small_lists),
        st.builds(lambda v: {"$elemMatch": {"$eq": v}}, scalars),
        st.builds(lambda v: {"$type": v}, st.sampled_from(TYPES)),
        st.builds(lambda v: {"$mod": [2, v]}, st.integers(0, 1)),
        st.builds(
            lambda key, v: {key: v}, st.sampled_from(["b", "0", "b.0"]), st.one_of(scalars, inner)
        ),
        st.sampled_from(INVALID_OPERATORS),
    )


conditions = st.recursive(
    st.one_of(scalars, st.sampled_from(WILDCARDS)),
    _operators,
    max_leaves=4,
)
rule_values = st.one_of(
    st.sampled_from(WORDS),
    st.sampled_from(WILDCARDS),
    st.builds(lambda v: "!" + v, st.sampled_from(WORDS + WILDCARDS)),
    scalars,
    small_lists,
    _operators(conditions),
)
rule_keys = st.one_of(st.sampled_from(KEYS), st.sampled_from(DOTTED), st.just("$or"))


@st.composite
def rules(draw: st.DrawFn) -> dict[str, Any]:
    """A rule; rule-level ``$or`` gets a list of sub-documents, as in real filters."""
    rule: dict[str, Any] = {}
    for key in draw(st.lists(rule_keys, max_size=3, unique=True)):
        if key == "$or":
            sub = st.dictionaries(st.sampled_from(KEYS), conditions, max_size=2)
            rule[key] = draw(st.lists(sub, max_size=2))
        else:
            rule[key] = draw(rule_values)
    return rule


filters_strategy = st.lists(rules(), max_size=3)

# ---------------------------------------------------------------- helpers


def _karton_verdict(filters: Any, headers: Mapping[str, Any]) -> Any:
    try:
        # karton-core is untyped: convert(filters) -> a query object with .match(headers)
        convert: Callable[[Any], Any] = karton_query.convert
        return convert(filters).match(headers)
    except Exception:  # noqa: BLE001 - any karton-core error counts as "raised"
        return RAISED


def _our_verdict(filters: Any, headers: Mapping[str, Any]) -> Any:
    try:
        matcher = compile_filters(filters)
    except (QueryError, NotImplementedError):
        return COMPILE_ERROR
    try:
        return matcher(headers)
    except Exception:  # noqa: BLE001 - any error counts as "raised"
        return RAISED


def _assert_agrees(filters: Any, headers: Mapping[str, Any]) -> Any:
    theirs = _karton_verdict(filters, headers)
    ours = _our_verdict(filters, headers)
    event(f"karton: {theirs}, ours: {ours}")
    if ours == COMPILE_ERROR:
        # Static errors are rejected up front; karton-core raises only if it reaches them.
        assert any(marker in json.dumps(filters) for marker in INVALID_MARKERS), filters
    elif theirs == RAISED:
        assert ours == RAISED, (filters, headers)
    else:
        assert type(ours) is bool
        assert ours == theirs, (filters, headers)
    return ours


# ---------------------------------------------------------------- properties


@settings(
    max_examples=1500,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(filters=filters_strategy, headers=headers_strategy)
def test_matches_karton_core(filters: list[dict[str, Any]], headers: dict[str, Any]) -> None:
    _assert_agrees(filters, headers)


simple_rule_values = st.one_of(
    st.sampled_from(WORDS),
    st.sampled_from(WILDCARDS),
    st.builds(lambda v: "!" + v, st.sampled_from(WORDS + WILDCARDS)),
    scalars,
)
simple_rules = st.dictionaries(st.sampled_from(KEYS), simple_rule_values, max_size=3)
simple_headers = st.dictionaries(st.sampled_from(KEYS), st.one_of(scalars, small_lists), max_size=4)


@settings(max_examples=1500, deadline=None, database=None)
@given(filters=st.lists(simple_rules, max_size=3), headers=simple_headers)
def test_classic_filters_match_karton_core(
    filters: list[dict[str, Any]], headers: dict[str, Any]
) -> None:
    """Old-style filters only (literals, wildcards, negations): never an error."""
    assert _assert_agrees(filters, headers) in (True, False)


index_type_values = st.sampled_from(["sample", "config", "5", "True", "None", "sam*", "!sample"])
index_rules = st.fixed_dictionaries(
    {"type": index_type_values},
    optional={"kind": st.sampled_from(["a", "b", "!a", "a*", 5]), "x": conditions},
)
bind_filters = st.one_of(
    st.lists(index_rules, max_size=3),
    st.lists(st.one_of(index_rules, rules()), max_size=2),
)
index_headers = st.fixed_dictionaries(
    {},
    optional={
        "type": st.one_of(
            st.sampled_from(["sample", "config", "other"]),
            st.sampled_from([5, True, None, 5.0]),
            st.lists(st.sampled_from(["sample", "config", 5, None]), max_size=3),
        ),
        "kind": st.one_of(scalars, small_lists),
        "x": header_values,
    },
)


@settings(max_examples=1000, deadline=None, database=None)
@given(
    binds=st.dictionaries(st.sampled_from("ABCDEFGH"), bind_filters, min_size=1, max_size=6),
    headers=index_headers,
)
def test_bind_index_agrees_with_each_bind(
    binds: dict[str, list[dict[str, Any]]], headers: dict[str, Any]
) -> None:
    index = BindIndex(binds)
    expected = []
    invalid = set()
    for identity, filters in binds.items():
        verdict = _our_verdict(filters, headers)
        if verdict == COMPILE_ERROR:
            invalid.add(identity)
        elif verdict is True:
            expected.append(identity)
    event(f"indexed tables: {sorted(index._tables)}; routed: {len(expected)}")
    assert set(index.invalid) == invalid
    assert index.match(headers) == expected
