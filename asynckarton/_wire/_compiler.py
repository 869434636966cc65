"""Karton 5.5+ bind filters, compiled once into closures.

A bind's ``filters`` is a list of rules (OR); each rule is a dict of checks (AND).
karton-core evaluates them by rewriting the list into one MongoDB-style query
(``karton.core.query.convert``) and then *interpreting* that query for every task,
which costs tens of microseconds per bind and task.  This module walks the very same
query shape once, at compile time, and returns a tree of small closures; matching a
task is then a handful of attribute-free function calls.

How the rewrite is honoured
---------------------------
``convert`` splits every rule into *positive* checks and old-style ``"!value"``
*negative* checks and evaluates::

    not any(pos_i and any(neg_i) for each rule i)   # the veto pass, run first
    and any(pos_i for each rule i)                  # the match pass

The veto pass already evaluates every rule's positive part (stopping only at a
veto), and evaluation is deterministic, so the match pass can never raise or
change anything the veto pass did not.  :func:`_assemble` therefore runs a single
loop over the rules, in rule order, with the same short-circuits, which means a
dynamic error (``$mod`` on a string, ``$exists`` under a scalar...) is raised for
exactly the headers for which karton-core raises.

Every karton-core quirk is reproduced, among them: wildcards (``? * [ ] !``) are
``fnmatch.translate``-d and searched *unanchored at the start*, and never match
non-``str`` values or list elements; plain string literals compare ``str(value)``
for non-``str`` header values and test *membership* in list values (without
coercion); ``$in``/``$nin`` never coerce; ``$type: "array"`` also accepts strings;
dotted paths fan out over lists; ``$exists`` on a dotted path ignores the other
operators next to it.

Deliberate divergences
----------------------
* *Static* errors (unknown operator, malformed operand, invalid regular expression)
  raise at compile time, even though karton-core only raises when a task's headers
  reach that part of the query (or never, if a short-circuit always skips it).
  ``$options``, ``$text`` and ``$where`` raise :class:`NotImplementedError` like
  karton-core; everything else raises :class:`~asynckarton._errors.QueryError`.
* karton-core dispatches ``$op`` through ``getattr``, so names of its internals
  (``$match``, ``$noop``, ``$extract``, ``$_class__``...) happen to do something
  there; here they are unsupported operators.
* karton-core's undefined-path sentinel stringifies with its memory address; ours
  never compares equal to a string literal (karton-core's in practice never does).
"""

from __future__ import annotations

import fnmatch
import operator
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Final

from .._errors import QueryError
from ._predicates import (
    _MISSING,
    Pred,
    _all_of,
    _always,
    _compile_regex,
    _dotted_exists,
    _eq_pred,
    _exists_gate,
    _is_plain_key,
    _is_seq,
    _is_wildcard,
    _literal,
    _matches_str,
    _negate,
    _never,
    _path_pred,
    _regex_pred,
    _top_key,
    _top_literal,
    _top_wildcard,
)

__all__ = ["Matcher", "Pred", "compile_filters"]

_NOT_IMPLEMENTED: Final = frozenset({"$options", "$text", "$where"})


# --------------------------------------------------------------- the compiler


def _compile_match(cond: Any, top: bool) -> Pred:
    """Compile karton's ``_match(cond, entry)``; ``top``: entry is the headers."""
    if isinstance(cond, Mapping):
        return _all_of([_compile_process(op, sub, top) for op, sub in cond.items()])
    return _literal(cond)


def _compile_process(op: Any, cond: Any, top: bool) -> Pred:
    """Compile karton's ``_process_condition(op, cond, entry)``."""
    if isinstance(cond, Mapping) and "$exists" in cond:
        want = cond["$exists"]
        if isinstance(op, str) and "." in op:
            return _dotted_exists(op, want)
        only = tuple(cond.keys()) == ("$exists",)
        return _exists_gate(op, want, None if only else _compile_target(op, cond, top))
    return _compile_target(op, cond, top)


def _compile_target(op: Any, cond: Any, top: bool) -> Pred:
    """An operator, or a (dotted) key whose value is matched against ``cond``."""
    if isinstance(op, str):
        if op.startswith("$"):
            return _compile_operator(op, cond, top)
        if top and "." not in op:
            if type(cond) is str:
                return _top_literal(op, cond)
            return _top_key(op, _compile_match(cond, False))
        return _path_pred(op.split("."), _compile_match(cond, False))
    inner = _compile_match(cond, False)

    def other_key(entry: Any) -> bool:
        if op not in entry:
            return False
        return inner(entry[op])

    return other_key


def _compile_operator(op: str, cond: Any, top: bool) -> Pred:
    factory = _OPERATORS.get(op)
    if factory is None:
        if op in _NOT_IMPLEMENTED:
            raise NotImplementedError(f"{op} operator is not implemented (operand {cond!r})")
        raise QueryError(f"{op} operator isn't supported (operand {cond!r})")
    return factory(cond, top)


# ------------------------------------------------------------------ operators


