"""The producer on the embedded default (in-process Redis, resources in a directory).

What is checked is what Karton's wire and GC rely on: a task's body and its place in
``karton.tasks`` are written by one call; a task with local resources is declared
before its resources are uploaded and queued only after they all are; a child task sent
from inside a handler joins its parent's tree; a bad batch writes nothing.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest

from asynckarton import (
    InvalidTaskError,
    LocalResource,
    Producer,
    StorageError,
    Task,
    TaskPriority,
)
from asynckarton._wire._task import current_task
from asynckarton.backend import KartonBackend
from asynckarton.storage import LocalStorage
from asynckarton.testing import embedded_config

pytestmark = pytest.mark.anyio

IDENTITY = "test.producer"
QUEUE = "karton.tasks"


@asynccontextmanager
async def producer_for(tmp_path: Path, **asynckarton: object) -> AsyncIterator[Producer]:
    """An open producer on its own embedded Redis and resource directory."""
    config = embedded_config(tmp_path / "data", asynckarton=dict(asynckarton))
    async with Producer(config, identity=IDENTITY) as producer:
        yield producer


@pytest.fixture
async def producer(tmp_path: Path) -> AsyncIterator[Producer]:
    async with producer_for(tmp_path) as producer:
        yield producer


async def queued(producer: Producer) -> list[str]:
    uids = await producer.backend.redis.lrange(QUEUE, 0, -1)
    return [str(uid) for uid in uids]  # the embedded client decodes responses


async def stored(producer: Producer, uid: str) -> dict[str, Any] | None:
    body = await producer.backend.redis.get(f"karton.task:{uid}")
    return None if body is None else dict(json.loads(body))


def resource_of(doc: Mapping[str, Any], name: str) -> dict[str, Any]:
    bag = doc["payload"] if name in doc["payload"] else doc["payload_persistent"]
    resource: dict[str, Any] = bag[name]["__karton_resource__"]
    return resource


class Puts:
    """Records every object the local storage writes, and what Redis held at that moment."""

    def __init__(self) -> None:
        self.keys: list[str] = []
        self.seen: list[tuple[int, str | None]] = []  # (len(karton.tasks), task status)
        self.task_uid: str | None = None
        self.fail = False

    def install(self, monkeypatch: pytest.MonkeyPatch, producer: Producer) -> None:
        put_bytes = LocalStorage.put_bytes
        put_file = LocalStorage.put_file

        async def observe(key: str) -> None:
            self.keys.append(key)
            doc = await stored(producer, self.task_uid) if self.task_uid else None
            self.seen.append((len(await queued(producer)), doc["status"] if doc else None))
            if self.fail:
                raise StorageError(f"refusing {key}")

        async def spy_bytes(storage: LocalStorage, bucket: str, key: str, data: bytes) -> None:
            await observe(key)
            await put_bytes(storage, bucket, key, data)

        async def spy_file(storage: LocalStorage, bucket: str, key: str, source: Any) -> Any:
            await observe(key)
            return await put_file(storage, bucket, key, source)

        monkeypatch.setattr(LocalStorage, "put_bytes", spy_bytes)
        monkeypatch.setattr(LocalStorage, "put_file", spy_file)


class Calls:
    """Wraps one backend method and records the arguments of every call."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, name: str) -> None:
        self.args: list[tuple[Any, ...]] = []
        original: Callable[..., Awaitable[Any]] = getattr(KartonBackend, name)

        async def spy(backend: KartonBackend, *args: Any) -> Any:
            self.args.append(args)
            return await original(backend, *args)

        monkeypatch.setattr(KartonBackend, name, spy)


async def test_a_task_is_written_and_queued_by_one_call(
    producer: Producer, monkeypatch: pytest.MonkeyPatch
) -> None:
    enqueue = Calls(monkeypatch, "enqueue_unrouted")
    declare = Calls(monkeypatch, "set_tasks")
    task = Task({"type": "sample", "kind": "raw"}, payload={"n": 1})

    assert await producer.send_task(task) is True

    assert declare.args == []  # no resources: no separate Declared write
    [(bodies, identity)] = enqueue.args
    assert identity == IDENTITY and list(bodies) == [task.uid]
    assert await queued(producer) == [task.uid]
    doc = await stored(producer, task.uid)
    assert doc is not None and doc == json.loads(bodies[task.uid])
    assert doc["status"] == "Declared" and doc["headers"]["origin"] == IDENTITY
    assert doc["payload"] == {"n": 1} and doc["last_update"] > 0
    assert await producer.backend.redis.hget("karton.metrics.produced", IDENTITY) == "1"


async def test_resources_upload_after_the_task_is_declared_and_before_it_is_queued(
    producer: Producer, monkeypatch: pytest.MonkeyPatch
) -> None:
    puts = Puts()
    puts.install(monkeypatch, producer)
    task = Task({"type": "sample"})
    task.add_payload("sample", LocalResource("s.bin", b"MZ\x90\x00"))
    puts.task_uid = task.uid

    await producer.send_task(task)

    assert puts.seen == [(0, "Declared")]  # declared (GC safety), not yet queued
    assert await queued(producer) == [task.uid]
    doc = await stored(producer, task.uid)
    assert doc is not None
    resource = resource_of(doc, "sample")
    assert resource["uid"] == puts.keys[0]
    assert resource["size"] == 4
    assert resource["sha256"] == hashlib.sha256(b"MZ\x90\x00").hexdigest()
    got = await producer.storage.get_bytes(producer.runtime.bucket, resource["uid"])
    assert got == b"MZ\x90\x00"


