"""Read-only Redis queries behind inspection, ``asynckarton status`` and the metrics.

Every query here costs O(binds) or O(identities) commands, batched in one or two
pipelines, except :func:`scan_task_statuses`, which reads every task (SCAN + MGET) and
says so.  Queue depths come from LLEN / ZCARD, never from reading the tasks.

Tasks by status (Karton keeps no index of them) are counted by the GC pass, which reads
every task anyway, and published with :func:`publish_task_counts` as one small JSON
string (``asynckarton.gc.counts``); :func:`raw_state` reads it back with everything
else, so ``status`` and a metrics scrape show them in O(1) with their age.  Each pass
replaces the whole snapshot, so a crash leaves the previous one, older, never a wrong
partial count.

The writes, :func:`record_gc_pass` and :func:`publish_task_counts`, keep the GC's
heartbeat and counts (Karton has neither).
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Final, cast
from urllib.parse import parse_qs

import orjson
import redis.exceptions

from . import _keys as keys
from . import _scripts as scripts
from ._redis import KartonBackend

__all__ = [
    "GC_LAST",
    "KARTON_METRICS",
    "QueueCounts",
    "RawState",
    "StatusCounts",
    "parse_client_name",
    "publish_task_counts",
    "queue_counts",
    "raw_state",
    "record_gc_pass",
    "routers_alive",
    "scan_task_statuses",
]

# -- key-name helpers (to move into _keys.py) -------------------------------------------
#: hash: the last GC pass (finished_at, duration, deleted_tasks, deleted_objects, instance)
GC_LAST: Final = "asynckarton.gc.last"
#: Karton's per-identity counters (hash ``karton.metrics.<name>``).
KARTON_METRICS: Final = ("produced", "consumed", "crashed", "assigned", "garbage-collected")
#: The legacy (Karton 2.x) bare queue is reported under this priority name.
LEGACY_PRIORITY: Final = "legacy"


@dataclass(frozen=True, slots=True)
class QueueCounts:
    """Cheap counts for one identity: queued per priority, leased, dead letters."""

    queued: dict[str, int]
    leased: int
    dead: int


@dataclass(frozen=True, slots=True)
class StatusCounts:
    """Tasks by (receiver, priority, status) and when they were counted."""

    counts: Counter[tuple[str, str, str]]
    counted_at: float  # unix time the count finished
    duration: float  # seconds the count took


@dataclass(slots=True)
class RawState:
    """Everything :func:`raw_state` read, unparsed beyond Redis' own replies."""

    binds: dict[str, str] = field(default_factory=dict)
    client_names: list[str] = field(default_factory=list)
    unrouted: int = 0
    delayed: int = 0
    routers: list[tuple[str, float]] = field(default_factory=list)  # instance, deadline (s)
    gc_last: dict[str, str] = field(default_factory=dict)
    stats: dict[str, int] = field(default_factory=dict)
    metrics: dict[str, dict[str, int]] = field(default_factory=dict)
    task_counts: StatusCounts | None = None  # the last GC pass's count
    redis_info: dict[str, Any] | None = None


def parse_client_name(name: str) -> tuple[str, dict[str, str]]:
    """Split a Karton client name ``identity?key=value&...`` into identity and info."""
    identity, _, query = name.partition("?")
    info = {k: v[-1] for k, v in parse_qs(query).items()} if query else {}
    return identity, info


async def raw_state(backend: KartonBackend) -> RawState:
    """Read binds, presence, system keys, counters and memory: two round trips.

    Costs O(binds + connections + identities), independent of the number of tasks.
    """
    client = backend.redis
    async with client.pipeline(transaction=False) as pipe:
        pipe.hgetall(keys.BINDS)
        pipe.client_list()
        pipe.llen(keys.TASKS_QUEUE)
        pipe.zcard(keys.DELAYED)
        pipe.zrange(keys.ROUTERS, 0, -1, withscores=True)
        pipe.hgetall(GC_LAST)
        pipe.hgetall(keys.STATS)
        pipe.get(keys.GC_COUNTS)
        for metric in KARTON_METRICS:
            pipe.hgetall(keys.metrics_key(metric))
        replies = await pipe.execute()
    binds, clients, unrouted, delayed, routers, gc_last, stats, counts, *metrics = replies
    state = RawState(
        binds=cast(dict[str, str], binds),
        client_names=[c.get("name") or "" for c in clients if c.get("name")],
        unrouted=int(unrouted),
        delayed=int(delayed),
        routers=[(str(m), float(score) / 1000) for m, score in routers],
        gc_last=cast(dict[str, str], gc_last),
        stats={k: _int(v) for k, v in stats.items()},
        metrics={
            name: {k: _int(v) for k, v in raw.items()}
            for name, raw in zip(KARTON_METRICS, metrics, strict=True)
        },
        task_counts=_parse_counts(counts),
    )
    try:
        state.redis_info = await client.info("memory")
    except redis.exceptions.ResponseError:  # the embedded server has no INFO
        state.redis_info = None
    return state


