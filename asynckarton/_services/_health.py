"""Health checks: is Redis reachable, the bucket there, a router alive, a service online?

:func:`run_checks` backs ``asynckarton check`` (exit status 0/1 for container health
checks); :func:`install` adds ``/healthz`` (liveness: the event loop answers) and
``/readyz`` (readiness: Redis and the bucket reachable, every service started, event-loop
lag under a threshold) to a FastAPI app, from :func:`asynckarton.fastapi.lifespan`.

Each check has its own deadline and reports a failure as data, never as an exception;
cancellation passes through.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import anyio
import anyio.lowlevel

from ..backend import KartonBackend
from ..backend._inspect import parse_client_name, routers_alive
from ..storage import Storage
from ._metrics import last_loop_lag

if TYPE_CHECKING:
    from fastapi import FastAPI

    from ._producer import Producer

__all__ = ["Check", "check_bucket", "check_redis", "check_replicas", "check_router", "install",
           "run_checks"]  # fmt: skip

SYSTEM_IDENTITY = "karton.system"
DEFAULT_TIMEOUT = 5.0
#: /readyz fails when the event loop lags more than this (seconds).
DEFAULT_MAX_LAG = 1.0


@dataclass(frozen=True, slots=True)
class Check:
    """One check's verdict."""

    name: str
    ok: bool
    detail: str


async def _guarded(name: str, timeout: float, probe: Callable[[], Awaitable[Check]]) -> Check:
    try:
        with anyio.fail_after(timeout):
            return await probe()
    except TimeoutError:
        return Check(name, False, f"no answer within {timeout:g}s")
    except Exception as exc:  # noqa: BLE001 - a failed check is a verdict, not a crash
        return Check(name, False, f"{type(exc).__name__}: {' '.join(str(exc).split())}")


async def check_redis(backend: KartonBackend, timeout: float = DEFAULT_TIMEOUT) -> Check:
    """PING Redis."""

    async def probe() -> Check:
        began = time.perf_counter()
        await backend.redis.ping()
        return Check(
            "redis", True, f"PING answered in {(time.perf_counter() - began) * 1000:.1f} ms"
        )

    return await _guarded("redis", timeout, probe)


async def check_bucket(storage: Storage, bucket: str, timeout: float = DEFAULT_TIMEOUT) -> Check:
    """HEAD the bucket (never creates it)."""

    async def probe() -> Check:
        if await storage.ensure_bucket(bucket, create=False):
            return Check("bucket", True, f"bucket {bucket!r} reachable")
        return Check("bucket", False, f"bucket {bucket!r} does not exist")

    return await _guarded("bucket", timeout, probe)


async def check_router(backend: KartonBackend, timeout: float = DEFAULT_TIMEOUT) -> Check:
    """An asynckarton router heartbeat is fresh, or karton-system is connected."""

    async def probe() -> Check:
        alive = await routers_alive(backend)
        if alive:
            return Check("router", True, f"{alive} asynckarton router(s) alive")
        online = (await backend.online_identities()).get(SYSTEM_IDENTITY, 0)
        if online:
            return Check("router", True, f"{online} {SYSTEM_IDENTITY} connection(s) online")
        return Check("router", False, "no router heartbeat and no karton.system online")

    return await _guarded("router", timeout, probe)


async def check_replicas(
    backend: KartonBackend, identity: str, timeout: float = DEFAULT_TIMEOUT
) -> Check:
    """``identity`` has at least one replica connected (Karton's presence)."""

    async def probe() -> Check:
        names = [c.get("name") or "" for c in await backend.redis.client_list()]
        online = sum(1 for name in names if name and parse_client_name(name)[0] == identity)
        if online:
            return Check(f"replicas:{identity}", True, f"{online} replica(s) online")
        return Check(f"replicas:{identity}", False, "no replica online")

    return await _guarded(f"replicas:{identity}", timeout, probe)


async def run_checks(
    backend: KartonBackend,
    storage: Storage | None,
    bucket: str,
    *,
    identities: Sequence[str] = (),
    router: bool = True,
    timeout: float = DEFAULT_TIMEOUT,
) -> list[Check]:
    """Run the checks concurrently; the result keeps their order (redis, bucket...)."""
    probes: list[Callable[[], Awaitable[Check]]] = [lambda: check_redis(backend, timeout)]
    if storage is not None:
        probes.append(lambda: check_bucket(storage, bucket, timeout))
    if router:
        probes.append(lambda: check_router(backend, timeout))
    for identity in identities:
        probes.append(lambda identity=identity: check_replicas(backend, identity, timeout))  # type: ignore[misc]
    results: list[Check | None] = [None] * len(probes)

    async def one(index: int) -> None:
        results[index] = await probes[index]()

    async with anyio.create_task_group() as group:
        for index in range(len(probes)):
            group.start_soon(one, index)
    return [r for r in results if r is not None]


async def loop_lag() -> float:
    """Seconds the event loop lags: the worse of a probe now and the consumers' last one."""
    began = anyio.current_time()
    await anyio.lowlevel.checkpoint()
    return max(anyio.current_time() - began, last_loop_lag())


def _started(service: object) -> bool:
    return getattr(service, "_stack", None) is not None  # open = running (ServiceBase)


def install(
    app: FastAPI,
    producer: Producer,
    services: Sequence[object],
    *,
    max_lag: float = DEFAULT_MAX_LAG,
    timeout: float = 2.0,
) -> None:
    """Add ``GET /healthz`` and ``GET /readyz`` to ``app`` (once; later calls rebind).

    Readiness answers 200 with every check, or 503 naming the failed ones.
    """
    from fastapi.responses import JSONResponse

    app.state.asynckarton_health = (producer, list(services), max_lag, timeout)

    async def healthz() -> dict[str, Any]:
        return {"status": "ok", "loop_lag": await loop_lag()}

    async def readyz() -> JSONResponse:
        producer, services, max_lag, timeout = app.state.asynckarton_health
        runtime = producer.runtime
        checks = await run_checks(
            runtime.backend, runtime.storage, runtime.bucket, router=False, timeout=timeout
        )
        stopped = [getattr(s, "identity", "?") for s in services if not _started(s)]
        checks.append(Check("services", not stopped, f"not running: {stopped}" if stopped
                            else f"{len(services)} running"))  # fmt: skip
        lag = await loop_lag()
        checks.append(Check("loop_lag", lag <= max_lag, f"{lag:.3f}s (max {max_lag:g}s)"))
        ok = all(check.ok for check in checks)
        body = {"status": "ready" if ok else "not ready", "checks": [asdict(c) for c in checks]}
        return JSONResponse(body, status_code=200 if ok else 503)

    present = {getattr(route, "path", None) for route in app.router.routes}
    if "/healthz" not in present:
        app.add_api_route("/healthz", healthz, methods=["GET"], include_in_schema=False)
    if "/readyz" not in present:
        app.add_api_route("/readyz", readyz, methods=["GET"], include_in_schema=False)
