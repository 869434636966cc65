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
import functools
import json
import operator
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Final

from .._errors import QueryError

__all__ = ["BindIndex", "Matcher", "compile_filters", "matches_filters"]

Pred = Callable[[Any], bool]
"""A compiled condition: takes the value under test, returns the verdict."""

_WILDCARD_CHARS: Final = "?*[]!"
_NOT_IMPLEMENTED: Final = frozenset({"$options", "$text", "$where"})
_SLASHED_REGEX: Final = re.compile(r"\A/(.+)/([imsx]{,4})\Z", re.DOTALL)
_REGEX_FLAGS: Final = {"i": re.IGNORECASE, "m": re.MULTILINE, "s": re.DOTALL, "x": re.VERBOSE}
_INDEX_PREFERRED_KEY: Final = "type"


class _Undefined:
    """What a path leading nowhere extracts to (karton-core's ``_Undefined``).

    Deliberately featureless: not iterable, not a container, not subscriptable, not
    orderable, equal only to itself; every operator therefore treats it exactly like
    karton-core's sentinel (``$gt`` is False, ``$mod`` and ``$exists`` raise...).
    """

    __slots__ = ()


_MISSING: Final = _Undefined()


# --------------------------------------------------------------------- primitives


def _always(_: Any) -> bool:
    return True


def _never(_: Any) -> bool:
    return False


def _is_seq(value: Any) -> bool:
    """Whether ``value`` is a sequence but not a string (karton's list test)."""
    cls = type(value)
    if cls is list or cls is tuple:
        return True
    if cls is str or cls is dict or cls is int or cls is bool or value is None:
        return False
    return isinstance(value, Sequence) and not isinstance(value, str)


def _coerced_eq(cond: str, entry: Any) -> bool:
    """Equality against a ``str`` condition: non-``str`` values are ``str()``-ed."""
    if type(entry) is str:
        return entry == cond
    if entry is _MISSING:
        return False
    try:
        return str(entry) == cond
    except TypeError:
        return False


def _plain_eq(cond: Any, entry: Any) -> bool:
    """Equality against a non-``str`` condition; a ``TypeError`` means unequal."""
    try:
        result = entry == cond
    except TypeError:
        return False
    return bool(result)


def _eq_pred(cond: Any) -> Pred:
    """Karton's ``_eq`` (with type coercion) bound to ``cond``."""
    if type(cond) is str:
        return functools.partial(_coerced_eq, cond)
    return functools.partial(_plain_eq, cond)


def _literal(cond: Any) -> Pred:
    """A non-mapping condition: membership in list values, else coerced equality."""
    if type(cond) is str:

        def match_str(entry: Any) -> bool:
            if type(entry) is str:
                return entry == cond
            if _is_seq(entry):
                return cond in entry
            return _coerced_eq(cond, entry)

        return match_str

    def match_other(entry: Any) -> bool:
        if _is_seq(entry):
            return cond in entry
        return _plain_eq(cond, entry)

    return match_other


def _all_of(preds: list[Pred]) -> Pred:
    """AND in order with short-circuit."""
    if not preds:
        return _always
    if len(preds) == 1:
        return preds[0]

    def all_of(entry: Any) -> bool:
        for pred in preds:  # noqa: SIM110 - a plain loop beats all() over a generator
            if not pred(entry):
                return False
        return True

    return all_of


def _negate(pred: Pred) -> Pred:
    def negated(entry: Any) -> bool:
        return not pred(entry)

    return negated


def _compile_regex(cond: Any) -> re.Pattern[str]:
    """A ``$regex`` operand (``re.Pattern`` or ``/pat/flags`` or bare pattern)."""
    if isinstance(cond, re.Pattern):
        if not isinstance(cond.pattern, str):
            raise QueryError(f"$regex pattern {cond!r} is a bytes pattern")
        return cond
    if not isinstance(cond, str):
        raise QueryError(f"$regex operand {cond!r} is not a string or a compiled pattern")
    flags = 0
    slashed = _SLASHED_REGEX.match(cond)
    if slashed:
        for letter in slashed.group(2):
            flags |= _REGEX_FLAGS[letter]
        expression = slashed.group(1)
    else:
        expression = cond
    try:
        return re.compile(expression, flags)
    except Exception as exc:
        raise QueryError(f"$regex operand {cond!r} does not compile: {exc!r}") from exc


def _regex_pred(pattern: re.Pattern[str]) -> Pred:
    search = pattern.search

    def regex(entry: Any) -> bool:
        return isinstance(entry, str) and search(entry) is not None

    return regex


# ---------------------------------------------------------------------- paths


def _path_index(segment: str) -> int | None:
    """``int(segment)`` as karton-core computes it for list steps, or None."""
    try:
        return int(segment)
    except ValueError:
        return None


