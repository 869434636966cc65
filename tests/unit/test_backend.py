"""KartonBackend on the embedded mode: the same code as production, on fakeredis.

Each test drives one family of backend methods and checks the Karton keys they leave
(the wire format) and what they return.  The last part checks the error rule of
``BackendError`` and that no code outside ``backend/_keys.py`` spells a key name.
"""

from __future__ import annotations

import ast
import json
import re
import time
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import cast

import anyio
import fakeredis
import pytest
import redis.exceptions

import asynckarton
from asynckarton import Task, TaskPriority, TaskState, testing
from asynckarton._errors import BackendError, BackendUnavailableError
from asynckarton.backend import Bind, EmbeddedConnector, KartonBackend, ServerConnector
from asynckarton.backend import _keys as keys
from asynckarton.backend import _scripts as scripts
from asynckarton.backend._guard import TRANSIENT_ERRORS
from asynckarton.backend._records import RoutedBatch, TaskRewrite
from asynckarton.system._admin import list_crashed

pytestmark = pytest.mark.anyio

PACKAGE = Path(asynckarton.__file__).parent


@pytest.fixture
async def connector() -> AsyncIterator[EmbeddedConnector]:
    yield EmbeddedConnector()


@pytest.fixture
async def backend(connector: EmbeddedConnector) -> AsyncIterator[KartonBackend]:
    backend = KartonBackend(connector)
    yield backend
    await backend.aclose()


def routed(receiver: str, status: TaskState = TaskState.SPAWNED, **kw: object) -> Task:
    """A routed copy for ``receiver`` in ``status``."""
    task = Task({"type": "sample"}, payload={"n": 1}, **kw).fork_task()  # type: ignore[arg-type]
    task.headers["receiver"] = receiver
    task.status = status
    return task


async def doc(backend: KartonBackend, uid: str) -> dict[str, object]:
    raw = await backend.get_task_body(uid)
    assert raw is not None, f"task {uid} is gone"
    parsed: dict[str, object] = json.loads(raw)
    return parsed


async def scores(backend: KartonBackend, key: str) -> dict[str, float]:
    """Members and scores of the sorted set ``key``."""
    pairs = cast(list[tuple[str, float]], await backend.redis.zrange(key, 0, -1, withscores=True))
    return dict(pairs)


# -- binds -------------------------------------------------------------------------------


async def test_binds_register_replace_read_and_unregister(backend: KartonBackend) -> None:
    first = Bind(identity="svc.a", filters=[{"type": "sample"}], info="one")
    second = Bind(identity="svc.a", filters=[{"type": "other"}], info="two")
    assert await backend.register_bind(first) is None
    assert await backend.register_bind(second) == first
    assert await backend.get_bind("svc.a") == second
    assert await backend.get_bind("svc.missing") is None
    raw = await backend.get_binds_raw()
    assert json.loads(raw["svc.a"])["filters"] == [{"type": "other"}]
    assert raw["svc.a"] == second.to_json()

    await backend.redis.rpush(keys.queue_key("normal", "svc.a"), "x")
    await backend.unregister_bind("svc.a")
    assert await backend.get_bind("svc.a") is None
    assert await backend.redis.exists(keys.queue_key("normal", "svc.a")) == 0


async def test_get_bind_reads_a_karton_2_bind_on_the_given_connection(
    backend: KartonBackend, connector: EmbeddedConnector
) -> None:
    await backend.redis.hset(keys.BINDS, "old.test", json.dumps([{"type": "x"}]))
    presence = connector.named("old.test?karton")
    try:
        bind = await backend.get_bind("old.test", client=presence)
        online = await backend.online_identities()
    finally:
        await presence.aclose()
    assert bind is not None and bind.filters == [{"type": "x"}]
    assert bind.version == "2.x.x" and not bind.persistent and not bind.is_async
    assert online.get("old.test") == 1


# -- producing and task documents --------------------------------------------------------


