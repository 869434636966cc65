"""Karton log publishing: records of a service's logger go to ``karton.log.<level>.<id>``.

The handler never does I/O: ``emit`` (sync, any thread) turns the record into Karton's
JSON line and appends it to a bounded buffer; the service's publisher task drains the
buffer in pipelined batches.  Nothing here configures logging: the handler is attached
to the service's own logger for the service's lifetime only.

One builder makes every published line, :func:`karton_line`: the fields of a
``LogRecord`` (what :func:`record_fields` keeps of it, Karton's choice) plus ``type``,
``task_id``, ``task`` (the current task's JSON, when there is one) and ``hostname``.
Records come from the standard library (``Logger.makeRecord``, ``Formatter``, handler
dispatch), so every line has its real ``filename``, ``lineno`` and ``funcName``.

Shortcuts kept, each because a measurement showed it.  ``python -m benchmarks.run
--only plain``, consumer CPU per delivery on the shared 2-core machine (load 8-11):
with no shortcut at all (``Logger.info``, a full build per line) 143-150 us against
95-125 us before; with the two below 135 us.  Per task (a consumer's two per-task lines,
``timeit`` with ``time.process_time``):

* :class:`SiteLines`: the fields of the first record of a call site are the template
  of its later plain records' lines (only ``created`` and ``message`` change), instead
  of :func:`record_fields` and ``Formatter`` per record.  The router's per-task
  "Processing task" line (karton-system publishes it too) uses such a template with
  no record at all (:func:`site_line_maker`): up to tens of thousands of lines a
  second, published only, as before.
* :func:`hot_log`, for the consumer's per-task lines: when only asynckarton's own
  handlers would take the record (the lookup ``callHandlers`` makes: the service's
  :class:`KartonLogHandler`, the CLI's :class:`ConsoleHandler`) no record is made;
  the message is formatted once and shared by the published line (its site's
  template) and the console line (:meth:`ConsoleFormatter.line`).  With any other
  handler (a user's own), the record is made by ``makeRecord`` for the known call
  site, skipping ``findCaller``.  The two lines inside a task, published and printed
  to a file (``time.process_time``): 40-42 us per task with ``makeRecord`` and
  ``logging.StreamHandler``, 14-15 us with :func:`hot_log` and :class:`ConsoleHandler`.

The console (:class:`ConsoleHandler`, installed only at the program's edge by
``_run.configure_logging``) prints Karton's lines as ``logging.StreamHandler`` would,
but writes what a loop turn logged in one ``write`` instead of one per record (see
the class).  A consumer draining a queue of 10,000 tasks whose handler awaits one
Redis INCR (64 at once, ``[logging] level`` INFO, stderr to a file): 241 us of CPU
per delivery with ``basicConfig``'s handler and the record path, 196 us with both
(median of 5 runs each; 134-141 us at WARNING).
"""

from __future__ import annotations

import asyncio
import collections
import json
import logging
import platform
import sys
import threading
import time
import traceback
from collections.abc import Callable, Mapping
from types import FrameType
from typing import Any, TextIO

import anyio
import orjson

from .._wire._task import get_current_task
from ..backend import KartonBackend
from ..backend._guard import TRANSIENT_ERRORS

__all__ = [
    "CONSOLE_FORMAT",
    "ConsoleFormatter",
    "ConsoleHandler",
    "KartonLogHandler",
    "SiteLines",
    "dumps_record",
    "hot_log",
    "karton_line",
    "record_fields",
    "site_line_maker",
]

HOSTNAME = platform.node()
_IGNORED = frozenset(
    {
        "args", "asctime", "msecs", "msg", "pathname", "process", "processName",
        "relativeCreated", "exc_info", "exc_text", "stack_info", "thread", "threadName",
        "taskName",
    }
)  # fmt: skip
_MESSAGE_FORMATTER = logging.Formatter()


def dumps_record(line: dict[str, Any]) -> str:
    """Serialise a log line (orjson; anything exotic becomes its ``str``)."""
    try:
        return orjson.dumps(line, default=str).decode()
    except TypeError:  # e.g. integers beyond 64 bits in ``args``
        return json.dumps(line, default=str)


