"""The scenarios: what runs, with how many tasks, and how each one is measured.

Systems under test (each consumer, router and producer is its own process):

* ``asynckarton``: asynckarton consumers (``concurrency_limit`` as listed), asynckarton's
  ``SystemService`` as router, asynckarton's ``Producer.send_tasks`` (batches of 100).
* ``karton-core``: karton-core 5.9.1 sync ``Karton`` consumers (one task at a time per
  process), ``karton-system`` as router, karton-core's sync ``Producer.send_task`` (its
  asyncio producer opens a new S3 client per upload and is slower).
* ``karton-core-asyncio``: ``karton.core.asyncio.Karton`` consumers, ``karton-system``,
  the same producer as karton-core.

Both systems read the same ini: Karton's defaults (log publishing and task tracking on)
except GC, which is off for both (it is periodic, not on the per-task path, and it would
delete the Finished tasks the latency measurement reads).
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from benchmarks._harness import (
    KARTON_SYSTEM,
    Context,
    CountingRedis,
    CpuMeter,
    Processes,
    ScenarioError,
    Worker,
    bind_json,
    cpu_seconds,
    cpu_seconds_exact,
    peak_rss_kib,
    percentile,
    processes,
    producer_result,
    rss_kib,
    scan_deliveries,
    wait_until,
)

AK, KC, KCA = "asynckarton", "karton-core", "karton-core-asyncio"
SYSTEM_LABELS = {
    AK: "asynckarton",
    KC: "karton-core 5.9.1 sync",
    KCA: "karton-core 5.9.1 asyncio",
}
CONSUMER_MODULE = {AK: "ak_consumer", KC: "kc_consumer", KCA: "kca_consumer"}
#: Handlers running at once per consumer process (the sync Karton always runs one).
CONCURRENCY = 64
#: The io scenario's handlers at once (both asyncio systems): its ideal rate,
#: IO_CONCURRENCY / 20 ms, must stay above what either system's CPU allows, or the
#: ratio measures the ideal instead (64 capped asynckarton at 3,200/s while karton-core
#: asyncio reached 1,085-1,233/s on the 2026-11-30 evening machine).
IO_CONCURRENCY = 128
SYNC_IO_PROCESSES = 4  # 2 cores -> 2 processes per core for the sleeping sync consumer
POLL = 0.05  # s between the driver's completion polls


@dataclass
class Result:
    """One scenario run on one system."""

    scenario: str
    system: str
    tasks: int = 0
    deliveries: int = 0
    seconds: float = 0.0
    rate: float = 0.0  # deliveries/s (routed tasks/s, sent tasks/s)
    unit: str = "deliveries/s"
    p50_ms: float | None = None
    p99_ms: float | None = None
    commands: dict[str, int] = field(default_factory=dict)
    per: int = 0  # what commands are divided by (deliveries, routed or sent tasks)
    consumer_rss_kib: int | None = None  # peak (VmHWM), max over consumer processes
    router_rss_kib: int | None = None
    redis_bytes_per_task: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    error: str | None = None

    @property
    def commands_per(self) -> float | None:
        if not self.per or not self.commands:
            return None
        return sum(self.commands.values()) / self.per


@dataclass(frozen=True)
class ConsumerSpec:
    identity: str
    filters: list[dict[str, Any]]
    sleep_ms: float = 0.0
    download: bool = False
    incr: bool = False  # the handler awaits one INCR on its own Redis client


@dataclass(frozen=True)
class E2E:
    """An end-to-end scenario: producer -> router -> running consumers."""

    name: str
    title: str
    headers: dict[str, Any]
    consumers: list[ConsumerSpec]
    counts: dict[str, int]  # full-mode task count per system
    idle_binds: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    resource_bytes: int = 0
    sync_processes: int = 1  # karton-core sync processes per identity
    rate: float = 0.0  # producer: one task at a time at this steady rate (tasks/s)
    start_log: bool = False  # consumers log when each handler starts (latency)
    concurrency: int = CONCURRENCY  # concurrency_limit of the asyncio consumers


# -- scenario definitions -------------------------------------------------------------

PLAIN = E2E(
    name="plain",
    title="plain: header-only tasks, one consumer process",
    headers={"type": "bench-plain"},
    consumers=[ConsumerSpec("bench.plain", [{"type": "bench-plain"}])],
    counts={AK: 15000, KC: 2000, KCA: 2000},
)

FANOUT = E2E(
    name="fanout",
    title="fanout: 5 consumer identities, all matching",
    headers={"type": "bench-fan"},
    consumers=[ConsumerSpec(f"bench.fan-{i}", [{"type": "bench-fan"}]) for i in range(5)],
    counts={AK: 3000, KC: 600},
)


def _bind_filters(i: int) -> list[dict[str, Any]]:
    """20 binds of varied shapes; #0 and #1 match ``{"type": "bench-bind", "kind": "hit"}``."""
    if i == 0:
        return [{"type": "bench-bind", "kind": "hit"}]
    if i == 1:
        return [{"type": "bench-bind", "kind": {"$in": ["hit", "other"]}}]
    if i % 3 == 0:
        return [{"type": f"other-{i}"}, {"type": "bench-bind", "kind": f"k{i}"}]
    if i % 3 == 1:
        return [{"type": "bench-bind", "kind": f"k{i}", "stage": {"$not": "x"}}]
    return [{"type": "bench-bind", "kind": {"$in": [f"a{i}", f"b{i}"]}}]