def _op_eq(cond: Any, top: bool) -> Pred:
    return _eq_pred(cond)


def _op_ne(cond: Any, top: bool) -> Pred:
    return _negate(_eq_pred(cond))


def _comparison(compare: Callable[[Any, Any], Any]) -> Callable[[Any, bool], Pred]:
    def factory(cond: Any, top: bool) -> Pred:
        def compared(entry: Any) -> bool:
            try:
                return bool(compare(entry, cond))
            except TypeError:
                return False

        return compared

    return factory


def _membership(name: str, cond: Any) -> Pred:
    if not _is_seq(cond):
        raise QueryError(f"{name} needs a list operand, got {cond!r}")
    items = tuple(cond)

    def member(entry: Any) -> bool:
        if _is_seq(entry):
            return any(item in entry for item in items)
        return any(item == entry for item in items)

    return member


def _op_in(cond: Any, top: bool) -> Pred:
    return _membership("$in", cond)


def _op_nin(cond: Any, top: bool) -> Pred:
    return _negate(_membership("$nin", cond))


def _subconditions(name: str, cond: Any, top: bool) -> list[Pred]:
    if not isinstance(cond, Sequence):
        raise QueryError(f"{name} needs a list operand, got {cond!r}")
    return [_compile_match(sub, top) for sub in cond]


def _op_and(cond: Any, top: bool) -> Pred:
    return _all_of(_subconditions("$and", cond, top))


def _op_or(cond: Any, top: bool) -> Pred:
    preds = _subconditions("$or", cond, top)

    def any_of(entry: Any) -> bool:
        return any(pred(entry) for pred in preds)

    return any_of


def _op_nor(cond: Any, top: bool) -> Pred:
    preds = _subconditions("$nor", cond, top)

    def none_of(entry: Any) -> bool:
        return not any(pred(entry) for pred in preds)

    return none_of


def _op_not(cond: Any, top: bool) -> Pred:
    return _negate(_compile_match(cond, top))


_BSON_TYPES: Final[dict[Any, Any]] = {
    1: float,
    2: str,
    3: Mapping,
    4: Sequence,
    5: bytearray,
    7: str,
    8: bool,
    9: str,
    10: type(None),
    11: re.Pattern,
    13: str,
    15: str,
    16: int,
    17: int,
    18: int,
}
_BSON_ALIASES: Final[dict[str, int]] = {
    "double": 1,
    "string": 2,
    "object": 3,
    "array": 4,
    "binData": 5,
    "objectId": 7,
    "bool": 8,
    "date": 9,
    "null": 10,
    "regex": 11,
    "javascript": 13,
    "javascriptWithScope": 15,
    "int": 16,
    "timestamp": 17,
    "long": 18,
}


def _op_type(cond: Any, top: bool) -> Pred:
    if cond == "number":
        wanted: Any = (float, int)
    else:
        try:
            code = _BSON_ALIASES.get(cond, cond)
            wanted = _BSON_TYPES[code]
        except (TypeError, KeyError) as exc:
            raise QueryError(f"$type has been used with unknown type {cond!r}") from exc

    def type_is(entry: Any) -> bool:
        return isinstance(entry, wanted)

    return type_is


def _op_exists(cond: Any, top: bool) -> Pred:
    # Reached only without the $exists gate (e.g. nested directly in an operator
    # mapping); karton-core treats it as a no-op there.
    return _always


def _op_mod(cond: Any, top: bool) -> Pred:
    try:
        divisor, remainder = cond[0], cond[1]
    except Exception as exc:
        raise QueryError(f"$mod needs a [divisor, remainder] operand, got {cond!r}") from exc

    def modulo(entry: Any) -> bool:
        return bool(entry % divisor == remainder)  # raises exactly when karton-core does

    return modulo


def _op_regex(cond: Any, top: bool) -> Pred:
    return _regex_pred(_compile_regex(cond))


def _op_all(cond: Any, top: bool) -> Pred:
    try:
        items = list(cond)
    except TypeError as exc:
        raise QueryError(f"$all needs an iterable operand, got {cond!r}") from exc
    return _all_of([_compile_match(item, top) for item in items])


def _op_elem_match(cond: Any, top: bool) -> Pred:
    if not isinstance(cond, Mapping):
        raise QueryError(f"$elemMatch needs a mapping operand, got {cond!r}")
    each = _all_of([_compile_process(op, sub, False) for op, sub in cond.items()])

    def elem_match(entry: Any) -> bool:
        if not isinstance(entry, Sequence):
            return False
        return any(each(element) for element in entry)

    return elem_match


def _op_size(cond: Any, top: bool) -> Pred:
    if not isinstance(cond, int):
        raise QueryError(f"$size has been attributed incorrect argument {cond!r}")

    def size_is(entry: Any) -> bool:
        return _is_seq(entry) and len(entry) == cond

    return size_is


