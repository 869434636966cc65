"""Consumer behaviour on the embedded default: crashes, timeouts, hooks, retries, stop."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, ClassVar

import anyio
import anyio.lowlevel
import pytest

from asynckarton import Consumer, Karton, Retry, Task, TaskState, testing
from asynckarton.backend import _keys as keys

pytestmark = pytest.mark.anyio


class Recorder(Consumer):
    identity = "test.recorder"
    filters = [{"type": "work"}]
    seen: ClassVar[list[str]] = []

    async def process(self, task: Task) -> None:
        type(self).seen.append(task.headers.get("n", ""))


class Exploder(Consumer):
    identity = "test.exploder"
    filters = [{"type": "boom"}]

    async def process(self, task: Task) -> None:
        raise ValueError("kaboom")


class Sleeper(Consumer):
    identity = "test.sleeper"
    filters = [{"type": "slow"}]
    task_timeout = 0.2

    async def process(self, task: Task) -> None:
        await anyio.sleep(float(task.payload.get("sleep", 5)))


async def test_a_crashing_handler_marks_the_task_and_keeps_consuming(tmp_path: Path) -> None:
    async with testing.pipeline(Exploder, Recorder, data_dir=tmp_path) as p:
        await p.send(
            Task({"type": "boom"}), Task({"type": "boom"}), Task({"type": "work", "n": "1"})
        )
        await p.wait_idle()
        crashed = await p.tasks(receiver="test.exploder")
        metrics = await p.producer.backend.redis.hgetall(keys.metrics_key("crashed"))
    assert [t.status for t in crashed] == [TaskState.CRASHED, TaskState.CRASHED]
    assert crashed[0].error is not None and "ValueError: kaboom" in "".join(crashed[0].error)
    assert metrics["test.exploder"] == "2"


async def test_fractional_timeout_crashes_with_task_timeout_error(tmp_path: Path) -> None:
    async with testing.pipeline(Sleeper, data_dir=tmp_path) as p:
        await p.send(
            Task({"type": "slow"}, payload={"sleep": 5}),
            Task({"type": "slow"}, payload={"sleep": 0}),
        )
        with anyio.fail_after(5):
            await p.wait_idle()
        tasks = await p.tasks(receiver="test.sleeper")
    by_status = sorted(t.status.value for t in tasks)
    assert by_status == ["Crashed", "Finished"]
    crashed = next(t for t in tasks if t.status is TaskState.CRASHED)
    assert "TaskTimeoutError" in "".join(crashed.error or [])


class Hooked(Consumer):
    identity = "test.hooked"
    filters = [{"type": "hooked"}]
    calls: ClassVar[list[str]] = []

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.add_pre_hook(lambda task: self.calls.append("pre-sync"))
        self.add_pre_hook(self._async_pre, "async-pre")
        self.add_pre_hook(self._broken, "broken")
        self.add_post_hook(lambda task, exc: self.calls.append(f"post:{type(exc).__name__}"))

    async def _async_pre(self, task: Task) -> None:
        await anyio.lowlevel.checkpoint()
        self.calls.append("pre-async")

    def _broken(self, task: Task) -> None:
        raise RuntimeError("hook bug")

    async def process(self, task: Task) -> None:
        self.calls.append("process")
        raise KeyError("x")


async def test_hooks_run_in_order_and_a_failing_hook_is_logged(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.ERROR, logger="test.hooked")
    async with testing.pipeline(Hooked, data_dir=tmp_path) as p:
        await p.send(Task({"type": "hooked"}))
        await p.wait_idle()
    assert Hooked.calls == ["pre-sync", "pre-async", "process", "post:KeyError"]
    assert any("Hook broken failed" in r.getMessage() for r in caplog.records)


class Flaky(Consumer):
    identity = "test.flaky"
    filters = [{"type": "flaky"}]
    max_retries = 2
    retry_backoff = 0.01
    attempts: ClassVar[list[int]] = []

    async def process(self, task: Task) -> None:
        type(self).attempts.append(task.attempt)
        if task.payload.get("mode") == "retry-after":
            raise Retry(after=0.05)
        if task.attempt < 2:
            raise ConnectionError("flaky upstream")


async def test_retries_then_succeeds_with_the_attempt_travelling(tmp_path: Path) -> None:
    Flaky.attempts.clear()
    async with testing.pipeline(Flaky, data_dir=tmp_path) as p:
        await p.send(Task({"type": "flaky"}))
        with anyio.fail_after(10):
            await p.wait_idle()
        [task] = await p.tasks(receiver="test.flaky")
    assert Flaky.attempts == [0, 1, 2]
    assert task.status is TaskState.FINISHED and task.attempt == 2


async def test_last_failed_attempt_is_crashed_and_dead_lettered(tmp_path: Path) -> None:
    Flaky.attempts.clear()
    async with testing.pipeline(Flaky, data_dir=tmp_path) as p:
        await p.send(Task({"type": "flaky"}, payload={"mode": "retry-after"}))
        with anyio.fail_after(10):
            await p.wait_idle()
        [task] = await p.tasks(receiver="test.flaky")
        dead = await p.producer.backend.redis.lrange(keys.dead_key("test.flaky"), 0, -1)
    assert Flaky.attempts == [0, 1, 2]
    assert task.status is TaskState.CRASHED
    assert dead == [task.uid]


class Parent(Karton):
    identity = "test.parent"
    filters = [{"type": "root"}]

    async def process(self, task: Task) -> None:
        await self.send_task(Task({"type": "work", "n": "child"}))


async def test_child_tasks_inherit_tree_persistent_data_and_priority(tmp_path: Path) -> None:
    from asynckarton import TaskPriority

    Recorder.seen.clear()
    async with testing.pipeline(Parent, Recorder, data_dir=tmp_path) as p:
        root = Task(
            {"type": "root"},
            headers_persistent={"tlp": "red"},
            payload_persistent={"case": 7},
            priority=TaskPriority.HIGH,
        )
        await p.send(root)
        await p.wait_idle()
        [child] = await p.tasks(receiver="test.recorder")
        [parent_copy] = await p.tasks(receiver="test.parent")
    assert Recorder.seen == ["child"]
    assert child.root_uid == root.root_uid
    assert child.parent_uid == parent_copy.uid
    assert child.headers["tlp"] == "red" and child.headers["origin"] == "test.parent"
    assert child.payload_persistent["case"] == 7
    assert child.priority is TaskPriority.HIGH


class Blocker(Consumer):
    identity = "test.blocker"
    filters = [{"type": "block"}]
    concurrency_limit = 4
    started = 0

    async def process(self, task: Task) -> None:
        type(self).started += 1
        await anyio.sleep(float(task.payload["sleep"]))


async def test_stop_drains_short_tasks_and_hands_back_long_ones(tmp_path: Path) -> None:
    consumer = Blocker(testing.embedded_config(tmp_path))
    async with testing.pipeline(consumer, data_dir=tmp_path) as p:
        await p.send(
            Task({"type": "block"}, payload={"sleep": 0.2}),
            Task({"type": "block"}, payload={"sleep": 30}),
        )
        with anyio.fail_after(5):
            while Blocker.started < 2:
                await anyio.sleep(0.01)
        consumer.stop(grace=0.5)
        with anyio.fail_after(5):
            while consumer._scopes is not None:
                await anyio.sleep(0.01)
        tasks = await p.tasks(receiver="test.blocker")
        queued = await p.producer.backend.redis.lrange(
            keys.queue_key("normal", "test.blocker"), 0, -1
        )
        leases = await p.producer.backend.redis.zcard(keys.leases_key("test.blocker"))
    statuses = sorted(t.status.value for t in tasks)
    assert statuses == ["Finished", "Spawned"]
    handed_back = next(t for t in tasks if t.status is TaskState.SPAWNED)
    assert queued == [handed_back.uid]
    assert leases == 0


async def test_concurrency_limit_bounds_running_handlers(tmp_path: Path) -> None:
    running = 0
    peak = 0

    class Counter(Consumer):
        identity = "test.counter"
        filters = [{"type": "count"}]
        concurrency_limit = 3

        async def process(self, task: Task) -> None:
            nonlocal running, peak
            running += 1
            peak = max(peak, running)
            await anyio.sleep(0.02)
            running -= 1

    async with testing.pipeline(Counter, data_dir=tmp_path) as p:
        await p.send(*(Task({"type": "count"}) for _ in range(20)))
        with anyio.fail_after(10):
            await p.wait_idle()
    assert peak == 3


async def test_parked_runners_and_new_ones_fill_the_concurrency_limit(tmp_path: Path) -> None:
    """After a quiet spell (runners parked), a burst still runs concurrency_limit at once."""
    running = 0
    peaks: list[int] = []

    class Counter(Consumer):
        identity = "test.burst"
        filters = [{"type": "burst"}]
        concurrency_limit = 8

        async def process(self, task: Task) -> None:
            nonlocal running
            running += 1
            peaks.append(running)
            await anyio.sleep(0.05)
            running -= 1

    async with testing.pipeline(Counter, data_dir=tmp_path) as p:
        await p.send(Task({"type": "burst"}), Task({"type": "burst"}))
        with anyio.fail_after(10):
            await p.wait_idle()  # two runners now parked
        first_wave = max(peaks)
        peaks.clear()
        await p.send(*(Task({"type": "burst"}) for _ in range(40)))
        with anyio.fail_after(10):
            await p.wait_idle()
    assert first_wave <= 2
    assert max(peaks) == 8


def test_dispatch_wakes_parked_runners_and_starts_runners_for_the_rest(
    tmp_path: Path,
) -> None:
    """A burst bigger than the parked runners starts new ones, up to the limit."""
    consumer = Recorder(testing.embedded_config(tmp_path))
    started: list[Any] = []

    class Group:
        def start_soon(self, func: Any, *args: Any) -> None:
            started.append(args[0])

    consumer._handle_seconds = 0.05  # handlers that suspend (I/O-bound)
    parked = [anyio.Event(), anyio.Event()]
    consumer._parked.extend(parked)
    consumer._runners = 2
    tasks = [Task({"type": "work"}) for _ in range(12)]
    consumer._dispatch(Group(), tasks, 8)  # type: ignore[arg-type]
    assert [e.is_set() for e in parked] == [True, True]  # both woken at once
    assert not consumer._parked
    assert started == tasks[:6]  # 2 parked + 6 new = the limit of 8
    assert list(consumer._ready) == tasks[6:]
    consumer._dispatch(Group(), [Task({"type": "work"})], 8)  # type: ignore[arg-type]
    assert len(started) == 6  # at the limit: queued, no new runner
    more = [anyio.Event(), anyio.Event(), anyio.Event()]
    consumer._parked.extend(more)
    consumer._ready.clear()
    consumer._dispatch(Group(), [Task({"type": "work"})], 8)  # type: ignore[arg-type]
    assert [e.is_set() for e in more] == [True, False, False]  # one task, one wake
    consumer._handle_seconds = 0.00005  # quick handlers: the first woken drains the rest
    quick = [anyio.Event(), anyio.Event(), anyio.Event()]
    consumer._parked.clear()
    consumer._parked.extend(quick)
    consumer._dispatch(Group(), [Task({"type": "work"}) for _ in range(3)], 8)  # type: ignore[arg-type]
    assert [e.is_set() for e in quick] == [True, False, False]


async def test_tasks_left_by_a_quick_batch_get_parked_runners_soon(tmp_path: Path) -> None:
    """One runner drains a quick batch; if its handler suspends instead, the rest of the
    batch must not wait for it with runners parked (here: within STRANDED_AFTER)."""
    from asynckarton._services._consumer import STRANDED_AFTER

    consumer = Recorder(testing.embedded_config(tmp_path))
    consumer._handle_seconds = 0.00005  # so far every task was quick
    parked = [anyio.Event() for _ in range(3)]
    consumer._parked.extend(parked)
    consumer._runners = 3

    class Group:
        def start_soon(self, func: Any, *args: Any) -> None:
            raise AssertionError("no new runner: all three exist")

    async with anyio.create_task_group() as group:
        group.start_soon(consumer._unstrand)
        consumer._dispatch(Group(), [Task({"type": "work"}) for _ in range(3)], 3)  # type: ignore[arg-type]
        assert [e.is_set() for e in parked] == [True, False, False]
        consumer._ready.popleft()  # the woken runner takes one, then suspends in it
        with anyio.fail_after(STRANDED_AFTER + 2):
            while not all(e.is_set() for e in parked[1:]):
                await anyio.sleep(0.001)
        group.cancel_scope.cancel()


async def test_finished_tasks_are_written_when_run_is_cancelled(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Cancelling run() from outside (not stop()) still records what already finished."""
    from asynckarton._services import _completion

    monkeypatch.setattr(_completion, "LINGER", 5.0)  # the writer is surely lingering
    done = anyio.Event()

    class Quick(Consumer):
        identity = "test.cancelled"
        filters = [{"type": "cancelled"}]

        async def process(self, task: Task) -> None:
            done.set()

    async with testing.pipeline(data_dir=tmp_path) as p:
        consumer = Quick(p.config)
        async with consumer, anyio.create_task_group() as group:
            await group.start(consumer.run)
            await p.send(Task({"type": "cancelled"}))
            with anyio.fail_after(10):
                await done.wait()
            await anyio.sleep(0.05)
            group.cancel_scope.cancel()
        [task] = await p.tasks(receiver="test.cancelled")
    assert task.status is TaskState.FINISHED


