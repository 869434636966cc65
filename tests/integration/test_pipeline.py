"""The whole pipeline over a real redis-server and a real (moto) S3 server.

Producer → SystemService (router and GC, in-process) → consumers, everything in one
event loop and one process, as a small deployment would run it.  Assertions read Redis
directly (raw keys, CLIENT LIST, PSUBSCRIBE) so they check the Karton 5 wire contract,
not asynckarton's own view of it.
"""

from __future__ import annotations

import json
import logging
import platform
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from typing import Any, ClassVar
from urllib.parse import parse_qs

import anyio
import anyio.lowlevel
import pytest
import redis.asyncio as aredis

from asynckarton import (
    Config,
    Consumer,
    InvalidTaskError,
    Karton,
    LocalResource,
    Producer,
    RemoteResource,
    SystemService,
    Task,
    TaskPriority,
    TaskState,
)
from asynckarton.backend import KARTON_PROTOCOL_VERSION, Bind
from asynckarton.storage import S3Storage
from asynckarton.system import GarbageCollector
from tests.servers import S3Server

pytestmark = [pytest.mark.integration, pytest.mark.anyio]

NO_GC = {"enable_gc": "0"}


# -- deployment helpers ------------------------------------------------------------------


@dataclass
class Deployment:
    """One test's Redis + S3 bucket, and a raw Redis client for assertions."""

    redis_url: str
    s3: S3Server
    bucket: str
    redis: aredis.Redis

    def config(self, **sections: dict[str, Any]) -> Config:
        config = Config(search_paths=[], environ={})
        config.load_from_dict(
            {
                "redis": {"url": self.redis_url},
                "s3": {
                    "address": self.s3.url,
                    "access_key": self.s3.access_key,
                    "secret_key": self.s3.secret_key,
                    "bucket": self.bucket,
                },
                "system": NO_GC,
                **sections,
            }
        )
        return config

    def storage(self) -> S3Storage:
        return S3Storage(self.s3.url, self.s3.access_key, self.s3.secret_key)

    async def objects(self, bucket: str | None = None) -> set[str]:
        async with self.storage() as storage:
            return {v.key async for v in storage.list_object_versions(bucket or self.bucket)}

    async def tasks(self) -> dict[str, dict[str, Any]]:
        """Every task document in Redis, by uid."""
        found: dict[str, dict[str, Any]] = {}
        async for key in self.redis.scan_iter(match="karton.task:*", count=1000):
            body = await self.redis.get(key)
            if body is not None:
                found[str(key).removeprefix("karton.task:")] = json.loads(body)
        return found

    async def metric(self, name: str) -> dict[str, int]:
        raw = await self.redis.hgetall(f"karton.metrics.{name}")
        return {str(k): int(v) for k, v in raw.items()}


@pytest.fixture
async def dep(redis_url: str, s3_srv: S3Server, s3_bucket: str) -> AsyncIterator[Deployment]:
    async with S3Storage(s3_srv.url, s3_srv.access_key, s3_srv.secret_key) as storage:
        await storage.ensure_bucket(s3_bucket, create=True)
    client = aredis.Redis.from_url(redis_url, decode_responses=True)
    try:
        yield Deployment(redis_url, s3_srv, s3_bucket, client)
    finally:
        await client.aclose()


@asynccontextmanager
async def running(*services: Any, grace: float = 2.0) -> AsyncIterator[None]:
    """Run services (their ``run``) in this event loop for the duration of the block."""
    async with anyio.create_task_group() as group:
        for service in services:
            await group.start(service.run)
        try:
            yield
        finally:
            for service in reversed(services):
                service.stop(grace=grace)


async def wait_until(
    predicate: Callable[[], Awaitable[bool]], what: str, timeout: float = 15.0
) -> None:
    try:
        with anyio.fail_after(timeout):
            while not await predicate():
                await anyio.sleep(0.02)
    except TimeoutError:
        raise AssertionError(f"timed out after {timeout}s waiting for {what}") from None


async def wait_all_final(dep: Deployment, count: int, timeout: float = 15.0) -> dict[str, Any]:
    """Wait until exactly ``count`` tasks exist and none is pending; return them."""
    final = {TaskState.FINISHED.value, TaskState.CRASHED.value}
    snapshot: dict[str, Any] = {}

    async def done() -> bool:
        nonlocal snapshot
        snapshot = await dep.tasks()
        return len(snapshot) == count and all(t["status"] in final for t in snapshot.values())

    await wait_until(done, f"{count} tasks in a final state", timeout)
    return snapshot


class Recorder:
    """Mixin: keep what ``process`` saw, and let tests wait for it."""

    def _init_records(self) -> None:
        self.records: list[Task] = []

    async def wait_records(self, count: int, timeout: float = 15.0) -> list[Task]:
        async def enough() -> bool:
            return len(self.records) >= count

        await wait_until(enough, f"{count} task(s) at {self}", timeout)
        return self.records


