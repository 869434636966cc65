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


async def test_a_burst_after_a_quiet_spell_fills_the_concurrency_limit(tmp_path: Path) -> None:
    """After a quiet spell (workers idle), a burst still runs concurrency_limit at once."""
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
            await p.wait_idle()  # the workers are idle now
        first_wave = max(peaks)
        peaks.clear()
        await p.send(*(Task({"type": "burst"}) for _ in range(40)))
        with anyio.fail_after(10):
            await p.wait_idle()
    assert first_wave <= 2
    assert max(peaks) == 8


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


async def test_stop_when_idle_ends_at_once_with_everything_finished(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Idle workers do not wait out the grace; nothing is handed back, no lease is left."""
    caplog.set_level(logging.INFO, logger="test.recorder")
    Recorder.seen.clear()
    consumer = Recorder(testing.embedded_config(tmp_path))
    async with testing.pipeline(consumer, data_dir=tmp_path) as p:
        await p.send(*(Task({"type": "work", "n": str(i)}) for i in range(5)))
        with anyio.fail_after(10):
            await p.wait_idle()
        stopping = anyio.current_time()
        consumer.stop(grace=60)
        with anyio.fail_after(5):
            while consumer._scopes is not None:
                await anyio.sleep(0.01)
        took = anyio.current_time() - stopping
        tasks = await p.tasks(receiver="test.recorder")
        queued = await p.producer.backend.queue_lengths("test.recorder")
        leases = await p.producer.backend.redis.zcard(keys.leases_key("test.recorder"))
    assert took < 2.0  # far from the 60 s grace: only a blocking pop (0.5 s) to wait for
    assert sorted(Recorder.seen) == [str(i) for i in range(5)]
    assert [t.status for t in tasks] == [TaskState.FINISHED] * 5
    assert sum(queued.values()) == 0 and leases == 0
    messages = [r.getMessage() for r in caplog.records]
    assert "Service test.recorder stopped" in messages
    assert not any("handed back" in m for m in messages)


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


class Gated(Consumer):
    """Handlers record their task and wait for the test to open the gate."""

    identity = "test.gated"
    filters = [{"type": "gated"}]
    concurrency_limit = 2
    gate: ClassVar[anyio.Event]
    seen: ClassVar[list[str]] = []

    async def process(self, task: Task) -> None:
        type(self).seen.append(task.uid)
        await type(self).gate.wait()


async def _wait_for(predicate: Any, what: str, timeout: float = 10.0) -> None:
    with anyio.fail_after(timeout):
        while not await predicate():
            await anyio.sleep(0.01)


async def test_prefetched_tasks_stay_spawned_and_leased_until_their_handler_starts(
    tmp_path: Path,
) -> None:
    """Two handlers, two prefetched: Redis shows 2 Started and 4 Spawned, 4 leased."""
    Gated.gate, Gated.seen = anyio.Event(), []
    async with testing.pipeline(Gated, data_dir=tmp_path) as p:
        redis = p.producer.backend.redis
        sent = [Task({"type": "gated"}) for _ in range(6)]
        await p.send(*sent)

        async def statuses() -> list[str]:
            return sorted(t.status.value for t in await p.tasks(receiver="test.gated"))

        async def settled() -> bool:
            leased = await redis.zcard(keys.leases_key("test.gated"))
            return leased == 4 and (await statuses()).count("Started") == 2

        await _wait_for(settled, "2 Started tasks and 4 leases")
        await anyio.sleep(0.1)  # past the writer's linger: nothing else turns Started
        seen_statuses = await statuses()
        leased = set(await redis.zrange(keys.leases_key("test.gated"), 0, -1))
        running = {
            t.uid for t in await p.tasks(receiver="test.gated") if t.status.value == "Started"
        }
        queued = await redis.lrange(keys.queue_key("normal", "test.gated"), 0, -1)
        Gated.gate.set()
        with anyio.fail_after(10):
            await p.wait_idle()
        final = await statuses()
    assert seen_statuses == ["Spawned"] * 4 + ["Started"] * 2
    assert running == set(Gated.seen[:2])
    assert len(leased - running) == 2  # the prefetched ones: reclaimed if we die
    assert len(queued) == 2 and not (set(queued) & leased)
    assert final == ["Finished"] * 6


async def test_stop_hands_prefetched_tasks_back_at_once_and_drains_the_running_one(
    tmp_path: Path,
) -> None:
    """stop(): what was only prefetched goes back to the head of the queue, in order, at
    once (as Spawned, lease released); only the running handler gets the grace."""

    class Single(Gated):
        identity = "test.single"
        filters = [{"type": "single"}]
        concurrency_limit = 1
        prefetch = 2

    Gated.gate, Gated.seen = anyio.Event(), []
    consumer = Single(testing.embedded_config(tmp_path))
    async with testing.pipeline(consumer, data_dir=tmp_path) as p:
        redis = p.producer.backend.redis
        sent = [Task({"type": "single"}) for _ in range(3)]
        await p.send(*sent)

        async def prefetched() -> bool:
            return len(Gated.seen) == 1 and await redis.zcard(keys.leases_key("test.single")) == 3

        await _wait_for(prefetched, "one running, two prefetched")
        consumer.stop(grace=30)
        queue = keys.queue_key("normal", "test.single")

        async def handed_back() -> bool:
            return await redis.llen(queue) == 2

        await _wait_for(handed_back, "the prefetched tasks back in the queue", timeout=2)
        queued = await redis.lrange(queue, 0, -1)
        leases = await redis.zrange(keys.leases_key("test.single"), 0, -1)
        back = [t for t in await p.tasks(receiver="test.single") if t.uid in queued]
        assert consumer._scopes is not None  # still draining the running handler
        Gated.gate.set()
        with anyio.fail_after(5):
            while consumer._scopes is not None:
                await anyio.sleep(0.01)
        tasks = {t.uid: t for t in await p.tasks(receiver="test.single")}
    running = Gated.seen[0]
    assert Gated.seen == [running]  # nothing was started after stop()
    in_send_order = _receiver_order(tasks, [t.uid for t in sent])
    assert queued == [uid for uid in in_send_order if uid != running]
    assert leases == [running]
    assert [t.status for t in back] == [TaskState.SPAWNED] * 2
    assert tasks[running].status is TaskState.FINISHED


def _receiver_order(tasks: dict[str, Task], originals: list[str]) -> list[str]:
    """The receiver copies' uids, in the order of the tasks they were routed from."""
    by_original = {t.orig_uid: uid for uid, t in tasks.items()}
    return [by_original[uid] for uid in originals]


async def test_reclaim_requeues_a_prefetched_spawned_task_whose_lease_expired(
    tmp_path: Path,
) -> None:
    """A task leased ahead (still Spawned) by a process that died goes back to its queue."""
    async with testing.pipeline(data_dir=tmp_path) as p:
        backend = p.producer.backend
        task = Task({"type": "x"})
        task.status = TaskState.SPAWNED
        task.headers["receiver"] = "test.dead"
        await backend.set_tasks([task])
        await backend.redis.zadd(keys.leases_key("test.dead"), {task.uid: 1})  # long expired
        assert await backend.reclaim("test.dead") == 1
        queued = await backend.redis.lrange(keys.queue_key("normal", "test.dead"), 0, -1)
        body = await backend.get_task_body(task.uid)
    assert queued == [task.uid]
    assert body is not None and Task.unserialize(body).status is TaskState.SPAWNED