async def test_enqueue_unrouted_writes_bodies_queue_and_metric(backend: KartonBackend) -> None:
    tasks = [Task({"type": "a"}), Task({"type": "b"})]
    await backend.enqueue_unrouted({t.uid: t.serialize() for t in tasks}, "prod")
    assert await backend.redis.lrange(keys.TASKS_QUEUE, 0, -1) == [t.uid for t in tasks]
    assert await backend.redis.hget(keys.metrics_key("produced"), "prod") == "2"
    assert await backend.get_task_bodies([tasks[1].uid, "nope"]) == [tasks[1].serialize(), None]
    got = await backend.get_task(tasks[0].uid)
    assert got is not None and got.headers == {"type": "a"}
    assert await backend.unrouted_uids() == {t.uid for t in tasks}


async def test_scan_tasks_yields_every_task_and_nothing_else(backend: KartonBackend) -> None:
    tasks = [Task({"type": "x", "n": i}) for i in range(2500)]
    await backend.declare_tasks(tasks)
    await backend.redis.set("unrelated", "1")
    seen: dict[str, str] = {}
    async for batch in backend.scan_tasks():
        seen.update(batch)
    assert set(seen) == {t.uid for t in tasks}
    assert json.loads(seen[tasks[7].uid])["headers"]["n"] == 7

    await backend.delete_tasks([t.uid for t in tasks[:2000]])
    assert await backend.redis.dbsize() == 501


# -- consumers ---------------------------------------------------------------------------


async def test_fetch_reads_queues_in_priority_order_and_leases(backend: KartonBackend) -> None:
    low, high = routed("svc"), routed("svc")
    await backend.set_tasks([low, high])
    await backend.redis.rpush(keys.queue_key("low", "svc"), low.uid, "ghost")
    await backend.redis.rpush(keys.queue_key("high", "svc"), high.uid)
    before = time.time()
    got = await backend.fetch("svc", 2, lease=30)
    assert [uid for uid, _ in got] == [high.uid, low.uid]
    assert got[0][1] == high.serialize_state()
    leases = await scores(backend, keys.leases_key("svc"))
    assert set(leases) == {high.uid, low.uid}
    assert all(before + 29 <= score / 1000 <= time.time() + 31 for score in leases.values())
    assert await backend.fetch("svc", 5, lease=30) == [("ghost", "")]
    assert await backend.fetch("svc", 5, lease=30) == []


async def test_wait_fetch_blocks_until_a_task_arrives(
    backend: KartonBackend, connector: EmbeddedConnector
) -> None:
    task = routed("svc")
    await backend.set_tasks([task])
    blocking = connector.blocking()
    got: list[tuple[str, str]] = []
    try:
        assert await backend.wait_fetch(blocking, "svc", 30, timeout=0.05) == []
        async with anyio.create_task_group() as group:

            async def wait() -> None:
                got.extend(await backend.wait_fetch(blocking, "svc", 30, timeout=5))

            group.start_soon(wait)
            await anyio.sleep(0.05)
            await backend.redis.rpush(keys.queue_key("normal", "svc"), task.uid)
    finally:
        await blocking.aclose()
    assert got == [(task.uid, task.serialize_state())]
    assert await backend.redis.zscore(keys.leases_key("svc"), task.uid) is not None


async def test_wait_fetch_leases_up_to_count_with_the_task_that_woke_it(
    backend: KartonBackend, connector: EmbeddedConnector
) -> None:
    """The lease after the blocking pop also takes a burst, in priority order."""
    tasks = [routed("svc") for _ in range(3)]
    await backend.set_tasks(tasks)
    await backend.redis.rpush(keys.queue_key("low", "svc"), tasks[0].uid)
    await backend.redis.rpush(keys.queue_key("normal", "svc"), tasks[1].uid, tasks[2].uid)
    blocking = connector.blocking()
    try:
        got = await backend.wait_fetch(blocking, "svc", 30, timeout=1, count=2)
    finally:
        await blocking.aclose()
    assert [uid for uid, _ in got] == [tasks[1].uid, tasks[2].uid]
    assert [body for _, body in got] == [t.serialize_state() for t in tasks[1:]]
    leased = await scores(backend, keys.leases_key("svc"))
    assert set(leased) == {tasks[1].uid, tasks[2].uid}
    assert await backend.redis.lrange(keys.queue_key("low", "svc"), 0, -1) == [tasks[0].uid]