class RecordingConsumer(Consumer, Recorder):
    """Records every task it gets."""

    def __init__(self, config: Config, identity: str | None = None) -> None:
        super().__init__(config, identity)
        self._init_records()

    async def process(self, task: Task) -> None:
        self.records.append(task)


def recorder(
    config: Config, identity: str, filters: list[dict[str, Any]], **attrs: Any
) -> RecordingConsumer:
    """A RecordingConsumer subclass bound to ``filters`` (class attributes, as in Karton)."""
    cls = type(
        f"Recording[{identity}]",
        (RecordingConsumer,),
        {"identity": identity, "filters": filters, "__doc__": "Records tasks.", **attrs},
    )
    consumer = cls(config)
    assert isinstance(consumer, RecordingConsumer)
    return consumer


# -- producer → system → consumers, with resources ----------------------------------------


class Unpacker(Karton, Recorder):
    """Downloads samples and emits a child with the sample (by reference) and a new file."""

    identity = "it.unpacker"
    filters: ClassVar[list[dict[str, Any]]] = [{"type": "sample", "kind": "raw"}]

    def __init__(self, config: Config) -> None:
        super().__init__(config)
        self._init_records()

    async def process(self, task: Task) -> None:
        sample = task.get_resource("sample")
        assert isinstance(sample, RemoteResource)
        data = await sample.download()
        child = Task(
            {"type": "unpacked", "kind": "raw"},
            payload={
                "sample": sample,
                "extracted": LocalResource("extracted.bin", data[::-1]),
                "note": "unpacked",
            },
        )
        await self.send_task(child)
        self.records.append(task)


class Reader(Consumer, Recorder):
    """Reads both resources of the unpacker's child."""

    identity = "it.reader"
    filters: ClassVar[list[dict[str, Any]]] = [{"type": "unpacked"}]

    def __init__(self, config: Config) -> None:
        super().__init__(config)
        self._init_records()
        self.contents: dict[str, bytes] = {}

    async def process(self, task: Task) -> None:
        for name in ("sample", "extracted"):
            resource = task.get_resource(name)
            assert isinstance(resource, RemoteResource)
            self.contents[name] = await resource.download()
        self.records.append(task)


async def test_resources_flow_through_producer_system_and_two_consumers(
    dep: Deployment,
) -> None:
    config = dep.config()
    system, unpacker, reader = SystemService(config), Unpacker(config), Reader(config)
    with anyio.fail_after(30):
        async with (
            Producer(config, identity="it.producer") as producer,
            running(system, unpacker, reader),
        ):
            root = Task(
                {"type": "sample", "kind": "raw"},
                payload={"sample": LocalResource("sample.exe", b"MZ\x90\x00payload")},
            )
            assert await producer.send_task(root) is True
            [got] = await reader.wait_records(1)
            tasks = await wait_all_final(dep, 4)

    assert reader.contents == {"sample": b"MZ\x90\x00payload", "extracted": b"daolyap\x00\x90ZM"}
    [unpacked] = unpacker.records
    sample_uid = root.get_payload("sample").uid
    assert got.get_resource("sample").uid == sample_uid  # passed on by reference
    assert await dep.objects() == {sample_uid, got.get_resource("extracted").uid}

    # Tree linkage: root -> copy for the unpacker -> child -> copy for the reader.
    assert unpacked.orig_uid == root.uid and unpacked.root_uid == root.root_uid
    assert got.parent_uid == unpacked.uid and got.root_uid == root.root_uid
    assert got.headers == {
        "type": "unpacked", "kind": "raw", "origin": "it.unpacker", "receiver": "it.reader",
    }  # fmt: skip
    assert got.payload["note"] == "unpacked"
    assert all(t["status"] == "Finished" for t in tasks.values())
    assert {t["headers"].get("receiver") for t in tasks.values()} == {
        None, "it.unpacker", "it.reader",
    }  # fmt: skip

    # Resource spec on the wire: Karton's seven fields, sha256 twice.
    spec = tasks[got.uid]["payload"]["extracted"]["__karton_resource__"]
    assert set(spec) == {"uid", "name", "bucket", "size", "metadata", "flags", "sha256"}
    assert spec["bucket"] == dep.bucket and spec["size"] == 11 and spec["flags"] == []
    assert spec["sha256"] == spec["metadata"]["sha256"]

    # Metrics and the dashboard's producer -> consumer tracking sets.
    assert await dep.metric("produced") == {"it.producer": 1, "it.unpacker": 1}
    assert await dep.metric("assigned") == {"it.unpacker": 1, "it.reader": 1}
    assert await dep.metric("consumed") == {"it.unpacker": 1, "it.reader": 1}
    assert await dep.metric("crashed") == {}
    outputs = {
        origin: {json.dumps(json.loads(m), sort_keys=True) for m in await dep.redis.smembers(key)}
        for origin, key in (
            ("it.producer", "karton.outputs:it.producer"),
            ("it.unpacker", "karton.outputs:it.unpacker"),
        )
    }
    assert outputs == {
        "it.producer": {json.dumps({"kind": "raw", "origin": "it.producer", "type": "sample"})},
        "it.unpacker": {json.dumps({"kind": "raw", "origin": "it.unpacker", "type": "unpacked"})},
    }
    assert 0 < await dep.redis.ttl("karton.outputs:it.producer") <= 2592000


