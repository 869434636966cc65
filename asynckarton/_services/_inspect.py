"""The async inspection API: what ``karton.core.inspect.KartonState`` tells, cheaply.

:meth:`DeploymentState.load` reads binds, replicas, queue depths, leases, dead letters,
the router and GC heartbeats, Karton's counters and Redis' memory in three round trips,
whatever the number of tasks: queue depths come from LLEN / ZCARD.  Counting tasks by
status (Karton's pending / started / crashed) needs every task read, because Karton keeps
no index by status: the GC pass, which reads every task anyway, publishes the counts,
and :attr:`DeploymentState.tasks` carries the last ones with their age (None before
the first asynckarton GC pass); :func:`count_tasks` counts afresh on request, O(all
tasks), and says so.

``asynckarton list``, ``status``, ``delete`` and the metrics exporter are built on this.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any

from .._errors import BindInUseError, UnknownBindError
from ..backend import Bind, KartonBackend
from ..backend._inspect import (
    StatusCounts,
    parse_client_name,
    queue_counts,
    raw_state,
    scan_task_statuses,
)

__all__ = [
    "BindInUseError",
    "BindState",
    "DeploymentState",
    "GCState",
    "QueueState",
    "RedisState",
    "RouterState",
    "TaskCounts",
    "UnknownBindError",
    "count_tasks",
    "delete_bind",
]

SYSTEM_IDENTITY = "karton.system"


@dataclass(frozen=True, slots=True, kw_only=True)
class BindState:
    """One registered consumer: its bind and how many replicas are connected."""

    identity: str
    version: str
    service_version: str | None
    persistent: bool
    is_async: bool
    info: str | None
    filters: list[dict[str, Any]]
    replicas: int
    unreadable: str | None = None  # why the bind JSON could not be parsed


@dataclass(frozen=True, slots=True, kw_only=True)
class QueueState:
    """Cheap counts of one identity's work (no task is read)."""

    identity: str
    queued: dict[str, int]  # priority -> LLEN (``legacy`` = Karton 2.x's bare queue)
    leased: int  # tasks a consumer holds: started, or prefetched ahead of a handler
    dead: int  # asynckarton's dead letters: crashed after the last retry

    @property
    def pending(self) -> int:
        """Tasks not finished yet: waiting in a queue or held by a consumer."""
        return sum(self.queued.values()) + self.leased


@dataclass(frozen=True, slots=True, kw_only=True)
class RouterState:
    """One router instance's heartbeat (``asynckarton.routers``)."""

    instance: str
    expires_at: float

    @property
    def alive(self) -> bool:
        """The heartbeat has not expired."""
        return self.expires_at > time.time()


@dataclass(frozen=True, slots=True, kw_only=True)
class GCState:
    """The last garbage-collection pass, as the GC recorded it."""

    finished_at: float
    duration: float
    deleted_tasks: int
    deleted_objects: int

    @property
    def age(self) -> float:
        """Seconds since the pass finished."""
        return max(0.0, time.time() - self.finished_at)


@dataclass(frozen=True, slots=True, kw_only=True)
class RedisState:
    """Redis memory use (None on the embedded server, which has no INFO)."""

    used_memory: int
    used_memory_human: str
    maxmemory: int


