"""pynenc's other ConfigTask options on the embedded default, and timeouts that hold.

``parallel_batch_size`` (send_tasks chunks, the router's batch), ``call_result_cache``
with ``disable_cache_args`` and its TTL, ``force_new_workflow``, and a handler that blocks
the event loop past ``task_timeout``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from pathlib import Path
from typing import ClassVar

import anyio
import pytest

from asynckarton import (
    Config,
    Consumer,
    Karton,
    LocalResource,
    RemoteResource,
    SystemService,
    Task,
    TaskState,
    testing,
)
from asynckarton._services._result_cache import PARENT_ANALYSIS, arguments_digest
from asynckarton.system import GarbageCollector

LOG = logging.getLogger("test.task_options")

pytestmark = pytest.mark.anyio


class Blocker(Consumer):
    identity = "test.blocker"
    filters = [{"type": "block"}]
    task_timeout = 0.2

    async def process(self, task: Task) -> None:
        time.sleep(float(task.payload["sleep"]))  # noqa: ASYNC251 - the point of the test


async def test_a_handler_blocking_past_task_timeout_crashes_with_timeout(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.ERROR)
    async with testing.pipeline(Blocker, data_dir=tmp_path) as p:
        await p.send(
            Task({"type": "block"}, payload={"sleep": 0.5}),
            Task({"type": "block"}, payload={"sleep": 0.0}),
        )
        await p.wait_idle()
        tasks = await p.tasks(receiver="test.blocker")
    by_sleep = {t.payload["sleep"]: t for t in tasks}
    assert by_sleep[0.0].status is TaskState.FINISHED
    blocked = by_sleep[0.5]
    assert blocked.status is TaskState.CRASHED
    assert "TaskTimeoutError" in "".join(blocked.error or [])
    lines = [r.getMessage() for r in caplog.records if "blocked the event loop" in r.getMessage()]
    assert len(lines) == 1 and blocked.uid in lines[0] and "to_thread" in lines[0]


# -- the services the option tests run ---------------------------------------------------


class Analyser(Karton):
    """Sends one output (with a resource) per task; counts its real runs."""

    identity = "test.analyser"
    filters = [{"type": "sample"}]
    call_result_cache = True
    runs: ClassVar[list[str]] = []

    async def process(self, task: Task) -> None:
        type(self).runs.append(task.uid)
        if task.payload.get("fail"):
            raise ValueError("this run fails")
        data = f"report of {task.payload.get('n')}".encode()
        out = Task({"type": "report"}, payload={"n": task.payload.get("n")})
        out.add_resource("report", LocalResource("report", data))
        await self.send_task(out)


class Reports(Consumer):
    identity = "test.reports"
    filters = [{"type": "report"}]
    seen: ClassVar[list[Task]] = []

    async def process(self, task: Task) -> None:
        type(self).seen.append(task)


class Splitter(Karton):
    """Sends a child that starts a new analysis."""

    identity = "test.splitter"
    filters = [{"type": "split"}]

    async def process(self, task: Task) -> None:
        await self.send_tasks([Task({"type": "report", "n": "new"})], force_new_workflow=True)


@pytest.fixture(autouse=True)
def _reset() -> None:
    Analyser.runs.clear()
    Reports.seen.clear()


def sample(n: int, **payload: object) -> Task:
    return Task({"type": "sample"}, payload={"n": n, **payload})


def config_with(tmp_path: Path, **karton: object) -> Config:
    return testing.embedded_config(tmp_path, karton=dict(karton))


# -- call_result_cache ------------------------------------------------------------------


async def test_an_equal_task_is_served_from_the_cache_and_its_outputs_resent(
    tmp_path: Path,
) -> None:
    async with testing.pipeline(Analyser, Reports, data_dir=tmp_path) as p:
        await p.send(sample(1))
        await p.wait_idle()
        await p.send(sample(1), sample(2))
        await p.wait_idle()
        copies = await p.tasks(receiver="test.analyser")
    assert len(Analyser.runs) == 2  # 1 once, 2 once: the second 1 was not processed
    assert all(t.status is TaskState.FINISHED for t in copies)
    assert len(Reports.seen) == 3  # every copy of a sample has its report
    by_parent = {t.parent_uid: t for t in Reports.seen}
    assert set(by_parent) == {t.uid for t in copies}  # each report is its own copy's child
    for copy in copies:
        report = by_parent[copy.uid]
        assert report.root_uid == copy.root_uid
        assert report.payload["n"] == copy.payload["n"]
    ones = [by_parent[c.uid] for c in copies if c.payload["n"] == 1]
    digests = {r.get_resource("report").sha256 for r in ones}
    assert len(digests) == 1 and None not in digests  # the same resource, resent


async def test_the_cache_is_off_unless_asked(tmp_path: Path) -> None:
    assert Reports(config_with(tmp_path)).policy.call_result_cache is False  # the default
    config = config_with(tmp_path, call_result_cache="0")  # a layer beats the class value
    async with testing.pipeline(Analyser, Reports, config=config) as p:
        for _ in range(2):
            await p.send(sample(1))
            await p.wait_idle()
    assert len(Analyser.runs) == 2 and len(Reports.seen) == 2


async def test_disable_cache_args_leaves_arguments_out_of_the_comparison(
    tmp_path: Path,
) -> None:
    config = config_with(tmp_path, disable_cache_args="payload.note")
    async with testing.pipeline(Analyser, Reports, config=config) as p:
        await p.send(sample(1, note="a"))
        await p.wait_idle()
        await p.send(sample(1, note="b"))
        await p.wait_idle()
    assert len(Analyser.runs) == 1 and len(Reports.seen) == 2


async def test_a_star_disables_the_cache(tmp_path: Path) -> None:
    config = config_with(tmp_path, disable_cache_args="*")
    async with testing.pipeline(Analyser, Reports, config=config) as p:
        await p.send(sample(1))
        await p.wait_idle()
        await p.send(sample(1))
        await p.wait_idle()
    assert len(Analyser.runs) == 2


async def test_failures_are_not_cached_and_entries_expire(tmp_path: Path) -> None:
    config = config_with(tmp_path, call_result_cache_ttl="0.3")
    async with testing.pipeline(Analyser, Reports, config=config) as p:
        for _ in range(2):
            await p.send(sample(1, fail=True))
            await p.wait_idle()
        assert len(Analyser.runs) == 2  # a crash leaves nothing cached
        await p.send(sample(2))
        await p.wait_idle()
        await anyio.sleep(0.5)  # past the TTL
        await p.send(sample(2))
        await p.wait_idle()
    assert len(Analyser.runs) == 4


def test_arguments_leave_routing_fields_out_and_compare_resources_by_sha256() -> None:
    first = Task({"type": "x", "origin": "a", "receiver": "r1"}, payload={"k": 1})
    second = Task({"type": "x", "origin": "b", "receiver": "r2"}, payload={"k": 1})
    assert arguments_digest(first) == arguments_digest(second)
    persistent = Task({"type": "x"}, payload={"k": 1}, payload_persistent={"p": 2})
    assert arguments_digest(persistent) != arguments_digest(first)
    one = RemoteResource("a", bucket="b", uid="u1")
    two = RemoteResource("a", bucket="b", uid="u2")
    one.sha256 = two.sha256 = "ab" * 32
    with_one = Task({"type": "x"}, payload={"r": one})
    with_two = Task({"type": "x"}, payload={"r": two})
    assert arguments_digest(with_one) == arguments_digest(with_two)
    assert arguments_digest(with_one, ["payload.r"]) == arguments_digest(Task({"type": "x"}))
    header = Task({"type": "x", "kind": "y"})
    assert arguments_digest(header, ["headers.kind"]) == arguments_digest(Task({"type": "x"}))


async def test_the_gc_keeps_resources_a_cached_result_references(tmp_path: Path) -> None:
    async with testing.pipeline(Analyser, Reports, data_dir=tmp_path) as p:
        await p.send(sample(1))
        await p.wait_idle()
        producer = p.producer
        settings = p.config.system_settings()
        gc = GarbageCollector(
            producer.backend, producer.storage, producer.runtime.bucket, settings, LOG
        )

        async def objects() -> set[str]:
            bucket = producer.runtime.bucket
            return {v.key async for v in producer.storage.list_object_versions(bucket)}

        before = await objects()
        assert len(before) == 1
        report = await gc.collect()
        assert report is not None and report.deleted_tasks > 0  # the Finished tasks went
        assert await objects() == before  # the cached output still references it
        async for key in producer.backend.redis.scan_iter(match="asynckarton.cache:*"):
            await producer.backend.redis.delete(key)  # as its TTL would
        await gc.collect()
        assert await objects() == set()


# -- force_new_workflow -------------------------------------------------------------------


async def test_force_new_workflow_starts_a_linked_analysis(tmp_path: Path) -> None:
    async with testing.pipeline(Splitter, Reports, data_dir=tmp_path) as p:
        await p.send(Task({"type": "split"}))
        await p.wait_idle()
        (parent,) = await p.tasks(receiver="test.splitter")
    (child,) = Reports.seen
    assert child.root_uid != parent.root_uid
    assert child.uid.startswith("{" + child.root_uid + "}:")
    assert child.parent_uid == parent.uid
    assert child.payload[PARENT_ANALYSIS] == {"root_uid": parent.root_uid, "uid": parent.uid}


async def test_force_new_workflow_from_config_and_off_by_default(tmp_path: Path) -> None:
    class Plain(Karton):
        identity = "test.plain"
        filters = [{"type": "plain"}]

        async def process(self, task: Task) -> None:
            await self.send_task(Task({"type": "report"}))

    for setting, new in (("0", False), ("1", True)):
        Reports.seen.clear()
        config = config_with(tmp_path / setting, force_new_workflow=setting)
        async with testing.pipeline(Plain, Reports, config=config) as p:
            await p.send(Task({"type": "plain"}))
            await p.wait_idle()
            (parent,) = await p.tasks(receiver="test.plain")
        (child,) = Reports.seen
        assert (child.root_uid != parent.root_uid) is new
        assert (PARENT_ANALYSIS in child.payload) is new


# -- parallel_batch_size -------------------------------------------------------------------


@pytest.mark.parametrize(("size", "chunks"), [(0, 1), (2, 3), (5, 1)])
async def test_send_tasks_is_chunked_by_parallel_batch_size(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, size: int, chunks: int
) -> None:
    config = config_with(tmp_path, parallel_batch_size=str(size))
    calls: list[int] = []
    async with testing.pipeline(Reports, config=config) as p:
        original = p.producer.backend.enqueue_unrouted

        async def counting(bodies: Mapping[str, str], identity: str) -> None:
            calls.append(len(bodies))
            await original(bodies, identity)

        monkeypatch.setattr(p.producer.backend, "enqueue_unrouted", counting)
        await p.send(*(Task({"type": "report"}) for _ in range(5)))
        await p.wait_idle()
    assert len(calls) == chunks and sum(calls) == 5, calls
    assert len(Reports.seen) == 5


def test_the_router_batch_size_is_configurable(tmp_path: Path) -> None:
    config = testing.embedded_config(tmp_path, system={"route_batch_size": "7"})
    assert SystemService(config).batch_size == 7
    assert SystemService(testing.embedded_config(tmp_path)).batch_size == 500
    assert SystemService(config, batch_size=3).batch_size == 3