async def test_fan_out_to_every_matching_identity(dep: Deployment) -> None:
    config = dep.config()
    fans = [recorder(config, f"it.fan.{n}", [{"type": "fan"}]) for n in (1, 2, 3)]
    other = recorder(config, "it.fan.other", [{"type": "other"}])
    with anyio.fail_after(30):
        async with (
            Producer(config, identity="it.producer") as producer,
            running(SystemService(config), *fans, other),
        ):
            sent = [Task({"type": "fan"}, payload={"n": n}) for n in range(2)]
            await producer.send_tasks(sent)
            for fan in fans:
                await fan.wait_records(2)
            await wait_all_final(dep, 2 + 3 * 2)

    for fan in fans:
        assert sorted(t.payload["n"] for t in fan.records) == [0, 1]
        assert {t.headers["receiver"] for t in fan.records} == {fan.identity}
        assert {t.orig_uid for t in fan.records} == {t.uid for t in sent}
    assert other.records == []
    assert await dep.metric("assigned") == {"it.fan.1": 2, "it.fan.2": 2, "it.fan.3": 2}
    assert await dep.metric("produced") == {"it.producer": 2}


# -- inheritance and priorities ------------------------------------------------------------


class Relay(Karton, Recorder):
    """Sends one child per task; the child asks for LOW priority and another tlp."""

    identity = "it.relay"
    filters: ClassVar[list[dict[str, Any]]] = [{"type": "relay-in"}]

    def __init__(self, config: Config) -> None:
        super().__init__(config)
        self._init_records()

    async def process(self, task: Task) -> None:
        child = Task(
            {"type": "relay-out", "tlp": "white"},
            payload={"y": 2, "uploader": "overridden"},
            priority=TaskPriority.LOW,
        )
        await self.send_task(child)
        self.records.append(task)


async def test_persistent_headers_payload_and_priority_are_inherited(dep: Deployment) -> None:
    config = dep.config()
    relay = Relay(config)
    sink = recorder(config, "it.sink", [{"type": "relay-out"}])
    with anyio.fail_after(30):
        async with (
            Producer(config, identity="it.producer") as producer,
            running(SystemService(config), relay, sink),
        ):
            root = Task(
                {"type": "relay-in"},
                headers_persistent={"tlp": "amber"},
                payload={"x": 1},
                payload_persistent={"uploader": "me"},
                priority=TaskPriority.HIGH,
            )
            await producer.send_task(root)
            [child] = await sink.wait_records(1)
            tasks = await wait_all_final(dep, 4)

    assert child.headers == {
        "type": "relay-out", "tlp": "amber", "origin": "it.relay", "receiver": "it.sink",
    }  # fmt: skip
    assert child.headers_persistent == {"tlp": "amber"}
    assert child.payload == {"y": 2}  # the persistent "uploader" wins and moves over
    assert child.payload_persistent["uploader"] == "me"
    assert child.get_payload("uploader") == "me"
    assert child.priority is TaskPriority.HIGH
    assert child.root_uid == root.root_uid
    raw = tasks[child.uid]
    assert raw["priority"] == "high"
    assert raw["headers_persistent"] == {"tlp": "amber"}
    assert raw["payload_persistent"] == {"__headers_persistent": {"tlp": "amber"}, "uploader": "me"}


async def test_high_normal_low_are_consumed_in_strict_priority_order(dep: Deployment) -> None:
    config = dep.config()
    consumer = recorder(config, "it.prio", [{"type": "prio"}])
    system = SystemService(config)
    queues = [f"karton.queue.{p}:it.prio" for p in ("high", "normal", "low")]
    order = [TaskPriority.LOW, TaskPriority.NORMAL, TaskPriority.HIGH] * 3
    with anyio.fail_after(30):
        async with Producer(config, identity="it.producer") as producer, consumer:
            await consumer.backend.register_bind(consumer.bind)  # bound, but not consuming
            for n, prio in enumerate(order):
                await producer.send_task(Task({"type": "prio"}, payload={"n": n}, priority=prio))

            async def routed() -> bool:
                lengths = [await dep.redis.llen(q) for q in queues]
                return lengths == [3, 3, 3] and await dep.redis.llen("karton.tasks") == 0

            async with running(system):
                await wait_until(routed, "9 routed tasks")
            async with running(consumer):
                records = await consumer.wait_records(9)

    got = [(t.priority.value, t.payload["n"]) for t in records]
    assert got == [
        ("high", 2), ("high", 5), ("high", 8),
        ("normal", 1), ("normal", 4), ("normal", 7),
        ("low", 0), ("low", 3), ("low", 6),
    ]  # fmt: skip


# -- filters ---------------------------------------------------------------------------------

