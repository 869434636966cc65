"""FastAPI integration: a lifespan factory and a typed producer dependency, nothing else.

The only module that imports FastAPI (install ``asynckarton[fastapi]``)::

    config = Config()
    app = FastAPI(lifespan=lifespan(config, consumers=[Hasher(config)], system=True))

    @app.post("/tasks")
    async def send(producer: ProducerDep) -> dict[str, str]:
        task = Task({"type": "upload"})
        await producer.send_task(task)
        return {"uid": task.uid}

The lifespan opens one shared :class:`~asynckarton.Producer`, starts every consumer (and
optionally a SystemService, which the embedded runtime needs) in one task group with
``tg.start`` (the app serves only once they are ready), and on shutdown calls
``stop(grace=...)`` on each: in-flight tasks get the grace period, then are handed back.
The ``async with`` nesting gives the exit order: services drain, then the producer
closes, then the runtime.  The producer and every service with the same connection
settings share one :class:`~asynckarton.Runtime` (one Redis pool, one storage client), or
the one passed as ``runtime=``.  Lifespan shutdown is the application's signal handling:
the library installs no signal handlers.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Annotated, Any

import anyio

try:
    from fastapi import Depends, FastAPI, Request
except ImportError as exc:  # pragma: no cover - exercised without the extra installed
    raise ImportError(
        "asynckarton.fastapi needs FastAPI: pip install 'asynckarton[fastapi]'"
    ) from exc

from ._services import _health
from ._services._consumer import Consumer
from ._services._producer import Producer
from ._services._runtime import Runtime, share_runtimes
from ._settings._config import Config
from .system import SystemService

__all__ = ["Lifespan", "ProducerDep", "lifespan"]

#: What ``FastAPI(lifespan=...)`` accepts.
Lifespan = Callable[[FastAPI], AbstractAsyncContextManager[dict[str, Any]]]

_STATE_KEY = "asynckarton_producer"


def lifespan(
    config: Config | None = None,
    *,
    consumers: Sequence[Consumer] = (),
    system: bool = False,
    producer_identity: str = "asynckarton.fastapi",
    grace: float | None = None,
    runtime: Runtime | None = None,
) -> Lifespan:
    """Build a FastAPI lifespan that runs asynckarton services beside the app.

    Args:
        config: configuration for the producer and the system service (default:
            ``Config()``); consumers keep the configuration they were built with.
        consumers: consumers to run in the app's event loop (not yet started).
        system: also run a SystemService (router + GC): required in embedded mode,
            where nothing outside this process can route tasks.
        producer_identity: identity of the shared producer (``origin`` of its tasks).
        grace: seconds in-flight tasks get at shutdown (default: each consumer's
            ``[karton] shutdown_grace``).
        runtime: the runtime every service not given one uses (default: one per
            distinct connection settings, opened and closed by the lifespan).
    """

    @asynccontextmanager
    async def _lifespan(app: FastAPI) -> AsyncIterator[dict[str, Any]]:
        cfg = config if config is not None else Config()
        services: list[Consumer | SystemService] = [SystemService(cfg)] if system else []
        services.extend(consumers)
        producer = Producer(cfg, identity=producer_identity)
        async with (
            share_runtimes([producer, *services], runtime),
            producer,
            anyio.create_task_group() as group,
        ):
            for service in services:
                await group.start(service.run)
            _health.install(app, producer, services)  # health: /healthz and /readyz
            yield {_STATE_KEY: producer}
            for service in reversed(services):  # consumers first, the router last
                service.stop(grace=grace)

    return _lifespan


def _producer(request: Request) -> Producer:
    producer = getattr(request.state, _STATE_KEY, None)
    if not isinstance(producer, Producer):
        raise RuntimeError("no asynckarton producer: create the app with lifespan=lifespan(...)")
    return producer


#: The shared producer, as a FastAPI dependency: ``async def f(producer: ProducerDep)``.
ProducerDep = Annotated[Producer, Depends(_producer)]
