"""The hot paths: consumers fetching, leasing and completing; routers routing.

Every method here is called from a service's own loop, which catches the transient Redis
errors and retries (``_guard.TRANSIENT_ERRORS``), so none is wrapped as an entry point:
no per-call translation cost on the paths the benchmarks measure.

Every write here moves existing work towards completion, so each one also runs when
Redis is over ``maxmemory``: a flagged script, or plain commands that fall back to one
(``BackendCore.commit``, see ``_scripts``).  A full Redis stops producers, never the
draining.  The one exception is the router's blocking wait (BLMOVE), which a
full Redis refuses; the router then polls (:meth:`QueueBackend.route_idle`).
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from typing import cast

import anyio
import redis.asyncio as aredis
from redis.exceptions import OutOfMemoryError, ResponseError

from .._wire._task import Task, TaskState
from . import _keys as keys
from . import _scripts as scripts
from ._core import NO_FLAGS, BackendCore
from ._records import Bind, RoutedBatch

__all__ = ["QueueBackend"]

#: Seconds between a router's polls of ``karton.tasks`` while Redis is over ``maxmemory``.
OOM_POLL = 0.25


_ROUTE_TAKE = scripts.render(scripts.ROUTE_TAKE)  # sent by EVAL inside a pipeline

#: What a router's take read: the journal's uids, their bodies (None: the key is gone)
#: and every bind as identity -> raw JSON.
Taken = tuple[list[str], list[str | None], dict[str, str]]


# Scripts sent with EVAL in pipelines (redis-py adds a SCRIPT EXISTS per pipeline with
# EVALSHA); the server caches them by digest.
_HEARTBEAT = scripts.render(scripts.HEARTBEAT_ROUTER)
_UPKEEP_VIEW = scripts.render(scripts.UPKEEP_VIEW)
# The same with the allow-oom flag: it files the concurrency policy (an HSET) when due,
# which a full Redis would refuse, failing the whole upkeep round (leases unrenewed).
_UPKEEP_VIEW_OOM = scripts.render(scripts.UPKEEP_VIEW, allow_oom=True)


def _ms(seconds: float) -> int:
    return int(seconds * 1000)


class QueueBackend(BackendCore):
    """Queue transitions of consumers and routers (see the module docstring)."""

    #: False once BLMOVE answered "nothing" without waiting (fakeredis): see route_idle.
    _blmove_blocks: bool = True

    # -- consumer side ------------------------------------------------------------------

    async def set_tasks(self, tasks: Iterable[Task]) -> None:
        """Write whole task documents (last writer wins, as in Karton): e.g. Started."""
        mapping = {keys.task_key(t.uid): t.serialize_state() for t in tasks}
        if mapping:
            writes = scripts.Writes()
            writes.mset(mapping)
            await self.commit(writes)

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
        self, client: aredis.Redis, identity: str, lease: float, timeout: float, count: int = 1
    ) -> list[tuple[str, str]]:
        """Block (on ``client``'s own connection) until a task arrives, then lease it.

        The lease also pops and leases up to ``count - 1`` more (a burst that came with
        it), so fewer than ``count`` means the queues were empty a moment ago; it runs on
        ``client`` too, idle once the pop returned (no pool checkout).  The
        blocking pop and the lease are two commands: a process killed between them
        leaves the task Spawned in no queue, which the system's orphan sweep requeues.
        """
        popped = await client.blpop(keys.consumer_queues(identity), timeout=timeout)
        if not popped:
            return []
        flat: list[str] = await self._fetch(
            keys=[*keys.consumer_queues(identity), keys.leases_key(identity)],
            args=[max(1, count), _ms(time.time() + lease), cast(str, popped[1])],
            client=client,
        )
        return list(zip(flat[::2], flat[1::2], strict=True))

    async def upkeep_view(
        self,
        identity: str,
        wait: float,
        *,
        client: aredis.Redis | None = None,
        policy: tuple[str, str] | None = None,
    ) -> tuple[Bind | None, float | None, float | None]:
        """After ``wait`` seconds, what a consumer's upkeep needs, in one round trip.

        The wait happens on the server (a BLPOP on a key nobody writes, ahead of the
        reads in one pipeline), so an idle consumer wakes once per round, with fresh
        answers.  Returns the bind registered for ``identity``, the earliest lease
        deadline of ``identity`` and the earliest due time of any scheduled retry
        (seconds since the epoch; None when there is none).

        Args:
            identity: the consumer's identity.
            wait: seconds to wait first (0: none).
            client: run on this client (e.g. the named presence connection, which the
                round keeps in use) instead of the shared pool.
            policy: ``(instance, policy JSON)`` to file in ``asynckarton.policy:<identity>``
                in the same round trip (as ``SlotStore.publish_policy`` does).
        """
        flagged = self.allow_oom
        async with (client or self.redis).pipeline(transaction=False) as pipe:
            if wait > 0:
                pipe.blpop([keys.HOLD], timeout=wait)
            instance, text = policy or ("", "")
            stamped = f"{_ms(time.time())} {text}"  # SlotStore.publish_policy's format
            pipe.eval(
                _UPKEEP_VIEW_OOM if flagged else _UPKEEP_VIEW,
                4,
                keys.BINDS,
                keys.leases_key(identity),
                keys.DELAYED,
                keys.policy_key(identity),
                identity,
                instance,
                stamped,
            )
            replies = await pipe.execute(raise_on_error=False)
        view = replies[-1]  # the wait's own reply does not matter
        if isinstance(view, Exception):
            if flagged and NO_FLAGS in str(view):  # Redis < 7: plain scripts from now on
                self.allow_oom = False
                return await self.upkeep_view(identity, 0.0, client=client, policy=policy)
            raise view
        raw, lease, retry = view
        return (
            self._bind(identity, raw),
            float(lease) / 1000 if lease else None,
            float(retry) / 1000 if retry else None,
        )

    def _bind(self, identity: str, raw: str | None) -> Bind | None:
        """``raw`` parsed, cached per identity (upkeep rounds read the same bind)."""
        if not raw:
            return None
        cache: dict[str, tuple[str, Bind]] = self.__dict__.setdefault("_bind_cache", {})
        cached = cache.get(identity)
        if cached is None or cached[0] != raw:
            cached = cache[identity] = (raw, Bind.from_json(identity, raw))
        return cached[1]

    async def hold(self, client: aredis.Redis, timeout: float) -> None:
        """Wait ``timeout`` seconds on ``client``'s own connection, on the server.

        A BLPOP on a key nobody writes: the connection stays in use (a broken one
        raises at once, and reconnects on the next call) without a client-side timer.
        """
        try:
            await client.blpop([keys.HOLD], timeout=timeout)
        except ResponseError as exc:  # the server turned replica (failover): wait is over
            if not str(exc).startswith("UNBLOCKED"):
                raise

    @staticmethod
    def block_limit(client: aredis.Redis, cap: float) -> float:
        """The longest blocking wait (seconds, at most ``cap``) ``client`` can afford.

        A blocking command's reply is read under the connection's ``socket_timeout``:
        a wait close to it would end in a TimeoutError instead of an empty reply.
        """
        timeout = client.connection_pool.connection_kwargs.get("socket_timeout")
        return cap if not timeout else max(0.1, min(cap, 0.8 * float(timeout)))

    async def connection_id(self, client: aredis.Redis) -> int:
        """The server's id of ``client``'s own connection (for :meth:`unblock`)."""
        return int(await client.client_id())

    async def unblock(self, connection_id: int) -> bool:
        """End a blocking pop on connection ``connection_id`` now, as if it timed out."""
        return bool(await self.redis.client_unblock(connection_id))

    async def drop_leases(self, identity: str, uids: Sequence[str]) -> None:
        """Forget leases (tasks whose body vanished)."""
        if uids:
            await self.redis.zrem(keys.leases_key(identity), *uids)

    async def renew_leases(self, identity: str, uids: Iterable[str], lease: float) -> None:
        """Push back the lease deadline of every task still being processed (one ZADD)."""
        deadline = _ms(time.time() + lease)
        members = [word for uid in uids for word in (deadline, uid)]
        if members:
            writes = scripts.Writes()
            writes.call_chunked(("ZADD", keys.leases_key(identity), "XX"), members, 2)
            await self.commit(writes)

    async def complete(self, identity: str, tasks: Sequence[Task], crashed: int) -> None:
        """Write final states, release leases and count consumed/crashed: one atomic step."""
        writes = scripts.Writes()
        writes.mset({keys.task_key(t.uid): t.serialize_state() for t in tasks})
        writes.call_chunked(("ZREM", keys.leases_key(identity)), [t.uid for t in tasks])
        writes.call("HINCRBY", keys.metrics_key("consumed"), identity, len(tasks))
        if crashed:
            writes.call("HINCRBY", keys.metrics_key("crashed"), identity, crashed)
        await self.commit(writes)

    async def hand_back(self, identity: str, tasks: Sequence[Task]) -> None:
        """Return unfinished tasks to the head of their queue as Spawned (graceful stop)."""
        if not tasks:
            return
        now = time.time()
        writes = scripts.Writes()
        for task in tasks:
            task.status, task.last_update = TaskState.SPAWNED, now
            writes.call("SET", keys.task_key(task.uid), task.serialize())
            writes.call("LPUSH", keys.queue_key(task.priority.value, identity), task.uid)
        writes.call_chunked(("ZREM", keys.leases_key(identity)), [t.uid for t in tasks])
        await self.commit(writes)

    async def schedule_retry(self, identity: str, task: Task, due: float) -> None:
        """Park ``task`` (already updated) until ``due``, releasing its lease."""
        writes = scripts.Writes()
        writes.call("SET", keys.task_key(task.uid), task.serialize())
        writes.call("ZADD", keys.DELAYED, _ms(due), task.uid)
        writes.call(
            "HSET", keys.DELAYED_ROUTES, task.uid, keys.queue_key(task.priority.value, identity)
        )
        writes.call("ZREM", keys.leases_key(identity), task.uid)
        await self.commit(writes)

    async def dead_letter(self, identity: str, uids: Sequence[str]) -> None:
        """Record tasks that used up their retries."""
        if uids:
            writes = scripts.Writes()
            writes.call_chunked(("RPUSH", keys.dead_key(identity)), list(uids))
            await self.commit(writes)

    async def reclaim(self, identity: str, limit: int = 1000) -> int:
        """Requeue tasks of ``identity`` whose lease expired (their consumer died)."""
        moved: int = await self._reclaim(
            keys=[
                keys.leases_key(identity),
                *(keys.queue_key(priority, identity) for priority in keys.PRIORITIES),
                keys.STATS,
            ],
            args=[_ms(time.time()), limit],
        )
        return moved

    async def release_delayed(self, limit: int = 1000) -> int:
        """Move retries that are due into their queues."""
        moved: int = await self._release(
            keys=[keys.DELAYED, keys.DELAYED_ROUTES], args=[_ms(time.time()), limit]
        )
        return moved

    # -- router side --------------------------------------------------------------------

    async def route_pop(self, instance: str, count: int) -> list[str]:
        """Move up to ``count`` unrouted uids into this router's journal and return them."""
        uids: list[str] = await self._route_pop(
            keys=[keys.TASKS_QUEUE, keys.routing_key(instance)], args=[count]
        )
        return uids

    async def route_take(self, instance: str, count: int) -> Taken:
        """Top the journal up to ``count`` uids and read what routing them needs.

        One round trip (the ``ROUTE_TAKE`` script and ``HGETALL karton.binds`` in one
        pipeline) returns the journal's uids, their bodies (None: the key is gone) and
        every bind as identity -> raw JSON.
        """
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.eval(_ROUTE_TAKE, 2, keys.TASKS_QUEUE, keys.routing_key(instance), count)
            pipe.hgetall(keys.BINDS)
            flat, binds = await pipe.execute()
        half = len(flat) // 2
        return flat[:half], flat[half:], binds

    async def _route_wait_blpop(self, client: aredis.Redis, timeout: float) -> bool:
        """Wait with BLPOP and put the uid back at the head of ``karton.tasks``.

        For servers whose BLMOVE does not block.  The uid is out of the queue only
        between the two commands, and the push back is shielded from cancellation.
        """
        popped = await client.blpop([keys.TASKS_QUEUE], timeout=timeout)
        if popped is None:
            return False
        with anyio.CancelScope(shield=True):
            await client.lpush(keys.TASKS_QUEUE, popped[1])
        return True

    async def route_idle(
        self,
        instance: str,
        timeout: float,
        ttl: float,
        *,
        client: aredis.Redis | None = None,
        take: int = 0,
    ) -> tuple[bool, float | None, Taken | None]:
        """An idle router's wait: BLMOVE one uid into the journal, then renew the heartbeat.

        One pipeline (one round trip, one wake-up) on ``client`` (e.g. the system
        service's named connection, which this keeps in use) or the shared pool: the
        heartbeat runs when the wait ends, so its deadline (``timeout + ttl`` from now)
        covers this wait and, with ``ttl`` longer than the next wait, that one.  With
        ``take``, the same pipeline then does :meth:`route_take`'s work for ``take`` uids
        (Redis runs a connection's commands in order, so it reads the journal the
        BLMOVE filled): a task sent to an idle router is read without a round trip of its
        own.  Returns whether a uid was moved, the earliest heartbeat deadline of another
        router (seconds since the epoch) or None, and what the take read (None: no take
        ran, call :meth:`route_take`).  Cancelling the call drops the connection: uids it
        moved stay in the journal.  On fakeredis (its BLMOVE does not block) the wait is
        :meth:`_route_wait_blpop`'s; over ``maxmemory`` (BLMOVE refused) it sleeps
        ``OOM_POLL`` and polls with :meth:`route_take` (with ``take``; which a full Redis
        runs: see ``ROUTE_TAKE``).
        """
        if not self._blmove_blocks:
            arrived = await self._route_wait_blpop(client or self.redis, timeout)
            return arrived, await self.heartbeat_router(instance, ttl, client=client), None
        started = time.monotonic()
        deadline = _ms(time.time() + timeout + ttl)
        try:
            moved, earliest, taken = await self._route_idle_round(
                instance, timeout, deadline, client, take
            )
        except OutOfMemoryError:  # BLMOVE (and the plain heartbeat) refused: poll
            await anyio.sleep(min(timeout, OOM_POLL))
            earliest_s = await self.heartbeat_router(instance, ttl, client=client)
            return False, earliest_s, await self.route_take(instance, take) if take else None
        if moved is None and time.monotonic() - started < timeout / 2:
            # The server answered "nothing" without waiting: fakeredis (the embedded
            # default, also when served over TCP) does not block on BLMOVE.  Waiting on
            # BLPOP from now on keeps an idle router from spinning.
            self._blmove_blocks = False
        return moved is not None, float(earliest) / 1000 if earliest else None, taken

    async def _route_idle_round(
        self,
        instance: str,
        timeout: float,
        deadline: int,
        client: aredis.Redis | None,
        take: int,
    ) -> tuple[str | None, int | None, Taken | None]:
        journal = keys.routing_key(instance)
        async with (client or self.redis).pipeline(transaction=False) as pipe:
            pipe.blmove(
                keys.TASKS_QUEUE,
                journal,
                timeout,  # type: ignore[arg-type]  # Redis takes fractional seconds
                "LEFT",
                "RIGHT",
            )  # EVAL, not EVALSHA: a script in a pipeline costs an extra SCRIPT EXISTS
            pipe.eval(_HEARTBEAT, 1, keys.ROUTERS, instance, deadline)
            if take:
                pipe.eval(_ROUTE_TAKE, 2, keys.TASKS_QUEUE, journal, take)
                pipe.hgetall(keys.BINDS)
            replies = await pipe.execute()
        if not take:
            return replies[0], replies[1], None
        moved, earliest, flat, binds = replies
        half = len(flat) // 2
        return moved, earliest, (flat[:half], flat[half:], binds)

    async def journal(self, instance: str) -> list[str]:
        """Return the uids in this router's journal (a batch taken but not committed)."""
        return cast(list[str], await self.redis.lrange(keys.routing_key(instance), 0, -1))

    async def route_commit(self, instance: str, batch: RoutedBatch, tracking_ttl: int) -> None:
        """Apply a routed batch atomically and clear the journal (:meth:`commit`).

        One MULTI/EXEC, or one ``allow-oom`` script when Redis is over ``maxmemory``.  A
        router killed before it leaves the journal intact, so the batch is routed again
        by whoever recovers it; after it nothing is left to repeat.  The
        concurrency-control scripts of ``batch.scripts`` run inside the same step.
        """
        writes = scripts.Writes()
        if batch.bodies:
            writes.mset(batch.bodies)
        for queue, uids in batch.queues.items():
            writes.call_chunked(("RPUSH", queue), uids)
        for identity, count in batch.assigned.items():
            writes.call("HINCRBY", keys.metrics_key("assigned"), identity, count)
        for origin, members in batch.outputs.items():
            writes.call_chunked(("SADD", keys.outputs_key(origin)), list(members))
            writes.call("EXPIRE", keys.outputs_key(origin), tracking_ttl)
        if batch.logs:
            args = [part for record in batch.logs for part in record]
            writes.script(scripts.PUBLISH_MANY, [], args)
        for script, script_keys, script_args in batch.scripts:  # concurrency control
            writes.script(script, script_keys, script_args)
        if batch.invalid:
            writes.call_chunked(("RPUSH", keys.INVALID), batch.invalid)
            writes.call("HINCRBY", keys.STATS, "invalid", len(batch.invalid))
        writes.call("DEL", keys.routing_key(instance))
        await self.commit(writes)

    async def heartbeat_router(
        self, instance: str, ttl: float, *, client: aredis.Redis | None = None
    ) -> float | None:
        """Tell other routers this instance (and its journal) is alive for ``ttl`` s.

        Returns the earliest heartbeat deadline of another router (seconds since the
        epoch), or None.  One script call, so ``client`` may be a single-connection
        client (the router's blocking one, which an idle router uses anyway).
        """
        earliest = await self._heartbeat(
            keys=[keys.ROUTERS], args=[instance, _ms(time.time() + ttl)], client=client
        )
        return float(earliest) / 1000 if earliest else None

    async def forget_router(self, instance: str) -> None:
        """Deregister a router that stopped cleanly (its journal is empty)."""
        await self.redis.zrem(keys.ROUTERS, instance)

    async def recover_routing(self) -> int:
        """Give batches of dead routers back to ``karton.tasks``; return how many uids."""
        moved: int = await self._recover(
            keys=[keys.ROUTERS, keys.TASKS_QUEUE, keys.STATS], args=[_ms(time.time())]
        )
        return moved

    async def quarantine(self, uids: Sequence[str]) -> None:
        """Keep uids whose body could not be parsed, for an operator to inspect."""
        if uids:
            writes = scripts.Writes()
            writes.call_chunked(("RPUSH", keys.INVALID), list(uids))
            writes.call("HINCRBY", keys.STATS, "invalid", len(uids))
            await self.commit(writes)
