"""KartonBackend: every Redis read and write asynckarton makes, on ``redis.asyncio``.

The class is assembled in three layers, one concept per module:

* ``_core.BackendCore``: the connection, binds, task documents, producing, metrics and
  inspection;
* ``_queues.QueueBackend``: the hot paths, batched: producers write a batch of tasks in
  one transaction, consumers fetch and lease a batch in one script call and complete a
  batch in one transaction, and the router commits a whole routed batch in one
  transaction (all of them but the producers' also run over ``maxmemory``, see
  ``_scripts``);
* this module: maintenance, i.e. the garbage collector's lock and checks and the task
  admin's optimistic transactions.

Karton's keys keep their exact meaning; leases, router journals and retry schedules live
under ``asynckarton.`` (``_keys``).  Nothing outside ``backend/`` talks to Redis or spells
a key name.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import cast

from redis.exceptions import WatchError

from .._errors import InvalidTaskError
from .._wire._task import Task, TaskState
from . import _keys as keys
from . import _scripts as scripts
from ._guard import entry_point
from ._queues import QueueBackend
from ._records import TaskRewrite

__all__ = ["KartonBackend"]

#: A plan: given the watched tasks' bodies (None = gone), say what to write.
Plan = Callable[[Sequence[str | None]], TaskRewrite]


class KartonBackend(QueueBackend):
    """Redis access for producers, consumers, the system service and operators.

    Args:
        connector: where the clients come from (a real server or the embedded one).

    Raises:
        BackendError: from the methods users reach (see ``asynckarton._errors``), when
            Redis refuses or cannot be reached.
    """

    # -- garbage collector --------------------------------------------------------------

    @entry_point("take the GC lock")
    async def take_gc_lock(self, token: str, ttl: float) -> bool:
        """Take the collectors' lock for ``ttl`` seconds unless someone holds it.

        Accepted over ``maxmemory``: the collector is what frees memory.
        """
        writes = scripts.Writes()
        writes.call("SET", keys.GC_LOCK, token, "NX", "PX", int(ttl * 1000))
        (taken,) = await self.apply(writes)
        return bool(taken)

    @entry_point("extend the GC lock")
    async def extend_gc_lock(self, token: str, ttl: float) -> bool:
        """Push the lock's expiry ``ttl`` s ahead if ``token`` still holds it."""
        return bool(await self._extend_lock(keys=[keys.GC_LOCK], args=[token, int(ttl * 1000)]))

    @entry_point("release the GC lock")
    async def release_gc_lock(self, token: str) -> bool:
        """Release the lock if ``token`` still holds it."""
        return bool(await self._release_lock(keys=[keys.GC_LOCK], args=[token]))

    @entry_point("list unrouted tasks")
    async def unrouted_uids(self) -> set[str]:
        """Uids waiting in ``karton.tasks`` for a router."""
        return set(cast(list[str], await self.redis.lrange(keys.TASKS_QUEUE, 0, -1)))

    @entry_point("list queued tasks")
    async def queued_uids(self, identity: str) -> set[str]:
        """Uids waiting in any of ``identity``'s queues (one pipeline)."""
        async with self.redis.pipeline(transaction=False) as pipe:
            for queue in keys.consumer_queues(identity):
                pipe.lrange(queue, 0, -1)
            queued = cast(list[list[str]], await pipe.execute())
        return {uid for uids in queued for uid in uids}

    @entry_point("mark a task crashed")
    async def crash_task(self, task: Task) -> None:
        """Write ``task`` (already marked Crashed) and count it crashed for its receiver."""
        writes = scripts.Writes()
        writes.call("SET", keys.task_key(task.uid), task.serialize_state())
        writes.call("HINCRBY", keys.metrics_key("crashed"), task.receiver or "unknown", 1)
        await self.commit(writes)

    @entry_point("requeue an orphaned task")
    async def requeue_orphan(self, task: Task, body: str) -> bool:
        """Requeue a Spawned task found in no queue, lease or schedule (see the script).

        ``body`` is the JSON the caller judged; nothing happens if the task changed since.
        """
        receiver = task.receiver
        if receiver is None:
            return False
        done: int = await self._orphan(
            keys=[
                keys.task_key(task.uid),
                keys.leases_key(receiver),
                keys.DELAYED,
                keys.queue_key(task.priority.value, receiver),
                receiver,  # Karton 2.x's bare queue
                keys.STATS,
                keys.parked_index_key(receiver),  # concurrency control: parked, not orphaned
            ],
            args=[task.uid, body],
        )
        return bool(done)

    # -- task admin ---------------------------------------------------------------------

    @entry_point("rewrite tasks")
    async def rewrite_tasks(
        self, uids: Sequence[str], plan: Plan, *, attempts: int = 5
    ) -> list[str]:
        """Apply ``plan`` to tasks ``uids`` atomically; return the plan's ``result``.

        WATCH the task keys, read them, let ``plan`` decide what to write from the bodies
        it sees, and commit that in one MULTI/EXEC (refused over ``maxmemory``: a restart
        adds work).  A task changed meanwhile (deleted by
        the GC, restarted by someone else) makes the commit fail; it is then re-read and
        re-planned, up to ``attempts`` times.

        Raises:
            BackendError: the tasks kept changing for ``attempts`` rounds, or Redis failed.
        """
        task_keys = [keys.task_key(uid) for uid in uids]
        async with self.redis.pipeline(transaction=True) as pipe:
            for _ in range(attempts):
                try:
                    await pipe.watch(*task_keys)
                    bodies = cast(list[str | None], await pipe.mget(task_keys))
                    rewrite = plan(bodies)
                    pipe.multi()  # type: ignore[no-untyped-call]
                    if rewrite.bodies:
                        pipe.mset({keys.task_key(u): b for u, b in rewrite.bodies.items()})
                    for uid, priority, identity in rewrite.enqueue:
                        pipe.rpush(keys.queue_key(priority, identity), uid)
                    for identity, uid in rewrite.undead:
                        pipe.lrem(keys.dead_key(identity), 0, uid)
                    await pipe.execute()  # WatchError if any of them changed meanwhile
                    return rewrite.result
                except WatchError:
                    continue
        raise WatchError(f"tasks kept changing while being updated: {list(uids[:3])}...")

    @entry_point("read dead letters")
    async def dead_letters(self, identity: str) -> list[str]:
        """Uids of ``identity``'s tasks that crashed after their last retry."""
        return cast(list[str], await self.redis.lrange(keys.dead_key(identity), 0, -1))

    @entry_point("list dead-letter lists")
    async def dead_letter_identities(self) -> list[str]:
        """Identities that have a dead-letter list (SCAN, never KEYS)."""
        found = [
            key[len(keys.DEAD_PREFIX) :]
            async for key in self.redis.scan_iter(match=keys.DEAD_PREFIX + "*", count=1000)
        ]
        return sorted(set(found))

    @entry_point("prune dead letters")
    async def prune_dead_letters(self, identity: str, start: int, count: int) -> tuple[int, int]:
        """Drop the uids in ``[start, start + count)`` whose task is gone or not Crashed.

        Returns ``(removed, length)``, the list's length before removing.  A crash is
        written before its uid is dead-lettered, so a listed uid whose body is not Crashed
        has left that state (restarted, cancelled or collected elsewhere).  ``LREM`` with
        count 1 removes the oldest copy only, so a task that crashed again meanwhile stays.
        """
        key = keys.dead_key(identity)
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.llen(key)
            pipe.lrange(key, start, start + count - 1)
            length, uids = await pipe.execute()
        if not uids:
            return 0, int(length)
        bodies = cast(list[str | None], await self.redis.mget([keys.task_key(u) for u in uids]))
        stale = [uid for uid, body in zip(uids, bodies, strict=True) if not _crashed(body)]
        if stale:
            async with self.redis.pipeline(transaction=False) as pipe:
                for uid in stale:
                    pipe.lrem(key, 1, uid)
                await pipe.execute()
        return len(stale), int(length)


def _crashed(body: str | None) -> bool:
    """Whether ``body`` is a readable task in the Crashed state (unreadable: keep it)."""
    if body is None:
        return False
    try:
        return Task.unserialize(body, parse_resources=False).status is TaskState.CRASHED
    except InvalidTaskError:
        return True