FILTERS: dict[str, list[dict[str, Any]]] = {
    "it.f.neg": [{"type": "sample", "kind": "!raw"}],
    "it.f.wild": [{"type": "sam*"}],
    "it.f.or": [{"type": "sample", "kind": "raw"}, {"type": "config"}],
    "it.f.mongo": [
        {"type": "sample", "platform": {"$in": ["win32", "win64"]}, "kind": {"$ne": "dump"}}
    ],
    "it.f.negwild": [{"type": "sample", "platform": "!win*"}],
    "it.f.none": [{"type": "sample", "kind": "raw", "platform": "linux"}],
}
HEADERS = [
    {"type": "sample", "kind": "raw", "platform": "win32"},
    {"type": "sample", "kind": "runnable", "platform": "linux"},
    {"type": "xsample", "kind": "dump"},  # matched by "sam*": wildcards are unanchored
    {"type": "config", "kind": "raw"},
    {"type": "sample", "kind": "dump", "platform": "win64"},
    {"type": "sample", "kind": "runnable", "platform": "win64"},
]
# What karton-core 5.9.1's query.convert(filters).match(headers) says (checked).
EXPECTED = {
    "it.f.neg": [1, 4, 5],
    "it.f.wild": [0, 1, 2, 4, 5],
    "it.f.or": [0, 3],
    "it.f.mongo": [0, 5],
    "it.f.negwild": [1],
    "it.f.none": [],
}


async def test_filters_with_negation_wildcards_and_operators_route_correctly(
    dep: Deployment,
) -> None:
    config = dep.config()
    consumers = {identity: recorder(config, identity, f) for identity, f in FILTERS.items()}
    total = sum(len(v) for v in EXPECTED.values())
    with anyio.fail_after(30):
        async with (
            Producer(config, identity="it.producer") as producer,
            running(SystemService(config), *consumers.values()),
        ):
            await producer.send_tasks(
                Task(headers, payload={"n": n}) for n, headers in enumerate(HEADERS)
            )
            await wait_all_final(dep, len(HEADERS) + total)

    got = {i: sorted(t.payload["n"] for t in c.records) for i, c in consumers.items()}
    assert got == EXPECTED
    assert sum((await dep.metric("assigned")).values()) == total


# -- crashes, timeouts, hooks -----------------------------------------------------------------


class Crashy(Consumer, Recorder):
    """Raises on "boom" tasks, sleeps forever on "slow" ones; 0.2 s task timeout."""

    identity = "it.crashy"
    filters: ClassVar[list[dict[str, Any]]] = [{"type": "crashy"}]
    task_timeout = 0.2

    def __init__(self, config: Config) -> None:
        super().__init__(config)
        self._init_records()
        self.calls: list[str] = []

    async def process(self, task: Task) -> None:
        action = task.payload["action"]
        self.calls.append(f"process:{action}")
        if action == "boom":
            raise ValueError("boom")
        if action == "slow":
            await anyio.sleep(30)
        self.records.append(task)


async def test_crash_is_recorded_and_the_consumer_keeps_going(dep: Deployment) -> None:
    config = dep.config()
    crashy = Crashy(config)
    with anyio.fail_after(30):
        async with (
            Producer(config, identity="it.producer") as producer,
            running(SystemService(config), crashy),
        ):
            boom = Task({"type": "crashy"}, payload={"action": "boom"})
            await producer.send_task(boom)
            await producer.send_task(Task({"type": "crashy"}, payload={"action": "ok"}))
            await crashy.wait_records(1)
            tasks = await wait_all_final(dep, 4)

    [crashed] = [t for t in tasks.values() if t["status"] == "Crashed"]
    assert crashed["orig_uid"] == boom.uid
    error = crashed["error"]
    assert isinstance(error, list) and all(isinstance(line, str) for line in error)
    assert error[0].startswith("Traceback")
    assert error[-1] == "ValueError: boom\n"
    assert sum(t["status"] == "Finished" for t in tasks.values()) == 3
    assert await dep.metric("crashed") == {"it.crashy": 1}
    assert await dep.metric("consumed") == {"it.crashy": 2}


async def test_fractional_task_timeout_crashes_the_task(dep: Deployment) -> None:
    config = dep.config()
    crashy = Crashy(config)
    with anyio.fail_after(30):
        async with (
            Producer(config, identity="it.producer") as producer,
            running(SystemService(config), crashy),
        ):
            started = time.monotonic()
            await producer.send_task(Task({"type": "crashy"}, payload={"action": "slow"}))
            await producer.send_task(Task({"type": "crashy"}, payload={"action": "ok"}))
            await crashy.wait_records(1)
            tasks = await wait_all_final(dep, 4)
            elapsed = time.monotonic() - started

    assert elapsed < 5, "a 0.2 s timeout must not wait for the 30 s sleep"
    [crashed] = [t for t in tasks.values() if t["status"] == "Crashed"]
    assert "TaskTimeoutError" in "".join(crashed["error"])
    assert crashy.calls == ["process:slow", "process:ok"]
    assert await dep.metric("crashed") == {"it.crashy": 1}