def record_fields(record: logging.LogRecord) -> dict[str, Any]:
    """The fields of ``record`` Karton publishes, with its formatted ``message``.

    Everything in the record but the process/thread bookkeeping, the raw message and
    arguments and the path (``extra=`` fields included), the exception in four forms
    when there is one, and ``message`` as ``logging.Formatter()`` formats it.
    """
    fields = {k: v for k, v in record.__dict__.items() if k not in _IGNORED}
    if record.exc_info and record.exc_info[0] is not None:
        exc_type, exc, tb = record.exc_info
        fields["excText"] = _MESSAGE_FORMATTER.formatException(record.exc_info)
        fields["excValue"] = str(exc)
        fields["excTraceback"] = traceback.format_exception(exc_type, exc, tb)
        fields["excType"] = exc_type.__name__
    fields["message"] = _MESSAGE_FORMATTER.format(record)
    return fields


def karton_line(fields: dict[str, Any]) -> str:
    """The one builder of published lines: complete ``fields`` and serialise them.

    Adds ``type`` and ``hostname``, and ``task_id`` and ``task`` of the task being
    processed in this context (``"(no task)"`` and no ``task`` outside one): the line
    karton-core, karton-dashboard and ``karton logs`` read.  ``fields`` is changed.
    """
    fields["type"] = "log"
    fields["hostname"] = HOSTNAME
    return _with_task(fields)


def _with_task(fields: dict[str, Any]) -> str:
    """:func:`karton_line` for fields that already hold ``type`` and ``hostname``."""
    task = get_current_task()
    if task is not None:
        fields["task_id"] = task.task_uid
        fields["task"] = task.serialize_state()
    else:
        fields["task_id"] = "(no task)"
    return dumps_record(fields)


def _template(record: logging.LogRecord) -> dict[str, Any]:
    """The fields of ``record``'s line that its call site's later lines share."""
    template = record_fields(record)
    template["type"] = "log"
    template["hostname"] = HOSTNAME
    return template


def _site_record(logger: logging.Logger, level: int, frame: FrameType) -> logging.LogRecord:
    """A record of ``logger`` at ``level`` made for ``frame``'s line (no message)."""
    code = frame.f_code
    return logger.makeRecord(
        logger.name, level, code.co_filename, frame.f_lineno, "", (), None, code.co_name
    )


_PLAIN_RECORD = frozenset(logging.makeLogRecord({}).__dict__)
"""The attributes of a record made without ``extra=`` fields."""


class SiteLines:
    """Lines of records from one call site share their constant fields (module doc).

    The first record of a site goes through :func:`record_fields`; its fields serve as
    the template of the site's later lines, which only set ``created`` and ``message``.
    Only plain records use a template: no ``extra=`` fields, no exception, no stack.
    """

    def __init__(self) -> None:
        self._sites: dict[tuple[object, ...], dict[str, Any]] = {}

    def _remember(self, key: tuple[object, ...], record: logging.LogRecord) -> dict[str, Any]:
        if len(self._sites) >= 256:  # call sites are few; bound it anyway
            self._sites.clear()
        template = self._sites[key] = _template(record)
        return template

    def of_record(self, record: logging.LogRecord) -> str:
        """The JSON line of ``record``: :func:`karton_line` of :func:`record_fields`."""
        if (
            record.exc_info is None
            and record.exc_text is None
            and record.stack_info is None
            and record.__dict__.keys() == _PLAIN_RECORD
        ):
            key = (
                record.name, record.levelno, record.levelname, record.pathname,
                record.lineno, record.funcName,
            )  # fmt: skip
            template = self._sites.get(key)
            if template is not None:
                fields = template.copy()
                fields["created"] = record.created
                fields["message"] = record.getMessage()  # what Formatter() gives here
                return _with_task(fields)
            return _with_task(self._remember(key, record).copy())
        return karton_line(record_fields(record))

    def line(
        self,
        logger: logging.Logger,
        level: int,
        message: str,
        created: float | None = None,
        stacklevel: int = 1,
    ) -> str:
        """The JSON line of ``message`` logged by ``logger`` at ``level``, no record made.

        Args:
            logger: the logger whose name the line carries.
            level: the logging level.
            message: the formatted message.
            created: the record's time (default: now).
            stacklevel: as in ``Logger.log``: 1 is the caller's line, 2 its caller's...
        """
        return self.line_at(sys._getframe(stacklevel), logger, level, message, created)

    def line_at(
        self,
        frame: FrameType,
        logger: logging.Logger,
        level: int,
        message: str,
        created: float | None = None,
    ) -> str:
        """:meth:`line` for a record made at ``frame``'s current line."""
        code = frame.f_code
        key = (logger.name, code, frame.f_lineno, level)
        template = self._sites.get(key)
        if template is None:
            template = self._remember(key, _site_record(logger, level, frame))
        fields = template.copy()
        fields["created"] = time.time() if created is None else created
        fields["message"] = message
        return _with_task(fields)


