"""Prometheus exporters against redis-server and moto S3, parsed with prometheus_client."""

from __future__ import annotations

import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import anyio
import httpx
import pytest
import redis.asyncio as aredis
from prometheus_client.parser import text_string_to_metric_families

from asynckarton import Config, Consumer, Producer, SystemService, Task, TaskState
from asynckarton.backend import Bind
from asynckarton.backend import _keys as keys
from asynckarton.storage import S3Storage
from tests.servers import RedisServer, S3Server, free_port

pytestmark = [pytest.mark.integration, pytest.mark.anyio]

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


class Worker(Consumer):
    identity = "metrics.worker"
    filters = [{"type": "work"}]
    lease_timeout = 0.6  # renewals every 0.2 s

    async def process(self, task: Task) -> None:
        if task.headers.get("fail"):
            raise ValueError("asked to fail")
        await anyio.sleep(float(task.payload.get("sleep", 0)))


@pytest.fixture
async def config(
    redis_url: str, redis_srv: RedisServer, s3_srv: S3Server, s3_bucket: str, tmp_path: Path
) -> AsyncIterator[Config]:
    async with S3Storage(s3_srv.url, s3_srv.access_key, s3_srv.secret_key) as storage:
        await storage.ensure_bucket(s3_bucket, create=True)
    ini = tmp_path / "karton.ini"
    ini.write_text(
        f"[redis]\nhost = 127.0.0.1\nport = {redis_srv.port}\n"
        f"\n[s3]\naddress = {s3_srv.url}\naccess_key = {s3_srv.access_key}\n"
        f"secret_key = {s3_srv.secret_key}\nbucket = {s3_bucket}\n"
    )
    yield Config(ini, search_paths=[], environ={})


async def scrape(port: int) -> Samples:
    async with httpx.AsyncClient() as client:
        response = await client.get(f"http://127.0.0.1:{port}/metrics", timeout=10)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(response.text)
        for sample in family.samples
    }


def value(samples: Samples, metric: str, /, **labels: str) -> float:
    return samples[metric, frozenset(labels.items())]


async def until(predicate: object, what: str, timeout: float = 20.0) -> None:
    assert callable(predicate)
    with anyio.fail_after(timeout):
        while not await predicate():
            await anyio.sleep(0.05)


async def test_system_exporter_reports_queues_counters_gc_and_task_counts(
    config: Config, redis_url: str
) -> None:
    port = free_port()
    config.load_from_dict(
        {
            "system": {
                "metrics_port": str(port),
                "metrics_scan_interval": "0.2",
                "gc_interval": "0.3",
                "task_crashed_timeout": "3600",
            }
        }
    )
    raw = aredis.Redis.from_url(redis_url, decode_responses=True)
    idle = Bind(identity="metrics.idle", filters=[{"type": "idle"}], service_version="3.1")
    await raw.hset(keys.BINDS, "metrics.idle", idle.to_json())
    system = SystemService(config)
    async with anyio.create_task_group() as group, Producer(config, identity="metrics.test") as p:
        await group.start(system.run)
        for n in range(4):
            await p.send_task(Task({"type": "idle", "n": n}))

        async def routed() -> bool:
            return await raw.llen(keys.queue_key("normal", "metrics.idle")) == 4

        await until(routed, "4 routed tasks")
        dead = Task({"type": "idle"})  # the GC drops dead letters whose task is not Crashed
        dead.status = TaskState.CRASHED
        await raw.set(keys.task_key(dead.uid), dead.serialize())
        await raw.rpush(keys.dead_key("metrics.idle"), dead.uid)
        await raw.hincrby(keys.STATS, "redelivered", 2)

        async def complete() -> bool:
            samples = await scrape(port)
            return ("karton_tasks", frozenset({("name", "metrics_idle"), ("priority", "normal"),
                                               ("status", "Spawned")})) in samples and (
                ("asynckarton_gc_last_pass_timestamp_seconds", frozenset()) in samples
            )  # fmt: skip

        await until(complete, "a GC pass and a task scan")
        samples = await scrape(port)
        system.stop()
    await raw.aclose()

    assert (
        value(samples, "asynckarton_queue_depth", identity="metrics.idle", priority="normal") == 4
    )
    assert value(samples, "asynckarton_queue_depth", identity="metrics.idle", priority="high") == 0
    assert value(samples, "asynckarton_dead_letters", identity="metrics.idle") == 1
    assert value(samples, "asynckarton_leased_tasks", identity="metrics.idle") == 0
    assert value(samples, "asynckarton_unrouted_tasks") == 0
    assert value(samples, "asynckarton_routed_tasks_total") == 4
    assert value(samples, "asynckarton_routers_alive") == 1
    assert value(samples, "asynckarton_lease_reclaims_total") == 2
    assert value(samples, "karton_replicas", name="metrics_idle", version="3.1") == 0
    assert value(samples, "karton_metrics", metric="assigned", name="metrics_idle") == 4
    assert value(samples, "karton_metrics", metric="produced", name="metrics_test") == 4
    spawned = {("name", "metrics_idle"), ("priority", "normal"), ("status", "Spawned")}
    assert samples["karton_tasks", frozenset(spawned)] == 4
    assert value(samples, "asynckarton_gc_duration_seconds_count") >= 1
    assert value(samples, "asynckarton_gc_passes_total") >= 1
    assert value(samples, "asynckarton_gc_last_pass_timestamp_seconds") > 0
    assert value(samples, "asynckarton_redis_used_memory_bytes") > 0
    assert value(samples, "asynckarton_task_scan_duration_seconds") >= 0


