"""asynckarton and karton-core 5.9.1 sharing one Redis and one S3 bucket.

karton-core services run as real subprocesses (their blocking loops and signal handling
included): ``karton_core_consumer.py`` here and karton-core's own ``karton-system``
console script.  asynckarton services run in the test's event loop, or as subprocesses
(``asynckarton_consumer.py``) where the number of processes matters.

(a) karton-core Producer → asynckarton router → asynckarton Karton → karton-core Karton;
(b) asynckarton Producer → karton-system (router and GC) → asynckarton + karton-core;
(c) karton-core's ``KartonState`` and ``Task.unserialize`` read an asynckarton deployment.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, cast

import anyio
import pytest
import redis.asyncio as aredis
from karton.core import Config as KConfig
from karton.core import Producer as KProducer
from karton.core import Resource as KResource
from karton.core import Task as KTask
from karton.core import query as kquery
from karton.core.backend import KartonBackend, KartonServiceInfo
from karton.core.inspect import KartonState
from karton.core.task import TaskPriority as KTaskPriority

from asynckarton import (
    Config,
    Consumer,
    Karton,
    LocalResource,
    Producer,
    RemoteResource,
    SystemService,
    Task,
    TaskPriority,
)
from asynckarton.backend import KARTON_PROTOCOL_VERSION, Bind
from asynckarton.storage import S3Storage
from tests.servers import RedisServer, S3Server

pytestmark = [pytest.mark.integration, pytest.mark.interop, pytest.mark.anyio]

HERE = Path(__file__).parent
KARTON_SYSTEM = Path(sys.executable).with_name("karton-system")


# -- deployment and process helpers --------------------------------------------------------


@dataclass
class Deployment:
    """Shared Redis + bucket, the karton.ini both implementations read, a raw client."""

    ini: Path
    bucket: str
    s3: S3Server
    redis: aredis.Redis
    tmp: Path

    def config(self, **system: str) -> Config:
        """asynckarton's view of the same karton.ini (router only by default)."""
        config = Config(self.ini, search_paths=[], environ={})
        config.load_from_dict({"system": {"enable_gc": "0", **system}})
        return config

    def kconfig(self) -> KConfig:
        return KConfig(str(self.ini))

    async def tasks(self) -> dict[str, str]:
        """Raw task JSON by uid."""
        found: dict[str, str] = {}
        async for key in self.redis.scan_iter(match="karton.task:*", count=1000):
            body = await self.redis.get(key)
            if body is not None:
                # decode_responses=True: the client's replies are str
                found[cast(str, key).removeprefix("karton.task:")] = cast(str, body)
        return found

    async def objects(self) -> set[str]:
        async with S3Storage(self.s3.url, self.s3.access_key, self.s3.secret_key) as storage:
            return {v.key async for v in storage.list_object_versions(self.bucket)}

    async def metric(self, name: str) -> dict[str, int]:
        raw = cast(dict[str, str], await self.redis.hgetall(f"karton.metrics.{name}"))
        return {k: int(v) for k, v in raw.items()}

    async def online(self, identity: str) -> int:
        """Named connections of ``identity``, counted the way karton-core counts them."""
        return sum(
            1 for c in await self.redis.client_list() if c["name"].split("?", 1)[0] == identity
        )


@pytest.fixture
async def dep(
    redis_url: str, redis_srv: RedisServer, s3_srv: S3Server, s3_bucket: str, tmp_path: Path
) -> AsyncIterator[Deployment]:
    async with S3Storage(s3_srv.url, s3_srv.access_key, s3_srv.secret_key) as storage:
        await storage.ensure_bucket(s3_bucket, create=True)
    ini = tmp_path / "karton.ini"
    ini.write_text(
        "[redis]\n"
        "host = 127.0.0.1\n"
        f"port = {redis_srv.port}\n"
        "\n[s3]\n"
        f"address = {s3_srv.url}\n"
        f"access_key = {s3_srv.access_key}\n"
        f"secret_key = {s3_srv.secret_key}\n"
        f"bucket = {s3_bucket}\n"
        "\n[logging]\n"
        "level = INFO\n"
    )
    client = aredis.Redis.from_url(redis_url, decode_responses=True)
    try:
        yield Deployment(ini, s3_bucket, s3_srv, client, tmp_path)
    finally:
        await client.aclose()


