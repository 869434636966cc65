"""One focused test per delivery guarantee, each against a real, faultable redis-server.

(i)   a consumer SIGKILLed mid-task: the task is redelivered once its lease expires;
(ii)  a Spawned task in no queue and under no lease: the GC requeues it;
(iii) a router that died between journal and commit: its batch is routed exactly once;
(iv)  a Redis restart under a running consumer and router: both warn and resume;
(v)   graceful shutdown (``stop(grace=...)`` and SIGTERM) hands tasks back, not Crashed.
"""

from __future__ import annotations

import json
import re
import signal
import time
import uuid
from typing import Any, ClassVar, cast

import anyio
import anyio.abc
import pytest

from asynckarton import Consumer, Producer, Task
from asynckarton.system import SystemService
from tests.faults.conftest import FILTERS, IDENTITY, WORKER, FaultEnv, poll

pytestmark = [
    pytest.mark.anyio,
    pytest.mark.faults,
    pytest.mark.integration,
    pytest.mark.timeout(120),
]

QUEUE = f"karton.queue.normal:{IDENTITY}"
LEASES = f"asynckarton.leases:{IDENTITY}"


def unfinished(env: FaultEnv) -> dict[str, int]:
    """How many tasks are still Declared, Spawned or Started."""
    by_status = env.tasks_by_status()
    return {s: len(by_status.get(s, [])) for s in ("Declared", "Spawned", "Started")}


def all_settled(env: FaultEnv) -> bool:
    return not any(unfinished(env).values())


def forks_of(env: FaultEnv, root: str) -> list[dict[str, Any]]:
    return [
        doc
        for docs in env.tasks_by_status().values()
        for doc in docs
        if doc.get("root_uid") == root and doc.get("headers", {}).get("receiver")
    ]


async def start_system(env: FaultEnv) -> Any:
    system = env.spawn("system")
    await env.wait_ready(system)
    return system


# -- (i) ---------------------------------------------------------------------------------


async def test_sigkilled_consumer_task_is_redelivered_after_its_lease(faults: FaultEnv) -> None:
    r = faults.r()
    await start_system(faults)
    consumers = [faults.spawn("consumer", seed=1), faults.spawn("consumer", seed=2)]
    await faults.wait_ready(*consumers)
    task = faults.make_task(first_sleep=60)
    async with Producer(faults.config(), identity="faults.producer") as producer:
        await faults.send(producer, [task])
    root = task.root_uid
    await poll(lambda: r.hget("faults:started", root) == "1", 20, "the task to start")
    holder = next(p for p in consumers if str(p.pid) == r.hget("faults:holder", root))
    assert r.zcard(LEASES) == 1, "a task being processed must be leased"

    faults.kill(holder)
    killed = time.monotonic()
    await poll(lambda: r.hget("faults:done", root) == "1", 30, "the redelivered task to finish")
    waited = time.monotonic() - killed

    print(f"REDELIVERED after {waited:.2f}s")
    assert r.hget("faults:started", root) == "2", "exactly one redelivery"
    # The lease (3 s, renewed every second) must run out before anyone takes the task.
    assert 1.5 <= waited <= 20, f"redelivered {waited:.1f}s after the kill"
    survivor = next(p for p in consumers if p is not holder)
    assert str(survivor.pid) == r.hget("faults:holder", root)
    assert int(r.hget("asynckarton.stats", "redelivered") or 0) == 1
    await poll(lambda: all_settled(faults) and r.zcard(LEASES) == 0, 10, "settled state")
    assert r.hget("karton.metrics.crashed", IDENTITY) is None


# -- (ii) --------------------------------------------------------------------------------