async def test_leases_renew_only_existing_and_drop(backend: KartonBackend) -> None:
    await backend.redis.zadd(keys.leases_key("svc"), {"a": 1, "b": 1})
    await backend.renew_leases("svc", ["a", "stranger"], lease=60)
    leases = await scores(backend, keys.leases_key("svc"))
    assert set(leases) == {"a", "b"}  # XX: a lease is never created by a renewal
    assert leases["a"] > time.time() * 1000 and leases["b"] == 1
    await backend.drop_leases("svc", ["a"])
    assert await backend.redis.zrange(keys.leases_key("svc"), 0, -1) == ["b"]


async def test_complete_writes_states_releases_leases_and_counts(backend: KartonBackend) -> None:
    ok, bad = routed("svc", TaskState.FINISHED), routed("svc", TaskState.CRASHED)
    await backend.redis.zadd(keys.leases_key("svc"), {ok.uid: 1, bad.uid: 1, "other": 1})
    await backend.complete("svc", [ok, bad], crashed=1)
    await backend.dead_letter("svc", [bad.uid])
    assert (await doc(backend, ok.uid))["status"] == "Finished"
    assert (await doc(backend, bad.uid))["status"] == "Crashed"
    assert await backend.redis.zrange(keys.leases_key("svc"), 0, -1) == ["other"]
    assert await backend.redis.hget(keys.metrics_key("consumed"), "svc") == "2"
    assert await backend.redis.hget(keys.metrics_key("crashed"), "svc") == "1"
    assert await backend.dead_letters("svc") == [bad.uid]


async def test_hand_back_requeues_at_the_head_as_spawned(backend: KartonBackend) -> None:
    task = routed("svc", TaskState.STARTED, priority=TaskPriority.HIGH)
    await backend.redis.rpush(keys.queue_key("high", "svc"), "queued-before")
    await backend.redis.zadd(keys.leases_key("svc"), {task.uid: 1})
    await backend.hand_back("svc", [task])
    assert await backend.redis.lrange(keys.queue_key("high", "svc"), 0, -1) == [
        task.uid,
        "queued-before",
    ]
    assert (await doc(backend, task.uid))["status"] == "Spawned"
    assert await backend.redis.zcard(keys.leases_key("svc")) == 0


async def test_retry_schedule_releases_only_due_tasks(backend: KartonBackend) -> None:
    due, later, deleted = routed("svc"), routed("svc"), routed("svc")
    for task in (due, later, deleted):
        await backend.redis.zadd(keys.leases_key("svc"), {task.uid: 1})
    await backend.schedule_retry("svc", due, time.time() - 1)
    await backend.schedule_retry("svc", later, time.time() + 3600)
    await backend.schedule_retry("svc", deleted, time.time() - 1)
    await backend.delete_tasks([deleted.uid])
    assert await backend.redis.zcard(keys.leases_key("svc")) == 0
    assert await backend.release_delayed() == 1
    assert await backend.redis.lrange(keys.queue_key("normal", "svc"), 0, -1) == [due.uid]
    assert await backend.redis.zrange(keys.DELAYED, 0, -1) == [later.uid]
    assert await backend.redis.hkeys(keys.DELAYED_ROUTES) == [later.uid]