async def test_a_failed_upload_queues_nothing_and_removes_the_declared_tasks(
    producer: Producer, monkeypatch: pytest.MonkeyPatch
) -> None:
    puts = Puts()
    puts.install(monkeypatch, producer)
    puts.fail = True
    with_file = Task({"type": "sample"})
    with_file.add_payload("sample", LocalResource("s.bin", b"data"))
    plain = Task({"type": "note"})
    puts.task_uid = with_file.uid

    with pytest.raises(StorageError, match="refusing"):
        await producer.send_tasks([with_file, plain])

    assert puts.seen == [(0, "Declared")]
    assert await queued(producer) == []
    assert await stored(producer, with_file.uid) is None
    assert await stored(producer, plain.uid) is None


async def test_a_child_task_joins_its_parents_tree(producer: Producer) -> None:
    parent = Task(
        {"type": "sample"},
        payload={"source": "upload"},
        payload_persistent={"case": 7},
        headers_persistent={"tenant": "acme"},
        priority=TaskPriority.HIGH,
    )
    child = Task({"type": "child"}, payload={"case": "mine"}, priority=TaskPriority.LOW)
    token = current_task.set(parent)
    try:
        await producer.send_task(child)
    finally:
        current_task.reset(token)
    orphan = Task({"type": "child"}, priority=TaskPriority.LOW)
    await producer.send_task(orphan)

    doc = await stored(producer, child.uid)
    assert doc is not None
    assert doc["parent_uid"] == parent.uid and doc["root_uid"] == parent.root_uid
    assert doc["root_uid"] != child.uid
    assert doc["priority"] == "high"  # the whole tree keeps the root's priority
    assert doc["payload_persistent"]["case"] == 7  # persistent beats the child's own
    assert "case" not in doc["payload"]
    assert doc["headers"]["tenant"] == "acme" and doc["headers"]["type"] == "child"
    assert doc["headers"]["origin"] == IDENTITY
    loose = await stored(producer, orphan.uid)
    assert loose is not None
    assert loose["parent_uid"] is None and loose["root_uid"] == orphan.root_uid
    assert loose["priority"] == "low"


async def test_a_bad_payload_fails_the_batch_before_anything_is_written(
    producer: Producer, monkeypatch: pytest.MonkeyPatch
) -> None:
    puts = Puts()
    puts.install(monkeypatch, producer)
    good = Task({"type": "sample"})
    good.add_payload("sample", LocalResource("s.bin", b"data"))
    bad = Task({"type": "sample"}, payload={"handle": object()})

    with pytest.raises(InvalidTaskError) as caught:
        await producer.send_tasks([good, bad])

    assert caught.value.uid == bad.uid and bad.uid in str(caught.value)
    assert puts.keys == []
    assert await producer.backend.redis.keys("karton.*") == []


async def test_send_tasks_queues_a_whole_batch_in_one_call_in_order(
    producer: Producer, monkeypatch: pytest.MonkeyPatch
) -> None:
    enqueue = Calls(monkeypatch, "enqueue_unrouted")
    batch = [Task({"type": "sample", "n": str(n)}) for n in range(50)]

    await producer.send_tasks(iter(batch))  # any iterable
    await producer.send_tasks([])

    assert len(enqueue.args) == 1
    assert await queued(producer) == [t.uid for t in batch]
    assert await producer.backend.redis.hget("karton.metrics.produced", IDENTITY) == "50"
    for task in batch:
        doc = await stored(producer, task.uid)
        assert doc is not None and doc["headers"]["n"] == task.headers["n"]


@pytest.mark.parametrize(
    ("own", "default", "deduplicated"),
    [
        pytest.param(True, "0", True, id="resource-on-beats-default-off"),
        pytest.param(False, "1", False, id="resource-off-beats-default-on"),
        pytest.param(None, "1", True, id="unset-follows-default-on"),
        pytest.param(None, "0", False, id="unset-follows-default-off"),
    ],
)
async def test_a_resources_own_deduplicate_choice_beats_the_default(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    own: bool | None,
    default: str,
    deduplicated: bool,
) -> None:
    content = b"the same bytes twice"
    digest = hashlib.sha256(content).hexdigest()
    async with producer_for(tmp_path, deduplicate=default) as producer:
        puts = Puts()
        puts.install(monkeypatch, producer)
        tasks = [Task({"type": "sample"}) for _ in range(2)]
        for task in tasks:
            task.add_payload("sample", LocalResource("s.bin", content, deduplicate=own))
            await producer.send_task(task)

        uids = []
        for task in tasks:
            doc = await stored(producer, task.uid)
            assert doc is not None
            uids.append(resource_of(doc, "sample")["uid"])

    if deduplicated:
        assert uids == [digest, digest]
        assert puts.keys == [digest]  # the second send found the object
    else:
        assert digest not in uids and uids[0] != uids[1]
        assert puts.keys == uids