async def test_orphaned_spawned_task_is_requeued_by_the_gc(faults: FaultEnv) -> None:
    r = faults.r()
    faults.register_bind()  # no consumer yet: the routed copy stays in its queue
    await start_system(faults)
    task = faults.make_task()
    async with Producer(faults.config(), identity="faults.producer") as producer:
        await faults.send(producer, [task])
    await poll(lambda: r.llen(QUEUE) == 1, 20, "the task to be routed")

    # Simulate a consumer that died between its blocking pop and its lease.
    uid = r.rpop(QUEUE)
    assert isinstance(uid, str)  # the client decodes responses
    orphaned = time.time()
    [fork] = forks_of(faults, task.root_uid)
    assert fork["uid"] == uid and fork["status"] == "Spawned"
    assert r.zscore(LEASES, uid) is None

    await poll(lambda: r.llen(QUEUE) == 1, 30, "the GC to requeue the orphan")
    requeued_after = time.time() - fork["last_update"]
    assert r.lrange(QUEUE, 0, -1) == [uid]
    assert int(r.hget("asynckarton.stats", "orphans_requeued") or 0) == 1
    # task_spawned_timeout = 5 s, gc_interval = 2 s: not before 5 s, not much after.
    assert 5.0 <= requeued_after <= 20.0, f"requeued {requeued_after:.1f}s after routing"
    assert time.time() - orphaned < 30

    consumer = faults.spawn("consumer", seed=3)
    await faults.wait_ready(consumer)
    await poll(lambda: r.hget("faults:done", task.root_uid) == "1", 20, "the orphan to finish")
    await poll(lambda: all_settled(faults), 10, "settled state")
    assert r.hget("faults:started", task.root_uid) == "1"


async def test_orphaned_reclaimed_task_is_requeued(faults: FaultEnv) -> None:
    """The same orphan window as (ii), for a task that was already redelivered once.

    Real steps: a consumer is SIGKILLed mid-task, its lease expires and is reclaimed
    (RECLAIM puts the uid back in its queue, and the body must say Spawned again or the
    GC's orphan sweep never looks at it), then a consumer blocked in BLPOP takes it and
    dies before its LEASE call (simulated by RPOP).
    """
    r = faults.r()
    system = faults.spawn("system")
    first = faults.spawn("consumer", seed=6)
    await faults.wait_ready(system, first)
    task = faults.make_task(first_sleep=60)
    async with Producer(faults.config(), identity="faults.producer") as producer:
        await faults.send(producer, [task])
        await poll(lambda: r.hget("faults:started", task.root_uid) == "1", 20, "the task to start")
        faults.kill(first)
        await anyio.sleep(3.5)  # the lease (3 s) expires
        assert await producer.backend.reclaim(IDENTITY) == 1  # what any live consumer does
    [doc] = forks_of(faults, task.root_uid)
    assert r.lrange(QUEUE, 0, -1) == [doc["uid"]]  # back in its queue
    assert doc["status"] == "Spawned", "a requeued task is not being processed"
    r.rpop(QUEUE)  # a consumer's BLPOP took it; the consumer died before leasing it

    second = faults.spawn("consumer", seed=7)
    await faults.wait_ready(second)
    # task_spawned_timeout = 5 s and gc_interval = 2 s: (ii) needs about 7 s.
    await poll(lambda: r.hget("faults:done", task.root_uid) == "1", 15, "the orphan to finish")


# -- (iii) -------------------------------------------------------------------------------


