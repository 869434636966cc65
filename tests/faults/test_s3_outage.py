"""S3 outages: the S3 server is stopped and started again while work is in flight.

A real redis-server (the session one, flushed) and a moto S3 server this module stops and
restarts on the same port (``RestartableS3Server``: objects survive, connections are
refused while it is down).  The services run in the test's event loop.

* **Producer uploading** (the server stops while the resource's bytes are being read):
  ``send_task`` raises ``StorageError`` naming the bucket, and nothing is queued: no task
  key, nothing in ``karton.tasks``.  Once S3 is back the same producer sends again.
* **Consumer downloading, transient outage**: the handler's download fails after the
  storage's own retries, the consumer's retry policy (``max_retries``) schedules it
  again with backoff, S3 comes back, and the task ends Finished with the right bytes.
* **Consumer downloading, lasting outage**: without retries the task ends Crashed, its
  error naming the bucket and the key; after S3 is back, ``asynckarton tasks restart``
  (the CLI, another process) restarts it and it ends Finished.
* **GC deleting**: with S3 down the pass fails and deletes nothing; with S3 going down
  between the listing and the deletes, nothing is deleted either; the next pass removes
  the orphan and keeps the referenced object.
"""

from __future__ import annotations

import io
import json
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, ClassVar

import anyio
import pytest
import redis.asyncio as aredis

from asynckarton import (
    Config,
    Consumer,
    LocalResource,
    Producer,
    RemoteResource,
    StorageError,
    SystemService,
    Task,
)
from asynckarton.storage import S3Storage
from asynckarton.system import GarbageCollector
from tests.faults.conftest import REPO
from tests.servers import RestartableS3Server, restartable_s3_server, service_sections

pytestmark = [
    pytest.mark.anyio,
    pytest.mark.faults,
    pytest.mark.integration,
    pytest.mark.timeout(120),
]

KIND = "s3outage"


@pytest.fixture
def s3() -> Iterator[RestartableS3Server]:
    with restartable_s3_server() as server:
        yield server


class Env:
    """One test's configuration (written to a karton.ini too), Redis client and S3."""

    def __init__(self, redis_url: str, s3: RestartableS3Server, bucket: str, tmp: Path) -> None:
        self.s3 = s3
        self.bucket = bucket
        self.sections = service_sections(
            redis_url, s3, bucket, system={"enable_gc": "0"}, karton={"lease_timeout": 5}
        )
        self.ini = tmp / "karton.ini"
        self.ini.write_text(
            "".join(
                f"[{name}]\n" + "".join(f"{k} = {v}\n" for k, v in values.items())
                for name, values in self.sections.items()
            )
        )
        self.redis = aredis.Redis.from_url(redis_url, decode_responses=True)

    def config(self) -> Config:
        config = Config(search_paths=[], environ={})
        config.load_from_dict(self.sections)
        return config

    def storage(self) -> S3Storage:
        return S3Storage(self.s3.url, self.s3.access_key, self.s3.secret_key, attempts=2)

    async def objects(self) -> set[str]:
        async with self.storage() as storage:
            return {v.key async for v in storage.list_object_versions(self.bucket)}

    async def tasks(self) -> dict[str, dict[str, Any]]:
        found: dict[str, dict[str, Any]] = {}
        async for key in self.redis.scan_iter(match="karton.task:*", count=1000):
            body = await self.redis.get(key)
            if body is not None:
                found[str(key).removeprefix("karton.task:")] = json.loads(body)
        return found


@pytest.fixture
async def env(
    redis_url: str, s3: RestartableS3Server, s3_bucket: str, tmp_path: Path
) -> AsyncIterator[Env]:
    environment = Env(redis_url, s3, s3_bucket, tmp_path)
    async with environment.storage() as storage:
        await storage.ensure_bucket(s3_bucket, create=True)
    try:
        yield environment
    finally:
        await environment.redis.aclose()


@asynccontextmanager
async def running(*services: Any) -> AsyncIterator[None]:
    async with anyio.create_task_group() as group:
        for service in services:
            await group.start(service.run)
        try:
            yield
        finally:
            for service in reversed(services):
                service.stop(grace=2.0)


async def wait_until(predicate: Callable[[], Awaitable[bool]], what: str, timeout: float) -> None:
    try:
        with anyio.fail_after(timeout):
            while not await predicate():
                await anyio.sleep(0.05)
    except TimeoutError:
        raise AssertionError(f"timed out after {timeout:g}s waiting for {what}") from None


class _StopsS3(io.BytesIO):
    """A file whose first read stops the S3 server (an outage in the middle of an upload)."""

    def __init__(self, data: bytes, s3: RestartableS3Server) -> None:
        super().__init__(data)
        self.s3: RestartableS3Server | None = s3

    def read(self, size: int | None = -1, /) -> bytes:
        if self.s3 is not None:
            s3, self.s3 = self.s3, None
            s3.stop()
        return super().read(size)


class Downloader(Consumer):
    """Downloads its task's resource once the test opens ``gate``."""

    identity = "faults.s3outage"
    filters: ClassVar[list[dict[str, Any]]] = [{"type": KIND}]

    def __init__(self, config: Config) -> None:
        super().__init__(config)
        self.gate = anyio.Event()
        self.entered = anyio.Event()
        self.attempts = 0
        self.failures: list[str] = []
        self.downloaded: list[bytes] = []

    async def process(self, task: Task) -> None:
        self.entered.set()
        await self.gate.wait()
        self.attempts += 1
        resource = task.get_resource("file")
        assert isinstance(resource, RemoteResource)
        try:
            self.downloaded.append(await resource.download())
        except StorageError as exc:
            self.failures.append(str(exc))
            raise