async def test_stop_with_parked_runners_does_not_wait_for_the_grace(tmp_path: Path) -> None:
    consumer = Recorder(testing.embedded_config(tmp_path))
    async with testing.pipeline(consumer, data_dir=tmp_path) as p:
        await p.send(*(Task({"type": "work", "n": str(i)}) for i in range(5)))
        with anyio.fail_after(10):
            await p.wait_idle()
        consumer.stop(grace=60)
        with anyio.fail_after(2):
            while consumer._scopes is not None:
                await anyio.sleep(0.01)


async def test_rejected_when_filters_no_longer_match(tmp_path: Path) -> None:
    """A task routed under an older bind is finished without processing, as in Karton."""
    Recorder.seen.clear()
    async with testing.pipeline(Recorder, data_dir=tmp_path) as p:
        stale = Task({"type": "other"})
        stale.status = TaskState.SPAWNED
        stale.headers["receiver"] = "test.recorder"
        await p.producer.backend.set_tasks([stale])
        await p.producer.backend.redis.rpush(keys.queue_key("normal", "test.recorder"), stale.uid)
        await p.wait_idle()
        [task] = await p.tasks(receiver="test.recorder")
    assert task.status is TaskState.FINISHED
    assert Recorder.seen == []


class Blocking(Consumer):
    identity = "test.blocking"
    filters = [{"type": "blocking"}]

    async def process(self, task: Task) -> None:
        import time

        time.sleep(0.9)  # noqa: ASYNC251 - deliberately blocks the event loop


