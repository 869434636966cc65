"""A running consumer's upkeep: its bind, its leases, and the event loop's health.

Three loops the consumer runs beside its handlers, each until cancelled:
:func:`watch_bind` keeps the bind registered (and notices a newer replica's),
:func:`keep_leases` renews the leases of the tasks in hand and requeues expired ones,
and :class:`LagWatch` warns when a handler blocks the event loop.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

import anyio

from ..backend import Bind, KartonBackend
from ..backend._guard import TRANSIENT_ERRORS
from . import _metrics

__all__ = ["LagWatch", "Recheck", "keep_leases", "watch_bind"]

BIND_CHECK_INTERVAL = 5.0
#: Seconds before the first re-check after Redis failed under a bind check (doubling up
#: to BIND_RETRY_MAX): a master that came back without the bind (a failover to a replica
#: that had not received it, a restart without persistence) gets it again within about
#: a second, not BIND_CHECK_INTERVAL later, so routers drop fewer tasks meanwhile.
BIND_RETRY_FIRST = 0.25
BIND_RETRY_MAX = 1.0
LOOP_LAG_PROBE = 0.25  # seconds between event-loop lag probes
LOOP_LAG_WARNING = 0.5  # lag (seconds) that earns a warning naming the running tasks


class Recheck:
    """A wake-up for :func:`watch_bind`: check the bind now, not at the next interval.

    The consumer's fetch loop calls :meth:`request` when Redis failed under it: the bind
    watcher, idle on its own connection, would otherwise notice a failover (or a restart)
    only at its next check.
    """

    def __init__(self) -> None:
        self._event: anyio.Event | None = None
        self._pending = False

    def request(self) -> None:
        """Ask for a check now (from this event loop; cheap, idempotent)."""
        self._pending = True
        if self._event is not None:
            self._event.set()

    async def sleep(self, seconds: float) -> None:
        """Sleep ``seconds``, or less if :meth:`request` is called meanwhile."""
        if not self._pending:
            self._event = anyio.Event()
            try:
                with anyio.move_on_after(seconds):
                    await self._event.wait()
            finally:
                self._event = None
        self._pending = False


async def watch_bind(
    presence: Any,
    backend: KartonBackend,
    mine: Bind,
    replaced: Callable[[], None],
    log: logging.Logger,
    recheck: Recheck | None = None,
) -> None:
    """Keep the named presence connection alive and ``mine`` registered.

    Checks every BIND_CHECK_INTERVAL seconds, sooner on ``recheck``, and about every
    second while Redis fails (warning once per outage).  Calls ``replaced()`` and
    returns once another bind took its place (a newer replica).
    """
    recheck = recheck or Recheck()
    retry = 0.0  # seconds before the next check while Redis fails; 0 while it answers
    while True:
        try:
            current = await backend.get_bind(mine.identity, client=presence)
            if current is None:
                log.warning("Bind of %s disappeared; registering again", mine.identity)
                await backend.register_bind(mine)
            elif current != mine:
                log.warning("Binds changed, shutting down.")
                replaced()
                return
        except TRANSIENT_ERRORS as exc:
            if not retry:
                log.warning("Redis unavailable for the bind check: %s", exc)
            retry = min(retry * 2, BIND_RETRY_MAX) if retry else BIND_RETRY_FIRST
            await recheck.sleep(retry)
            continue
        if retry:
            log.info("Bind check of %s: Redis answers again", mine.identity)
        retry = 0.0
        await recheck.sleep(BIND_CHECK_INTERVAL)


async def keep_leases(
    backend: KartonBackend,
    identity: str,
    leased: dict[str, Any],
    lease: float,
    log: logging.Logger,
    sweep: Callable[[], Awaitable[None]] | None = None,
) -> None:
    """Renew the leases of ``leased`` (one ZADD), requeue expired ones, release retries.

    ``sweep`` runs after each round too (concurrency control unparks tasks whose slot's
    holder lost its lease).
    """
    period = max(0.2, min(lease / 3, 1.0))
    while True:
        try:
            if leased:
                await backend.renew_leases(identity, list(leased), lease)
                _metrics.leases_renewed(identity, len(leased))  # metrics
            moved = await backend.reclaim(identity)
            if moved:
                log.warning("Requeued %d task(s) whose consumer died", moved)
            await backend.release_delayed()
            if sweep is not None:
                await sweep()
        except TRANSIENT_ERRORS as exc:
            log.warning("Redis unavailable for lease renewal: %s", exc)
        await anyio.sleep(period)


class LagWatch:
    """Warn when a handler blocks the event loop (leases and other tasks starve).

    The consumer calls :meth:`enter` and :meth:`leave` around each handler; a warning
    names every task that ran during the probe that came back late.  While no handler
    runs, the probe sleeps until one starts: an idle consumer does not wake for it.
    """

    def __init__(self, log: logging.Logger) -> None:
        self._log = log
        self.running: set[str] = set()
        self._ran_since_probe: set[str] = set()
        self._busy: anyio.Event | None = None  # set by enter() while the probe waits
        self._entered_at = 0.0  # when enter() woke the probe

    def enter(self, uid: str) -> None:
        self.running.add(uid)
        self._ran_since_probe.add(uid)
        if self._busy is not None:
            self._entered_at = anyio.current_time()
            self._busy.set()

    def leave(self, uid: str) -> None:
        self.running.discard(uid)

    async def run(self) -> None:
        while True:
            if not self.running:  # idle: sleep until a handler starts
                self._ran_since_probe = set()
                self._busy = anyio.Event()
                await self._busy.wait()
                self._busy = None
                # A handler that blocks at once delays this wake-up: that is lag too.
                self._report(anyio.current_time() - self._entered_at)
            self._ran_since_probe = set(self.running)
            started = anyio.current_time()
            await anyio.sleep(LOOP_LAG_PROBE)
            self._report(anyio.current_time() - started - LOOP_LAG_PROBE)

    def _report(self, lag: float) -> None:
        _metrics.loop_lag(lag)  # metrics
        if lag > LOOP_LAG_WARNING:
            self._log.warning(
                "Event loop blocked for %.2fs while running task(s) %s; move blocking "
                "code to asynckarton.to_thread() or asynckarton.to_process()",
                lag,
                ", ".join(sorted(self._ran_since_probe)) or "(none)",
            )