async def test_reclaim_requeues_expired_unfinished_tasks(backend: KartonBackend) -> None:
    started = routed("svc", TaskState.STARTED, priority=TaskPriority.LOW)
    finished = routed("svc", TaskState.FINISHED)
    alive = routed("svc", TaskState.STARTED)
    await backend.set_tasks([started, finished, alive])
    expired = time.time() * 1000 - 1000
    await backend.redis.zadd(
        keys.leases_key("svc"),
        {started.uid: expired, finished.uid: expired, alive.uid: expired + 10**9},
    )
    assert await backend.reclaim("svc") == 1
    assert await backend.redis.lrange(keys.queue_key("low", "svc"), 0, -1) == [started.uid]
    assert await backend.redis.llen(keys.queue_key("normal", "svc")) == 0
    assert (await doc(backend, started.uid))["status"] == "Spawned"
    assert (await doc(backend, finished.uid))["status"] == "Finished"
    assert await backend.redis.zrange(keys.leases_key("svc"), 0, -1) == [alive.uid]
    assert await backend.stats() == {"redelivered": 1}


# -- routers -----------------------------------------------------------------------------


async def test_route_pop_journal_and_commit(backend: KartonBackend) -> None:
    original = Task({"type": "sample"})
    await backend.enqueue_unrouted({original.uid: original.serialize(), "broken": "{"}, "p")
    assert await backend.route_pop("r1", 10) == [original.uid, "broken"]
    assert await backend.journal("r1") == [original.uid, "broken"]
    assert await backend.redis.llen(keys.TASKS_QUEUE) == 0

    batch = RoutedBatch()
    batch.add_fork("fork-1", '{"fork": 1}', "high", "svc")
    batch.set_body(original.uid, '{"done": true}')
    batch.outputs["p"] = {'{"type": "sample"}'}
    batch.invalid.append("broken")
    await backend.route_commit("r1", batch, tracking_ttl=60)

    assert await backend.journal("r1") == []
    assert await backend.get_task_body("fork-1") == '{"fork": 1}'
    assert await backend.get_task_body(original.uid) == '{"done": true}'
    assert await backend.redis.lrange(keys.queue_key("high", "svc"), 0, -1) == ["fork-1"]
    assert await backend.redis.hget(keys.metrics_key("assigned"), "svc") == "1"
    assert await backend.redis.smembers(keys.outputs_key("p")) == {'{"type": "sample"}'}
    assert 0 < await backend.redis.ttl(keys.outputs_key("p")) <= 60
    assert await backend.redis.lrange(keys.INVALID, 0, -1) == ["broken"]
    assert await backend.stats() == {"invalid": 1}


async def test_route_take_tops_up_the_journal_and_reads_bodies_and_binds(
    backend: KartonBackend,
) -> None:
    tasks = [Task({"type": "sample", "n": str(n)}) for n in range(3)]
    await backend.enqueue_unrouted({t.uid: t.serialize() for t in tasks}, "p")
    await backend.redis.rpush(keys.TASKS_QUEUE, "gone")  # a uid whose body was deleted
    await backend.redis.rpush(keys.routing_key("r1"), "left")  # a failed round's batch
    await backend.redis.set(keys.task_key("left"), "{left}")
    await backend.register_bind(Bind(identity="svc", filters=[{"type": "sample"}]))

    uids, bodies, binds = await backend.route_take("r1", 3)
    assert uids == ["left", tasks[0].uid, tasks[1].uid] == await backend.journal("r1")
    assert bodies == ["{left}", tasks[0].serialize(), tasks[1].serialize()]
    assert set(binds) == {"svc"} and json.loads(binds["svc"])["filters"] == [{"type": "sample"}]
    assert await backend.redis.lrange(keys.TASKS_QUEUE, 0, -1) == [tasks[2].uid, "gone"]

    assert (await backend.route_take("r1", 2))[0] == uids  # a full journal takes nothing
    await backend.redis.delete(keys.routing_key("r1"))
    assert (await backend.route_take("r1", 10))[:2] == (
        [tasks[2].uid, "gone"],
        [tasks[2].serialize(), None],
    )
    await backend.redis.delete(keys.routing_key("r1"))
    assert await backend.route_take("r1", 10) == ([], [], binds)