@contextmanager
def captured(logger_name: str) -> Iterator[list[logging.LogRecord]]:
    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    handler = Keep(logging.DEBUG)
    logger = logging.getLogger(logger_name)
    logger.addHandler(handler)
    try:
        yield records
    finally:
        logger.removeHandler(handler)


async def test_pre_and_post_hooks_run_in_order_and_failures_are_only_logged(
    dep: Deployment,
) -> None:
    config = dep.config()
    crashy = Crashy(config)
    calls = crashy.calls

    def pre_sync(task: Task) -> None:
        calls.append(f"pre_sync:{task.payload['action']}")

    async def pre_async(task: Task) -> None:
        await anyio.lowlevel.checkpoint()
        calls.append("pre_async")

    def pre_broken(task: Task) -> None:
        calls.append("pre_broken")
        raise RuntimeError("hook is broken")

    async def post_async(task: Task, exc: BaseException | None) -> None:
        calls.append(f"post_async:{type(exc).__name__ if exc else None}")

    def post_sync(task: Task, exc: BaseException | None) -> None:
        calls.append("post_sync")
        raise RuntimeError("post hook is broken too")

    crashy.add_pre_hook(pre_sync, "pre_sync")
    crashy.add_pre_hook(pre_async)
    crashy.add_pre_hook(pre_broken, "pre_broken")
    crashy.add_post_hook(post_async)
    crashy.add_post_hook(post_sync, "post_sync")
    with anyio.fail_after(30), captured("it.crashy") as logs:
        async with (
            Producer(config, identity="it.producer") as producer,
            running(SystemService(config), crashy),
        ):
            await producer.send_task(Task({"type": "crashy"}, payload={"action": "ok"}))
            await crashy.wait_records(1)
            await producer.send_task(Task({"type": "crashy"}, payload={"action": "boom"}))
            tasks = await wait_all_final(dep, 4)

    assert calls == [
        "pre_sync:ok", "pre_async", "pre_broken", "process:ok", "post_async:None", "post_sync",
        "pre_sync:boom", "pre_async", "pre_broken", "process:boom", "post_async:ValueError",
        "post_sync",
    ]  # fmt: skip
    assert sorted(t["status"] for t in tasks.values()) == [
        "Crashed",
        "Finished",
        "Finished",
        "Finished",
    ]
    failures = [r for r in logs if "failed" in r.getMessage() and r.name == "it.crashy"]
    hook_failures = [r for r in failures if r.getMessage().startswith("Hook")]
    assert [r.getMessage() for r in hook_failures] == [
        "Hook pre_broken failed", "Hook post_sync failed",
        "Hook pre_broken failed", "Hook post_sync failed",
    ]  # fmt: skip
    assert all(r.exc_info and r.exc_info[0] is RuntimeError for r in hook_failures)


class Signaller(Karton):
    """Does nothing, but signals begin/end with ``[signaling] status``."""

    identity = "it.signaller"
    filters: ClassVar[list[dict[str, Any]]] = [{"type": "work"}]

    async def process(self, task: Task) -> None:
        return None


async def test_karton_sends_signaling_status_tasks(dep: Deployment) -> None:
    config = dep.config(signaling={"status": "1"})
    signaller = Signaller(config)
    status = recorder(config, "it.status", [{"type": "karton.signaling.status"}])
    with anyio.fail_after(30):
        async with (
            Producer(config, identity="it.producer") as producer,
            running(SystemService(config), signaller, status),
        ):
            root = Task({"type": "work"}, headers_persistent={"tlp": "green"})
            await producer.send_task(root)
            signals = await status.wait_records(2)
            tasks = await wait_all_final(dep, 2 + 2 * 2)

    [work] = [t for t in tasks.values() if t["headers"].get("receiver") == "it.signaller"]
    assert sorted(t.headers["status"] for t in signals) == ["task_begin", "task_end"]
    for signal in signals:
        assert signal.headers["type"] == "karton.signaling.status"
        assert signal.headers["origin"] == "it.signaller"
        assert signal.headers["tlp"] == "green"
        assert signal.parent_uid == work["uid"] and signal.root_uid == root.root_uid
    assert await dep.metric("produced") == {"it.producer": 1, "it.signaller": 2}


# -- producer validation --------------------------------------------------------------------


async def test_unserialisable_payload_writes_nothing(dep: Deployment) -> None:
    config = dep.config()
    async with Producer(config, identity="it.producer") as producer:
        await producer.send_task(Task({"type": "warmup"}))  # something already in Redis
        keys_before = set(await dep.redis.keys("*"))
        assert keys_before
        for bad in ({"obj": object()}, {"set": {1, 2}}, {"nested": [{"fn": print}]}):
            task = Task(
                {"type": "bad"},
                payload={"file": LocalResource("f.bin", b"data"), **bad},
            )
            with pytest.raises(InvalidTaskError) as info:
                await producer.send_task(task)
            assert info.value.uid == task.uid
        assert set(await dep.redis.keys("*")) == keys_before
        assert await dep.redis.llen("karton.tasks") == 1
        assert await dep.metric("produced") == {"it.producer": 1}
    assert await dep.objects() == set()


# -- logs -----------------------------------------------------------------------------------


