"""Consumer: take routed tasks for one identity and run ``async def process(task)``.

Structure (one task group per concern, all owned by ``run``)::

    run ─┬─ background: bind watcher (on the named presence connection), lease renewer +
         │              reclaimer, retry releaser, completion writer
         └─ lifetime scope ── Dispatcher: concurrency_limit workers ── handlers
                                         └── fetch loop (prefetch tasks ahead)

Fetching is cancel-safe: a batch is popped and leased in one Lua call, which runs
shielded; a task whose consumer dies is requeued when its lease expires.  A fetched task
stays Spawned (and leased) until its handler starts; then it is marked Started (written
in batches with the final states).  ``stop(grace)`` cancels fetching at once, hands the
tasks that were fetched but not started back to the head of their queue, and gives
running handlers ``grace`` seconds; handlers still running then are cancelled and their
tasks handed back too (not Crashed).

The calls into the service's own code (the class check, ``process`` under its timeout,
the pre/post hooks) are in :mod:`._calls`.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import random
import time
import traceback
from typing import Any, ClassVar

import anyio
from anyio.abc import TaskGroup, TaskStatus

from .._errors import InvalidTaskError, Retry
from .._settings._config import Config
from .._settings._flags import add_consumer_arguments, consumer_config_from_args
from .._settings._policy import ConsumerPolicy, resolve_policy
from .._wire._query import compile_filters
from .._wire._task import Task, TaskState, current_task
from ..backend import Bind
from ..backend._guard import TRANSIENT_ERRORS, until_done
from . import _metrics
from ._calls import (
    PostHook,
    PreHook,
    call_process,
    check_service_class,
    run_hooks,
    run_timed,
)
from ._completion import Completer
from ._concurrency import ConcurrencyControlType  # concurrency control
from ._concurrency_gate import ConcurrencyGate  # concurrency control
from ._dispatch import Dispatcher
from ._logging import hot_log
from ._result_cache import ResultCache
from ._runtime import Runtime
from ._service import ServiceBase
from ._upkeep import LagWatch, aligned_wait, idle_round, keep_up

__all__ = ["Consumer"]

#: Seconds a fetch blocks for when the queues are empty (at most 0.8 x the connection's
#: socket_timeout).  Long, so an idle consumer rarely wakes for it: stop() ends the wait at
#: once with CLIENT UNBLOCK, and a broken connection ends it with an error.
BLOCKING_POP_TIMEOUT = 25.0


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
        call_result_cache, call_result_cache_ttl, disable_cache_args: serve a task equal
            to one already handled from the result cache (``_result_cache.py``).
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

    def __init__(
        self,
        config: Config | None = None,
        identity: str | None = None,
        *,
        runtime: Runtime | None = None,
    ) -> None:
        super().__init__(config, identity, runtime=runtime)
        check_service_class(type(self))
        self._match = compile_filters(list(self.filters))
        self._read_policy(self.config)
        self._gate = ConcurrencyGate.for_consumer(self)  # concurrency control
        self._pre_hooks: list[tuple[str | None, PreHook]] = []
        self._post_hooks: list[tuple[str | None, PostHook]] = []
        self._scopes: tuple[anyio.CancelScope, Dispatcher[Task]] | None = None  # while running
        self._leased: dict[str, Task] = {}
        self._completer: Completer | None = None
        self._background: TaskGroup | None = None
        self._blocking: Any = None  # the connection the fetch loop blocks on
        self._blocking_id: int | None = None  # its server-side id, for stop()'s unblock
        self._waiting = False  # the fetch loop is in (or about to send) its blocking pop
        self._stop_requested = False  # stop() was called: no new blocking pop
        self._drained = False  # the last blocking pop timed out: block again at once
        self._backoff = 0.5  # seconds before the next fetch after a Redis error
        self._lag = LagWatch(self.log)
        policy = self.policy
        self._result_cache = (
            ResultCache(
                lambda: self.backend,
                lambda: self.storage,
                self.identity,
                excluded=policy.disable_cache_args,
                ttl=policy.call_result_cache_ttl,
                send=getattr(self, "send_tasks", None),  # a Karton sends, a Consumer cannot
                log=self.log,
            )
            if policy.call_result_cache and "*" not in policy.disable_cache_args
            else None
        )

    def _read_policy(self, config: Config) -> None:
        policy = resolve_policy(config, type(self), self.config_identity, debug=self.debug)
        self.policy: ConsumerPolicy = policy
        self.persistent = policy.persistent  # type: ignore[misc]
        self.concurrency_limit = policy.concurrency_limit  # type: ignore[misc]
        self.task_timeout = policy.task_timeout  # type: ignore[misc]
        self.max_retries = policy.max_retries  # type: ignore[misc]
        self.retry_for = policy.retry_for  # type: ignore[misc]
        self.retry_backoff = policy.retry_backoff  # type: ignore[misc]
        self.retry_backoff_max = policy.retry_backoff_max  # type: ignore[misc]
        self.lease_timeout = policy.lease_timeout  # type: ignore[misc]
        self.shutdown_grace = policy.shutdown_grace
        self.prefetch = policy.prefetch  # type: ignore[misc]

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

    @property
    def handlers_running(self) -> int:
        """Handlers running now (0 while the consumer is not running)."""
        return self._scopes[1].running if self._scopes is not None else 0

    def stop(self, *, grace: float | None = None) -> None:
        """Stop fetching now; cancel (and hand back) what still runs after ``grace`` s."""
        if self._scopes is None:
            return
        lifetime, dispatcher = self._scopes
        self._stop_requested = True
        dispatcher.stop()
        self._gate.stop()  # concurrency control: tasks waiting behind a holder stay unstarted
        if self._background is not None and self._blocking_id is not None:
            self._background.start_soon(self._unblock, self._blocking_id)
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
            await until_done(lambda: self.backend.ping(presence), log=self.log, what="connect")
            await until_done(self._register, log=self.log, what="register the bind")
            self._completer = Completer(self.backend, self.identity, self._leased, self.log)
            async with anyio.create_task_group() as background:
                self._background = background
                background.start_soon(self._completer.run)
                background.start_soon(self._keep_up, presence)
                background.start_soon(self._lag.run)
                background.start_soon(self._gate.run)  # concurrency control
                background.start_soon(_metrics.serve_consumer, self)  # metrics
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

    async def _keep_up(self, presence: Any) -> None:
        """Bind, leases, retries and the presence connection: see :func:`keep_up`."""
        await keep_up(
            self.backend,
            presence,
            self.bind,
            self._leased,
            float(self.lease_timeout or 60.0),
            self.log,
            replaced=self.stop,
            sweep=self._gate.sweep,  # concurrency control
            policy_due=self._gate.policy_due,
            policy_filed=self._gate.policy_filed,
        )

    async def _register(self) -> None:
        await self._gate.publish()  # concurrency control (before the bind: routers read both)
        old = await self.backend.register_bind(self.bind)
        if old is None:
            self.log.info("Service %s registered its bind", self.identity)
        elif old != self.bind:
            self.log.info("Service %s replaced an older bind", self.identity)
        self.log.info("Service %s started (concurrency %d)", self.identity, self.concurrency_limit)
        if self._runtime is not None:
            self._runtime.warn_if_private(f"Service {self.identity!r}")

    async def _consume(self, task_status: TaskStatus[None]) -> None:
        """Handle tasks with a :class:`Dispatcher` until :meth:`stop` (see its policy)."""
        dispatcher: Dispatcher[Task] = Dispatcher(
            self._handle, workers=self.concurrency_limit or 1, prefetch=self.prefetch or 0
        )
        with anyio.CancelScope() as lifetime:
            self._scopes, self._stop_requested = (lifetime, dispatcher), False
            try:
                await dispatcher.run(self._fetch, self._release, task_status=task_status)
            finally:  # concurrency control: tasks still waiting behind a holder go back
                if leftovers := self._gate.leftovers():
                    with anyio.CancelScope(shield=True):
                        await self._release(leftovers)
        self.log.info("Service %s stopped", self.identity)

    async def _fetch(self, count: int) -> list[Task]:
        """Take and lease up to ``count`` tasks, waiting a little for one if none is queued.

        The Redis calls run shielded (a batch is popped and leased in one Lua call), and
        nothing between them and the return can be cancelled: the dispatcher buffers what
        this returns before stop() can act, and hands back what never starts.
        """
        await anyio.lowlevel.checkpoint()  # the fetch below is shielded: stop lands here
        try:
            with anyio.CancelScope(shield=True):
                lease = float(self.lease_timeout or 60.0)
                # After a wait that timed out or took fewer than it could, the queues
                # were empty a moment ago: block again at once (one call per wait).
                items = (
                    [] if self._drained else await self.backend.fetch(self.identity, count, lease)
                )
                drained = not items
                if drained:
                    if self._blocking_id is None:
                        self._blocking_id = await self.backend.connection_id(self._blocking)
                    items = await self._wait_fetch(lease, count)
                    # The wait's lease pops what came with the task: short of ``count``,
                    # the queues are empty again, and the next fetch blocks at once.
                    drained = len(items) < count
                self._drained = drained
                tasks = await self._accept(items)
        except TRANSIENT_ERRORS as exc:
            self._blocking_id, self._drained = None, False  # it reconnects with a new id
            self.log.warning("Redis unavailable (%s); retrying in %.1fs", exc, self._backoff)
            await anyio.sleep(self._backoff)
            self._backoff = min(self._backoff * 2, 10.0)
            return []
        self._backoff = 0.5
        return tasks

    async def _wait_fetch(self, lease: float, count: int) -> list[tuple[str, str]]:
        """Block for a task, unless stop() came first (it unblocks a pop under way)."""
        if self._stop_requested:
            return []
        self._waiting = True
        try:
            limit = self.backend.block_limit(self._blocking, BLOCKING_POP_TIMEOUT)
            wait = aligned_wait(idle_round(lease), limit)  # ends with an upkeep round
            return await self.backend.wait_fetch(self._blocking, self.identity, lease, wait, count)
        finally:
            self._waiting = False

    async def _unblock(self, connection_id: int) -> None:
        """End the fetch loop's blocking pop now (stop() was called).

        The pop may still be on its way to the server when this runs (it is sent on
        another connection): try again until it is over, for two seconds at most.
        """
        with anyio.move_on_after(2), contextlib.suppress(*TRANSIENT_ERRORS):
            while self._waiting:  # else the pop's own timeout ends it
                if await self.backend.unblock(connection_id):
                    return
                await anyio.sleep(0.01)

    async def _accept(self, items: list[tuple[str, str]]) -> list[Task]:
        """Parse fetched bodies and track the tasks' leases; drop broken ones (logged).

        The tasks stay Spawned (and leased) until their handler starts: see ``_handle``.
        Should a write here fail, nothing is tracked: the leases expire, and the tasks
        are redelivered.
        """
        tasks: list[Task] = []
        gone: list[str] = []
        broken: list[str] = []
        storage = self.storage
        for uid, body in items:
            if not body:
                self.log.warning("Task %s vanished before it could start; skipped", uid)
                gone.append(uid)
                continue
            try:
                task = Task.unserialize(body, storage)
            except InvalidTaskError as exc:
                self.log.error("Task %s has an unreadable body, quarantined: %s", uid, exc)
                broken.append(uid)
                continue
            tasks.append(task)
        if broken:
            await self.backend.quarantine(broken)
        if gone or broken:
            await self.backend.drop_leases(self.identity, gone + broken)
        for task in tasks:
            self._leased[task.uid] = task
        return await self._gate.admit(tasks)  # concurrency control: parked or refused out

    async def _release(self, tasks: list[Task]) -> None:
        """Hand fetched tasks that never started back to the head of their queue."""
        for task in tasks:
            self._gate.release(task)  # concurrency control
        mine = [task for task in tasks if self._leased.pop(task.uid, None) is not None]
        try:  # hand_back pushes to the head one by one: reversed, they keep their order
            await self.backend.hand_back(self.identity, mine[::-1])
        except TRANSIENT_ERRORS as exc:
            self.log.error(
                "Could not hand back %d prefetched task(s) (%s); their leases will expire",
                len(mine), exc,
            )  # fmt: skip
            return
        if mine:
            self.log.info("%d prefetched task(s) handed back to the queue (stop)", len(mine))

    # -- one task -------------------------------------------------------------------------

    async def _handle(self, task: Task) -> None:
        """Run ``task``, then those whose turn came when it ended (concurrency control)."""
        next_task: Task | None = task
        while next_task is not None:
            await self._handle_one(next_task)
            next_task = self._gate.ready()

    async def _handle_one(self, task: Task) -> None:
        token = current_task.set(task)
        try:
            if not self._match(task.headers):
                self.log.info("Task rejected because binds are no longer valid.")
                task.status, task.last_update = TaskState.FINISHED, time.time()
                self._completer_add(task, crashed=False)
                return
            # Logged as fetched (Spawned), as Karton does: the line reuses the stored body.
            attempt = f" (attempt {task.attempt + 1})" if task.attempt else ""
            self._log_info("Received new task - %s%s", task.uid, attempt)
            task.status, task.last_update = TaskState.STARTED, time.time()
            self._completer_started(task)
            if self._pre_hooks:
                await run_hooks(self._pre_hooks, self.log, task)
            self._lag.enter(task.uid)
            began = time.perf_counter()
            try:
                if self._result_cache is None and not self.task_timeout:
                    error = await call_process(self.process, task)  # the common case, direct
                else:
                    error = await self._run_process(task)
            finally:
                self._lag.leave(task.uid)
            _metrics.handled(self.identity, time.perf_counter() - began)  # metrics
            if self._post_hooks:
                await run_hooks(self._post_hooks, self.log, task, error)
            await self._finish(task, error)
        except anyio.get_cancelled_exc_class():
            with anyio.CancelScope(shield=True):
                await self._hand_back(task)
            raise
        finally:
            self._gate.release(task)  # concurrency control
            current_task.reset(token)

    async def _run_process(self, task: Task) -> BaseException | None:
        """Run ``process`` (or serve it from the result cache); its exception or None."""
        if self._result_cache is not None:
            return await self._result_cache.run(task, self._run_timed)
        return await self._run_timed(task)

    async def _run_timed(self, task: Task) -> BaseException | None:
        """Run ``process``; return its exception (a timeout as TaskTimeoutError) or None."""
        return await run_timed(self.process, task, self.task_timeout, self.log)

    async def _finish(self, task: Task, error: BaseException | None) -> None:
        _metrics.outcome(self.identity, error)  # metrics
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
        """Log a per-task line (twice for every task) as the caller's line."""
        hot_log(self.log, logging.INFO, msg, args, stacklevel=2)  # cheaper, same lines

    def _completer_started(self, task: Task) -> None:
        assert self._completer is not None
        self._completer.started(task)

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
