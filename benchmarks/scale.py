"""A million tasks: routing, delivery, GC, inspection and memory at deployment size.

Run on demand (not part of ``benchmarks.run``, not in CI)::

    python -m benchmarks.scale            # 1,000,000 pending tasks, writes benchmarks/SCALE.md
    python -m benchmarks.scale --smoke    # 20,000 tasks, < 60 s, prints the table only

It starts its own ``redis-server`` on a free loopback port and measures everything twice:
on an empty Redis (20 binds registered, nothing queued) and with ``--tasks`` pending
tasks spread over the same 20 identities.  The tasks are written the way asynckarton's
router writes them (one Spawned fork per task in ``karton.queue.normal:<identity>``,
through ``KartonBackend.route_commit``), so Redis holds exactly what a deployment with
that backlog holds.

Measurements (each its own process, so RSS is per process):

* **routing**: ``--route`` tasks pushed to ``karton.tasks``, then a ``SystemService``
  (router only) drains them; rate = tasks / time from the first to the last routed;
* **GC pass**: one ``GarbageCollector.collect()`` in that same process (router idle);
* **routing during GC**: ``--route`` more tasks routed while one GC pass runs in the same
  event loop, as in ``asynckarton system``; the rate over the overlap vs the rate alone;
* **delivery**: one consumer process (``concurrency_limit = 64``) draining ``--consume``
  tasks of its queue;
* **inspection** (``DeploymentState.load``), the ``asynckarton status`` command (wall
  time, Python start-up included) and a metrics scrape (HTTP GET of the system exporter);
* **Redis memory per task** and the **peak RSS** (VmHWM) of each process.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
import urllib.request
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import anyio
import redis

from asynckarton import Config, SystemService
from asynckarton._services._inspect import DeploymentState
from asynckarton._services._metrics import SystemMetrics, serve_http
from asynckarton._services._runtime import Runtime
from asynckarton._version import __version__
from asynckarton._wire._document import RoutableTask
from asynckarton._wire._task import Task
from asynckarton.backend import Bind, KartonBackend
from asynckarton.backend._connect import ServerConnector
from asynckarton.backend._records import RoutedBatch
from asynckarton.storage import LocalStorage
from asynckarton.system._gc import GarbageCollector
from benchmarks._harness import Context, Processes, processes, wait_until
from benchmarks._servers import RedisServer, free_port
from benchmarks._workers._common import setup_logging
from benchmarks.report import machine

IDENTITIES = [f"scale.{i:02d}" for i in range(20)]
FILL_BATCH = 5000
PUSH_BATCH = 1000
SCALE_MD = Path(__file__).with_name("SCALE.md")


def filters(identity: str) -> list[dict[str, Any]]:
    """The bind filters of ``identity``: one ``kind`` per identity."""
    return [{"type": "scale", "kind": identity}]


def new_task(identity: str, n: int) -> Task:
    """A header-only task with a small payload, for ``identity``'s filters."""
    return Task(
        {"type": "scale", "kind": identity},
        payload={"n": n, "sent": time.time(), "text": "x" * 64},
    )


# -- Redis contents, written through the backend --------------------------------------------


def load_config(path: Path) -> Config:
    """The benchmark's ini only (no environment, no other file)."""
    return Config(path, environ={}, search_paths=[])


def runtime(config_path: Path, data: Path) -> Runtime:
    """A runtime for the ini's Redis with local storage (the GC's resource pass finds it empty)."""
    config = load_config(config_path)
    connector = ServerConnector.from_settings(config.redis_settings())
    return Runtime(connector, LocalStorage(data / "storage"), create_bucket=True)


async def register_binds(backend: KartonBackend) -> None:
    for identity in IDENTITIES:
        await backend.register_bind(Bind(identity=identity, filters=filters(identity)))


async def fill_routed(
    backend: KartonBackend, count: int, identities: list[str], *, progress: bool = False
) -> None:
    """Write ``count`` routed forks over ``identities``, as the router commits them."""
    written, now = 0, time.time()
    while written < count:
        batch = RoutedBatch()
        for n in range(written, min(count, written + FILL_BATCH)):
            identity = identities[n % len(identities)]
            original = RoutableTask.parse(new_task(identity, n).serialize())
            uid, body = original.fork(identity, now)
            batch.add_fork(uid, body, "normal", identity)
        await backend.route_commit("scale-fill", batch, 0)
        written = min(count, written + FILL_BATCH)
        if progress and written % 100_000 == 0:
            print(f"  filled {written:,} / {count:,}", flush=True)