def site_line_maker(
    logger: logging.Logger, level: int, stacklevel: int = 1
) -> Callable[[str, float], str]:
    """A maker of ``logger``'s lines at ``level`` from the caller's line, for hot loops.

    What :meth:`SiteLines.line` does, with the call site looked up once: the router
    makes one per routing loop.  ``maker(message, created)`` returns the JSON line.
    """
    template = _template(_site_record(logger, level, sys._getframe(stacklevel)))

    def maker(message: str, created: float) -> str:
        fields = template.copy()
        fields["created"] = created
        fields["message"] = message
        return _with_task(fields)

    return maker


class KartonLogHandler(logging.Handler):
    """Buffers records for publishing; ``run()`` publishes them.

    Args:
        backend: where to PUBLISH.
        channel: the logger part of the channel name (the service identity).
        max_buffer: records kept while Redis is slow; the oldest are dropped beyond it.
    """

    def __init__(self, backend: KartonBackend, channel: str, max_buffer: int = 10_000) -> None:
        super().__init__()
        self._backend = backend
        self._channel = channel
        self._buffer: collections.deque[tuple[str, str]] = collections.deque(maxlen=max_buffer)
        self._warned = False
        self._lines = SiteLines()
        self._channels: dict[int, str] = {}  # level -> channel, for publish_at
        self._idle: anyio.Event | None = None  # set by _append while run() sleeps
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread = 0

    def takes_alone(self, logger: logging.Logger, level: int) -> bool:
        """Tell whether no handler but this one would take ``logger``'s ``level`` records.

        The lookup ``Logger.callHandlers`` makes (handlers up the hierarchy while
        ``propagate`` holds, each with its level); handler filters are not consulted.
        The router's console lines use it (``system/_console.py``).
        """
        current: logging.Logger | None = logger
        while current is not None:
            for handler in current.handlers:
                if handler is not self and level >= handler.level:
                    return False
            if not current.propagate:
                return True
            current = current.parent
        return True

    def publish_at(
        self, frame: FrameType, logger: logging.Logger, level: int, message: str, created: float
    ) -> None:
        """Buffer the line of ``message`` logged at ``frame``, no record made (:func:`hot_log`)."""
        line = self._lines.line_at(frame, logger, level, message, created)
        channel = self._channels.get(level)
        if channel is None:
            channel = self._channels[level] = KartonBackend.log_channel(
                logging.getLevelName(level), self._channel
            )
        self._append((channel, line))

    def emit(self, record: logging.LogRecord) -> None:
        if getattr(record, "karton_published", False):
            return  # published by its maker already (the router's lines, in its commit)
        try:
            body = self._lines.of_record(record)
        except Exception:  # noqa: BLE001 - a bad record must never break the service
            self.handleError(record)
            return
        self._append((KartonBackend.log_channel(record.levelname, self._channel), body))

    def _append(self, item: tuple[str, str]) -> None:
        """Buffer one line; wake :meth:`run` if it sleeps (from any thread)."""
        self._buffer.append(item)
        idle, loop = self._idle, self._loop
        if idle is not None and loop is not None:
            if threading.get_ident() == self._loop_thread:
                idle.set()
            else:  # logging from a worker thread (to_thread)
                loop.call_soon_threadsafe(idle.set)

    async def run(self, interval: float = 0.05) -> None:
        """Publish buffered records until cancelled (flushing what is left, shielded).

        Lines are published in batches at most ``interval`` seconds after the first of
        a batch; with nothing to publish the loop sleeps until a line arrives, so an
        idle service does not wake for its logs.
        """
        self._loop = asyncio.get_running_loop()
        self._loop_thread = threading.get_ident()
        try:
            while True:
                if not self._buffer:
                    self._idle = anyio.Event()
                    if not self._buffer:  # a line appended meanwhile is not missed
                        await self._idle.wait()
                    self._idle = None
                await anyio.sleep(interval)
                await self.flush_async()
        finally:
            with anyio.CancelScope(shield=True), anyio.move_on_after(2):
                await self.flush_async()

    async def flush_async(self) -> None:
        """Publish everything buffered now; on Redis errors keep the records for later."""
        if not self._buffer:
            return
        batch = list(self._buffer)
        try:
            delivered = await self._backend.publish_logs(batch)
        except TRANSIENT_ERRORS as exc:
            logging.getLogger("asynckarton").debug("log publishing failed: %s", exc)
            return
        for _ in batch:
            if self._buffer:
                self._buffer.popleft()
        if delivered == 0 and not self._warned:
            self._warned = True
            logging.getLogger("asynckarton").warning(
                "no active log consumer receives %s's logs", self._channel
            )
        elif delivered:
            self._warned = False


