"""The router on the embedded Redis, driven through its API (``route`` and ``run``).

Karton's key names are spelled out: they are the wire contract the router writes.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator
from typing import Any, cast

import anyio
import pytest

from asynckarton import Task, TaskPriority
from asynckarton._wire import _document
from asynckarton.backend import Bind, EmbeddedConnector, KartonBackend
from asynckarton.backend import _keys as keys
from asynckarton.system._router import Router

pytestmark = pytest.mark.anyio

PRODUCER = "test.producer"


@pytest.fixture
async def backend() -> AsyncIterator[KartonBackend]:
    backend = KartonBackend(EmbeddedConnector())
    try:
        yield backend
    finally:
        await backend.aclose()


def make_router(backend: KartonBackend, instance: str = "r1", **kwargs: Any) -> Router:
    return Router(backend, logging.getLogger("karton.system"), instance=instance, **kwargs)


async def bind(backend: KartonBackend, identity: str, filters: list[dict[str, Any]]) -> None:
    await backend.register_bind(Bind(identity=identity, filters=filters))


async def send(backend: KartonBackend, *tasks: Task) -> list[str]:
    await backend.enqueue_unrouted({t.uid: t.serialize() for t in tasks}, PRODUCER)
    return [t.uid for t in tasks]


async def route_all(router: Router, backend: KartonBackend) -> None:
    """One round, as ``run`` does it: take into the journal, then route and commit."""
    await router.route(await backend.route_pop(router.instance, 100))


async def queue(backend: KartonBackend, identity: str, priority: str = "normal") -> list[str]:
    return cast(list[str], await backend.redis.lrange(f"karton.queue.{priority}:{identity}", 0, -1))


async def body(backend: KartonBackend, uid: str) -> dict[str, Any]:
    raw = await backend.get_task_body(uid)
    assert raw is not None, f"no body for {uid}"
    doc: dict[str, Any] = json.loads(raw)
    return doc


async def test_a_task_goes_to_every_matching_bind_only(backend: KartonBackend) -> None:
    await bind(backend, "svc.a", [{"type": "sample"}])
    await bind(backend, "svc.b", [{"type": "sample", "kind": "raw"}])
    await bind(backend, "svc.other", [{"type": "report"}])
    task = Task({"type": "sample", "kind": "raw", "origin": PRODUCER}, payload={"n": 1})
    [uid] = await send(backend, task)
    router = make_router(backend)
    await route_all(router, backend)

    [fork_a] = await queue(backend, "svc.a")
    [fork_b] = await queue(backend, "svc.b")
    assert await queue(backend, "svc.other") == []
    for identity, fork_uid in (("svc.a", fork_a), ("svc.b", fork_b)):
        fork = await body(backend, fork_uid)
        assert fork_uid.startswith("{" + task.root_uid + "}:") and fork_uid != uid
        assert fork["status"] == "Spawned" and fork["orig_uid"] == uid
        assert fork["root_uid"] == task.root_uid and fork["headers"]["receiver"] == identity
        assert fork["payload"] == {"n": 1}
    original = await body(backend, uid)
    assert original["status"] == "Finished" and "receiver" not in original["headers"]
    assert await backend.redis.hgetall("karton.metrics.assigned") == {"svc.a": "1", "svc.b": "1"}
    assert await backend.redis.llen("karton.tasks") == 0
    assert await backend.journal(router.instance) == []
    assert router.routed == 1


async def test_fan_out_gives_each_bind_its_own_copy_in_the_tasks_priority(
    backend: KartonBackend,
) -> None:
    identities = [f"svc.{n}" for n in range(5)]
    for identity in identities:
        await bind(backend, identity, [{"type": "sample"}])
    tasks = [Task({"type": "sample", "n": str(n)}, priority=TaskPriority.HIGH) for n in range(3)]
    await send(backend, *tasks)
    await route_all(make_router(backend), backend)

    forks = [uid for identity in identities for uid in await queue(backend, identity, "high")]
    assert len(forks) == len(set(forks)) == 15
    for identity in identities:
        assert await queue(backend, identity) == []  # nothing in the normal queue
        routed = [await body(backend, uid) for uid in await queue(backend, identity, "high")]
        assert sorted(f["orig_uid"] for f in routed) == sorted(t.uid for t in tasks)
        assert {f["priority"] for f in routed} == {"high"}


async def test_a_task_no_bind_matches_is_finished_and_tracked(backend: KartonBackend) -> None:
    await bind(backend, "svc.a", [{"type": "sample"}])
    task = Task({"type": "nothing-wants-it", "origin": PRODUCER})
    [uid] = await send(backend, task)
    await route_all(make_router(backend), backend)

    assert await queue(backend, "svc.a") == []
    assert (await body(backend, uid))["status"] == "Finished"
    assert await backend.redis.hgetall("karton.metrics.assigned") == {}
    tracked = await backend.redis.smembers(f"karton.outputs:{PRODUCER}")
    wire_headers = json.loads(task.serialize())["headers"]
    assert tracked == {json.dumps(wire_headers)}  # exactly as karton-system writes it


async def test_persistent_headers_are_routed_on_and_copied_to_every_fork(
    backend: KartonBackend,
) -> None:
    await bind(backend, "svc.amber", [{"type": "sample", "tlp": "amber"}])
    task = Task({"type": "sample"}, headers_persistent={"tlp": "amber"})
    legacy = json.loads(Task({"type": "sample"}, headers_persistent={"tlp": "amber"}).serialize())
    del legacy["headers_persistent"]  # a Karton < 5.2 writer: only the embedded copy
    legacy["headers"] = {"type": "sample"}
    await send(backend, task)
    await backend.enqueue_unrouted({legacy["uid"]: json.dumps(legacy)}, PRODUCER)
    await route_all(make_router(backend), backend)

    forks = [await body(backend, uid) for uid in await queue(backend, "svc.amber")]
    assert sorted(f["orig_uid"] for f in forks) == sorted([task.uid, legacy["uid"]])
    for fork in forks:
        assert fork["headers"] == {"type": "sample", "tlp": "amber", "receiver": "svc.amber"}
        assert fork["headers_persistent"] == {"tlp": "amber"}
        assert fork["payload_persistent"]["__headers_persistent"] == {"tlp": "amber"}
        assert Task.from_dict(fork).is_header_persistent("tlp")


async def test_bad_bodies_are_quarantined_and_the_rest_of_the_batch_routed(
    backend: KartonBackend,
) -> None:
    await bind(backend, "svc.a", [{"type": "sample"}])
    good = Task({"type": "sample"})
    no_headers = json.loads(Task({"type": "sample"}).serialize())
    del no_headers["headers"]
    bodies = {
        "{r}:not-json": "{",
        "{r}:no-headers": json.dumps(no_headers),
        good.uid: good.serialize(),
    }
    await backend.enqueue_unrouted(bodies, PRODUCER)
    await backend.redis.rpush("karton.tasks", "{r}:deleted")  # uid without a body
    await route_all(make_router(backend), backend)

    [fork] = await queue(backend, "svc.a")
    assert (await body(backend, fork))["orig_uid"] == good.uid
    invalid = await backend.redis.lrange(keys.INVALID, 0, -1)
    assert invalid == ["{r}:not-json", "{r}:no-headers"]
    assert (await backend.stats())["invalid"] == 2
    assert await backend.get_task_body("{r}:not-json") == "{"  # kept for an operator


async def test_a_journalled_batch_is_routed_once_by_the_next_run(backend: KartonBackend) -> None:
    await bind(backend, "svc.a", [{"type": "sample"}])
    tasks = [Task({"type": "sample", "n": str(n)}) for n in range(3)]
    await send(backend, *tasks)
    router = make_router(backend, "crashed")
    taken = await backend.route_pop(router.instance, 100)  # ... and the router dies here
    assert len(taken) == 3 and await backend.journal(router.instance) == taken
    assert await backend.redis.llen("karton.tasks") == 0

    async with anyio.create_task_group() as group:
        await group.start(router.run)  # the same instance restarted: its journal first
        with anyio.fail_after(5):
            while len(await queue(backend, "svc.a")) < 3:
                await anyio.sleep(0.01)
        group.cancel_scope.cancel()
    forks = [await body(backend, uid) for uid in await queue(backend, "svc.a")]
    assert sorted(f["orig_uid"] for f in forks) == sorted(t.uid for t in tasks)
    assert await backend.journal(router.instance) == []


async def test_a_dead_routers_journal_goes_back_to_the_queue(backend: KartonBackend) -> None:
    await send(backend, Task({"type": "sample"}))
    taken = await backend.route_pop("dead", 100)
    await backend.heartbeat_router("dead", -1.0)  # its heartbeat has expired
    assert await backend.recover_routing() == 1
    assert await backend.redis.lrange("karton.tasks", 0, -1) == taken
    assert await backend.journal("dead") == []


async def test_each_routed_task_publishes_karton_systems_log_line(
    backend: KartonBackend,
) -> None:
    task = Task({"type": "sample"})
    await send(backend, task)
    pubsub: Any = backend.redis.pubsub()  # redis-py leaves PubSub untyped
    await pubsub.psubscribe("karton.log.*")
    try:
        await route_all(make_router(backend), backend)
        with anyio.fail_after(5):
            message = None
            while message is None:
                message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=0.1)
    finally:
        await pubsub.aclose()
    assert message["channel"] == "karton.log.info.karton.system"
    line = json.loads(message["data"])
    assert line["message"] == f"[{task.root_uid}] Processing task {task.task_uid}"
    assert line["name"] == "karton.system" and line["levelname"] == "INFO"
    assert line["task_id"] == "(no task)" and "task" not in line and line["type"] == "log"
    assert line["filename"] == "_router.py" and line["funcName"] == "_log_record"
    source = await anyio.Path(Router.__module__.replace(".", "/") + ".py").read_text()
    assert "site_line_maker(" in source.splitlines()[line["lineno"] - 1]


async def test_publishing_and_tracking_can_be_switched_off(backend: KartonBackend) -> None:
    await send(backend, Task({"type": "sample", "origin": PRODUCER}))
    pubsub: Any = backend.redis.pubsub()  # redis-py leaves PubSub untyped
    await pubsub.psubscribe("karton.log.*")
    try:
        await route_all(make_router(backend, publish_logs=False, tracking_ttl=0), backend)
        message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=0.2)
    finally:
        await pubsub.aclose()
    assert message is None
    assert await backend.redis.exists(f"karton.outputs:{PRODUCER}") == 0


async def test_binds_with_bad_filters_are_skipped_and_reported(
    backend: KartonBackend, caplog: pytest.LogCaptureFixture
) -> None:
    await bind(backend, "svc.good", [{"type": "sample"}])
    await bind(backend, "svc.invalid", [{"type": {"$nope": 1}}])
    await bind(backend, "svc.fails", [{"type": "sample", "size": {"$mod": [2, 0]}}])
    await send(backend, *(Task({"type": "sample", "size": "big"}) for _ in range(3)))
    with caplog.at_level(logging.ERROR, logger="karton.system"):
        await route_all(make_router(backend), backend)
    assert len(await queue(backend, "svc.good")) == 3
    assert await queue(backend, "svc.invalid") == await queue(backend, "svc.fails") == []
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert sum("svc.invalid has invalid filters" in e for e in errors) == 1
    assert sum("Filters of svc.fails failed" in e for e in errors) == 1  # once, not per task


async def test_forks_carry_the_retry_count_and_the_document_module_reads_them(
    backend: KartonBackend,
) -> None:
    await bind(backend, "svc.a", [{"type": "sample"}])
    task = Task({"type": "sample"})
    task.attempt = 2
    await send(backend, task)
    await route_all(make_router(backend), backend)
    [fork] = await queue(backend, "svc.a")
    assert _document.attempt_of(await body(backend, fork)) == 2


async def test_a_round_reads_uids_bodies_and_binds_in_one_round_trip(
    backend: KartonBackend, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each round is one read (``route_take``) and, with tasks, one commit; nothing else."""
    calls: list[str] = []
    for name in (
        "route_take", "route_idle", "route_commit", "route_pop",
        "get_task_bodies", "get_binds_raw",
    ):  # fmt: skip
        method = getattr(backend, name)

        def recorded(*args: Any, _method: Any = method, _name: str = name, **kw: Any) -> Any:
            calls.append(_name)
            return _method(*args, **kw)

        monkeypatch.setattr(backend, name, recorded)
    await bind(backend, "svc.a", [{"type": "sample"}])
    router = make_router(backend)
    async with anyio.create_task_group() as group:
        await group.start(router.run)
        await send(backend, Task({"type": "sample"}))
        with anyio.fail_after(5):
            while not await queue(backend, "svc.a"):
                await anyio.sleep(0.01)
        group.cancel_scope.cancel()
    # route_idle: the idle wait, when the first round found nothing yet; where BLMOVE
    # blocks it also reads the batch (tests/integration/test_router_round_trips.py)
    assert set(calls) <= {"route_take", "route_idle", "route_commit"}, calls
    assert "route_commit" in calls, calls
    assert calls[calls.index("route_commit") - 1] in ("route_take", "route_idle")
