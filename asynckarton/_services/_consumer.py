"""Consumer: take routed tasks for one identity and run ``async def process(task)``.

Structure (one task group per concern, all owned by ``run``)::

    run ─┬─ background: bind watcher (on the named presence connection), lease renewer +
         │              reclaimer, retry releaser, completion writer
         └─ lifetime scope ── work group ── handlers (≤ concurrency_limit at once)
                          └── fetching scope ── fetch loop

Fetching is cancel-safe: a batch is popped and leased in one Lua call, which runs
shielded; a task whose consumer dies is requeued when its lease expires.  ``stop(grace)``
cancels fetching at once and gives in-flight handlers ``grace`` seconds; handlers still
running then are cancelled and their tasks handed back to the queue (not Crashed).
"""

from __future__ import annotations

import argparse
import collections
import importlib
import inspect
import logging
import random
import time
import traceback
from collections.abc import Callable
from typing import Any, ClassVar

import anyio
from anyio.abc import TaskGroup, TaskStatus

from .._errors import ConfigError, InvalidTaskError, Retry, TaskTimeoutError
from .._settings._config import Config
from .._settings._options import add_consumer_arguments, consumer_config_from_args
from .._wire._query import compile_filters
from .._wire._task import Task, TaskState, current_task
from ..backend import TRANSIENT_ERRORS, Bind, until_done
from ._completion import Completer
from ._concurrency import ConcurrencyControlType, ConcurrencyGate  # concurrency control
from ._logging import RecordMaker, needs_record
from ._service import ServiceBase

__all__ = ["Consumer"]

PreHook = Callable[[Task], Any]
PostHook = Callable[[Task, BaseException | None], Any]

BIND_CHECK_INTERVAL = 5.0
LOOP_LAG_PROBE = 0.25  # seconds between event-loop lag probes
LOOP_LAG_WARNING = 0.5  # lag (seconds) that earns a warning naming the running tasks
BLOCKING_POP_TIMEOUT = 0.5
QUICK_HANDLER = 0.001  # seconds: tasks handled faster than this are drained by one runner
STRANDED_AFTER = 0.002  # seconds before tasks left behind by a quick batch get runners


def _load_exception(dotted: str) -> type[BaseException]:
    module, _, name = dotted.strip().rpartition(".")
    try:
        value = getattr(importlib.import_module(module or "builtins"), name)
    except (ImportError, AttributeError) as exc:
        raise ConfigError(f"cannot import exception {dotted!r}: {exc}") from None
    if not (isinstance(value, type) and issubclass(value, BaseException)):
        raise ConfigError(f"{dotted!r} is not an exception class")
    return value