# -- the console: Karton's lines on stderr, written once per event-loop turn ------------

CONSOLE_FORMAT = "[%(asctime)s][%(levelname)s] %(message)s"  # karton-core's format


class ConsoleFormatter(logging.Formatter):
    """Karton's console format; the date part of a second's lines is formatted once.

    ``format(record)`` gives what ``logging.Formatter(CONSOLE_FORMAT)`` gives;
    :meth:`line` gives the same text for a plain message with no record at all.
    """

    def __init__(self) -> None:
        super().__init__(CONSOLE_FORMAT)
        self._second: tuple[int, str] = (-1, "")  # (int(created), its date); one object

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        if datefmt:
            return super().formatTime(record, datefmt)
        return self._stamp(record.created, record.msecs)

    def _stamp(self, created: float, msecs: float) -> str:
        second, date = self._second
        if second != int(created):
            date = time.strftime(self.default_time_format, self.converter(created))
            self._second = (int(created), date)
        return self.default_msec_format % (date, msecs) if self.default_msec_format else date

    def line(self, levelname: str, message: str, created: float) -> str:
        """The console line of a plain record (no exception, no stack) of ``message``."""
        msecs = int((created - int(created)) * 1000) + 0.0  # as LogRecord computes it
        return f"[{self._stamp(created, msecs)}][{levelname}] {message}"


class ConsoleHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """A ``StreamHandler`` in Karton's format that writes once per event-loop turn.

    ``StreamHandler`` writes and flushes every record: a system call per line, per
    task twice.  Here a record logged in a running event loop's thread is appended
    to a buffer, and the buffer is written (one ``write``, one ``flush``) by a
    callback the first record of a loop turn schedules: ``call_soon``, or
    ``call_later(delay)``.  Everything buffered is written at once, in order, when
    a record is WARNING or above, when the buffer holds ``max_lines``, when a
    record comes from a thread without a running loop (before and after the loop,
    worker threads) and on :meth:`flush`, which ``logging.shutdown`` calls at exit
    and ``serve_forever`` when its services stopped: a line is never lost when the
    loop is cancelled or closed before its callback ran.

    Only the program's edge installs it (``_run.configure_logging``); library code
    configures no logging.

    Args:
        stream: where lines go (default ``sys.stderr``).
        delay: seconds a line may wait for its batch (0: to the end of the loop turn).
        max_lines: lines buffered at most before they are written at once.
    """

    def __init__(
        self, stream: TextIO | None = None, *, delay: float = 0.0, max_lines: int = 512
    ) -> None:
        super().__init__(stream)
        self.setFormatter(ConsoleFormatter())
        self.delay = delay
        self.max_lines = max_lines
        self._lines: list[str] = []
        self._pending: asyncio.AbstractEventLoop | None = None  # loop a flush is due on

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.format(record)
        except RecursionError:
            raise
        except Exception:  # noqa: BLE001 - as StreamHandler: report it, never raise
            self.handleError(record)
            return
        self._add(line, record.levelno)

    def add_line(self, line: str, levelno: int) -> None:
        """Write ``line`` (already formatted) as a record of ``levelno`` would be."""
        self.acquire()
        try:
            self._add(line, levelno)
        finally:
            self.release()

    def _add(self, line: str, levelno: int) -> None:
        """Buffer ``line``; write now or make sure a flush is due (the lock is held)."""
        self._lines.append(line)
        if levelno >= logging.WARNING or len(self._lines) >= self.max_lines:
            self._write()
            return
        loop = asyncio._get_running_loop()
        if loop is None:  # not in a loop's thread: as StreamHandler, at once
            self._write()
        elif self._pending is not loop:
            self._pending = loop
            if self.delay > 0:
                loop.call_later(self.delay, self.flush)
            else:
                loop.call_soon(self.flush)

    def flush(self) -> None:
        """Write every buffered line and flush the stream."""
        self.acquire()
        try:
            self._pending = None
            self._write()
        finally:
            self.release()

    def _write(self) -> None:
        lines, self._lines = self._lines, []
        stream = self.stream
        try:
            if lines:
                lines.append("")
                stream.write(self.terminator.join(lines))
            if stream and hasattr(stream, "flush"):
                stream.flush()
        except RecursionError:
            raise
        except Exception:  # noqa: BLE001 - as StreamHandler: report it, never raise
            self.handleError(
                logging.makeLogRecord(
                    {"msg": "%d console line(s) could not be written", "args": (len(lines) - 1,)}
                )
            )


