"""Prometheus metrics: the system service's view of the deployment, and each consumer's.

**System exporter** (``[system] metrics_port`` or ``asynckarton system --metrics-port``).
At scrape time it reads :class:`~asynckarton._services._inspect.DeploymentState` (three
round trips, O(binds), no task read; cached for one second, so scrapes in a burst cost
one read) and reports:

* karton-dashboard's ``/varz`` names where the same thing is measured:
  ``karton_replicas{name,version}``, ``karton_metrics{metric,name}`` (Karton's counters)
  and ``karton_tasks{name,priority,status}``;
* ``asynckarton_queue_depth{identity,priority}`` (LLEN), ``asynckarton_leased_tasks``
  (ZCARD), ``asynckarton_dead_letters`` (LLEN), ``asynckarton_unrouted_tasks``,
  ``asynckarton_retries_scheduled``, ``asynckarton_routers_alive``,
  ``asynckarton_redis_used_memory_bytes``;
* counters kept by Redis scripts (``asynckarton_lease_reclaims_total`` and the rest of
  ``asynckarton.stats``) and by this process (``asynckarton_routed_tasks_total``,
  ``asynckarton_gc_passes_total``, ``asynckarton_gc_duration_seconds``).

``karton_tasks`` (tasks by status: pending, started, crashed...) needs every task read,
because Karton keeps no index by status.  It is therefore **not** computed per scrape:
it is the count the last GC pass published (``asynckarton.gc.counts``, read with the
rest of the state: O(1) whatever the number of tasks), and
``asynckarton_task_counts_age_seconds`` says how old it is (up to ``gc_interval``).
``[system] metrics_scan_interval`` (default 0: off) adds a count of this process's own
every that many seconds, for fresher numbers than the GC's: one SCAN + MGET + JSON parse
of every task, paced while routers have a backlog; the newer of the two is served, and
``asynckarton_task_scan_duration_seconds`` reports what the served one cost.

**Consumer exporter** (``[karton] metrics_port``, one per process, shared by its
consumers): ``asynckarton_handlers_in_flight{identity}``,
``asynckarton_handler_duration_seconds{identity}`` (histogram),
``asynckarton_tasks_processed_total{identity,outcome}`` (ok, error, timeout),
``asynckarton_event_loop_lag_seconds`` and ``asynckarton_lease_renewals_total{identity}``.
The hooks that count them touch memory only: no Redis round trip per task.

Both are served by a tiny HTTP responder on the event loop (any path but ``/healthz``
answers with the metrics), so scraping never needs a thread.
"""

from __future__ import annotations

import bisect
import logging
import re
import time
import weakref
from collections.abc import Awaitable, Callable, Iterator
from typing import Any, Protocol

import anyio
from anyio.abc import SocketStream, TaskStatus
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from .._errors import ConfigError, TaskTimeoutError
from .._settings._config import Config
from ..backend import KartonBackend
from ..backend._guard import TRANSIENT_ERRORS
from ..backend._inspect import record_gc_pass
from ._inspect import DeploymentState, TaskCounts, count_tasks

__all__ = [
    "CONSUMER_REGISTRY",
    "SystemMetrics",
    "gc_pass",
    "handled",
    "last_loop_lag",
    "leases_renewed",
    "loop_lag",
    "outcome",
    "serve_consumer",
    "serve_http",
    "serve_system",
]

log = logging.getLogger("asynckarton.metrics")

DEFAULT_SCAN_INTERVAL = 0.0
#: Share of wall time the optional task scan may take while routers have a backlog.
SCAN_BUSY_SHARE = 0.02
CACHE_SECONDS = 1.0
_DURATION_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 60.0, 300.0, 1800.0)

# -- consumer side: one registry per process ----------------------------------------------
#
# The per-task hooks only bump plain Python numbers (a bisect and three additions); the
# collector turns them into Prometheus families at scrape time.  prometheus_client's own
# ``labels().observe()`` costs ~20x more per task (a lock and a label lookup each).

_BOUNDS = _DURATION_BUCKETS


class _ConsumerStats:
    """Counters of one identity in this process."""

    __slots__ = ("buckets", "count", "outcomes", "renewals", "total")

    def __init__(self) -> None:
        self.buckets = [0] * (len(_BOUNDS) + 1)  # last one: above every bound
        self.count = 0
        self.total = 0.0
        self.outcomes = {"ok": 0, "error": 0, "timeout": 0}
        self.renewals = 0


_BY_IDENTITY: dict[str, _ConsumerStats] = {}
_LOOP_LAG = [0.0]
_CONSUMERS: weakref.WeakSet[Any] = weakref.WeakSet()
_SERVING: set[int] = set()  # consumer metrics ports this process already serves


