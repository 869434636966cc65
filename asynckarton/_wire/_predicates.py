"""The building blocks of compiled filters: predicates, paths, ``$exists``, literals.

A compiled condition is a :data:`Pred`, a function of the value under test.  These are
the primitives :mod:`._compiler` assembles; each reproduces one piece of karton-core's
query interpreter (``karton.core.query``), quirks included (see :mod:`._compiler`).
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Final

from .._errors import QueryError

Pred = Callable[[Any], bool]
"""A compiled condition: takes the value under test, returns the verdict."""

_WILDCARD_CHARS: Final = "?*[]!"
_SLASHED_REGEX: Final = re.compile(r"\A/(.+)/([imsx]{,4})\Z", re.DOTALL)
_REGEX_FLAGS: Final = {"i": re.IGNORECASE, "m": re.MULTILINE, "s": re.DOTALL, "x": re.VERBOSE}


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


def _matches_str(cond: str, entry: Any) -> bool:
    """Karton's rule for a plain string condition, the one copy of it.

    A ``str`` value must be equal, a list value must contain ``cond`` (no coercion),
    any other value is compared as ``str(value)``.  The bind index's view of the same
    rule (which strings can satisfy it) is ``_bind_index._index_values``.
    """
    if type(entry) is str:
        return entry == cond
    if _is_seq(entry):
        return cond in entry
    return _coerced_eq(cond, entry)


def _literal(cond: Any) -> Pred:
    """A non-mapping condition: membership in list values, else coerced equality."""
    if type(cond) is str:
        return functools.partial(_matches_str, cond)

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
    """The hot case: ``{key: "literal"}`` on the headers mapping.

    An equal ``str`` is tested inline first: the common match, without a call.
    """

    def top_literal(headers: Any) -> bool:
        value = headers.get(key, _MISSING)
        return (type(value) is str and value == cond) or _matches_str(cond, value)

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


def _is_wildcard(value: str) -> bool:
    return any(char in value for char in _WILDCARD_CHARS)