async def push_unrouted(backend: KartonBackend, count: int) -> None:
    """Send ``count`` tasks to ``karton.tasks`` as a producer does (batches of 1000)."""
    for start in range(0, count, PUSH_BATCH):
        tasks = [
            new_task(IDENTITIES[n % len(IDENTITIES)], n)
            for n in range(start, min(count, start + PUSH_BATCH))
        ]
        await backend.enqueue_unrouted({t.uid: t.serialize() for t in tasks}, "scale.producer")


# -- the system worker: routing alone, GC alone, routing during GC --------------------------


def _hwm_kib() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    return 0


class Gate:
    """Holds the GC between two batches while closed (benchmark only: GC off windows)."""

    def __init__(self) -> None:
        self._opened = anyio.Event()
        self._opened.set()

    def set(self, on: bool) -> None:
        """Let the GC run (``on``) or hold it at its next batch."""
        if on:
            self._opened.set()
        elif self._opened.is_set():
            self._opened = anyio.Event()

    def wrap(self, backend: KartonBackend) -> None:
        scan = backend.scan_tasks

        def gated(**kwargs: Any) -> AsyncIterator[list[tuple[str, str]]]:
            async def batches() -> AsyncIterator[list[tuple[str, str]]]:
                async for batch in scan(**kwargs):
                    await self._opened.wait()
                    yield batch

            return batches()

        setattr(backend, "scan_tasks", gated)  # noqa: B010 - an instance attribute, on purpose


async def _drained(service: SystemService, count: int) -> None:
    router = service.router
    assert router is not None
    while router.routed < count:  # noqa: ASYNC110 - polls the router's counter
        await anyio.sleep(0.02)


