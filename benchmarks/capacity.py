"""Where one Redis saturates for asynckarton's traffic: ``python -m benchmarks.capacity``.

Starts its own redis-server and SeaweedFS S3 server (the routers check the bucket; the
tasks carry no resource) on free loopback ports and runs, all asynckarton, every process its own (``benchmarks/_workers``):

1. **Load steps.**  Header-only tasks with Karton's defaults (log publishing and task
   tracking on, GC off), sent by ``send_tasks`` in batches of 100 (paced, or as fast as
   possible), routed by one or two ``SystemService`` processes, consumed by one to three
   consumer processes of one identity (``concurrency_limit = 64``).  Per step: deliveries/s,
   redis-server's CPU as a share of one core (``/proc/<pid>/stat``, while tasks flow), CPU
   microseconds per delivery of producer, router, consumer and Redis, Redis commands and
   network bytes per delivery, and an exact count (every task delivered exactly once).
2. **Saturation.**  redis-server runs one thread: it saturates when its CPU reaches one
   core.  The steps give Redis's CPU share against the delivery rate; a least-squares line
   through them, extended to 100 %, is the saturation rate (and ``1 core / Redis CPU per
   delivery`` of the fastest step beside it).  On a small machine the clients need several
   times Redis's CPU, so Redis cannot be driven to 100 % here: the line is the estimate,
   its fit over the steps is the check.
3. **Two routers.**  ``karton.tasks`` is filled with N tasks (20 binds, 2 matching), then
   one and then two routers (GC off) drain it: routed tasks/s, and whether every task was
   routed exactly once (both queues hold exactly N uids, N distinct, 3N task documents).
4. **Memory.**  Redis ``used_memory`` per delivered task kept until the GC's next pass
   (original and copy, both Finished), and what stays once a real GC pass (a GC-only ``SystemService``) has deleted them, with
   that pass's CPU per delivery.

Writes ``benchmarks/CAPACITY.md`` (``--output``); ``--smoke`` runs tiny steps and writes
nothing unless ``--output`` is given.  Bounded: about 2.5 minutes in full mode.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import shlex
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from benchmarks import report
from benchmarks._harness import (
    Context,
    CountingRedis,
    CpuMeter,
    Processes,
    ScenarioError,
    Worker,
    cpu_seconds,
    processes,
    producer_result,
    scan_deliveries,
    wait_until,
)
from benchmarks._servers import servers
from benchmarks.scenarios import (
    AK,
    BIND_HEADERS,
    BIND_IDENTITIES,
    CONCURRENCY,
    _bind_filters,
    register_idle_binds,
)

HERE = Path(__file__).resolve().parent
IDENTITY = "bench.capacity"
HEADERS = {"type": "bench-capacity"}
FILTERS = [HEADERS]
#: Utilisation a process (or Redis) is sized for: queues stay short below it.
HEADROOM = 0.7
GC_INTERVAL = 180.0  # [system] gc_interval default: Finished tasks live until the next pass
GC_METRIC = "karton.metrics.garbage-collected"
GC_FIRST_PASS = 3  # s: the measured GC process's gc_interval (its first pass comes after it)
TARGETS = (1_000, 10_000, 100_000)  # deliveries/s of the deployment table


@dataclass(frozen=True)
class LoadStep:
    """One load level: process counts and the total paced rate (0: as fast as possible)."""

    producers: int
    routers: int
    consumers: int
    rate: float
    tasks: int

    @property
    def label(self) -> str:
        pace = f"{self.rate:,.0f}/s" if self.rate else "max"
        return f"{self.producers}p {self.routers}r {self.consumers}c, {pace}"


FULL_STEPS = [
    LoadStep(1, 1, 1, 1000.0, 6000),
    LoadStep(1, 1, 1, 2000.0, 12000),
    LoadStep(1, 1, 1, 4000.0, 20000),
    LoadStep(1, 1, 1, 0.0, 30000),
    LoadStep(2, 1, 2, 0.0, 30000),
    LoadStep(2, 2, 2, 0.0, 30000),
    LoadStep(2, 2, 3, 0.0, 30000),
]
SMOKE_STEPS = [LoadStep(1, 1, 1, 1000.0, 500), LoadStep(2, 2, 2, 0.0, 1000)]
ROUTE_TASKS = {False: 40000, True: 2000}  # by smoke
#: One router, two, then both again: the machine is shared, the best of each is compared.
ROUTE_ORDER = {False: (1, 2, 1, 2), True: (1, 2)}


@dataclass
class StepResult:
    step: LoadStep
    deliveries: int = 0
    rate: float = 0.0
    redis_share: float = 0.0  # of one core, while tasks flowed
    redis_peak: float = 0.0  # highest 1 s window
    cpu_us: dict[str, float] = field(default_factory=dict)  # per delivery, by role
    commands: float = 0.0  # per delivery
    net_in: float = 0.0  # bytes per delivery
    net_out: float = 0.0
    finished_bytes: float | None = None  # used_memory per delivery kept until GC
    residual_bytes: float | None = None  # after the GC deleted the Finished tasks
    residual_keys: dict[str, int] = field(default_factory=dict)
    gc: dict[str, float] = field(default_factory=dict)  # one GC pass, per delivery


@dataclass
class RouteResult:
    routers: int
    tasks: int
    seconds: float
    rate: float
    router_cpu_us: float  # per routed task, all routers (start-up included)
    redis_cpu_us: float
    exact: str


# -- load steps -----------------------------------------------------------------------


def _start_routers(procs: Processes, ctx: Context, count: int) -> list[Worker]:
    return [
        procs.python(f"router.{i}", "ak_system", "--config", str(ctx.config_path))
        for i in range(count)
    ]


def _routers_online(client: CountingRedis) -> int:
    return sum((c.get("name") or "").startswith("karton.system") for c in client.raw.client_list())


def _start_consumers(procs: Processes, ctx: Context, count: int) -> list[Worker]:
    args = [
        "--config", str(ctx.config_path), "--identity", IDENTITY, "--filters",
        json.dumps(FILTERS), "--concurrency", str(CONCURRENCY),
    ]  # fmt: skip
    return [procs.python(f"consumer.{i}", "ak_consumer", *args) for i in range(count)]


def _consumer_connections(client: CountingRedis) -> int:
    return sum(IDENTITY in (c.get("name") or "") for c in client.raw.client_list())


def _settled_memory(client: CountingRedis) -> int:
    time.sleep(0.5)
    return client.used_memory()


def _task_documents(client: CountingRedis) -> int:
    return sum(1 for _ in client.raw.scan_iter(match="karton.task:*", count=5000))


def _key_kinds(client: CountingRedis) -> dict[str, int]:
    """Keys by name up to the first ``:`` (what stays once the GC has run)."""
    kinds: dict[str, int] = {}
    for key in client.raw.scan_iter(count=5000):
        kind = str(key).split(":", 1)[0]
        kinds[kind] = kinds.get(kind, 0) + 1
    return dict(sorted(kinds.items(), key=lambda item: -item[1]))


def run_gc(procs: Processes, ctx: Context, client: CountingRedis, n: int) -> dict[str, float]:
    """One real GC pass (a GC-only SystemService) over n delivered tasks; CPU per task."""
    ini = ctx.workdir / "gc.ini"
    text = ctx.config_path.read_text().replace(
        "enable_gc = 0\n", f"enable_gc = 1\nenable_router = 0\ngc_interval = {GC_FIRST_PASS}\n"
    )
    ini.write_text(text)
    documents = _task_documents(client)
    online = _routers_online(client)
    idle_cpu, idle_start = client.cpu_seconds(), time.monotonic()
    time.sleep(1.0)  # Redis's CPU with everything idle, subtracted from the pass
    idle_rate = (client.cpu_seconds() - idle_cpu) / (time.monotonic() - idle_start)
    gc = procs.python("gc", "ak_system", "--config", str(ini))
    wait_until(lambda: _routers_online(client) > online, timeout=30 * ctx.timeout_scale,
               what="the GC process", procs=procs)  # fmt: skip
    gc_cpu, redis_cpu = cpu_seconds(gc.pid), client.cpu_seconds()  # before its first pass
    started = time.monotonic()

    def collected() -> bool:  # the GC adds its count once it has gone through every task
        return sum(int(v) for v in client.raw.hvals(GC_METRIC)) >= documents

    wait_until(collected, timeout=(60 + n / 500) * ctx.timeout_scale,
               what="the GC to delete the Finished tasks", procs=procs, interval=0.1)  # fmt: skip
    elapsed = time.monotonic() - started
    redis_used = client.cpu_seconds() - redis_cpu - idle_rate * elapsed
    gc_used = cpu_seconds(gc.pid) - gc_cpu
    left = _task_documents(client)
    if left:
        raise ScenarioError(f"the GC pass left {left} of {documents} task documents")
    return {
        "documents": documents,
        "gc_us": gc_used * 1e6 / n,
        "redis_us": redis_used * 1e6 / n,
        "seconds": elapsed - GC_FIRST_PASS,  # the pass itself, roughly
    }


def run_step(ctx: Context, redis_pid: int, step: LoadStep, *, memory: bool) -> StepResult:
    """One load step; with ``memory``, also the memory kept until GC and one GC pass."""
    client = ctx.client()
    client.flush()
    result = StepResult(step)
    n = step.tasks
    with processes(ctx, f"capacity.{step.producers}p{step.routers}r{step.consumers}c") as procs:
        routers = _start_routers(procs, ctx, step.routers)
        consumers = _start_consumers(procs, ctx, step.consumers)
        wait_until(
            lambda: IDENTITY in client.raw.hkeys("karton.binds")
            and _routers_online(client) >= step.routers
            and _consumer_connections(client) >= step.consumers,
            timeout=60 * ctx.timeout_scale, what="consumers and routers to register",
            procs=procs,
        )  # fmt: skip
        time.sleep(0.5)
        before = _settled_memory(client) if memory else 0
        meter = CpuMeter(client, {"consumers": consumers, "router": routers})
        meter.begin()
        client.reset_stats()
        producers = _start_producers(procs, ctx, step)
        samples: list[tuple[float, float]] = []  # (wall, redis CPU s) while tasks flow

        def done() -> bool:
            consumed = sum(int(v) for v in client.call("HVALS", "karton.metrics.consumed"))
            if consumed:
                samples.append((time.monotonic(), cpu_seconds(redis_pid)))
            return consumed >= n

        wait_until(done, timeout=(60 + n / 200) * ctx.timeout_scale,
                   what=f"{n} deliveries", procs=procs, interval=0.05)  # fmt: skip
        net_in, net_out = client.net_bytes()
        commands = client.commandstats()
        cpu = meter.end()
        sent_cpu = sum(
            producer_result(p, timeout=30).get("send_cpu_seconds", 0.0) for p in producers
        )
        found = scan_deliveries(client, {IDENTITY})
        time.sleep(0.3)
        consumed = sum(int(v) for v in client.raw.hvals("karton.metrics.consumed"))
        if found.finished != n or consumed != n or found.crashed:
            raise ScenarioError(
                f"{step.label}: {found.finished} Finished, {found.crashed} Crashed, "
                f"{consumed} consumed, {n} sent: not exactly once"
            )
        if memory:
            after = _settled_memory(client)
            result.gc = run_gc(procs, ctx, client, n)
            residual = _settled_memory(client)
            result.finished_bytes = (after - before) / n
            result.residual_bytes = (residual - before) / n
            result.residual_keys = _key_kinds(client)
    result.deliveries = n
    result.rate = n / max(found.last_finish - found.first_sent, 1e-9)
    result.cpu_us = {
        "producer": sent_cpu * 1e6 / n,
        "router": cpu["router"] * 1e6 / n,
        "consumer": cpu["consumers"] * 1e6 / n,
        "redis": cpu["redis"] * 1e6 / n,
    }
    result.commands = sum(commands.values()) / n
    result.net_in, result.net_out = net_in / n, net_out / n
    result.redis_share, result.redis_peak = _redis_shares(samples)
    return result


def _start_producers(procs: Processes, ctx: Context, step: LoadStep) -> list[Worker]:
    """``step.producers`` producers sharing ``step.tasks`` (and the paced rate) evenly."""
    workers = []
    share = step.tasks // step.producers
    for i in range(step.producers):
        count = share if i else step.tasks - share * (step.producers - 1)
        args = [
            "--lib", "ak", "--api", "send_tasks", "--batch", "100", "--config",
            str(ctx.config_path), "--n", str(count), "--headers", json.dumps(HEADERS),
            "--identity", f"bench.capacity-producer-{i}",
        ]  # fmt: skip
        if step.rate:
            args += ["--rate", str(step.rate / step.producers)]
        workers.append(procs.python(f"producer.{i}", "producer", *args))
    return workers


def _redis_shares(samples: Sequence[tuple[float, float]]) -> tuple[float, float]:
    """Redis CPU share while tasks flowed, and over the busiest 1 s window."""
    if len(samples) < 2:
        return 0.0, 0.0
    (t0, c0), (t1, c1) = samples[0], samples[-1]
    average = (c1 - c0) / max(t1 - t0, 1e-9)
    peak, j = 0.0, 0
    for i in range(len(samples)):
        while j < len(samples) and samples[j][0] - samples[i][0] < 1.0:
            j += 1
        if j == len(samples):
            break
        (ta, ca), (tb, cb) = samples[i], samples[j]
        peak = max(peak, (cb - ca) / (tb - ta))
    return average, max(peak, average)


# -- two routers ----------------------------------------------------------------------


def run_routing(ctx: Context, routers: int) -> RouteResult:
    """Fill karton.tasks, then time ``routers`` routers draining it; check exactly once."""
    n = ROUTE_TASKS[ctx.smoke]
    client = ctx.client()
    client.flush()
    register_idle_binds(
        client, {ident: _bind_filters(k) for k, ident in enumerate(BIND_IDENTITIES)}, AK
    )
    queues = [f"karton.queue.normal:{BIND_IDENTITIES[i]}" for i in range(2)]
    with processes(ctx, f"capacity.route{routers}") as procs:
        producer = procs.python(
            "producer", "producer", "--lib", "ak", "--api", "send_tasks", "--batch", "100",
            "--config", str(ctx.config_path), "--n", str(n), "--headers",
            json.dumps(BIND_HEADERS),
        )  # fmt: skip
        producer_result(producer, timeout=60 + n / 200)
        if int(client.raw.llen("karton.tasks")) != n:
            raise ScenarioError("karton.tasks does not hold every produced task")
        redis_cpu = client.cpu_seconds()
        workers = _start_routers(procs, ctx, routers)
        started = 0.0

        def drained() -> bool:
            nonlocal started
            left, *queued = client.pipeline_calls(
                [("LLEN", "karton.tasks")] + [("LLEN", q) for q in queues]
            )
            if not started and int(left) < n:
                started = time.monotonic()
            return int(left) == 0 and sum(map(int, queued)) >= 2 * n

        wait_until(drained, timeout=60 + n / 100, what="the routers to drain", procs=procs,
                   interval=0.02)  # fmt: skip
        finished = time.monotonic()
        router_cpu = sum(cpu_seconds(w.pid) for w in workers)
        redis_used = client.cpu_seconds() - redis_cpu
        time.sleep(0.5)  # anything routed twice would land by now
        exact = _exactly_once(client, queues, n)
    seconds = finished - started
    return RouteResult(
        routers, n, seconds, n / max(seconds, 1e-9), router_cpu * 1e6 / n,
        redis_used * 1e6 / n, exact,
    )  # fmt: skip


def _exactly_once(client: CountingRedis, queues: Sequence[str], n: int) -> str:
    """'yes' when each queue holds n distinct uids and Redis holds 3n task documents."""
    lengths = [int(client.raw.llen(q)) for q in queues]
    distinct = [len(set(client.raw.lrange(q, 0, -1))) for q in queues]
    documents = sum(1 for _ in client.raw.scan_iter(match="karton.task:*", count=5000))
    if lengths == [n, n] and distinct == [n, n] and documents == 3 * n:
        return "yes"
    return f"NO: queues {lengths}, distinct {distinct}, {documents} task documents"


# -- the model ------------------------------------------------------------------------


@dataclass
class Model:
    """A least-squares line: Redis share of a core = intercept + slope * deliveries/s."""

    intercept: float
    slope: float
    r2: float

    @property
    def saturation(self) -> float:
        return (1.0 - self.intercept) / self.slope if self.slope > 0 else math.inf


def fit(points: Sequence[tuple[float, float]]) -> Model:
    n = len(points)
    mx = sum(x for x, _ in points) / n
    my = sum(y for _, y in points) / n
    sxx = sum((x - mx) ** 2 for x, _ in points)
    sxy = sum((x - mx) * (y - my) for x, y in points)
    slope = sxy / sxx if sxx else 0.0
    intercept = my - slope * mx
    ss_tot = sum((y - my) ** 2 for _, y in points)
    ss_res = sum((y - intercept - slope * x) ** 2 for x, y in points)
    return Model(intercept, slope, 1 - ss_res / ss_tot if ss_tot else 1.0)


def deployment(
    per: dict[str, float], gc: dict[str, float], finished_bytes: float
) -> list[list[str]]:
    """Processes and Redis for each target rate, framework CPU only (handlers cost 0)."""
    rows = []
    for target in TARGETS:

        def procs(us: float, target: int = target) -> str:
            return f"{math.ceil(target * us / 1e6 / HEADROOM):,}"

        redis_cores = target * (per["redis"] + gc["redis_us"]) / 1e6
        gc_share = target * gc["gc_us"] / 1e6
        memory_mib = target * GC_INTERVAL * finished_bytes / 2**20
        rows.append([
            f"{target:,}", procs(per["producer"]), procs(per["router"]), procs(per["consumer"]),
            f"{gc_share:.2f}{'' if gc_share <= HEADROOM else ' (over one core!)'}",
            f"{redis_cores:.2f}", f"{math.ceil(redis_cores / HEADROOM)}",
            f"{memory_mib:,.0f} MiB",
        ])  # fmt: skip
    return rows


# -- report ---------------------------------------------------------------------------


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    return [
        "| " + " | ".join(header) + " |",
        "|" + "|".join("---" if i == 0 else "--:" for i in range(len(header))) + "|",
        *["| " + " | ".join(row) + " |" for row in rows],
    ]


def render(
    command: str, started: str, took: float, steps: Sequence[StepResult],
    routes: Sequence[RouteResult], conditions: dict[str, str],
) -> str:  # fmt: skip
    model = fit([(s.rate, s.redis_share) for s in steps])
    fastest = max(steps, key=lambda s: s.rate)
    direct = 1e6 / fastest.cpu_us["redis"]
    client_us = sum(fastest.cpu_us[k] for k in ("producer", "router", "consumer"))
    memory = next(s for s in steps if s.finished_bytes is not None)
    assert memory.finished_bytes is not None and memory.residual_bytes is not None
    gc = memory.gc
    step_rows = [
        [
            s.step.label, f"{s.rate:,.0f}", f"{100 * s.redis_share:.0f}%",
            f"{100 * s.redis_peak:.0f}%", f"{s.cpu_us['producer']:,.0f}",
            f"{s.cpu_us['router']:,.0f}", f"{s.cpu_us['consumer']:,.0f}",
            f"{s.cpu_us['redis']:,.1f}", f"{s.commands:.2f}", f"{s.net_in:,.0f}",
            f"{s.net_out:,.0f}",
        ]
        for s in steps
    ]  # fmt: skip
    route_rows = [
        [f"{r.routers}", f"{r.tasks:,}", f"{r.rate:,.0f}", f"{r.router_cpu_us:,.0f}",
         f"{r.redis_cpu_us:,.1f}", r.exact]
        for r in routes
    ]  # fmt: skip
    best = {count: max(r.rate for r in routes if r.routers == count) for count in (1, 2)}
    scale = best[2] / best[1]
    out = [
        "# asynckarton capacity: where one Redis saturates",
        "",
        f"Command: `{command}`  ",
        (
            f"Started {started}; took {took:.0f} s. Produced by `benchmarks/capacity.py`; "
            "nothing is hand-edited. The model built on it: [docs/capacity.md]"
            "(../docs/capacity.md)."
        ),
        "",
        "## Figures",
        "",
        (
            f"- single Redis saturates at: {_round(direct)} deliveries/s (one core / Redis CPU "
            f"per delivery of the fastest step)"
        ),
        (
            f"- line through the steps reaches one core at: {_round(model.saturation)} "
            f"deliveries/s (R² {model.r2:.2f}; an upper bound: per-delivery cost falls with load)"
        ),
        (
            f"- with one GC pass per delivery added to Redis's CPU: "
            f"{_round(1e6 / (fastest.cpu_us['redis'] + gc['redis_us']))} deliveries/s"
        ),
        f"- Redis CPU per delivery (fastest step): {fastest.cpu_us['redis']:.1f} us",
        (
            f"- client CPU per delivery (fastest step): producer {fastest.cpu_us['producer']:.0f},"
            f" router {fastest.cpu_us['router']:.0f}, consumer {fastest.cpu_us['consumer']:.0f} "
            f"us (total {client_us:.0f} us)"
        ),
        f"- client cores to saturate one Redis: {direct * client_us / 1e6:.1f}",
        (
            f"- Redis network per delivery (fastest step): in {fastest.net_in:,.0f} B, out "
            f"{fastest.net_out:,.0f} B"
        ),
        (
            f"- Redis memory per delivery kept until the next GC pass: "
            f"{memory.finished_bytes:,.0f} B; after it: {memory.residual_bytes:,.0f} B "
            f"({memory.residual_bytes * memory.deliveries / 1024:,.0f} KiB in all, over "
            f"{memory.deliveries:,} deliveries)"
        ),
        (
            f"- one GC pass, per delivery: GC process {gc['gc_us']:.0f} us, Redis "
            f"{gc['redis_us']:.1f} us ({gc['documents']:,.0f} Finished documents deleted; the pass took about "
            f"{gc['seconds']:.1f} s)"
        ),
        "- keys left after the GC pass: "
        + ", ".join(f"{kind} {count:,}" for kind, count in memory.residual_keys.items()),
        (
            f"- routing, 2 routers vs 1 (best run of each): {best[2]:,.0f} vs {best[1]:,.0f} routed "
            f"tasks/s, {scale:.2f}x; exactly once: "
            f"{', '.join(r.exact for r in routes)}"
        ),
        "",
        "## Load steps",
        "",
        (
            f"Header-only tasks; Karton defaults (log publishing and task tracking on, GC off); "
            f"`send_tasks` batches of 100 (paced or as fast as possible); consumers of one "
            f"identity with `concurrency_limit = {CONCURRENCY}`. `p`/`r`/`c`: producer, router "
            "(`SystemService`) and consumer processes. Redis share: redis-server CPU "
            "(`/proc/<pid>/stat`) per wall second while tasks flowed, and the busiest 1 s. "
            "CPU us, commands and bytes are per delivery over the whole step. Every step "
            "checks that each task was delivered exactly once (Finished copies and "
            "`karton.metrics.consumed` both equal the tasks sent)."
        ),
        "",
        *_table(
            [
                "step",
                "deliveries/s",
                "Redis share",
                "Redis peak",
                "producer us",
                "router us",
                "consumer us",
                "Redis us",
                "commands",
                "bytes in",
                "bytes out",
            ],
            step_rows,
        ),
        "",
        (
            f"Line through the steps: Redis share = {model.intercept:.3f} + "
            f"{model.slope * 1e6:.1f} us x deliveries/s (R² {model.r2:.2f}); it reaches one "
            f"core at {_round(model.saturation)} deliveries/s."
        ),
        "",
        "## Routing: one router and two",
        "",
        (
            "`karton.tasks` filled with N tasks (20 binds, 2 matching), then the routers "
            "(`SystemService`, GC off) started together and timed until it is empty and both "
            "matching queues hold N uids. Exactly once: each queue holds exactly N distinct "
            "uids and Redis holds 3N task documents (original + 2 copies). One router, two, "
            "then both again (the machine is shared): the figures compare the best of each. "
            "Timed from the first task taken (router start-up left out); router CPU is that "
            "of all routers, start-up included, per routed task."
        ),
        "",
        *_table(
            ["routers", "tasks", "routed tasks/s", "router us (all)", "Redis us", "exactly once"],
            route_rows,
        ),
        "",
        "## Deployment sizes (framework CPU only)",
        "",
        (
            f"From the fastest step's CPU per delivery and the GC pass's, each process and each "
            f"Redis sized for {HEADROOM:.0%} of a core (the GC: one process at a time, by its lock); memory is the Finished tasks kept for one "
            f"`gc_interval` ({GC_INTERVAL:.0f} s) at "
            f"{memory.finished_bytes:,.0f} B each (backlogs come on top: see docs/capacity.md). "
            "Handler CPU adds consumer processes: (rate x handler us) / 0.7e6. Karton has no "
            "Redis Cluster support: more than one Redis server means as many independent "
            "deployments, each with its own routers, GC and share of the workloads."
        ),
        "",
        *_table(
            [
                "deliveries/s",
                "producer procs",
                "router procs",
                "consumer procs",
                "GC process (cores)",
                "Redis cores (GC included)",
                "Redis servers",
                "Redis memory",
            ],
            deployment(fastest.cpu_us, gc, memory.finished_bytes),
        ),
        "",
        "## Machine",
        "",
        *[f"- {k}: {v}" for k, v in conditions.items()],
        "",
    ]
    return "\n".join(out)


def _round(value: float) -> str:
    if not math.isfinite(value):
        return "n/a"
    return f"{round(value, -3 if value >= 10_000 else -2):,.0f}"


# -- main -----------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.capacity",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--smoke", action="store_true", help="tiny steps: checks the script")
    parser.add_argument(
        "--output",
        type=Path,
        default=None,
        help="report path (default: benchmarks/CAPACITY.md; none in --smoke)",
    )
    args = parser.parse_args(argv)
    command = shlex.join(
        ["python", "-m", "benchmarks.capacity", *(sys.argv[1:] if argv is None else argv)]
    )
    output = args.output or (None if args.smoke else HERE / "CAPACITY.md")
    started = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    t0 = time.monotonic()
    with servers() as (redis, s3, workdir):
        assert redis.process is not None
        # The routers check the bucket at start; the header-only tasks never touch S3.
        ctx = Context(redis.port, s3.url, workdir, args.smoke)
        conditions = report.machine()
        conditions["load average before"] = _load()
        steps: list[StepResult] = []
        for i, step in enumerate(SMOKE_STEPS if args.smoke else FULL_STEPS):
            fastest_single = step.producers == 1 and not step.rate
            result = run_step(ctx, redis.process.pid, step,
                              memory=fastest_single or (args.smoke and i == 0))  # fmt: skip
            steps.append(result)
            print(
                f"-> {step.label:<22} {result.rate:>9,.0f} deliveries/s  Redis "
                f"{100 * result.redis_share:3.0f}% of a core (peak "
                f"{100 * result.redis_peak:.0f}%), {result.cpu_us['redis']:.1f} us/delivery",
                flush=True,
            )
        routes = []
        for count in ROUTE_ORDER[args.smoke]:
            route = run_routing(ctx, count)
            routes.append(route)
            print(f"-> {count} router(s): {route.rate:,.0f} routed tasks/s, exactly once: "
                  f"{route.exact}", flush=True)  # fmt: skip
        conditions["load average after"] = _load()
    text = render(command, started, time.monotonic() - t0, steps, routes, conditions)
    print(text)
    if output is not None:
        output.write_text(text)
        print(f"wrote {output}")
    return 0 if all(r.exact == "yes" for r in routes) else 1


def _load() -> str:
    try:
        return ", ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "?"


if __name__ == "__main__":
    raise SystemExit(main())