def _extract(entry: Any, steps: tuple[tuple[str, int | None], ...], at: int) -> Any:
    """Follow a dotted path like karton-core: lists are indexed or fanned out."""
    while at < len(steps):
        if entry is None:
            return None
        segment, index = steps[at]
        if _is_seq(entry):
            if index is None:
                return [_extract(item, steps, at) for item in entry]
            entry = entry[index]  # an IndexError voids the whole extraction
        elif isinstance(entry, Mapping) and segment in entry:
            entry = entry[segment]
        else:
            return _MISSING
        at += 1
    return entry


def _path_pred(path: list[str], inner: Pred) -> Pred:
    steps = tuple((segment, _path_index(segment)) for segment in path)

    def along_path(entry: Any) -> bool:
        try:
            value = _extract(entry, steps, 0)
        except IndexError:
            value = _MISSING
        return inner(value)

    return along_path


def _top_key(key: str, inner: Pred) -> Pred:
    """A plain header lookup at the top level (the entry is the headers mapping)."""

    def top_key(headers: Any) -> bool:
        return inner(headers.get(key, _MISSING))

    return top_key


def _top_literal(key: str, cond: str) -> Pred:
    """The hot case: ``{key: "literal"}`` on the headers mapping."""

    def top_literal(headers: Any) -> bool:
        value = headers.get(key, _MISSING)
        if type(value) is str:
            return value == cond
        if _is_seq(value):
            return cond in value
        return _coerced_eq(cond, value)

    return top_literal


def _top_wildcard(key: str, pattern: re.Pattern[str]) -> Pred:
    search = pattern.search

    def top_wildcard(headers: Any) -> bool:
        value = headers.get(key, _MISSING)
        return isinstance(value, str) and search(value) is not None

    return top_wildcard


def _is_plain_key(key: Any) -> bool:
    return isinstance(key, str) and not key.startswith("$") and "." not in key


# ------------------------------------------------------------------- $exists


def _walk_exists(keys: list[str], at: int, want: Any, entry: Any) -> Any:
    """karton-core's ``_path_exists``: returns ``want`` or ``not want``."""
    for i in range(at, len(keys)):
        key: Any = keys[i]
        if isinstance(entry, Sequence):
            if not key.isdigit():
                if isinstance(entry, str) and entry:
                    raise QueryError(
                        f"$exists on path {'.'.join(keys)!r} walks into the string {entry!r}; "
                        "karton-core recurses forever here"
                    )
                for element in entry:
                    if _walk_exists(keys, i, want, element) == want:
                        return want
                return not want
            key = int(key)
        try:
            entry = entry[key]
        except (TypeError, IndexError, KeyError):
            return not want
    return want


def _dotted_exists(path: str, want: Any) -> Pred:
    keys = path.split(".")

    def dotted_exists(entry: Any) -> bool:
        return bool(_walk_exists(keys, 0, want, entry))

    return dotted_exists


def _exists_gate(op: Any, want: Any, rest: Pred | None) -> Pred:
    """The ``$exists`` pre-check karton-core runs before any other operator."""
    if rest is None:

        def exists_only(entry: Any) -> bool:
            return bool(want == (op in entry))

        return exists_only

    def exists_then(entry: Any) -> bool:
        if want != (op in entry):
            return False
        return rest(entry)

    return exists_then


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


def _is_wildcard(value: str) -> bool:
    return any(char in value for char in _WILDCARD_CHARS)


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
            if type(value) is str:
                if value != cond:
                    return False
            elif _is_seq(value):
                if cond not in value:
                    return False
            elif not _coerced_eq(cond, value):
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


def _plain_json(value: Any) -> bool:
    """Whether ``value`` survives a JSON round trip unchanged (cache-key safety)."""
    cls = type(value)
    if cls is str or cls is int or cls is bool or cls is float or value is None:
        return True
    if cls is list:
        return all(_plain_json(item) for item in value)
    if cls is dict:
        return all(type(k) is str and _plain_json(v) for k, v in value.items())
    return False


@functools.lru_cache(maxsize=512)
def _compile_json(key: str) -> Matcher:
    return compile_filters(json.loads(key))


def matches_filters(filters: list[dict[str, Any]], headers: Mapping[str, Any]) -> bool:
    """One-shot ``compile_filters(filters)(headers)`` with a small LRU cache.

    Args:
        filters: a bind's filters.
        headers: the task's headers.

    Returns:
        Whether the headers match.

    Raises:
        QueryError: see :func:`compile_filters`.
        NotImplementedError: see :func:`compile_filters`.
    """
    if _plain_json(filters):
        return _compile_json(json.dumps(filters)).match(headers)
    return compile_filters(filters).match(headers)


