"""Karton log publishing: records of a service's logger go to ``karton.log.<level>.<id>``.

The handler never does I/O: ``emit`` (sync, any thread) formats the record in Karton's
shape and appends it to a bounded buffer; the service's publisher task drains the
buffer in pipelined batches.  Nothing here configures logging: the handler is attached
to the service's own logger for the service's lifetime only.
"""

from __future__ import annotations

import asyncio
import collections
import json
import logging
import os
import platform
import threading
import time
import traceback
from collections.abc import Mapping
from typing import Any

import anyio
import orjson

from .._wire._task import get_current_task
from ..backend import KartonBackend
from ..backend._guard import TRANSIENT_ERRORS

__all__ = ["KartonLogHandler", "RecordMaker", "dumps_record", "format_record", "needs_record"]

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
    """Serialise a log record (orjson; anything exotic becomes its ``str``)."""
    try:
        return orjson.dumps(line, default=str).decode()
    except TypeError:  # e.g. integers beyond 64 bits in ``args``
        return json.dumps(line, default=str)


def format_record(record: logging.LogRecord) -> dict[str, Any]:
    """Return ``record`` as the JSON object Karton's log consumers expect (docs/wire-format.md)."""
    line = {k: v for k, v in record.__dict__.items() if k not in _IGNORED}
    if record.exc_info and record.exc_info[0] is not None:
        exc_type, exc, tb = record.exc_info
        line["excText"] = _MESSAGE_FORMATTER.formatException(record.exc_info)
        line["excValue"] = str(exc)
        line["excTraceback"] = traceback.format_exception(exc_type, exc, tb)
        line["excType"] = exc_type.__name__
    line["type"] = "log"
    line["message"] = _MESSAGE_FORMATTER.format(record)
    task = get_current_task()
    line["task_id"] = task.task_uid if task is not None else "(no task)"
    if task is not None:
        line["task"] = task.serialize_state()
    line["hostname"] = HOSTNAME
    return line


class RecordMaker:
    """Makes the LogRecords of one logger's per-task lines cheaply.

    ``Logger.makeRecord`` spends most of its time on what never changes between two
    records of the same call site in the same thread (file name, module, thread and
    process names).  A record made the ordinary way once per thread serves as the
    template; each new record copies it and sets the time and the message.  A custom
    logger class or record factory (``logging.setLogRecordFactory``) is always honoured:
    then every record comes from ``makeRecord``.
    """

    def __init__(self, logger: logging.Logger, pathname: str, func: str) -> None:
        self.logger = logger
        self._pathname = pathname
        self._func = func
        self._templates: dict[tuple[object, ...], dict[str, Any]] = {}

    def _ordinary(self, level: int, msg: str, args: tuple[object, ...]) -> logging.LogRecord:
        return self.logger.makeRecord(
            self.logger.name, level, self._pathname, 0, msg, args, None, self._func
        )

    def make(self, level: int, msg: str, args: tuple[object, ...]) -> logging.LogRecord:
        """A record equal to what ``makeRecord`` would return for this call."""
        if (
            logging.getLogRecordFactory() is not logging.LogRecord
            or type(self.logger).makeRecord is not logging.Logger.makeRecord
        ):
            return self._ordinary(level, msg, args)
        if len(args) == 1 and isinstance(args[0], Mapping) and args[0]:
            return self._ordinary(level, msg, args)  # LogRecord unwraps a lone mapping
        key = (
            threading.get_ident(), threading.current_thread().name, os.getpid(), level,
            logging.logThreads, logging.logProcesses, logging.logMultiprocessing,
            getattr(logging, "logAsyncioTasks", None),
        )  # fmt: skip
        template = self._templates.get(key)
        if template is None:
            record = self._ordinary(level, msg, args)
            if len(self._templates) >= 64:  # threads come and go: keep it bounded
                self._templates.clear()
            self._templates[key] = dict(record.__dict__)
            return record
        record = logging.LogRecord.__new__(logging.LogRecord)
        fields = record.__dict__
        fields.update(template)
        now = time.time_ns()
        created = now / 1e9
        fields["msg"], fields["args"], fields["created"] = msg, args, created
        fields["msecs"] = float((now % 1_000_000_000) // 1_000_000)
        fields["relativeCreated"] = (
            template["relativeCreated"] + (created - template["created"]) * 1000
        )
        if "taskName" in template and getattr(logging, "logAsyncioTasks", False):
            fields["taskName"] = _asyncio_task_name()  # Python 3.12+
        return record


def _asyncio_task_name() -> str | None:
    try:
        task = asyncio.current_task()
    except RuntimeError:
        return None
    return task.get_name() if task is not None else None


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
        #: (logger, level, call site) -> channel and the constant fields of its lines
        self._lines: dict[tuple[str, int, str], tuple[str, dict[str, Any]]] = {}

    def emit(self, record: logging.LogRecord) -> None:
        if getattr(record, "karton_published", False):
            return  # published directly by publish_line()
        try:
            body = dumps_record(format_record(record))
        except Exception:  # noqa: BLE001 - a bad record must never break the service
            self.handleError(record)
            return
        self._buffer.append((self._backend.log_channel(record.levelname, self._channel), body))

    def publish_line(self, logger: logging.Logger, level: int, message: str, where: str) -> None:
        """Publish one record built directly, in the shape :func:`format_record` gives.

        For the lines a consumer logs for every task: no LogRecord is needed when no
        other handler wants it (see :func:`needs_record`).
        """
        key = (logger.name, level, where)
        known = self._lines.get(key)
        if known is None:
            levelname = logging.getLevelName(level)
            module, _, func = where.partition(":")
            template = {
                "name": logger.name,
                "levelname": levelname,
                "levelno": level,
                "filename": module + ".py",
                "module": module,
                "lineno": 0,
                "funcName": func,
                "type": "log",
                "hostname": HOSTNAME,
            }
            channel = self._backend.log_channel(levelname, self._channel)
            known = self._lines[key] = (channel, template)
        channel, template = known
        task = get_current_task()
        line = template.copy()
        line["created"] = time.time()
        line["message"] = message
        if task is not None:
            line["task_id"] = task.task_uid
            line["task"] = task.serialize_state()
        else:
            line["task_id"] = "(no task)"
        self._buffer.append((channel, dumps_record(line)))

    async def run(self, interval: float = 0.05) -> None:
        """Publish buffered records until cancelled (flushing what is left, shielded)."""
        try:
            while True:
                await self.flush_async()
                await anyio.sleep(interval)
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


def needs_record(logger: logging.Logger, level: int, publisher: logging.Handler | None) -> bool:
    """Tell whether a handler other than ``publisher`` would handle ``level`` records."""
    current: logging.Logger | None = logger
    while current is not None:
        for handler in current.handlers:
            if handler is not publisher and level >= handler.level:
                return True
        if not current.propagate:
            return False
        current = current.parent
    return False
