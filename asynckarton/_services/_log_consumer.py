"""LogConsumer: Karton's log-consuming service, with ``async def process_log(event)``.

Every Karton service (karton-core's and asynckarton's) PUBLISHes its records as JSON on
``karton.log.<level>.<identity>``; a LogConsumer PSUBSCRIBEs to them.  As in Karton, the
class attributes ``logger_filter`` (an identity, glob patterns allowed) and ``level`` (a
level name, matched exactly) narrow the subscription; ``None`` means every one.  The
event is the published record with ``task`` decoded from its JSON string into a dict.

Records published while no LogConsumer listens are lost (pub/sub keeps nothing), which is
why services warn "no active log consumer".  An exception from ``process_log`` is logged
(on the ``asynckarton.log_consumer`` logger, which is not published, so a broken handler
cannot feed itself) and the next record is processed.

:class:`LogPrinter` is the consumer behind ``asynckarton logs``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import sys
import time
from collections.abc import Sequence
from typing import IO, Any, ClassVar

import anyio
from anyio.abc import TaskStatus

from .._settings._config import Config
from ..backend import KartonBackend
from ..backend._guard import TRANSIENT_ERRORS
from ._service import ServiceBase

__all__ = ["LEVELS", "LogConsumer", "LogPrinter", "decode_event"]

#: Standard level names, lowest first (``--level`` shows this one and those after it).
LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
_internal = logging.getLogger("asynckarton.log_consumer")


def decode_event(data: str | bytes) -> dict[str, Any]:
    """Parse a published record; ``task`` (a JSON string in Karton's shape) becomes a dict.

    Raises:
        ValueError: ``data`` is not a JSON object.
    """
    event = json.loads(data)
    if not isinstance(event, dict):
        raise ValueError(f"log record is a JSON {type(event).__name__}, not an object")
    task = event.get("task")
    if isinstance(task, str):
        with contextlib.suppress(ValueError):  # keep what was sent
            event["task"] = json.loads(task)
    return event


class LogConsumer(ServiceBase):
    """Base class of a service that consumes Karton's log records.

    Class attributes:
        identity: as for every service.
        logger_filter: only records of this identity (glob allowed); None = all.
        level: only records of this level name (e.g. ``"error"``); None = all.
    """

    logger_filter: ClassVar[str | None] = None
    level: ClassVar[str | None] = None
    with_service_info: ClassVar[bool] = True

    def __init__(self, config: Config | None = None, identity: str | None = None) -> None:
        super().__init__(config, identity)
        self._scope: anyio.CancelScope | None = None
        self._task_status: TaskStatus[None] | None = None

    async def process_log(self, event: dict[str, Any]) -> None:
        """Handle one log record (override this); do not log with ``self.log`` here."""
        raise NotImplementedError(f"{type(self).__name__} must define async def process_log()")

    def patterns(self) -> list[str]:
        """The channel patterns to PSUBSCRIBE (Karton's: one from the two attributes)."""
        return [KartonBackend.log_channel(self.level, self.logger_filter)]

    def stop(self, *, grace: float | None = None) -> None:
        """Stop consuming (the record being processed finishes first)."""
        if self._scope is not None:
            self._scope.cancel()

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Subscribe, then hand each record to :meth:`process_log` until :meth:`stop`."""
        if self._stack is None:
            async with self:
                await self._run(task_status)
        else:
            await self._run(task_status)

    async def _run(self, task_status: TaskStatus[None]) -> None:
        presence = self.backend.connector.named(self.client_name)
        self._task_status = task_status
        backoff = 0.5
        try:
            with anyio.CancelScope() as self._scope:
                await self.backend.ping(presence)
                self.log.info("Logger %s started", self.identity)
                while True:
                    try:
                        await self._consume()
                    except TRANSIENT_ERRORS as exc:
                        _internal.warning(
                            "Log subscription lost (%s); again in %.1fs", exc, backoff
                        )
                        await anyio.sleep(backoff)
                        backoff = min(backoff * 2, 10.0)
        finally:
            self._scope = None
            with anyio.CancelScope(shield=True):
                await presence.aclose()

    async def _consume(self) -> None:
        # One PUBLISH reaches us once per matching pattern, back to back; keep the first.
        last: tuple[Any, Any] | None = None
        seen: set[Any] = set()
        async for pattern, channel, data in self.backend.log_messages(
            self.patterns(), self._subscribed
        ):
            key = (channel, data)
            if key == last and pattern not in seen:
                seen.add(pattern)
                continue
            last, seen = key, {pattern}
            await self._deliver(data)

    def _subscribed(self) -> None:
        if self._task_status is not None:
            self._task_status.started()
            self._task_status = None

    async def _deliver(self, data: str | bytes) -> None:
        try:
            event = decode_event(data)
        except ValueError as exc:
            _internal.warning("Unreadable log record skipped: %s", exc)
            return
        try:
            await self.process_log(event)
        except Exception:  # noqa: BLE001 - one bad record must not stop the consumer
            _internal.exception("%s.process_log failed on a record", type(self).__name__)


_COLOURS = {
    "DEBUG": "\x1b[2m",
    "INFO": "\x1b[36m",
    "WARNING": "\x1b[33m",
    "ERROR": "\x1b[31m",
    "CRITICAL": "\x1b[1;31m",
}
_RESET = "\x1b[0m"


class LogPrinter(LogConsumer):
    """Prints every matching record: a readable line, or one JSON object per line.

    Args:
        config: where Redis is.
        identities: identities (globs allowed) to show; empty = every service.
        level: the lowest level shown (records of higher standard levels are shown too).
        as_json: print each record as one JSON object per line.
        colour: colour the level (for terminals).
        out: where to write (default ``sys.stdout``).
    """

    identity: ClassVar[str] = "asynckarton.cli-logger"

    def __init__(
        self,
        config: Config | None = None,
        *,
        identities: Sequence[str] = (),
        level: str = "DEBUG",
        as_json: bool = False,
        colour: bool = False,
        out: IO[str] | None = None,
    ) -> None:
        super().__init__(config)
        name = level.strip().upper()
        if name not in LEVELS:
            raise ValueError(f"unknown log level {level!r}; use one of {', '.join(LEVELS)}")
        self.levels = LEVELS[LEVELS.index(name) :]
        self.identities = tuple(identities) or ("*",)
        self.as_json = as_json
        self.colour = colour
        self.out = out

    def patterns(self) -> list[str]:
        """One pattern per (level, identity): Redis does the filtering."""
        if self.levels == LEVELS and self.identities == ("*",):
            return [KartonBackend.log_channel(None, None)]
        return [
            KartonBackend.log_channel(level, ident)
            for level in self.levels
            for ident in self.identities
        ]

    def format(self, event: dict[str, Any]) -> str:
        """One line: time, level, identity, task id and message."""
        if self.as_json:
            return json.dumps(event, default=str)
        created = event.get("created")
        stamp = (
            time.strftime("%H:%M:%S", time.localtime(float(created)))
            if isinstance(created, (int, float))
            else "--:--:--"
        )
        level = str(event.get("levelname") or "?")
        shown = f"{_COLOURS.get(level, '')}{level:<8}{_RESET}" if self.colour else f"{level:<8}"
        task = event.get("task_id")
        where = f" [{task}]" if task and task != "(no task)" else ""
        return f"{stamp} {shown} {event.get('name', '?')}{where}: {event.get('message', '')}"

    async def process_log(self, event: dict[str, Any]) -> None:
        """Write the record's line."""
        out = self.out if self.out is not None else sys.stdout
        out.write(self.format(event) + "\n")
        out.flush()