def _stats(identity: str) -> _ConsumerStats:
    stats = _BY_IDENTITY.get(identity)
    if stats is None:
        stats = _BY_IDENTITY[identity] = _ConsumerStats()
    return stats


class _ConsumerCollector(Collector):
    """Every consumer family, built from the in-memory counters at scrape time."""

    def collect(self) -> Iterator[Metric]:
        in_flight = GaugeMetricFamily(
            "asynckarton_handlers_in_flight", "Handlers running now.", labels=["identity"]
        )
        for consumer in list(_CONSUMERS):
            in_flight.add_metric([consumer.identity], consumer.handlers_running)
        yield in_flight
        durations = HistogramMetricFamily(
            "asynckarton_handler_duration_seconds",
            "Wall time of one task in a consumer (hooks included).",
            labels=["identity"],
        )
        processed = CounterMetricFamily(
            "asynckarton_tasks_processed",
            "Tasks whose handler returned (ok), raised (error) or ran past its deadline (timeout).",
            labels=["identity", "outcome"],
        )
        renewals = CounterMetricFamily(
            "asynckarton_lease_renewals",
            "Task leases renewed by this process (one ZADD renews them all).",
            labels=["identity"],
        )
        for identity, stats in sorted(_BY_IDENTITY.items()):
            cumulative, buckets = 0, []
            for bound, count in zip((*map(str, _BOUNDS), "+Inf"), stats.buckets, strict=True):
                cumulative += count
                buckets.append((bound, float(cumulative)))
            durations.add_metric([identity], buckets, sum_value=stats.total)
            for kind, count in stats.outcomes.items():
                processed.add_metric([identity, kind], count)
            renewals.add_metric([identity], stats.renewals)
        yield from (durations, processed, renewals)
        yield GaugeMetricFamily(
            "asynckarton_event_loop_lag_seconds",
            "How late the event loop ran the consumers' last 0.25 s probe.",
            value=_LOOP_LAG[0],
        )


CONSUMER_REGISTRY = CollectorRegistry()
CONSUMER_REGISTRY.register(_ConsumerCollector())


def handled(identity: str, seconds: float) -> None:
    """A consumer finished one task after ``seconds`` (hook; memory only)."""
    stats = _BY_IDENTITY.get(identity) or _stats(identity)
    stats.buckets[bisect.bisect_left(_BOUNDS, seconds)] += 1
    stats.count += 1
    stats.total += seconds


def outcome(identity: str, error: BaseException | None) -> None:
    """Count how a handler ended (hook; memory only)."""
    if error is None:
        kind = "ok"
    elif isinstance(error, TaskTimeoutError):
        kind = "timeout"
    else:
        kind = "error"
    (_BY_IDENTITY.get(identity) or _stats(identity)).outcomes[kind] += 1


def leases_renewed(identity: str, count: int) -> None:
    """A consumer renewed ``count`` leases (hook)."""
    _stats(identity).renewals += count


def loop_lag(seconds: float) -> None:
    """Record the event-loop lag a consumer's probe measured (hook)."""
    _LOOP_LAG[0] = max(0.0, seconds)


def last_loop_lag() -> float:
    """The event-loop lag the consumers' probe measured last (seconds)."""
    return _LOOP_LAG[0]


async def serve_consumer(consumer: Any) -> None:
    """Track ``consumer`` for the in-flight gauge; serve ``[karton] metrics_port`` once.

    Returns at once when no port is configured or this process already serves it.
    """
    _CONSUMERS.add(consumer)
    port = consumer.config.getint("karton", "metrics_port")
    if not port or port in _SERVING:
        return
    _SERVING.add(port)
    try:

        async def render() -> bytes:
            return generate_latest(CONSUMER_REGISTRY)

        host = str(consumer.config.get("karton", "metrics_host") or "0.0.0.0")
        await serve_http(render, port, host=host)
    finally:
        _SERVING.discard(port)


# -- system side --------------------------------------------------------------------------

_GC_SECONDS = Histogram(
    "asynckarton_gc_duration_seconds",
    "Duration of the garbage collector's passes in this process.",
    buckets=(0.01, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0),
    registry=None,
)
_GC_PASSES = Counter(
    "asynckarton_gc_passes", "Garbage-collection passes run by this process.", registry=None
)

#: asynckarton.stats fields -> exported counter names
_STATS = {
    "redelivered": "asynckarton_lease_reclaims",
    "rerouted": "asynckarton_rerouted_tasks",
    "orphans_requeued": "asynckarton_orphans_requeued",
    "invalid": "asynckarton_invalid_tasks",
}