class Chatty(Consumer):
    """Logs while processing, and crashes on request."""

    identity = "it.chatty"
    filters: ClassVar[list[dict[str, Any]]] = [{"type": "chatty"}]

    async def process(self, task: Task) -> None:
        self.log.info("processing %s", task.payload["n"])
        if task.payload.get("crash"):
            raise KeyError("missing")


async def test_log_records_are_published_in_kartons_shape(dep: Deployment) -> None:
    config = dep.config()
    chatty = Chatty(config)
    # Library classes never configure logging: the application sets the level,
    # as the CLI does; karton-core's setup_logger sets INFO itself.
    logger = logging.getLogger("it.chatty")
    level = logger.level
    logger.setLevel(logging.INFO)
    pubsub = dep.redis.pubsub()
    await pubsub.psubscribe("karton.log.*")
    received: list[tuple[str, dict[str, Any]]] = []

    async def has(channel: str, message: str) -> bool:
        while msg := await pubsub.get_message(ignore_subscribe_messages=True, timeout=0.05):
            received.append((msg["channel"], json.loads(msg["data"])))
        return any(c == channel and r["message"].startswith(message) for c, r in received)

    try:
        with anyio.fail_after(30):
            async with (
                Producer(config, identity="it.producer") as producer,
                running(SystemService(config), chatty),
            ):
                await producer.send_task(Task({"type": "chatty"}, payload={"n": 7}))
                await wait_until(
                    lambda: has("karton.log.info.it.chatty", "processing 7"), "info log"
                )
                await producer.send_task(Task({"type": "chatty"}, payload={"n": 8, "crash": True}))
                await wait_until(
                    lambda: has("karton.log.error.it.chatty", "Failed to process"),
                    "error log",
                )
                await wait_until(lambda: has("karton.log.info.karton.system", "["), "system log")
                tasks = await wait_all_final(dep, 4)
    finally:
        logger.setLevel(level)
        await pubsub.aclose()  # type: ignore[no-untyped-call]  # redis-py leaves it untyped

    [(_, info)] = [(c, r) for c, r in received if r["message"] == "processing 7"]
    [routed] = [
        t for t in tasks.values() if t["headers"].get("receiver") and t["payload"]["n"] == 7
    ]
    assert info["type"] == "log"
    assert info["name"] == "it.chatty"
    assert info["levelname"] == "INFO" and info["levelno"] == logging.INFO
    assert isinstance(info["task"], str)
    task_doc = json.loads(info["task"])
    assert task_doc["uid"] == routed["uid"] and task_doc["status"] == "Started"
    assert info["task_id"] == routed["uid"].rsplit(":", 1)[-1]
    assert info["hostname"] == platform.node()
    assert isinstance(info["created"], float) and abs(info["created"] - time.time()) < 60
    for field in ("filename", "module", "lineno", "funcName"):
        assert field in info
    for absent in ("args", "msg", "exc_info", "process", "thread", "pathname"):
        assert absent not in info

    [(_, error)] = [(c, r) for c, r in received if c == "karton.log.error.it.chatty"]
    assert error["levelname"] == "ERROR"
    assert error["excType"] == "KeyError"
    assert error["excValue"] == "'missing'"
    assert isinstance(error["excTraceback"], list) and "KeyError" in error["excTraceback"][-1]
    assert "Traceback" in error["excText"] and "Traceback" in error["message"]

    system_logs = [r for c, r in received if c == "karton.log.info.karton.system"]
    processing = [r for r in system_logs if "Processing task" in r["message"]]
    assert len(processing) == 2
    # karton-system logs this with no current task: no "task" field, task_id "(no task)"
    assert all(
        "task" not in r and r["task_id"] == "(no task)" and r["name"] == "karton.system"
        for r in processing
    )


# -- presence --------------------------------------------------------------------------------


class Holder(Karton):
    """Holds every task until the test releases it."""

    identity = "it.holder"
    version = "1.2.3"
    concurrency_limit = 8
    filters: ClassVar[list[dict[str, Any]]] = [{"type": "hold"}]

    def __init__(self, config: Config) -> None:
        super().__init__(config)
        self.in_flight = 0
        self.release = anyio.Event()

    async def process(self, task: Task) -> None:
        self.in_flight += 1
        try:
            await self.release.wait()
        finally:
            self.in_flight -= 1


