"""The operator's commands against real redis-server and moto S3, with real services.

A deployment (``asynckarton run ... --with-system``: a consumer plus router and GC) runs
as a subprocess; ``check``, ``list``, ``status``, ``delete`` run in-process through
typer's runner; ``logs`` runs as a subprocess, as an operator would run it.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import pytest
import redis
from fastapi import FastAPI
from typer.testing import CliRunner, Result

from asynckarton import Config, Consumer, Producer, Task
from asynckarton.backend import Bind
from asynckarton.backend import _keys as keys
from asynckarton.cli._app import app
from asynckarton.fastapi import lifespan
from asynckarton.storage import S3Storage
from tests.servers import RedisServer, S3Server, free_port

pytestmark = [pytest.mark.integration]

SERVICE = '''
from asynckarton import Consumer, Task

class Echo(Consumer):
    """Says what it got."""
    identity = "ops.echo"
    filters = [{"type": "echo"}]
    version = "1.0.0"

    async def process(self, task: Task) -> None:
        self.log.info("echo %s", task.headers.get("n"))
'''


@dataclass
class Deployment:
    ini: Path
    tmp: Path
    redis: redis.Redis
    bucket: str

    def cli(self, *args: str) -> Result:
        return CliRunner().invoke(app, [*args, "--config-file", str(self.ini)])

    def config(self) -> Config:
        return Config(self.ini, search_paths=[], environ={})


def _write_ini(path: Path, redis_port: int, s3: S3Server, bucket: str) -> Path:
    path.write_text(
        f"[redis]\nhost = 127.0.0.1\nport = {redis_port}\n"
        f"\n[s3]\naddress = {s3.url}\naccess_key = {s3.access_key}\n"
        f"secret_key = {s3.secret_key}\nbucket = {bucket}\n"
        "\n[logging]\nlevel = INFO\n"
    )
    return path


@pytest.fixture
def dep(
    redis_url: str, redis_srv: RedisServer, s3_srv: S3Server, s3_bucket: str, tmp_path: Path
) -> Iterator[Deployment]:
    async def make_bucket() -> None:
        async with S3Storage(s3_srv.url, s3_srv.access_key, s3_srv.secret_key) as storage:
            await storage.ensure_bucket(s3_bucket, create=True)

    anyio.run(make_bucket)
    ini = _write_ini(tmp_path / "karton.ini", redis_srv.port, s3_srv, s3_bucket)
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    try:
        yield Deployment(ini, tmp_path, client, s3_bucket)
    finally:
        client.close()


@pytest.fixture
def spawn(tmp_path: Path) -> Iterator[Callable[..., subprocess.Popen[bytes]]]:
    procs: list[subprocess.Popen[bytes]] = []

    def start(name: str, *argv: str) -> subprocess.Popen[bytes]:
        with (tmp_path / f"{name}.log").open("wb") as out:
            proc = subprocess.Popen(
                [sys.executable, "-m", "asynckarton", *argv],
                stdout=out if name != "logs" else subprocess.PIPE,
                stderr=out,
                stdin=subprocess.DEVNULL,
                cwd=tmp_path,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
            )
        procs.append(proc)
        return proc

    yield start
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    for proc in procs:
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)


def wait_for(predicate: Callable[[], bool], what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.1)


def start_deployment(dep: Deployment, spawn: Callable[..., subprocess.Popen[bytes]]) -> None:
    (dep.tmp / "svc.py").write_text(SERVICE)
    spawn("deployment", "run", str(dep.tmp / "svc.py") + ":Echo", "--with-system",
          "--config-file", str(dep.ini))  # fmt: skip
    wait_for(
        lambda: dep.cli("check", "--identity", "ops.echo").exit_code == 0, "a healthy deployment"
    )


def send(dep: Deployment, *tasks: Task) -> None:
    async def go() -> None:
        async with Producer(dep.config(), identity="ops.test") as producer:
            for task in tasks:
                await producer.send_task(task)

    anyio.run(go)


def test_check_list_status_and_delete_on_a_running_deployment(
    dep: Deployment, spawn: Callable[..., subprocess.Popen[bytes]]
) -> None:
    start_deployment(dep, spawn)
    idle = Bind(identity="ops.idle", filters=[{"type": "never"}], service_version="0.1")
    dep.redis.hset(keys.BINDS, "ops.idle", idle.to_json())
    dep.redis.rpush(keys.queue_key("high", "ops.idle"), "a", "b", "c")
    dep.redis.rpush(keys.dead_key("ops.idle"), "d")

    ok = dep.cli("check", "--identity", "ops.echo", "--json")
    assert ok.exit_code == 0, ok.output
    assert {c["name"]: c["ok"] for c in json.loads(ok.output)["checks"]} == {
        "redis": True, "bucket": True, "router": True, "replicas:ops.echo": True,
    }  # fmt: skip
    missing = dep.cli("check", "--identity", "ops.idle")
    assert missing.exit_code == 1
    assert "FAIL replicas:ops.idle: no replica online" in missing.output

    listed = dep.cli("list", "--json")
    assert listed.exit_code == 0, listed.output
    binds = {d["identity"]: d for d in map(json.loads, listed.output.splitlines())}
    assert binds["ops.echo"]["replicas"] == 1
    assert binds["ops.echo"]["service_version"] == "1.0.0"
    assert (binds["ops.idle"]["replicas"], binds["ops.idle"]["persistent"]) == (0, True)
    table = dep.cli("list")
    assert table.exit_code == 0 and "ops.echo" in table.output and "1.0.0" in table.output

    send(dep, Task({"type": "echo", "n": 1}))
    wait_for(lambda: dep.redis.hget(keys.metrics_key("consumed"), "ops.echo") == "1", "the echo")
    result = dep.cli("status", "--json", "--scan")
    assert result.exit_code == 0, result.output
    status = json.loads(result.output)
    assert status["queues"]["ops.idle"]["queued"]["high"] == 3
    assert status["queues"]["ops.idle"]["dead"] == 1
    assert status["queues"]["ops.idle"]["pending"] == 3
    assert any(router["alive"] for router in status["routers"])
    assert status["redis"]["used_memory"] > 0
    assert status["metrics"]["consumed"]["ops.echo"] == 1
    assert status["tasks"]["ops.echo"].get("Finished", 0) == 1
    text = dep.cli("status")
    assert text.exit_code == 0 and "ops.idle" in text.output and "alive" in text.output

    refused = dep.cli("delete", "ops.echo", "--yes")
    assert refused.exit_code == 1 and "replica(s) online" in refused.output
    deleted = dep.cli("delete", "ops.idle", "--yes")
    assert deleted.exit_code == 0, deleted.output
    now = Bind.from_json("ops.idle", str(dep.redis.hget(keys.BINDS, "ops.idle")))
    assert (now.persistent, now.filters) == (False, [])
    unknown = dep.cli("delete", "ops.nope", "--yes")
    assert unknown.exit_code == 1 and "ops.nope" in unknown.output


def test_check_fails_without_redis_bucket_or_router(
    dep: Deployment, s3_srv: S3Server, tmp_path: Path
) -> None:
    no_router = dep.cli("check")
    assert no_router.exit_code == 1
    assert "FAIL router" in no_router.output and "ok   redis" in no_router.output
    assert dep.cli("check", "--no-router").exit_code == 0

    broken = _write_ini(tmp_path / "broken.ini", free_port(), s3_srv, "no-such-bucket")
    result = CliRunner().invoke(app, ["check", "--json", "--timeout", "3", "--config-file",
                                      str(broken)])  # fmt: skip
    assert result.exit_code == 1
    verdicts = {c["name"]: c for c in json.loads(result.output)["checks"]}
    assert not verdicts["redis"]["ok"] and not verdicts["bucket"]["ok"]
    assert "does not exist" in verdicts["bucket"]["detail"]


def _karton_core_record(dep: Deployment) -> None:
    """Publish one record through karton-core's own handler, inside a karton task."""
    from karton.core import Config as KConfig
    from karton.core import Task as KTask
    from karton.core.backend import KartonBackend as KBackend
    from karton.core.logger import KartonLogHandler
    from karton.core.task import set_current_task

    backend = KBackend(KConfig(str(dep.ini)))
    logger = logging.getLogger("karton.legacy")
    logger.propagate = False
    handler = KartonLogHandler(backend, "karton.legacy")
    logger.addHandler(handler)
    set_current_task(KTask({"type": "legacy"}))
    try:
        logger.error("from karton-core")
    finally:
        set_current_task(None)
        logger.removeHandler(handler)