class RetryingDownloader(Downloader):
    max_retries = 5
    retry_backoff = 0.5


def file_task(content: bytes) -> Task:
    return Task({"type": KIND}, payload={"file": LocalResource("f.bin", content=content)})


async def test_outage_while_a_producer_uploads_queues_nothing(env: Env) -> None:
    with anyio.fail_after(60):
        async with Producer(env.config(), identity="faults.producer") as producer:
            task = Task(
                {"type": KIND},
                payload={"file": LocalResource("f.bin", fd=_StopsS3(b"u" * 1000, env.s3))},
            )
            with pytest.raises(StorageError, match=env.bucket):
                await producer.send_task(task)
            assert not env.s3.running
            assert await env.tasks() == {}
            assert await env.redis.llen("karton.tasks") == 0

            env.s3.start()  # back: the same producer works again
            again = file_task(b"again")
            await producer.send_task(again)
    assert set(await env.tasks()) == {again.uid}
    assert await env.redis.lrange("karton.tasks", 0, -1) == [again.uid]


async def test_transient_download_outage_is_retried_until_s3_is_back(env: Env) -> None:
    consumer = RetryingDownloader(env.config())
    with anyio.fail_after(60):
        async with (
            Producer(env.config(), identity="faults.producer") as producer,
            running(SystemService(env.config()), consumer),
        ):
            await producer.send_task(file_task(b"transient"))
            await consumer.entered.wait()
            env.s3.stop()
            consumer.gate.set()
            # The storage's own retries (backoff) run out, then the consumer's retry
            # schedule takes over; S3 comes back meanwhile.
            await wait_until(lambda: _true(bool(consumer.failures)), "a failed download", 20)
            env.s3.start()

            async def finished() -> bool:
                docs = await env.tasks()
                return any(
                    d["status"] == "Finished"
                    and d["headers"].get("receiver") == Downloader.identity
                    for d in docs.values()
                )

            await wait_until(finished, "the task to finish", 40)
    assert consumer.downloaded == [b"transient"]
    assert consumer.attempts >= 2, "the first attempt should have failed"
    assert env.bucket in consumer.failures[0], consumer.failures
    assert not any(d["status"] == "Crashed" for d in (await env.tasks()).values())


async def _true(value: bool) -> bool:
    return value


async def test_lasting_download_outage_crashes_naming_the_object_then_restarts(
    env: Env,
) -> None:
    consumer = Downloader(env.config())
    with anyio.fail_after(90):
        async with (
            Producer(env.config(), identity="faults.producer") as producer,
            running(SystemService(env.config()), consumer),
        ):
            task = file_task(b"lasting")
            resource = task.get_payload("file")  # the producer-side LocalResource
            await producer.send_task(task)
            await consumer.entered.wait()
            env.s3.stop()
            consumer.gate.set()

            async def crashed() -> dict[str, Any] | None:
                for uid, doc in (await env.tasks()).items():
                    if doc["status"] == "Crashed":
                        return {"uid": uid, **doc}
                return None

            await wait_until(lambda: _is_some(crashed()), "the task to crash", 30)
            doc = await crashed()
            assert doc is not None
            last = doc["error"][-1]
            assert "StorageError" in last and env.bucket in last and resource.uid in last, last

            env.s3.start()  # later, an operator restarts it from the command line
            result = await anyio.run_process(
                [
                    sys.executable,
                    "-m",
                    "asynckarton",
                    "tasks",
                    "restart",
                    "--uid",
                    doc["uid"],
                    "--config-file",
                    str(env.ini),
                ],
                cwd=REPO,
                check=False,
            )
            assert result.returncode == 0, result.stderr.decode()

            async def finished() -> bool:
                return any(d["status"] == "Finished" for d in (await env.tasks()).values()) and (
                    consumer.downloaded == [b"lasting"]
                )

            await wait_until(finished, "the restarted task to finish", 30)
    assert consumer.attempts == 2


async def _is_some(value: Awaitable[object | None]) -> bool:
    return (await value) is not None


async def test_gc_outage_deletes_nothing_and_the_next_pass_resumes(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = env.config()
    with anyio.fail_after(60):
        async with (
            Producer(config, identity="faults.producer") as producer,
            SystemService(config) as system,
        ):
            kept = file_task(b"referenced")
            await producer.send_task(kept)  # Declared then queued: a task refers to it
            async with env.storage() as storage:
                await storage.put_bytes(env.bucket, "orphan", b"nobody refers to this")
            objects = await env.objects()
            assert objects == {kept.get_payload("file").uid, "orphan"}
            gc = GarbageCollector(
                system.backend, system.storage, system.runtime.bucket, system.settings, system.log
            )

            env.s3.stop()  # down before the pass: the listing fails
            with pytest.raises(StorageError, match=env.bucket):
                await gc.collect()
            env.s3.start()
            assert await env.objects() == objects

            # Down between the listing and the deletes (while the GC scans the tasks).
            scan = system.backend.scan_tasks

            def scan_then_stop(**kwargs: Any) -> AsyncIterator[list[tuple[str, str]]]:
                env.s3.stop()
                return scan(**kwargs)

            monkeypatch.setattr(system.backend, "scan_tasks", scan_then_stop)
            with pytest.raises(StorageError, match=env.bucket):
                await gc.collect()
            monkeypatch.undo()
            env.s3.start()
            assert await env.objects() == objects

            report = await gc.collect()  # the next pass resumes
    assert report is not None and report.deleted_objects == 1
    assert await env.objects() == {kept.get_payload("file").uid}
