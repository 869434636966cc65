"""A consumer whose Redis comes back without its bind registers it again at once.

A master can come back without the data it had: a Sentinel failover to a replica that
had not received it yet, or a restart without persistence.  Until the consumer's bind
is back, routers drop the tasks for its identity (no bind matches them), so the bind
watcher must not wait for its next periodic check: the fetch loop, which sees the
outage first, wakes it.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import ClassVar

import anyio
import pytest
import redis.asyncio as aredis

from asynckarton import Consumer, Task
from asynckarton._services import _upkeep
from tests.servers import RedisServer, S3Server, service_config

pytestmark = [pytest.mark.anyio, pytest.mark.faults, pytest.mark.integration]

IDENTITY = "faults.bind-recovery"


class Idle(Consumer):
    """Never receives anything: only its bind matters here."""

    identity = IDENTITY
    filters: ClassVar[list[dict[str, object]]] = [{"type": "bind-recovery"}]

    async def process(self, task: Task) -> None:
        raise AssertionError(f"unexpected task {task.uid}")


@pytest.fixture
def volatile_redis() -> Iterator[RedisServer]:
    """A redis-server without persistence: a restart empties it."""
    server = RedisServer()
    server.start()
    try:
        yield server
    finally:
        server.close()


async def test_the_bind_is_registered_again_soon_after_redis_comes_back_empty(
    volatile_redis: RedisServer, s3_srv: S3Server, s3_bucket: str
) -> None:
    config = service_config(volatile_redis.url, s3_srv, s3_bucket)
    client = aredis.Redis.from_url(volatile_redis.url, decode_responses=True)
    consumer = Idle(config)
    try:
        async with anyio.create_task_group() as group:
            await group.start(consumer.run)
            assert await client.hexists("karton.binds", IDENTITY)
            # The watcher checked the bind as the consumer started; its next periodic
            # check is BIND_CHECK_INTERVAL away.
            await anyio.sleep(0.3)
            volatile_redis.restart()  # no persistence: it comes back empty
            back = time.monotonic()
            await client.aclose()  # its connection died with the server
            client = aredis.Redis.from_url(volatile_redis.url, decode_responses=True)
            took = None
            with anyio.move_on_after(_upkeep.BIND_CHECK_INTERVAL + 5):
                while not await client.hexists("karton.binds", IDENTITY):
                    await anyio.sleep(0.05)
                took = time.monotonic() - back
            consumer.stop(grace=0)
    finally:
        await client.aclose()
    assert took is not None, "the consumer never registered its bind again"
    # Wakes at once, then re-checks about every second while Redis is away.
    assert took < 2.5, f"the bind came back {took:.2f}s after Redis did"
