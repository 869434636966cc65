"""Fault-injection harness: a persistent redis-server, moto S3, and worker processes.

Every fault test gets its own ``RedisServer(persistent=True)`` (AOF, appendfsync always)
so it can stop, start and kill it, the session moto server with a fresh bucket, and a
karton.ini in ``tmp_path`` with short timeouts.  Worker processes (``_worker.py``) log to
``tmp_path/<name>.log``; every process a test started is SIGKILLed at teardown.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import pytest
import redis
import redis.exceptions
from redis.backoff import NoBackoff
from redis.retry import Retry

from asynckarton import Config, Producer, Task
from asynckarton._errors import BackendUnavailableError
from asynckarton.backend import Bind
from tests.servers import RedisServer, S3Server

REPO = Path(__file__).resolve().parents[2]
WORKER = Path(__file__).with_name("_worker.py")
IDENTITY = "faults.worker"
FILTERS = [{"type": "faults"}]
#: Redis is down: redis-py's errors (our own polls) and the producer's typed one.
REDIS_DOWN = (
    BackendUnavailableError,
    redis.exceptions.ConnectionError,
    redis.exceptions.TimeoutError,
    redis.exceptions.BusyLoadingError,
    OSError,
)

DEFAULT_INI: dict[str, dict[str, Any]] = {
    "karton": {"lease_timeout": 3, "shutdown_grace": 1, "concurrency_limit": 4},
    "system": {"gc_interval": 2, "task_spawned_timeout": 5},
    "logging": {"level": "INFO"},
}


@dataclass
class Proc:
    """A worker process this test started."""

    name: str
    role: str
    popen: subprocess.Popen[bytes]
    log: Path

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""


@dataclass
class FaultEnv:
    """One test's servers, configuration and processes."""

    tmp: Path
    redis_server: RedisServer
    s3: S3Server
    bucket: str
    ini: Path = field(init=False)
    procs: list[Proc] = field(default_factory=list)
    _counter: int = 0

    def __post_init__(self) -> None:
        self.ini = self.write_ini()

    # -- configuration ------------------------------------------------------------------

    def write_ini(self, name: str = "karton.ini", **overrides: dict[str, Any]) -> Path:
        sections: dict[str, dict[str, Any]] = {
            "redis": {"url": self.redis_server.url},
            "s3": {
                "address": self.s3.url,
                "access_key": self.s3.access_key,
                "secret_key": self.s3.secret_key,
                "bucket": self.bucket,
            },
        }
        for section, values in {**DEFAULT_INI, **overrides}.items():
            sections.setdefault(section, {}).update(values)
        text = "".join(
            f"[{section}]\n" + "".join(f"{k} = {v}\n" for k, v in values.items()) + "\n"
            for section, values in sections.items()
        )
        path = self.tmp / name
        path.write_text(text)
        return path

    def config(self) -> Config:
        return Config(self.ini, search_paths=[], environ={})

    # -- processes ----------------------------------------------------------------------

    def _env(self, seed: int) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("KARTON_")}
        env.update(
            PYTHONUNBUFFERED="1",
            FAULTS_SEED=str(seed),
            PYTHONPATH=str(REPO) + os.pathsep + env.get("PYTHONPATH", ""),
        )
        return env

    def _start(self, name: str, role: str, argv: list[str], seed: int = 0) -> Proc:
        log = self.tmp / f"{name}.log"
        with log.open("ab") as out:
            popen = subprocess.Popen(
                argv,
                cwd=REPO,
                env=self._env(seed),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        proc = Proc(name, role, popen, log)
        self.procs.append(proc)
        return proc

    def spawn(self, role: str, *, seed: int = 0, grace: float | None = None) -> Proc:
        """Start ``_worker.py <role>`` (``consumer`` or ``system``)."""
        self._counter += 1
        argv = [sys.executable, str(WORKER), role, "--config", str(self.ini), "--seed", str(seed)]
        if grace is not None:
            argv += ["--grace", str(grace)]
        return self._start(f"{role}-{self._counter}", role, argv, seed)

    def spawn_cli(self, name: str, *args: str) -> Proc:
        """Start ``python -m asynckarton <args>``."""
        return self._start(name, "cli", [sys.executable, "-m", "asynckarton", *args])

    def kill(self, proc: Proc) -> None:
        """SIGKILL ``proc`` (by its pid) and reap it."""
        if proc.alive():
            os.kill(proc.pid, signal.SIGKILL)
        proc.popen.wait(timeout=10)

    def cleanup(self) -> None:
        for proc in self.procs:
            if proc.alive():
                os.kill(proc.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.popen.wait(timeout=10)

    async def wait_ready(self, *procs: Proc, timeout: float = 30.0) -> None:
        """Wait until every process registered itself in ``faults:ready``."""
        want = {f"{p.role}:{p.pid}" for p in procs}
        with anyio.fail_after(timeout):
            while True:
                for proc in procs:
                    if not proc.alive():
                        raise AssertionError(f"{proc.name} exited early:\n{proc.output()[-3000:]}")
                try:
                    if want <= self.r().smembers("faults:ready"):
                        return
                except REDIS_DOWN:
                    pass
                await anyio.sleep(0.1)

    # -- Redis --------------------------------------------------------------------------

    def r(self) -> redis.Redis:
        client = getattr(self, "_client", None)
        if client is None:
            # No client-side retries: polls fail fast (and are retried) while Redis is down.
            client = redis.Redis.from_url(
                self.redis_server.url,
                decode_responses=True,
                socket_timeout=10,
                retry=Retry(NoBackoff(), 0),
            )
            self._client = client
        return client

    def register_bind(self, identity: str = IDENTITY, filters: list[Any] | None = None) -> None:
        """Register a bind by hand (a consumer that is not running yet)."""
        bind = Bind(identity=identity, filters=FILTERS if filters is None else filters)
        self.r().hset("karton.binds", identity, bind.to_json())

    def tasks_by_status(self) -> dict[str, list[dict[str, Any]]]:
        """Every task document, grouped by status (unparseable ones under '?')."""
        out: dict[str, list[dict[str, Any]]] = {}
        client = self.r()
        keys = list(client.scan_iter("karton.task:*", count=1000))
        for start in range(0, len(keys), 1000):
            for body in client.mget(keys[start : start + 1000]):
                if body is None:
                    continue
                try:
                    doc = json.loads(body)
                    status = str(doc.get("status"))
                except ValueError:
                    doc, status = {"raw": body}, "?"
                out.setdefault(status, []).append(doc)
        return out

    def queue_state(self, identity: str = IDENTITY) -> dict[str, Any]:
        """Lengths of every list/zset a task can sit in."""
        client = self.r()
        state: dict[str, Any] = {"karton.tasks": client.llen("karton.tasks")}
        for prio in ("high", "normal", "low"):
            state[f"queue.{prio}"] = client.llen(f"karton.queue.{prio}:{identity}")
        state["leases"] = client.zcard(f"asynckarton.leases:{identity}")
        state["delayed"] = client.zcard("asynckarton.delayed")
        state["journals"] = {k: client.llen(k) for k in client.scan_iter("asynckarton.routing:*")}
        state["routers"] = client.zrange("asynckarton.routers", 0, -1, withscores=True)
        state["invalid"] = client.llen("asynckarton.invalid")
        return state

    # -- producing ----------------------------------------------------------------------

    @staticmethod
    def make_task(**payload: Any) -> Task:
        return Task({"type": "faults", "kind": "test"}, payload=payload)

    async def send(self, producer: Producer, tasks: list[Task], patience: float = 60.0) -> int:
        """Send ``tasks`` (one batch), retrying through Redis outages; returns attempts."""
        attempts = 0
        deadline = anyio.current_time() + patience
        while True:
            attempts += 1
            try:
                await producer.send_tasks(tasks)
                return attempts
            except REDIS_DOWN:
                if anyio.current_time() > deadline:
                    raise
                await anyio.sleep(0.2)


@pytest.fixture
def fault_redis() -> Iterator[RedisServer]:
    """This test's own persistent redis-server (AOF, appendfsync always)."""
    server = RedisServer(persistent=True)
    server.start()
    try:
        yield server
    finally:
        server.close()


@pytest.fixture
def faults(
    tmp_path: Path, fault_redis: RedisServer, s3_srv: S3Server, s3_bucket: str
) -> Iterator[FaultEnv]:
    # The bucket does not exist yet: the system service's --setup-bucket creates it.
    env = FaultEnv(tmp_path, fault_redis, s3_srv, s3_bucket)
    try:
        yield env
    finally:
        env.cleanup()
        client = getattr(env, "_client", None)
        if client is not None:
            client.close()


async def poll(predicate: Any, timeout: float, what: str, interval: float = 0.1) -> float:
    """Poll a synchronous predicate (tolerating Redis outages); return the time it took."""
    started = time.monotonic()
    while True:
        try:
            if predicate():
                return time.monotonic() - started
        except REDIS_DOWN:
            pass
        if time.monotonic() - started > timeout:
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what}")
        await anyio.sleep(interval)