async def wait_until(
    predicate: Callable[[], Awaitable[bool]], what: str, timeout: float = 20.0
) -> None:
    try:
        with anyio.fail_after(timeout):
            while not await predicate():
                await anyio.sleep(0.05)
    except TimeoutError:
        raise AssertionError(f"timed out after {timeout}s waiting for {what}") from None


class Processes:
    """Subprocesses of one test: output to files, always terminated (then killed)."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.procs: list[tuple[subprocess.Popen[bytes], Path]] = []

    def spawn(self, name: str, *argv: str | Path) -> subprocess.Popen[bytes]:
        log = self.tmp / f"{name}-{len(self.procs)}.log"
        with log.open("wb") as out:
            proc = subprocess.Popen(
                [str(a) for a in argv],
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                cwd=self.tmp,  # no stray ./karton.ini: the config is always explicit
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
            )
        self.procs.append((proc, log))
        return proc

    def karton_core_consumer(
        self, dep: Deployment, identity: str, filters: list[dict[str, Any]], record: Path
    ) -> subprocess.Popen[bytes]:
        return self.spawn(
            identity, sys.executable, HERE / "karton_core_consumer.py",
            "--config-file", dep.ini, "--identity", identity,
            "--filters", json.dumps(filters), "--record", record,
        )  # fmt: skip

    def asynckarton_consumer(
        self,
        dep: Deployment,
        identity: str,
        filters: list[dict[str, Any]],
        record: Path,
        concurrency: int,
    ) -> subprocess.Popen[bytes]:
        return self.spawn(
            identity, sys.executable, HERE / "asynckarton_consumer.py",
            "--config-file", dep.ini, "--identity", identity, "--filters", json.dumps(filters),
            "--record", record, "--concurrency", str(concurrency),
        )  # fmt: skip

    def karton_system(self, dep: Deployment, *flags: str) -> subprocess.Popen[bytes]:
        return self.spawn("karton-system", KARTON_SYSTEM, "--config-file", dep.ini, *flags)

    async def stop(self, proc: subprocess.Popen[bytes], timeout: float = 15.0) -> int:
        """SIGTERM, wait for a graceful exit, SIGKILL after ``timeout``; return the code."""
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        with anyio.move_on_after(timeout):
            while proc.poll() is None:
                await anyio.sleep(0.05)
        if proc.poll() is None:
            proc.kill()
            await anyio.to_thread.run_sync(proc.wait, 10)
        return proc.returncode

    def check_alive(self) -> None:
        for proc, log in self.procs:
            if proc.poll() is not None and proc.returncode != 0:
                raise AssertionError(f"{proc.args!r} exited {proc.returncode}:\n{self.tail(log)}")

    @staticmethod
    def tail(log: Path) -> str:
        return "\n".join(log.read_text(errors="replace").splitlines()[-40:])

    def kill_all(self) -> None:
        for proc, _ in self.procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=10)

    def dump(self) -> None:
        for proc, log in self.procs:
            print(f"===== {proc.args!r} (exit {proc.returncode})\n{self.tail(log)}")


@pytest.fixture
def procs(tmp_path: Path) -> Iterator[Processes]:
    processes = Processes(tmp_path)
    try:
        yield processes
    finally:
        processes.kill_all()
        processes.dump()  # shown by pytest only when the test failed


def read_records(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


async def wait_records(
    path: Path, count: int, procs: Processes, timeout: float = 30.0
) -> list[dict[str, Any]]:
    async def enough() -> bool:
        procs.check_alive()
        return len(read_records(path)) >= count

    await wait_until(enough, f"{count} record(s) in {path.name}", timeout)
    return read_records(path)


async def wait_online(dep: Deployment, identity: str, count: int, procs: Processes) -> None:
    async def online() -> bool:
        procs.check_alive()
        return await dep.online(identity) == count and bool(
            await dep.redis.hexists("karton.binds", identity)
        )

    await wait_until(online, f"{count} online {identity}")


@asynccontextmanager
async def running(*services: Any) -> AsyncIterator[None]:
    async with anyio.create_task_group() as group:
        for service in services:
            await group.start(service.run)
        try:
            yield
        finally:
            for service in reversed(services):
                service.stop(grace=2)


@contextmanager
def karton_backend(dep: Deployment) -> Iterator[KartonBackend]:
    backend = KartonBackend(dep.kconfig())
    try:
        yield backend
    finally:
        backend.redis.close()


def assert_routing_agrees_with_karton_core(
    tasks: dict[str, dict[str, Any]], binds: dict[str, str]
) -> None:
    """Every unrouted task was forked to exactly the binds karton-core's query matches."""
    parsed = {i: Bind.from_json(i, raw) for i, raw in binds.items()}
    # karton-core is untyped: convert(filters) -> a query object with .match(headers)
    convert: Callable[[Any], Any] = kquery.convert
    unrouted = [t for t in tasks.values() if "receiver" not in t["headers"]]
    assert unrouted
    for task in unrouted:
        expected = {
            identity
            for identity, bind in parsed.items()
            if convert(bind.filters).match(task["headers"])
        }
        forked = {t["headers"]["receiver"] for t in tasks.values() if t["orig_uid"] == task["uid"]}
        assert forked == expected, task["headers"]


