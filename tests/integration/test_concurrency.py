"""Running concurrency across real processes on a real redis-server (and the embedded mode).

Two consumer processes (``python -m asynckarton run`` of :class:`OverlapWorker`, the first
also running the system service) share one identity.  Overlaps are measured from inside
the handlers: each one adds its uid to ``conc:active:<scope>`` on entry, records the set's
size in ``conc:max`` and removes itself on exit, so ``conc:max[scope] > 1`` means two
tasks of one scope ran at once.  The ``disabled`` case shows the measure does see
overlaps.  The same scenarios run in-process on the embedded default.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import anyio
import pytest
import redis.asyncio as aredis

from asynckarton import Config, Consumer, Producer, Task, testing
from tests.servers import S3Server

pytestmark = [pytest.mark.integration, pytest.mark.anyio, pytest.mark.timeout(240)]

REPO = Path(__file__).resolve().parents[2]
IDENTITY = "conc.worker"
STARTUP_TIMEOUT = 90.0  # a loaded machine imports slowly

# Enter a scope: add the uid, record the largest number of uids seen in it at once.
_ENTER = """
redis.call('SADD', KEYS[1], ARGV[2])
local n = redis.call('SCARD', KEYS[1])
local m = tonumber(redis.call('HGET', KEYS[2], ARGV[1]) or '0')
if n > m then redis.call('HSET', KEYS[2], ARGV[1], n) end
return n
"""


class OverlapWorker(Consumer):
    """Runs tasks of ``payload["scope"]`` and measures how many of a scope run at once.

    The first run of a root sleeps ``payload["sleep"]``; a redelivery sleeps 10 ms.
    """

    identity = IDENTITY
    filters: ClassVar[list[dict[str, Any]]] = [{"type": "conc"}]

    async def process(self, task: Task) -> None:
        r = self.backend.redis
        scope = str(task.payload["scope"])
        active = f"conc:active:{scope}"
        first = await r.hincrby("conc:started", task.root_uid, 1) == 1
        await r.eval(_ENTER, 2, active, "conc:max", scope, task.uid)
        await r.hset("conc:holder", scope, f"{os.getpid()} {task.uid}")
        await r.sadd("conc:pids", str(os.getpid()))
        await anyio.sleep(float(task.payload.get("sleep", 0.01)) if first else 0.01)
        await r.srem(active, task.uid)
        await r.hincrby("conc:runs", scope, 1)
        await r.rpush("conc:started_at", f"{task.root_uid} {time.time()}")


# -- tasks per mode ---------------------------------------------------------------------------


def make_tasks(mode: str, count: int, scopes: int, sleep: float) -> list[Task]:
    """Tasks whose ``scope`` is exactly what ``mode`` considers equal."""
    tasks = []
    for n in range(count):
        scope = "all" if mode == "task" else f"s{n % scopes}"
        payload: dict[str, Any] = {"scope": scope, "sleep": sleep}
        if mode in ("keys", "disabled"):
            payload["n"] = n  # other arguments differ: only the key is shared
        tasks.append(Task({"type": "conc", "key": scope}, payload=payload))
    return tasks


def karton_section(
    mode: str, *, reroute: bool, lease: float = 3.0, limit: int = 6
) -> dict[str, Any]:
    section: dict[str, Any] = {
        "concurrency_limit": limit,
        "lease_timeout": lease,
        "shutdown_grace": 1,
        "running_concurrency": mode,
        "reroute_on_concurrency_control": int(reroute),
    }
    if mode == "keys":
        section["key_arguments"] = "headers.key"
    if limit == 1:
        section["prefetch"] = 0  # a busy process fetches nothing
    return section


# -- processes --------------------------------------------------------------------------------


@dataclass
class Deployment:
    """Two consumer processes (one also routing) against one redis-server."""

    tmp: Path
    redis_url: str
    s3: S3Server
    bucket: str
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)
    logs: list[Path] = field(default_factory=list)
    ini: Path | None = None

    def write_ini(self, karton: dict[str, Any]) -> Path:
        sections = {
            "redis": {"url": self.redis_url},
            "s3": {
                "address": self.s3.url,
                "access_key": self.s3.access_key,
                "secret_key": self.s3.secret_key,
                "bucket": self.bucket,
            },
            "karton": karton,
            "logging": {"level": "INFO"},
        }
        text = "".join(
            f"[{name}]\n" + "".join(f"{k} = {v}\n" for k, v in values.items()) + "\n"
            for name, values in sections.items()
        )
        self.ini = self.tmp / "karton.ini"
        self.ini.write_text(text)
        return self.ini

    def config(self) -> Config:
        assert self.ini is not None
        return Config(self.ini, search_paths=[], environ={})

    def start(self, *, with_system: bool) -> subprocess.Popen[bytes]:
        assert self.ini is not None
        log = self.tmp / f"worker-{len(self.procs)}.log"
        argv = [sys.executable, "-m", "asynckarton", "run",
                f"{Path(__file__)}:OverlapWorker", "--config-file", str(self.ini)]  # fmt: skip
        if with_system:
            argv += ["--with-system", "--", "--setup-bucket"]
        env = {k: v for k, v in os.environ.items() if not k.startswith("KARTON_")}
        env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
        env["HOME"] = str(self.tmp)
        with log.open("wb") as out:
            proc = subprocess.Popen(
                argv, cwd=REPO, env=env, stdin=subprocess.DEVNULL, stdout=out,
                stderr=subprocess.STDOUT,
            )  # fmt: skip
        self.procs.append(proc)
        self.logs.append(log)
        return proc

    def output(self) -> str:
        return "\n".join(f"== {p.name}\n{p.read_text(errors='replace')[-4000:]}" for p in self.logs)

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                os.kill(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)


@pytest.fixture
def deployment(
    tmp_path: Path, redis_url: str, s3_srv: S3Server, s3_bucket: str
) -> Iterator[Deployment]:
    dep = Deployment(tmp_path, redis_url, s3_srv, s3_bucket)
    try:
        yield dep
    finally:
        dep.stop()


@pytest.fixture
async def r(redis_url: str) -> AsyncIterator[aredis.Redis]:
    client = aredis.Redis.from_url(redis_url, decode_responses=True)
    try:
        yield client
    finally:
        await client.aclose()


async def start_two(dep: Deployment, r: aredis.Redis) -> None:
    """Start the two processes and wait until both hold their presence connection."""
    dep.start(with_system=True)
    dep.start(with_system=False)
    await wait_started(dep, r, 2)


async def wait_started(dep: Deployment, r: aredis.Redis, count: int) -> None:
    """Wait until ``count`` worker processes hold their presence connection."""
    with anyio.move_on_after(STARTUP_TIMEOUT):
        while True:
            for proc in dep.procs:
                if proc.poll() is not None:
                    pytest.fail(f"a worker exited early:\n{dep.output()}")
            names = [c.get("name", "") for c in await r.client_list()]
            if sum(1 for n in names if n.split("?", 1)[0] == IDENTITY) >= count:
                return
            await anyio.sleep(0.1)
    pytest.fail(f"workers did not start:\n{dep.output()}")


async def wait_settled(r: aredis.Redis, total: int, timeout: float, dep: Deployment) -> None:
    """Wait until ``total`` copies for the worker reached Finished or Crashed."""
    with anyio.move_on_after(timeout):
        while True:
            states = await statuses(r)
            if states.get("Finished", 0) + states.get("Crashed", 0) >= total:
                return
            await anyio.sleep(0.2)
    pytest.fail(f"not settled: {await statuses(r)}\n{dep.output()}")


async def statuses(r: aredis.Redis) -> dict[str, int]:
    out: dict[str, int] = {}
    async for key in r.scan_iter(match="karton.task:*", count=1000):
        raw = await r.get(key)
        if raw is None:
            continue
        doc = json.loads(raw)
        if doc.get("headers", {}).get("receiver") == IDENTITY:
            out[doc["status"]] = out.get(doc["status"], 0) + 1
    return out


async def send(dep: Deployment, tasks: list[Task]) -> None:
    async with Producer(dep.config(), identity="conc.producer") as producer:
        await producer.send_tasks(tasks)


# -- tests ------------------------------------------------------------------------------------

COUNT, SCOPES = 120, 6


@pytest.mark.parametrize("mode", ["task", "arguments", "keys", "disabled"])
async def test_no_two_tasks_of_a_scope_overlap_across_processes(
    deployment: Deployment, r: aredis.Redis, mode: str
) -> None:
    count = 30 if mode == "task" else COUNT  # task mode runs one at a time in total
    deployment.write_ini(karton_section(mode, reroute=True))
    await start_two(deployment, r)
    await send(deployment, make_tasks(mode, count, SCOPES, sleep=0.03))
    await wait_settled(r, count, 150, deployment)

    worst = {k: int(v) for k, v in (await r.hgetall("conc:max")).items()}
    runs = {k: int(v) for k, v in (await r.hgetall("conc:runs")).items()}
    pids = await r.smembers("conc:pids")
    states = await statuses(r)
    stats = await r.hgetall(f"asynckarton.concurrency:{IDENTITY}")
    print(f"MODE {mode}: tasks={count} processes=2 ran_in={len(pids)} max={worst} "
          f"runs={runs} states={states} stats={stats}")  # fmt: skip
    assert sum(runs.values()) == count
    assert states == {"Finished": count}
    if mode == "disabled":
        assert max(worst.values()) > 1, "the measure must see overlaps without control"
    else:
        assert max(worst.values()) == 1, f"overlapping runs: {worst}"
        assert int(stats.get("parked", 0)) > 0 and int(stats.get("unparked", 0)) > 0
    assert len(pids) == 2, "both processes must have run tasks"
    # Nothing is left behind: no slot, no parked task, no lease.  The last releases are
    # written in the background (a 20 ms linger), so a loaded machine may see them late.
    with anyio.fail_after(10):
        while await r.hlen(f"asynckarton.running:{IDENTITY}") and mode != "disabled":
            await anyio.sleep(0.05)
    assert await r.hlen(f"asynckarton.parked.index:{IDENTITY}") == 0


async def test_many_tasks_per_key_wait_in_their_process_without_overlapping(
    deployment: Deployment, r: aredis.Redis
) -> None:
    """Load: 600 short tasks on 20 keys, two processes; tasks of a key a process holds
    wait there (no park/unpark), the others are parked; still no overlap."""
    count, scopes = 600, 20
    deployment.write_ini(karton_section("keys", reroute=True))
    await start_two(deployment, r)
    await send(deployment, make_tasks("keys", count, scopes, sleep=0.005))
    await wait_settled(r, count, 150, deployment)

    worst = {k: int(v) for k, v in (await r.hgetall("conc:max")).items()}
    runs = {k: int(v) for k, v in (await r.hgetall("conc:runs")).items()}
    pids = await r.smembers("conc:pids")
    stats = await r.hgetall(f"asynckarton.concurrency:{IDENTITY}")
    print(f"LOAD: tasks={count} keys={scopes} processes=2 ran_in={len(pids)} "
          f"max={max(worst.values())} stats={stats}")  # fmt: skip
    assert max(worst.values()) == 1, f"overlapping runs: {worst}"
    assert sum(runs.values()) == count and len(pids) == 2
    assert await statuses(r) == {"Finished": count}
    assert int(stats.get("parked", 0)) < count  # some waited where their key was held
    with anyio.fail_after(10):  # the last releases are written in the background
        while await r.hlen(f"asynckarton.running:{IDENTITY}"):
            await anyio.sleep(0.05)
    assert await r.hlen(f"asynckarton.parked.index:{IDENTITY}") == 0


async def test_blocked_tasks_end_crashed_and_counted_without_reroute(
    deployment: Deployment, r: aredis.Redis
) -> None:
    deployment.write_ini(karton_section("keys", reroute=False))
    await start_two(deployment, r)
    await send(deployment, make_tasks("keys", 60, 3, sleep=0.2))
    await wait_settled(r, 60, 120, deployment)

    worst = {k: int(v) for k, v in (await r.hgetall("conc:max")).items()}
    states = await statuses(r)
    stats = await r.hgetall(f"asynckarton.concurrency:{IDENTITY}")
    crashed = await r.hget("karton.metrics.crashed", IDENTITY)
    print(f"NO REROUTE: states={states} stats={stats} max={worst}")
    assert max(worst.values()) == 1
    assert states.get("Crashed", 0) > 0
    assert states.get("Crashed", 0) == int(stats["blocked"]) == int(crashed or 0)
    assert states.get("Finished", 0) + states["Crashed"] == 60


@pytest.mark.parametrize("waiter", ["parked", "local"])
async def test_a_sigkilled_holder_frees_its_key_within_the_lease(
    deployment: Deployment, r: aredis.Redis, waiter: str
) -> None:
    """The waiter is parked by the other process (one task at a time each, so the busy one
    fetches nothing), or waits in the holder's own process (started alone, the other one
    only once the waiter is listed among the slot's holders); then the holder's process is
    SIGKILLed."""
    lease = 3.0
    limit = 1 if waiter == "parked" else 6
    deployment.write_ini(karton_section("keys", reroute=True, lease=lease, limit=limit))
    if waiter == "parked":
        await start_two(deployment, r)
    else:
        deployment.start(with_system=True)
        await wait_started(deployment, r, 1)
    holder_task = make_tasks("keys", 1, 1, sleep=120)[0]
    await send(deployment, [holder_task])
    with anyio.fail_after(30):
        while not await r.hget("conc:holder", "s0"):
            await anyio.sleep(0.05)
    waiting = make_tasks("keys", 1, 1, sleep=0.01)[0]
    await send(deployment, [waiting])
    with anyio.fail_after(30):  # the waiter is held back, not run
        while True:
            if waiter == "parked":
                if await r.hlen(f"asynckarton.parked.index:{IDENTITY}") >= 1:
                    break
            else:
                slots = [str(v) for v in await r.hvals(f"asynckarton.running:{IDENTITY}")]
                if any("," in v.split(" ")[0] for v in slots):
                    break  # listed behind the holder, in its process
            await anyio.sleep(0.05)
    if waiter == "local":
        deployment.start(with_system=False)
        await wait_started(deployment, r, 2)
    pid, uid = str(await r.hget("conc:holder", "s0")).split()
    victim = next(p for p in deployment.procs if str(p.pid) == pid)

    os.kill(victim.pid, signal.SIGKILL)
    victim.wait(timeout=10)
    killed = time.time()
    await r.srem("conc:active:s0", uid)  # the killed handler never left the scope
    await wait_settled(r, 2, 60, deployment)

    started: dict[str, str] = {}  # root -> time (the killed holder never got this far)
    for line in await r.lrange("conc:started_at", 0, -1):
        root, _, at = str(line).partition(" ")
        started[root] = at
    waited = float(started[waiting.root_uid]) - killed
    stats = await r.hgetall(f"asynckarton.concurrency:{IDENTITY}")
    print(f"KILL ({waiter}): waiter ran {waited:.2f}s after the kill; stats={stats}")
    assert int(await r.hget("conc:max", "s0") or 0) == 1
    assert waited <= lease + 4.0, f"the key stayed held {waited:.1f}s after the kill"
    assert int(await r.hget("conc:started", holder_task.root_uid) or 0) == 2  # redelivered
    assert await statuses(r) == {"Finished": 2}


# -- the embedded default, in-process --------------------------------------------------------


@pytest.mark.parametrize("mode", ["task", "arguments", "keys"])
async def test_embedded_two_replicas_give_the_same_results(tmp_path: Path, mode: str) -> None:
    count = 20 if mode == "task" else 60
    config = testing.embedded_config(tmp_path, karton=karton_section(mode, reroute=True))
    replicas = [OverlapWorker(config), OverlapWorker(config)]
    async with testing.pipeline(*replicas, config=config) as p:
        await p.send(*make_tasks(mode, count, SCOPES, sleep=0.01))
        await p.wait_idle(timeout=60)
        redis = p.producer.backend.redis
        worst = {k: int(v) for k, v in (await redis.hgetall("conc:max")).items()}
        runs = {k: int(v) for k, v in (await redis.hgetall("conc:runs")).items()}
        done = [t for t in await p.tasks(receiver=IDENTITY) if t.status.value == "Finished"]
    assert max(worst.values()) == 1
    assert sum(runs.values()) == count == len(done)


async def test_registration_dedup_across_processes_is_counted(
    deployment: Deployment, r: aredis.Redis
) -> None:
    deployment.write_ini(
        {
            "concurrency_limit": 1,  # and prefetch 0: a busy process leaves its queue alone
            "lease_timeout": 3,
            "shutdown_grace": 1,
            "registration_concurrency": "KEYS",
            "key_arguments": "headers.key",
        }
    )
    await start_two(deployment, r)
    busy = [Task({"type": "conc", "key": f"b{i}"}, payload={"scope": f"b{i}", "sleep": 3})
            for i in range(2)]  # fmt: skip
    await send(deployment, busy)
    with anyio.fail_after(30):  # both processes hold one long task
        while await r.scard("conc:pids") < 2:
            await anyio.sleep(0.05)
    copies = [Task({"type": "conc", "key": "a"}, payload={"scope": "a", "n": 1}) for _ in range(5)]
    await send(deployment, copies)
    await wait_settled(r, 7, 60, deployment)

    runs = {k: int(v) for k, v in (await r.hgetall("conc:runs")).items()}
    stats = await r.hgetall(f"asynckarton.concurrency:{IDENTITY}")
    states = await statuses(r)
    print(f"REGISTRATION: runs={runs} stats={stats} states={states}")
    assert runs == {"b0": 1, "b1": 1, "a": 1}
    assert stats == {"duplicates": "4"}
    assert states == {"Finished": 7}
    with anyio.move_on_after(15):  # the router reports duplicates when it re-reads policies
        while "4 copy(ies) for conc.worker were duplicates" not in deployment.output():
            await anyio.sleep(0.2)
    assert "4 copy(ies) for conc.worker were duplicates" in deployment.output()
