"""``python -m asynckarton run ... --with-system`` as a real process, stopped by real signals.

The process runs ``examples/sleeper.py:Sleeper`` and a SystemService against a real
redis-server and the moto S3 server; the test sends tasks with its own Producer and reads
the outcome straight from Redis.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import anyio
import pytest
import redis.asyncio as aredis
from anyio.abc import Process

from asynckarton import Config, LocalResource, Producer, Task
from asynckarton._settings._policy import ConsumerPolicy
from asynckarton.backend._keys import BINDS, leases_key, queue_key
from tests.servers import S3Server

pytestmark = [pytest.mark.integration, pytest.mark.anyio]

REPO = Path(__file__).resolve().parents[2]
SLEEPER = f"{REPO / 'examples' / 'sleeper.py'}:Sleeper"
IDENTITY = "example.sleeper"
STARTUP_TIMEOUT = 90  # a loaded CI machine imports slowly


@dataclass
class Service:
    """The asynckarton process, its log and a way to talk to its deployment."""

    process: Process
    log: Path
    config: Config
    redis: aredis.Redis

    def output(self) -> str:
        return self.log.read_text(encoding="utf-8", errors="replace")

    async def wait_for(self, what: str, check: Callable[[], object], timeout: float) -> None:
        with anyio.move_on_after(timeout):
            while not await _call(check):
                if self.process.returncode is not None:
                    pytest.fail(f"process exited ({self.process.returncode}):\n{self.output()}")
                await anyio.sleep(0.05)
            return
        pytest.fail(f"timed out waiting for {what}:\n{self.output()}")

    async def wait_exit(self, timeout: float) -> int:
        with anyio.move_on_after(timeout):
            return await self.process.wait()
        pytest.fail(f"process still running after {timeout} s:\n{self.output()}")

    async def fork_of(self, root_uid: str) -> dict[str, object] | None:
        """The routed copy of ``root_uid`` that the sleeper received, if any."""
        async for key in self.redis.scan_iter(match=f"karton.task:{{{root_uid}}}:*"):
            raw = await self.redis.get(key)
            doc = json.loads(raw) if raw else {}
            if doc.get("headers", {}).get("receiver") == IDENTITY:
                return doc
        return None

    async def status_of(self, root_uid: str) -> str | None:
        fork = await self.fork_of(root_uid)
        return None if fork is None else str(fork["status"])


async def _call(check: Callable[[], object]) -> object:
    result = check()
    if hasattr(result, "__await__"):
        result = await result
    return result


def write_ini(path: Path, redis_url: str, s3: S3Server, bucket: str) -> Path:
    path.write_text(
        f"[redis]\nurl = {redis_url}\n\n"
        f"[s3]\naddress = {s3.url}\naccess_key = {s3.access_key}\n"
        f"secret_key = {s3.secret_key}\nbucket = {bucket}\n\n"
        "[karton]\nshutdown_grace = 30\n",
        encoding="utf-8",
    )
    return path


@pytest.fixture
async def service(
    tmp_path: Path, redis_url: str, s3_srv: S3Server, s3_bucket: str
) -> AsyncIterator[Service]:
    ini = write_ini(tmp_path / "karton.ini", redis_url, s3_srv, s3_bucket)
    env = {k: v for k, v in os.environ.items() if not k.startswith("KARTON_")}
    env["HOME"] = str(tmp_path)
    log = tmp_path / "asynckarton.log"
    command = [sys.executable, "-m", "asynckarton", "run", SLEEPER, "--with-system",
               "--config-file", str(ini), "--", "--setup-bucket"]  # fmt: skip
    with log.open("wb") as out:
        process = await anyio.open_process(
            command, stdout=out, stderr=subprocess.STDOUT, cwd=tmp_path, env=env
        )
    client = aredis.Redis.from_url(redis_url, decode_responses=True)
    svc = Service(process, log, Config(ini, search_paths=[], environ={}), client)
    try:
        await svc.wait_for("the sleeper's bind", lambda: client.hexists(BINDS, IDENTITY),
                           STARTUP_TIMEOUT)  # fmt: skip
        yield svc
    finally:
        if process.returncode is None:
            process.kill()
        with anyio.move_on_after(10):
            await process.wait()
        await process.aclose()
        await client.aclose()


async def send_sleep(service: Service, seconds: float, *, with_file: bool = False) -> Task:
    payload: dict[str, object] = {"seconds": seconds}
    if with_file:
        payload["file"] = LocalResource("note.txt", content=b"asynckarton")
    task = Task({"type": "sleep"}, payload=payload)
    async with Producer(service.config, identity="test.producer") as producer:
        await producer.send_task(task)
    return task


async def test_run_processes_tasks_then_drains_on_sigterm(service: Service) -> None:
    quick = [await send_sleep(service, 0.05, with_file=True) for _ in range(3)]
    for task in quick:
        await service.wait_for("a quick task", partial(_is, service, task.root_uid, "Finished"), 30)

    slow = await send_sleep(service, 2.0)
    await service.wait_for("the slow task to start", lambda: _is(service, slow.root_uid, "Started"),
                           30)  # fmt: skip
    service.process.send_signal(signal.SIGTERM)

    assert await service.wait_exit(60) == 0, service.output()
    assert await service.status_of(slow.root_uid) == "Finished"  # drained, not cut short
    assert "draining" in service.output()


async def test_second_sigterm_hands_the_running_task_back(service: Service) -> None:
    slow = await send_sleep(service, 30.0)
    await service.wait_for("the task to start", lambda: _is(service, slow.root_uid, "Started"), 30)
    service.process.send_signal(signal.SIGTERM)
    await service.wait_for("the drain", lambda: "draining" in service.output(), 30)
    service.process.send_signal(signal.SIGTERM)

    assert await service.wait_exit(20) == 0, service.output()
    fork = await service.fork_of(slow.root_uid)
    assert fork is not None
    assert fork["status"] == "Spawned"  # not Crashed, not Finished: back in its queue
    queued = await service.redis.lrange(queue_key("normal", IDENTITY), 0, -1)
    assert queued == [fork["uid"]]
    assert await service.redis.zcard(leases_key(IDENTITY)) == 0
    assert "handed back" in service.output()


async def _is(service: Service, root_uid: str, status: str) -> bool:
    return await service.status_of(root_uid) == status


PROBES = """
import anyio
from asynckarton import Consumer, Option, Task