async def test_dead_routers_journal_goes_back_in_order(backend: KartonBackend) -> None:
    await backend.redis.rpush(keys.TASKS_QUEUE, "a", "b", "c", "d")
    assert await backend.route_pop("dead", 2) == ["a", "b"]
    await backend.heartbeat_router("dead", ttl=-1)  # expired already
    await backend.heartbeat_router("alive", ttl=60)
    assert await backend.recover_routing() == 2
    assert await backend.redis.lrange(keys.TASKS_QUEUE, 0, -1) == ["a", "b", "c", "d"]
    assert await backend.journal("dead") == []
    assert await backend.redis.zrange(keys.ROUTERS, 0, -1) == ["alive"]
    assert await backend.stats() == {"rerouted": 2}
    await backend.forget_router("alive")
    assert await backend.redis.zcard(keys.ROUTERS) == 0


async def test_the_idle_wait_blocks_on_the_embedded_server_and_keeps_the_order(
    backend: KartonBackend, connector: EmbeddedConnector
) -> None:
    # fakeredis answers BLMOVE at once: the first wait finds that out, later waits block
    # on BLPOP and put the uid back at the head, so an idle router does not spin.
    blocking = connector.blocking()
    try:
        assert not (await backend.route_idle("r1", 0.3, 10.0, client=blocking))[0]
        started = time.monotonic()
        assert not (await backend.route_idle("r1", 0.3, 10.0, client=blocking))[0]
        assert time.monotonic() - started >= 0.25, "an empty wait returned early (spins)"
        await backend.redis.rpush(keys.TASKS_QUEUE, "a", "b")
        assert (await backend.route_idle("r1", 1.0, 10.0, client=blocking))[0]
    finally:
        await blocking.aclose()
    assert await backend.journal("r1") == []
    assert await backend.redis.lrange(keys.TASKS_QUEUE, 0, -1) == ["a", "b"]
    assert await backend.redis.zscore(keys.ROUTERS, "r1") is not None  # heartbeat renewed
    uids, _bodies, _binds = await backend.route_take("r1", 10)
    assert uids == ["a", "b"]


async def test_quarantine_keeps_uids_and_counts(backend: KartonBackend) -> None:
    await backend.quarantine(["x", "y"])
    await backend.quarantine([])
    assert await backend.redis.lrange(keys.INVALID, 0, -1) == ["x", "y"]
    assert await backend.stats() == {"invalid": 2}


# -- logs, metrics, inspection -----------------------------------------------------------


async def test_publish_logs_reaches_subscribers(backend: KartonBackend) -> None:
    channel = backend.log_channel("INFO", "svc")
    assert channel == "karton.log.info.svc"
    assert backend.log_channel(None, None) == "karton.log.*.*"
    pubsub = backend.redis.pubsub()
    await pubsub.psubscribe("karton.log.*")
    try:
        assert await backend.publish_logs([]) == 0
        assert await backend.publish_logs([(channel, "one"), (channel, "two")]) == 2
        messages: list[str] = []
        with anyio.fail_after(5):
            while len(messages) < 2:
                message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1)
                if message is not None:
                    messages.append(message["data"])
    finally:
        await pubsub.aclose()  # type: ignore[no-untyped-call]
    assert messages == ["one", "two"]
    assert await backend.publish_logs([(backend.log_channel("INFO", "nobody"), "x")]) == 1


