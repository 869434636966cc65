"""Every draining write of the backend on a real redis-server over ``maxmemory``.

One server with ``maxmemory-policy noeviction`` and a filler that puts it over a small
``maxmemory``: each write a consumer, router or the GC makes is accepted (it is an
``allow-oom`` script), while a producer's is refused with :class:`BackendFullError`.
Without the flag line every one of these steps fails with ``OutOfMemoryError``.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Iterator

import pytest
import redis

from asynckarton import BackendFullError, Task, TaskState
from asynckarton.backend import Bind, KartonBackend, ServerConnector
from asynckarton.backend._records import RoutedBatch
from tests.servers import RedisServer

pytestmark = [pytest.mark.integration, pytest.mark.anyio]

IDENTITY = "oom.worker"


@pytest.fixture
def full_redis() -> Iterator[redis.Redis]:
    server = RedisServer(extra_args=["--maxmemory-policy", "noeviction"])
    server.start()
    client = redis.Redis.from_url(server.url, decode_responses=True)
    try:
        limit = int(client.info("memory")["used_memory"]) + 500_000
        for i in range(20):
            client.set(f"filler:{i}", "f" * 100_000)
        client.config_set("maxmemory", limit)
        with pytest.raises(redis.exceptions.OutOfMemoryError):
            client.set("probe", "x")
        yield client
    finally:
        client.close()
        server.close()


@pytest.fixture
async def backend(full_redis: redis.Redis) -> AsyncIterator[KartonBackend]:
    url = "redis://{host}:{port}/0".format(**full_redis.connection_pool.connection_kwargs)
    backend = KartonBackend(ServerConnector(url=url))
    try:
        yield backend
    finally:
        await backend.aclose()


def _spawned(n: int) -> Task:
    return Task(
        {"type": "oom", "receiver": IDENTITY},
        uid=f"t{n}",
        root_uid=f"t{n}",
        _status=TaskState.SPAWNED,
    )


async def test_draining_writes_pass_and_producers_are_refused(
    backend: KartonBackend, full_redis: redis.Redis
) -> None:
    assert backend.allow_oom
    with pytest.raises(BackendFullError, match="maxmemory"):
        await backend.enqueue_unrouted({"new": "{}"}, "producer")
    assert full_redis.llen("karton.tasks") == 0

    # A consumer registers, the router commits a batch (with a sub-script), heartbeats.
    assert await backend.register_bind(Bind(identity=IDENTITY, filters=[{"type": "oom"}])) is None
    await backend.heartbeat_router("r1", 10.0)
    batch = RoutedBatch()
    for n in range(3):
        batch.add_fork(f"t{n}", _spawned(n).serialize(), "normal", IDENTITY)
    batch.outputs["origin"] = {'{"type": "oom"}'}
    batch.logs.append(("karton.log", "record"))
    batch.scripts.append(("redis.call('SET', KEYS[1], ARGV[1])", ["sub"], ["ran"]))
    await backend.route_commit("r1", batch, tracking_ttl=60)
    assert full_redis.llen(f"karton.queue.normal:{IDENTITY}") == 3
    assert full_redis.get("sub") == "ran"

    # The consumer fetches (batch and blocking), writes Started, renews, finishes.
    fetched = await backend.fetch(IDENTITY, 2, 30.0)
    assert [uid for uid, _ in fetched] == ["t0", "t1"]
    blocking = backend.connector.blocking()
    try:
        assert [uid for uid, _ in await backend.wait_fetch(blocking, IDENTITY, 30.0, 1.0)] == ["t2"]
    finally:
        await blocking.aclose()
    tasks = [Task.unserialize(body) for _, body in fetched]
    for task in tasks:
        task.status = TaskState.STARTED
    await backend.set_tasks(tasks)
    await backend.renew_leases(IDENTITY, ["t0", "t1", "t2"], 60.0)
    tasks[0].status = TaskState.FINISHED
    await backend.complete(IDENTITY, [tasks[0]], crashed=0)
    await backend.schedule_retry(IDENTITY, tasks[1], time.time() - 1)
    assert await backend.release_delayed() == 1
    await backend.hand_back(IDENTITY, [_spawned(2)])
    await backend.dead_letter(IDENTITY, ["t0"])
    assert full_redis.zcard(f"asynckarton.leases:{IDENTITY}") == 0
    assert full_redis.lrange(f"karton.queue.normal:{IDENTITY}", 0, -1) == ["t2", "t1"]
    assert '"Finished"' in str(full_redis.get("karton.task:t0"))

    # The GC takes its lock, marks a crash, counts, and deletes (which frees memory).
    assert await backend.take_gc_lock("gc", 30.0)
    assert not await backend.take_gc_lock("other", 30.0)
    assert await backend.extend_gc_lock("gc", 30.0)
    await backend.crash_task(_spawned(3))
    await backend.increment_metrics("garbage-collected", {IDENTITY: 1})
    await backend.delete_tasks(["t0", "t3"])
    assert await backend.release_gc_lock("gc")
    await backend.unregister_bind(IDENTITY)  # the GC drops a bind no consumer serves
    assert not full_redis.hexists("karton.binds", IDENTITY)
    assert full_redis.llen(f"karton.queue.normal:{IDENTITY}") == 0
    memory = full_redis.info("memory")
    assert memory["used_memory"] > memory["maxmemory"], "the test should stay full"


async def test_concurrency_control_keeps_working_on_a_full_server(
    backend: KartonBackend, full_redis: redis.Redis
) -> None:
    # A consumer starting with running_concurrency files its policy, admits, parks,
    # releases and sweeps slots: all of it while Redis refuses plain writes.
    from asynckarton.backend import _keys as keys
    from asynckarton.backend._concurrency import Admission, SlotStore

    store = SlotStore(backend, IDENTITY)
    queue = keys.queue_key("normal", IDENTITY)
    leases = keys.leases_key(IDENTITY)
    deadline = int((time.time() + 30) * 1000)
    for uid in ("a", "b"):  # two fetched tasks with live leases (set up past the limit)
        full_redis.eval(
            "#!lua flags=allow-oom\n"
            "redis.call('ZADD', KEYS[1], ARGV[1], ARGV[2]) redis.call('SET', KEYS[2], '{}')",
            2,
            leases,
            keys.task_key(uid),
            deadline,
            uid,
        )
    assert await store.publish_policy("replica-1", "keys=sha") == {}
    assert full_redis.hlen(keys.policy_key(IDENTITY)) == 1
    asks = [Admission(uid, "k1", "", queue, "") for uid in ("a", "b")]
    out = await store.acquire(asks, reroute=True, on_diff=False)
    assert [o.outcome for o in out] == ["run", "parked"]
    assert await store.release([("k1", "a")]) == [True]
    assert full_redis.lrange(queue, 0, -1) == ["b"]  # unparked to the head of its queue
    assert await store.sweep() >= 0
    with pytest.raises(redis.exceptions.OutOfMemoryError):
        full_redis.set("probe", "x")  # still over maxmemory throughout


async def test_the_gc_reports_its_pass_and_counts_on_a_full_server(
    backend: KartonBackend, full_redis: redis.Redis
) -> None:
    from collections import Counter

    from asynckarton.backend._inspect import (
        GC_LAST,
        StatusCounts,
        publish_task_counts,
        raw_state,
        record_gc_pass,
    )

    await record_gc_pass(backend, duration=0.5, deleted_tasks=3, deleted_objects=1)
    counts = StatusCounts(Counter({(IDENTITY, "normal", "Spawned"): 7}), time.time(), 0.1)
    await publish_task_counts(backend, counts)
    assert full_redis.hget(GC_LAST, "deleted_tasks") == "3"
    state = await raw_state(backend)
    assert state.task_counts is not None
    assert state.task_counts.counts == counts.counts