async def test_one_named_connection_per_service_whatever_the_concurrency(
    dep: Deployment,
) -> None:
    config = dep.config()
    holder = Holder(config)
    other = recorder(config, "it.other", [{"type": "other"}])
    system = SystemService(config)
    with anyio.fail_after(30):
        async with (
            Producer(config, identity="it.producer") as producer,
            running(system, holder, other),
        ):
            await producer.send_tasks(Task({"type": "hold"}) for _ in range(12))
            await producer.send_task(Task({"type": "other"}))
            await other.wait_records(1)

            async def busy() -> bool:
                return holder.in_flight == 8

            await wait_until(busy, "8 tasks in flight")
            clients = await dep.redis.client_list()
            holder.release.set()
            await wait_all_final(dep, 13 * 2)

    names = [c["name"] for c in clients if c["name"]]
    assert len(clients) > len(names)  # pooled/blocking connections stay unnamed
    by_identity: dict[str, list[str]] = {}
    for name in names:
        by_identity.setdefault(name.split("?", 1)[0], []).append(name)
    assert sorted(by_identity) == ["it.holder", "it.other", "karton.system"]
    assert all(len(v) == 1 for v in by_identity.values()), by_identity
    [holder_name] = by_identity["it.holder"]
    _, _, query = holder_name.partition("?")
    params = {k: v[0] for k, v in parse_qs(query).items()}
    assert params["karton_version"] == KARTON_PROTOCOL_VERSION
    assert params["service_version"] == "1.2.3"
    assert params["instance_id"] == holder.instance_id
    [system_name] = by_identity["karton.system"]
    assert f"instance_id={system.instance_id}" in system_name


# -- garbage collection ----------------------------------------------------------------------


def gc_config(dep: Deployment, **system: str) -> Config:
    return dep.config(
        system={
            "enable_gc": "0",
            "task_dispatched_timeout": "100",
            "task_started_timeout": "100",
            "task_crashed_timeout": "100",
            **system,
        }
    )


@asynccontextmanager
async def collector(config: Config) -> AsyncIterator[tuple[GarbageCollector, SystemService]]:
    async with SystemService(config) as system:
        yield (
            GarbageCollector(
                system.backend, system.storage, system.runtime.bucket, system.settings, system.log
            ),
            system,
        )


def make_task(
    status: TaskState,
    age: float,
    receiver: str | None = None,
    payload: dict[str, Any] | None = None,
    payload_persistent: dict[str, Any] | None = None,
) -> Task:
    headers: dict[str, Any] = {"type": "gc", "origin": "it.producer"}
    if receiver is not None:
        headers["receiver"] = receiver
    return Task(
        headers,
        payload=payload,
        payload_persistent=payload_persistent,
        _status=status,
        _last_update=time.time() - age,
    )


async def store(dep: Deployment, *tasks: Task) -> None:
    await dep.redis.mset({f"karton.task:{t.uid}": t.serialize() for t in tasks})


async def test_gc_applies_kartons_task_rules(dep: Deployment) -> None:
    old, fresh = 1000.0, 1.0
    tasks = {
        "finished": make_task(TaskState.FINISHED, fresh, "it.a"),
        "finished_unrouted": make_task(TaskState.FINISHED, fresh),
        "crashed_fresh": make_task(TaskState.CRASHED, fresh, "it.a"),
        "crashed_old": make_task(TaskState.CRASHED, old, "it.a"),
        "declared_old": make_task(TaskState.DECLARED, old),
        "declared_old_queued": make_task(TaskState.DECLARED, old),
        "declared_fresh": make_task(TaskState.DECLARED, fresh),
        "started_old": make_task(TaskState.STARTED, old, "it.b"),
        "started_fresh": make_task(TaskState.STARTED, fresh, "it.b"),
        "spawned_old": make_task(TaskState.SPAWNED, old, "it.b"),
    }
    await store(dep, *tasks.values())
    await dep.redis.rpush("karton.tasks", tasks["declared_old_queued"].uid)
    await dep.redis.rpush("karton.queue.normal:it.b", tasks["spawned_old"].uid)
    with anyio.fail_after(30):
        async with collector(gc_config(dep)) as (gc, _):
            report = await gc.collect()

    assert report is not None
    left = await dep.tasks()
    assert {name for name, t in tasks.items() if t.uid in left} == {
        "crashed_fresh", "declared_old_queued", "declared_fresh", "started_fresh", "spawned_old",
    }  # fmt: skip
    assert report.deleted_tasks == 5 and report.crashed_tasks == 0
    assert await dep.metric("garbage-collected") == {"it.a": 2, "it.b": 1, "unknown": 2}
    assert left[tasks["spawned_old"].uid]["status"] == "Spawned"


async def test_gc_can_crash_started_tasks_instead_of_deleting_them(dep: Deployment) -> None:
    started_old = make_task(TaskState.STARTED, 1000.0, "it.b")
    started_fresh = make_task(TaskState.STARTED, 1.0, "it.b")
    await store(dep, started_old, started_fresh)
    config = gc_config(dep, crash_started_tasks_on_timeout="1")
    with anyio.fail_after(30):
        async with collector(config) as (gc, _):
            report = await gc.collect()

    assert report is not None and report.crashed_tasks == 1 and report.deleted_tasks == 0
    left = await dep.tasks()
    assert left[started_old.uid]["status"] == "Crashed"
    assert left[started_old.uid]["error"] == [
        "This task was STARTED too long (TASK_STARTED_TIMEOUT), so status was changes to CRASHED."
    ]
    assert time.time() - left[started_old.uid]["last_update"] < 60
    assert left[started_fresh.uid]["status"] == "Started"
    assert await dep.metric("crashed") == {"it.b": 1}