async def queue_counts(backend: KartonBackend, identities: Iterable[str]) -> dict[str, QueueCounts]:
    """LLEN every queue, ZCARD the leases and LLEN the dead letters: one pipeline."""
    names = list(identities)
    async with backend.redis.pipeline(transaction=False) as pipe:
        for identity in names:
            for queue in keys.consumer_queues(identity):
                pipe.llen(queue)
            pipe.zcard(keys.leases_key(identity))
            pipe.llen(keys.dead_key(identity))
        replies = await pipe.execute()
    width = len(keys.PRIORITIES) + 3
    out: dict[str, QueueCounts] = {}
    for index, identity in enumerate(names):
        legacy, *by_priority, leased, dead = replies[index * width : (index + 1) * width]
        queued = dict(zip(keys.PRIORITIES, map(int, by_priority), strict=True))
        if legacy:
            queued[LEGACY_PRIORITY] = int(legacy)
        out[identity] = QueueCounts(queued, int(leased), int(dead))
    return out


async def scan_task_statuses(
    backend: KartonBackend, *, busy_share: float | None = None
) -> Counter[tuple[str, str, str]]:
    """Count every task by (receiver, priority, status): **O(all tasks)**.

    One SCAN of ``karton.task:*`` plus one MGET per 1000 keys, and a JSON parse of every
    body: the cost of one GC pass over the tasks (memory: one batch at a time).  Karton
    keeps no index of tasks by status; the GC publishes this count after each pass
    (:func:`publish_task_counts`), so callers need this only for a fresh count on
    demand (``status --scan``) or the metrics' optional scan, paced with ``busy_share``
    (see :meth:`~asynckarton.backend.KartonBackend.scan_tasks`).
    Unrouted tasks count under receiver ``""``.
    """
    counts: Counter[tuple[str, str, str]] = Counter()
    async for batch in backend.scan_tasks(busy_share=busy_share):
        for _uid, body in batch:
            try:
                doc = orjson.loads(body)
                headers = doc.get("headers") or {}
                receiver = str(headers.get("receiver") or "")
                counts[receiver, str(doc.get("priority") or "normal"), str(doc["status"])] += 1
            except (orjson.JSONDecodeError, KeyError, AttributeError, TypeError):
                counts["", "", "Unreadable"] += 1
    return counts


async def routers_alive(backend: KartonBackend) -> int:
    """Router instances whose heartbeat in ``asynckarton.routers`` has not expired."""
    alive: int = await backend.redis.zcount(keys.ROUTERS, int(time.time() * 1000), "+inf")
    return alive


async def record_gc_pass(
    backend: KartonBackend, *, duration: float, deleted_tasks: int, deleted_objects: int
) -> None:
    """Write the GC's heartbeat: when its last pass finished and what it did."""
    mapping: dict[str | bytes, str | int | float] = {
        "finished_at": time.time(),
        "duration": duration,
        "deleted_tasks": deleted_tasks,
        "deleted_objects": deleted_objects,
    }
    writes = scripts.Writes()  # through commit(): a full Redis still takes it
    writes.call("HSET", GC_LAST, *(word for pair in mapping.items() for word in pair))
    await backend.commit(writes)


async def publish_task_counts(backend: KartonBackend, counts: StatusCounts) -> None:
    """Replace the published task counts with ``counts`` (one SET: all or nothing)."""
    document = {
        "counted_at": counts.counted_at,
        "duration": counts.duration,
        "counts": [[*key, n] for key, n in sorted(counts.counts.items())],
    }
    writes = scripts.Writes()
    writes.call("SET", keys.GC_COUNTS, orjson.dumps(document).decode())
    await backend.commit(writes)


def _parse_counts(raw: object) -> StatusCounts | None:
    """The published counts, or None when absent or unreadable (never a partial one)."""
    if not raw:
        return None
    try:
        doc = orjson.loads(cast(str, raw))
        counts: Counter[tuple[str, str, str]] = Counter()
        for receiver, priority, status, n in doc["counts"]:
            counts[str(receiver), str(priority), str(status)] = int(n)
        return StatusCounts(counts, float(doc["counted_at"]), float(doc["duration"]))
    except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
        return None


def _int(value: object) -> int:
    try:
        return int(str(value))
    except ValueError:
        return 0
