"""The paths that must stay cheap at a million tasks, on a real redis-server.

* the GC pass publishes exact task counts by receiver, priority and status; ``status``
  and the metrics serve them in O(1) with their age; a stale or damaged snapshot (a
  crash, a bad write) is replaced by the next pass;
* the GC decides the list-dependent rules (Declared still unrouted, Spawned still queued)
  by reading the lists in slices, for a bounded sample of candidates per pass, and still
  reaches every orphan over the passes;
* scans pace themselves only while a live router has a backlog.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from types import SimpleNamespace
from typing import cast

import anyio
import pytest

from asynckarton import Config, Task, TaskPriority, TaskState
from asynckarton._services._inspect import DeploymentState
from asynckarton._services._metrics import SystemMetrics
from asynckarton._settings._options import SystemSettings
from asynckarton.backend import Bind, KartonBackend, _core
from asynckarton.backend import _keys as keys
from asynckarton.storage import LocalStorage
from asynckarton.system import GarbageCollector
from asynckarton.system import _gc as gc_module

pytestmark = [pytest.mark.anyio, pytest.mark.integration]

HOUR = 3600.0
LOG = logging.getLogger("test.scale")


@pytest.fixture
async def storage(tmp_path: Path) -> AsyncIterator[LocalStorage]:
    async with LocalStorage(tmp_path / "storage") as storage:
        await storage.ensure_bucket("karton", create=True)
        yield storage


def collector(backend: KartonBackend, storage: LocalStorage, **values: float) -> GarbageCollector:
    settings = dataclasses.replace(
        SystemSettings(),
        task_dispatched_timeout=HOUR,
        task_started_timeout=HOUR,
        task_crashed_timeout=HOUR,
        task_spawned_timeout=HOUR,
        **values,  # type: ignore[arg-type]
    )
    return GarbageCollector(backend, storage, "karton", settings, LOG)


def task(status: TaskState, receiver: str | None, *, age: float = 0.0, prio: str = "") -> Task:
    headers = {"type": "scale"} | ({"receiver": receiver} if receiver else {})
    made = Task(headers, priority=TaskPriority(prio) if prio else None)
    made.status = status
    made.last_update = time.time() - age
    return made


async def test_a_gc_pass_publishes_exact_counts_that_status_and_metrics_serve(
    backend: KartonBackend, storage: LocalStorage
) -> None:
    await backend.register_bind(Bind(identity="svc.a", filters=[{"type": "scale"}]))
    kept = [
        *(task(TaskState.SPAWNED, "svc.a") for _ in range(5)),
        *(task(TaskState.STARTED, "svc.a") for _ in range(2)),
        task(TaskState.CRASHED, "svc.a", prio="high"),
        task(TaskState.SPAWNED, "svc.b", prio="low"),
        task(TaskState.DECLARED, None),
    ]
    doomed = [task(TaskState.FINISHED, "svc.a") for _ in range(3)]
    await backend.set_tasks([*kept, *doomed])
    await backend.redis.set(keys.task_key("broken"), "{not json")
    assert (await DeploymentState.load(backend)).tasks is None  # no pass yet

    report = await collector(backend, storage).collect()

    assert report is not None and report.deleted_tasks == 3
    state = await DeploymentState.load(backend)
    assert state.tasks is not None
    assert state.tasks.counts == Counter(
        {
            ("svc.a", "normal", "Spawned"): 5,
            ("svc.a", "normal", "Started"): 2,
            ("svc.a", "high", "Crashed"): 1,
            ("svc.b", "low", "Spawned"): 1,
            ("", "normal", "Declared"): 1,
            ("", "", "Unreadable"): 1,
        }
    )
    assert state.tasks.age < 5
    assert state.to_json()["task_counts"]["by_identity"]["svc.a"] == {
        "Spawned": 5,
        "Started": 2,
        "Crashed": 1,
    }
    config = Config(environ={}, search_paths=[])
    service = SimpleNamespace(config=config, router=None, backend=backend)
    text = (await SystemMetrics(service).render()).decode()
    assert 'karton_tasks{name="svc_a",priority="normal",status="Spawned"} 5.0' in text
    assert "asynckarton_task_counts_age_seconds" in text


async def test_a_stale_or_damaged_snapshot_is_replaced_by_the_next_pass(
    backend: KartonBackend, storage: LocalStorage
) -> None:
    gc = collector(backend, storage)
    await backend.set_tasks([task(TaskState.SPAWNED, "svc.a") for _ in range(4)])
    await gc.collect()
    before = await DeploymentState.load(backend)
    assert before.tasks is not None
    # tasks change after the pass; a "crashed" pass leaves the old snapshot, older
    await backend.set_tasks([task(TaskState.STARTED, "svc.a") for _ in range(2)])
    await anyio.sleep(0.05)
    stale = await DeploymentState.load(backend)
    assert stale.tasks is not None and stale.tasks.counts == before.tasks.counts
    assert stale.tasks.age >= 0.045  # uvloop's timers run on a millisecond clock
    await backend.redis.set(keys.GC_COUNTS, '{"counts": [["svc.a", "normal"')  # damaged
    assert (await DeploymentState.load(backend)).tasks is None  # never a partial count

    await gc.collect()

    fixed = await DeploymentState.load(backend)
    assert fixed.tasks is not None
    assert fixed.tasks.counts == Counter(
        {("svc.a", "normal", "Spawned"): 4, ("svc.a", "normal", "Started"): 2}
    )


async def test_old_declared_tasks_in_a_routing_list_are_kept_the_rest_collected_over_passes(
    backend: KartonBackend, storage: LocalStorage, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_core, "LIST_SLICE", 3)  # lists longer than a slice
    unrouted = [task(TaskState.DECLARED, None, age=2 * HOUR) for _ in range(8)]
    journalled = task(TaskState.DECLARED, None, age=2 * HOUR)
    orphans = [task(TaskState.DECLARED, None, age=2 * HOUR) for _ in range(6)]
    fresh = task(TaskState.DECLARED, None)
    await backend.set_tasks([*unrouted, journalled, *orphans, fresh])
    await backend.redis.rpush(keys.TASKS_QUEUE, *(t.uid for t in unrouted))
    await backend.heartbeat_router("r1", 60)
    await backend.redis.rpush(keys.routing_key("r1"), journalled.uid)
    gc = collector(backend, storage)
    gc._declared = gc_module._Sample(4)  # fewer candidates than old Declared tasks
    gc._spawned = gc_module._Sample(4)

    deleted = 0
    for _ in range(20):
        report = await gc.collect()
        assert report is not None
        deleted += report.deleted_tasks
        if deleted == len(orphans):
            break

    assert deleted == len(orphans)
    left = {t.uid for t in [*unrouted, journalled, fresh]}
    for t in [*unrouted, journalled, fresh]:
        assert await backend.get_task_body(t.uid) is not None
    for t in orphans:
        assert await backend.get_task_body(t.uid) is None
    state = await DeploymentState.load(backend)
    assert state.tasks is not None
    assert state.tasks.counts == Counter({("", "normal", "Declared"): len(left)})
    assert await backend.redis.hget(keys.metrics_key("garbage-collected"), "unknown") == "6"


async def test_old_spawned_tasks_are_requeued_only_when_in_no_queue(
    backend: KartonBackend, storage: LocalStorage, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_core, "LIST_SLICE", 2)
    queued = [task(TaskState.SPAWNED, "svc.a", age=2 * HOUR) for _ in range(7)]
    orphan = task(TaskState.SPAWNED, "svc.a", age=2 * HOUR)
    await backend.set_tasks([*queued, orphan])
    queue = keys.queue_key("normal", "svc.a")
    await backend.redis.rpush(queue, *(t.uid for t in queued))

    report = await collector(backend, storage).collect()

    assert report is not None and report.requeued_orphans == 1
    assert await backend.redis.lrange(queue, 0, -1) == [t.uid for t in [*queued, orphan]]


async def test_members_are_found_while_the_list_is_popped_and_pushed(
    backend: KartonBackend, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_core, "LIST_SLICE", 5)
    uids = [f"u{n}" for n in range(40)]
    await backend.redis.rpush(keys.TASKS_QUEUE, *uids)
    original = backend.redis.lrange
    calls = 0

    async def lrange_meanwhile(name: str, start: int, end: int) -> list[str]:
        nonlocal calls
        calls += 1
        if calls > 1:  # a router pops the head, a producer pushes at the tail
            await backend.redis.lpop(keys.TASKS_QUEUE, 3)
            await backend.redis.rpush(keys.TASKS_QUEUE, f"new{calls}")
        return cast(list[str], await original(name, start, end))

    monkeypatch.setattr(backend.redis, "lrange", lrange_meanwhile)
    wanted = set(uids[20:])  # still in the list at the end
    found = await backend.unrouted_among(wanted)
    assert found == wanted


async def test_scans_pace_themselves_only_while_a_live_router_has_a_backlog(
    backend: KartonBackend,
) -> None:
    await backend.set_tasks([task(TaskState.SPAWNED, "svc.a") for _ in range(3000)])
    assert await backend.routing_backlog() == 0

    async def scan_seconds() -> float:
        began = time.perf_counter()
        async for _ in backend.scan_tasks(busy_share=0.01):
            await anyio.sleep(0.01)  # the caller's work on a batch
        return time.perf_counter() - began

    free = await scan_seconds()
    await backend.redis.rpush(keys.TASKS_QUEUE, "waiting")
    assert await backend.routing_backlog() == 0  # no router alive: nobody to give way to
    await backend.heartbeat_router("r1", 60)
    assert await backend.routing_backlog() == 1
    paced = await scan_seconds()
    assert paced > free + 0.5  # >= 99x the work time slept after each non-final batch
