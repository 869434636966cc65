"""Idle services over a real redis-server: few wake-ups, and every guarantee still kept.

An idle consumer waits on the server (its upkeep round and its blocking pop), an idle
router in one pipelined BLMOVE + heartbeat (docs/architecture.md, "Idle cost").  These
tests check both sides: how few commands idle services send, and that expired leases,
dead routers' journals, replaced binds and stop() are still dealt with promptly.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, ClassVar

import anyio
import pytest
import redis.asyncio as aredis

from asynckarton import Config, Consumer, SystemService, Task, TaskState
from asynckarton._services import _upkeep
from asynckarton.storage import S3Storage
from tests.servers import S3Server, service_config

pytestmark = [pytest.mark.integration, pytest.mark.anyio]

IDENTITY = "test.idle"


class Recorder(Consumer):
    identity = IDENTITY
    filters: ClassVar[list[dict[str, Any]]] = [{"type": "idle"}]
    seen: ClassVar[list[tuple[str, float]]] = []

    async def process(self, task: Task) -> None:
        type(self).seen.append((task.uid, time.time()))


@pytest.fixture
async def env(
    redis_url: str, s3_srv: S3Server, s3_bucket: str
) -> AsyncIterator[tuple[Callable[[], Config], aredis.Redis]]:
    async with S3Storage(s3_srv.url, s3_srv.access_key, s3_srv.secret_key) as storage:
        await storage.ensure_bucket(s3_bucket, create=True)

    def config() -> Config:
        return service_config(redis_url, s3_srv, s3_bucket, system={"enable_gc": "0"})

    Recorder.seen = []
    client = aredis.Redis.from_url(redis_url, decode_responses=True)
    try:
        yield config, client
    finally:
        await client.aclose()


async def _until(predicate: Callable[[], Awaitable[bool]], what: str, timeout: float) -> None:
    with anyio.fail_after(timeout):
        while not await predicate():
            await anyio.sleep(0.02)


async def _calls(client: aredis.Redis) -> dict[str, int]:
    stats = await client.info("commandstats")
    return {
        name.removeprefix("cmdstat_"): int(value["calls"])
        for name, value in stats.items()
        if not name.startswith(("cmdstat_info", "cmdstat_config"))
    }


async def test_idle_consumer_and_system_send_almost_no_commands(env: Any) -> None:
    """Before: a fetch every 0.5 s, a lease round every second, a route wait every second."""
    config, client = env
    consumer, system = Recorder(config()), SystemService(config())
    async with anyio.create_task_group() as group:
        await group.start(system.run)
        await group.start(consumer.run)
        await anyio.sleep(1.5)  # start-up writes (bind, logs, first rounds) are over
        await client.config_resetstat()
        await anyio.sleep(4.0)
        calls = await _calls(client)
        consumer.stop(grace=0)
        system.stop()
    # At most one upkeep round (15 s apart), one router wait (24 s), one fetch (25 s).
    assert sum(calls.values()) <= 6, calls


async def test_an_expired_lease_is_requeued_when_it_expires(env: Any) -> None:
    """A dead replica's lease is reclaimed at its deadline, not at the next 15 s round."""
    config, client = env
    task = Task({"type": "idle"})
    task.headers["receiver"] = IDENTITY
    task.status, task.last_update = TaskState.STARTED, time.time()
    deadline = time.time() + 1.5
    await client.set(f"karton.task:{task.uid}", task.serialize())
    await client.zadd(f"asynckarton.leases:{IDENTITY}", {task.uid: int(deadline * 1000)})
    consumer = Recorder(config())
    async with anyio.create_task_group() as group:
        await group.start(consumer.run)

        async def processed() -> bool:
            return bool(Recorder.seen)

        await _until(processed, "the reclaimed task", 10.0)
        consumer.stop(grace=1)
    (uid, at), *_ = Recorder.seen
    assert uid == task.uid
    assert deadline <= at < deadline + 1.0  # requeued at its deadline (the round is 15 s)
    assert int(await client.hget("asynckarton.stats", "redelivered") or 0) == 1


