"""KartonBackend: every Redis read and write asynckarton makes, on ``redis.asyncio``.

The hot paths are batched: producers write a batch of tasks in one pipeline, consumers
fetch and lease a batch in one script call and complete a batch in one pipeline, and the
router commits a whole routed batch in one MULTI/EXEC.  Karton's keys keep their exact
meaning; leases, router journals and retry schedules live under ``asynckarton.``.
"""

from __future__ import annotations

import json
import logging
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar, cast

import anyio
import redis.asyncio as aredis
import redis.exceptions

from .._wire._task import Task, TaskState
from . import _keys as keys
from . import _scripts as scripts
from ._connect import RedisConnector

__all__ = ["TRANSIENT_ERRORS", "Bind", "KartonBackend", "RoutedBatch", "until_done"]

#: Errors after which a Redis call may succeed if retried (server restarting, network).
TRANSIENT_ERRORS: tuple[type[BaseException], ...] = (
    redis.exceptions.ConnectionError,
    redis.exceptions.TimeoutError,
    redis.exceptions.BusyLoadingError,
    redis.exceptions.TryAgainError,
    redis.exceptions.ReadOnlyError,
    OSError,
)

T = TypeVar("T")

#: The Karton wire protocol version asynckarton speaks; written as a bind's ``version``.
KARTON_PROTOCOL_VERSION = "5.9.1"


async def until_done(
    call: Callable[[], Awaitable[T]], *, log: logging.Logger, what: str, max_delay: float = 10.0
) -> T:
    """Run ``call`` until Redis accepts it, backing off on transient errors.

    For writes that must not be dropped (a task's final state, a retry schedule): the
    caller holds the task's lease meanwhile, so waiting here never loses anything.
    """
    delay = 0.2
    while True:
        try:
            return await call()
        except TRANSIENT_ERRORS as exc:
            log.warning("Redis unavailable to %s (%s); retrying in %.1fs", what, exc, delay)
            await anyio.sleep(delay)
            delay = min(delay * 2, max_delay)


def _ms(seconds: float) -> int:
    return int(seconds * 1000)


@dataclass(frozen=True, slots=True, kw_only=True)
class Bind:
    """A consumer's registration in ``karton.binds`` (Karton's KartonBind)."""

    identity: str
    filters: list[dict[str, Any]]
    info: str | None = None
    version: str = KARTON_PROTOCOL_VERSION
    persistent: bool = True
    service_version: str | None = None
    is_async: bool = True

    def to_json(self) -> str:
        """Serialise exactly as karton-core does (sorted keys, default separators)."""
        return json.dumps(
            {
                "filters": self.filters,
                "info": self.info,
                "version": self.version,
                "persistent": self.persistent,
                "service_version": self.service_version,
                "is_async": self.is_async,
            },
            sort_keys=True,
        )

    @classmethod
    def from_json(cls, identity: str, raw: str) -> Bind:
        """Parse a bind value, including Karton 2.x's bare filter list."""
        doc = json.loads(raw)
        if isinstance(doc, list):
            return cls(
                identity=identity,
                filters=doc,
                version="2.x.x",
                persistent=not identity.endswith(".test"),
                is_async=False,
            )
        if not isinstance(doc, dict):
            raise ValueError(f"bind of {identity!r} is a JSON {type(doc).__name__}")
        return cls(
            identity=identity,
            filters=doc["filters"],
            info=doc.get("info"),
            version=doc.get("version", "unknown"),
            persistent=bool(doc.get("persistent", True)),
            service_version=doc.get("service_version"),
            is_async=bool(doc.get("is_async", False)),
        )


@dataclass(slots=True)
class RoutedBatch:
    """Everything one routing round writes, committed in a single MULTI/EXEC."""

    bodies: dict[str, str] = field(default_factory=dict)  # task key -> JSON (forks + originals)
    queues: dict[str, list[str]] = field(default_factory=dict)  # queue key -> uids
    assigned: Counter[str] = field(default_factory=Counter)  # identity -> copies
    outputs: dict[str, set[str]] = field(default_factory=dict)  # origin -> headers JSON
    logs: list[tuple[str, str]] = field(default_factory=list)  # channel, record JSON
    invalid: list[str] = field(default_factory=list)  # uids with unreadable bodies
    # concurrency control: (script, keys, args) evaluated inside the commit's MULTI/EXEC
    scripts: list[tuple[str, list[str], list[Any]]] = field(default_factory=list)

    def add_fork(self, uid: str, body: str, priority: str, identity: str) -> None:
        """Queue the fork ``uid`` (JSON ``body``, already Spawned) for ``identity``."""
        self.bodies[keys.task_key(uid)] = body
        self.queues.setdefault(keys.queue_key(priority, identity), []).append(uid)
        self.assigned[identity] += 1