async def test_consumer_exporter_reports_handlers_outcomes_and_leases(config: Config) -> None:
    port = free_port()
    config.load_from_dict({"karton": {"metrics_port": str(port)}})
    system, worker = SystemService(config), Worker(config)
    async with anyio.create_task_group() as group, Producer(config, identity="metrics.p") as p:
        await group.start(system.run)
        await group.start(worker.run)
        await p.send_task(Task({"type": "work"}))
        await p.send_task(Task({"type": "work", "fail": 1}))

        def handled(count: int) -> Callable[[], Awaitable[bool]]:
            async def check() -> bool:
                samples = await scrape(port)
                key = ("asynckarton_handler_duration_seconds_count",
                       frozenset({("identity", "metrics.worker")}))  # fmt: skip
                return samples.get(key) == count

            return check

        # The quick tasks are done before the slow one is sent, so the in-flight gauge
        # seen below can only be the slow handler's (a scrape between the quick tasks
        # could otherwise catch one of them and the next scrape a gap).
        await until(handled(2), "two quick handled tasks")
        await p.send_task(Task({"type": "work"}, payload={"sleep": 1.0}))
        during: Samples = {}

        async def busy() -> bool:
            nonlocal during
            during = await scrape(port)
            key = ("asynckarton_handlers_in_flight", frozenset({("identity", "metrics.worker")}))
            return during.get(key) == 1

        await until(busy, "the slow handler to run")
        await until(handled(3), "three handled tasks")
        after = await scrape(port)
        worker.stop()
        system.stop()

    me = {"identity": "metrics.worker"}
    assert value(during, "asynckarton_handlers_in_flight", **me) == 1
    assert value(after, "asynckarton_handlers_in_flight", **me) == 0
    assert value(after, "asynckarton_tasks_processed_total", outcome="ok", **me) == 2
    assert value(after, "asynckarton_tasks_processed_total", outcome="error", **me) == 1
    # >= 0.99: uvloop's timers run on a millisecond clock, so a 1 s sleep can end early
    assert value(after, "asynckarton_handler_duration_seconds_sum", **me) >= 0.99
    assert value(after, "asynckarton_lease_renewals_total", **me) >= 1
    assert value(after, "asynckarton_event_loop_lag_seconds") >= 0


def test_metrics_port_flag_lands_in_the_system_section() -> None:
    parser = SystemService.args_parser()
    args = parser.parse_args(["--metrics-port", "9311"])
    config = Config(search_paths=[], environ={})
    SystemService.config_from_args(config, args)
    assert config.getint("system", "metrics_port") == 9311
    assert config.source("system", "metrics_port") == "argument --metrics-port"


def spawn(argv: list[str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("wb") as out:
        return subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, cwd=log.parent)


async def test_asynckarton_system_metrics_port_flag(config: Config, tmp_path: Path) -> None:
    """``asynckarton system --metrics-port`` serves the system metrics (a real process)."""
    port = free_port()
    ini = str(tmp_path / "karton.ini")  # written by the config fixture
    argv = [sys.executable, "-m", "asynckarton", "system", "--config-file", ini,
            "--metrics-port", str(port)]  # fmt: skip
    process = spawn(argv, tmp_path / "system.log")
    try:

        async def up() -> bool:
            try:
                samples = await scrape(port)
            except httpx.TransportError:
                return process.poll() is not None
            return samples.get(("asynckarton_routers_alive", frozenset())) == 1

        await until(up, "the system's metrics", timeout=60)
        assert process.poll() is None, (tmp_path / "system.log").read_text()
    finally:
        process.send_signal(signal.SIGTERM)
        await anyio.to_thread.run_sync(process.wait, 20)
    assert process.returncode == 0
