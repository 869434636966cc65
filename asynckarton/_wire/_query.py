"""Karton 5.5+ bind filters: compile them (:mod:`._compiler`), match them, index binds.

The public entry points of the filter language: :func:`compile_filters` returns a
:class:`Matcher`; :func:`matches_filters` is the one-shot form with a small cache;
:class:`BindIndex` (:mod:`._bind_index`) holds every bind for the router.  How the
filters are compiled, and where the result deliberately differs from karton-core, is
written in :mod:`._compiler`.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Mapping
from typing import Any

from ._bind_index import BindIndex
from ._compiler import Matcher, compile_filters

__all__ = ["BindIndex", "Matcher", "compile_filters", "matches_filters"]


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