class KartonBackend:
    """Redis access for producers, consumers and the system service.

    Args:
        connector: where the clients come from (a real server or the embedded one).
    """

    def __init__(self, connector: RedisConnector) -> None:
        self.connector = connector
        self.redis: aredis.Redis = connector.pool()
        self._fetch = self.redis.register_script(scripts.FETCH)
        self._lease = self.redis.register_script(scripts.LEASE)
        self._reclaim = self.redis.register_script(scripts.RECLAIM)
        self._route_pop = self.redis.register_script(scripts.ROUTE_POP)
        self._recover = self.redis.register_script(scripts.RECOVER_ROUTING)
        self._release = self.redis.register_script(scripts.RELEASE_DELAYED)
        self._orphan = self.redis.register_script(scripts.REQUEUE_ORPHAN)
        self._publish_many = self.redis.register_script(scripts.PUBLISH_MANY)

    async def aclose(self) -> None:
        """Close the connector's shared pool."""
        await self.connector.aclose()

    # -- binds --------------------------------------------------------------------------

    async def register_bind(self, bind: Bind) -> Bind | None:
        """Store ``bind`` and return the bind it replaced, if any (one transaction)."""
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.hget(keys.BINDS, bind.identity)
            pipe.hset(keys.BINDS, bind.identity, bind.to_json())
            old, _ = await pipe.execute()
        return Bind.from_json(bind.identity, cast(str, old)) if old else None

    async def get_bind(self, identity: str) -> Bind | None:
        """Return the bind registered for ``identity``."""
        raw = cast(str | None, await self.redis.hget(keys.BINDS, identity))
        return Bind.from_json(identity, raw) if raw else None

    async def get_binds_raw(self) -> dict[str, str]:
        """Return every bind as identity -> raw JSON (parse lazily, cache by value)."""
        return cast(dict[str, str], await self.redis.hgetall(keys.BINDS))

    async def unregister_bind(self, identity: str) -> None:
        """Remove ``identity``'s bind and its queues."""
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.hdel(keys.BINDS, identity)
            pipe.delete(*keys.consumer_queues(identity))
            await pipe.execute()

    async def online_identities(self) -> dict[str, int]:
        """Count named connections per identity, as Karton's presence check does."""
        counts: Counter[str] = Counter()
        for client in await self.redis.client_list():
            name = client.get("name") or ""
            if name:
                counts[name.split("?", 1)[0]] += 1
        return dict(counts)

    # -- tasks --------------------------------------------------------------------------

    async def get_task_body(self, uid: str) -> str | None:
        """Return the raw JSON of task ``uid``."""
        return cast(str | None, await self.redis.get(keys.task_key(uid)))

    async def get_task(self, uid: str) -> Task | None:
        """Return task ``uid`` (resources unbound), or None if it is gone."""
        body = await self.get_task_body(uid)
        return Task.unserialize(body) if body is not None else None

    async def get_task_bodies(self, uids: Sequence[str]) -> list[str | None]:
        """MGET the bodies of ``uids`` in chunks; missing ones are None."""
        out: list[str | None] = []
        for start in range(0, len(uids), 1000):
            chunk = uids[start : start + 1000]
            out.extend(
                cast(list[str | None], await self.redis.mget([keys.task_key(u) for u in chunk]))
            )
        return out

    async def scan_task_keys(self, match: str = keys.TASK_PREFIX + "*") -> AsyncIterator[list[str]]:
        """Yield task keys in batches (SCAN, never KEYS)."""
        cursor = 0
        while True:
            cursor, found = await self.redis.scan(cursor, match=match, count=1000)
            if found:
                yield cast(list[str], found)
            if cursor == 0:
                return

    async def set_tasks(self, tasks: Iterable[Task]) -> None:
        """Write whole task documents (last writer wins, as in Karton)."""
        mapping = {keys.task_key(t.uid): t.serialize_state() for t in tasks}
        if mapping:
            await self.redis.mset(mapping)

    async def delete_task_keys(self, task_keys: Sequence[str]) -> None:
        """Delete task keys in chunks of 1000."""
        for start in range(0, len(task_keys), 1000):
            await self.redis.delete(*task_keys[start : start + 1000])

    async def enqueue_unrouted(self, bodies: Mapping[str, str], identity: str) -> None:
        """SET task bodies, RPUSH their uids to ``karton.tasks`` and count them produced.

        One pipeline: a producer's whole batch costs one round trip.
        """
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.mset({keys.task_key(uid): body for uid, body in bodies.items()})
            pipe.rpush(keys.TASKS_QUEUE, *bodies)
            pipe.hincrby(keys.metrics_key("produced"), identity, len(bodies))
            await pipe.execute()

    # -- consumer side ------------------------------------------------------------------

    async def fetch(self, identity: str, count: int, lease: float) -> list[tuple[str, str]]:
        """Pop and lease up to ``count`` tasks for ``identity`` without blocking.

        Returns ``(uid, body)`` pairs; ``body`` is ``""`` when the task key is gone.
        """
        deadline = _ms(time.time() + lease)
        flat: list[str] = await self._fetch(
            keys=[*keys.consumer_queues(identity), keys.leases_key(identity)],
            args=[count, deadline],
        )
        return list(zip(flat[::2], flat[1::2], strict=True))

    async def wait_fetch(
        self, client: aredis.Redis, identity: str, lease: float, timeout: float
    ) -> list[tuple[str, str]]:
        """Block (on ``client``'s own connection) until a task arrives, then lease it.

        The blocking pop and the lease are two commands: a process killed between them
        leaves the task Spawned in no queue, which the system's orphan sweep requeues.
        """
        popped = await client.blpop(keys.consumer_queues(identity), timeout=timeout)
        if not popped:
            return []
        uid = cast(str, popped[1])
        bodies: list[str] = await self._lease(
            keys=[keys.leases_key(identity)], args=[_ms(time.time() + lease), uid]
        )
        return [(uid, bodies[0])]

    async def drop_leases(self, identity: str, uids: Sequence[str]) -> None:
        """Forget leases (tasks whose body vanished)."""
        if uids:
            await self.redis.zrem(keys.leases_key(identity), *uids)

    async def renew_leases(self, identity: str, uids: Iterable[str], lease: float) -> None:
        """Push back the lease deadline of every task still being processed (one ZADD)."""
        deadline = _ms(time.time() + lease)
        mapping = dict.fromkeys(uids, deadline)
        if mapping:
            await self.redis.zadd(keys.leases_key(identity), mapping, xx=True)

    async def complete(self, identity: str, tasks: Sequence[Task], crashed: int) -> None:
        """Write final states, release leases and count consumed/crashed: one pipeline."""
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.mset({keys.task_key(t.uid): t.serialize_state() for t in tasks})
            pipe.zrem(keys.leases_key(identity), *(t.uid for t in tasks))
            pipe.hincrby(keys.metrics_key("consumed"), identity, len(tasks))
            if crashed:
                pipe.hincrby(keys.metrics_key("crashed"), identity, crashed)
            await pipe.execute()

    async def hand_back(self, identity: str, tasks: Sequence[Task]) -> None:
        """Return unfinished tasks to the head of their queue as Spawned (graceful stop)."""
        if not tasks:
            return
        now = time.time()
        async with self.redis.pipeline(transaction=True) as pipe:
            for task in tasks:
                task.status, task.last_update = TaskState.SPAWNED, now
                pipe.set(keys.task_key(task.uid), task.serialize())
                pipe.lpush(keys.queue_key(task.priority.value, identity), task.uid)
            pipe.zrem(keys.leases_key(identity), *(t.uid for t in tasks))
            await pipe.execute()

    async def schedule_retry(self, identity: str, task: Task, due: float) -> None:
        """Park ``task`` (already updated) until ``due``, releasing its lease."""
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.set(keys.task_key(task.uid), task.serialize())
            pipe.zadd(keys.DELAYED, {task.uid: _ms(due)})
            pipe.hset(keys.DELAYED_ROUTES, task.uid, keys.queue_key(task.priority.value, identity))
            pipe.zrem(keys.leases_key(identity), task.uid)
            await pipe.execute()

    async def dead_letter(self, identity: str, uids: Sequence[str]) -> None:
        """Record tasks that used up their retries."""
        if uids:
            await self.redis.rpush(keys.dead_key(identity), *uids)

    async def reclaim(self, identity: str, limit: int = 1000) -> int:
        """Requeue tasks of ``identity`` whose lease expired (their consumer died)."""
        moved: int = await self._reclaim(
            keys=[keys.leases_key(identity)], args=[_ms(time.time()), identity, limit]
        )
        return moved

    async def release_delayed(self, limit: int = 1000) -> int:
        """Move retries that are due into their queues."""
        moved: int = await self._release(
            keys=[keys.DELAYED, keys.DELAYED_ROUTES], args=[_ms(time.time()), limit]
        )
        return moved

    async def requeue_orphan(self, task: Task, body: str) -> bool:
        """Requeue a Spawned task found in no queue, lease or schedule (see the script).

        ``body`` is the JSON the caller judged; nothing happens if the task changed since.
        """
        receiver = task.receiver
        if receiver is None:
            return False
        done: int = await self._orphan(
            keys=[], args=[task.uid, receiver, task.priority.value, body]
        )
        return bool(done)

    # -- router side --------------------------------------------------------------------

    async def route_pop(self, instance: str, count: int) -> list[str]:
        """Move up to ``count`` unrouted uids into this router's journal and return them."""
        uids: list[str] = await self._route_pop(
            keys=[keys.TASKS_QUEUE, keys.routing_key(instance)], args=[count]
        )
        return uids

    async def route_wait(self, client: aredis.Redis, instance: str, timeout: float) -> bool:
        """Block until one unrouted uid was moved into the journal (BLMOVE)."""
        moved = await client.blmove(
            keys.TASKS_QUEUE,
            keys.routing_key(instance),
            timeout,  # type: ignore[arg-type]  # Redis takes fractional seconds
            "LEFT",
            "RIGHT",
        )
        return moved is not None

    async def journal(self, instance: str) -> list[str]:
        """Return the uids in this router's journal (a batch taken but not committed)."""
        return cast(list[str], await self.redis.lrange(keys.routing_key(instance), 0, -1))

    async def route_commit(self, instance: str, batch: RoutedBatch, tracking_ttl: int) -> None:
        """Apply a routed batch atomically and clear the journal (MULTI/EXEC).

        A router killed before EXEC leaves the journal intact, so the batch is routed
        again by whoever recovers it; after EXEC nothing is left to repeat.
        """
        async with self.redis.pipeline(transaction=True) as pipe:
            if batch.bodies:
                pipe.mset(batch.bodies)
            for queue, uids in batch.queues.items():
                pipe.rpush(queue, *uids)
            for identity, count in batch.assigned.items():
                pipe.hincrby(keys.metrics_key("assigned"), identity, count)
            for origin, members in batch.outputs.items():
                pipe.sadd(keys.outputs_key(origin), *members)
                pipe.expire(keys.outputs_key(origin), tracking_ttl)
            if batch.logs:  # one command for the batch's records (PUBLISH each, in Lua)
                args = [part for record in batch.logs for part in record]
                pipe.eval(scripts.PUBLISH_MANY, 0, *args)
            for script, script_keys, script_args in batch.scripts:  # concurrency control
                pipe.eval(script, len(script_keys), *script_keys, *script_args)
            if batch.invalid:
                pipe.rpush(keys.INVALID, *batch.invalid)
                pipe.hincrby(keys.STATS, "invalid", len(batch.invalid))
            pipe.delete(keys.routing_key(instance))
            await pipe.execute()

    async def heartbeat_router(self, instance: str, ttl: float) -> None:
        """Tell other routers this instance (and its journal) is alive for ``ttl`` s."""
        await self.redis.zadd(keys.ROUTERS, {instance: _ms(time.time() + ttl)})

    async def forget_router(self, instance: str) -> None:
        """Deregister a router that stopped cleanly (its journal is empty)."""
        await self.redis.zrem(keys.ROUTERS, instance)

    async def recover_routing(self) -> int:
        """Give batches of dead routers back to ``karton.tasks``; return how many uids."""
        moved: int = await self._recover(
            keys=[keys.ROUTERS, keys.TASKS_QUEUE], args=[_ms(time.time())]
        )
        return moved

    async def quarantine(self, uids: Sequence[str]) -> None:
        """Keep uids whose body could not be parsed, for an operator to inspect."""
        if uids:
            async with self.redis.pipeline(transaction=False) as pipe:
                pipe.rpush(keys.INVALID, *uids)
                pipe.hincrby(keys.STATS, "invalid", len(uids))
                await pipe.execute()

    # -- metrics, logs, stats -----------------------------------------------------------

    async def increment_metrics(self, metric: str, counts: Mapping[str, int]) -> None:
        """HINCRBY ``karton.metrics.<metric>`` for each identity (one pipeline)."""
        if not counts:
            return
        async with self.redis.pipeline(transaction=False) as pipe:
            for identity, count in counts.items():
                pipe.hincrby(keys.metrics_key(metric), identity, count)
            await pipe.execute()

    async def publish_logs(self, records: Sequence[tuple[str, str]]) -> int:
        """PUBLISH log records (one script call); return how many reached a subscriber."""
        if not records:
            return 0
        args = [part for record in records for part in record]
        unheard: int = await self._publish_many(keys=[], args=args)
        return len(records) - unheard

    async def stats(self) -> dict[str, int]:
        """Return asynckarton's own counters (redelivered, rerouted, invalid...)."""
        raw = cast(dict[str, str], await self.redis.hgetall(keys.STATS))
        return {k: int(v) for k, v in raw.items()}

    async def queue_lengths(self, identity: str) -> dict[str, int]:
        """Return the length of each of ``identity``'s queues."""
        async with self.redis.pipeline(transaction=False) as pipe:
            for queue in keys.consumer_queues(identity):
                pipe.llen(queue)
            lengths = await pipe.execute()
        return dict(zip(keys.consumer_queues(identity), lengths, strict=True))
