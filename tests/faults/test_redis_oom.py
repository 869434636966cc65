"""Redis at ``maxmemory`` (policy ``noeviction``): refuse cleanly, then resume by itself.

A real redis-server; a system service process (router + GC, ``gc_interval`` 2 s) and,
later, a consumer process.  The test queues 150 tasks of about 20 kB for a bind with no
consumer yet, writes a 2 MB filler key, and (while a resource uploads) lowers
``maxmemory`` below what is used, so every write that may grow memory is refused.  Then:

* a task whose resource is uploading when Redis fills up: ``send_tasks`` raises
  :class:`BackendFullError` naming the condition; its Declared key is deleted again,
  nothing is queued, and the uploaded object is an orphan;
* a plain task: the same error, and nothing of the batch is in Redis (the batch is one
  transaction);
* the services stay up through the full period (their loops retry the refusal);
* the filler key is deleted (memory freed), and with no restart: the consumer drains the
  queue, a new ``send_tasks`` succeeds and is delivered, and the GC removes the orphan.

The summary (deliveries, duplicates, seconds) is printed as JSON.
"""

from __future__ import annotations

import io
import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

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
            client.set("faults:filler", "f" * 2_000_000)

            def fill_redis() -> None:  # Redis fills up while the resource uploads
                # 1 MB less than the data holds with the filler, 1 MB more than without.
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

            client.delete("faults:filler")  # memory freed: everything resumes by itself
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
