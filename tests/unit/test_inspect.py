"""The async inspection API on the embedded Redis: state, task counts, bind deletion."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

import fakeredis
import pytest

from asynckarton import Task, TaskPriority, TaskState
from asynckarton._services._inspect import (
    BindInUseError,
    DeploymentState,
    UnknownBindError,
    count_tasks,
    delete_bind,
)
from asynckarton.backend import Bind, EmbeddedConnector, KartonBackend
from asynckarton.backend import _keys as keys
from asynckarton.backend._inspect import record_gc_pass, routers_alive

pytestmark = pytest.mark.anyio


@pytest.fixture
async def backend() -> AsyncIterator[KartonBackend]:
    backend = KartonBackend(EmbeddedConnector(fakeredis.FakeServer()))
    yield backend
    await backend.aclose()


def routed(receiver: str, status: TaskState, priority: str = "normal") -> Task:
    task = Task({"type": "sample", "receiver": receiver}, priority=TaskPriority(priority))
    task.status = status
    return task


async def test_state_reads_binds_replicas_queues_and_system_keys(backend: KartonBackend) -> None:
    await backend.register_bind(
        Bind(identity="svc.a", filters=[{"type": "x"}], service_version="1.2")
    )
    await backend.register_bind(Bind(identity="svc.b", filters=[], persistent=False))
    replica = backend.connector.named("svc.a?karton_version=5.9.1&instance_id=abc")
    await replica.ping()
    redis = backend.redis
    await redis.rpush(keys.queue_key("high", "svc.a"), "u1")
    await redis.rpush(keys.queue_key("low", "svc.a"), "u2", "u3")
    await redis.rpush("svc.a", "legacy-uid")
    await redis.zadd(keys.leases_key("svc.a"), {"u4": 1, "u5": 2})
    await redis.rpush(keys.dead_key("svc.b"), "u6")
    await redis.rpush(keys.TASKS_QUEUE, "u7", "u8")
    await redis.zadd(keys.DELAYED, {"u9": 1})
    await redis.zadd(keys.ROUTERS, {"live": (time.time() + 30) * 1000, "dead": 1000})
    await redis.hincrby(keys.metrics_key("consumed"), "svc.a", 7)
    await record_gc_pass(backend, duration=1.5, deleted_tasks=3, deleted_objects=2)

    state = await DeploymentState.load(backend)
    await replica.aclose()

    assert list(state.binds) == ["svc.a", "svc.b"]
    a, b = state.binds["svc.a"], state.binds["svc.b"]
    assert (a.replicas, a.service_version, a.persistent, a.filters) == (
        1,
        "1.2",
        True,
        [{"type": "x"}],
    )
    assert (b.replicas, b.persistent) == (0, False)
    qa = state.queues["svc.a"]
    assert qa.queued == {"high": 1, "normal": 0, "low": 2, "legacy": 1}
    assert (qa.leased, qa.dead, qa.pending) == (2, 0, 6)
    assert state.queues["svc.b"].dead == 1
    assert (state.unrouted, state.retries_scheduled) == (2, 1)
    assert {r.instance: r.alive for r in state.routers} == {"live": True, "dead": False}
    assert state.routers_alive == 1 == await routers_alive(backend)
    assert state.gc is not None and (state.gc.deleted_tasks, state.gc.duration) == (3, 1.5)
    assert state.gc.age < 60
    assert state.metrics["consumed"] == {"svc.a": 7}
    assert state.redis is None  # the embedded server has no INFO
    doc = state.to_json()
    assert doc["queues"]["svc.a"]["pending"] == 6 and doc["routers"][0]["alive"] in (True, False)


async def test_state_never_reads_a_task(
    backend: KartonBackend, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Loading the state costs the same with 300 tasks or none: no SCAN, GET or MGET."""
    await backend.register_bind(Bind(identity="svc.a", filters=[]))
    await backend.set_tasks(routed("svc.a", TaskState.SPAWNED) for _ in range(300))

    def forbidden(*args: object, **kwargs: object) -> None:
        raise AssertionError("inspection read the tasks")

    for name in ("scan", "mget", "get", "keys"):
        monkeypatch.setattr(backend.redis, name, forbidden)
    state = await DeploymentState.load(backend)
    assert list(state.queues) == ["svc.a"]


async def test_count_tasks_groups_by_receiver_priority_and_status(backend: KartonBackend) -> None:
    tasks = [
        routed("svc.a", TaskState.STARTED),
        routed("svc.a", TaskState.CRASHED),
        routed("svc.a", TaskState.CRASHED, "high"),
        routed("svc.b", TaskState.SPAWNED),
        Task({"type": "unrouted"}),
    ]
    await backend.set_tasks(tasks)
    await backend.redis.set(keys.task_key("broken"), "{not json")

    counts = await count_tasks(backend)

    assert counts.counts[("svc.a", "normal", "Crashed")] == 1
    assert counts.counts[("svc.a", "high", "Crashed")] == 1
    by_identity = counts.by_identity()
    assert dict(by_identity["svc.a"]) == {"Started": 1, "Crashed": 2}
    assert dict(by_identity["svc.b"]) == {"Spawned": 1}
    assert dict(by_identity[""]) == {"Declared": 1, "Unreadable": 1}


async def test_delete_refuses_a_bind_with_live_replicas_unless_forced(
    backend: KartonBackend,
) -> None:
    bind = Bind(identity="svc.a", filters=[{"type": "x"}], service_version="2")
    await backend.register_bind(bind)
    replica = backend.connector.named("svc.a")
    await replica.ping()
    try:
        with pytest.raises(BindInUseError, match="1 replica"):
            await delete_bind(backend, "svc.a")
        assert await backend.get_bind("svc.a") == bind  # untouched

        old = await delete_bind(backend, "svc.a", force=True)
    finally:
        await replica.aclose()

    assert old == bind
    now = await backend.get_bind("svc.a")
    assert now is not None and (now.persistent, now.filters) == (False, [])
    assert now.service_version == "2"


async def test_delete_a_gone_bind_and_an_unknown_one(backend: KartonBackend) -> None:
    await backend.register_bind(Bind(identity="svc.gone", filters=[{"type": "x"}]))
    await delete_bind(backend, "svc.gone")
    gone = await backend.get_bind("svc.gone")
    assert gone is not None and not gone.persistent
    with pytest.raises(UnknownBindError, match=r"svc\.nope"):
        await delete_bind(backend, "svc.nope")
