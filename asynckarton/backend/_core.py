"""The backend's base: connection, binds, task documents, producing, metrics, inspection.

:class:`KartonBackend <asynckarton.backend.KartonBackend>` is built in three layers, one
module each: this one (what every service and user-facing call needs), ``_queues``
(the consumers' and routers' hot paths) and ``_redis`` (the garbage collector's and the
task admin's transactions).

Methods marked with :func:`entry_point` raise Redis failures as ``BackendError`` (see its
docstring for the rule); the others are called only from the services' retry loops.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
from typing import cast

import anyio
import redis.asyncio as aredis

from .._wire._task import Task
from . import _keys as keys
from . import _scripts as scripts
from ._connect import RedisConnector
from ._guard import entry_point, entry_point_iter
from ._records import Bind

__all__ = ["BackendCore"]

#: Keys per MGET / DEL / SCAN step: big enough to amortise round trips, small enough
#: not to block Redis.
CHUNK = 1000


class BackendCore:
    """Connection, binds, task documents, producing, metrics and inspection.

    Args:
        connector: where the clients come from (a real server or the embedded one).
    """

    def __init__(self, connector: RedisConnector) -> None:
        self.connector = connector
        #: The Redis server, as error messages name it (password masked).
        self.address: str = connector.address
        #: Where that address was configured (None when unknown), also for errors.
        self.origin: str | None = getattr(connector, "origin", None)
        self.redis: aredis.Redis = connector.pool()
        self._fetch = self.redis.register_script(scripts.render(scripts.FETCH))
        self._lease = self.redis.register_script(scripts.render(scripts.LEASE))
        self._reclaim = self.redis.register_script(scripts.render(scripts.RECLAIM))
        self._route_pop = self.redis.register_script(scripts.render(scripts.ROUTE_POP))
        self._recover = self.redis.register_script(scripts.render(scripts.RECOVER_ROUTING))
        self._heartbeat = self.redis.register_script(scripts.render(scripts.HEARTBEAT_ROUTER))
        self._release = self.redis.register_script(scripts.render(scripts.RELEASE_DELAYED))
        self._orphan = self.redis.register_script(scripts.render(scripts.REQUEUE_ORPHAN))
        self._publish_many = self.redis.register_script(scripts.render(scripts.PUBLISH_MANY))
        self._extend_lock = self.redis.register_script(scripts.render(scripts.EXTEND_LOCK))
        self._release_lock = self.redis.register_script(scripts.render(scripts.RELEASE_LOCK))

    async def aclose(self) -> None:
        """Close the connector's shared pool."""
        await self.connector.aclose()

    @entry_point("connect")
    async def ping(self, client: aredis.Redis | None = None) -> None:
        """Check that Redis answers, on ``client`` (e.g. a named presence connection).

        A named connection that was dropped reconnects here, with its name.
        """
        await (client or self.redis).ping()

    @staticmethod
    def log_channel(level: str | None, logger: str | None) -> str:
        """Pub/sub channel of a log record of ``level`` from ``logger``, as Karton names it."""
        return keys.log_channel(level, logger)

    async def log_messages(
        self, patterns: Sequence[str], subscribed: Callable[[], None] | None = None
    ) -> AsyncIterator[tuple[str, str, str]]:
        """Subscribe to log channel ``patterns``; yield ``(pattern, channel, data)`` forever.

        ``subscribed`` is called once the subscription is in place.  The subscription is
        closed when the iteration ends (including by cancellation).
        """
        pubsub = self.redis.pubsub(ignore_subscribe_messages=True)
        try:
            await pubsub.psubscribe(*patterns)
            if subscribed is not None:
                subscribed()
            while True:
                message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
                if message is not None and message.get("type") == "pmessage":
                    yield message["pattern"], message["channel"], message["data"]
        finally:
            with anyio.CancelScope(shield=True):
                await pubsub.aclose()  # type: ignore[no-untyped-call]

    # -- binds --------------------------------------------------------------------------

    @entry_point("register a bind")
    async def register_bind(self, bind: Bind) -> Bind | None:
        """Store ``bind`` and return the bind it replaced, if any (one transaction)."""
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.hget(keys.BINDS, bind.identity)
            pipe.hset(keys.BINDS, bind.identity, bind.to_json())
            old, _ = await pipe.execute()
        return Bind.from_json(bind.identity, cast(str, old)) if old else None

    @entry_point("read a bind")
    async def get_bind(self, identity: str, *, client: aredis.Redis | None = None) -> Bind | None:
        """Return the bind registered for ``identity``.

        Args:
            identity: whose bind.
            client: ask on this connection (e.g. a service's named presence connection,
                which the read keeps alive) instead of the shared pool.
        """
        raw = cast(str | None, await (client or self.redis).hget(keys.BINDS, identity))
        return Bind.from_json(identity, raw) if raw else None

    @entry_point("read the binds")
    async def get_binds_raw(self) -> dict[str, str]:
        """Return every bind as identity -> raw JSON (parse lazily, cache by value)."""
        return cast(dict[str, str], await self.redis.hgetall(keys.BINDS))

    @entry_point("remove a bind")
    async def unregister_bind(self, identity: str) -> None:
        """Remove ``identity``'s bind and its queues."""
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.hdel(keys.BINDS, identity)
            pipe.delete(*keys.consumer_queues(identity))
            await pipe.execute()

    @entry_point("list the services online")
    async def online_identities(self) -> dict[str, int]:
        """Count named connections per identity, as Karton's presence check does."""
        counts: Counter[str] = Counter()
        for client in await self.redis.client_list():
            name = client.get("name") or ""
            if name:
                counts[name.split("?", 1)[0]] += 1
        return dict(counts)

    # -- task documents -----------------------------------------------------------------

    @entry_point("read a task")
    async def get_task_body(self, uid: str) -> str | None:
        """Return the raw JSON of task ``uid``."""
        return cast(str | None, await self.redis.get(keys.task_key(uid)))

    async def get_task(self, uid: str) -> Task | None:
        """Return task ``uid`` (resources unbound), or None if it is gone."""
        body = await self.get_task_body(uid)
        return Task.unserialize(body) if body is not None else None

    @entry_point("read tasks")
    async def get_task_bodies(self, uids: Sequence[str]) -> list[str | None]:
        """MGET the bodies of ``uids`` in chunks; missing ones are None."""
        out: list[str | None] = []
        for start in range(0, len(uids), CHUNK):
            chunk = uids[start : start + CHUNK]
            out.extend(
                cast(list[str | None], await self.redis.mget([keys.task_key(u) for u in chunk]))
            )
        return out

    @entry_point_iter("scan the tasks")
    async def scan_tasks(self) -> AsyncIterator[list[tuple[str, str]]]:
        """Yield every task as batches of ``(uid, body)`` (SCAN then MGET, never KEYS).

        A task deleted between the two steps is left out; one written meanwhile may or
        may not be seen (SCAN's guarantee).
        """
        cursor = 0
        while True:
            cursor, found = await self.redis.scan(cursor, match=keys.TASK_PREFIX + "*", count=CHUNK)
            if found:
                bodies = cast(list[str | None], await self.redis.mget(found))
                batch = [
                    (keys.task_uid(key), body)
                    for key, body in zip(cast(list[str], found), bodies, strict=True)
                    if body is not None
                ]
                if batch:
                    yield batch
            if cursor == 0:
                return

    @entry_point("declare tasks")
    async def declare_tasks(self, tasks: Iterable[Task]) -> None:
        """Write whole task documents before their resources are uploaded (a producer)."""
        mapping = {keys.task_key(t.uid): t.serialize_state() for t in tasks}
        if mapping:
            await self.redis.mset(mapping)

    @entry_point("delete tasks")
    async def delete_tasks(self, uids: Sequence[str]) -> None:
        """Delete the documents of tasks ``uids`` (DEL in chunks)."""
        for start in range(0, len(uids), CHUNK):
            await self.redis.delete(*(keys.task_key(u) for u in uids[start : start + CHUNK]))

    @entry_point("send tasks")
    async def enqueue_unrouted(self, bodies: Mapping[str, str], identity: str) -> None:
        """SET task bodies, RPUSH their uids to ``karton.tasks`` and count them produced.

        One transaction: a producer's whole batch costs one round trip, and a refused
        write (``maxmemory`` reached) aborts all of it, so no task key is left without
        its ``karton.tasks`` entry.
        """
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.mset({keys.task_key(uid): body for uid, body in bodies.items()})
            pipe.rpush(keys.TASKS_QUEUE, *bodies)
            pipe.hincrby(keys.metrics_key("produced"), identity, len(bodies))
            await pipe.execute()

    # -- metrics, logs, stats -----------------------------------------------------------

    @entry_point("count metrics")
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

    @entry_point("read the stats")
    async def stats(self) -> dict[str, int]:
        """Return asynckarton's own counters (redelivered, rerouted, invalid...)."""
        raw = cast(dict[str, str], await self.redis.hgetall(keys.STATS))
        return {k: int(v) for k, v in raw.items()}

    @entry_point("read queue lengths")
    async def queue_lengths(self, identity: str) -> dict[str, int]:
        """Return the length of each of ``identity``'s queues."""
        async with self.redis.pipeline(transaction=False) as pipe:
            for queue in keys.consumer_queues(identity):
                pipe.llen(queue)
            lengths = await pipe.execute()
        return dict(zip(keys.consumer_queues(identity), lengths, strict=True))

    @entry_point("count tasks in flight")
    async def count_in_flight(self, identities: Iterable[str]) -> int:
        """Count uids anywhere between producer and handler for ``identities``.

        Unrouted, in a router's journal, in a queue of one of ``identities``, leased by
        one of their consumers, or waiting for a retry.
        """
        routers = cast(list[str], await self.redis.zrange(keys.ROUTERS, 0, -1))
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.llen(keys.TASKS_QUEUE)
            pipe.zcard(keys.DELAYED)
            for router in routers:
                pipe.llen(keys.routing_key(router))
            for identity in identities:
                for queue in keys.consumer_queues(identity):
                    pipe.llen(queue)
                pipe.zcard(keys.leases_key(identity))
            counts = cast(list[int], await pipe.execute())
        return sum(counts)
