"""The backend's base: connection, binds, task documents, producing, metrics, inspection.

:class:`KartonBackend <asynckarton.backend.KartonBackend>` is built in three layers, one
module each: this one (what every service and user-facing call needs), ``_queues``
(the consumers' and routers' hot paths) and ``_redis`` (the garbage collector's and the
task admin's transactions).

Methods marked with :func:`entry_point` raise Redis failures as ``BackendError`` (see its
docstring for the rule); the others are called only from the services' retry loops.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
from typing import Any, cast

import anyio
import redis.asyncio as aredis
from redis.commands.core import AsyncScript
from redis.exceptions import OutOfMemoryError, ResponseError

from .._wire._task import Task
from . import _keys as keys
from . import _scripts as scripts
from ._connect import EmbeddedConnector, RedisConnector
from ._guard import entry_point, entry_point_iter
from ._records import Bind

__all__ = ["BackendCore", "Script"]

#: Keys per MGET / DEL / SCAN step: big enough to amortise round trips, small enough
#: not to block Redis.
CHUNK = 1000
#: Uids per LRANGE when a list is searched for members (see ``unrouted_among``).
LIST_SLICE = 10_000


def _now_ms() -> int:
    return int(time.time() * 1000)


class Script:
    """A Lua script that carries the ``allow-oom`` flag while the server understands it.

    Redis before 7.0 (and fakeredis) cannot parse the flag line: the first script that
    fails to load for that reason (nothing ran) turns the flag off for the whole backend
    and runs its plain text instead.  ``source`` is a template for
    :func:`~asynckarton.backend._scripts.render`, or the sub-scripts of an ``APPLY``
    (:func:`~asynckarton.backend._scripts.compose`).
    """

    __slots__ = ("_backend", "_flagged", "_plain", "_source")

    def __init__(self, backend: BackendCore, source: str | tuple[str, ...]) -> None:
        self._backend = backend
        self._source = source
        self._flagged: AsyncScript | None = None
        self._plain: AsyncScript | None = None

    def _registered(self, flagged: bool) -> AsyncScript:
        script = self._flagged if flagged else self._plain
        if script is None:
            source = self._source
            if isinstance(source, str):
                text = scripts.render(source, allow_oom=flagged)
            else:
                text = scripts.compose(source, allow_oom=flagged)
            script = self._backend.redis.register_script(text)
            if flagged:
                self._flagged = script
            else:
                self._plain = script
        return script

    async def __call__(
        self,
        keys: Sequence[str] = (),
        args: Sequence[Any] = (),
        client: aredis.Redis | None = None,
    ) -> Any:
        """Run the script (EVALSHA, loading it first if the server lost it).

        On ``client`` when given (e.g. a service's named connection), else the pool.
        """
        backend = self._backend
        if backend.allow_oom:
            try:
                return await self._registered(True)(keys=keys, args=args, client=client)
            except ResponseError as exc:
                if NO_FLAGS not in str(exc):
                    raise
                backend.allow_oom = False  # Redis < 7: plain scripts, as before 7.0
        return await self._registered(False)(keys=keys, args=args, client=client)


#: How a server without script flags refuses the ``#!lua`` line (Redis 6, fakeredis).
NO_FLAGS = "unexpected symbol near '#'"


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
        #: Whether scripts carry ``allow-oom``: a real server, until one cannot parse it
        #: (Redis < 7; see :class:`Script`).  fakeredis cannot: never for embedded.
        self.allow_oom: bool = not isinstance(connector, EmbeddedConnector)
        self._applies: dict[tuple[str, ...], Script] = {}
        self._fetch = self._script(scripts.FETCH)
        self._reclaim = self._script(scripts.RECLAIM)
        self._route_pop = self._script(scripts.ROUTE_POP)
        self._recover = self._script(scripts.RECOVER_ROUTING)
        self._heartbeat = self._script(scripts.HEARTBEAT_ROUTER)
        self._release = self._script(scripts.RELEASE_DELAYED)
        self._orphan = self._script(scripts.REQUEUE_ORPHAN)
        self._publish_many = self._script(scripts.PUBLISH_MANY)
        self._extend_lock = self._script(scripts.EXTEND_LOCK)
        self._release_lock = self._script(scripts.RELEASE_LOCK)

    def _script(self, template: str) -> Script:
        """Register ``template``, rendered to run even when Redis is over ``maxmemory``."""
        return Script(self, template)

    async def commit(self, writes: scripts.Writes) -> None:
        """Run ``writes`` atomically, even when Redis is over ``maxmemory``.

        As plain commands first (one command, or one MULTI/EXEC): what they cost before
        Redis had to refuse anything.  A full Redis refuses them whole (a refused command
        inside a MULTI aborts the EXEC), and they then run as one ``allow-oom`` script
        (:meth:`apply`).  For the paths that move existing work towards completion only;
        producers keep plain commands, which a full Redis refuses.

        Raises:
            redis.exceptions.ResponseError: an entry failed (the others were applied, as
                in a MULTI/EXEC).
        """
        ops = writes.ops
        try:
            if len(ops) == 1 and ops[0][0] is not None:
                await self.redis.execute_command(*ops[0])  # type: ignore[no-untyped-call]
            elif ops:
                async with self.redis.pipeline(transaction=True) as pipe:
                    for op in ops:
                        if op[0] is None:
                            _, body, script_keys, script_args = op
                            pipe.eval(body, len(script_keys), *script_keys, *script_args)
                        else:
                            pipe.execute_command(*op)
                    await pipe.execute()
        except OutOfMemoryError:
            await self.apply(writes)

    async def apply(self, writes: scripts.Writes) -> list[Any]:
        """Run ``writes`` as one atomic script that Redis accepts over ``maxmemory``.

        Returns one reply per entry.

        Raises:
            redis.exceptions.ResponseError: the first entry that failed (the others
                were applied, as in a MULTI/EXEC).
        """
        if not writes:
            return []
        subscripts = tuple(writes.subscripts)
        script = self._applies.get(subscripts)
        if script is None:
            script = self._applies[subscripts] = Script(self, subscripts)
        replies = cast(list[Any], await script(args=writes.flat(subscripts)))
        for reply in replies:
            if isinstance(reply, ResponseError):
                raise reply
        return replies

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
        """Store ``bind`` and return the bind it replaced, if any (one atomic step).

        Accepted over ``maxmemory``: a consumer must register to drain its queue.
        """
        writes = scripts.Writes()
        writes.call("HGET", keys.BINDS, bind.identity)
        writes.call("HSET", keys.BINDS, bind.identity, bind.to_json())
        old, _ = await self.apply(writes)
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
        """Remove ``identity``'s bind and its queues (also over ``maxmemory``: the GC)."""
        writes = scripts.Writes()
        writes.call("HDEL", keys.BINDS, identity)
        writes.call("DEL", *keys.consumer_queues(identity))
        await self.commit(writes)

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
    async def scan_tasks(
        self, *, busy_share: float | None = None
    ) -> AsyncIterator[list[tuple[str, str]]]:
        """Yield every task as batches of ``(uid, body)`` (SCAN then MGET, never KEYS).

        A task deleted between the two steps is left out; one written meanwhile may or
        may not be seen (SCAN's guarantee).  At most :data:`CHUNK` bodies are held at
        once, whatever the number of tasks.

        Args:
            busy_share: when set (0 < share <= 1), the scan gives way to routing: while
                ``karton.tasks`` has a backlog and a router is alive, it sleeps after
                each batch so that fetching the batch and the caller's work on it take
                at most this share of the wall time.  The routers (in this event loop
                or on this Redis) keep the rest.
        """
        cursor = 0
        while True:
            began = anyio.current_time()
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
            if busy_share is not None and 0 < busy_share < 1 and await self.routing_backlog():
                spent = anyio.current_time() - began
                await anyio.sleep(min(spent * (1 / busy_share - 1), 5.0))

    @entry_point("read the routing backlog")
    async def routing_backlog(self) -> int:
        """Unrouted tasks waiting while a router is alive (0 when no router is alive).

        Two O(1)/O(log n) commands: what a long scan checks to decide whether to pace
        itself.
        """
        now_ms = _now_ms()
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.llen(keys.TASKS_QUEUE)
            pipe.zcount(keys.ROUTERS, now_ms, "+inf")
            unrouted, alive = await pipe.execute()
        return int(unrouted) if int(alive) else 0

    @entry_point("look for tasks waiting to be routed")
    async def unrouted_among(self, uids: Iterable[str]) -> set[str]:
        """Which of ``uids`` wait in ``karton.tasks`` or in a router's journal.

        Reads the lists in slices of :data:`LIST_SLICE` (memory bounded by ``uids``, not
        by the backlog): O(unrouted) Redis work, once per GC pass.
        """
        wanted = set(uids)
        if not wanted:
            return set()
        routers = cast(list[str], await self.redis.zrange(keys.ROUTERS, 0, -1))
        return await self._members_of(
            [keys.TASKS_QUEUE, *(keys.routing_key(r) for r in routers)], wanted
        )

    @entry_point("look for queued tasks")
    async def queued_among(self, identity: str, uids: Iterable[str]) -> set[str]:
        """Which of ``uids`` wait in one of ``identity``'s queues (read in slices)."""
        wanted = set(uids)
        if not wanted:
            return set()
        return await self._members_of(keys.consumer_queues(identity), wanted)

    async def _members_of(self, lists: Sequence[str], wanted: set[str]) -> set[str]:
        """Members of ``wanted`` found in ``lists``, each read tail first in slices.

        Producers and routers push at the tail and consumers and routers pop at the head,
        so negative indices never skip an element that stays in the list while it is
        read (a push only makes a slice seen twice).
        """
        found: set[str] = set()
        for name in lists:
            end = -1
            while True:
                chunk = cast(list[str], await self.redis.lrange(name, end - LIST_SLICE + 1, end))
                found.update(wanted.intersection(chunk))
                if len(chunk) < LIST_SLICE or found >= wanted:
                    break
                end -= LIST_SLICE
        return found

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
        """HINCRBY ``karton.metrics.<metric>`` for each identity (one transaction)."""
        if not counts:
            return
        writes = scripts.Writes()
        for identity, count in counts.items():
            writes.call("HINCRBY", keys.metrics_key(metric), identity, count)
        await self.commit(writes)

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