def _read_lines(
    proc: subprocess.Popen[bytes], want: Callable[[list[dict[str, Any]]], bool]
) -> list[dict[str, Any]]:
    assert proc.stdout is not None
    os.set_blocking(proc.stdout.fileno(), False)
    lines: list[dict[str, Any]] = []
    buffer = b""
    deadline = time.monotonic() + 30
    while not want(lines):
        if time.monotonic() > deadline:
            raise AssertionError(f"logs printed only {lines}")
        chunk = proc.stdout.read()
        if chunk:
            buffer += chunk
            *complete, buffer = buffer.split(b"\n")
            lines += [json.loads(line) for line in complete if line.strip()]
        time.sleep(0.05)
    return lines


def test_logs_tails_asynckarton_services_and_karton_core(
    dep: Deployment, spawn: Callable[..., subprocess.Popen[bytes]]
) -> None:
    start_deployment(dep, spawn)
    logs = spawn("logs", "logs", "--json", "--level", "info", "--identity", "ops.echo",
                 "--identity", "karton.legacy", "--config-file", str(dep.ini))  # fmt: skip
    wait_for(lambda: any(c.get("name", "").startswith("asynckarton.cli-logger")
                         for c in dep.redis.client_list()), "the log tail to connect")  # fmt: skip
    send(dep, Task({"type": "echo", "n": 42}))
    _karton_core_record(dep)

    def done(lines: list[dict[str, Any]]) -> bool:
        messages = {line.get("message") for line in lines}
        return "echo 42" in messages and "from karton-core" in messages

    lines = _read_lines(logs, done)
    echo = next(line for line in lines if line.get("message") == "echo 42")
    assert echo["name"] == "ops.echo" and echo["levelname"] == "INFO"
    assert echo["task"]["headers"]["n"] == 42
    legacy = next(line for line in lines if line.get("message") == "from karton-core")
    assert legacy["levelname"] == "ERROR" and legacy["task"]["headers"]["type"] == "legacy"
    assert {line["name"] for line in lines} <= {"ops.echo", "karton.legacy"}