BIND_IDENTITIES = [f"bench.bind-{i}" for i in range(20)]
BIND_HEADERS = {"type": "bench-bind", "kind": "hit"}

BINDS = E2E(
    name="binds",
    title="binds: 20 bound identities, 2 matching (router-heavy)",
    headers=BIND_HEADERS,
    consumers=[ConsumerSpec(BIND_IDENTITIES[i], _bind_filters(i)) for i in range(2)],
    idle_binds={BIND_IDENTITIES[i]: _bind_filters(i) for i in range(2, 20)},
    counts={AK: 6000, KC: 1000},
)

IO = E2E(
    name="io",
    title=f"io: handler awaits 20 ms, concurrency {IO_CONCURRENCY}",
    headers={"type": "bench-io"},
    consumers=[ConsumerSpec("bench.io", [{"type": "bench-io"}], sleep_ms=20.0)],
    counts={AK: 30000, KCA: 3000, KC: 2000},
    sync_processes=SYNC_IO_PROCESSES,
    concurrency=IO_CONCURRENCY,
)

RESOURCE = E2E(
    name="resource",
    title="resource: a 4 KiB resource per task, downloaded by the consumer",
    headers={"type": "bench-resource"},
    consumers=[ConsumerSpec("bench.resource", [{"type": "bench-resource"}], download=True)],
    counts={AK: 1500, KC: 1000},
    resource_bytes=4096,
)

#: plain-await's task counts: at 2,000 karton-core's run lasted about 1 s on the faster
#: machine of 2026-11-30 evening, and its rate moved from 1,186 to 2,035/s between runs.
AWAIT_COUNTS = {AK: 30000, KC: 5000}

PLAIN_AWAIT = E2E(
    name="plain-await",
    title="plain-await: the handler awaits one INCR on its own Redis client",
    headers={"type": "bench-await"},
    consumers=[ConsumerSpec("bench.await", [{"type": "bench-await"}], incr=True)],
    counts=AWAIT_COUNTS,
)

#: plain-await again with ``[logging] level = WARNING`` for both systems.
PLAIN_AWAIT_WARNING = E2E(
    name="plain-await-warning",
    title="plain-await with [logging] level = WARNING",
    headers={"type": "bench-await"},
    consumers=[ConsumerSpec("bench.await", [{"type": "bench-await"}], incr=True)],
    counts=AWAIT_COUNTS,
)