async def test_metrics_queue_lengths_and_tasks_in_flight(backend: KartonBackend) -> None:
    await backend.increment_metrics("garbage-collected", {"svc": 2, "other": 1})
    await backend.increment_metrics("garbage-collected", {})
    assert await backend.redis.hgetall(keys.metrics_key("garbage-collected")) == {
        "svc": "2",
        "other": "1",
    }
    assert await backend.count_in_flight(["svc"]) == 0
    await backend.redis.rpush(keys.queue_key("low", "svc"), "q1", "q2")
    await backend.redis.rpush(keys.queue_key("low", "else"), "elsewhere")
    lengths = await backend.queue_lengths("svc")
    assert lengths[keys.queue_key("low", "svc")] == 2 and sum(lengths.values()) == 2
    assert await backend.queued_uids("svc") == {"q1", "q2"}
    await backend.redis.rpush(keys.TASKS_QUEUE, "u")
    await backend.redis.zadd(keys.leases_key("svc"), {"l": 1})
    await backend.redis.zadd(keys.DELAYED, {"d": 1})
    await backend.heartbeat_router("r1", 60)
    await backend.redis.rpush(keys.routing_key("r1"), "j")
    assert await backend.count_in_flight(["svc"]) == 6


# -- maintenance: GC lock, orphans, admin rewrites ---------------------------------------


async def test_gc_lock_is_owned_by_its_token(backend: KartonBackend) -> None:
    assert await backend.take_gc_lock("me", ttl=15)
    assert not await backend.take_gc_lock("you", ttl=15)
    assert not await backend.extend_gc_lock("you", ttl=100)
    assert await backend.extend_gc_lock("me", ttl=100)
    assert 15_000 < await backend.redis.pttl(keys.GC_LOCK) <= 100_000
    assert not await backend.release_gc_lock("you")
    assert await backend.release_gc_lock("me")
    assert await backend.take_gc_lock("you", ttl=15)


async def test_requeue_orphan_only_when_nowhere_and_unchanged(backend: KartonBackend) -> None:
    orphan, leased = routed("svc"), routed("svc")
    await backend.set_tasks([orphan, leased])
    await backend.redis.zadd(keys.leases_key("svc"), {leased.uid: 1})
    assert not await backend.requeue_orphan(leased, leased.serialize_state())
    assert not await backend.requeue_orphan(orphan, '{"changed": true}')
    assert await backend.requeue_orphan(orphan, orphan.serialize_state())
    assert not await backend.requeue_orphan(orphan, orphan.serialize_state())  # queued now
    assert await backend.redis.lrange(keys.queue_key("normal", "svc"), 0, -1) == [orphan.uid]
    assert await backend.stats() == {"orphans_requeued": 1}
    unrouted = Task({"type": "x"})
    assert not await backend.requeue_orphan(unrouted, unrouted.serialize())


async def test_crash_task_writes_and_counts(backend: KartonBackend) -> None:
    task = routed("svc", TaskState.CRASHED)
    await backend.crash_task(task)
    assert (await doc(backend, task.uid))["status"] == "Crashed"
    assert await backend.redis.hget(keys.metrics_key("crashed"), "svc") == "1"


def concurrent_writer(connector: EmbeddedConnector) -> fakeredis.FakeRedis:
    """A synchronous client of the same in-process server: another process's writes."""
    return fakeredis.FakeRedis(server=connector.server, decode_responses=True)


async def test_rewrite_tasks_replans_after_a_concurrent_change(
    backend: KartonBackend, connector: EmbeddedConnector
) -> None:
    task = routed("svc", TaskState.CRASHED)
    await backend.set_tasks([task])
    await backend.redis.rpush(keys.dead_key("svc"), task.uid, "other")
    other = concurrent_writer(connector)
    seen: list[list[str | None]] = []

    def plan(bodies: Sequence[str | None]) -> TaskRewrite:
        seen.append(list(bodies))
        if len(seen) == 1:  # someone else changes the task between WATCH and EXEC
            other.set(keys.task_key(task.uid), "changed")
        rewrite = TaskRewrite(result=[f"saw {bodies[0]!r:.10}"])
        rewrite.bodies[task.uid] = '{"rewritten": true}'
        rewrite.requeue("fork", "high", "svc")
        rewrite.forget_dead("svc", task.uid)
        return rewrite

    result = await backend.rewrite_tasks([task.uid], plan)
    assert seen == [[task.serialize_state()], ["changed"]]
    assert result == [f"saw {'changed'!r:.10}"]
    assert await backend.get_task_body(task.uid) == '{"rewritten": true}'
    assert await backend.redis.lrange(keys.queue_key("high", "svc"), 0, -1) == ["fork"]
    assert await backend.dead_letters("svc") == ["other"]
    other.close()


