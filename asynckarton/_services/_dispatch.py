"""Dispatch: a fixed pool of workers fed by one fetch loop.

A fixed pool of ``workers`` long-lived workers takes items one at a time, in arrival
order, from an in-memory buffer, so an item starts as soon as a worker is free.  One
fetch loop keeps at most ``workers + prefetch`` items in hand (running or buffered) and
asks for all the free room at once whenever the buffer is empty or a quarter of it is
free.

:meth:`Dispatcher.stop` ends fetching at once and takes the buffered items out of reach
of the workers: :meth:`Dispatcher.run` hands them to ``release`` straight away (also when
it is cancelled instead), lets the running handlers finish and returns.  A worker that
finishes an item takes the next buffered one without suspending, so quick handlers run
back to back; an idle worker waits on its own event, woken one per fetched item.
"""

from __future__ import annotations

import collections
from collections.abc import Awaitable, Callable, Sequence
from typing import Generic, TypeVar

import anyio
from anyio.abc import TaskStatus

__all__ = ["Dispatcher"]

T = TypeVar("T")

MAX_BATCH = 256  # items asked for in one fetch at most


class Dispatcher(Generic[T]):
    """Run ``handle(item)`` on ``workers`` workers for items a fetch function provides.

    ``handle`` owns an item once called: it must deal with its own errors and with
    cancellation (the dispatcher never retries nor releases an item it started).
    """

    def __init__(
        self, handle: Callable[[T], Awaitable[object]], *, workers: int, prefetch: int = 0
    ) -> None:
        if workers < 1:
            raise ValueError(f"a dispatcher needs at least one worker, got {workers}")
        if prefetch < 0:
            raise ValueError(f"prefetch must be >= 0, got {prefetch}")
        self._handle = handle
        self._workers = workers
        self._capacity = workers + prefetch
        self._buffer: collections.deque[T] = collections.deque()
        self._idle: collections.deque[anyio.Event] = collections.deque()
        self._held = 0  # running + buffered
        self._room = anyio.Event()  # set when a worker frees a place
        self._open = False
        self._ran = False
        self._stopped = False
        self._unstarted: list[T] = []
        self._fetching: anyio.CancelScope | None = None

    @property
    def capacity(self) -> int:
        """Items in hand at most: ``workers + prefetch``."""
        return self._capacity

    @property
    def running(self) -> int:
        """Items whose handler has started and not returned yet."""
        return self._held - len(self._buffer)

    @property
    def buffered(self) -> int:
        """Items fetched and waiting for a worker."""
        return len(self._buffer)

    def stop(self) -> None:
        """Stop fetching now; buffered items are released, running ones finish."""
        self._stopped = True
        self._open = False
        self._take_unstarted()
        if self._fetching is not None:
            self._fetching.cancel()

    async def run(
        self,
        fetch: Callable[[int], Awaitable[Sequence[T]]],
        release: Callable[[list[T]], Awaitable[object]],
        *,
        task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
    ) -> None:
        """Fetch and handle items until :meth:`stop`, then drain and return.

        ``fetch(n)`` returns at most ``n`` items (it may wait for them, and should return
        an empty sequence now and then while there are none).  Items it returned are
        buffered before anything can cancel the loop, so none is lost between a fetch
        and ``release``.  ``release(items)`` is awaited, shielded, for every item that was
        fetched but never started, once fetching has stopped.
        """
        if self._ran:
            raise RuntimeError("a Dispatcher runs once")
        self._ran = True
        if self._stopped:  # stopped before it started: nothing to fetch or drain
            task_status.started()
            return
        self._open = True
        try:
            async with anyio.create_task_group() as workers:
                for _ in range(self._workers):
                    workers.start_soon(self._worker)
                with anyio.CancelScope() as self._fetching:
                    task_status.started()
                    await self._fetch_loop(fetch)
                self._open = False
                self._take_unstarted()
                await self._release(release)
        finally:
            self._open = False
            self._take_unstarted()
            await self._release(release)

    def _take_unstarted(self) -> None:
        """Move the buffer out of the workers' reach and wake the idle ones (to exit)."""
        self._unstarted.extend(self._buffer)
        self._held -= len(self._buffer)
        self._buffer.clear()
        while self._idle:
            self._idle.popleft().set()

    async def _release(self, release: Callable[[list[T]], Awaitable[object]]) -> None:
        items, self._unstarted = self._unstarted, []
        if items:
            with anyio.CancelScope(shield=True):
                await release(items)

    async def _fetch_loop(self, fetch: Callable[[int], Awaitable[Sequence[T]]]) -> None:
        capacity = self._capacity
        quarter = max(1, capacity // 4)
        while True:
            room = capacity - self._held
            while room <= 0 or (self._buffer and room < quarter):
                self._room = anyio.Event()
                await self._room.wait()
                room = capacity - self._held
            items = await fetch(min(room, MAX_BATCH))
            if items:  # no checkpoint between the fetch and here: nothing is dropped
                self._push(items)

    def _push(self, items: Sequence[T]) -> None:
        self._buffer.extend(items)
        self._held += len(items)
        for _ in range(min(len(items), len(self._idle))):
            self._idle.popleft().set()

    async def _worker(self) -> None:
        buffer = self._buffer
        while True:
            while buffer:
                item = buffer.popleft()
                try:
                    await self._handle(item)
                finally:
                    self._held -= 1
                    self._room.set()
            if not self._open:
                return
            wake = anyio.Event()
            self._idle.append(wake)
            await wake.wait()