async def test_gc_removes_offline_non_persistent_binds_with_their_queues(
    dep: Deployment,
) -> None:
    config = gc_config(dep)
    online = recorder(config, "it.np.online", [{"type": "np"}], persistent=False)
    offline = Bind(identity="it.np.offline", filters=[{"type": "np"}], persistent=False)
    kept = Bind(identity="it.p.offline", filters=[{"type": "np"}], persistent=True)
    doomed = make_task(TaskState.SPAWNED, 1.0, "it.np.offline")
    survivor = make_task(TaskState.SPAWNED, 1.0, "it.p.offline")
    await store(dep, doomed, survivor)
    for queue in (
        "it.np.offline",
        *(f"karton.queue.{p}:it.np.offline" for p in ("high", "normal", "low")),
    ):
        await dep.redis.rpush(queue, doomed.uid)
    await dep.redis.rpush("karton.queue.normal:it.p.offline", survivor.uid)
    with anyio.fail_after(30):
        async with collector(config) as (gc, system):
            await system.backend.register_bind(offline)
            await system.backend.register_bind(kept)
            async with running(online):
                bind = await dep.redis.hget("karton.binds", "it.np.online")
                assert bind is not None and json.loads(bind)["persistent"] is False
                report = await gc.collect()

            # Once its consumer is gone (its named connection closed), the bind goes too.
            async def disconnected() -> bool:
                names = [c["name"] for c in await dep.redis.client_list()]
                return not any(n.startswith("it.np.online") for n in names)

            await wait_until(disconnected, "it.np.online to disconnect")
            second = await gc.collect()

    assert report is not None and report.removed_binds == ["it.np.offline"]
    assert second is not None and second.removed_binds == ["it.np.online"]
    assert set(await dep.redis.hkeys("karton.binds")) == {"it.p.offline"}
    assert not await dep.redis.exists(
        "it.np.offline", *(f"karton.queue.{p}:it.np.offline" for p in ("high", "normal", "low"))
    )
    assert await dep.redis.lrange("karton.queue.normal:it.p.offline", 0, -1) == [survivor.uid]
    left = await dep.tasks()
    assert doomed.uid not in left and survivor.uid in left
    assert await dep.metric("garbage-collected") == {"it.np.offline": 1}


async def test_gc_deletes_orphaned_objects_and_keeps_referenced_ones(dep: Deployment) -> None:
    other_bucket = f"other-{uuid.uuid4().hex[:8]}"
    keys = {name: str(uuid.uuid4()) for name in ("spawned", "crashed", "finished", "orphan")}
    foreign = str(uuid.uuid4())
    async with dep.storage() as storage:
        for key in keys.values():
            await storage.put_bytes(dep.bucket, key, b"x")
        await storage.ensure_bucket(other_bucket, create=True)
        await storage.put_bytes(other_bucket, foreign, b"y")

    def remote(key: str, bucket: str | None = None) -> RemoteResource:
        return RemoteResource("r", bucket=bucket or dep.bucket, uid=key, size=1)

    await store(
        dep,
        make_task(TaskState.SPAWNED, 1.0, "it.a", payload={"r": remote(keys["spawned"])}),
        make_task(
            TaskState.CRASHED, 1.0, "it.a",
            payload_persistent={"deep": [{"r": remote(keys["crashed"])}]},
        ),
        make_task(TaskState.FINISHED, 1.0, "it.a", payload={"r": remote(keys["finished"])}),
        make_task(TaskState.SPAWNED, 1.0, "it.a", payload={"r": remote(foreign, other_bucket)}),
    )  # fmt: skip
    with anyio.fail_after(30):
        async with collector(gc_config(dep)) as (gc, _):
            report = await gc.collect()

    assert report is not None and report.deleted_objects == 2
    assert await dep.objects() == {keys["spawned"], keys["crashed"]}
    assert await dep.objects(other_bucket) == {foreign}  # only the default bucket is collected


async def test_gc_collects_extra_buckets_named_in_config(dep: Deployment) -> None:
    extra = f"extra-{uuid.uuid4().hex[:8]}"
    kept, orphan = str(uuid.uuid4()), str(uuid.uuid4())
    async with dep.storage() as storage:
        await storage.ensure_bucket(extra, create=True)
        await storage.put_bytes(extra, kept, b"k")
        await storage.put_bytes(extra, orphan, b"o")
    referenced = RemoteResource("r", bucket=extra, uid=kept, size=1)
    await store(dep, make_task(TaskState.SPAWNED, 1.0, "it.a", payload={"r": referenced}))
    config = gc_config(dep)
    config.set("system", "gc_extra_buckets", f" {extra} ,")
    with anyio.fail_after(30):
        async with SystemService(config) as system:
            gc = GarbageCollector(
                system.backend, system.storage, system.runtime.bucket, system.settings,
                system.log, extra_buckets=system.extra_buckets,
            )  # fmt: skip
            assert system.extra_buckets == (extra,)
            report = await gc.collect()
    assert report is not None and report.deleted_objects == 1
    assert await dep.objects(extra) == {kept}
