"""Test kit: run services in-process on the embedded default, Karton's KartonTestCase async.

::

    async with testing.pipeline(Reverser, data_dir=tmp_path) as p:
        await p.send(Task({"type": "text"}, payload={"text": "abc"}))
        await p.wait_idle()
        [done] = await p.tasks(receiver="example.reverser")

Everything runs on the same backend code as production: an in-process Redis
(fakeredis) plus a directory for resources, with the real router and consumers.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path

import anyio

from ._services._consumer import Consumer
from ._services._producer import Producer
from ._services._runtime import share_runtimes
from ._settings._config import Config
from ._wire._task import Task, TaskState
from .system import SystemService

__all__ = ["Pipeline", "embedded_config", "pipeline"]


def embedded_config(data_dir: str | Path, **sections: dict[str, object]) -> Config:
    """Return a config for the embedded mode in ``data_dir`` (no ini files, no env)."""
    config = Config(search_paths=[], environ={})
    config.set("asynckarton", "embedded", "1")
    config.set("asynckarton", "share_embedded", "0")  # one process: nothing to share
    config.set("asynckarton", "data_dir", str(data_dir))
    config.load_from_dict(sections, source="testing")
    return config


class Pipeline:
    """A running system service, the given consumers and a producer."""

    def __init__(self, config: Config, producer: Producer, services: Sequence[Consumer]) -> None:
        self.config = config
        self.producer = producer
        self.services = list(services)

    async def send(self, *tasks: Task) -> None:
        """Send tasks as the pipeline's producer."""
        await self.producer.send_tasks(tasks)

    async def tasks(self, *, receiver: str | None = None) -> list[Task]:
        """Return every task in Redis (optionally only copies routed to ``receiver``).

        Raises:
            BackendError: Redis failed (names the operation and the server).
        """
        found: list[Task] = []
        async for batch in self.producer.backend.scan_tasks():
            for _, body in batch:
                task = Task.unserialize(body)
                if receiver is None or task.receiver == receiver:
                    found.append(task)
        return found

    async def busy(self) -> bool:
        """Tell whether anything is still queued, routed, leased or scheduled.

        Raises:
            BackendError: Redis failed (names the operation and the server).
        """
        backend = self.producer.backend
        if await backend.count_in_flight(service.identity for service in self.services):
            return True
        return any(
            t.status in (TaskState.DECLARED, TaskState.SPAWNED, TaskState.STARTED)
            for t in await self.tasks()
        )

    async def wait_idle(self, timeout: float = 10.0, poll: float = 0.02) -> None:
        """Wait until every sent task and its descendants reached a final state.

        Idle must be seen on two consecutive polls, so a task moving between two places
        at the moment of one poll cannot make it return early.
        """
        deadline = time.monotonic() + timeout
        idle_polls = 0
        while idle_polls < 2:
            idle_polls = 0 if await self.busy() else idle_polls + 1
            if time.monotonic() > deadline:
                raise TimeoutError(f"pipeline still busy after {timeout} s")
            await anyio.sleep(poll)


@asynccontextmanager
async def pipeline(
    *services: type[Consumer] | Consumer,
    data_dir: str | Path | None = None,
    config: Config | None = None,
    gc: bool = False,
) -> AsyncIterator[Pipeline]:
    """Run a system service plus ``services`` on the embedded default while the block runs.

    Args:
        services: consumer classes (built with the pipeline's config) or instances.
        data_dir: where resources go (default: a temporary directory).
        config: a config to use instead of :func:`embedded_config`.
        gc: also run the garbage collector (off by default: tests inspect finished tasks).
    """
    with tempfile.TemporaryDirectory(prefix="asynckarton-test-") as tmp:
        config = config or embedded_config(data_dir or tmp)
        if not gc:
            config.set("system", "enable_gc", "0")
        async with AsyncExitStack() as stack:
            system = SystemService(config)
            consumers = [s if isinstance(s, Consumer) else s(config) for s in services]
            producer = Producer(config, identity="testing")
            # one runtime for the pipeline's services, closed after them
            await stack.enter_async_context(share_runtimes([system, *consumers, producer]))
            await stack.enter_async_context(system)
            for consumer in consumers:
                await stack.enter_async_context(consumer)
            await stack.enter_async_context(producer)
            group = await stack.enter_async_context(anyio.create_task_group())
            stack.callback(group.cancel_scope.cancel)
            await group.start(system.run)
            for consumer in consumers:
                await group.start(consumer.run)
            yield Pipeline(config, producer, consumers)