LATENCY_RATE = 200.0  # tasks/s
LATENCY_SECONDS = 20.0
LATENCY = E2E(
    name="latency",
    title="latency: a steady 200 tasks/s for 20 s, one at a time",
    headers={"type": "bench-latency"},
    consumers=[ConsumerSpec("bench.latency", [{"type": "bench-latency"}])],
    counts={AK: int(LATENCY_RATE * LATENCY_SECONDS), KC: int(LATENCY_RATE * LATENCY_SECONDS)},
    rate=LATENCY_RATE,
    start_log=True,
)

E2E_SCENARIOS = [PLAIN, PLAIN_AWAIT, FANOUT, BINDS, IO, RESOURCE, LATENCY]

#: plain again, with log publishing and task tracking off for both systems.
PLAIN_QUIET = E2E(
    name="plain-quiet",
    title="plain with [logging] enable_publish = 0 and [system] enable_task_tracking = 0",
    headers={"type": "bench-plain"},
    consumers=[ConsumerSpec("bench.plain", [{"type": "bench-plain"}])],
    counts={AK: 15000, KC: 2000},
)


def run_quiet(ctx: Context, spec: E2E, system: str) -> Result:
    with ctx.quiet():
        return run_e2e(ctx, spec, system)


def run_warning(ctx: Context, spec: E2E, system: str) -> Result:
    with ctx.logging_level("WARNING"):
        return run_e2e(ctx, spec, system)


SMOKE_TASKS = 200
SMOKE_LATENCY_SECONDS = 1.0
#: Runs left out of --smoke (every worker kind still runs at least once there).
SMOKE_SKIP = {
    ("fanout", KC), ("binds", KC), ("io", KC), ("pending", KC), ("plain", KCA),
    ("plain-quiet", KC), ("plain-await-warning", KC), ("router", KC),
}  # fmt: skip


def task_count(ctx: Context, counts: dict[str, int], system: str) -> int:
    return SMOKE_TASKS if ctx.smoke else counts[system]


def e2e_task_count(ctx: Context, spec: E2E, system: str) -> int:
    if ctx.smoke and spec.rate:
        return int(spec.rate * SMOKE_LATENCY_SECONDS)
    return task_count(ctx, spec.counts, system)


# -- shared steps ---------------------------------------------------------------------


def start_router(procs: Processes, ctx: Context, system: str) -> Worker:
    if system == AK:
        return procs.python("router", "ak_system", "--config", str(ctx.config_path))
    return procs.spawn("router", [KARTON_SYSTEM, "--config-file", str(ctx.config_path)])


def router_online(client: CountingRedis) -> bool:
    names = [c.get("name") or "" for c in client.raw.client_list()]
    return any(name.startswith("karton.system") for name in names)


def producer_args(
    ctx: Context, system: str, n: int, headers: dict[str, Any], rate: float = 0.0
) -> list[str]:
    common = ["--config", str(ctx.config_path), "--n", str(n), "--headers", json.dumps(headers)]
    if rate:  # one task at a time on a schedule: send_task for every library
        common += ["--rate", str(rate)]
        return (
            ["--lib", "ak", "--api", "send_task", *common]
            if system == AK
            else ["--lib", "kc", *common]
        )
    if system == AK:
        return ["--lib", "ak", "--api", "send_tasks", "--batch", "100", *common]
    return ["--lib", "kc", *common]


def register_idle_binds(client: CountingRedis, binds: dict[str, Any], system: str) -> None:
    for identity, filters in binds.items():
        client.raw.hset("karton.binds", identity, bind_json(filters, is_async=system != KC))


def timeout_for(ctx: Context, n: int, slowest_rate: float) -> float:
    """Hard limit: generous for the expected rate, never unbounded."""
    return (30.0 + n / slowest_rate) * ctx.timeout_scale


# -- end to end -----------------------------------------------------------------------