# ---------------------------------------------------------------------- index

_NEVER_EQUAL_TO_STR: Final = frozenset({int, float, bool, type(None), list, dict, tuple})


def _index_values(value: Any) -> list[str] | None:
    """The strings a plain literal check on ``value`` can be satisfied by.

    ``None`` means "cannot tell", and the caller must evaluate every bind.
    """
    cls = type(value)
    if cls is str:
        return [value]
    if cls is list or cls is tuple:
        found: list[str] = []
        for element in value:
            if type(element) is str:
                found.append(element)
            elif type(element) not in _NEVER_EQUAL_TO_STR:
                return None  # an exotic element might compare equal to a str
        return found
    if _is_seq(value):
        return None
    try:
        return [str(value)]
    except Exception:  # noqa: BLE001 - the matcher would raise; let it, on every bind
        return None


def _index_plan(filters: Any) -> tuple[str, set[str]] | None:
    """The key and literals to index a bind under, or None if it is not indexable."""
    common: dict[str, set[str]] | None = None
    for rule in filters:
        literals = {
            key: value
            for key, value in rule.items()
            if _is_plain_key(key) and type(value) is str and not _is_wildcard(value)
        }
        if common is None:
            common = {key: {value} for key, value in literals.items()}
        else:
            common = {
                key: lits | {literals[key]} for key, lits in common.items() if key in literals
            }
        if not common:
            return None
    if common is None:
        return ("", set())  # no rules: never matches, never evaluated
    key = _INDEX_PREFERRED_KEY if _INDEX_PREFERRED_KEY in common else next(iter(common))
    return key, common[key]


class BindIndex:
    """All binds' matchers, indexed by a required literal header for fast routing.

    A bind is indexed under key ``K`` when *every* rule of its filters has a plain
    literal check ``K: "value"`` (no wildcard, no ``!``): it can then only match a
    task whose ``K`` header equals one of those values (``str()`` of a scalar, or an
    element of a list), so other binds are not even evaluated.  The index never
    changes a verdict; binds that cannot be indexed are always evaluated.

    Attributes:
        matchers: identity -> compiled matcher, for every valid bind.
        invalid: identity -> the exception its filters failed to compile with;
            such binds never match.
    """

    __slots__ = ("_always", "_entries", "_tables", "invalid", "matchers")

    def __init__(self, binds: Mapping[str, Any]) -> None:
        """Compile and index ``{identity: filters}`` (insertion order is kept)."""
        self.matchers: dict[str, Matcher] = {}
        self.invalid: dict[str, Exception] = {}
        self._entries: list[tuple[str, Callable[[Mapping[str, Any]], bool]]] = []
        self._always: list[int] = []
        self._tables: dict[str, dict[str, list[int]]] = {}
        for identity, filters in binds.items():
            try:
                matcher = compile_filters(filters)
            except Exception as exc:  # noqa: BLE001 - one bad bind must not stop routing
                self.invalid[identity] = exc
                continue
            self._add(identity, matcher)

    def _add(self, identity: str, matcher: Matcher) -> None:
        self.matchers[identity] = matcher
        position = len(self._entries)
        self._entries.append((identity, matcher.match))
        plan = _index_plan(matcher.filters)
        if plan is None:
            self._always.append(position)
            return
        key, literals = plan
        if not literals:
            return
        table = self._tables.setdefault(key, {})
        for literal in literals:
            table.setdefault(literal, []).append(position)

    def __len__(self) -> int:
        return len(self._entries)

    def _candidates(self, headers: Mapping[str, Any]) -> list[int]:
        hits: set[int] = set()
        for key, table in self._tables.items():
            value = headers.get(key, _MISSING)
            if value is _MISSING:
                continue
            found = _index_values(value)
            if found is None:
                for positions in table.values():
                    hits.update(positions)
                continue
            for literal in found:
                bucket = table.get(literal)
                if bucket:
                    hits.update(bucket)
        if not hits:
            return self._always
        hits.update(self._always)
        return sorted(hits)

    def match(
        self,
        headers: Mapping[str, Any],
        on_error: Callable[[str, Exception], None] | None = None,
    ) -> list[str]:
        """Identities of the binds whose filters match ``headers``, in insertion order.

        Args:
            headers: the task's headers.
            on_error: called with ``(identity, exception)`` when evaluating a bind
                raises (karton-core would raise too); that bind is skipped.

        Returns:
            The matching identities.
        """
        matched: list[str] = []
        entries = self._entries
        for position in self._candidates(headers):
            identity, predicate = entries[position]
            try:
                ok = predicate(headers)
            except Exception as exc:  # noqa: BLE001 - reported through on_error
                if on_error is not None:
                    on_error(identity, exc)
                continue
            if ok:
                matched.append(identity)
        return matched