# -- per-task lines ----------------------------------------------------------------------


def _own_takers(
    logger: logging.Logger, level: int
) -> tuple[list[KartonLogHandler], list[ConsoleHandler]] | None:
    """The handlers ``logger``'s ``level`` records would reach, if all are asynckarton's.

    The lookup ``Logger.callHandlers`` makes; None when a record is needed: the logger
    or a handler has filters, a handler is another class (a user's own handler, a
    subclass) or a console handler has another formatter.
    """
    if logger.filters:
        return None
    publishers: list[KartonLogHandler] = []
    consoles: list[ConsoleHandler] = []
    current: logging.Logger | None = logger
    while current is not None:
        for handler in current.handlers:
            if level < handler.level:
                continue
            if handler.filters:
                return None
            kind = type(handler)
            if kind is KartonLogHandler:
                publishers.append(handler)  # type: ignore[arg-type]
            elif kind is ConsoleHandler and type(handler.formatter) is ConsoleFormatter:
                consoles.append(handler)  # type: ignore[arg-type]
            else:
                return None
        if not current.propagate:
            break
        current = current.parent
    return publishers, consoles


def hot_log(
    logger: logging.Logger,
    level: int,
    msg: str,
    args: tuple[object, ...],
    *,
    stacklevel: int = 1,
) -> None:
    """``logger.log(level, msg, *args, stacklevel=stacklevel)``, for per-task lines.

    When every handler that would take the record is asynckarton's own (the
    service's :class:`KartonLogHandler`, the CLI's :class:`ConsoleHandler`; no
    filters), no record is made: the message is formatted once, the publisher
    buffers its line from the call site's template (:class:`SiteLines`) and each
    console its line (:meth:`ConsoleFormatter.line`), both with the same ``created``.
    Otherwise (a user's own handler, filters) the record is made by
    ``Logger.makeRecord`` for the caller's line (what ``Logger.log`` looks up with
    ``findCaller``) and handled the ordinary way.  The lines are the same either way.
    """
    if not logger.isEnabledFor(level):
        return
    frame = sys._getframe(stacklevel)
    takers = _own_takers(logger, level)
    if takers is not None:
        publishers, consoles = takers
        if not publishers and not consoles:
            last = logging.lastResort
            if last is not None and level < last.level:
                return  # nobody takes it, and it is below the last resort's level
        else:
            try:
                lone = args[0] if len(args) == 1 else None
                if not isinstance(lone, str) and isinstance(lone, Mapping) and lone:
                    message = msg % lone  # LogRecord unwraps a lone mapping too
                else:
                    message = msg % args if args else msg
            except (TypeError, ValueError, KeyError):
                message = None  # a bad format: the record path reports it as logging does
            if message is not None:
                created = time.time()
                for publisher in publishers:
                    publisher.publish_at(frame, logger, level, message, created)
                if consoles:
                    levelname = logging.getLevelName(level)
                    for console in consoles:
                        formatter: ConsoleFormatter = console.formatter  # type: ignore[assignment]
                        console.add_line(formatter.line(levelname, message, created), level)
                return
    code = frame.f_code
    record = logger.makeRecord(
        logger.name, level, code.co_filename, frame.f_lineno, msg, args, None, code.co_name
    )
    logger.handle(record)