async def test_dead_router_journal_is_routed_exactly_once(faults: FaultEnv) -> None:
    """A router SIGKILLed after ROUTE_POP and before its MULTI/EXEC commit.

    Reproduced by hand: the uids sit in ``asynckarton.routing:<dead>`` (and no longer in
    ``karton.tasks``), the dead router's heartbeat in ``asynckarton.routers`` expired.
    """
    r = faults.r()
    faults.register_bind()
    count = 50
    tasks = [faults.make_task(n=i) for i in range(count)]
    for task in tasks:
        task.headers["origin"] = "faults.producer"
        task.last_update = time.time()
        r.set(f"karton.task:{task.uid}", task.serialize())
    dead = f"dead-{uuid.uuid4().hex}"
    r.rpush(f"asynckarton.routing:{dead}", *(t.uid for t in tasks))
    r.zadd("asynckarton.routers", {dead: int((time.time() - 60) * 1000)})
    # One more task arrives normally, so recovery and ordinary routing interleave.
    late = faults.make_task(n=count)
    async with Producer(faults.config(), identity="faults.producer") as producer:
        await faults.send(producer, [late])

    await start_system(faults)
    await poll(lambda: r.llen(QUEUE) == count + 1, 30, "the journal to be routed")
    await anyio.sleep(2 * 2.5)  # two more heartbeats: a second recovery would show up now

    queued = cast("list[str]", r.lrange(QUEUE, 0, -1))  # the client decodes responses
    roots: dict[str, int] = {}
    for uid in queued:
        body = r.get(f"karton.task:{uid}")
        assert body is not None, uid
        doc = json.loads(body)
        assert doc["status"] == "Spawned" and doc["headers"]["receiver"] == IDENTITY
        roots[doc["root_uid"]] = roots.get(doc["root_uid"], 0) + 1
    duplicates = sum(n - 1 for n in roots.values())
    stats = r.hgetall("asynckarton.stats")
    assert len(queued) == count + 1 and duplicates == 0, roots
    assert set(roots) == {t.root_uid for t in [*tasks, late]}
    assert int(stats.get("rerouted", 0)) == count, stats
    assert not r.exists(f"asynckarton.routing:{dead}")
    assert r.zscore("asynckarton.routers", dead) is None
    assert int(r.hget("karton.metrics.assigned", IDENTITY) or 0) == count + 1
    # The originals are Finished (or already collected), never left Declared.
    assert unfinished(faults)["Declared"] == 0


# -- (iv) --------------------------------------------------------------------------------


async def test_redis_restart_under_consumer_and_router(faults: FaultEnv) -> None:
    r = faults.r()
    system = await start_system(faults)
    consumer = faults.spawn("consumer", seed=4)
    await faults.wait_ready(consumer)
    async with Producer(faults.config(), identity="faults.producer") as producer:
        before = [faults.make_task(n=i) for i in range(20)]
        await faults.send(producer, before)
        await poll(lambda: r.hlen("faults:done") == 20, 30, "tasks sent before the restart")

        # Down long enough that redis-py's own retries (about 3.5 s) give up.
        await anyio.to_thread.run_sync(faults.redis_server.stop)
        await anyio.sleep(6.0)
        await anyio.to_thread.run_sync(faults.redis_server.start)

        after = [faults.make_task(n=i) for i in range(20, 40)]
        await faults.send(producer, after)
        await poll(lambda: r.hlen("faults:done") == 40, 40, "tasks sent after the restart")

    assert system.alive() and consumer.alive()
    await poll(lambda: all_settled(faults), 15, "settled state")
    done = r.hgetall("faults:done")
    assert {t.root_uid for t in after} <= set(done)
    for proc in (system, consumer):
        text = proc.output()
        warned = re.search(r"WARNING .*redis.{0,20}unavailable", text, re.IGNORECASE)
        assert warned, f"{proc.name} gave no clear warning:\n{text[-3000:]}"


async def test_services_started_while_redis_is_down_wait_for_it(faults: FaultEnv) -> None:
    r = faults.r()
    await anyio.to_thread.run_sync(faults.redis_server.stop)
    system = faults.spawn("system")
    consumer = faults.spawn("consumer", seed=8)
    await anyio.sleep(8.0)  # longer than redis-py's own retries (about 3.5 s)
    await anyio.to_thread.run_sync(faults.redis_server.start)
    await faults.wait_ready(system, consumer, timeout=40)
    task = faults.make_task()
    async with Producer(faults.config(), identity="faults.producer") as producer:
        await faults.send(producer, [task])
    await poll(lambda: r.hget("faults:done", task.root_uid) == "1", 20, "the task")


# -- (v) ---------------------------------------------------------------------------------