async def test_rewrite_tasks_gives_up_with_a_backend_error(
    backend: KartonBackend, connector: EmbeddedConnector
) -> None:
    other = concurrent_writer(connector)

    def plan(bodies: Sequence[str | None]) -> TaskRewrite:
        other.incr(keys.task_key("busy"))
        return TaskRewrite(bodies={"busy": "{}"})

    with pytest.raises(BackendError, match=r"rewrite tasks.*kept changing") as info:
        await backend.rewrite_tasks(["busy"], plan, attempts=3)
    assert isinstance(info.value.__cause__, redis.exceptions.WatchError)
    assert await backend.get_task_body("busy") == "3"
    other.close()


# -- errors: the BackendError rule -------------------------------------------------------


async def test_entry_points_raise_backend_unavailable_error_when_redis_is_gone(
    backend: KartonBackend, connector: EmbeddedConnector
) -> None:
    task = Task({"type": "x"})
    connector.server.connected = False
    with pytest.raises(BackendUnavailableError) as info:
        await backend.enqueue_unrouted({task.uid: task.serialize()}, "prod")
    error = info.value
    assert error.operation == "send tasks" and error.address == "embedded"
    assert str(error).startswith("Redis at embedded failed to send tasks: ConnectionError")
    assert isinstance(error.__cause__, redis.exceptions.ConnectionError)
    assert isinstance(error, TRANSIENT_ERRORS)  # the services' loops retry it

    with pytest.raises(BackendUnavailableError, match="scan the tasks"):
        async for _ in backend.scan_tasks():
            pass
    with pytest.raises(BackendUnavailableError, match="scan the tasks"):
        await list_crashed(backend)


async def test_hot_paths_leave_redis_errors_to_the_retry_loops(
    backend: KartonBackend, connector: EmbeddedConnector
) -> None:
    connector.server.connected = False
    with pytest.raises(redis.exceptions.ConnectionError) as info:
        await backend.fetch("svc", 1, lease=30)
    assert not isinstance(info.value, BackendError)
    assert isinstance(info.value, TRANSIENT_ERRORS)


async def test_a_refused_command_is_a_backend_error_naming_the_operation(
    backend: KartonBackend,
) -> None:
    await backend.redis.set(keys.BINDS, "not a hash")
    with pytest.raises(BackendError) as info:
        await backend.get_bind("svc")
    assert type(info.value) is BackendError  # not "unavailable": retrying will not help
    assert "failed to read a bind: ResponseError: WRONGTYPE" in str(info.value)
    assert isinstance(info.value.__cause__, redis.exceptions.ResponseError)
    assert not isinstance(info.value, TRANSIENT_ERRORS)


async def test_producer_and_test_kit_raise_backend_errors(tmp_path: Path) -> None:
    async with testing.pipeline(data_dir=tmp_path) as p:
        connector = p.producer.backend.connector
        assert isinstance(connector, EmbeddedConnector)
        connector.server.connected = False
        try:
            with pytest.raises(BackendUnavailableError, match="failed to send tasks"):
                await p.producer.send_task(Task({"type": "x"}))
            with pytest.raises(BackendUnavailableError, match="count tasks in flight"):
                await p.busy()
            with pytest.raises(BackendUnavailableError, match="scan the tasks"):
                await p.tasks()
        finally:
            connector.server.connected = True


