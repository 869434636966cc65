"""The result cache's storage: one string per consumer identity and task arguments.

``asynckarton.cache:<identity>:<sha256 of the arguments>`` holds the JSON document
``{"uid": first task, "finished": unix time, "outputs": [task bodies it sent]}`` and
expires after the identity's ``call_result_cache_ttl``.  The garbage collector reads the
outputs with :func:`scan_cached_outputs`, so the resources they reference outlive the
tasks that first carried them for as long as the entry does.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterable, Iterator
from typing import cast

from . import _keys as keys
from ._guard import entry_point, entry_point_iter
from ._redis import KartonBackend

__all__ = ["cache_get", "cache_put", "cached_bodies", "scan_cached_outputs"]

CHUNK = 500  # keys per SCAN step


@entry_point("read the result cache")
async def cache_get(backend: KartonBackend, identity: str, digest: str) -> str | None:
    """The cached document of ``identity`` for ``digest``, or None."""
    return cast(str | None, await backend.redis.get(keys.result_cache_key(identity, digest)))


@entry_point("write the result cache")
async def cache_put(
    backend: KartonBackend, identity: str, digest: str, document: str, ttl: float
) -> None:
    """Store ``document`` for ``ttl`` seconds (a later success replaces it)."""
    key = keys.result_cache_key(identity, digest)
    await backend.redis.set(key, document, px=max(1, int(ttl * 1000)))


@entry_point_iter("scan the result cache")
async def scan_cached_outputs(backend: KartonBackend) -> AsyncIterator[list[str]]:
    """Yield the cached documents in batches (SCAN then MGET; expired ones left out)."""
    cursor = 0
    while True:
        cursor, found = await backend.redis.scan(
            cursor, match=keys.RESULT_CACHE_PREFIX + "*", count=CHUNK
        )
        if found:
            documents = cast(list[str | None], await backend.redis.mget(found))
            batch = [doc for doc in documents if doc is not None]
            if batch:
                yield batch
        if cursor == 0:
            return


def cached_bodies(documents: Iterable[str]) -> Iterator[str]:
    """The output task bodies of cached documents (a malformed document has none)."""
    for document in documents:
        try:
            outputs = json.loads(document)["outputs"]
        except (ValueError, KeyError, TypeError):
            continue
        if isinstance(outputs, list):
            yield from (body for body in outputs if isinstance(body, str))