async def gc_pass(backend: KartonBackend, report: Any, seconds: float) -> None:
    """Count a GC pass and record its heartbeat in Redis (hook; ``report`` None: skipped)."""
    if report is None:
        return
    _GC_PASSES.inc()
    _GC_SECONDS.observe(seconds)
    try:
        await record_gc_pass(
            backend,
            duration=seconds,
            deleted_tasks=int(report.deleted_tasks),
            deleted_objects=int(report.deleted_objects),
        )
    except TRANSIENT_ERRORS as exc:
        log.warning("GC heartbeat not recorded, Redis unavailable: %s", exc)


def _safe_name(identity: str) -> str:
    """karton-dashboard's label form of an identity (``karton.classifier`` -> ``karton_classifier``)."""
    return re.sub("[^a-z0-9]", "_", identity.lower())


class _SystemService(Protocol):
    config: Config
    router: Any

    @property
    def backend(self) -> KartonBackend: ...


class SystemMetrics(Collector):
    """The system exporter's collector: a cached deployment state plus local counters.

    Args:
        service: the running SystemService (its backend, config and router).
    """

    def __init__(self, service: _SystemService) -> None:
        self.service = service
        self.registry = CollectorRegistry()
        self.registry.register(self)
        self.registry.register(_GC_SECONDS)
        self.registry.register(_GC_PASSES)
        self.state: DeploymentState | None = None
        self.counts: TaskCounts | None = None
        self.counted_at = 0.0
        self._read_at = 0.0
        self._lock = anyio.Lock()

    async def refresh(self) -> None:
        """Re-read the deployment state unless it is younger than a second."""
        async with self._lock:
            if time.monotonic() - self._read_at < CACHE_SECONDS and self.state is not None:
                return
            self.state = await DeploymentState.load(self.service.backend)
            self._read_at = time.monotonic()

    async def render(self) -> bytes:
        """The exposition text of a scrape."""
        try:
            await self.refresh()
        except TRANSIENT_ERRORS as exc:  # serve what we have, marked stale
            log.warning("metrics: Redis unavailable (%s); serving the last state", exc)
        return generate_latest(self.registry)

    async def scan_tasks(self, interval: float) -> None:
        """Count every task by status every ``interval`` seconds (O(all tasks) each)."""
        while True:
            try:
                self.counts = await count_tasks(self.service.backend, busy_share=SCAN_BUSY_SHARE)
                self.counted_at = self.counts.counted_at
            except TRANSIENT_ERRORS as exc:
                log.warning("metrics: task scan skipped, Redis unavailable: %s", exc)
            await anyio.sleep(interval)

    def collect(self) -> Iterator[Metric]:
        """Families from the cached state (called by ``generate_latest``)."""
        router = getattr(self.service, "router", None)
        routed = CounterMetricFamily(
            "asynckarton_routed_tasks", "Unrouted tasks this process's router has routed."
        )
        routed.add_metric([], float(getattr(router, "routed", 0)))
        yield routed
        state = self.state
        if state is None:
            return
        yield from self._state_families(state)
        yield from self._task_families(state)

    def _state_families(self, state: DeploymentState) -> Iterator[Metric]:
        replicas = GaugeMetricFamily("karton_replicas", "Replicas", labels=["name", "version"])
        for bind in state.binds.values():
            version = bind.service_version or bind.version
            replicas.add_metric([_safe_name(bind.identity), version], bind.replicas)
        yield replicas
        counters = GaugeMetricFamily("karton_metrics", "Metrics", labels=["metric", "name"])
        for metric, values in state.metrics.items():
            for identity, value in values.items():
                counters.add_metric([metric, _safe_name(identity)], value)
        yield counters
        depth = GaugeMetricFamily(
            "asynckarton_queue_depth",
            "Task uids waiting in each queue (LLEN).",
            labels=["identity", "priority"],
        )
        leased = GaugeMetricFamily(
            "asynckarton_leased_tasks",
            "Tasks held by consumers: started or prefetched (ZCARD of the leases).",
            labels=["identity"],
        )
        dead = GaugeMetricFamily(
            "asynckarton_dead_letters",
            "Tasks that crashed after their last retry (LLEN of the dead-letter list).",
            labels=["identity"],
        )
        for identity, queue in state.queues.items():
            for priority, count in queue.queued.items():
                depth.add_metric([identity, priority], count)
            leased.add_metric([identity], queue.leased)
            dead.add_metric([identity], queue.dead)
        yield from (depth, leased, dead)
        for name, text, value in (
            ("asynckarton_unrouted_tasks", "Tasks waiting for a router.", state.unrouted),
            ("asynckarton_retries_scheduled", "Retries waiting for their time.",
             state.retries_scheduled),
            ("asynckarton_routers_alive", "Routers with a live heartbeat.", state.routers_alive),
        ):  # fmt: skip
            yield GaugeMetricFamily(name, text, value=value)
        if state.gc is not None:
            yield GaugeMetricFamily(
                "asynckarton_gc_last_pass_timestamp_seconds",
                "When the last GC pass (of any process) finished.",
                value=state.gc.finished_at,
            )
        if state.redis is not None:
            yield GaugeMetricFamily(
                "asynckarton_redis_used_memory_bytes",
                "Redis INFO used_memory.",
                value=state.redis.used_memory,
            )
        for field, name in _STATS.items():
            family = CounterMetricFamily(name, f"Counter {field!r} of every asynckarton process.")
            family.add_metric([], state.stats.get(field, 0))
            yield family

    def _task_families(self, state: DeploymentState) -> Iterator[Metric]:
        counts = self.counts
        if state.tasks is not None and (
            counts is None or state.tasks.counted_at > counts.counted_at
        ):
            counts = state.tasks  # the GC's count is newer
        if counts is None:
            return
        tasks = GaugeMetricFamily(
            "karton_tasks", "Pending tasks", labels=["name", "priority", "status"]
        )
        for (receiver, priority, status), count in sorted(counts.counts.items()):
            if receiver:
                tasks.add_metric([_safe_name(receiver), priority, status], count)
        yield tasks
        yield GaugeMetricFamily(
            "asynckarton_task_scan_duration_seconds",
            "What the count of every task by status served here cost (O(all tasks)).",
            value=counts.duration,
        )
        yield GaugeMetricFamily(
            "asynckarton_task_scan_timestamp_seconds",
            "When the tasks were last counted by status (by a GC pass or this exporter).",
            value=counts.counted_at,
        )
        yield GaugeMetricFamily(
            "asynckarton_task_counts_age_seconds",
            "Seconds since the task counts by status (karton_tasks) were taken.",
            value=counts.age,
        )


