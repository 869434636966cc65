"""The garbage collector on the embedded mode, driven through its API.

Tasks are written with the backend (as producers, routers and consumers leave them),
resources go to a local directory; each test runs ``collect()`` (or ``run()``) and
checks what is left.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import anyio
import pytest

from asynckarton import LocalResource, Task, TaskState
from asynckarton._errors import BackendUnavailableError
from asynckarton._settings._options import SystemSettings
from asynckarton.backend import Bind, EmbeddedConnector, KartonBackend
from asynckarton.backend import _keys as keys
from asynckarton.storage import LocalStorage
from asynckarton.system import GarbageCollector, GCReport
from asynckarton.system._gc import STARTED_TIMEOUT_ERROR

pytestmark = pytest.mark.anyio

BUCKET = "karton"
EXTRA = "extra"
HOUR = 3600.0
LOG = logging.getLogger("test.gc")


@dataclass
class Env:
    connector: EmbeddedConnector
    backend: KartonBackend
    storage: LocalStorage

    def gc(self, **settings: float | bool) -> GarbageCollector:
        """A collector with short, explicit timeouts (overridable)."""
        values: dict[str, float | bool] = {
            "gc_interval": 0.05,
            "task_dispatched_timeout": HOUR,
            "task_started_timeout": HOUR,
            "task_crashed_timeout": HOUR,
            "task_spawned_timeout": HOUR,
            **settings,
        }
        config = dataclasses.replace(SystemSettings(), **values)  # type: ignore[arg-type]
        return GarbageCollector(
            self.backend, self.storage, BUCKET, config, LOG, extra_buckets=(EXTRA,)
        )

    async def store(self, *tasks: Task) -> None:
        await self.backend.set_tasks(tasks)

    async def status(self, task: Task) -> str | None:
        body = await self.backend.get_task_body(task.uid)
        return None if body is None else str(json.loads(body)["status"])

    async def objects(self, bucket: str = BUCKET) -> set[str]:
        return {v.key async for v in self.storage.list_object_versions(bucket)}


@pytest.fixture
async def env(tmp_path: Path) -> AsyncIterator[Env]:
    connector = EmbeddedConnector()
    backend = KartonBackend(connector)
    async with LocalStorage(tmp_path / "storage") as storage:
        for bucket in (BUCKET, EXTRA):
            await storage.ensure_bucket(bucket, create=True)
        yield Env(connector, backend, storage)
    await backend.aclose()


def task(status: TaskState, age: float, receiver: str | None = "svc", **payload: object) -> Task:
    """A task in ``status`` last updated ``age`` seconds ago (routed to ``receiver``)."""
    made = Task({"type": "sample"}, payload=payload)
    if receiver is not None:
        made = made.fork_task()
        made.headers["receiver"] = receiver
    made.status = status
    made.last_update = time.time() - age
    return made


# -- task rules --------------------------------------------------------------------------


async def test_finished_and_old_tasks_are_collected_young_ones_kept(env: Env) -> None:
    doomed = {
        "finished": task(TaskState.FINISHED, 0),
        "old crashed": task(TaskState.CRASHED, 2 * HOUR),
        "old declared": task(TaskState.DECLARED, 2 * HOUR, receiver=None),
        "old started": task(TaskState.STARTED, 2 * HOUR),
    }
    kept = {
        "young crashed": task(TaskState.CRASHED, 60),
        "young declared": task(TaskState.DECLARED, 60, receiver=None),
        "old declared, still unrouted": task(TaskState.DECLARED, 2 * HOUR, receiver=None),
        "young started": task(TaskState.STARTED, 60),
        "old spawned, queued": task(TaskState.SPAWNED, 2 * HOUR),
    }
    await env.store(*doomed.values(), *kept.values())
    await env.backend.redis.rpush(keys.TASKS_QUEUE, kept["old declared, still unrouted"].uid)
    await env.backend.redis.rpush(keys.queue_key("normal", "svc"), kept["old spawned, queued"].uid)

    report = await env.gc().collect()

    assert report == GCReport(deleted_tasks=4)
    for name, gone in doomed.items():
        assert await env.status(gone) is None, name
    for name, alive in kept.items():
        assert await env.status(alive) == alive.status.value, name
    collected = await env.backend.redis.hgetall(keys.metrics_key("garbage-collected"))
    assert collected == {"svc": "3", "unknown": "1"}


async def test_started_too_long_can_be_marked_crashed_instead(env: Env) -> None:
    stuck = task(TaskState.STARTED, 2 * HOUR)
    await env.store(stuck)
    report = await env.gc(crash_started_tasks_on_timeout=True).collect()
    assert report is not None and report.crashed_tasks == 1 and report.deleted_tasks == 0
    body = await env.backend.get_task_body(stuck.uid)
    assert body is not None
    crashed = json.loads(body)
    assert crashed["status"] == "Crashed" and crashed["error"] == [STARTED_TIMEOUT_ERROR]
    assert crashed["last_update"] > time.time() - 60
    assert await env.backend.redis.hget(keys.metrics_key("crashed"), "svc") == "1"


async def test_orphaned_spawned_tasks_are_requeued_once(env: Env) -> None:
    orphan = task(TaskState.SPAWNED, 2 * HOUR)
    leased = task(TaskState.SPAWNED, 2 * HOUR)
    young = task(TaskState.SPAWNED, 60)
    await env.store(orphan, leased, young)
    await env.backend.redis.zadd(keys.leases_key("svc"), {leased.uid: time.time() * 1000})
    gc = env.gc()
    report = await gc.collect()
    assert report is not None and report.requeued_orphans == 1
    assert await env.backend.redis.lrange(keys.queue_key("normal", "svc"), 0, -1) == [orphan.uid]
    again = await gc.collect()
    assert again is not None and again.requeued_orphans == 0  # it is queued now


async def test_offline_non_persistent_binds_go_with_their_tasks(env: Env) -> None:
    for identity, persistent in (("gone.np", False), ("online.np", False), ("gone.p", True)):
        await env.backend.register_bind(Bind(identity=identity, filters=[], persistent=persistent))
    await env.backend.redis.rpush(keys.queue_key("normal", "gone.np"), "x")
    their_task = task(TaskState.SPAWNED, 0, receiver="gone.np")
    others = task(TaskState.SPAWNED, 0, receiver="gone.p")
    await env.store(their_task, others)
    presence = env.connector.named("online.np?v=1")
    try:
        await presence.ping()
        report = await env.gc().collect()
    finally:
        await presence.aclose()
    assert report is not None and report.removed_binds == ["gone.np"]
    assert set(await env.backend.get_binds_raw()) == {"online.np", "gone.p"}
    assert await env.backend.redis.exists(keys.queue_key("normal", "gone.np")) == 0
    assert await env.status(their_task) is None
    assert await env.status(others) == "Spawned"


async def test_gc_holds_a_lock_and_releases_it(env: Env) -> None:
    finished = task(TaskState.FINISHED, 0)
    await env.store(finished)
    assert await env.backend.take_gc_lock("someone else", ttl=15)
    assert await env.gc().collect() is None  # another collector is running
    assert await env.status(finished) == "Finished"
    assert await env.backend.release_gc_lock("someone else")
    report = await env.gc().collect()
    assert report is not None and report.deleted_tasks == 1
    assert await env.backend.redis.exists(keys.GC_LOCK) == 0


# -- resources ---------------------------------------------------------------------------


async def upload(env: Env, data: bytes, bucket: str = BUCKET) -> LocalResource:
    resource = LocalResource("sample", data)
    await resource.upload(env.storage, bucket=bucket)
    return resource


async def test_unreferenced_objects_are_deleted_in_every_bucket(env: Env) -> None:
    live = await upload(env, b"live")
    dead_task_resource = await upload(env, b"of a finished task")
    live_extra = await upload(env, b"live extra", bucket=EXTRA)
    await env.storage.put_bytes(BUCKET, "orphan", b"x")
    await env.storage.put_bytes(EXTRA, "orphan-extra", b"x")
    await env.store(
        task(TaskState.SPAWNED, 0, sample=live, other=live_extra),
        task(TaskState.FINISHED, 0, sample=dead_task_resource),
    )
    report = await env.gc().collect()
    assert report is not None and report.deleted_objects == 3 and report.deleted_tasks == 1
    assert await env.objects() == {live.uid}
    assert await env.objects(EXTRA) == {live_extra.uid}


# -- bad task bodies ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "body",
    [
        "{not json",
        '["a", "list"]',
        '{"uid": 1}',
        None,  # a Finished task whose last_update is a string (valid JSON, wrong type)
    ],
)
async def test_an_unreadable_task_is_kept_and_stops_resource_collection(
    env: Env, body: str | None, caplog: pytest.LogCaptureFixture
) -> None:
    poison = task(TaskState.FINISHED, 0)
    if body is None:
        doc = json.loads(poison.serialize())
        doc["last_update"] = "yesterday"
        body = json.dumps(doc, sort_keys=True)
    await env.backend.redis.set(keys.task_key(poison.uid), body)
    finished = task(TaskState.FINISHED, 0)
    await env.store(finished)
    await env.storage.put_bytes(BUCKET, "orphan", b"x")

    report = await env.gc().collect()

    assert report is not None and report.deleted_tasks == 1  # the readable one
    assert await env.backend.get_task_body(poison.uid) == body  # kept, untouched
    assert await env.objects() == {"orphan"}  # its resources are unknown: delete nothing
    messages = "\n".join(r.getMessage() for r in caplog.records)
    assert f"task {poison.uid} is unreadable and is kept" in messages
    assert "Resource GC skipped: a task is unreadable" in messages


# -- the periodic loop -------------------------------------------------------------------


async def test_run_collects_periodically_and_outlives_redis_outages(
    env: Env, caplog: pytest.LogCaptureFixture
) -> None:
    gc = env.gc(gc_interval=0.02)
    env.connector.server.connected = False
    with pytest.raises(BackendUnavailableError, match="take the GC lock"):
        await gc.collect()
    async with anyio.create_task_group() as group:
        group.start_soon(gc.run)
        with anyio.fail_after(5):
            while "GC skipped, Redis unavailable" not in caplog.text:
                await anyio.sleep(0.02)
        env.connector.server.connected = True
        done = task(TaskState.FINISHED, 0)
        await env.store(done)
        with anyio.fail_after(5):
            while await env.status(done) is not None:
                await anyio.sleep(0.02)
        group.cancel_scope.cancel()