async def test_an_idle_router_recovers_a_dead_routers_journal_at_its_deadline(
    env: Any,
) -> None:
    config, client = env
    deadline = time.time() + 1.5
    await client.rpush("asynckarton.routing:dead", "{r}:gone")
    await client.zadd("asynckarton.routers", {"dead": int(deadline * 1000)})
    system = SystemService(config())
    async with anyio.create_task_group() as group:
        await group.start(system.run)

        async def recovered() -> bool:
            return not await client.exists("asynckarton.routing:dead")

        await _until(recovered, "the dead router's journal", 10.0)
        at = time.time()
        system.stop()
    assert deadline <= at < deadline + 1.0  # the idle wait (24 s) ends at the deadline
    assert await client.zscore("asynckarton.routers", "dead") is None
    assert int(await client.hget("asynckarton.stats", "rerouted") or 0) == 1


async def test_stop_is_prompt_while_idle(env: Any) -> None:
    """The consumer's pop (25 s) is unblocked, the router's wait (24 s) cancelled."""
    config, client = env
    consumer, system = Recorder(config()), SystemService(config())
    async with anyio.create_task_group() as group:
        await group.start(system.run)
        await group.start(consumer.run)
        await anyio.sleep(0.5)
        began = time.monotonic()
        with anyio.fail_after(3):
            consumer.stop(grace=5)
            system.stop()
            while consumer.handlers_running or consumer._scopes is not None:
                await anyio.sleep(0.01)
        took = time.monotonic() - began
    assert took < 1.5, took
    assert await client.zcard("asynckarton.routers") == 0  # the router deregistered


async def test_a_journal_left_by_a_cancelled_idle_wait_goes_back_on_stop(env: Any) -> None:
    config, client = env
    system = SystemService(config())
    async with anyio.create_task_group() as group:
        await group.start(system.run)
        await anyio.sleep(0.3)
        assert system.router is not None
        # What a BLMOVE that moved a uid just as stop() cancelled the wait leaves behind:
        await client.rpush(f"asynckarton.routing:{system.router.instance}", "{r}:moved")
        system.stop()
    assert await client.lrange("karton.tasks", 0, -1) == ["{r}:moved"]
    assert await client.zcard("asynckarton.routers") == 0


async def test_a_replaced_bind_stops_the_consumer(
    env: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_upkeep, "BIND_CHECK_INTERVAL", 0.3)
    config, client = env
    consumer = Recorder(config())
    with anyio.fail_after(10):
        async with anyio.create_task_group() as group:
            await group.start(consumer.run)
            newer = json.loads(await client.hget("karton.binds", IDENTITY))
            newer["filters"] = [{"type": "newer"}]
            await client.hset("karton.binds", IDENTITY, json.dumps(newer))
            # run() returns once the upkeep noticed the newer bind (within a round).
    assert json.loads(await client.hget("karton.binds", IDENTITY))["filters"] == [{"type": "newer"}]


async def test_an_idle_routers_heartbeat_never_lapses(
    env: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Its waits (here longer than the TTL) end before the last heartbeat expires."""
    from asynckarton.system import _router

    monkeypatch.setattr(_router, "HEARTBEAT_TTL", 1.0)
    monkeypatch.setattr(_router, "ROUTE_WAIT", 2.5)
    config, client = env
    system = SystemService(config())
    lapses: list[float] = []
    async with anyio.create_task_group() as group:
        await group.start(system.run)
        assert system.router is not None
        instance = system.router.instance
        for _ in range(120):  # 6 s: several idle waits
            score = await client.zscore("asynckarton.routers", instance)
            if score is None or score / 1000 < time.time():
                lapses.append(time.time())
            await anyio.sleep(0.05)
        system.stop()
    assert not lapses, f"{len(lapses)} samples saw the heartbeat expired"