class Noop(Consumer):
    identity = "ops.noop"
    filters = [{"type": "noop"}]

    async def process(self, task: Task) -> None:
        pass


@pytest.mark.filterwarnings("ignore:Using `httpx` with `starlette.testclient` is deprecated")
def test_fastapi_healthz_and_readyz(dep: Deployment) -> None:
    """Ready while Redis, the bucket and every service are up; 503 naming what is not."""
    from fastapi.testclient import TestClient

    consumer = Noop(dep.config())
    api = FastAPI(lifespan=lifespan(dep.config(), consumers=[consumer], system=True))
    with TestClient(api) as client:
        assert client.get("/healthz").json()["status"] == "ok"
        ready = client.get("/readyz")
        assert ready.status_code == 200, ready.text
        checks = {c["name"]: c["ok"] for c in ready.json()["checks"]}
        assert checks == {"redis": True, "bucket": True, "services": True, "loop_lag": True}

        assert client.portal is not None
        client.portal.call(lambda: consumer.stop(grace=0))
        wait_for(lambda: client.get("/readyz").status_code == 503, "the consumer to stop")
        failed = [c for c in client.get("/readyz").json()["checks"] if not c["ok"]]
        assert [c["name"] for c in failed] == ["services"]
        assert "ops.noop" in failed[0]["detail"]
