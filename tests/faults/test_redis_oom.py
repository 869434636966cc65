"""Redis at ``maxmemory`` (policy ``noeviction``): producers refused, draining goes on.

A real redis-server and worker processes (``_worker.py``: a system service with
``gc_interval`` 2 s, a consumer).  Filler keys bigger than all the tasks push Redis past
a small ``maxmemory``, so every plain command that may grow memory is refused.

``test_full_redis_refuses_cleanly_and_resumes`` (150 tasks of about 20 kB routed to a
bind with no consumer yet; Redis fills up while a resource uploads):

* a task whose resource is uploading when Redis fills up: ``send_tasks`` raises
  :class:`BackendFullError` naming the condition; its Declared key is deleted again,
  nothing is queued, and the uploaded object is an orphan;
* a plain task: the same error, and nothing of the batch is in Redis (the batch is one
  transaction);
* the services stay up through the full period;
* the filler is deleted (memory freed), and with no restart: the consumer drains the
  queue, a new ``send_tasks`` succeeds and is delivered, and the GC removes the orphan.

``test_full_redis_keeps_draining``: Redis stays over ``maxmemory`` for the whole test
while the router forks a backlog, the consumer finishes every task exactly once and the
GC deletes them; every ``send_tasks`` meanwhile is refused.

Each test prints its summary (deliveries, duplicates, seconds) as JSON.
"""

from __future__ import annotations

import io
import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import anyio
import boto3  # type: ignore[import-untyped]
import pytest

from asynckarton import BackendFullError, LocalResource, Producer, Task
from tests.faults.conftest import IDENTITY, FaultEnv, poll
from tests.servers import RedisServer, S3Server

pytestmark = [
    pytest.mark.anyio,
    pytest.mark.faults,
    pytest.mark.integration,
    pytest.mark.timeout(150),
]

TASKS = 150
PAD = "x" * 20_000
OLD_FILLER = 10_000_000  # bytes: more than the tasks and their forks (150 x 2 x 20 kB)


@pytest.fixture
def oom_redis() -> Iterator[RedisServer]:
    server = RedisServer(extra_args=["--maxmemory-policy", "noeviction"])
    server.start()
    try:
        yield server
    finally:
        server.close()


class _Hook(io.BytesIO):
    """A file whose first read calls ``hook`` (something happens mid-upload)."""

    def __init__(self, data: bytes, hook: Callable[[], None]) -> None:
        super().__init__(data)
        self.hook: Callable[[], None] | None = hook

    def read(self, size: int | None = -1, /) -> bytes:
        if self.hook is not None:
            hook, self.hook = self.hook, None
            hook()
        return super().read(size)


def _objects(s3: S3Server, bucket: str) -> set[str]:
    client = boto3.client(
        "s3",
        endpoint_url=s3.url,
        aws_access_key_id=s3.access_key,
        aws_secret_access_key=s3.secret_key,
        region_name="us-east-1",
    )
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=bucket)
    return {obj["Key"] for page in pages for obj in page.get("Contents", [])}