class SlowWorker(Consumer):
    """In-process consumer for the API shutdown test."""

    identity = IDENTITY
    filters = FILTERS
    started: ClassVar[list[str]] = []
    finished: ClassVar[list[str]] = []

    async def process(self, task: Task) -> None:
        type(self).started.append(task.root_uid)
        await anyio.sleep(float(task.payload["sleep"]))
        type(self).finished.append(task.root_uid)


async def test_stop_with_grace_hands_unfinished_tasks_back(faults: FaultEnv) -> None:
    r = faults.r()
    config = faults.config()
    config.set("karton", "concurrency_limit", "3")
    SlowWorker.started, SlowWorker.finished = [], []
    quick = faults.make_task(sleep=0.2)
    slow = [faults.make_task(sleep=60), faults.make_task(sleep=60)]
    async with (
        SystemService(config, setup_bucket=True) as system,
        SlowWorker(config) as worker,
        Producer(config, identity="faults.producer") as producer,
        anyio.create_task_group() as group,
    ):
        stopped = anyio.Event()

        async def run_worker(*, task_status: anyio.abc.TaskStatus[None]) -> None:
            await worker.run(task_status=task_status)
            stopped.set()

        await group.start(system.run)
        await group.start(run_worker)
        await producer.send_tasks([quick, *slow])
        await poll(lambda: len(SlowWorker.started) == 3, 20, "three handlers to start")
        assert r.zcard(LEASES) == 3
        worker.stop(grace=1.0)
        with anyio.fail_after(10):  # run() returns once the rest is handed back
            await stopped.wait()
        system.stop()

    assert SlowWorker.finished == [quick.root_uid], "the grace lets quick tasks finish"
    by_root = {doc["root_uid"]: doc for doc in forks_of(faults, quick.root_uid)}
    for task in slow:
        [doc] = forks_of(faults, task.root_uid)
        assert doc["status"] == "Spawned", doc["status"]
        assert doc["error"] is None
        assert doc["uid"] in r.lrange(QUEUE, 0, -1)
    assert r.zcard(LEASES) == 0
    assert r.llen(QUEUE) == 2
    assert r.hget("karton.metrics.crashed", IDENTITY) is None
    assert all(doc["status"] == "Finished" for doc in by_root.values())


async def test_sigterm_hands_unfinished_tasks_back(faults: FaultEnv) -> None:
    r = faults.r()
    await start_system(faults)
    consumer = faults.spawn_cli(
        "cli-consumer",
        "run",
        f"{WORKER}:FaultWorker",
        "--config-file",
        str(faults.ini),
        "--grace",
        "0.5",
        "--concurrency-limit",
        "2",
    )
    await poll(lambda: r.hexists("karton.binds", IDENTITY), 30, "the CLI consumer to register")
    tasks = [faults.make_task(first_sleep=60), faults.make_task(first_sleep=60)]
    async with Producer(faults.config(), identity="faults.producer") as producer:
        await faults.send(producer, tasks)
    await poll(lambda: r.hlen("faults:started") == 2, 20, "both tasks to start")

    consumer.popen.send_signal(signal.SIGTERM)
    with anyio.fail_after(15):
        while consumer.alive():
            await anyio.sleep(0.05)
    assert consumer.popen.returncode == 0, consumer.output()[-3000:]

    for task in tasks:
        [doc] = forks_of(faults, task.root_uid)
        assert doc["status"] == "Spawned" and doc["error"] is None, doc
    assert sorted(r.lrange(QUEUE, 0, -1)) == sorted(
        doc["uid"] for t in tasks for doc in forks_of(faults, t.root_uid)
    )
    assert r.zcard(LEASES) == 0
    assert r.hlen("faults:done") == 0
    assert "handed back" in consumer.output()

    # And a fresh consumer picks them up: nothing was lost to the deploy.
    replacement = faults.spawn("consumer", seed=5)
    await faults.wait_ready(replacement)
    await poll(lambda: r.hlen("faults:done") == 2, 20, "the handed-back tasks to finish")
