"""The GC drops dead-letter uids whose task left the Crashed state by another path."""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from asynckarton import Task, TaskState
from asynckarton._settings._options import SystemSettings
from asynckarton.backend import EmbeddedConnector, KartonBackend
from asynckarton.storage import LocalStorage
from asynckarton.system import GarbageCollector, _gc

pytestmark = pytest.mark.anyio

HOUR = 3600.0


@pytest.fixture
async def backend() -> AsyncIterator[KartonBackend]:
    made = KartonBackend(EmbeddedConnector())
    yield made
    await made.aclose()


def crashed(age: float = 0.0) -> Task:
    made = Task({"type": "sample"}).fork_task()
    made.headers["receiver"] = "svc"
    made.status = TaskState.CRASHED
    made.last_update = time.time() - age
    return made


@pytest.fixture
async def storage(tmp_path: Path) -> AsyncIterator[LocalStorage]:
    async with LocalStorage(tmp_path / "storage") as made:
        await made.ensure_bucket("karton", create=True)
        yield made


def collector(backend: KartonBackend, storage: LocalStorage) -> GarbageCollector:
    settings = dataclasses.replace(SystemSettings(), task_crashed_timeout=HOUR)
    return GarbageCollector(backend, storage, "karton", settings, logging.getLogger("test.gc"))


async def test_dead_letters_of_tasks_no_longer_crashed_are_dropped(
    backend: KartonBackend, storage: LocalStorage
) -> None:
    kept, restarted, gone, expired = crashed(), crashed(), crashed(), crashed(age=2 * HOUR)
    await backend.set_tasks([kept, restarted, expired])
    restarted.status = TaskState.SPAWNED  # what karton-dashboard's "restart" writes
    await backend.set_tasks([restarted])
    uids = [t.uid for t in (kept, restarted, gone, expired)]
    await backend.dead_letter("svc", uids)
    await backend.dead_letter("gone-service", [gone.uid])

    gc = collector(backend, storage)
    report = await gc.collect()

    assert report is not None
    assert report.pruned_dead_letters == 4  # restarted, gone, expired; gone-service's one
    assert await backend.dead_letters("svc") == [kept.uid]
    assert await backend.dead_letters("gone-service") == []
    assert await backend.dead_letter_identities() == ["svc"]


async def test_each_pass_checks_a_bounded_window_that_moves_on(
    backend: KartonBackend, storage: LocalStorage, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_gc, "DEAD_LETTER_CHECKS", 2)
    kept = [crashed() for _ in range(3)]
    await backend.set_tasks(kept)
    stale = [crashed().uid for _ in range(3)]  # never stored: gone
    order = [kept[0].uid, kept[1].uid, stale[0], kept[2].uid, stale[1], stale[2]]
    await backend.dead_letter("svc", order)
    gc = collector(backend, storage)

    assert await gc.prune_dead_letters() == 0  # window [0, 2): both still crashed
    assert await gc.prune_dead_letters() == 1  # window [2, 4): stale[0]
    assert await gc.prune_dead_letters() == 2  # window [3, 5) of the shorter list
    assert await backend.dead_letters("svc") == [t.uid for t in kept]
    assert await gc.prune_dead_letters() == 0  # wrapped around to the start