async def test_full_redis_refuses_cleanly_and_resumes(
    oom_redis: RedisServer,
    tmp_path: Path,
    s3_srv: S3Server,
    s3_bucket: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    env = FaultEnv(tmp_path, oom_redis, s3_srv, s3_bucket)
    client = env.r()
    try:
        system = env.spawn("system")
        await env.wait_ready(system, timeout=60)
        env.register_bind()
        queue = f"karton.queue.normal:{IDENTITY}"
        async with Producer(env.config(), identity="faults.producer") as producer:
            tasks = [env.make_task(n=i, pad=PAD) for i in range(TASKS)]
            for start in range(0, TASKS, 50):
                await producer.send_tasks(tasks[start : start + 50])
            await poll(lambda: client.llen(queue) == TASKS, 30, "the tasks to be routed")
            roots = [t.root_uid for t in tasks]

            before = int(client.info("memory")["used_memory"])
            for i in range(40):  # more than every task holds: the GC cannot free enough
                client.set(f"faults:filler:{i}", "f" * (OLD_FILLER // 40))

            def fill_redis() -> None:  # Redis fills up while the resource uploads
                # far less than the data holds with the filler, 1 MB more than without.
                client.config_set("maxmemory", before + 1_000_000)

            with_file = Task(
                {"type": "faults", "kind": "test"},
                payload={"file": LocalResource("orphan.bin", fd=_Hook(b"o" * 4096, fill_redis))},
            )
            resource = with_file.payload["file"]
            assert isinstance(resource, LocalResource)
            with pytest.raises(BackendFullError, match="maxmemory") as caught:
                await producer.send_tasks([with_file])
            full_at = time.monotonic()
            assert caught.value.operation == "send tasks"
            # Declared before the upload, refused at the queueing: the key is gone again,
            # the object stays behind as an orphan.
            assert not client.exists(f"karton.task:{with_file.uid}")
            assert client.llen("karton.tasks") == 0
            assert resource.uid in _objects(s3_srv, s3_bucket), "the upload should be there"

            refused = env.make_task(n="refused")
            with pytest.raises(BackendFullError, match="maxmemory"):
                await producer.send_tasks([refused])
            assert not client.exists(f"karton.task:{refused.uid}")
            assert client.llen("karton.tasks") == 0
            assert client.llen(queue) == TASKS

            consumer = env.spawn("consumer")
            # Full for a while: the services stay up (their loops retry the refusal).
            await poll(lambda: time.monotonic() - full_at > 6, 10, "the full period")
            assert system.alive() and consumer.alive(), "\n".join(
                p.output()[-3000:] for p in env.procs
            )
            done_while_full = client.hlen("faults:done")
            memory = client.info("memory")
            still_full = memory["used_memory"] > memory["maxmemory"]

            client.delete(*(f"faults:filler:{i}" for i in range(40)))  # memory freed
            freed_at = time.monotonic()
            await env.wait_ready(consumer, timeout=60)
            after = env.make_task(n="after")
            await producer.send_tasks([after])
            roots.append(after.root_uid)

        def delivered() -> bool:
            return set(roots) <= set(client.hkeys("faults:done"))

        drained = await poll(delivered, 60, "every task to be delivered", 0.5)
        orphan_gone = await poll(
            lambda: resource.uid not in _objects(s3_srv, s3_bucket), 30, "the GC", 0.5
        )
        counts = {k: int(v) for k, v in client.hgetall("faults:done").items()}
        summary: dict[str, Any] = {
            "tasks": len(roots),
            "delivered": sum(1 for r in roots if r in counts),
            "duplicated": sum(1 for r in roots if counts.get(r, 0) > 1),
            "done_while_full": done_while_full,
            "still_full_before_free": still_full,
            "seconds": {
                "full": round(freed_at - full_at, 1),
                "drain_after_free": round(drained, 1),
                "orphan_collected_after": round(drained + orphan_gone, 1),
            },
        }
        with capsys.disabled():
            print(f"\nredis out-of-memory summary:\n{json.dumps(summary)}")
        assert still_full, f"memory was freed before the test freed it: {summary}"
        assert summary["delivered"] == len(roots), summary
        assert system.alive() and consumer.alive()
        assert not client.exists(f"karton.task:{refused.uid}")
    finally:
        env.cleanup()
        client.close()


DRAIN_TASKS = 200
DRAIN_PAD = "d" * 10_000
FILLER = 8_000_000  # bytes: more than the tasks and their forks, so deleting them all stays full


async def test_full_redis_keeps_draining(
    oom_redis: RedisServer,
    tmp_path: Path,
    s3_srv: S3Server,
    s3_bucket: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Over ``maxmemory`` the whole time: the backlog is routed, processed and collected.

    A consumer is up and idle; ``DRAIN_TASKS`` tasks wait unrouted in ``karton.tasks``
    with no router.  Then a filler key pushes Redis ``FILLER`` bytes past a ``maxmemory``
    that is never raised, and only then does a system service start: the router forks
    the backlog, the consumer processes and finishes every task exactly once, and the GC
    deletes them all, while every ``send_tasks`` meanwhile is refused and leaves
    nothing behind.  (The consumer starts before: its concurrency-policy HSET is still a
    plain command, refused over ``maxmemory``.)  The filler is bigger than all the tasks, so the
    GC's deletions free memory without ever bringing Redis back under the limit; the
    test checks that at every poll.
    """
    env = FaultEnv(tmp_path, oom_redis, s3_srv, s3_bucket)
    client = env.r()
    roots: list[str] = []
    refused: list[str] = []
    over_every_poll = True

    def full() -> bool:
        nonlocal over_every_poll
        memory = client.info("memory")
        over = int(memory["used_memory"]) > int(memory["maxmemory"]) > 0
        over_every_poll = over_every_poll and over
        return over

    try:
        consumer = env.spawn("consumer")
        await env.wait_ready(consumer, timeout=60)
        async with Producer(env.config(), identity="faults.producer") as producer:
            tasks = [env.make_task(n=i, pad=DRAIN_PAD) for i in range(DRAIN_TASKS)]
            for start in range(0, DRAIN_TASKS, 100):
                await producer.send_tasks(tasks[start : start + 100])
            roots = [t.root_uid for t in tasks]
            assert client.llen("karton.tasks") == DRAIN_TASKS

            memory = client.info("memory")  # the backlog, no filler yet
            loaded, limit = int(memory["used_memory_dataset"]), int(memory["used_memory"])
            limit += FILLER // 2
            for i in range(40):  # small values: no big query buffer counted as used memory
                client.set(f"faults:filler:{i}", "f" * (FILLER // 40))
            client.config_set("maxmemory", limit)
            assert full(), "Redis should be over maxmemory now"
            full_at = time.monotonic()

            system = env.spawn("system")
            await env.wait_ready(system, timeout=60)

            async def try_send() -> None:
                task = env.make_task(n="refused")
                with pytest.raises(BackendFullError, match="maxmemory"):
                    await producer.send_tasks([task])
                refused.append(task.uid)

            def delivered() -> bool:
                assert full(), "Redis went under maxmemory by itself"
                return set(roots) <= set(client.hkeys("faults:done"))

            deadline = time.monotonic() + 40
            while not delivered():
                assert time.monotonic() < deadline, f"not drained: {env.queue_state()}"
                await try_send()
                await anyio.sleep(0.5)
            drained = time.monotonic() - full_at

            def collected() -> bool:
                assert full(), "Redis went under maxmemory by itself"
                return not any(client.scan_iter("karton.task:*", count=1000))

            deadline = time.monotonic() + 20
            while not collected():
                assert time.monotonic() < deadline, f"not collected: {env.tasks_by_status()}"
                await try_send()
                await anyio.sleep(0.5)
            gone = time.monotonic() - full_at
            await try_send()  # still refused after all that work

        after = int(client.info("memory")["used_memory_dataset"])
        state = env.queue_state()
        done = {k: int(v) for k, v in client.hgetall("faults:done").items()}
        started = {k: int(v) for k, v in client.hgetall("faults:started").items()}
        summary: dict[str, Any] = {
            "tasks": len(roots),
            "delivered": sum(1 for r in roots if r in done),
            "duplicated": sum(1 for r in roots if done.get(r, 0) > 1 or started.get(r, 0) > 1),
            "refused_sends": len(refused),
            "over_maxmemory_at_every_poll": over_every_poll,
            "dataset_bytes": {"with_backlog": loaded, "after_gc": after, "filler": FILLER},
            "seconds": {"drained": round(drained, 1), "collected": round(gone, 1)},
            "left": state,
        }
        with capsys.disabled():
            print(f"\nredis out-of-memory drain summary:\n{json.dumps(summary)}")
        assert summary["delivered"] == len(roots), summary
        assert summary["duplicated"] == 0, summary
        assert set(done) == set(roots), "a refused task was delivered"
        assert over_every_poll, summary
        # The filler stays; the backlog's memory (tasks and their forks) was freed.
        assert after - FILLER < loaded, f"the GC freed nothing: {summary}"
        assert state["karton.tasks"] == 0 and state["leases"] == 0, state
        assert not any(state[f"queue.{p}"] for p in ("high", "normal", "low")), state
        assert not any(client.exists(f"karton.task:{uid}") for uid in refused)
        assert system.alive() and consumer.alive(), "\n".join(p.output()[-3000:] for p in env.procs)
    finally:
        env.cleanup()
        client.close()
