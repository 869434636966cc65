"""pynenc's other ConfigTask options over a real redis-server and a real S3 server.

The result cache (a hit resends the outputs, its entry lives under ``asynckarton.cache:``
with a TTL, and the GC keeps the S3 objects a cached output references),
``force_new_workflow`` (karton-core 5.9.1 reads the task), ``parallel_batch_size`` and a
handler that blocks the event loop past ``task_timeout``.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from typing import Any

import pytest
import redis.asyncio as aredis
from karton.core.task import Task as KartonCoreTask

from asynckarton import Config, Task, TaskState, testing
from asynckarton._services._result_cache import PARENT_ANALYSIS
from asynckarton.storage import S3Storage
from asynckarton.system import GarbageCollector
from tests.servers import S3Server
from tests.unit.test_task_options import Analyser, Blocker, Reports, Splitter, sample

pytestmark = [pytest.mark.integration, pytest.mark.anyio]

LOG = logging.getLogger("test.task_options")


@dataclass
class Deployment:
    redis_url: str
    s3: S3Server
    bucket: str
    redis: aredis.Redis

    def config(self, **karton: Any) -> Config:
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
                "karton": karton,
            }
        )
        return config

    async def objects(self) -> set[str]:
        async with S3Storage(self.s3.url, self.s3.access_key, self.s3.secret_key) as storage:
            return {v.key async for v in storage.list_object_versions(self.bucket)}


@pytest.fixture
async def dep(redis_url: str, s3_srv: S3Server, s3_bucket: str) -> AsyncIterator[Deployment]:
    async with S3Storage(s3_srv.url, s3_srv.access_key, s3_srv.secret_key) as storage:
        await storage.ensure_bucket(s3_bucket, create=True)
    client = aredis.Redis.from_url(redis_url, decode_responses=True)
    try:
        yield Deployment(redis_url, s3_srv, s3_bucket, client)
    finally:
        await client.aclose()


@pytest.fixture(autouse=True)
def _reset() -> None:
    Analyser.runs.clear()
    Reports.seen.clear()


async def test_result_cache_on_redis_and_s3(dep: Deployment) -> None:
    config = dep.config(call_result_cache_ttl="120")
    async with testing.pipeline(Analyser, Reports, config=config) as p:
        await p.send(sample(1))
        await p.wait_idle()
        await p.send(sample(1))
        await p.wait_idle()
        copies = await p.tasks(receiver="test.analyser")
        keys = [k async for k in dep.redis.scan_iter(match="asynckarton.cache:test.analyser:*")]
        assert len(keys) == 1
        ttl = await dep.redis.pttl(keys[0])
        assert 0 < ttl <= 120_000
        raw = await dep.redis.get(keys[0])
        assert raw is not None
        entry = json.loads(raw)
        assert len(entry["outputs"]) == 1

        gc = GarbageCollector(
            p.producer.backend, p.producer.storage, dep.bucket, config.system_settings(), LOG
        )
        before = await dep.objects()
        assert len(before) == 1
        report = await gc.collect()
        assert report is not None and report.deleted_tasks >= 4
        assert await dep.objects() == before  # referenced by the cached output only
        await dep.redis.delete(keys[0])  # the entry expires
        await gc.collect()
        assert await dep.objects() == set()
    assert len(Analyser.runs) == 1
    assert all(t.status is TaskState.FINISHED for t in copies)
    assert sorted(r.parent_uid or "" for r in Reports.seen) == sorted(t.uid for t in copies)


async def test_force_new_workflow_is_readable_by_karton_core(dep: Deployment) -> None:
    async with testing.pipeline(Splitter, Reports, config=dep.config()) as p:
        await p.send(Task({"type": "split"}))
        await p.wait_idle()
        (parent,) = await p.tasks(receiver="test.splitter")
        (child,) = Reports.seen
        body = await dep.redis.get(f"karton.task:{child.uid}")
    assert body is not None
    theirs = KartonCoreTask.unserialize(body)
    assert theirs.root_uid == child.root_uid != parent.root_uid
    assert theirs.parent_uid == parent.uid
    assert theirs.payload[PARENT_ANALYSIS] == {"root_uid": parent.root_uid, "uid": parent.uid}


async def test_parallel_batch_size_on_redis(dep: Deployment) -> None:
    config = dep.config(parallel_batch_size="3")
    async with testing.pipeline(Reports, config=config) as p:
        sent: list[int] = []
        original = p.producer.backend.enqueue_unrouted

        async def counting(bodies: Mapping[str, str], identity: str) -> None:
            sent.append(len(bodies))
            await original(bodies, identity)

        p.producer.backend.enqueue_unrouted = counting  # type: ignore[method-assign]
        await p.send(*(Task({"type": "report"}) for _ in range(7)))
        await p.wait_idle()
    assert sent == [3, 3, 1]
    assert len(Reports.seen) == 7


async def test_a_blocking_handler_times_out_on_redis(dep: Deployment) -> None:
    async with testing.pipeline(Blocker, config=dep.config()) as p:
        await p.send(Task({"type": "block"}, payload={"sleep": 0.5}))
        await p.wait_idle()
        (task,) = await p.tasks(receiver="test.blocker")
        body = await dep.redis.get(f"karton.task:{task.uid}")
    assert task.status is TaskState.CRASHED
    assert body is not None and "TaskTimeoutError" in "".join(json.loads(body)["error"])
