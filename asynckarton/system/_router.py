"""Router: fork each unrouted task to every consumer whose bind's filters match.

One round: take up to ``batch_size`` uids from ``karton.tasks`` into this router's
journal and read their bodies and the binds (one round trip: a Lua call and an HGETALL
in one pipeline; a blocking BLMOVE first when the queue is empty), match them against
the compiled bind index (rebuilt only when ``karton.binds`` changed), and commit every
fork, queue push, metric, tracking entry and log record of the batch in one MULTI/EXEC
that also clears the journal (one ``allow-oom`` script instead when Redis is over
``maxmemory``, so a full Redis still routes its backlog).  A task sent to an idle router
is routed in two round trips: the BLMOVE that wakes it, pipelined with the read of the
batch (Redis runs them in order), and the commit.  A
router killed mid-batch leaves the journal behind; once its heartbeat expires any router
gives it back to ``karton.tasks``, so a batch is routed exactly once or, after a crash,
again from scratch.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from typing import Any

import anyio
import orjson
from anyio.abc import TaskStatus

from .._errors import InvalidTaskError
from .._services._logging import site_line_maker
from .._services._registration import RegistrationGuard  # concurrency control
from .._wire._document import RoutableTask
from .._wire._query import BindIndex
from ..backend import Bind, KartonBackend
from ..backend._guard import TRANSIENT_ERRORS, until_done
from ..backend._records import RoutedBatch
from ._console import ProcessingLines

__all__ = ["Router"]

HEARTBEAT_TTL = 10.0
#: Seconds an idle router waits for work per round while it is the only router (at most
#: 0.8 x the connection's socket_timeout).
ROUTE_WAIT = 24.0
#: ... and while there are others: HEARTBEAT_TTL, so it reads their deadlines again before
#: a heartbeat renewed after its last read (a router that got busy meanwhile) can expire.
ROUTE_WAIT_SHARED = HEARTBEAT_TTL


class Router:
    """Routes batches from ``karton.tasks`` until cancelled.

    Args:
        backend: Redis access.
        log: the system service's logger (its records are published like Karton's).
        instance: this router's id (names its journal).
        batch_size: most tasks taken per round (``[system] route_batch_size``, the
            router's half of pynenc's ``parallel_batch_size``).
        publish_logs: publish a "Processing task" record per task, as karton-system does.
        tracking_ttl: seconds to keep ``karton.outputs:*`` entries; 0 disables tracking.
        presence: the service's named connection (a pool of one): the heartbeats and the
            idle wait run on it, which keeps it open (None: the shared pool).
    """

    def __init__(
        self,
        backend: KartonBackend,
        log: logging.Logger,
        *,
        instance: str,
        batch_size: int = 500,
        publish_logs: bool = True,
        tracking_ttl: int = 2592000,
        presence: Any = None,
    ) -> None:
        self.backend = backend
        self.log = log
        self.instance = instance
        self.batch_size = batch_size
        self.publish_logs = publish_logs
        self.tracking_ttl = tracking_ttl
        self._binds_raw: dict[str, str] | None = None
        self._index = BindIndex({})
        self._match_errors: set[tuple[str, str]] = set()  # reported (identity, error type)
        self._tracking_cache: dict[bytes, str] = {}
        self._lines = ProcessingLines(log)  # karton-system's console lines
        self._log_channel = backend.log_channel("INFO", log.name)
        self._line: Callable[[str, float], str] | None = None  # see _log_record
        self.routed = 0
        self._registration = RegistrationGuard(log)  # concurrency control
        self._drained = False  # the last round emptied karton.tasks: wait for work
        self._idle = False  # in the idle wait, whose pipeline renews the heartbeat
        self._deadline = 0.0  # when this router's heartbeat expires at the earliest
        self._busy = anyio.Event()  # set when the idle wait ends
        self._other_due: float | None = None  # earliest heartbeat deadline of another router
        self._presence = presence
        self._presence_lock = anyio.Lock()  # one call at a time on the one connection

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Route until cancelled; Redis outages are waited out with backoff."""
        try:
            async with anyio.create_task_group() as group:
                self._other_due = await until_done(
                    self._beat, log=self.log, what="register the router"
                )
                group.start_soon(self._heartbeat)
                task_status.started()
                await self._loop()
        finally:
            with anyio.CancelScope(shield=True):
                await self._deregister()

    async def _deregister(self) -> None:
        """Leave ``asynckarton.routers``; a journal left by a cancelled wait goes back."""
        try:
            if await self.backend.journal(self.instance):  # expire, then recover it now
                await self.backend.heartbeat_router(self.instance, -1.0)
                await self.backend.recover_routing()
            await self.backend.forget_router(self.instance)
        except TRANSIENT_ERRORS:
            pass  # the journal's heartbeat expires; another router recovers it

    async def _heartbeat(self) -> None:
        """Renew the heartbeat and recover dead routers' journals every HEARTBEAT_TTL/4.

        Not while the router waits for work: its idle wait renews the heartbeat itself
        and ends at the earliest deadline of another router (see :meth:`_wait`).  Back
        at work, it beats on the same cadence (at once after a long wait, which set a
        longer deadline).
        """
        beaten = float("-inf")
        while True:
            if self._idle:
                self._busy = anyio.Event()
                await self._busy.wait()
                continue
            delay = beaten + HEARTBEAT_TTL / 4 - anyio.current_time()
            if delay > 0:
                await anyio.sleep(delay)
                continue
            beaten = anyio.current_time()
            try:
                self._other_due = await self._beat()
                moved = await self.backend.recover_routing()
                if moved:
                    self.log.warning("Recovered %d task(s) from a router that died", moved)
            except TRANSIENT_ERRORS as exc:
                self.log.warning("Redis unavailable for the router heartbeat: %s", exc)

    async def _beat(self) -> float | None:
        """Renew the heartbeat (HEARTBEAT_TTL); the earliest deadline of another router."""
        async with self._presence_lock:
            if self._idle:  # the idle wait began meanwhile: its own heartbeat lasts longer
                return self._other_due
            self._deadline = time.time() + HEARTBEAT_TTL
            return await self.backend.heartbeat_router(
                self.instance, HEARTBEAT_TTL, client=self._presence
            )

    async def _wait(self) -> tuple[bool, tuple[list[str], list[str | None]] | None]:
        """Wait for an unrouted task (renewing the heartbeat).

        Returns whether one was moved in, and the batch the same round trip took (None:
        none was taken, :meth:`_take` reads it).  One round trip per :data:`ROUTE_WAIT` s
        at most (:data:`ROUTE_WAIT_SHARED` with other routers): a BLMOVE into the
        journal, the heartbeat and the take of :meth:`_take` in one pipeline.  The
        wait ends at the earliest heartbeat deadline of another router (a router found
        dead then has its journal recovered), and before this router's own heartbeat
        lapses.  Not shielded: cancelling it (stop) drops its connection, and a uid it
        moved stays in the journal, which :meth:`_deregister` hands back.
        """
        self._idle = True
        try:
            now = time.time()
            if self._other_due is not None and self._other_due <= now:
                self._other_due = None
                moved = await self.backend.recover_routing()
                if moved:
                    self.log.warning("Recovered %d task(s) from a router that died", moved)
            client = self._presence or self.backend.redis
            wait = self.backend.block_limit(client, ROUTE_WAIT)
            if self._other_due is not None:
                wait = min(ROUTE_WAIT_SHARED, self._other_due - now + 0.005)
            # The heartbeat is renewed when the wait ends: end it before the last one lapses.
            wait = max(0.05, min(wait, self._deadline - now - 1.0))
            async with self._presence_lock:
                sent = time.time()
                arrived, self._other_due, taken = await self.backend.route_idle(
                    self.instance, wait, ROUTE_WAIT + HEARTBEAT_TTL, client=client,
                    take=self.batch_size,
                )  # fmt: skip
                self._deadline = sent + wait + ROUTE_WAIT + HEARTBEAT_TTL
            if taken is None:
                return arrived, None
            uids, bodies, binds = taken
            self._use_binds(binds)
            return arrived, (uids, bodies)
        finally:
            self._idle = False
            self._busy.set()

    async def _loop(self) -> None:
        backoff = 0.5
        while True:
            try:
                taken = None
                if self._drained:
                    arrived, taken = await self._wait()
                    if not arrived and not (taken and taken[0]):
                        continue
                with anyio.CancelScope(shield=True):
                    uids, bodies = await self._take() if taken is None else taken
                    if uids:
                        await self._route(uids, bodies)
                # A take tops the batch up from karton.tasks: short of batch_size, the queue
                # was empty, and the next round is the wait (which returns at once if a
                # task came meanwhile) rather than a take that would find nothing.
                self._drained = len(uids) < self.batch_size
                backoff = 0.5
                await anyio.lowlevel.checkpoint()
            except TRANSIENT_ERRORS as exc:
                self.log.warning("Redis unavailable (%s); routing resumes in %.1fs", exc, backoff)
            except Exception:  # a bug or a bad server reply must not stop routing for good
                self.log.exception("Routing round failed; the batch stays journalled")
            else:
                continue
            await anyio.sleep(backoff)
            backoff = min(backoff * 2, 10.0)

    async def _take(self) -> tuple[list[str], list[str | None]]:
        """The journal (a failed round's batch, or the uid the idle wait moved in first)
        topped up to ``batch_size``, and the uids' bodies: one round trip."""
        uids, bodies, binds = await self.backend.route_take(self.instance, self.batch_size)
        self._use_binds(binds)
        return uids, bodies

    async def route(self, uids: list[str]) -> None:
        """Route the journalled ``uids`` and commit the result in one transaction."""
        bodies = await self.backend.get_task_bodies(uids)
        self._use_binds(await self.backend.get_binds_raw())
        await self._route(uids, bodies)

    async def _route(self, uids: list[str], bodies: list[str | None]) -> None:
        await self._registration.refresh(self.backend, self._binds_raw or {})  # concurrency
        batch = RoutedBatch()
        now = time.time()
        self._lines.refresh()
        for uid, body in zip(uids, bodies, strict=True):
            if body is None:
                self.log.warning("Task %s has no body (deleted before routing); skipped", uid)
                continue
            try:
                task = RoutableTask.parse(body)
            except InvalidTaskError as exc:
                self.log.error("Task %s is unreadable, quarantined: %s", uid, exc)
                batch.invalid.append(uid)
                continue
            self._route_one(task, batch, now)
        await self.backend.route_commit(self.instance, batch, self.tracking_ttl)
        await self._registration.report(self.backend)  # concurrency control
        self.routed += len(uids)

    def _route_one(self, task: RoutableTask, batch: RoutedBatch, now: float) -> None:
        headers = task.headers
        if self.tracking_ttl:
            origin = str(headers.get("origin") or "unknown")
            batch.outputs.setdefault(origin, set()).add(self._tracking_entry(headers))
        if self.publish_logs:
            batch.logs.append(self._log_record(task, now))
        if self._lines.enabled:
            self._lines.processing(task.root_uid, task.task_uid)
        for identity in self._index.match(headers, self._on_match_error):
            uid, body = task.fork(identity, now)
            # concurrency control: registration dedup (else plain batch.add_fork)
            self._registration.add_fork(batch, task.doc, identity, uid, body, task.priority)
        batch.set_body(task.uid, task.finished(now))

    def _tracking_entry(self, headers: dict[str, Any]) -> str:
        """``json.dumps(headers)`` exactly as karton-system writes it, memoised per batch."""
        try:
            key = orjson.dumps(headers)
        except TypeError:
            return json.dumps(headers)
        entry = self._tracking_cache.get(key)
        if entry is None:
            if len(self._tracking_cache) > 4096:
                self._tracking_cache.clear()
            entry = self._tracking_cache[key] = json.dumps(headers)
        return entry

    def _on_match_error(self, identity: str, error: Exception) -> None:
        # Once per bind and error type until the binds change: a bind that fails on every
        # task would otherwise log (and PUBLISH) one error per routed task.
        key = (identity, type(error).__name__)
        if key not in self._match_errors:
            self._match_errors.add(key)
            self.log.error(
                "Filters of %s failed on a task and were skipped: %s (further such failures "
                "of this bind are not logged until the binds change)", identity, error,
            )  # fmt: skip

    def _log_record(self, task: RoutableTask, now: float) -> tuple[str, str]:
        """karton-system's "Processing task" record (no current task, like Karton's)."""
        message = f"[{task.root_uid}] Processing task {task.task_uid}"
        line = self._line
        if line is None:  # this line is the record's call site (its lineno)
            line = self._line = site_line_maker(self.log, logging.INFO)
        return self._log_channel, line(message, now)

    def _use_binds(self, raw: dict[str, str]) -> None:
        """Rebuild the bind index if ``raw`` (``karton.binds`` as read) changed."""
        if raw == self._binds_raw:
            return
        filters: dict[str, Any] = {}
        for identity, value in raw.items():
            try:
                filters[identity] = Bind.from_json(identity, value).filters
            except (ValueError, KeyError, TypeError) as exc:
                self.log.error("Bind of %s is unreadable and is skipped: %s", identity, exc)
        self._index = BindIndex(filters)
        self._match_errors.clear()
        for identity, error in self._index.invalid.items():
            self.log.error("Bind of %s has invalid filters and is skipped: %s", identity, error)
        self._binds_raw = raw