def run_e2e(ctx: Context, spec: E2E, system: str) -> Result:
    n = e2e_task_count(ctx, spec, system)
    result = Result(spec.name, system, tasks=n)
    client = ctx.client()
    client.flush()
    register_idle_binds(client, spec.idle_binds, system)
    identities = {c.identity for c in spec.consumers}
    expected = n * len(spec.consumers)
    with processes(ctx, f"{spec.name}.{system}") as procs:
        router = start_router(procs, ctx, system)
        consumers = _start_consumers(procs, ctx, spec, system)
        wait_until(
            lambda: identities <= set(client.raw.hkeys("karton.binds")) and router_online(client),
            timeout=60 * ctx.timeout_scale, what="consumers and router to register",
            procs=procs,
        )  # fmt: skip
        time.sleep(0.3)
        s3 = {"s3 server": ctx.s3_pid} if spec.resource_bytes and ctx.s3_pid else {}
        cpu = CpuMeter(client, {"consumers": consumers, "router": [router]}, s3)
        cpu.begin()
        client.reset_stats()
        producer = procs.python(
            "producer", "producer", *producer_args(ctx, system, n, spec.headers, spec.rate),
            *(["--resource-bytes", str(spec.resource_bytes)] if spec.resource_bytes else []),
        )  # fmt: skip

        def consumed() -> int:
            return sum(int(v) for v in client.call("HVALS", "karton.metrics.consumed"))

        wait_until(
            lambda: consumed() >= expected,
            timeout=timeout_for(ctx, expected, 50.0), what=f"{expected} deliveries",
            procs=procs, interval=POLL,
        )  # fmt: skip
        result.extra["net_bytes"] = client.net_bytes()  # (in, out), driver's own left out
        result.commands = client.commandstats()
        result.extra["cpu_seconds"] = cpu.end()
        produced = producer_result(producer, timeout=30)
        if "cpu_seconds" in produced:  # resource runs: the producer's uploads are client CPU
            result.extra["cpu_seconds"]["producer"] = produced["cpu_seconds"]
        elif "send_cpu_seconds" in produced:  # sending only: start-up left out
            result.extra["cpu_seconds"]["producer"] = produced["send_cpu_seconds"]
        result.consumer_rss_kib = max(peak_rss_kib(w.pid) for w in consumers)
        result.router_rss_kib = peak_rss_kib(router.pid)
        found = _collect(client, identities, expected)
    _fill_delivery_result(result, found, expected)
    if spec.start_log:
        starts = _read_starts(ctx, spec.name, system)
        if len(starts) < expected:
            raise ScenarioError(f"only {len(starts)} of {expected} handler starts were logged")
        result.extra["start_p50_ms"] = percentile(starts, 50) * 1000
        result.extra["start_p99_ms"] = percentile(starts, 99) * 1000
    result.extra["producer_rate"] = produced["rate"]
    # Was the producer the bottleneck?  It should finish well before the consumers.
    result.extra["producer_share"] = (produced["t_last"] - found.first_sent) / max(
        found.last_finish - found.first_sent, 1e-9
    )
    return result


def _start_consumers(procs: Processes, ctx: Context, spec: E2E, system: str) -> list[Worker]:
    workers = []
    for consumer in spec.consumers:
        args = [
            "--config", str(ctx.config_path), "--identity", consumer.identity,
            "--filters", json.dumps(consumer.filters), "--sleep-ms", str(consumer.sleep_ms),
            "--concurrency", str(spec.concurrency if system != KC else 1),
        ]  # fmt: skip
        if consumer.download:
            args.append("--download")
        if consumer.incr:
            args += ["--incr-url", ctx.redis_url]
        if spec.start_log:
            args += ["--start-log", str(_start_log(ctx, spec.name, system, consumer.identity))]
        replicas = spec.sync_processes if system == KC else 1
        for replica in range(replicas):
            name = f"consumer.{consumer.identity}.{replica}"
            workers.append(procs.python(name, CONSUMER_MODULE[system], *args))
    return workers


def _start_log(ctx: Context, scenario: str, system: str, identity: str) -> Path:
    return ctx.workdir / f"{scenario}.{system}.{identity}.starts"


def _read_starts(ctx: Context, scenario: str, system: str) -> list[float]:
    """Send-to-handler-start latencies (s) the consumers of one run logged."""
    latencies: list[float] = []
    for path in ctx.workdir.glob(f"{scenario}.{system}.*.starts"):
        for line in path.read_text().splitlines():
            sent, start = line.split()
            latencies.append(float(start) - float(sent))
    return latencies