_OPERATORS: Final[dict[str, Callable[[Any, bool], Pred]]] = {
    "$eq": _op_eq,
    "$ne": _op_ne,
    "$gt": _comparison(operator.gt),
    "$gte": _comparison(operator.ge),
    "$lt": _comparison(operator.lt),
    "$lte": _comparison(operator.le),
    "$in": _op_in,
    "$nin": _op_nin,
    "$and": _op_and,
    "$or": _op_or,
    "$nor": _op_nor,
    "$not": _op_not,
    "$type": _op_type,
    "$exists": _op_exists,
    "$mod": _op_mod,
    "$regex": _op_regex,
    "$all": _op_all,
    "$elemMatch": _op_elem_match,
    "$size": _op_size,
}

# ---------------------------------------------------------------------- rules


def _compile_check(key: Any, value: Any) -> Pred:
    """One top-level ``key: value`` of a rule, after the ``!`` has been stripped."""
    if isinstance(value, str) and _is_wildcard(value):
        translated = fnmatch.translate(value)
        if _is_plain_key(key):
            return _top_wildcard(key, _compile_regex(translated))
        return _compile_process(key, {"$regex": translated}, True)
    return _compile_process(key, value, True)


def _literal_rule(pairs: list[tuple[str, str]]) -> Pred:
    """A rule made only of plain ``key: "literal"`` checks, fused into one loop."""
    if len(pairs) == 1:
        return _top_literal(*pairs[0])

    def literal_rule(headers: Any) -> bool:
        get = headers.get
        for key, cond in pairs:
            value = get(key, _MISSING)
            if type(value) is str and value == cond:  # the common match, without a call
                continue
            if not _matches_str(cond, value):
                return False
        return True

    return literal_rule


def _compile_rule(rule: Any) -> tuple[Pred, list[Pred]]:
    """A rule's positive part (AND of its checks) and its ``!`` veto checks."""
    if not isinstance(rule, Mapping):
        raise QueryError(f"a filter rule must be a dict, got {rule!r}")
    positives: list[Pred] = []
    negatives: list[Pred] = []
    literals: list[tuple[str, str]] = []
    for key, value in rule.items():
        if isinstance(value, str) and value[:1] == "!":
            negatives.append(_compile_check(key, value[1:]))
            continue
        if type(value) is str and _is_plain_key(key) and not _is_wildcard(value):
            literals.append((key, value))
        positives.append(_compile_check(key, value))
    if literals and len(literals) == len(positives):
        return _literal_rule(literals), negatives
    return _all_of(positives), negatives


def _assemble(rules: list[tuple[Pred, list[Pred]]]) -> Pred:
    """OR the rules, with old-style negations as a global veto (see module doc)."""
    if not rules:
        return _never
    if not any(negatives for _, negatives in rules):
        if len(rules) == 1:
            return rules[0][0]
        positives = [positive for positive, _ in rules]

        def any_rule(headers: Any) -> bool:
            matched = False
            for positive in positives:  # no early exit: karton-core evaluates them all
                if positive(headers):
                    matched = True
            return matched

        return any_rule

    def vetoed_rules(headers: Any) -> bool:
        matched = False
        for positive, negatives in rules:
            if positive(headers):
                for negative in negatives:
                    if negative(headers):
                        return False
                matched = True
        return matched

    return vetoed_rules


# ------------------------------------------------------------------ public API


class Matcher:
    """A compiled ``filters`` list.

    Call it (or its ``match`` attribute, one call cheaper) with a task's headers.

    Attributes:
        filters: the filters it was compiled from.
        match: the compiled predicate, ``headers -> bool``.
    """

    __slots__ = ("filters", "match")

    filters: Any
    match: Callable[[Mapping[str, Any]], bool]

    def __init__(self, filters: Any, predicate: Callable[[Mapping[str, Any]], bool]) -> None:
        self.filters = filters
        self.match = predicate

    def __call__(self, headers: Mapping[str, Any]) -> bool:
        """Whether ``headers`` match the filters (Karton 5.5+ semantics)."""
        return self.match(headers)

    def __repr__(self) -> str:
        return f"Matcher({self.filters!r})"


def compile_filters(filters: list[dict[str, Any]]) -> Matcher:
    """Compile a bind's ``filters`` into a :class:`Matcher`.

    Args:
        filters: a list of rules; each rule is a dict of checks.

    Returns:
        The compiled matcher.

    Raises:
        QueryError: a rule is not a dict, or uses an unsupported operator or a
            malformed operand (the message names both and the rule).
        NotImplementedError: ``$options``, ``$text`` or ``$where`` is used.
    """
    try:
        rules = list(filters)
    except TypeError as exc:
        raise QueryError(f"filters must be a list of dicts, got {filters!r}") from exc
    compiled: list[tuple[Pred, list[Pred]]] = []
    for number, rule in enumerate(rules):
        try:
            compiled.append(_compile_rule(rule))
        except (QueryError, NotImplementedError) as exc:
            raise type(exc)(f"{exc} in filter rule #{number} {rule!r}") from exc
    return Matcher(filters if isinstance(filters, list) else rules, _assemble(compiled))
