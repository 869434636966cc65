"""The big fault-injection run: 2,000 tasks through real processes while things die.

Topology: a persistent redis-server (AOF, appendfsync always), the moto S3 server, one
system service process (router + GC), two consumer processes of one identity (kept at
two: every killed one is replaced at once) and a producer in the test process.  While
the tasks flow, a seeded schedule

* SIGKILLs a running consumer at least 5 times (a replacement starts each time),
* SIGKILLs the system service once (a new one starts half a second later),
* restarts redis-server once (stop, start: the AOF keeps the data).

Then it waits (bounded) for the system to settle by itself and asserts: every root task
was processed at least once (``faults:done``), nothing is left Declared, Spawned or
Started, no queue, lease or journal holds anything.  The numbers (sent, kills, duplicate
processings, lost) are printed and written to ``tmp_path/faults-summary.json``; on a
failure the Redis state of every missing task is part of the assertion message.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import anyio
import pytest
import redis.exceptions

from asynckarton import Producer
from tests.faults.conftest import IDENTITY, REDIS_DOWN, FaultEnv, Proc

pytestmark = [
    pytest.mark.anyio,
    pytest.mark.faults,
    pytest.mark.integration,
    pytest.mark.timeout(280),
]

SEED = 20241123
TASKS = 2000
BATCH = 50
PRODUCE_INTERVAL = 0.4  # one batch every 0.4 s: about 16 s of production
CONSUMER_KILLS = 6
CONSUMERS = 2
SETTLE_TIMEOUT = 150.0  # generous bound: router recovery 10 s, GC lock up to 60 s


@dataclass
class Chaos:
    """The processes of the run, the faults injected into them, and what happened."""

    env: FaultEnv
    rng: random.Random
    t0: float = field(default_factory=time.monotonic)
    consumers: list[Proc] = field(default_factory=list)
    system: Proc | None = None
    timeline: list[tuple[float, str]] = field(default_factory=list)
    consumer_kills: int = 0
    router_kills: int = 0
    redis_restarts: int = 0
    ready: set[int] = field(default_factory=set)  # pids seen in faults:ready
    startup_crashes: list[str] = field(default_factory=list)  # died before becoming ready
    unexpected_exits: list[str] = field(default_factory=list)  # died after becoming ready

    def note(self, what: str) -> None:
        self.timeline.append((round(time.monotonic() - self.t0, 2), what))

    def spawn_consumer(self) -> Proc:
        proc = self.env.spawn("consumer", seed=self.rng.randrange(1 << 30))
        self.consumers.append(proc)
        self.note(f"start {proc.name} pid {proc.pid}")
        return proc

    def spawn_system(self) -> Proc:
        self.system = self.env.spawn("system")
        self.note(f"start {self.system.name} pid {self.system.pid}")
        return self.system

    def _refresh_ready(self) -> None:
        members = cast("set[str]", self.env.r().smembers("faults:ready"))  # decoded
        for member in members:
            self.ready.add(int(member.partition(":")[2]))

    async def supervise(self) -> None:
        """Act as the process supervisor: restart services that die on their own.

        A service that dies while booting (e.g. it connected while Redis was loading its
        AOF) is restarted and reported; one that dies after it was running is a failure.
        """
        while True:
            with contextlib.suppress(*REDIS_DOWN):
                self._refresh_ready()
            procs = [*self.consumers, *([self.system] if self.system else [])]
            for proc in procs:
                if proc.alive():
                    continue
                last = (proc.output().strip().splitlines() or ["?"])[-1][:200]
                what = f"{proc.name} pid {proc.pid} exited with {proc.popen.returncode}: {last}"
                if proc.pid in self.ready:
                    self.unexpected_exits.append(what)
                else:
                    self.startup_crashes.append(what)
                self.note(f"supervisor: {what}")
                if proc is self.system:
                    self.spawn_system()
                else:
                    self.consumers.remove(proc)
                    self.spawn_consumer()
            await anyio.sleep(0.25)

    async def kill_a_consumer(self) -> None:
        with anyio.fail_after(60):  # kill a consumer that is running, not one still booting
            while True:
                with contextlib.suppress(*REDIS_DOWN):
                    self._refresh_ready()
                live = [p for p in self.consumers if p.alive() and p.pid in self.ready]
                if live:
                    break
                await anyio.sleep(0.1)
        victim = self.rng.choice(sorted(live, key=lambda p: p.pid))
        holding = sum(1 for pid in self.env.r().hvals("faults:holder") if pid == str(victim.pid))
        self.env.kill(victim)
        self.consumers.remove(victim)
        self.consumer_kills += 1
        self.note(f"SIGKILL {victim.name} pid {victim.pid} (last holder of {holding} roots)")
        self.spawn_consumer()

    async def kill_the_router(self) -> None:
        assert self.system is not None
        victim, self.system = self.system, None
        client = self.env.r()
        with anyio.move_on_after(3.0):  # aim for the window between journal and commit
            while not any(True for _ in client.scan_iter("asynckarton.routing:*")):
                await anyio.sleep(0.001)
        self.env.kill(victim)
        self.router_kills += 1
        journals = {
            k: self.env.r().llen(k) for k in self.env.r().scan_iter("asynckarton.routing:*")
        }
        lock = self.env.r().pttl("asynckarton.gc.lock")
        self.note(
            f"SIGKILL {victim.name} pid {victim.pid} (router + GC); journals {journals}, "
            f"GC lock left behind for {lock} ms"
        )
        await anyio.sleep(0.5)
        self.spawn_system()

    async def restart_redis(self) -> None:
        self.note("redis-server stop")
        await anyio.to_thread.run_sync(self.env.redis_server.stop)
        await anyio.to_thread.run_sync(self.env.redis_server.start)
        self.redis_restarts += 1
        self.note("redis-server started again (AOF reloaded)")


def schedule(rng: random.Random) -> list[tuple[float, str]]:
    """Seeded fault times (seconds after production starts)."""
    while True:
        kills = sorted(rng.uniform(1.0, 18.0) for _ in range(CONSUMER_KILLS))
        if all(b - a >= 1.5 for a, b in itertools.pairwise(kills)):
            break
    router = rng.uniform(4.0, 10.0)
    redis_at = rng.uniform(8.0, 14.0)
    if abs(redis_at - router) < 2.0:
        redis_at = router + 2.0
    events = [(t, "consumer") for t in kills] + [(router, "router"), (redis_at, "redis")]
    return sorted(events)


def diagnose(env: FaultEnv, missing: set[str]) -> dict[str, Any]:
    """Where every task of each missing root is (status, queue, lease, journal)."""
    client = env.r()
    state = env.queue_state()
    queues = {
        name: set(client.lrange(name, 0, -1))
        for name in [
            "karton.tasks",
            *(f"karton.queue.{p}:{IDENTITY}" for p in ("high", "normal", "low")),
            *client.scan_iter("asynckarton.routing:*"),
        ]
    }
    leases = dict(
        cast(
            "list[tuple[str, float]]",
            client.zrange(f"asynckarton.leases:{IDENTITY}", 0, -1, withscores=True),
        )
    )
    report: dict[str, Any] = {"state": state, "missing": {}}
    for root in sorted(missing)[:20]:
        found = []
        for key in client.scan_iter(f"karton.task:{{{root}}}*"):
            uid = key.removeprefix("karton.task:")
            body = client.get(key)
            doc = json.loads(body) if body else {}
            found.append(
                {
                    "uid": uid,
                    "status": doc.get("status"),
                    "receiver": doc.get("headers", {}).get("receiver"),
                    "last_update_age": round(time.time() - doc.get("last_update", 0), 1),
                    "in": [name for name, members in queues.items() if uid in members],
                    "lease": leases.get(uid),
                }
            )
        report["missing"][root] = {
            "tasks": found,
            "started": client.hget("faults:started", root),
            "holder": client.hget("faults:holder", root),
        }
    return report


async def test_two_thousand_tasks_survive_kills_and_a_redis_restart(
    faults: FaultEnv, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rng = random.Random(SEED)
    chaos = Chaos(faults, rng)
    client = faults.r()
    system = chaos.spawn_system()
    for _ in range(CONSUMERS):
        chaos.spawn_consumer()
    boot = time.monotonic()
    await faults.wait_ready(system, *chaos.consumers, timeout=60)
    boot = time.monotonic() - boot

    roots: list[str] = []
    send_attempts = 0
    events = schedule(rng)
    summary: dict[str, Any] = {"seed": SEED, "schedule": [(round(t, 2), e) for t, e in events]}

    async def produce() -> None:
        nonlocal send_attempts
        async with Producer(faults.config(), identity="faults.producer") as producer:
            for start in range(0, TASKS, BATCH):
                batch = [faults.make_task(n=start + i) for i in range(BATCH)]
                send_attempts += await faults.send(producer, batch)
                roots.extend(t.root_uid for t in batch)
                await anyio.sleep(PRODUCE_INTERVAL)
        chaos.note(f"produced {len(roots)} tasks")

    async def inject() -> None:
        begin = time.monotonic()
        for at, kind in events:
            await anyio.sleep(max(0.0, begin + at - time.monotonic()))
            if kind == "consumer":
                await chaos.kill_a_consumer()
            elif kind == "router":
                await chaos.kill_the_router()
            else:
                await chaos.restart_redis()

    progress: list[tuple[float, int, int]] = []  # (t, processed roots, queued + leased)

    async def sample() -> None:
        while True:
            with contextlib.suppress(*REDIS_DOWN):
                state = faults.queue_state()
                progress.append(
                    (
                        round(time.monotonic() - started, 1),
                        client.hlen("faults:done"),
                        state["queue.normal"] + state["leases"],
                    )
                )
            await anyio.sleep(2.0)

    started = time.monotonic()
    chaos.t0 = started
    async with anyio.create_task_group() as watcher:
        watcher.start_soon(sample)
        watcher.start_soon(chaos.supervise)
        async with anyio.create_task_group() as group:
            group.start_soon(produce)
            group.start_soon(inject)
        faults_done = time.monotonic()

        def settled() -> bool:
            state = faults.queue_state()
            if client.hlen("faults:done") < TASKS:
                return False
            if any(
                state[k]
                for k in (
                    "karton.tasks",
                    "queue.high",
                    "queue.normal",
                    "queue.low",
                    "leases",
                    "delayed",
                )
            ) or any(state["journals"].values()):
                return False
            by_status = faults.tasks_by_status()
            return not any(by_status.get(s) for s in ("Declared", "Spawned", "Started"))

        timed_out = False
        try:
            with anyio.fail_after(SETTLE_TIMEOUT):
                while True:
                    with contextlib.suppress(*REDIS_DOWN, redis.exceptions.ResponseError):
                        if settled():
                            break
                    await anyio.sleep(0.5)
        except TimeoutError:
            timed_out = True
        settle_time = time.monotonic() - faults_done
        chaos.note("settled" if not timed_out else "gave up waiting")

        watcher.cancel_scope.cancel()

    done = {k: int(v) for k, v in client.hgetall("faults:done").items()}
    started_counts = {k: int(v) for k, v in client.hgetall("faults:started").items()}
    missing = set(roots) - set(done)
    by_status = faults.tasks_by_status()
    metrics = {
        name.removeprefix("karton.metrics."): client.hgetall(name)
        for name in client.scan_iter("karton.metrics.*")
    }
    summary.update(
        {
            "tasks_sent": len(roots),
            "send_attempts": send_attempts,
            "consumer_kills": chaos.consumer_kills,
            "router_kills": chaos.router_kills,
            "redis_restarts": chaos.redis_restarts,
            "consumer_processes_started": sum(1 for p in faults.procs if p.role == "consumer"),
            "startup_crashes": chaos.startup_crashes,
            "unexpected_exits": chaos.unexpected_exits,
            "processed_roots": len(done),
            "duplicates": sum(n - 1 for n in done.values() if n > 1),
            "roots_processed_more_than_once": sum(1 for n in done.values() if n > 1),
            "handler_starts_beyond_first": sum(n - 1 for n in started_counts.values() if n > 1),
            "lost": len(missing),
            "left_unfinished": {
                s: len(by_status.get(s, [])) for s in ("Declared", "Spawned", "Started")
            },
            "stats": client.hgetall("asynckarton.stats"),
            "metrics": metrics,
            "seconds": {
                "boot": round(boot, 1),
                "faults_phase": round(faults_done - started, 1),
                "settle": round(settle_time, 1),
                "total": round(time.monotonic() - started, 1),
            },
            "timeline": chaos.timeline,
            "progress": progress,
        }
    )
    if missing or timed_out:
        summary["diagnosis"] = diagnose(faults, missing)
        summary["logs"] = {
            p.name: p.output()[-1500:] for p in faults.procs if "Traceback" in p.output()
        }
    path = tmp_path / "faults-summary.json"
    path.write_text(json.dumps(summary, indent=2, default=str))
    headline = {
        k: summary[k]
        for k in (
            "tasks_sent",
            "consumer_kills",
            "router_kills",
            "redis_restarts",
            "duplicates",
            "lost",
            "seconds",
        )
    }
    with capsys.disabled():
        print(f"\nfault-injection summary ({path}):\n{json.dumps(headline, default=str)}")
    message = json.dumps(summary, indent=1, default=str)

    assert len(roots) == TASKS, message
    assert chaos.consumer_kills >= 5 and chaos.router_kills >= 1 and chaos.redis_restarts == 1
    assert not missing, f"{len(missing)} task(s) lost:\n{message}"
    assert not chaos.unexpected_exits, f"running services died on their own:\n{message}"
    assert not timed_out, f"the system did not settle within {SETTLE_TIMEOUT:g}s:\n{message}"
    assert summary["left_unfinished"] == {"Declared": 0, "Spawned": 0, "Started": 0}, message
    consumed = int(metrics.get("consumed", {}).get(IDENTITY, 0))
    assigned = int(metrics.get("assigned", {}).get(IDENTITY, 0))
    assert assigned >= TASKS and consumed >= TASKS, message
    assert int(metrics.get("produced", {}).get("faults.producer", 0)) >= TASKS, message
    assert not metrics.get("crashed"), message