def _collect(client: CountingRedis, identities: set[str], expected: int) -> Any:
    """Scan Finished copies; a consumer may still be writing its last status, so retry."""
    deadline = time.monotonic() + 5
    while True:
        found = scan_deliveries(client, identities)
        if found.finished + found.crashed >= expected or time.monotonic() > deadline:
            return found
        time.sleep(0.2)


def _fill_delivery_result(result: Result, found: Any, expected: int) -> None:
    if found.crashed:
        raise ScenarioError(f"{found.crashed} deliveries crashed")
    if found.finished < expected:
        raise ScenarioError(f"only {found.finished} of {expected} deliveries are Finished")
    result.deliveries = found.finished
    result.per = found.finished
    result.seconds = found.last_finish - found.first_sent
    result.rate = found.finished / max(result.seconds, 1e-9)
    result.p50_ms = percentile(found.latencies, 50) * 1000
    result.p99_ms = percentile(found.latencies, 99) * 1000


# -- router only ----------------------------------------------------------------------

ROUTER_COUNTS = {AK: 30000, KC: 4000}


def run_router_only(ctx: Context, system: str) -> Result:
    """Pre-fill karton.tasks, then time the router alone (20 binds, 2 matching)."""
    n = task_count(ctx, ROUTER_COUNTS, system)
    result = Result("router", system, tasks=n, unit="routed tasks/s")
    client = ctx.client()
    client.flush()
    register_idle_binds(
        client, {i: _bind_filters(k) for k, i in enumerate(BIND_IDENTITIES)}, system
    )
    matching = [f"karton.queue.normal:{BIND_IDENTITIES[i]}" for i in range(2)]
    with processes(ctx, f"router.{system}") as procs:
        before = _settled_memory(client)
        producer = procs.python(
            "producer", "producer", *producer_args(ctx, system, n, BIND_HEADERS)
        )
        producer_result(producer, timeout=timeout_for(ctx, n, 200.0))
        unrouted = _settled_memory(client)
        if int(client.raw.llen("karton.tasks")) != n:
            raise ScenarioError("karton.tasks does not hold every produced task")
        client.reset_stats()
        redis_cpu = client.cpu_seconds()
        router = start_router(procs, ctx, system)
        last_poll, started = time.time(), 0.0

        def drained() -> bool:
            nonlocal last_poll, started
            now = time.time()
            left, *queued = client.pipeline_calls(
                [("LLEN", "karton.tasks")] + [("LLEN", q) for q in matching]
            )
            if not started and int(left) < n:
                started = (last_poll + now) / 2
            last_poll = now
            return int(left) == 0 and sum(map(int, queued)) >= 2 * n

        wait_until(drained, timeout=timeout_for(ctx, n, 100.0), what="the router to drain",
                   procs=procs, interval=0.02)  # fmt: skip
        finished = (last_poll + time.time()) / 2
        result.commands = client.commandstats()
        result.router_rss_kib = peak_rss_kib(router.pid)
        result.extra["cpu_seconds"] = {
            "router (incl. start-up)": cpu_seconds(router.pid),
            "redis": client.cpu_seconds() - redis_cpu,
        }
        routed = _settled_memory(client)
    result.deliveries = result.per = n
    result.seconds = finished - started
    result.rate = n / max(result.seconds, 1e-9)
    result.redis_bytes_per_task = (routed - before) / n
    result.extra["copies_per_s"] = 2 * result.rate
    result.extra["unrouted_bytes_per_task"] = (unrouted - before) / n
    return result


def _settled_memory(client: CountingRedis) -> int:
    time.sleep(0.3)
    return client.used_memory()


# -- pending-task memory --------------------------------------------------------------

PENDING_COUNTS = {AK: 10000, KC: 10000}


