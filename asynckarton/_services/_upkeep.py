"""A running service's upkeep: its bind, its leases, its presence, the event loop's health.

:func:`keep_up` is one loop that keeps a consumer's bind registered (and notices a newer
replica's), renews the leases of the tasks in hand, requeues expired ones and releases
due retries; :func:`keep_presence` keeps a service's named connection open;
:class:`LagWatch` warns when a handler blocks the event loop.

An idle service should not wake for nothing (docs/architecture.md, "Idle cost"): each
round of :func:`keep_up` waits on the Redis server in the same round trip that reads
what it needs, does only what is due, and ends early at the next lease deadline or
retry due time it read; :func:`keep_presence` is a server-side wait too.
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Awaitable, Callable
from typing import Any

import anyio

from ..backend import Bind, KartonBackend
from ..backend._guard import TRANSIENT_ERRORS, until_done
from . import _metrics

__all__ = ["LagWatch", "aligned_wait", "idle_round", "keep_presence", "keep_up"]

BIND_CHECK_INTERVAL = 15.0  # seconds between bind checks (at most)
RETRY_FALLBACK = 1.0  # s after a retry's due time before others release it (its own first)
PRESENCE_HOLD = 25.0  # s a named connection waits on the server per round (<= 0.8 x timeout)
LOOP_LAG_PROBE = 0.25  # seconds between event-loop lag probes
LOOP_LAG_WARNING = 0.5  # lag (seconds) that earns a warning naming the running tasks
#: This process's offset on its grid of idle rounds (a fraction of a round): rounds end on
#: the grid, so a consumer's fetch can end its blocking pop in the same wake-up, and the
#: processes of a deployment do not all wake at the same moment.
_PHASE = random.random()


def idle_round(lease: float) -> float:
    """Seconds between a consumer's upkeep rounds while it holds no task."""
    return max(0.2, min(lease / 3, BIND_CHECK_INTERVAL))


def aligned_wait(interval: float, at_most: float | None = None) -> float:
    """Seconds from now to a point of this process's grid of ``interval``-long rounds.

    The next point at least 50 ms away; with ``at_most``, the last point within that
    many seconds instead (``at_most`` itself when there is none).  Waits that end on the
    grid end together, in one wake-up of the process.
    """
    now = time.time()
    phase = _PHASE * interval
    point = (math.floor((now - phase) / interval) + 1) * interval + phase  # next, > now
    if point - now < 0.05:
        point += interval
    if at_most is not None:
        while point + interval - now <= at_most:
            point += interval
        return min(point - now, at_most)
    return point - now


async def keep_up(
    backend: KartonBackend,
    presence: Any,
    mine: Bind,
    leased: dict[str, Any],
    lease: float,
    log: logging.Logger,
    *,
    replaced: Callable[[], None],
    sweep: Callable[[], Awaitable[None]] | None = None,
    policy_due: Callable[[], tuple[str, str] | None] = lambda: None,
    policy_filed: Callable[[], None] = lambda: None,
) -> None:
    """Watch ``mine``, renew ``leased``, requeue expired leases, release due retries.

    One round: wait on the server and read the bind, the identity's earliest lease
    deadline and the earliest retry due time, filing the concurrency policy when
    ``policy_due()`` says so (one round trip on the named ``presence`` connection, which
    the rounds keep open: see :meth:`KartonBackend.upkeep_view`), then

    * register the bind again if it disappeared; call ``replaced()`` once (and stop
      watching) if another bind took its place;
    * renew every lease in ``leased`` (one ZADD), while there are any;
    * requeue expired leases (``RECLAIM``) once the earliest deadline has passed, and
      release retries (``RELEASE_DELAYED``) once one is :data:`RETRY_FALLBACK` s overdue
      (the consumer that scheduled it releases it on time; this is the fallback);
    * run ``sweep`` (concurrency control unparks tasks whose slot holder lost its lease).

    Rounds are at most :data:`BIND_CHECK_INTERVAL` s apart, at most a renewal period
    (a third of ``lease``, at most 1 s) apart while tasks are in hand, and end at the
    earliest deadline read: an expired lease is requeued as it expires.  A lease
    another replica takes after a round is read by the next one, before it can expire
    unless that replica's ``lease_timeout`` is shorter than a round.
    """
    period = max(0.2, min(lease / 3, 1.0))
    idle = idle_round(lease)
    watching = True
    wait = 0.0
    while True:
        try:
            policy = policy_due()
            current, lease_due, retry_due = await backend.upkeep_view(
                mine.identity, wait, client=presence, policy=policy
            )
            if policy is not None:
                policy_filed()
            if watching and current is None:
                log.warning("Bind of %s disappeared; registering again", mine.identity)
                await backend.register_bind(mine)
            elif watching and current != mine:
                log.warning("Binds changed, shutting down.")
                watching = False
                replaced()
            if leased:
                await backend.renew_leases(mine.identity, list(leased), lease)
                _metrics.leases_renewed(mine.identity, len(leased))  # metrics
            now, reread = time.time(), False
            if lease_due is not None and lease_due <= now:
                lease_due, reread = None, True  # read the next deadline at once
                moved = await backend.reclaim(mine.identity)
                if moved:
                    log.warning("Requeued %d task(s) whose consumer died", moved)
            if retry_due is not None and retry_due + RETRY_FALLBACK <= now:
                retry_due, reread = None, True
                await backend.release_delayed()
            if sweep is not None:
                await sweep()
        except TRANSIENT_ERRORS as exc:
            log.warning("Redis unavailable for the consumer's upkeep: %s", exc)
            await anyio.sleep(period)  # the next round reconnects the presence connection
            wait = 0.0
            continue
        wait = 0.0 if reread else period if leased else aligned_wait(idle)
        now = time.time()
        for due in (lease_due, None if retry_due is None else retry_due + RETRY_FALLBACK):
            if due is not None and wait > 0:
                wait = max(0.01, min(wait, due - now + 0.005))


async def keep_presence(backend: KartonBackend, presence: Any, log: logging.Logger) -> None:
    """Keep a service's named connection open: reconnect it at once when it breaks.

    The connection waits on the server (:meth:`KartonBackend.hold`), so a healthy one
    costs one wake-up every :data:`PRESENCE_HOLD` seconds, and a broken one (a Redis
    restart) is noticed and reopened, with its name, at once.
    """
    hold = backend.block_limit(presence, PRESENCE_HOLD)
    while True:
        try:
            await backend.hold(presence, hold)
        except TRANSIENT_ERRORS as exc:
            log.warning("Redis unavailable for the presence connection: %s", exc)
            await until_done(lambda: backend.ping(presence), log=log, what="connect")


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