class Consumer(ServiceBase):
    """Base class of a service that processes tasks matching ``filters``.

    Class attributes (each overridable by ``[karton]`` config and CLI options):
        identity, filters, persistent, version: as in Karton.
        concurrency_limit: handlers running at once (default 1, as Karton's asyncio).
        prefetch: tasks taken ahead of free handlers (default concurrency_limit, 0 for a
            sequential consumer; ``[karton] prefetch``): keeps handlers busy without a
            round trip between tasks.  Long tasks with several replicas: set it to 0, so
            no task waits behind a busy replica while another is idle.
        task_timeout: seconds per task (fractions allowed); None = config, 0 = none.
        max_retries, retry_for, retry_backoff, retry_backoff_max: automatic retries.
        lease_timeout: seconds after which a dead consumer's task is redelivered.
    """

    filters: ClassVar[list[dict[str, Any]]] = []
    persistent: ClassVar[bool] = True
    concurrency_limit: ClassVar[int | None] = None
    task_timeout: ClassVar[float | None] = None
    max_retries: ClassVar[int | None] = None
    retry_for: ClassVar[tuple[type[BaseException], ...]] = (Exception,)
    retry_backoff: ClassVar[float] = 1.0
    retry_backoff_max: ClassVar[float] = 300.0
    lease_timeout: ClassVar[float | None] = None
    #: Tasks taken ahead of free workers (default: concurrency_limit; 0 when it is 1).
    prefetch: ClassVar[int | None] = None
    # concurrency control (pynenc's options; see asynckarton._services._concurrency)
    running_concurrency: ClassVar[ConcurrencyControlType | str] = ConcurrencyControlType.DISABLED
    registration_concurrency: ClassVar[ConcurrencyControlType | str] = "disabled"
    key_arguments: ClassVar[tuple[str, ...]] = ()
    on_diff_non_key_args_raise: ClassVar[bool] = False
    reroute_on_concurrency_control: ClassVar[bool] = False

    def __init__(self, config: Config | None = None, identity: str | None = None) -> None:
        super().__init__(config, identity)
        if self.filters is None:
            raise ValueError("filters must be a list of dicts (use [] to match nothing)")
        self._match = compile_filters(list(self.filters))
        self._read_policy(self.config)
        self._gate = ConcurrencyGate.for_consumer(self)  # concurrency control
        self._pre_hooks: list[tuple[str | None, PreHook]] = []
        self._post_hooks: list[tuple[str | None, PostHook]] = []
        self._scopes: tuple[anyio.CancelScope, anyio.CancelScope] | None = None
        self._leased: dict[str, Task] = {}
        self._completer: Completer | None = None
        self._background: TaskGroup | None = None
        self._running: set[str] = set()
        self._runners = self._outstanding = 0
        self._ready: collections.deque[Task] = collections.deque()  # fetched, not yet running
        self._parked: collections.deque[anyio.Event] = collections.deque()  # idle runners
        self._fetching = False
        self._handle_seconds = -1.0  # moving average of a task's wall time (< 0: none yet)
        self._maybe_stranded = anyio.Event()
        self._worker_freed = anyio.Event()
        self._blocking: Any = None
        self._ran_since_probe: set[str] = set()  # handlers active since the last lag probe
        self._record_maker: RecordMaker | None = None

    def _read_policy(self, config: Config) -> None:
        settings = config.karton_settings()
        cls = type(self)
        persistent = settings.persistent if settings.persistent is not None else cls.persistent
        self.persistent = bool(persistent) and not self.debug  # type: ignore[misc]
        self.concurrency_limit = settings.concurrency_limit or cls.concurrency_limit or 1  # type: ignore[misc]
        timeout = settings.task_timeout if cls.task_timeout is None else cls.task_timeout
        self.task_timeout = timeout or None  # type: ignore[misc]
        retries = settings.max_retries if settings.max_retries is not None else cls.max_retries
        self.max_retries = retries or 0  # type: ignore[misc]
        if settings.retry_for:
            self.retry_for = tuple(_load_exception(name) for name in settings.retry_for)  # type: ignore[misc]
        if settings.retry_backoff is not None:
            self.retry_backoff = settings.retry_backoff  # type: ignore[misc]
        if settings.retry_backoff_max is not None:
            self.retry_backoff_max = settings.retry_backoff_max  # type: ignore[misc]
        self.lease_timeout = cls.lease_timeout or settings.lease_timeout  # type: ignore[misc]
        self.shutdown_grace = settings.shutdown_grace
        prefetch = config.getint("karton", "prefetch")
        if prefetch is None:
            limit = self.concurrency_limit
            prefetch = cls.prefetch if cls.prefetch is not None else (limit if limit > 1 else 0)
        if prefetch < 0:
            raise ConfigError(
                "prefetch must be >= 0", section="karton", option="prefetch", value=prefetch,
                source=config.source("karton", "prefetch"),
            )  # fmt: skip
        self.prefetch = prefetch  # type: ignore[misc]

    @classmethod
    def args_parser(cls) -> argparse.ArgumentParser:
        """Karton's flags plus ``--non-persistent``, ``--task-timeout``, ``--grace``..."""
        parser = super().args_parser()
        add_consumer_arguments(parser)
        return parser

    @classmethod
    def config_from_args(cls, config: Config, args: argparse.Namespace) -> None:
        """Copy consumer flags into ``[karton]``."""
        super().config_from_args(config, args)
        consumer_config_from_args(config, args)

    # -- user API -------------------------------------------------------------------------

    async def process(self, task: Task) -> None:
        """Handle one task (override this)."""
        raise NotImplementedError(f"{type(self).__name__} must define async def process()")

    def add_pre_hook(self, callback: PreHook, name: str | None = None) -> None:
        """Run ``callback(task)`` (sync or async) before each task."""
        self._pre_hooks.append((name, callback))

    def add_post_hook(self, callback: PostHook, name: str | None = None) -> None:
        """Run ``callback(task, exception_or_None)`` (sync or async) after each task."""
        self._post_hooks.append((name, callback))

    @property
    def bind(self) -> Bind:
        """This consumer's registration in ``karton.binds``."""
        return Bind(
            identity=self.identity,
            filters=list(self.filters),
            info=type(self).__doc__,
            persistent=self.persistent,
            service_version=self.version,
        )

    def stop(self, *, grace: float | None = None) -> None:
        """Stop fetching now; cancel (and hand back) what still runs after ``grace`` s."""
        if self._scopes is None:
            return
        lifetime, fetching = self._scopes
        fetching.cancel()
        grace = self.shutdown_grace if grace is None else grace
        if grace <= 0:
            lifetime.cancel()
        else:
            deadline = anyio.current_time() + grace
            lifetime.deadline = min(lifetime.deadline, deadline)

    # -- main loop ------------------------------------------------------------------------

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Register the bind and process tasks until :meth:`stop` (or cancellation)."""
        if self._stack is None:
            async with self:
                await self._run(task_status)
        else:
            await self._run(task_status)

    async def _run(self, task_status: TaskStatus[None]) -> None:
        presence = self.backend.connector.named(self.client_name)
        blocking = self.backend.connector.blocking()
        try:
            # Online (named) before the bind exists: Karton's GC order.  A service started
            # while Redis is down or loading waits for it, like one that lost it later.
            await until_done(presence.ping, log=self.log, what="connect")
            await until_done(self._register, log=self.log, what="register the bind")
            self._completer = Completer(self.backend, self.identity, self._leased, self.log)
            async with anyio.create_task_group() as background:
                self._background = background
                background.start_soon(self._completer.run)
                background.start_soon(self._watch_bind, presence)
                background.start_soon(self._keep_leases)
                background.start_soon(self._watch_loop_lag)
                background.start_soon(self._unstrand)
                background.start_soon(self._gate.run)  # concurrency control
                self._blocking = blocking
                stopped = False
                try:
                    await self._consume(task_status)
                    stopped = True
                finally:  # finished tasks are written even when run() is cancelled
                    with anyio.CancelScope(shield=True):
                        await self._completer.drain(30.0 if stopped else 5.0)
                background.cancel_scope.cancel()
        finally:
            self._scopes = None
            self._background = None
            with anyio.CancelScope(shield=True):
                await presence.aclose()
                await blocking.aclose()

    async def _register(self) -> None:
        await self._gate.publish()  # concurrency control (before the bind: routers read both)
        old = await self.backend.register_bind(self.bind)
        if old is None:
            self.log.info("Service %s registered its bind", self.identity)
        elif old != self.bind:
            self.log.info("Service %s replaced an older bind", self.identity)
        self.log.info("Service %s started (concurrency %d)", self.identity, self.concurrency_limit)

    async def _consume(self, task_status: TaskStatus[None]) -> None:
        """Run up to ``concurrency_limit`` handler runners fed by one fetch loop.

        The fetch loop keeps up to ``prefetch`` tasks ready beyond the running ones, so
        handlers never wait for a round trip, and fetches in batches (one Lua call each).
        Runners live as long as the work group: one that finds nothing ready parks until
        the fetch loop wakes it, so no task is spawned per delivery.
        """
        limit = self.concurrency_limit or 1
        self._runners, self._outstanding = 0, 0
        self._ready.clear()
        self._parked.clear()
        self._fetching = True
        self._worker_freed = anyio.Event()
        with anyio.CancelScope() as lifetime:
            async with anyio.create_task_group() as work:
                with anyio.CancelScope() as fetching:
                    self._scopes = lifetime, fetching
                    task_status.started()
                    await self._fetch_loop(work, limit)
                self._fetching = False  # runners finish what is ready, then exit
                while self._parked:
                    self._parked.popleft().set()
        with anyio.CancelScope(shield=True):  # cut short: hand back what is still ready
            while self._ready:
                await self._hand_back(self._ready.popleft())
        self.log.info("Service %s stopped", self.identity)

    async def _runner(self, task: Task | None) -> None:
        """Handle ready tasks one after another; park while there are none."""
        while True:
            while task is not None:
                began = time.perf_counter()
                try:
                    await self._handle(task)
                finally:
                    self._outstanding -= 1
                    self._worker_freed.set()
                took = time.perf_counter() - began
                if self._handle_seconds < 0:  # the first sample seeds the average
                    self._handle_seconds = took
                self._handle_seconds += (took - self._handle_seconds) / 8
                task = self._next_ready()
            if not self._fetching:
                return
            parked = anyio.Event()
            self._parked.append(parked)
            await parked.wait()
            task = self._next_ready()

    def _next_ready(self) -> Task | None:
        return self._ready.popleft() if self._ready else None

    def _dispatch(self, work: TaskGroup, tasks: list[Task], limit: int) -> None:
        """Queue fetched tasks: wake parked runners, start new ones up to ``limit``.

        Handlers that take a while (they suspend: I/O) get one parked runner woken per
        task, all in the same loop iteration, so they start together.  Quick handlers
        get one: it drains the queue before any other runner could run, so waking more
        would only cost.  New runners are started only for the tasks the parked ones
        cannot take.
        """
        self._outstanding += len(tasks)
        self._ready.extend(tasks)
        quick = 0.0 <= self._handle_seconds <= QUICK_HANDLER
        woken = self._wake_parked(1 if quick else len(self._ready))
        while len(self._ready) > woken and self._runners < limit:
            self._runners += 1
            work.start_soon(self._runner, self._ready.popleft())
        if quick and self._ready and self._parked:
            self._maybe_stranded.set()  # see _unstrand

    def _wake_parked(self, wanted: int) -> int:
        woken = min(wanted, len(self._parked))
        for _ in range(woken):
            self._parked.popleft().set()
        return woken

    async def _unstrand(self) -> None:
        """Wake parked runners for tasks that a quick-looking batch left waiting.

        Quick handlers get a single runner per batch; should one of them suspend for
        long (a slow call, or one waiting for another task of the batch), the rest of
        the batch would wait with runners parked.  ``STRANDED_AFTER`` seconds after such
        a batch, every task still ready gets a parked runner.  A batch that was really
        quick is drained by then and this finds nothing to do.
        """
        while True:
            await self._maybe_stranded.wait()
            self._maybe_stranded = anyio.Event()
            await anyio.sleep(STRANDED_AFTER)
            self._wake_parked(len(self._ready))

    async def _room(self, limit: int) -> int:
        """Wait until a fetch is worth it; return how many tasks to take."""
        capacity = limit + (self.prefetch or 0)
        threshold = max(1, capacity // 4)
        while True:
            room = capacity - self._outstanding
            if room > 0 and (not self._ready or room >= threshold):
                return min(room, 256)
            await self._worker_freed.wait()
            self._worker_freed = anyio.Event()

    async def _fetch_loop(self, work: TaskGroup, limit: int) -> None:
        backoff = 0.5
        blocking = self._blocking
        while True:
            room = await self._room(limit)
            await anyio.lowlevel.checkpoint()  # the fetch below is shielded: stop lands here
            try:
                with anyio.CancelScope(shield=True):
                    tasks = await self._accept(await self._fetch(room, blocking))
                backoff = 0.5
            except TRANSIENT_ERRORS as exc:
                self.log.warning("Redis unavailable (%s); retrying in %.1fs", exc, backoff)
                await anyio.sleep(backoff)
                backoff = min(backoff * 2, 10.0)
                continue
            self._dispatch(work, tasks, limit)

    async def _fetch(self, count: int, blocking: Any) -> list[tuple[str, str]]:
        lease = float(self.lease_timeout or 60.0)
        items = await self.backend.fetch(self.identity, count, lease)
        if items:
            return items
        return await self.backend.wait_fetch(blocking, self.identity, lease, BLOCKING_POP_TIMEOUT)

    async def _accept(self, items: list[tuple[str, str]]) -> list[Task]:
        """Parse fetched bodies, drop broken ones (logged), mark the rest Started.

        Until the Started write succeeds nothing is tracked locally: if it fails, the
        leases simply expire and the tasks are redelivered.
        """
        tasks: list[Task] = []
        gone: list[str] = []
        broken: list[str] = []
        for uid, body in items:
            if not body:
                self.log.warning("Task %s vanished before it could start; skipped", uid)
                gone.append(uid)
                continue
            try:
                task = Task.unserialize(body, self.storage)
            except InvalidTaskError as exc:
                self.log.error("Task %s has an unreadable body, quarantined: %s", uid, exc)
                broken.append(uid)
                continue
            task.status, task.last_update = TaskState.STARTED, time.time()
            tasks.append(task)
        with anyio.CancelScope(shield=True):
            tasks = await self._gate.start(tasks)  # concurrency control (was set_tasks)
            await self.backend.quarantine(broken)
            await self.backend.drop_leases(self.identity, gone + broken)
        for task in tasks:
            self._leased[task.uid] = task
        return tasks

    # -- one task -------------------------------------------------------------------------

    async def _handle(self, task: Task) -> None:
        token = current_task.set(task)
        try:
            if not await self._gate.turn(task):  # concurrency control: parked or refused
                return
            if not self._match(task.headers):
                self.log.info("Task rejected because binds are no longer valid.")
                task.status, task.last_update = TaskState.FINISHED, time.time()
                self._completer_add(task, crashed=False)
                return
            attempt = f" (attempt {task.attempt + 1})" if task.attempt else ""
            self._log_info("Received new task - %s%s", task.uid, attempt)
            await self._run_hooks_pre(task)
            self._running.add(task.uid)
            self._ran_since_probe.add(task.uid)
            try:
                error = await self._run_process(task)
            finally:
                self._running.discard(task.uid)
            await self._run_hooks_post(task, error)
            await self._finish(task, error)
        except anyio.get_cancelled_exc_class():
            with anyio.CancelScope(shield=True):
                await self._hand_back(task)
            raise
        finally:
            self._gate.release(task)  # concurrency control
            current_task.reset(token)

    async def _run_process(self, task: Task) -> BaseException | None:
        """Run ``process``; return its exception (a timeout as TaskTimeoutError) or None."""
        if not self.task_timeout:  # no deadline: no cancel scope on the hot path
            return await self._call_process(task)
        error: BaseException | None = None
        with anyio.CancelScope(deadline=anyio.current_time() + self.task_timeout) as scope:
            error = await self._call_process(task)
        if scope.cancelled_caught:
            try:
                raise TaskTimeoutError(float(self.task_timeout))
            except TaskTimeoutError as exc:
                return exc
        return error

    async def _call_process(self, task: Task) -> BaseException | None:
        try:
            result = self.process(task)
            if inspect.isawaitable(result):
                await result
        except Exception as exc:  # noqa: BLE001 - a handler's failure is data (R11)
            return exc
        return None

    async def _finish(self, task: Task, error: BaseException | None) -> None:
        task.last_update = time.time()
        if error is None:
            task.status, task.error = TaskState.FINISHED, None
            self._log_info("Task done - %s", task.uid)
            self._completer_add(task, crashed=False)
            return
        task.error = traceback.format_exception(type(error), error, error.__traceback__)
        if self._should_retry(task, error):
            await self._schedule_retry(task, error)
            return
        task.status = TaskState.CRASHED
        self.log.error("Failed to process task - %s", task.uid, exc_info=error)
        self._completer_add(task, crashed=True, dead=bool(self.max_retries))

    def _should_retry(self, task: Task, error: BaseException) -> bool:
        if task.attempt >= (self.max_retries or 0):
            return False
        return isinstance(error, (Retry, *self.retry_for))

    async def _schedule_retry(self, task: Task, error: BaseException) -> None:
        after = error.after if isinstance(error, Retry) and error.after is not None else None
        if after is None:  # exponential backoff with full jitter, capped
            cap = min(self.retry_backoff_max, self.retry_backoff * 2**task.attempt)
            after = random.uniform(0, cap)
        task.attempt += 1
        task.status, task.last_update = TaskState.SPAWNED, time.time()
        self.log.warning(
            "Task %s failed (%s); retry %d/%d in %.2fs",
            task.uid, type(error).__name__, task.attempt, self.max_retries, after,
        )  # fmt: skip
        due = time.time() + after
        with anyio.CancelScope(shield=True):
            await until_done(
                lambda: self.backend.schedule_retry(self.identity, task, due),
                log=self.log,
                what=f"schedule the retry of {task.uid}",
            )
        self._leased.pop(task.uid, None)
        if self._background is not None:  # release it on time (others' sweeps are the fallback)
            self._background.start_soon(self._release_after, after)

    async def _release_after(self, delay: float) -> None:
        await anyio.sleep(delay)
        try:
            await self.backend.release_delayed()
        except TRANSIENT_ERRORS as exc:
            self.log.warning("Redis unavailable to release a retry: %s", exc)

    def _log_info(self, msg: str, *args: object) -> None:
        """Log a per-task line cheaply: these run twice for every task.

        The Karton record is published directly; a LogRecord is made only if another
        handler (the application's) wants INFO records of this logger.
        """
        log = self.log
        if not log.isEnabledFor(logging.INFO):
            return
        publisher = self._publisher
        if publisher is not None:
            publisher.publish_line(log, logging.INFO, msg % args, "_consumer:_handle")
        if needs_record(log, logging.INFO, publisher):
            maker = self._record_maker
            if maker is None or maker.logger is not log:
                maker = self._record_maker = RecordMaker(log, __file__, "_handle")
            record = maker.make(logging.INFO, msg, args)
            record.karton_published = publisher is not None
            log.handle(record)

    def _completer_add(self, task: Task, *, crashed: bool, dead: bool = False) -> None:
        """Queue a final state for writing (the caller has set status and last_update)."""
        assert self._completer is not None
        self._completer.add(task, crashed=crashed, dead=dead)

    async def _hand_back(self, task: Task) -> None:
        self._gate.release(task)  # concurrency control
        if self._leased.pop(task.uid, None) is None:
            return  # already completed or rescheduled
        try:
            await self.backend.hand_back(self.identity, [task])
            self.log.warning("Task %s handed back to the queue (shutdown)", task.uid)
        except TRANSIENT_ERRORS as exc:
            self.log.error("Could not hand back %s (%s); its lease will expire", task.uid, exc)

    async def _run_hooks_pre(self, task: Task) -> None:
        for name, hook in self._pre_hooks:
            await self._call_hook(name, hook, task)

    async def _run_hooks_post(self, task: Task, error: BaseException | None) -> None:
        for name, hook in self._post_hooks:
            await self._call_hook(name, hook, task, error)

    async def _call_hook(self, name: str | None, hook: Callable[..., Any], *args: Any) -> None:
        try:
            result = hook(*args)
            if inspect.isawaitable(result):
                await result
        except Exception:  # Karton logs and swallows hook errors
            self.log.exception("Hook %s failed", name or getattr(hook, "__name__", hook))

    # -- background -----------------------------------------------------------------------

    async def _watch_bind(self, presence: Any) -> None:
        """Keep the named presence connection alive; stop if a newer replica took over."""
        mine = self.bind
        while True:
            try:
                raw = await presence.hget("karton.binds", self.identity)
                current = Bind.from_json(self.identity, raw) if raw else None
                if current is None:
                    self.log.warning("Bind of %s disappeared; registering again", self.identity)
                    await self.backend.register_bind(mine)
                elif current != mine:
                    self.log.warning("Binds changed, shutting down.")
                    self.stop()
                    return
            except TRANSIENT_ERRORS as exc:
                self.log.warning("Redis unavailable for the bind check: %s", exc)
            await anyio.sleep(BIND_CHECK_INTERVAL)

    async def _watch_loop_lag(self) -> None:
        """Warn when a handler blocks the event loop (leases and other tasks starve)."""
        while True:
            self._ran_since_probe = set(self._running)
            started = anyio.current_time()
            await anyio.sleep(LOOP_LAG_PROBE)
            lag = anyio.current_time() - started - LOOP_LAG_PROBE
            if lag > LOOP_LAG_WARNING:
                self.log.warning(
                    "Event loop blocked for %.2fs while running task(s) %s; move blocking "
                    "code to asynckarton.to_thread() or asynckarton.to_process()",
                    lag,
                    ", ".join(sorted(self._ran_since_probe)) or "(none)",
                )

    async def _keep_leases(self) -> None:
        """Renew our leases (one ZADD), requeue expired ones, release due retries."""
        lease = float(self.lease_timeout or 60.0)
        period = max(0.2, min(lease / 3, 1.0))
        while True:
            try:
                if self._leased:
                    await self.backend.renew_leases(self.identity, list(self._leased), lease)
                moved = await self.backend.reclaim(self.identity)
                if moved:
                    self.log.warning("Requeued %d task(s) whose consumer died", moved)
                await self.backend.release_delayed()
                await self._gate.sweep()  # concurrency control
            except TRANSIENT_ERRORS as exc:
                self.log.warning("Redis unavailable for lease renewal: %s", exc)
            await anyio.sleep(period)