def run_pending(ctx: Context, system: str) -> Result:
    """Redis bytes per task waiting in one consumer's queue (consumer not running)."""
    n = task_count(ctx, PENDING_COUNTS, system)
    result = Result("pending", system, tasks=n, unit="")
    client = ctx.client()
    client.flush()
    register_idle_binds(client, {"bench.pending": [{"type": "bench-pending"}]}, system)
    queue = "karton.queue.normal:bench.pending"
    with processes(ctx, f"pending.{system}") as procs:
        start_router(procs, ctx, system)
        wait_until(lambda: router_online(client), timeout=60, what="the router", procs=procs)
        before = _settled_memory(client)
        producer = procs.python(
            "producer", "producer", *producer_args(ctx, system, n, {"type": "bench-pending"})
        )
        producer_result(producer, timeout=timeout_for(ctx, n, 200.0))
        wait_until(lambda: int(client.raw.llen(queue)) >= n, timeout=timeout_for(ctx, n, 100.0),
                   what="the queue to fill", procs=procs)  # fmt: skip
        after = _settled_memory(client)
    result.tasks = result.deliveries = n
    result.redis_bytes_per_task = (after - before) / n
    return result


# -- producer only --------------------------------------------------------------------

PRODUCER_RUNS: list[tuple[str, str, list[str], int]] = [
    # (label, system, producer arguments, full-mode count)
    ("ak send_task", AK, ["--lib", "ak", "--api", "send_task"], 15000),
    ("ak send_tasks(100)", AK, ["--lib", "ak", "--api", "send_tasks", "--batch", "100"], 150000),
    ("kc send_task", KC, ["--lib", "kc"], 15000),
    ("kca send_task", KCA, ["--lib", "kca"], 10000),
]


def run_producer_only(ctx: Context, label: str, system: str, args: list[str], n: int) -> Result:
    n = SMOKE_TASKS if ctx.smoke else n
    result = Result("producer", system, tasks=n, unit="tasks/s")
    result.extra["api"] = label
    client = ctx.client()
    client.flush()
    with processes(ctx, f"producer.{label.replace(' ', '_')}") as procs:
        client.reset_stats()
        worker = procs.python(
            "producer", "producer", *args, "--config", str(ctx.config_path), "--n", str(n),
            "--headers", json.dumps({"type": "bench-producer"}),
        )  # fmt: skip
        produced = producer_result(worker, timeout=timeout_for(ctx, n, 200.0))
        result.commands = client.commandstats()
    result.deliveries = result.per = n
    result.seconds = produced["t_last"] - produced["t_first"]
    result.rate = produced["rate"]
    return result


# -- soak -----------------------------------------------------------------------------

SOAK_TASKS = 100_000
SOAK_SMOKE_TASKS = 2000
SOAK_SAMPLES = 40
SOAK_WINDOW = 5000