# -- (a) karton-core producer → asynckarton → karton-core consumer -------------------------


class Forwarder(Karton):
    """Reads the sample and forwards it, by reference, with a derived resource."""

    identity = "interop.a.async"
    filters: ClassVar[list[dict[str, Any]]] = [{"type": "interop-a", "kind": "raw"}]

    def __init__(self, config: Config) -> None:
        super().__init__(config)
        self.seen: list[Task] = []

    async def process(self, task: Task) -> None:
        sample = task.get_resource("sample")
        assert isinstance(sample, RemoteResource)
        data = await sample.download()
        await self.send_task(
            Task(
                {"type": "interop-a-child", "kind": "derived"},
                payload={
                    "sample": sample,
                    "derived": LocalResource("derived.bin", data.upper()),
                    "meta": {"size": len(data), "list": [1, "two", None]},
                },
            )
        )
        self.seen.append(task)


async def test_a_karton_core_producer_to_asynckarton_to_karton_core_consumer(
    dep: Deployment, procs: Processes
) -> None:
    record = dep.tmp / "core-a.jsonl"
    config = dep.config()
    forwarder = Forwarder(config)
    with anyio.fail_after(60):
        core = procs.karton_core_consumer(
            dep, "interop.a.core", [{"type": "interop-a-child"}], record
        )
        await wait_online(dep, "interop.a.core", 1, procs)
        async with running(SystemService(config), forwarder):
            root = KTask(
                {"type": "interop-a", "kind": "raw"},
                payload={"sample": KResource("sample.txt", b"hello interop"), "n": 1},
                headers_persistent={"tlp": "amber"},
                payload_persistent={"case": "42"},
                priority=KTaskPriority.HIGH,
            )

            def produce() -> None:
                producer = KProducer(dep.kconfig(), identity="interop.a.producer")
                try:
                    producer.send_task(root)
                finally:
                    producer.backend.redis.close()

            await anyio.to_thread.run_sync(produce)
            [entry] = await wait_records(record, 1, procs)

            async def all_finished() -> bool:
                tasks = await dep.tasks()
                statuses = [json.loads(t)["status"] for t in tasks.values()]
                return len(statuses) == 4 and set(statuses) == {"Finished"}

            await wait_until(all_finished, "4 Finished tasks")
        tasks = {uid: json.loads(body) for uid, body in (await dep.tasks()).items()}
        binds = cast(dict[str, str], await dep.redis.hgetall("karton.binds"))
        assert await procs.stop(core) == 0

    [forwarded] = forwarder.seen
    sample_uid = root.get_payload("sample").uid
    assert forwarded.orig_uid == root.uid and forwarded.root_uid == root.root_uid
    assert forwarded.payload_persistent["case"] == "42"

    # What the karton-core consumer saw.
    assert entry["resources"]["sample.txt"]["content"] == "hello interop"
    assert entry["resources"]["sample.txt"]["uid"] == sample_uid  # passed by reference
    assert entry["resources"]["derived.bin"]["content"] == "HELLO INTEROP"
    derived = entry["resources"]["derived.bin"]
    assert derived["bucket"] == dep.bucket and derived["size"] == 13
    assert derived["sha256"] is not None and len(derived["sha256"]) == 64
    assert entry["headers"] == {
        "type": "interop-a-child", "kind": "derived", "tlp": "amber",
        "origin": "interop.a.async", "receiver": "interop.a.core",
    }  # fmt: skip
    assert entry["headers_persistent"] == {"tlp": "amber"}
    assert entry["payload"]["meta"] == {"size": 13, "list": [1, "two", None]}
    assert entry["payload_persistent"]["case"] == "42"
    assert entry["priority"] == "high"
    assert entry["parent_uid"] == forwarded.uid
    assert entry["root_uid"] == root.root_uid
    assert entry["status"] == "Started"
    assert await dep.objects() == {sample_uid, derived["uid"]}

    # karton-core's query agrees with our router; metrics from both sides add up.
    assert_routing_agrees_with_karton_core(tasks, binds)
    assert await dep.metric("produced") == {"interop.a.producer": 1, "interop.a.async": 1}
    assert await dep.metric("consumed") == {"interop.a.async": 1, "interop.a.core": 1}

    # A karton-core bind round-trips through asynckarton's Bind, byte for byte...
    core_bind = Bind.from_json("interop.a.core", binds["interop.a.core"])
    assert core_bind == Bind(
        identity="interop.a.core",
        filters=[{"type": "interop-a-child"}],
        info="karton-core recorder of the asynckarton interop tests.",
        version="5.9.1",
        persistent=True,
        service_version="9.9.9",
        is_async=False,
    )
    assert core_bind.to_json() == binds["interop.a.core"]
    # ...and ours reads back with karton-core's parser.
    ours = KartonBackend.unserialize_bind("interop.a.async", binds["interop.a.async"])
    assert ours.filters == Forwarder.filters and ours.persistent is True
    assert ours.version == KARTON_PROTOCOL_VERSION and ours.is_async is True
    assert ours.info == Forwarder.__doc__
    assert KartonBackend.serialize_bind(ours) == binds["interop.a.async"]