async def serve_system(
    service: _SystemService,
    *,
    task_status: TaskStatus[SystemMetrics | None] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """Serve the system metrics on ``[system] metrics_port`` (return at once if unset)."""
    config = service.config
    port = config.getint("system", "metrics_port")
    if not port:
        task_status.started(None)
        return
    metrics = SystemMetrics(service)
    interval = config.getfloat("system", "metrics_scan_interval", DEFAULT_SCAN_INTERVAL)
    host = str(config.get("system", "metrics_host") or "0.0.0.0")
    async with anyio.create_task_group() as group:
        if interval > 0:
            group.start_soon(metrics.scan_tasks, interval)
        await group.start(serve_http, metrics.render, port, host)
        log.info("Metrics on http://%s:%d/metrics", host, port)
        task_status.started(metrics)


# -- the HTTP responder ---------------------------------------------------------------------


async def serve_http(
    render: Callable[[], Awaitable[bytes]],
    port: int,
    host: str = "0.0.0.0",  # scraped from other hosts
    *,
    task_status: TaskStatus[int] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """Answer HTTP GETs with ``await render()`` until cancelled; ``/healthz`` says ok.

    ``task_status.started`` gets the bound port (useful with port 0).
    """
    try:
        listener = await anyio.create_tcp_listener(local_host=host, local_port=port)
    except OSError as exc:
        raise ConfigError(
            f"cannot serve metrics on {host}:{port}: {exc.strerror or exc}", option="metrics_port"
        ) from exc
    async with listener:
        bound = int(listener.extra(anyio.abc.SocketAttribute.local_port))
        task_status.started(bound)

        async def handle(stream: SocketStream) -> None:
            async with stream:
                try:
                    await _respond(stream, render)
                except (anyio.EndOfStream, anyio.BrokenResourceError, TimeoutError):
                    pass  # the client went away
                except Exception:  # one bad request must not stop the server
                    log.exception("metrics request failed")

        await listener.serve(handle)


async def _respond(stream: SocketStream, render: Callable[[], Awaitable[bytes]]) -> None:
    request = b""
    with anyio.fail_after(10):
        while b"\r\n\r\n" not in request and len(request) < 16384:
            request += await stream.receive(4096)
    line = request.split(b"\r\n", 1)[0].decode("latin-1").split()
    path = line[1].split("?", 1)[0] if len(line) > 1 else "/"
    if not line or line[0] != "GET":
        status, kind, body = "405 Method Not Allowed", "text/plain", b"GET only\n"
    elif path == "/healthz":
        status, kind, body = "200 OK", "text/plain", b"ok\n"
    else:
        status, kind, body = "200 OK", CONTENT_TYPE_LATEST, await render()
    head = (
        f"HTTP/1.1 {status}\r\nContent-Type: {kind}\r\nContent-Length: {len(body)}\r\n"
        "Connection: close\r\n\r\n"
    )
    await stream.send(head.encode("latin-1") + body)
