"""Karton 5.5+ filter semantics, pinned case by case (see asynckarton/_wire/_compiler.py).

Every case of the table is also replayed against karton-core 5.9.1 (when it is
installed; under ``CI`` it must be) so that the table cannot drift from the
reference implementation.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping
from typing import Any

import pytest

from asynckarton._errors import QueryError
from asynckarton._wire._query import BindIndex, Matcher, compile_filters, matches_filters

RAISES = "raises"  # compiles, but raises when matching these headers
COMPILE_ERROR = "compile error"  # rejected by compile_filters
SAME = "same"  # karton-core gives the same verdict


def _case(
    filters: Any, headers: Mapping[str, Any], expected: Any, id: str, karton: Any = SAME
) -> Any:
    return pytest.param(filters, headers, expected, karton, id=id)


STRUCTURE = [
    _case([], {"type": "sample"}, False, "empty-list-matches-nothing"),
    _case([], {}, False, "empty-list-empty-headers"),
    _case([{}], {"type": "sample"}, True, "empty-rule-matches-everything"),
    _case([{}], {}, True, "empty-rule-empty-headers"),
    _case([{"type": "a"}, {"type": "b"}], {"type": "b"}, True, "list-is-or"),
    _case([{"type": "a", "kind": "b"}], {"type": "a", "kind": "c"}, False, "dict-is-and"),
    _case([{"type": "a", "kind": "b"}], {"type": "a", "kind": "b"}, True, "dict-is-and-match"),
    _case([{"type": "a"}], {}, False, "missing-header"),
    _case([{"type": "a"}, {}], {"type": "z"}, True, "empty-rule-in-or"),
]

NEGATION = [
    _case([{"platform": "!win32"}], {"platform": "linux"}, True, "neg-other-value"),
    _case([{"platform": "!win32"}], {"platform": "win32"}, False, "neg-same-value"),
    _case([{"platform": "!win32"}], {}, True, "neg-missing-header"),
    _case(
        [{"platform": "!win32"}, {"platform": "!linux"}],
        {"platform": "linux"},
        False,
        "neg-is-global-veto",
    ),
    _case(
        [{"type": "a", "x": "!1"}, {"type": "a"}],
        {"type": "a", "x": "1"},
        False,
        "neg-vetoes-other-matching-rule",
    ),
    _case(
        [{"type": "b", "x": "!1"}, {"type": "a"}],
        {"type": "a", "x": "1"},
        True,
        "neg-only-when-own-positive-part-matches",
    ),
    _case([{"x": "!a*"}], {"x": "ba"}, False, "neg-wildcard-unanchored"),
    _case([{"x": "!a*"}], {"x": "bb"}, True, "neg-wildcard-no-match"),
    _case([{"x": "!"}], {"x": ""}, False, "neg-bang-alone-is-empty-literal"),
    _case([{"x": "!"}], {"x": "a"}, True, "neg-bang-alone-other"),
    _case([{"x": "!!a"}], {"x": "z!a"}, False, "neg-double-bang-is-wildcard"),
    _case([{"execute": "!False"}], {"execute": False}, False, "neg-coerces-bool"),
    _case([{"execute": "!False"}], {"execute": True}, True, "neg-coerces-bool-other"),
    _case([{"tags": "!a"}], {"tags": ["a", "b"]}, False, "neg-list-containment"),
    _case([{"x": "!5"}], {"x": [5]}, True, "neg-list-no-coercion"),
    _case([{"type": "a", "x": "!1", "y": "!2"}], {"type": "a", "y": "2"}, False, "neg-any-of"),
]

WILDCARDS = [
    _case([{"x": "ba*"}], {"x": "xbar"}, True, "wc-unanchored-start"),
    _case([{"x": "ba?"}], {"x": "xbar"}, True, "wc-question-unanchored"),
    _case([{"x": "ba*"}], {"x": "ab"}, False, "wc-no-match"),
    _case([{"x": "a?"}], {"x": "abc"}, False, "wc-anchored-end"),
    _case([{"x": "*"}], {"x": 5}, False, "wc-never-int"),
    _case([{"x": "*"}], {"x": True}, False, "wc-never-bool"),
    _case([{"x": "*"}], {"x": None}, False, "wc-never-none"),
    _case([{"x": "*"}], {}, False, "wc-missing"),
    _case([{"x": "*"}], {"x": ["a"]}, False, "wc-never-list-element"),
    _case([{"x": "*"}], {"x": ""}, True, "wc-star-empty-string"),
    _case([{"x": "[ab]x"}], {"x": "bx"}, True, "wc-set"),
    _case([{"x": "[!a]x"}], {"x": "ax"}, False, "wc-negated-set"),
    _case([{"x": "[!a]x"}], {"x": "bx"}, True, "wc-negated-set-match"),
    _case([{"x": "a!b"}], {"x": "xa!b"}, True, "wc-inner-bang-is-wildcard"),
    _case([{"x": "a]"}], {"x": "xa]"}, True, "wc-bracket-is-wildcard"),
    _case([{"x": "a*"}], {"x": "x\na"}, True, "wc-dotall"),
    _case([{"x": "5*"}], {"x": 5}, False, "wc-no-coercion"),
    _case([{"a.b": "x*"}], {"a": {"b": "xy"}}, True, "wc-dotted"),
    _case([{"a.b": "x*"}], {"a": [{"b": "xy"}]}, False, "wc-dotted-fanned-out-list"),
]

LITERALS = [
    _case([{"x": "20"}], {"x": 20}, True, "lit-coerce-int"),
    _case([{"x": "True"}], {"x": True}, True, "lit-coerce-bool"),
    _case([{"x": "true"}], {"x": True}, False, "lit-coerce-case-sensitive"),
    _case([{"x": "None"}], {"x": None}, True, "lit-coerce-none"),
    _case([{"x": "5.0"}], {"x": 5.0}, True, "lit-coerce-float"),
    _case([{"x": "5"}], {"x": 5.0}, False, "lit-coerce-float-str"),
    _case([{"x": "{'a': 1}"}], {"x": {"a": 1}}, True, "lit-coerce-dict"),
    _case([{"x": 5}], {"x": "5"}, False, "lit-int-no-coercion"),
    _case([{"x": 5}], {"x": 5.0}, True, "lit-int-float-equal"),
    _case([{"x": 1}], {"x": True}, True, "lit-int-bool-equal"),
    _case([{"x": None}], {"x": None}, True, "lit-none"),
    _case([{"x": None}], {}, False, "lit-none-missing"),
    _case([{"x": "a"}], {"x": ["a", "b"]}, True, "lit-list-containment"),
    _case([{"x": "a"}], {"x": []}, False, "lit-list-empty"),
    _case([{"x": "a"}], {"x": ("a",)}, True, "lit-tuple-containment"),
    _case([{"x": "5"}], {"x": [5]}, False, "lit-list-no-coercion"),
    _case([{"x": 5}], {"x": [5]}, True, "lit-int-in-list"),
    _case([{"x": ["a"]}], {"x": ["a"]}, False, "lit-list-cond-is-containment"),
    _case([{"x": ["a"]}], {"x": [["a"]]}, True, "lit-list-cond-nested"),
    _case([{"x": ["a"]}], {"x": "a"}, False, "lit-list-cond-scalar"),
    _case([{"x": ""}], {"x": ""}, True, "lit-empty-string"),
]

EQ_NE = [
    _case([{"x": {"$eq": "5"}}], {"x": 5}, True, "eq-coerces"),
    _case([{"x": {"$eq": "a"}}], {"x": ["a"]}, False, "eq-no-containment"),
    _case([{"x": {"$eq": ["a"]}}], {"x": ["a"]}, True, "eq-list-equality"),
    _case([{"x": {"$eq": 5}}], {"x": "5"}, False, "eq-int-no-coercion"),
    _case([{"x": {"$eq": "None"}}], {}, False, "eq-missing"),
    _case([{"x": {"$ne": "a"}}], {}, True, "ne-missing-is-true"),
    _case([{"x": {"$ne": "5"}}], {"x": 5}, False, "ne-coerces"),
    _case([{"x": {"$ne": "a"}}], {"x": ["a"]}, True, "ne-no-containment"),
    _case([{"x": {"$ne": 5}}], {"x": 5}, False, "ne-int"),
]

COMPARISONS = [
    _case([{"x": {"$gt": 3}}], {"x": 5}, True, "gt"),
    _case([{"x": {"$gt": 5}}], {"x": 5}, False, "gt-equal"),
    _case([{"x": {"$gt": 3}}], {"x": "5"}, False, "gt-incomparable-is-false"),
    _case([{"x": {"$gt": 3}}], {}, False, "gt-missing"),
    _case([{"x": {"$gt": 1}}], {"x": None}, False, "gt-none"),
    _case([{"x": {"$gte": 5}}], {"x": 5}, True, "gte"),
    _case([{"x": {"$lt": "b"}}], {"x": "a"}, True, "lt-strings"),
    _case([{"x": {"$lte": 5}}], {"x": True}, True, "lte-bool-is-int"),
    _case([{"x": {"$gt": [1]}}], {"x": [2]}, True, "gt-lists"),
    _case([{"x": {"$gt": 1, "$lt": 5}}], {"x": 3}, True, "range"),
    _case([{"x": {"$gt": 1, "$lt": 5}}], {"x": 7}, False, "range-outside"),
]

MEMBERSHIP = [
    _case([{"x": {"$in": ["a", "b"]}}], {"x": "a"}, True, "in"),
    _case([{"x": {"$in": ["a", "b"]}}], {"x": ["c", "b"]}, True, "in-list-intersects"),
    _case([{"x": {"$in": ["a", "b"]}}], {"x": ["c"]}, False, "in-list-disjoint"),
    _case([{"x": {"$in": ["5"]}}], {"x": 5}, False, "in-no-coercion"),
    _case([{"x": {"$in": [1]}}], {"x": True}, True, "in-bool-equals-int"),
    _case([{"x": {"$in": []}}], {"x": "a"}, False, "in-empty"),
    _case([{"x": {"$in": ["a"]}}], {}, False, "in-missing"),
    _case([{"x": {"$nin": ["5"]}}], {"x": 5}, True, "nin-no-coercion"),
    _case([{"x": {"$nin": ["a"]}}], {"x": "a"}, False, "nin"),
    _case([{"x": {"$nin": []}}], {}, True, "nin-missing"),
    _case([{"x": {"$in": "a"}}], {"x": "a"}, COMPILE_ERROR, "in-string-operand", RAISES),
    _case([{"x": {"$nin": {"a": 1}}}], {"x": "a"}, COMPILE_ERROR, "nin-dict-operand", RAISES),
]

LOGIC = [
    _case([{"$or": [{"type": "a"}, {"type": "b"}]}], {"type": "b"}, True, "or-rule-level"),
    _case([{"$and": [{"type": "a"}, {"kind": "b"}]}], {"type": "a"}, False, "and-rule-level"),
    _case([{"$nor": [{"type": "a"}, {"type": "b"}]}], {"type": "c"}, True, "nor-rule-level"),
    _case([{"$nor": [{"type": "a"}]}], {"type": "a"}, False, "nor-rule-level-match"),
    _case([{"$or": []}], {}, False, "or-empty"),
    _case([{"$and": []}], {}, True, "and-empty"),
    _case([{"$nor": []}], {}, True, "nor-empty"),
    _case([{"x": {"$or": ["a", "b"]}}], {"x": "b"}, True, "or-field-level"),
    _case([{"x": {"$and": [{"$gt": 1}, {"$lt": 5}]}}], {"x": 3}, True, "and-field-level"),
    _case([{"x": {"$or": "ab"}}], {"x": "b"}, True, "or-string-operand-is-characters"),
    _case([{"$or": [{"type": "a*"}]}], {"type": "ab"}, False, "no-wildcards-inside-operators"),
    _case([{"$or": [{"type": "a*"}]}], {"type": "a*"}, True, "literal-inside-operators"),
    _case([{"$and": {"type": "a"}}], {"type": "a"}, COMPILE_ERROR, "and-dict-operand", RAISES),
    _case([{"$or": 5}], {}, COMPILE_ERROR, "or-int-operand", RAISES),
    _case([{"x": {"$nor": {"a": 1}}}], {"x": 1}, COMPILE_ERROR, "nor-dict-operand", RAISES),
]

NOT = [
    _case([{"x": {"$not": "a"}}], {"x": "b"}, True, "not-plain-value"),
    _case([{"x": {"$not": "a"}}], {"x": "a"}, False, "not-plain-value-match"),
    _case([{"x": {"$not": "5"}}], {"x": 5}, False, "not-coerces"),
    _case([{"x": {"$not": {"$gt": 3}}}], {"x": 2}, True, "not-operator"),
    _case([{"x": {"$not": {"$gt": 3}}}], {}, True, "not-missing"),
    _case([{"x": {"$not": "a"}}], {"x": ["a"]}, False, "not-list-containment"),
    _case([{"$not": {"type": "a"}}], {"type": "b"}, True, "not-rule-level"),
    _case([{"x": {"$not": {"$exists": True}}}], {}, RAISES, "not-exists-missing-raises"),
    _case([{"x": {"$not": {"$exists": True}}}], {"x": "a$notb"}, True, "not-exists-substring"),
]

ALL_ELEM_SIZE = [
    _case([{"t": {"$all": ["a", "b"]}}], {"t": ["a", "b", "c"]}, True, "all"),
    _case([{"t": {"$all": ["a", "b"]}}], {"t": ["a"]}, False, "all-partial"),
    _case([{"t": {"$all": []}}], {}, True, "all-empty"),
    _case([{"t": {"$all": ["5"]}}], {"t": 5}, True, "all-scalar-coerces"),
    _case([{"t": {"$all": "ab"}}], {"t": ["a", "b"]}, True, "all-string-is-characters"),
    _case([{"t": {"$all": {"a": 1}}}], {"t": ["a"]}, True, "all-dict-is-its-keys"),
    _case([{"t": {"$all": 5}}], {"t": [5]}, COMPILE_ERROR, "all-int-operand", RAISES),
    _case([{"t": {"$elemMatch": {"$gt": 3}}}], {"t": [1, 5]}, True, "elem-match"),
    _case([{"t": {"$elemMatch": {"$gt": 3}}}], {"t": [1, 2]}, False, "elem-match-none"),
    _case([{"t": {"$elemMatch": {"$gt": 3}}}], {"t": 5}, False, "elem-match-scalar"),
    _case([{"t": {"$elemMatch": {"a": 1}}}], {"t": [{"a": 1}]}, True, "elem-match-docs"),
    _case([{"t": {"$elemMatch": {"$eq": "b"}}}], {"t": "abc"}, True, "elem-match-string"),
    _case([{"t": {"$elemMatch": {}}}], {"t": [0]}, True, "elem-match-empty"),
    _case([{"t": {"$elemMatch": {}}}], {"t": []}, False, "elem-match-empty-list"),
    _case([{"t": {"$elemMatch": [1]}}], {"t": [1]}, COMPILE_ERROR, "elem-match-list", RAISES),
    _case([{"t": {"$size": 2}}], {"t": ["a", "b"]}, True, "size"),
    _case([{"t": {"$size": 2}}], {"t": "ab"}, False, "size-string"),
    _case([{"t": {"$size": 0}}], {}, False, "size-missing"),
    _case([{"t": {"$size": True}}], {"t": ["a"]}, True, "size-true-is-one"),
    _case([{"t": {"$size": "2"}}], {"t": [1, 2]}, COMPILE_ERROR, "size-string-operand", RAISES),
]

TYPE = [
    _case([{"x": {"$type": "string"}}], {"x": "a"}, True, "type-string"),
    _case([{"x": {"$type": 2}}], {"x": "a"}, True, "type-bson-number"),
    _case([{"x": {"$type": "number"}}], {"x": 5.5}, True, "type-number-float"),
    _case([{"x": {"$type": "number"}}], {"x": True}, True, "type-number-bool"),
    _case([{"x": {"$type": "number"}}], {"x": "5"}, False, "type-number-string"),
    _case([{"x": {"$type": "bool"}}], {"x": 1}, False, "type-bool-int"),
    _case([{"x": {"$type": "int"}}], {"x": True}, True, "type-int-bool"),
    _case([{"x": {"$type": "array"}}], {"x": []}, True, "type-array"),
    _case([{"x": {"$type": "array"}}], {"x": "s"}, True, "type-array-string"),
    _case([{"x": {"$type": "object"}}], {"x": {}}, True, "type-object"),
    _case([{"x": {"$type": "null"}}], {"x": None}, True, "type-null"),
    _case([{"x": {"$type": "null"}}], {}, False, "type-null-missing"),
    _case([{"x": {"$type": "double"}}], {"x": 1}, False, "type-double-int"),
    _case([{"x": {"$type": True}}], {"x": 1.0}, True, "type-true-is-double"),
    _case([{"x": {"$type": "bogus"}}], {"x": 1}, COMPILE_ERROR, "type-unknown-alias", RAISES),
    _case([{"x": {"$type": 6}}], {"x": 1}, COMPILE_ERROR, "type-unknown-number", RAISES),
    _case([{"x": {"$type": []}}], {"x": 1}, COMPILE_ERROR, "type-unhashable", RAISES),
]

MOD = [
    _case([{"x": {"$mod": [3, 1]}}], {"x": 4}, True, "mod"),
    _case([{"x": {"$mod": [3, 1]}}], {"x": 5}, False, "mod-other"),
    _case([{"x": {"$mod": [3, 1]}}], {"x": True}, True, "mod-bool"),
    _case([{"x": {"$mod": [3, 1]}}], {"x": "4"}, RAISES, "mod-string-raises"),
    _case([{"x": {"$mod": [3, 1]}}], {}, RAISES, "mod-missing-raises"),
    _case([{"x": {"$mod": [0, 0]}}], {"x": 5}, RAISES, "mod-zero-raises"),
    _case([{"x": {"$mod": [3]}}], {"x": 4}, COMPILE_ERROR, "mod-short-operand", RAISES),
    _case([{"x": {"$mod": 3}}], {"x": 4}, COMPILE_ERROR, "mod-int-operand", RAISES),
]

REGEX = [
    _case([{"x": {"$regex": "^a"}}], {"x": "abc"}, True, "regex"),
    _case([{"x": {"$regex": "b"}}], {"x": "abc"}, True, "regex-search"),
    _case([{"x": {"$regex": "/^A/i"}}], {"x": "abc"}, True, "regex-flag-i"),
    _case([{"x": {"$regex": "/^A/"}}], {"x": "abc"}, False, "regex-no-flags"),
    _case([{"x": {"$regex": "/a.c/s"}}], {"x": "a\nc"}, True, "regex-flag-s"),
    _case([{"x": {"$regex": "/^c/m"}}], {"x": "ab\nc"}, True, "regex-flag-m"),
    _case([{"x": {"$regex": "/a b/x"}}], {"x": "ab"}, True, "regex-flag-x"),
    _case([{"x": {"$regex": "/^A B/ixi"}}], {"x": "ab"}, True, "regex-repeated-flags"),
    _case([{"x": {"$regex": "/a/iiiii"}}], {"x": "a"}, False, "regex-five-flags-is-literal"),
    _case([{"x": {"$regex": "/a/q"}}], {"x": "/a/q"}, True, "regex-bad-flag-is-literal"),
    _case(
        [{"x": {"$regex": re.compile("B", re.IGNORECASE)}}], {"x": "abc"}, True, "regex-compiled"
    ),
    _case([{"x": {"$regex": "a"}}], {"x": ["a"]}, False, "regex-never-list"),
    _case([{"x": {"$regex": "5"}}], {"x": 5}, False, "regex-never-int"),
    _case([{"x": {"$regex": ""}}], {"x": ""}, True, "regex-empty"),
    _case([{"x": {"$regex": "["}}], {"x": "a"}, COMPILE_ERROR, "regex-invalid", RAISES),
    _case([{"x": {"$regex": 5}}], {"x": "a"}, COMPILE_ERROR, "regex-int", RAISES),
    _case([{"x": {"$regex": 5}}], {"x": 1}, COMPILE_ERROR, "regex-int-on-int", False),
    _case([{"x": {"$regex": re.compile(b"a")}}], {"x": "a"}, COMPILE_ERROR, "regex-bytes", RAISES),
]

EXISTS = [
    _case([{"x": {"$exists": True}}], {"x": 1}, True, "exists"),
    _case([{"x": {"$exists": True}}], {"x": None}, True, "exists-none-value"),
    _case([{"x": {"$exists": True}}], {}, False, "exists-missing"),
    _case([{"x": {"$exists": False}}], {}, True, "exists-false-missing"),
    _case([{"x": {"$exists": False}}], {"x": 1}, False, "exists-false-present"),
    _case([{"x": {"$exists": 1}}], {"x": 1}, True, "exists-one-equals-true"),
    _case([{"x": {"$exists": "yes"}}], {"x": 1}, False, "exists-truthy-string"),
    _case([{"x": {"$exists": True, "$gt": 3}}], {"x": 5}, True, "exists-and-more"),
    _case([{"x": {"$exists": True, "$gt": 3}}], {"x": 2}, False, "exists-and-more-fail"),
    _case([{"x": {"$exists": True, "$gt": 3}}], {}, False, "exists-and-more-missing"),
    _case([{"x": {"$exists": False, "$gt": 3}}], {}, False, "exists-false-and-more"),
    _case([{"a.b": {"$exists": True}}], {"a": {"b": None}}, True, "exists-dotted"),
    _case([{"a.b": {"$exists": True}}], {"a": {}}, False, "exists-dotted-missing"),
    _case([{"a.b": {"$exists": False}}], {}, True, "exists-dotted-false"),
    _case([{"a.b": {"$exists": True}}], {"a": [{"b": 1}]}, True, "exists-dotted-list"),
    _case([{"a.b": {"$exists": True}}], {"a": [{"c": 1}]}, False, "exists-dotted-list-no"),
    _case([{"a.0": {"$exists": True}}], {"a": [1]}, True, "exists-dotted-index"),
    _case([{"a.0": {"$exists": True}}], {"a": []}, False, "exists-dotted-index-out"),
    _case([{"a.0": {"$exists": True}}], {"a": "x"}, True, "exists-dotted-string-index"),
    _case([{"a.b": {"$exists": True}}], {"a": ""}, False, "exists-dotted-empty-string"),
    _case([{"a.b": {"$exists": True}}], {"a": "xyz"}, RAISES, "exists-dotted-string-raises"),
    _case([{"a.b": {"$exists": True, "$gt": 100}}], {"a": {"b": 1}}, True, "exists-dotted-only"),
    _case([{"a.b": {"$exists": "yes"}}], {"a": {"b": 1}}, True, "exists-dotted-truthy"),
    _case([{"a": {"b": {"$exists": True}}}], {"a": 5}, RAISES, "exists-nested-scalar"),
    _case([{"a": {"b": {"$exists": True}}}], {"a": "xbx"}, True, "exists-nested-substring"),
    _case([{"a": {"b": {"$exists": True}}}], {}, RAISES, "exists-nested-missing"),
    _case([{"a": {"b": {"$exists": True}}}], {"a": {"b": 0}}, True, "exists-nested"),
    _case([{"$and": {"$exists": False}}], {}, True, "exists-gate-skips-operator"),
    _case([{"x": {"$exists": True, "$in": "a"}}], {}, COMPILE_ERROR, "exists-gate-first", False),
]

PATHS = [
    _case([{"a.b": "x"}], {"a": {"b": "x"}}, True, "path"),
    _case([{"a.b": "1"}], {"a": {"b": 1}}, True, "path-coerces"),
    _case([{"a.0": "x"}], {"a": ["x", "y"]}, True, "path-index"),
    _case([{"a.-1": "y"}], {"a": ["x", "y"]}, True, "path-negative-index"),
    _case([{"a.5": "x"}], {"a": ["x"]}, False, "path-index-out-of-range"),
    _case([{"a.+1": "y"}], {"a": ["x", "y"]}, True, "path-index-parsed-by-int"),
    _case([{"a.b": "x"}], {"a": [{"b": "x"}, {"b": "z"}]}, True, "path-fans-out"),
    _case([{"a.b": "x"}], {"a": "x"}, False, "path-through-string"),
    _case([{"a.b": None}], {"a": None}, True, "path-through-none-is-none"),
    _case([{"a.b": "None"}], {"a": None}, True, "path-through-none-coerces"),
    _case([{"a.b": None}], {"a": 5}, False, "path-through-int"),
    _case([{"a.b": {"$size": 2}}], {"a": ["p", "q"]}, True, "path-fan-out-of-undefined"),
    _case([{"a.b.0": "x"}], {"a": {"b": ["x"]}}, True, "path-deep-index"),
    _case([{"a.0.b": "x"}], {"a": [{"b": "x"}]}, True, "path-index-then-key"),
    _case([{"a.c": "x"}], {"a": [[{"c": "x"}]]}, False, "path-nested-fan-out-one-level"),
    _case([{"a.c": ["x"]}], {"a": [[{"c": "x"}]]}, True, "path-nested-fan-out"),
    _case([{"a.b.5": "x"}], {"a": [{"b": ["x"]}]}, False, "path-index-error-anywhere"),
    _case([{"a.b": {"$exists": False}}], {"a": 5}, True, "path-exists-through-int"),
    _case([{"a": {"b": "x"}}], {"a": {"b": "x"}}, True, "nested-document"),
    _case([{"a": {"b": "x"}}], {"a": [{"b": "x"}]}, True, "nested-document-list"),
]

DIVERGENCE = [
    # Static errors are caught at compile time even where karton-core short-circuits.
    _case(
        [{"type": "a"}, {"type": "b", "x": {"$foo": 1}}],
        {"type": "a"},
        COMPILE_ERROR,
        "unknown-operator-in-unreached-rule",
        True,
    ),
    _case([{"x": {"$match": "a"}}], {"x": "a"}, COMPILE_ERROR, "karton-internal-match", True),
    _case([{"x": {"$noop": "a"}}], {"x": "b"}, COMPILE_ERROR, "karton-internal-noop", True),
]

ALL_CASES = (
    STRUCTURE
    + NEGATION
    + WILDCARDS
    + LITERALS
    + EQ_NE
    + COMPARISONS
    + MEMBERSHIP
    + LOGIC
    + NOT
    + ALL_ELEM_SIZE
    + TYPE
    + MOD
    + REGEX
    + EXISTS
    + PATHS
    + DIVERGENCE
)


def _ours(filters: Any, headers: Mapping[str, Any]) -> Any:
    try:
        matcher = compile_filters(filters)
    except (QueryError, NotImplementedError):
        return COMPILE_ERROR
    try:
        return matcher(headers)
    except Exception:  # noqa: BLE001 - any error counts, as in karton-core
        return RAISES


def _karton(filters: Any, headers: Mapping[str, Any]) -> Any:
    if os.environ.get("CI"):
        from karton.core import query
    else:
        query = pytest.importorskip("karton.core.query")
    try:
        # karton-core is untyped: convert(filters) -> a query object with .match(headers)
        convert: Callable[[Any], Any] = query.convert
        return convert(filters).match(headers)
    except Exception:  # noqa: BLE001 - any error counts
        return RAISES


@pytest.mark.parametrize(("filters", "headers", "expected", "karton"), ALL_CASES)
def test_semantics(filters: Any, headers: Mapping[str, Any], expected: Any, karton: Any) -> None:
    assert _ours(filters, headers) == expected


@pytest.mark.parametrize(("filters", "headers", "expected", "karton"), ALL_CASES)
def test_table_agrees_with_karton_core(
    filters: Any, headers: Mapping[str, Any], expected: Any, karton: Any
) -> None:
    assert _karton(filters, headers) == (expected if karton == SAME else karton)


@pytest.mark.parametrize(("filters", "headers", "expected", "karton"), ALL_CASES)
def test_matches_filters_agrees(
    filters: Any, headers: Mapping[str, Any], expected: Any, karton: Any
) -> None:
    if expected in (COMPILE_ERROR, RAISES):
        with pytest.raises(Exception):  # noqa: B017 - any error, as in karton-core
            matches_filters(filters, headers)
    else:
        assert matches_filters(filters, headers) is expected
        assert matches_filters(filters, headers) is expected  # cached path


# ---------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("filters", "operator"),
    [
        pytest.param([{"x": {"$glob": "a*"}}], "$glob", id="glob"),
        pytest.param([{"$foo": 1}], "$foo", id="rule-level"),
        pytest.param([{"x": {"$not": {"$bar": 1}}}], "$bar", id="nested"),
        pytest.param([{"x": {"$elemMatch": {"$baz": 1}}}], "$baz", id="in-elem-match"),
        pytest.param([{"x": "!a"}, {"y": {"$qux": 1}}], "$qux", id="second-rule"),
        pytest.param([{"x": {"$extract": 1}}], "$extract", id="karton-internal"),
        pytest.param([{"x": {"$": 1}}], "$", id="bare-dollar"),
    ],
)
def test_unknown_operator_raises_query_error_naming_it(filters: Any, operator: str) -> None:
    with pytest.raises(QueryError) as caught:
        compile_filters(filters)
    message = str(caught.value)
    assert f"{operator} operator isn't supported" in message
    assert "filter rule #" in message


@pytest.mark.parametrize("operator", ["$options", "$text", "$where"])
def test_not_implemented_operators(operator: str) -> None:
    with pytest.raises(NotImplementedError, match=re.escape(operator)):
        compile_filters([{"type": "a", "x": {"$regex": "a", operator: "i"}}])
    with pytest.raises(NotImplementedError, match=r"filter rule #0"):
        compile_filters([{operator: "x"}])


@pytest.mark.parametrize(
    "filters",
    [
        pytest.param(None, id="none"),
        pytest.param(5, id="int"),
        pytest.param(["type"], id="string-rule"),
        pytest.param([[{"type": "a"}]], id="list-rule"),
        pytest.param({"type": "a"}, id="dict-instead-of-list"),
    ],
)
def test_malformed_filters(filters: Any) -> None:
    with pytest.raises(QueryError):
        compile_filters(filters)


def test_error_message_names_the_rule() -> None:
    with pytest.raises(QueryError, match=r"\$size.*'1'.*rule #1.*'x'"):
        compile_filters([{"type": "a"}, {"type": "b", "x": {"$size": "1"}}])


def test_dynamic_error_matches_karton_order() -> None:
    # The $mod check is only reached when the first check passes, as in karton-core.
    matcher = compile_filters([{"type": "a", "x": {"$mod": [2, 0]}}])
    assert matcher({"type": "b", "x": "s"}) is False
    with pytest.raises(TypeError):
        matcher({"type": "a", "x": "s"})
    # All rules are evaluated even after a match (karton-core's veto pass does it).
    matcher = compile_filters([{"type": "a"}, {"x": {"$mod": [2, 0]}}])
    with pytest.raises(TypeError):
        matcher({"type": "a"})


# ---------------------------------------------------------------- API


def test_matcher_api() -> None:
    filters = [{"type": "sample", "kind": "runnable"}]
    matcher = compile_filters(filters)
    assert isinstance(matcher, Matcher)
    assert matcher.filters is filters
    assert matcher({"type": "sample", "kind": "runnable"}) is True
    assert matcher.match({"type": "sample", "kind": "raw"}) is False
    assert "runnable" in repr(matcher)
    with pytest.raises(AttributeError):
        matcher.other = 1  # type: ignore[attr-defined]


def test_matches_filters_uncacheable_filters() -> None:
    filters = [{"x": {"$regex": re.compile("^A", re.IGNORECASE)}, "y": (1, 2)}]
    assert matches_filters(filters, {"x": "abc", "y": [(1, 2)]}) is True
    assert matches_filters(filters, {"x": "abc", "y": [[1, 2]]}) is False


def test_tuple_and_list_filters_are_not_confused_by_the_cache() -> None:
    assert matches_filters([{"y": [1]}], {"y": [[1]]}) is True
    assert matches_filters([{"y": (1,)}], {"y": [[1]]}) is False


# ---------------------------------------------------------------- BindIndex

BINDS: dict[str, Any] = {
    "sample-runnable": [{"type": "sample", "kind": "runnable"}],
    "sample-or-config": [{"type": "sample"}, {"type": "config", "kind": "x"}],
    "any-type": [{"kind": "runnable"}],
    "wildcard-type": [{"type": "samp*"}],
    "negated": [{"type": "sample", "platform": "!win32"}],
    "five": [{"type": "5"}],
    "none": [{"type": "None"}],
    "true": [{"type": "True"}],
    "mongo": [{"type": {"$in": ["sample", "config"]}}],
    "everything": [{}],
    "nothing": [],
    "broken": [{"type": "sample", "x": {"$glob": "*"}}],
    "not-implemented": [{"type": {"$where": "1"}}],
    "mod": [{"type": "sample", "x": {"$mod": [2, 0]}}],
    "dict-type": [{"type": "{'a': 1}"}],
}


class _Weird:
    """A header value that compares equal to everything and prints as 'sample'."""

    def __eq__(self, other: object) -> bool:
        return True

    def __hash__(self) -> int:
        return 0

    def __str__(self) -> str:
        return "sample"


HEADERS = [
    pytest.param({"type": "sample", "kind": "runnable"}, id="sample-runnable"),
    pytest.param({"type": "sample", "kind": "runnable", "platform": "win32"}, id="win32"),
    pytest.param({"type": "config", "kind": "x"}, id="config"),
    pytest.param({"type": "sampler"}, id="sampler"),
    pytest.param({"type": 5}, id="int-5"),
    pytest.param({"type": None}, id="none"),
    pytest.param({"type": True}, id="true"),
    pytest.param({"type": ["sample", 5]}, id="list"),
    pytest.param({"type": ("config",), "kind": "x"}, id="tuple"),
    pytest.param({"type": [_Weird()]}, id="list-of-weird"),
    pytest.param({"type": _Weird()}, id="weird"),
    pytest.param({"type": {"a": 1}}, id="dict"),
    pytest.param({"kind": "runnable"}, id="no-type"),
    pytest.param({"type": "sample", "x": 4}, id="mod-ok"),
    pytest.param({"type": "sample", "x": "s"}, id="mod-raises"),
    pytest.param({}, id="empty"),
]


def _reference_route(binds: Mapping[str, Any], headers: Mapping[str, Any]) -> list[str]:
    routed = []
    for identity, filters in binds.items():
        try:
            verdict = compile_filters(filters)(headers)
        except Exception:  # noqa: BLE001 - a failing bind is simply not routed to
            verdict = False
        if verdict:
            routed.append(identity)
    return routed


@pytest.mark.parametrize("headers", HEADERS)
def test_bind_index_never_changes_a_verdict(headers: Mapping[str, Any]) -> None:
    index = BindIndex(BINDS)
    assert index.match(headers) == _reference_route(BINDS, headers)


def test_bind_index_invalid_binds_are_recorded_and_others_route() -> None:
    index = BindIndex(BINDS)
    assert set(index.invalid) == {"broken", "not-implemented"}
    assert isinstance(index.invalid["broken"], QueryError)
    assert "$glob" in str(index.invalid["broken"])
    assert isinstance(index.invalid["not-implemented"], NotImplementedError)
    assert "broken" not in index.matchers
    assert len(index) == len(BINDS) - 2
    assert index.match({"type": "sample", "kind": "runnable"}) == [
        "sample-runnable",
        "sample-or-config",
        "any-type",
        "wildcard-type",
        "negated",
        "mongo",
        "everything",
    ]


def test_bind_index_prunes_candidates() -> None:
    index = BindIndex(BINDS)
    position = {identity: i for i, (identity, _) in enumerate(index._entries)}
    candidates = {index._entries[i][0] for i in index._candidates({"type": "config"})}
    # "any-type" is indexed under "kind", which these headers lack.
    assert candidates == {"sample-or-config", "wildcard-type", "mongo", "everything"}
    assert "nothing" in position
    assert "nothing" not in {index._entries[i][0] for i in index._candidates({})}
    # An exotic value cannot be looked up: every indexed bind is evaluated.
    everyone = {index._entries[i][0] for i in index._candidates({"type": [_Weird()]})}
    assert everyone == set(position) - {"nothing", "any-type"}


def test_bind_index_on_error() -> None:
    index = BindIndex(BINDS)
    errors: list[tuple[str, Exception]] = []
    routed = index.match({"type": "sample", "x": "s"}, on_error=lambda i, e: errors.append((i, e)))
    assert "mod" not in routed
    assert [identity for identity, _ in errors] == ["mod"]
    assert isinstance(errors[0][1], TypeError)
    assert index.match({"type": "sample", "x": 4})[-1] == "mod"


def test_bind_index_prefers_type_and_falls_back_to_a_common_key() -> None:
    index = BindIndex(
        {
            "kind-only": [{"kind": "a", "x": "1"}, {"kind": "b"}],
            "type-too": [{"kind": "a", "type": "t"}],
            "no-common": [{"kind": "a"}, {"type": "t"}],
        }
    )
    assert set(index._tables) == {"kind", "type"}
    assert index._tables["kind"] == {"a": [0], "b": [0]}
    assert index._tables["type"] == {"t": [1]}
    assert index._always == [2]
    assert index.match({"kind": "b", "type": "t"}) == ["kind-only", "no-common"]
    assert index.match({"kind": "a", "type": "t", "x": 1}) == ["kind-only", "type-too", "no-common"]
