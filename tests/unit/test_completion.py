"""The completion writer: small batches linger so one-at-a-time finishes share a write."""

from __future__ import annotations

import itertools
import logging
from typing import Any

import anyio
import anyio.lowlevel
import pytest

from asynckarton import Task, TaskState
from asynckarton._services import _completion
from asynckarton._services._completion import COALESCE_BELOW, Completer

pytestmark = pytest.mark.anyio


class Backend:
    def __init__(self) -> None:
        self.writes: list[list[str]] = []
        self.started: list[list[str]] = []

    async def set_tasks(self, tasks: list[Task]) -> None:
        self.started.append([t.uid for t in tasks])
        assert all(t.status is TaskState.STARTED for t in tasks)

    async def complete(self, identity: str, tasks: list[Task], crashed: int) -> None:
        self.writes.append([t.uid for t in tasks])

    async def dead_letter(self, identity: str, uids: list[str]) -> None:
        raise AssertionError("nothing is dead here")


async def test_finishes_close_together_share_one_write_and_release_their_leases(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(_completion, "LINGER", 0.5)
    backend = Backend()
    tasks = [Task({"type": "x"}) for _ in range(5)]
    leased: dict[str, Any] = {t.uid: t for t in tasks}
    completer = Completer(backend, "id", leased, logging.getLogger("test"))  # type: ignore[arg-type]
    async with anyio.create_task_group() as group:
        group.start_soon(completer.run)
        for task in tasks:  # one at a time, as I/O-bound handlers finish
            completer.add(task, crashed=False)
            await anyio.sleep(0.005)
        with anyio.fail_after(5):
            while sum(map(len, backend.writes)) < 5:
                await anyio.sleep(0.01)
        group.cancel_scope.cancel()
    assert backend.writes == [[t.uid for t in tasks]]
    assert leased == {}


async def test_a_big_batch_is_written_without_lingering(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_completion, "LINGER", 60.0)  # lingering would time the test out
    backend = Backend()
    tasks = [Task({"type": "x"}) for _ in range(COALESCE_BELOW)]
    completer = Completer(backend, "id", {}, logging.getLogger("test"))  # type: ignore[arg-type]
    async with anyio.create_task_group() as group:
        group.start_soon(completer.run)
        for task in tasks:
            completer.add(task, crashed=False)
        with anyio.fail_after(5):
            while not backend.writes:
                await anyio.lowlevel.checkpoint()
        group.cancel_scope.cancel()
    assert list(itertools.chain(*backend.writes)) == [t.uid for t in tasks]


async def test_started_is_written_only_for_tasks_still_running_and_before_their_end(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A task that ends within STARTED_AFTER gets only its final write; a longer one gets
    its Started write first, then its final one."""
    monkeypatch.setattr(_completion, "LINGER", 0.01)
    monkeypatch.setattr(_completion, "STARTED_AFTER", 0.2)
    backend = Backend()
    quick, slow = Task({"type": "x"}), Task({"type": "x"})
    completer = Completer(backend, "id", {}, logging.getLogger("test"))  # type: ignore[arg-type]
    async with anyio.create_task_group() as group:
        group.start_soon(completer.run)
        for task in (quick, slow):
            task.status = TaskState.STARTED
            completer.started(task)
        quick.status = TaskState.FINISHED
        completer.add(quick, crashed=False)
        with anyio.fail_after(5):
            while not backend.writes:
                await anyio.sleep(0.005)
        started_early = list(backend.started)
        with anyio.fail_after(5):
            while not backend.started:
                await anyio.sleep(0.005)
        slow.status = TaskState.FINISHED
        completer.add(slow, crashed=False)
        with anyio.fail_after(5):
            while len(backend.writes) < 2:
                await anyio.sleep(0.005)
        group.cancel_scope.cancel()
    assert started_early == []  # not due yet when the quick one was written
    assert backend.started == [[slow.uid]]
    assert backend.writes == [[quick.uid], [slow.uid]]