async def test_loop_lag_watchdog_names_the_blocking_task(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="test.blocking")
    async with testing.pipeline(Blocking, data_dir=tmp_path) as p:
        task = Task({"type": "blocking"})
        await p.send(task)
        await p.wait_idle()
        [routed] = await p.tasks(receiver="test.blocking")
    warnings = [r.getMessage() for r in caplog.records if "Event loop blocked" in r.getMessage()]
    assert warnings and routed.uid in warnings[0]


def _cpu_bound(n: int) -> int:
    import time

    time.sleep(n)
    return n * 2


class Offloader(Consumer):
    identity = "test.offloader"
    filters = [{"type": "offload"}]
    task_timeout = 8.0  # worker-process start-up (imports) takes a second or two here
    results: ClassVar[list[int]] = []

    async def process(self, task: Task) -> None:
        from asynckarton import to_process, to_thread

        seconds = int(task.payload["seconds"])
        type(self).results.append(await to_thread(lambda: seconds + 1))
        type(self).results.append(await to_process(_cpu_bound, seconds))


async def test_to_process_returns_results_and_is_killed_on_timeout(tmp_path: Path) -> None:
    Offloader.results.clear()
    async with testing.pipeline(Offloader, data_dir=tmp_path) as p:
        await p.send(Task({"type": "offload"}, payload={"seconds": 0}))
        await p.wait_idle(timeout=20)
        await p.send(Task({"type": "offload"}, payload={"seconds": 60}))
        with anyio.fail_after(20):  # far less than the 60 s the worker would sleep
            await p.wait_idle(timeout=20)
        tasks = await p.tasks(receiver="test.offloader")
    assert Offloader.results == [1, 0, 61], [(t.status, t.error) for t in tasks]
    assert sorted(t.status.value for t in tasks) == ["Crashed", "Finished"]
    crashed = next(t for t in tasks if t.status is TaskState.CRASHED)
    assert "TaskTimeoutError" in "".join(crashed.error or [])


