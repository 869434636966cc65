"""The bind index: every bind's compiled filters, narrowed per task by a literal header.

The router evaluates only the binds a task's headers can match (see :class:`BindIndex`);
the index never changes a verdict.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Final

from ._compiler import Matcher, compile_filters
from ._predicates import _MISSING, _is_plain_key, _is_seq, _is_wildcard

__all__ = ["BindIndex"]

_INDEX_PREFERRED_KEY: Final = "type"
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