def test_server_address_masks_the_password() -> None:
    assert ServerConnector(host="10.0.0.5", port=6380, db=2).address == "redis://10.0.0.5:6380/2"
    assert ServerConnector(ssl=True).address == "rediss://127.0.0.1:6379/0"
    url = ServerConnector(url="redis://user:s3cret@db.example:6379/1").address
    assert url == "redis://user:***@db.example:6379/1"
    assert "s3cret" not in ServerConnector(url="redis://:s3cret@db.example/0").address


# -- key names live in _keys only --------------------------------------------------------

#: Every key name and prefix of the schema, Karton's and ours.
KEY_NAMES = [
    value
    for name, value in vars(keys).items()
    if name.isupper() and isinstance(value, str) and "." in value
]


def _string_literals(path: Path) -> list[tuple[int, str]]:
    """Every string constant of a module except docstrings."""
    tree = ast.parse(path.read_text(), str(path))
    docstrings = {
        id(node.body[0].value)
        for node in ast.walk(tree)
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef)
        and node.body
        and isinstance(node.body[0], ast.Expr)
        and isinstance(node.body[0].value, ast.Constant)
    }
    return [
        (node.lineno, node.value)
        for node in ast.walk(tree)
        if isinstance(node, ast.Constant)
        and isinstance(node.value, str)
        and id(node) not in docstrings
    ]


def test_key_names_are_collected() -> None:
    assert {"karton.task:", "karton.queue.", "asynckarton.leases:", "karton.binds"} <= set(
        KEY_NAMES
    )


def test_no_script_spells_a_key_name() -> None:
    templates = {
        name: value
        for name, value in vars(scripts).items()
        if name.isupper() and isinstance(value, str)
    }
    assert {"FETCH", "RECLAIM", "REQUEUE_ORPHAN", "EXTEND_LOCK"} <= set(templates)
    for name, template in templates.items():
        for key in ("karton.", *KEY_NAMES):
            assert key not in template, f"script {name} spells {key!r}"
        rendered = scripts.render(template)
        assert "@" not in rendered, f"script {name} has an unknown placeholder"
    assert f"{json.dumps(keys.TASK_PREFIX)} .. uid" in scripts.render(scripts.FETCH)


def test_no_module_outside_keys_spells_a_key_name() -> None:
    found = [
        f"{path.relative_to(PACKAGE)}:{line}: {text!r}"
        for path in sorted(PACKAGE.rglob("*.py"))
        if path != PACKAGE / "backend" / "_keys.py"
        for line, text in _string_literals(path)
        if any(key in text for key in KEY_NAMES) or re.search(r"karton\.queue\.", text)
    ]
    assert found == []


def _imports_backend_keys(path: Path) -> bool:
    """Whether ``path`` imports ``backend._keys`` (any spelling, relative or absolute)."""
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom):
            module = node.module or ""
            names = {alias.name for alias in node.names}
            if module.endswith("backend._keys") or (
                module.endswith("backend") and "_keys" in names
            ):
                return True
        elif isinstance(node, ast.Import) and any(
            alias.name.endswith("backend._keys") for alias in node.names
        ):
            return True
    return False


def test_nothing_outside_the_backend_imports_its_keys() -> None:
    importers = [
        str(path.relative_to(PACKAGE))
        for path in sorted(PACKAGE.rglob("*.py"))
        if path.parent.name != "backend" and _imports_backend_keys(path)
    ]
    assert importers == []


def test_only_the_backend_imports_redis() -> None:
    importers = [
        f"{path.relative_to(PACKAGE)}:{node.lineno}"
        for path in sorted(PACKAGE.rglob("*.py"))
        if path.parent.name != "backend"
        for node in ast.walk(ast.parse(path.read_text(), str(path)))
        if (isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "redis")
        or (
            isinstance(node, ast.Import)
            and any(alias.name.split(".")[0] == "redis" for alias in node.names)
        )
    ]
    assert importers == []