DIR = Option("probe", "dir", str, help="where each probe writes its policy")


class ProbeA(Consumer):
    identity = "probe.a"
    filters = [{"type": "probe"}]
    options = [DIR]

    async def process(self, task: Task) -> None:
        path = anyio.Path(self.option(DIR)) / f"{self.identity}.json"
        await path.write_text(self.policy.to_json())


class ProbeB(ProbeA):
    identity = "probe.b"
"""


async def test_run_two_services_with_their_own_policies(
    tmp_path: Path, redis_url: str, s3_srv: S3Server, s3_bucket: str
) -> None:
    """One process, two consumers, each policy from a different per-identity layer."""
    ini = write_ini(tmp_path / "karton.ini", redis_url, s3_srv, s3_bucket)
    with ini.open("a", encoding="utf-8") as file:
        file.write("[karton:probe.b]\ntask_timeout = 9\nmax_retries = 5\n")
    (tmp_path / "probes.py").write_text(PROBES, encoding="utf-8")
    env = {k: v for k, v in os.environ.items() if not k.startswith("KARTON_")}
    env |= {"HOME": str(tmp_path), "KARTON_PROBE_DIR": str(tmp_path),
            "KARTON_KARTON__PROBE_A__RETRY_BACKOFF": "0.5"}  # fmt: skip
    log = tmp_path / "asynckarton.log"
    command = [sys.executable, "-m", "asynckarton", "run", "probes.py:ProbeA", "probes.py:ProbeB",
               "--with-system", "--config-file", str(ini), "--max-retries", "1",
               "--set", "probe.a:karton.concurrency_limit=3", "--", "--setup-bucket"]  # fmt: skip
    with log.open("wb") as out:
        process = await anyio.open_process(
            command, stdout=out, stderr=subprocess.STDOUT, cwd=tmp_path, env=env
        )
    client = aredis.Redis.from_url(redis_url, decode_responses=True)
    svc = Service(process, log, Config(ini, search_paths=[], environ={}), client)
    try:
        for identity in ("probe.a", "probe.b"):

            async def bound(name: str = identity) -> bool:
                return bool(await client.hexists(BINDS, name))

            await svc.wait_for(f"{identity}'s bind", bound, STARTUP_TIMEOUT)
        async with Producer(svc.config, identity="test.producer") as producer:
            await producer.send_task(Task({"type": "probe"}))
        files = [tmp_path / "probe.a.json", tmp_path / "probe.b.json"]
        await svc.wait_for("both policies", lambda: all(f.exists() for f in files), 30)
        a, b = (ConsumerPolicy.from_json(f.read_text()) for f in files)
        assert (a.concurrency_limit, b.concurrency_limit) == (3, 1)  # --set for probe.a only
        assert (a.retry_backoff, b.retry_backoff) == (0.5, 1.0)  # its variable, then default
        assert (a.task_timeout, b.task_timeout) == (None, 9.0)  # [karton:probe.b]
        assert (a.max_retries, b.max_retries) == (1, 1)  # the flag's layer beats the ini's
        process.send_signal(signal.SIGTERM)
        assert await svc.wait_exit(60) == 0, svc.output()
    finally:
        if process.returncode is None:
            process.kill()
        with anyio.move_on_after(10):
            await process.wait()
        await process.aclose()
        await client.aclose()