# -- (b) asynckarton producer → karton-system → asynckarton + karton-core ------------------


class Collector(Consumer):
    """Non-persistent: karton-system's GC must keep its bind while it is online."""

    identity = "interop.b.async"
    persistent = False
    filters: ClassVar[list[dict[str, Any]]] = [{"type": "interop-b"}]

    def __init__(self, config: Config) -> None:
        super().__init__(config)
        self.seen: list[tuple[Task, bytes]] = []

    async def process(self, task: Task) -> None:
        resource = task.get_resource("file")
        assert isinstance(resource, RemoteResource)
        self.seen.append((task, await resource.download()))


async def test_b_karton_system_routes_and_collects_an_asynckarton_deployment(
    dep: Deployment, procs: Processes
) -> None:
    record = dep.tmp / "core-b.jsonl"
    config = dep.config()
    collector = Collector(config)
    with anyio.fail_after(90):
        system = procs.karton_system(dep, "--gc-interval", "1")
        core = procs.karton_core_consumer(dep, "interop.b.core", [{"type": "interop-b"}], record)
        await wait_until(lambda: _named(dep, "karton.system?"), "karton-system online")
        await wait_online(dep, "interop.b.core", 1, procs)
        async with Producer(config, identity="interop.b.producer") as producer, running(collector):
            assert await dep.online("interop.b.async") == 1
            task = Task(
                {"type": "interop-b", "kind": "raw"},
                payload={"file": LocalResource("b.bin", b"\x00\x01binary\xff"), "n": 7},
                headers_persistent={"case": "b"},
                priority=TaskPriority.LOW,
            )
            await producer.send_task(task)
            [entry] = await wait_records(record, 1, procs)

            async def collected() -> bool:
                return len(collector.seen) == 1

            await wait_until(collected, "the asynckarton consumer")

            # karton-system's GC (every second) removes the Finished tasks, then
            # their resource; it keeps our non-persistent bind: we are online.
            async def clean() -> bool:
                procs.check_alive()
                return not await dep.tasks() and not await dep.objects()

            await wait_until(clean, "karton-system's GC to remove tasks and objects", 30)
            await anyio.sleep(1.5)  # one more GC round with our consumer online
            assert await dep.redis.hexists("karton.binds", "interop.b.async")
            assert not await dep.redis.exists("asynckarton.leases:interop.b.async")

        # Stopped: our presence connection is gone, so the next GC drops the bind.
        async def unbound() -> bool:
            return not await dep.redis.hexists("karton.binds", "interop.b.async")

        await wait_until(unbound, "karton-system to drop the offline non-persistent bind")
        codes: dict[str, int] = {}

        async def stop(name: str, proc: subprocess.Popen[bytes]) -> None:
            codes[name] = await procs.stop(proc)

        async with anyio.create_task_group() as group:  # each waits out its 5 s BLPOP
            group.start_soon(stop, "consumer", core)
            group.start_soon(stop, "karton-system", system)
        assert codes == {"consumer": 0, "karton-system": 0}

    [(got, content)] = collector.seen
    assert content == b"\x00\x01binary\xff"
    assert got.headers == {
        "type": "interop-b", "kind": "raw", "case": "b",
        "origin": "interop.b.producer", "receiver": "interop.b.async",
    }  # fmt: skip
    assert got.priority is TaskPriority.LOW and got.orig_uid == task.uid
    assert got.payload["n"] == 7
    assert entry["resources"]["b.bin"]["content"] == "\x00\x01binary\xff"
    assert entry["resources"]["b.bin"]["uid"] == task.get_payload("file").uid
    assert entry["headers"]["receiver"] == "interop.b.core"
    assert entry["headers"]["origin"] == "interop.b.producer"
    assert entry["headers_persistent"] == {"case": "b"}
    assert entry["priority"] == "low" and entry["orig_uid"] == task.uid
    assert entry["payload"] == {"file": {"resource": task.get_payload("file").uid}, "n": 7}
    assert await dep.metric("assigned") == {"interop.b.async": 1, "interop.b.core": 1}
    assert await dep.metric("consumed") == {"interop.b.async": 1, "interop.b.core": 1}
    assert await dep.metric("crashed") == {}
    assert await dep.metric("garbage-collected") == {
        "unknown": 1, "interop.b.async": 1, "interop.b.core": 1,
    }  # fmt: skip