def run_soak(ctx: Context) -> Result:
    """100,000 tasks through asynckarton's router and one consumer; RSS sampled evenly.

    The consumer's handler is plain-await's (one INCR on its own Redis client): a handler
    that suspends, so the soak covers the path real handlers take.
    """
    n = SOAK_SMOKE_TASKS if ctx.smoke else SOAK_TASKS
    step = max(1, n // SOAK_SAMPLES)
    result = Result("soak", AK, tasks=n)
    client = ctx.client()
    client.flush()
    spec = ConsumerSpec("bench.soak", [{"type": "bench-soak"}], incr=True)
    samples: list[tuple[int, int, int]] = []  # consumed, consumer RSS KiB, router RSS KiB
    with processes(ctx, "soak") as procs:
        router = start_router(procs, ctx, AK)
        soak = E2E("soak", "", {}, [spec], {})
        (consumer,) = _start_consumers(procs, ctx, soak, AK)
        wait_until(
            lambda: "bench.soak" in client.raw.hkeys("karton.binds") and router_online(client),
            timeout=60, what="consumer and router", procs=procs,
        )  # fmt: skip
        procs.python(
            "producer", "producer", *producer_args(ctx, AK, n, {"type": "bench-soak"}),
            "--window", str(SOAK_WINDOW), "--watch", "bench.soak", "--redis-url", ctx.redis_url,
        )  # fmt: skip
        started = time.time()

        def sample() -> bool:
            done = int(client.raw.hget("karton.metrics.consumed", "bench.soak") or 0)
            if done >= (len(samples) + 1) * step:
                samples.append((done, rss_kib(consumer.pid), rss_kib(router.pid)))
            return done >= n

        wait_until(sample, timeout=timeout_for(ctx, n, 300.0), what=f"{n} soak deliveries",
                   procs=procs, interval=POLL)  # fmt: skip
        elapsed = time.time() - started
        result.consumer_rss_kib = peak_rss_kib(consumer.pid)
        result.router_rss_kib = peak_rss_kib(router.pid)
    result.deliveries = n
    result.seconds = elapsed
    result.rate = n / elapsed
    result.extra["samples"] = samples
    result.extra["consumer_growth"] = quartile_growth([s[1] for s in samples])
    result.extra["router_growth"] = quartile_growth([s[2] for s in samples])
    return result


def quartile_growth(values: list[int]) -> dict[str, float]:
    """Median of the last quartile of samples minus the median of the first (KiB)."""
    if len(values) < 4:
        return {"first": float("nan"), "last": float("nan"), "growth": float("nan")}
    q = len(values) // 4
    first = statistics.median(values[:q])
    last = statistics.median(values[-q:])
    return {"first": first, "last": last, "growth": last - first}


# -- idle -------------------------------------------------------------------------------

IDLE_SECONDS = 60.0
IDLE_SMOKE_SECONDS = 2.0
IDLE_SETTLE = 3.0  # s after registration before the meter starts (start-up work is over)


def run_idle(ctx: Context) -> list[Result]:
    """CPU of an idle consumer and an idle router of both systems, side by side.

    All four processes run at once against one Redis with no task sent, so both systems
    see the same machine; each system's consumer has its own identity and its own router
    (GC off, as everywhere).  CPU is read from /proc over the same window.
    """
    seconds = IDLE_SMOKE_SECONDS if ctx.smoke else IDLE_SECONDS
    client = ctx.client()
    client.flush()
    specs = {system: ConsumerSpec(f"bench.idle-{system}", [{"type": "bench-idle"}])
             for system in (AK, KC)}  # fmt: skip
    with processes(ctx, "idle") as procs:
        routers: dict[str, Worker] = {}
        consumers: dict[str, Worker] = {}
        for system, spec in specs.items():
            routers[system] = start_router(procs, ctx, system)
            idle = E2E("idle", "", {}, [spec], {})
            (consumers[system],) = _start_consumers(procs, ctx, idle, system)
        wanted = {spec.identity for spec in specs.values()}

        def ready() -> bool:
            names = [c.get("name") or "" for c in client.raw.client_list()]
            routers_up = sum(name.startswith("karton.system") for name in names)
            return wanted <= set(client.raw.hkeys("karton.binds")) and routers_up >= 2

        wait_until(ready, timeout=60 * ctx.timeout_scale, what="idle services", procs=procs)
        time.sleep(1.0 if ctx.smoke else IDLE_SETTLE)
        meter = {name: cpu_seconds_exact(w.pid) for name, w in _idle_workers(routers, consumers)}
        started = time.monotonic()
        time.sleep(seconds)
        procs.check()
        elapsed = time.monotonic() - started
        used = {
            name: cpu_seconds_exact(w.pid) - meter[name]
            for name, w in _idle_workers(routers, consumers)
        }
    results = []
    for system in (AK, KC):
        result = Result("idle", system, unit="% CPU, consumer")
        result.seconds = elapsed
        result.rate = 100 * used[f"{system} consumer"] / elapsed
        result.extra["system_cpu_pct"] = 100 * used[f"{system} router"] / elapsed
        results.append(result)
    return results


def _idle_workers(
    routers: dict[str, Worker], consumers: dict[str, Worker]
) -> list[tuple[str, Worker]]:
    return [(f"{s} router", w) for s, w in routers.items()] + [
        (f"{s} consumer", w) for s, w in consumers.items()
    ]


# -- keys: running concurrency on a header with 100 values (concurrency control) -----

KEYS = E2E(
    name="keys",
    title="keys: plain with running_concurrency = keys on headers.key (100 values), rerouted",
    headers={"type": "bench-keys"},
    consumers=[ConsumerSpec("bench.keys", [{"type": "bench-keys"}])],
    counts={AK: 15000},
)
KEYS_INI = (
    "[karton]\nrunning_concurrency = keys\nkey_arguments = headers.key\n"
    "reroute_on_concurrency_control = 1\n"
)


def run_keys(ctx: Context, system: str = AK) -> Result:
    """run_e2e's measurement, with the keyed producer and the policy in the ini."""
    n = task_count(ctx, KEYS.counts, system)
    result = Result(KEYS.name, system, tasks=n)
    client = ctx.client()
    client.flush()
    ctx.config_path.write_text(ctx.config_path.read_text() + KEYS_INI)
    try:
        with processes(ctx, f"keys.{system}") as procs:
            router = start_router(procs, ctx, system)
            consumers = _start_consumers(procs, ctx, KEYS, system)
            wait_until(lambda: "bench.keys" in client.raw.hkeys("karton.binds")
                       and router_online(client), timeout=60 * ctx.timeout_scale,
                       what="consumer and router to register", procs=procs)  # fmt: skip
            time.sleep(0.3)
            cpu = CpuMeter(client, {"consumers": consumers, "router": [router]}, {})
            cpu.begin()
            client.reset_stats()
            producer = procs.spawn("producer", [sys.executable, "-m",
                                   "benchmarks._workers.keys_producer", "--config",
                                   str(ctx.config_path), "--n", str(n), "--keys", "100"],
                                   finite=True)  # fmt: skip
            wait_until(lambda: int(client.raw.hget("karton.metrics.consumed", "bench.keys")
                                   or 0) >= n, timeout=timeout_for(ctx, n, 50.0),
                       what=f"{n} deliveries", procs=procs, interval=POLL)  # fmt: skip
            result.commands = client.commandstats()
            result.extra["cpu_seconds"] = cpu.end()
            produced = producer_result(producer, timeout=30)
            result.consumer_rss_kib = max(peak_rss_kib(w.pid) for w in consumers)
            result.extra["concurrency"] = client.raw.hgetall("asynckarton.concurrency:bench.keys")
            found = _collect(client, {"bench.keys"}, n)
    finally:
        ctx.write_config()
    _fill_delivery_result(result, found, n)
    result.extra["producer_rate"] = produced["rate"]
    return result


# -- the plan -------------------------------------------------------------------------


@dataclass(frozen=True)
class Step:
    scenario: str
    system: str
    run: Callable[[Context], Result | list[Result]]


def plan(only: set[str] | None = None, *, smoke: bool = False) -> list[Step]:
    """Every (scenario, system) run, in order."""
    steps: list[Step] = []
    for spec in E2E_SCENARIOS:
        for system in spec.counts:
            steps.append(Step(spec.name, system, partial(run_e2e, spec=spec, system=system)))
    for system in PLAIN_AWAIT_WARNING.counts:
        run = partial(run_warning, spec=PLAIN_AWAIT_WARNING, system=system)
        steps.append(Step("plain-await-warning", system, run))
    for system in PLAIN_QUIET.counts:
        steps.append(
            Step("plain-quiet", system, partial(run_quiet, spec=PLAIN_QUIET, system=system))
        )
    for system in ROUTER_COUNTS:
        steps.append(Step("router", system, partial(run_router_only, system=system)))
    for label, system, args, count in PRODUCER_RUNS:
        run = partial(run_producer_only, label=label, system=system, args=args, n=count)
        steps.append(Step("producer", system, run))
    for system in PENDING_COUNTS:
        steps.append(Step("pending", system, partial(run_pending, system=system)))
    steps.append(Step("idle", f"{AK} + {KC}", run_idle))
    steps.append(Step("soak", AK, run_soak))
    steps.append(Step("keys", AK, run_keys))  # concurrency control
    if only:
        steps = [s for s in steps if s.scenario in only]
    if smoke:
        steps = [s for s in steps if (s.scenario, s.system) not in SMOKE_SKIP]
    return steps
