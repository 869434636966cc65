"""The dispatcher, driven through its API: a fixed worker pool fed by one fetch loop."""

from __future__ import annotations

import anyio
import anyio.lowlevel
import pytest

from asynckarton._services._dispatch import Dispatcher

pytestmark = pytest.mark.anyio


class Source:
    """A queue the dispatcher fetches from; records every request."""

    def __init__(self, items: int = 0) -> None:
        self.items = list(range(items))
        self.asked: list[int] = []
        self.arrived = anyio.Event()
        self.released: list[int] = []

    def add(self, count: int) -> None:
        start = len(self.asked) * 1000 + len(self.items) + 10_000
        self.items.extend(range(start, start + count))
        self.arrived.set()

    async def fetch(self, count: int) -> list[int]:
        self.asked.append(count)
        if not self.items:
            with anyio.move_on_after(0.05):
                await self.arrived.wait()
            self.arrived = anyio.Event()
        taken, self.items = self.items[:count], self.items[count:]
        return taken

    async def release(self, items: list[int]) -> None:
        await anyio.lowlevel.checkpoint()
        self.released.extend(items)


class Gate:
    """A handler that records items as they start and holds them until opened."""

    def __init__(self) -> None:
        self.started: list[int] = []
        self.finished: list[int] = []
        self.running = 0
        self.peak = 0
        self.opened = anyio.Event()

    async def handle(self, item: int) -> None:
        self.started.append(item)
        self.running += 1
        self.peak = max(self.peak, self.running)
        try:
            await self.opened.wait()
        finally:
            self.running -= 1
        self.finished.append(item)


async def _until(predicate: object, timeout: float = 5.0) -> None:
    assert callable(predicate)
    with anyio.fail_after(timeout):
        while not predicate():
            await anyio.sleep(0.005)


def test_bad_sizes_are_refused() -> None:
    with pytest.raises(ValueError, match="at least one worker"):
        Dispatcher(Gate().handle, workers=0)
    with pytest.raises(ValueError, match="prefetch must be >= 0"):
        Dispatcher(Gate().handle, workers=1, prefetch=-1)


async def test_runs_at_most_workers_at_once_and_holds_at_most_workers_plus_prefetch() -> None:
    source, gate = Source(20), Gate()
    dispatcher = Dispatcher(gate.handle, workers=3, prefetch=2)
    async with anyio.create_task_group() as group:
        await group.start(dispatcher.run, source.fetch, source.release)
        await _until(lambda: dispatcher.running == 3 and dispatcher.buffered == 2)
        await anyio.sleep(0.1)  # nothing more is taken while nothing is free
        held = (dispatcher.running, dispatcher.buffered, len(source.items))
        gate.opened.set()
        await _until(lambda: len(gate.finished) == 20)
        dispatcher.stop()
    assert dispatcher.capacity == 5
    assert held == (3, 2, 15)
    assert gate.peak == 3
    assert gate.started == list(range(20))  # in arrival order
    assert source.released == []


async def test_asks_for_all_the_room_when_empty_and_waits_for_a_quarter_otherwise() -> None:
    source, gate = Source(), Gate()
    dispatcher = Dispatcher(gate.handle, workers=4, prefetch=4)  # capacity 8, quarter 2
    async with anyio.create_task_group() as group:
        await group.start(dispatcher.run, source.fetch, source.release)
        await _until(lambda: len(source.asked) >= 1)
        assert source.asked[-1] == 8  # nothing in hand: all of it
        source.add(8)
        await _until(lambda: dispatcher.running == 4 and dispatcher.buffered == 4)
        asked = len(source.asked)
        source.add(10)
        await anyio.sleep(0.1)
        assert len(source.asked) == asked  # full: no fetch at all
        gate.opened.set()
        await _until(lambda: len(gate.finished) == 18)
        dispatcher.stop()
    assert all(1 <= n <= 8 for n in source.asked)
    assert gate.started[:8] == sorted(gate.started[:8])


async def test_quick_items_run_back_to_back_on_one_worker_without_waking_the_others() -> None:
    """Handlers that never suspend: every item still runs, in order, none is lost."""
    done: list[int] = []

    async def quick(item: int) -> None:
        done.append(item)

    source = Source(500)
    dispatcher = Dispatcher(quick, workers=8, prefetch=8)
    async with anyio.create_task_group() as group:
        await group.start(dispatcher.run, source.fetch, source.release)
        await _until(lambda: len(done) == 500)
        dispatcher.stop()
    assert done == list(range(500))


async def test_stop_releases_the_buffered_items_at_once_and_lets_running_ones_finish() -> None:
    source, gate = Source(6), Gate()
    dispatcher = Dispatcher(gate.handle, workers=2, prefetch=3)
    returned = anyio.Event()

    async def run() -> None:
        await dispatcher.run(source.fetch, source.release)
        returned.set()

    async with anyio.create_task_group() as group:
        group.start_soon(run)
        await _until(lambda: dispatcher.running == 2 and dispatcher.buffered == 3)
        dispatcher.stop()
        await _until(lambda: len(source.released) == 3, timeout=1)
        assert not returned.is_set()  # the two running items hold run() open
        assert dispatcher.buffered == 0
        gate.opened.set()
        with anyio.fail_after(2):
            await returned.wait()
    assert gate.started == [0, 1]
    assert sorted(gate.finished) == [0, 1]
    assert source.released == [2, 3, 4]
    assert source.items == [5]  # never fetched after stop()


async def test_items_a_fetch_returns_after_stop_are_released_not_started() -> None:
    """stop() during a fetch: what that fetch still brings back is released."""
    fetching = anyio.Event()
    released: list[int] = []
    started: list[int] = []

    async def slow_fetch(count: int) -> list[int]:
        fetching.set()
        with anyio.CancelScope(shield=True):  # like a fetch that must not be interrupted
            await anyio.sleep(0.1)
        return [1, 2]

    async def handle(item: int) -> None:
        started.append(item)

    async def release(items: list[int]) -> None:
        released.extend(items)

    dispatcher = Dispatcher(handle, workers=2)
    async with anyio.create_task_group() as group:
        group.start_soon(dispatcher.run, slow_fetch, release)
        await fetching.wait()
        dispatcher.stop()
    assert started == []
    assert released == [1, 2]


async def test_cancelled_from_outside_it_still_releases_the_buffered_items() -> None:
    source, gate = Source(4), Gate()
    dispatcher = Dispatcher(gate.handle, workers=1, prefetch=2)
    async with anyio.create_task_group() as group:
        await group.start(dispatcher.run, source.fetch, source.release)
        await _until(lambda: dispatcher.running == 1 and dispatcher.buffered == 2)
        group.cancel_scope.cancel()
    assert gate.started == [0]
    assert gate.finished == []  # the running handler was cancelled (it owns its item)
    assert source.released == [1, 2]


async def test_a_dispatcher_runs_once_and_stop_before_run_fetches_nothing() -> None:
    source = Source(3)
    dispatcher = Dispatcher(Gate().handle, workers=1)
    dispatcher.stop()
    with anyio.fail_after(1):
        await dispatcher.run(source.fetch, source.release)
    assert source.asked == []
    with pytest.raises(RuntimeError, match="runs once"):
        await dispatcher.run(source.fetch, source.release)
