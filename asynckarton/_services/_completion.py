"""Completion writer: a consumer's started and finished tasks reach Redis in batches.

Handlers hand their task to :class:`Completer` when they start it and when it is finished,
and move on; the writer task writes everything that accumulated: the Started bodies of
tasks that have been running for ``STARTED_AFTER`` seconds (one MSET), then the final ones
in one MULTI/EXEC (final bodies, lease release, metrics; one ``allow-oom`` script when
Redis is over ``maxmemory``).  A task that finishes sooner is
written once, in its final state (most tasks: a Started write would cost a serialisation
and an MSET for a state nobody sees); the one writer keeps a Started write ahead of the
final one.  Until the final write succeeds the task keeps its lease (renewed like any
other), so a crash before the write means redelivery, never loss.  Redis errors keep the
batch and retry with backoff.
"""

from __future__ import annotations

import collections
import logging
import time
from dataclasses import dataclass

import anyio

from .._wire._task import Task, TaskState
from ..backend import KartonBackend
from ..backend._guard import TRANSIENT_ERRORS

__all__ = ["Completer"]

LINGER = 0.002  # seconds a small batch of finished tasks waits for more
STARTED_AFTER = 0.05  # seconds a task runs before its Started state is written
COALESCE_BELOW = 16  # batches this small linger


@dataclass(slots=True)
class _Done:
    task: Task
    crashed: bool
    dead: bool


class Completer:
    """Batches final task writes for one consumer identity."""

    def __init__(
        self,
        backend: KartonBackend,
        identity: str,
        leased: dict[str, Task],
        log: logging.Logger,
    ) -> None:
        self._backend = backend
        self._identity = identity
        self._leased = leased
        self._log = log
        self._pending: list[_Done] = []
        self._started: collections.deque[tuple[float, Task]] = collections.deque()
        self._wake = anyio.Event()

    def started(self, task: Task) -> None:
        """Queue ``task`` (its status already Started) for a Started write."""
        if not self._started:
            self._wake.set()  # the writer learns of a new deadline
        self._started.append((time.monotonic(), task))

    def add(self, task: Task, *, crashed: bool, dead: bool = False) -> None:
        """Queue ``task`` (already in its final state) for writing."""
        self._pending.append(_Done(task, crashed, dead))
        self._wake.set()

    async def run(self) -> None:
        """Write batches as they accumulate, until cancelled.

        A small batch waits ``LINGER`` seconds for company first: handlers that finish
        one at a time (I/O-bound ones) would otherwise cost a round trip each.
        """
        while True:
            if self._started:
                due = self._started[0][0] + STARTED_AFTER - time.monotonic()
                with anyio.move_on_after(due):
                    await self._wake.wait()
            else:
                await self._wake.wait()
            if self._wake.is_set():
                self._wake = anyio.Event()
                if self._pending and len(self._pending) < COALESCE_BELOW:
                    await anyio.sleep(LINGER)
            await self._write_pending()

    async def drain(self, timeout: float = 30.0) -> None:
        """Write whatever is pending (used at shutdown, shielded by the caller)."""
        with anyio.move_on_after(timeout):
            await self._write_pending(everything=True)
        if self._pending:
            self._log.error(
                "%d finished task(s) could not be recorded; they will be redelivered",
                len(self._pending),
            )

    def _due_started(self, everything: bool) -> list[tuple[float, Task]]:
        """Take the Started entries that are due (all of them with ``everything``)."""
        due: list[tuple[float, Task]] = []
        started = self._started
        deadline = time.monotonic() - STARTED_AFTER
        while started and (everything or started[0][0] <= deadline):
            due.append(started.popleft())
        return due

    async def _write_pending(self, *, everything: bool = False) -> None:
        backoff = 0.2
        while True:
            started = self._due_started(everything)
            batch, self._pending = self._pending, []
            if not batch and not started:
                return
            try:
                with anyio.CancelScope(shield=True):
                    await self._write_started([task for _, task in started])
                    started = []
                    await self._write(batch)
            except TRANSIENT_ERRORS as exc:
                self._pending[:0] = batch
                self._started.extendleft(reversed(started))
                self._log.warning("Redis unavailable (%s); retrying in %.1fs", exc, backoff)
                await anyio.sleep(backoff)
                backoff = min(backoff * 2, 5.0)

    async def _write_started(self, started: list[Task]) -> None:
        """Write the tasks still Started (the others' later state is written instead)."""
        running = [task for task in started if task.status is TaskState.STARTED]
        if running:
            await self._backend.set_tasks(running)

    async def _write(self, batch: list[_Done]) -> None:
        if not batch:
            return
        tasks = [done.task for done in batch]
        crashed = sum(1 for done in batch if done.crashed)
        await self._backend.complete(self._identity, tasks, crashed)
        dead = [done.task.uid for done in batch if done.dead]
        if dead:
            await self._backend.dead_letter(self._identity, dead)
        for task in tasks:
            self._leased.pop(task.uid, None)