async def system_worker(config_path: Path, count: int, window: float, out_path: Path) -> None:
    """Routing alone, a GC pass alone, then routing in windows with the GC on and off.

    The windows alternate (``window`` s each) while one GC pass runs in the router's event
    loop, held between two batches during the "off" windows: neighbouring windows see the
    same machine load, so their ratio is what the GC costs the router.
    """
    setup_logging()  # INFO to the worker's log, as the suite's system worker
    config = load_config(config_path)
    result: dict[str, Any] = {}
    async with runtime(config_path, config_path.parent) as rt, anyio.create_task_group() as tg:
        gate = Gate()
        gate.wrap(rt.backend)
        warmup = max(count // 4, 1000)
        await push_unrouted(rt.backend, warmup)
        service = SystemService(config, runtime=rt)
        began = time.perf_counter()
        await tg.start(service.run)
        await _drained(service, warmup)
        result["route_rate_warmup"] = warmup / (time.perf_counter() - began)
        result["router_hwm_kib"] = _hwm_kib()
        gc = GarbageCollector(
            rt.backend, rt.storage, rt.bucket, config.system_settings(), _log("gc")
        )
        began = time.perf_counter()
        report = await gc.collect()
        result["gc_seconds"] = time.perf_counter() - began
        result["gc_deleted"] = report.deleted_tasks if report else -1
        result["gc_hwm_kib"] = _hwm_kib()
        gate.set(False)
        router = service.router
        assert router is not None
        await push_unrouted(rt.backend, count)  # routing starts meanwhile: not measured
        gc_done = anyio.Event()

        async def collect_once() -> None:
            await gc.collect()
            gc_done.set()

        tg.start_soon(collect_once)
        rates: dict[bool, list[float]] = {False: [], True: []}
        order = (False, True)
        while True:  # pairs in ABBA order (off-on, on-off, ...): a load trend cancels out
            pair: list[tuple[bool, float]] = []
            for on in order:
                gate.set(on)
                start, routed = time.perf_counter(), router.routed
                await anyio.sleep(window)
                pair.append((on, (router.routed - routed) / (time.perf_counter() - start)))
            # a pair counts only if the router had work and the pass ran throughout
            if gc_done.is_set() or await rt.backend.routing_backlog() < 2 * service.batch_size:
                break
            for on, rate in pair:
                rates[on].append(rate)
            order = order[::-1]
        gate.set(True)
        n = min(len(rates[False]), len(rates[True]))
        if n == 0:
            raise RuntimeError("no routing window overlapped the GC pass: route more tasks")
        result["route_rate"] = statistics.median(rates[False][:n])
        result["route_rate_during_gc"] = statistics.median(rates[True][:n])
        result["windows"], result["window"] = n, window
        result["window_rates"] = {"off": rates[False][:n], "on": rates[True][:n]}
        await gc_done.wait()
        await _drained(service, warmup + count)
        result["system_hwm_kib"] = _hwm_kib()
        service.stop()
    await anyio.Path(out_path).write_text(json.dumps(result))


def _log(name: str) -> Any:
    import logging

    logging.basicConfig(level=logging.WARNING)
    return logging.getLogger(f"scale.{name}")


# -- the driver ---------------------------------------------------------------------------


def run_system(procs: Processes, ctx: Context, count: int, label: str) -> Any:
    out = ctx.workdir / f"system.{label}.json"
    worker = procs.spawn(
        f"system.{label}",
        [sys.executable, "-m", "benchmarks.scale", "--worker", "system",
         "--config", str(ctx.config_path), "--route", str(count), "--out", str(out),
         "--window", str(0.25 if ctx.smoke else 0.5)],
        finite=True,
    )  # fmt: skip
    wait_until(lambda: worker.process.poll() is not None, timeout=600, what="the system worker",
               procs=procs, interval=0.2)  # fmt: skip
    if worker.process.returncode != 0:
        raise RuntimeError(f"system worker failed:\n{worker.tail(30)}")
    return json.loads(out.read_text())


def run_consumer(procs: Processes, ctx: Context, count: int, label: str) -> dict[str, float]:
    """One consumer process drains ``count`` tasks of ``scale.00``; rate and VmHWM."""
    raw = redis.Redis(port=ctx.redis_port, decode_responses=True)
    identity = IDENTITIES[0]
    before = int(raw.hget("karton.metrics.consumed", identity) or 0)
    worker = procs.python(
        f"consumer.{label}", "ak_consumer", "--config", str(ctx.config_path),
        "--identity", identity, "--filters", json.dumps(filters(identity)),
        "--concurrency", "64",
    )  # fmt: skip
    first = 0.0

    def done() -> bool:
        nonlocal first
        got = int(raw.hget("karton.metrics.consumed", identity) or 0) - before
        if got and not first:
            first = time.perf_counter()
        return got >= count

    wait_until(done, timeout=600, what="the consumer", procs=procs, interval=0.02)
    seconds = time.perf_counter() - first
    hwm = _proc_hwm(worker.pid)
    procs.stop_all()
    raw.close()
    return {"rate": count / max(seconds, 1e-9), "hwm_kib": hwm}


def _proc_hwm(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    return 0


async def inspect_times(config_path: Path) -> dict[str, float]:
    """Time ``DeploymentState.load``, one metrics scrape over HTTP and ``asynckarton status``."""
    out: dict[str, float] = {}
    async with runtime(config_path, config_path.parent) as rt:
        began = time.perf_counter()
        await DeploymentState.load(rt.backend)
        out["inspect"] = time.perf_counter() - began
        service = SimpleNamespace(config=load_config(config_path), router=None, backend=rt.backend)
        metrics = SystemMetrics(service)
        port = free_port()
        async with anyio.create_task_group() as group:
            await group.start(serve_http, metrics.render, port, "127.0.0.1")

            def get() -> bytes:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30) as r:
                    body: bytes = r.read()
                    return body

            began = time.perf_counter()
            body = await anyio.to_thread.run_sync(get)
            out["scrape"] = time.perf_counter() - began
            out["scrape_bytes"] = len(body)
            group.cancel_scope.cancel()

    async def wall(*argv: str) -> float:  # the fastest of 3: start-up is noisy here
        times = []
        for _ in range(3):
            began = time.perf_counter()
            await anyio.run_process([sys.executable, "-m", "asynckarton", *argv])
            times.append(time.perf_counter() - began)
        return min(times)

    out["status_cli"] = await wall("status", "--config-file", str(config_path), "--json")
    out["startup"] = await wall("version")
    out["status_work"] = max(0.0, out["status_cli"] - out["startup"])
    return out


def measure(ctx: Context, label: str, tasks: int, route: int, consume: int) -> dict[str, Any]:
    """Fill Redis with ``tasks`` pending tasks, then take every measurement."""
    raw = redis.Redis(port=ctx.redis_port)
    raw.flushall()

    async def prepare() -> None:
        async with runtime(ctx.config_path, ctx.workdir) as rt:
            await register_binds(rt.backend)
            before = int((await rt.backend.redis.info("memory"))["used_memory"])
            began = time.perf_counter()
            await fill_routed(rt.backend, tasks, IDENTITIES, progress=tasks >= 100_000)
            result["fill_seconds"] = time.perf_counter() - began
            await anyio.sleep(0.3)
            after = int((await rt.backend.redis.info("memory"))["used_memory"])
            result["memory_per_task"] = (after - before) / tasks if tasks else 0.0
            result["used_memory"] = after

    async def top_up() -> None:  # the consumer's share, on top of the pending tasks
        async with runtime(ctx.config_path, ctx.workdir) as rt:
            await fill_routed(rt.backend, consume, IDENTITIES[:1])

    result: dict[str, Any] = {"tasks": tasks}
    print(f"[{label}] filling {tasks:,} pending tasks", flush=True)
    anyio.run(prepare)
    print(f"[{label}] inspection, status, scrape", flush=True)
    result.update(anyio.run(inspect_times, ctx.config_path))
    print(f"[{label}] consumer draining {consume:,}", flush=True)
    anyio.run(top_up)
    with processes(ctx, f"consumer.{label}") as procs:
        consumer = run_consumer(procs, ctx, consume, label)
    result["consume_rate"], result["consumer_hwm_kib"] = consumer["rate"], consumer["hwm_kib"]
    print(f"[{label}] routing {route:,}, one GC pass, routing {route:,} during a GC pass",
          flush=True)  # fmt: skip
    with processes(ctx, f"system.{label}") as procs:
        result.update(run_system(procs, ctx, route, label))
    raw.close()
    print(f"[{label}] {json.dumps(result)}", flush=True)
    return result


# -- report -------------------------------------------------------------------------------


def rows(empty: dict[str, Any], full: dict[str, Any]) -> Iterator[tuple[str, ...]]:
    """(measurement, empty, full, target, verdict) rows."""

    def verdict(ok: bool) -> str:
        return "PASS" if ok else "FAIL"

    def ratio(result: dict[str, Any]) -> float:
        return float(result["route_rate_during_gc"]) / max(float(result["route_rate"]), 1e-9)

    def both(key: str, form: str) -> tuple[str, str]:
        return format(empty[key], form), format(full[key], form)

    yield ("routing rate, GC off windows (tasks/s)", *both("route_rate", ",.0f"), "", "")
    yield (
        "routing rate, GC on windows: one pass running in the router's loop (tasks/s)",
        f"{empty['route_rate_during_gc']:,.0f} ({ratio(empty):.0%})",
        f"{full['route_rate_during_gc']:,.0f} ({ratio(full):.0%})",
        ">= 90% of off",
        verdict(ratio(full) >= 0.9),
    )
    yield ("one GC pass, router idle (s)", *both("gc_seconds", ".2f"), "", "")
    yield ("consumer delivery rate, one process (tasks/s)", *both("consume_rate", ",.0f"), "", "")
    for key, name in (
        ("inspect", "inspection: `DeploymentState.load`"),
        ("scrape", "metrics scrape: HTTP GET of the system exporter"),
        ("status_work", "`asynckarton status --json` minus Python start-up"),
    ):
        yield (f"{name} (s)", *both(key, ".3f"), "< 1 s", verdict(full[key] < 1.0))
    yield ("`asynckarton status --json`, wall (s)", *both("status_cli", ".2f"), "", "")
    yield ("`asynckarton version`, wall: the start-up (s)", *both("startup", ".2f"), "", "")
    yield ("Redis memory per pending task (bytes)", "-", f"{full['memory_per_task']:,.0f}", "", "")
    yield (
        "Redis used_memory (MiB)",
        f"{empty['used_memory'] / 2**20:,.1f}",
        f"{full['used_memory'] / 2**20:,.1f}",
        "",
        "",
    )
    for key, name in (
        ("router_hwm_kib", "router (system process before its first GC pass)"),
        ("gc_hwm_kib", "system process after a GC pass, router idle"),
        ("system_hwm_kib", "system process at the end (router + GC)"),
        ("consumer_hwm_kib", "consumer process"),
    ):
        bounded = full[key] <= 1.5 * empty[key] + 50 * 1024
        yield (
            f"peak RSS (VmHWM), {name} (MiB)",
            f"{empty[key] / 1024:.0f}",
            f"{full[key] / 1024:.0f}",
            "bounded",
            verdict(bounded),
        )


def render(empty: dict[str, Any], full: dict[str, Any], command: str, seconds: float) -> str:
    table = [
        f"| measurement | empty | {full['tasks']:,} tasks | target | |",
        "|---|---:|---:|---|---|",
        *(f"| {' | '.join(row)} |" for row in rows(empty, full)),
    ]
    lines = [
        "# Scale: a million pending tasks",
        "",
        f"Written by `{command}` in {seconds / 60:.1f} min; nothing is hand-edited.",
        "Redis holds the pending tasks as the router writes them (a Spawned fork per task in",
        '`karton.queue.normal:<identity>`, 20 identities); "empty" is the same Redis with only',
        "the 20 binds. Every rate comes from its own process; the GC pass runs in the router's",
        "process and event loop, as in `asynckarton system`. The GC's storage is a local",
        "directory with no object (its resource pass lists nothing and reads no task).",
        "",
        *table,
        "",
        (
            f"Routing: {full['route']:,} tasks are pushed to `karton.tasks`, then routed by one "
            f"`SystemService` in alternating {full['window']:g}-s windows (ABBA order) while one GC "
            'pass runs in its event loop, held between two batches in the "off" windows; the rates '
            f"are medians of {full['windows']} windows each at {full['tasks']:,} "
            f"({empty['windows']} empty): neighbouring windows see the same machine load. "
            f"Delivery: {full['consume']:,} tasks drained by one consumer process "
            "(`concurrency_limit = 64`, log publishing on). Status: the `status` command's wall "
            "time minus `asynckarton version`'s (Python and package start-up, the same at any "
            "size), each the fastest of 3 runs."
        ),
        'Peak RSS "bounded": at most 1.5x the empty figure + 50 MiB.',
        "",
        "## Machine and versions",
        "",
        *[f"- {k}: {v}" for k, v in machine().items()],
        f"- asynckarton: {__version__}",
        "",
        "The machine is shared (2 cores, other jobs running): compare the two columns, not",
        "runs on different days.",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--smoke", action="store_true", help="20,000 tasks; print, write nothing")
    parser.add_argument("--tasks", type=int, default=None, help="pending tasks (1,000,000)")
    parser.add_argument("--route", type=int, default=None, help="tasks routed per measure")
    parser.add_argument("--consume", type=int, default=None, help="tasks the consumer drains")
    parser.add_argument("--output", type=Path, default=None, help=f"default: {SCALE_MD}")
    parser.add_argument("--worker", choices=["system"], help=argparse.SUPPRESS)
    parser.add_argument("--config", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--window", type=float, default=1.0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker == "system":
        anyio.run(system_worker, args.config, args.route, args.window, args.out)
        return
    tasks = args.tasks or (20_000 if args.smoke else 1_000_000)
    route = args.route or (20_000 if args.smoke else 200_000)
    consume = args.consume or (5_000 if args.smoke else 30_000)
    command = "python -m benchmarks.scale" + " ".join(["", *sys.argv[1:]]).rstrip()
    began = time.perf_counter()
    workdir = Path(tempfile.mkdtemp(prefix="scale-asynckarton-"))
    server = RedisServer(workdir)
    server.start()
    try:
        ctx = Context(redis_port=server.port, s3_url="http://127.0.0.1:9", workdir=workdir,
                      smoke=args.smoke)  # fmt: skip
        empty = measure(ctx, "empty", 0, route, consume)
        full = measure(ctx, f"{tasks:,}", tasks, route, consume)
        full["consume"], full["route"] = consume, route
    finally:
        server.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    text = render(empty, full, command, time.perf_counter() - began)
    print(text)
    if not args.smoke:
        output = args.output or SCALE_MD
        output.write_text(text)
        print(f"wrote {output}")


if __name__ == "__main__":
    main()