async def test_stop_returns_promptly_when_idle_and_when_busy(tmp_path: Path) -> None:
    """The fetch loop's shielded fetch must never make stop() wait for ever."""
    consumer = Recorder(testing.embedded_config(tmp_path))
    async with testing.pipeline(consumer, data_dir=tmp_path) as p:
        await anyio.sleep(0.3)  # idle: blocked in the (shielded) blocking pop
        consumer.stop(grace=1)
        with anyio.fail_after(3):
            while consumer._scopes is not None:
                await anyio.sleep(0.01)
        await p.send(Task({"type": "work", "n": "after-stop"}))
        await anyio.sleep(0.3)
        queued = await p.producer.backend.queue_lengths("test.recorder")
    assert sum(queued.values()) == 1  # a stopped consumer takes nothing more


async def test_reclaim_requeues_expired_leases_as_spawned_keeping_the_body(tmp_path: Path) -> None:
    """Only the top-level status changes: floats and big integers survive the Lua rewrite."""
    async with testing.pipeline(data_dir=tmp_path) as p:
        backend = p.producer.backend
        task = Task({"type": "x", "status": "Started"}, payload={"big": 2**70, "f": 0.1})
        task.status, task.last_update = TaskState.STARTED, 1795349442.417694
        task.headers["receiver"] = "test.dead"
        await backend.set_tasks([task])
        await backend.redis.zadd(keys.leases_key("test.dead"), {task.uid: 1})  # long expired
        assert await backend.reclaim("test.dead") == 1
        body = await backend.get_task_body(task.uid)
        queued = await backend.redis.lrange(keys.queue_key("normal", "test.dead"), 0, -1)
    assert body is not None
    back = Task.unserialize(body)
    assert back.status is TaskState.SPAWNED
    assert back.headers["status"] == "Started"  # a header of the same name is untouched
    assert back.payload == {"big": 2**70, "f": 0.1} and back.last_update == 1795349442.417694
    assert queued == [task.uid]
