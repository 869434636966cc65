"""The idle router on a real redis-server: the wake-up reads the batch it routes."""

from __future__ import annotations

import logging
from typing import Any, cast

import anyio
import pytest

from asynckarton import Task
from asynckarton.backend import Bind, KartonBackend
from asynckarton.backend import _keys as keys
from asynckarton.system import Router

pytestmark = [pytest.mark.anyio, pytest.mark.integration]


def record(backend: KartonBackend, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    calls: list[str] = []
    for name in ("route_take", "route_idle", "route_commit"):
        method = getattr(backend, name)

        def recorded(*args: Any, _method: Any = method, _name: str = name, **kw: Any) -> Any:
            calls.append(_name)
            return _method(*args, **kw)

        monkeypatch.setattr(backend, name, recorded)
    return calls


async def queued(backend: KartonBackend, identity: str) -> list[str]:
    key = f"karton.queue.normal:{identity}"
    return cast(list[str], await backend.redis.lrange(key, 0, -1))


async def test_a_task_sent_to_an_idle_router_is_read_by_the_wait_that_wakes_it(
    backend: KartonBackend, monkeypatch: pytest.MonkeyPatch
) -> None:
    await backend.register_bind(Bind(identity="svc.rt", filters=[{"type": "rt"}]))
    router = Router(backend, logging.getLogger("karton.system"), instance="rt1")
    calls = record(backend, monkeypatch)
    async with anyio.create_task_group() as group:
        await group.start(router.run)
        with anyio.fail_after(10):  # the first round found nothing: now in the idle wait
            while calls[-1:] != ["route_idle"]:
                await anyio.sleep(0.01)
        await anyio.sleep(0.05)
        before = len(calls)
        tasks = [Task({"type": "rt"}) for _ in range(3)]
        await backend.enqueue_unrouted({t.uid: t.serialize() for t in tasks}, "rt.producer")
        with anyio.fail_after(10):
            while len(await queued(backend, "svc.rt")) < 3:
                await anyio.sleep(0.01)
        group.cancel_scope.cancel()
    woke = calls[before - 1 :]
    # The wait that was under way when the tasks came, then the commit: no read between.
    assert woke[:2] == ["route_idle", "route_commit"], calls
    assert woke.count("route_commit") == 1, calls  # the three went in one batch
    routed = {uid.split(":", 1)[0].strip("{}") for uid in await queued(backend, "svc.rt")}
    assert routed == {t.root_uid for t in tasks}
    assert await backend.redis.llen(keys.routing_key("rt1")) == 0  # the journal is clear
    assert await backend.redis.llen(keys.TASKS_QUEUE) == 0