@dataclass(frozen=True, slots=True, kw_only=True)
class DeploymentState:
    """A snapshot of a Karton deployment, read without touching the tasks.

    Build it with ``await DeploymentState.load(backend)``.
    """

    taken_at: float
    binds: dict[str, BindState]
    queues: dict[str, QueueState]
    unrouted: int  # LLEN karton.tasks
    retries_scheduled: int  # ZCARD asynckarton.delayed
    routers: list[RouterState]
    gc: GCState | None
    system_replicas: int  # named karton.system connections (asynckarton or karton-system)
    replicas: dict[str, int]  # every identity with named connections -> count
    metrics: dict[str, dict[str, int]]  # karton.metrics.<name> -> identity -> counter
    stats: dict[str, int]  # asynckarton.stats (redelivered, rerouted, invalid...)
    redis: RedisState | None = None
    tasks: TaskCounts | None = None  # by status, as the last GC pass counted them

    @classmethod
    async def load(cls, backend: KartonBackend) -> DeploymentState:
        """Read the state: three round trips, O(binds + connections), no task read."""
        raw = await raw_state(backend)
        replicas: Counter[str] = Counter(parse_client_name(n)[0] for n in raw.client_names)
        binds = {
            identity: _bind_state(identity, value, replicas[identity])
            for identity, value in sorted(raw.binds.items())
        }
        counts = await queue_counts(backend, binds)
        queues = {
            identity: QueueState(identity=identity, queued=c.queued, leased=c.leased, dead=c.dead)
            for identity, c in counts.items()
        }
        return cls(
            taken_at=time.time(),
            binds=binds,
            queues=queues,
            unrouted=raw.unrouted,
            retries_scheduled=raw.delayed,
            routers=[RouterState(instance=i, expires_at=d) for i, d in raw.routers],
            gc=_gc_state(raw.gc_last),
            system_replicas=replicas[SYSTEM_IDENTITY],
            replicas=dict(replicas),
            metrics=raw.metrics,
            stats=raw.stats,
            redis=_redis_state(raw.redis_info),
            tasks=_task_counts(raw.task_counts),
        )

    @property
    def routers_alive(self) -> int:
        """Router instances whose heartbeat has not expired."""
        return sum(1 for router in self.routers if router.alive)

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict (``status --json``)."""
        doc = asdict(self)
        for identity, queue in self.queues.items():
            doc["queues"][identity]["pending"] = queue.pending
        for index, router in enumerate(self.routers):
            doc["routers"][index]["alive"] = router.alive
        if self.gc is not None:
            doc["gc"]["age"] = self.gc.age
        doc["task_counts"] = self.tasks.to_json() if self.tasks is not None else None
        del doc["tasks"]
        return doc


@dataclass(frozen=True, slots=True)
class TaskCounts:
    """Tasks by (receiver, priority, status), from a full read of the tasks."""

    counts: Counter[tuple[str, str, str]] = field(default_factory=Counter)
    duration: float = 0.0  # seconds the scan took
    counted_at: float = 0.0  # unix time the scan finished

    @property
    def age(self) -> float:
        """Seconds since the count finished."""
        return max(0.0, time.time() - self.counted_at)

    def to_json(self) -> dict[str, Any]:
        """``{"counted_at", "age", "duration", "by_identity": {receiver: {status: n}}}``."""
        return {
            "counted_at": self.counted_at,
            "age": self.age,
            "duration": self.duration,
            "by_identity": {ident: dict(c) for ident, c in self.by_identity().items()},
        }

    def by_identity(self) -> dict[str, Counter[str]]:
        """Receiver -> status -> count (unrouted tasks under ``""``)."""
        out: dict[str, Counter[str]] = {}
        for (receiver, _priority, status), count in self.counts.items():
            out.setdefault(receiver, Counter())[status] += count
        return out


async def count_tasks(backend: KartonBackend, *, busy_share: float | None = None) -> TaskCounts:
    """Count every task by receiver, priority and status: **O(all tasks)**.

    It reads each task once (SCAN + MGET + a JSON parse), like one GC pass; use it on
    demand, not per request (:attr:`DeploymentState.tasks` has the GC's last count).

    Args:
        backend: where the tasks are.
        busy_share: pace the scan while routers have a backlog (see
            :meth:`~asynckarton.backend.KartonBackend.scan_tasks`); None: full speed.
    """
    started = time.perf_counter()
    counts = await scan_task_statuses(backend, busy_share=busy_share)
    return TaskCounts(counts, time.perf_counter() - started, time.time())


async def delete_bind(backend: KartonBackend, identity: str, *, force: bool = False) -> Bind:
    """Unregister ``identity`` the way ``karton delete`` does; return the old bind.

    The bind is replaced by a non-persistent one with no filters: the router stops
    sending it tasks at once, and the next GC pass (asynckarton's or karton-system's)
    removes the bind, its queues and its tasks once no replica is connected.

    Raises:
        UnknownBindError: ``identity`` has no bind.
        BindInUseError: replicas are online and ``force`` is false (forced, they see
            their bind change and shut down).
    """
    old = await backend.get_bind(identity)
    if old is None:
        raise UnknownBindError(identity)
    online = (await backend.online_identities()).get(identity, 0)
    if online and not force:
        raise BindInUseError(identity, online)
    await backend.register_bind(
        Bind(
            identity=identity,
            filters=[],
            info=old.info,
            version=old.version,
            persistent=False,
            service_version=old.service_version,
            is_async=old.is_async,
        )
    )
    return old


def _bind_state(identity: str, raw: str, replicas: int) -> BindState:
    try:
        bind = Bind.from_json(identity, raw)
    except (ValueError, KeyError, TypeError) as exc:
        return BindState(
            identity=identity, version="?", service_version=None, persistent=True,
            is_async=False, info=None, filters=[], replicas=replicas, unreadable=str(exc),
        )  # fmt: skip
    return BindState(
        identity=identity,
        version=bind.version,
        service_version=bind.service_version,
        persistent=bind.persistent,
        is_async=bind.is_async,
        info=bind.info,
        filters=bind.filters,
        replicas=replicas,
    )


def _task_counts(raw: StatusCounts | None) -> TaskCounts | None:
    if raw is None:
        return None
    return TaskCounts(raw.counts, raw.duration, raw.counted_at)


def _gc_state(raw: dict[str, str]) -> GCState | None:
    try:
        return GCState(
            finished_at=float(raw["finished_at"]),
            duration=float(raw.get("duration", 0)),
            deleted_tasks=int(raw.get("deleted_tasks", 0)),
            deleted_objects=int(raw.get("deleted_objects", 0)),
        )
    except (KeyError, ValueError):
        return None


def _redis_state(info: dict[str, Any] | None) -> RedisState | None:
    if not info or "used_memory" not in info:
        return None
    return RedisState(
        used_memory=int(info["used_memory"]),
        used_memory_human=str(info.get("used_memory_human", "")),
        maxmemory=int(info.get("maxmemory", 0)),
    )