async def _named(dep: Deployment, prefix: str) -> bool:
    return any(c["name"].startswith(prefix) for c in await dep.redis.client_list())


# -- (c) karton-core inspects an asynckarton deployment -----------------------------------


class Crasher(Consumer):
    """Always crashes."""

    identity = "interop.c.crashy"
    filters: ClassVar[list[dict[str, Any]]] = [{"type": "interop-c-crash"}]

    async def process(self, task: Task) -> None:
        raise RuntimeError(f"cannot handle {task.headers['type']}")


ASYNC_C = "interop.c.async"
FILTERS_C = [{"type": "interop-c"}, {"type": "interop-c2", "kind": "!skip"}]


async def test_c_karton_state_reads_an_asynckarton_deployment(
    dep: Deployment, procs: Processes
) -> None:
    record = dep.tmp / "async-c.jsonl"
    config = dep.config()
    with anyio.fail_after(90):
        # Two consumer processes with 4 handlers each: two replicas, not eight.
        workers = [
            procs.asynckarton_consumer(dep, ASYNC_C, FILTERS_C, record, concurrency=4)
            for _ in range(2)
        ]
        await wait_online(dep, ASYNC_C, 2, procs)

        def inspect_online() -> tuple[KartonState, list[KartonServiceInfo]]:
            with karton_backend(dep) as backend:
                return KartonState(backend), backend.get_online_services()

        state, services = await anyio.to_thread.run_sync(inspect_online)
        assert len(state.replicas[ASYNC_C]) == 2
        assert state.queues[ASYNC_C].online_consumers_count == 2
        bind = state.binds[ASYNC_C]
        assert bind.filters == FILTERS_C
        assert bind.persistent is True and bind.is_async is True
        assert bind.version == KARTON_PROTOCOL_VERSION and bind.service_version == "3.1.4"
        assert bind.info == "asynckarton consumer of the interop tests."
        mine = [s for s in services if s.identity == ASYNC_C]
        assert mine == [KartonServiceInfo(ASYNC_C, KARTON_PROTOCOL_VERSION, "3.1.4")] * 2

        for worker in workers:
            assert await procs.stop(worker) == 0
        assert await dep.online(ASYNC_C) == 0

        # Consumers stopped: tasks wait in their queues, as the dashboard would show.
        async with Producer(config, identity="interop.c.producer") as producer:
            sent = [
                Task(
                    {"type": "interop-c", "n": n},
                    payload={
                        "n": n,
                        "file": LocalResource(f"f{n}.bin", f"content {n}".encode()),
                        "nested": {"list": [LocalResource(f"g{n}.bin", b"g"), n]},
                        "big": 2**70,
                    },
                    headers_persistent={"tlp": "red"},
                    payload_persistent={"uploader": "interop"},
                    priority=prio,
                )
                for n, prio in enumerate(
                    [TaskPriority.HIGH, TaskPriority.NORMAL, TaskPriority.LOW, TaskPriority.HIGH]
                )
            ]
            sent.append(Task({"type": "interop-c2", "kind": "raw"}, payload={"n": 4}))
            sent.append(Task({"type": "interop-c2", "kind": "skip"}, payload={"n": 5}))
            await producer.send_tasks(sent)
            crash = Task({"type": "interop-c-crash"}, payload={"why": "error list"})
            await producer.send_task(crash)
            crasher = Crasher(config)
            async with running(crasher, SystemService(config)):  # bound before routing

                async def settled() -> bool:
                    queued = sum(
                        [
                            await dep.redis.llen(f"karton.queue.{p}:{ASYNC_C}")
                            for p in ("high", "normal", "low")
                        ]
                    )
                    docs = [json.loads(b) for b in (await dep.tasks()).values()]
                    crashed = [d for d in docs if d["status"] == "Crashed"]
                    return queued == 5 and len(crashed) == 1

                await wait_until(settled, "5 queued tasks and 1 crashed one")
        raw = await dep.tasks()
        binds = cast(dict[str, str], await dep.redis.hgetall("karton.binds"))

        def inspect_offline() -> tuple[KartonState, dict[str, KTask], dict[str, KTask]]:
            with karton_backend(dep) as backend:
                state = KartonState(backend, parse_resources=True)
                _ = state.queues, state.analyses  # load everything while connected
                parsed = {
                    uid: KTask.unserialize(body, backend=backend) for uid, body in raw.items()
                }
                fast = {
                    uid: KTask.unserialize(body, parse_resources=False) for uid, body in raw.items()
                }
                return state, parsed, fast

        state, parsed, fast = await anyio.to_thread.run_sync(inspect_offline)

    assert_routing_agrees_with_karton_core({u: json.loads(b) for u, b in raw.items()}, binds)
    # Queues: every bind appears; pending tasks sit in ours, the crash in the crasher's.
    assert ASYNC_C not in state.replicas or not state.replicas[ASYNC_C]
    queue = state.queues[ASYNC_C]
    assert queue.online_consumers_count == 0
    assert sorted(t.payload["n"] for t in queue.pending_tasks) == [0, 1, 2, 3, 4]
    assert {t.status.value for t in queue.pending_tasks} == {"Spawned"}
    [crashed] = state.queues["interop.c.crashy"].crashed_tasks
    assert isinstance(crashed.error, list) and all(isinstance(x, str) for x in crashed.error)
    assert crashed.error[-1] == "RuntimeError: cannot handle interop-c-crash\n"
    assert crashed.root_uid == crash.root_uid
    # Analyses: one per root with something pending (the unmatched "skip" task is done).
    assert len(state.pending_tasks) == 6
    assert set(state.analyses) == {t.root_uid for t in sent[:5]} | {crash.root_uid}
    # 5.9.1's analysis "pending" excludes only Crashed tasks.
    assert {r for r, a in state.analyses.items() if a.is_done} == {crash.root_uid}

    # Every asynckarton-written task parses in karton-core and re-serialises identically.
    for uid, body in raw.items():
        ktask = parsed[uid]
        ours = Task.unserialize(body)
        assert ktask.uid == ours.uid == uid
        assert ktask.root_uid == ours.root_uid and ktask.parent_uid == ours.parent_uid
        assert ktask.orig_uid == ours.orig_uid
        assert ktask.status.value == ours.status.value
        assert ktask.priority.value == ours.priority.value
        assert ktask.headers == ours.headers
        assert ktask.headers_persistent == ours.headers_persistent
        assert ktask.error == ours.error
        assert ktask.last_update == ours.last_update
        assert json.loads(ktask.serialize()) == json.loads(body)
        assert fast[uid].to_dict() == json.loads(body)
        for kres, res in zip(ktask.iterate_resources(), ours.iterate_resources(), strict=True):
            assert (kres.uid, kres.name, kres.bucket, kres.size, kres.sha256) == (
                res.uid, res.name, res.bucket, res.size, res.sha256,
            )  # fmt: skip
        # ...and what karton-core writes back parses in asynckarton the same way.
        again = Task.unserialize(ktask.serialize())
        assert json.loads(again.serialize()) == json.loads(body)

    routed = [parsed[uid] for uid in raw if parsed[uid].headers.get("receiver") == ASYNC_C]
    by_n = {t.payload["n"]: t for t in routed}
    first = by_n[0]
    assert first.priority is KTaskPriority.HIGH and by_n[2].priority is KTaskPriority.LOW
    assert first.headers_persistent == {"tlp": "red"}
    assert first.payload_persistent["uploader"] == "interop"
    assert first.payload["big"] == 2**70
    [nested] = [r for r in first.payload["nested"]["list"] if not isinstance(r, int)]
    assert nested.uid == sent[0].payload["nested"]["list"][0].uid
    assert nested.content == b"g"  # karton-core downloads what asynckarton uploaded
    assert first.get_resource("file").content == b"content 0"
    assert set(await dep.objects()) == {r.uid for t in sent for r in t.iterate_resources()}


@pytest.mark.parametrize(
    ("payload", "wire"),
    [
        pytest.param(
            {"ints": {1: "one", 2: "two"}}, {"ints": {"1": "one", "2": "two"}}, id="int-keys"
        ),
        pytest.param({"tuple": (1, (2, 3))}, {"tuple": [1, [2, 3]]}, id="tuples"),
        pytest.param(
            {"big": 2**80, "neg": -(2**70)}, {"big": 2**80, "neg": -(2**70)}, id="big-ints"
        ),
        pytest.param({"text": "zażółć ✓"}, {"text": "zażółć ✓"}, id="unicode"),
    ],
)
async def test_task_json_edge_cases_match_karton_core(
    payload: dict[str, Any], wire: dict[str, Any]
) -> None:
    """Payload shapes karton-core accepts serialise to the same JSON in asynckarton."""
    kt = KTask({"type": "edge"}, payload=payload)
    ours = Task({"type": "edge"}, payload=payload, uid=kt.uid, root_uid=kt.root_uid)
    ours.last_update = kt.last_update
    assert json.loads(ours.serialize()) == json.loads(kt.serialize())
    assert KTask.unserialize(ours.serialize()).payload == wire
