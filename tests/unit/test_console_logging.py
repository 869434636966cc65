"""The CLI's console: Karton's lines, written once per loop turn, never lost; per-task lines.

The console handler (``_logging.ConsoleHandler``, installed by ``_run.configure_logging``)
buffers the lines a running event loop logs and writes them at the end of the loop turn;
``hot_log`` makes the consumer's two per-task lines without a ``LogRecord`` when only
asynckarton's own handlers take them.  These tests check that operators see the same
lines, in the same order, as with ``logging.StreamHandler`` and ``Logger.log``.
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
import os
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, ClassVar, cast

import anyio
import anyio.lowlevel
import pytest

from asynckarton import Consumer, Task, testing
from asynckarton._services._logging import (
    CONSOLE_FORMAT,
    ConsoleFormatter,
    ConsoleHandler,
    KartonLogHandler,
    hot_log,
)
from asynckarton._services._run import configure_logging
from asynckarton._wire._task import current_task
from asynckarton.backend import KartonBackend

REFERENCE = logging.Formatter(CONSOLE_FORMAT)  # what logging.basicConfig(format=...) prints


def _record(msg: str, *args: object, created: float, exc_info: Any = None) -> logging.LogRecord:
    record = logging.LogRecord("svc", logging.INFO, __file__, 1, msg, args, exc_info)
    record.created = created
    record.msecs = int((created - int(created)) * 1000) + 0.0
    return record


# -- the formatter ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "created", [1795349442.417694, 1795349442.0, 1795349442.9999, 1795349443.001, 1700000000.5]
)
def test_console_lines_are_the_standard_formatters_lines(created: float) -> None:
    formatter = ConsoleFormatter()
    for _ in range(2):  # the second from the cached date of that second
        record = _record("Task done - %s", "u-1", created=created)
        assert formatter.format(record) == REFERENCE.format(record)
        assert formatter.line("INFO", "Task done - u-1", created) == REFERENCE.format(record)


def test_console_lines_with_exceptions_and_dates_are_the_standard_ones() -> None:
    formatter = ConsoleFormatter()
    try:
        raise KeyError("k")
    except KeyError:
        record = _record("failed %d%%", 3, created=1795349442.5, exc_info=sys.exc_info())
    assert formatter.format(record) == logging.Formatter(CONSOLE_FORMAT).format(record)
    assert formatter.formatTime(record, "%H") == REFERENCE.formatTime(record, "%H")


# -- the handler -----------------------------------------------------------------------


@pytest.fixture
def console() -> Iterator[tuple[logging.Logger, io.StringIO, ConsoleHandler]]:
    """A logger of its own (no propagation to pytest's handlers) with a console."""
    stream = io.StringIO()
    handler = ConsoleHandler(stream)
    log = logging.getLogger("test.console")
    log.addHandler(handler)
    log.propagate = False
    log.setLevel(logging.DEBUG)
    try:
        yield log, stream, handler
    finally:
        log.removeHandler(handler)
        log.propagate = True
        log.setLevel(logging.NOTSET)


def _messages(stream: io.StringIO) -> list[str]:
    return [line.split("] ", 1)[1] for line in stream.getvalue().splitlines()]


def test_outside_an_event_loop_lines_are_written_at_once(
    console: tuple[logging.Logger, io.StringIO, ConsoleHandler],
) -> None:
    log, stream, _ = console
    log.info("one")
    assert _messages(stream) == ["one"]
    log.debug("two %s", "2")
    assert _messages(stream) == ["one", "two 2"]


def test_in_a_loop_lines_wait_for_the_end_of_the_turn_warnings_do_not(
    console: tuple[logging.Logger, io.StringIO, ConsoleHandler],
) -> None:
    log, stream, handler = console
    flushes = 0
    real_flush = stream.flush

    def counted_flush() -> None:
        nonlocal flushes
        flushes += 1
        real_flush()

    stream.flush = counted_flush  # type: ignore[method-assign]

    async def main() -> None:
        log.info("a")
        log.info("b")
        assert stream.getvalue() == ""  # buffered for this turn
        await anyio.lowlevel.checkpoint()
        assert _messages(stream) == ["a", "b"] and flushes == 1  # one write for the turn
        log.info("c")
        log.warning("d")  # written at once, after what was buffered
        assert _messages(stream) == ["a", "b", "c", "d"]
        log.info("e")
        log.error("f")
        log.info("g")
        assert _messages(stream) == ["a", "b", "c", "d", "e", "f"]
        await anyio.lowlevel.checkpoint()

    anyio.run(main)
    assert _messages(stream) == ["a", "b", "c", "d", "e", "f", "g"]
    assert handler._lines == []


def test_a_full_buffer_is_written_at_once(
    console: tuple[logging.Logger, io.StringIO, ConsoleHandler],
) -> None:
    log, stream, handler = console
    handler.max_lines = 3

    async def main() -> None:
        for n in range(7):
            log.info("%d", n)
        assert _messages(stream) == ["0", "1", "2", "3", "4", "5"]
        await anyio.lowlevel.checkpoint()
        assert _messages(stream) == [str(n) for n in range(7)]

    anyio.run(main)


def test_with_a_delay_lines_wait_that_long(
    console: tuple[logging.Logger, io.StringIO, ConsoleHandler],
) -> None:
    log, stream, handler = console
    handler.delay = 0.05

    async def main() -> None:
        log.info("late")
        await anyio.lowlevel.checkpoint()
        assert stream.getvalue() == ""
        await anyio.sleep(0.2)
        assert _messages(stream) == ["late"]

    anyio.run(main)


def test_no_line_is_lost_when_the_loop_closes_before_its_flush_ran(
    console: tuple[logging.Logger, io.StringIO, ConsoleHandler],
) -> None:
    log, stream, _ = console
    loop = asyncio.new_event_loop()
    try:
        loop.call_soon(log.info, "logged in the last turn")
        loop.call_soon(loop.stop)
        loop.run_forever()  # the flush callback is scheduled but never runs
    finally:
        loop.close()
    assert stream.getvalue() == ""
    log.info("after the loop")  # no loop now: everything, in order
    assert _messages(stream) == ["logged in the last turn", "after the loop"]

    loop = asyncio.new_event_loop()  # a new loop gets its own flush
    try:
        loop.call_soon(log.info, "in a new loop")
        loop.call_soon(loop.stop)
        loop.run_forever()
        loop.run_until_complete(asyncio.sleep(0))
    finally:
        loop.close()
    assert _messages(stream)[-1] == "in a new loop"


def test_no_line_is_lost_when_the_task_is_cancelled(
    console: tuple[logging.Logger, io.StringIO, ConsoleHandler],
) -> None:
    log, stream, handler = console

    async def main() -> None:
        with anyio.CancelScope() as scope:
            log.info("before cancel")
            scope.cancel()
            await anyio.sleep(1)
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        anyio.run(main)
    handler.flush()  # what logging.shutdown() and serve_forever() do
    assert _messages(stream) == ["before cancel"]


def test_records_from_another_thread_are_written_at_once_in_order(
    console: tuple[logging.Logger, io.StringIO, ConsoleHandler],
) -> None:
    log, stream, _ = console

    async def main() -> None:
        log.info("loop")
        await anyio.to_thread.run_sync(log.info, "thread")
        assert _messages(stream) == ["loop", "thread"]

    anyio.run(main)


def test_a_broken_stream_is_reported_not_raised(
    console: tuple[logging.Logger, io.StringIO, ConsoleHandler],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    log, stream, handler = console
    stream.close()
    errors = io.StringIO()
    monkeypatch.setattr(sys, "stderr", errors)
    log.warning("lost")
    handler.flush()
    assert "could not be written" in errors.getvalue()


EXITS = """
import logging, sys
import anyio
import anyio.lowlevel
from asynckarton._services._run import configure_logging, serve_forever

configure_logging("INFO")
log = logging.getLogger("probe")

async def main():
    for n in range(3):
        log.info("line %d", n)
    if sys.argv[1] == "raise":
        raise RuntimeError("crashed after logging")
    if sys.argv[1] == "exit":
        sys.exit(3)

if sys.argv[1] == "serve":
    class Quick:
        identity = "probe.quick"
        config = None
        async def __aenter__(self): return self
        async def __aexit__(self, *exc): return None
        async def run(self, *, task_status=anyio.TASK_STATUS_IGNORED):
            task_status.started()
            for n in range(3):
                log.info("served %d", n)
            raise RuntimeError("the service failed")
        def stop(self, *, grace=None): pass
    serve_forever([Quick()], log_level="INFO")
else:
    anyio.run(main)
"""


@pytest.mark.parametrize("how", ["return", "raise", "exit", "serve"])
def test_no_line_is_lost_at_exit(tmp_path: Path, how: str) -> None:
    script = tmp_path / "exits.py"
    script.write_text(textwrap.dedent(EXITS), encoding="utf-8")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    done = subprocess.run(
        [sys.executable, str(script), how],
        check=False,
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    lines = done.stderr.splitlines()
    logged = [line for line in lines if line.startswith("[") and "][INFO] " in line]
    word = "served" if how == "serve" else "line"
    assert [line.split("] ", 1)[1] for line in logged][:3] == [f"{word} {n}" for n in range(3)]
    if how == "serve":  # the failure line comes after the lines logged before it
        assert done.returncode == 1
        assert lines[-1] == "asynckarton: error: RuntimeError: the service failed"
        assert lines.index(logged[2]) < len(lines) - 1
    elif how == "raise":
        assert "crashed after logging" in done.stderr
    else:
        assert done.returncode == (3 if how == "exit" else 0)


# -- per-task lines ---------------------------------------------------------------------


@contextmanager
def service_log() -> Iterator[tuple[logging.Logger, KartonLogHandler, ConsoleHandler]]:
    """A service logger as the CLI runs it: its publisher, then a console up the tree.

    Made in the test's body: pytest attaches its capture handler to the loggers that
    do not propagate when a test phase starts (that would need records).
    """
    parent = logging.getLogger("test.hot")
    console = ConsoleHandler(io.StringIO())
    parent.addHandler(console)
    parent.propagate = False  # pytest's own handlers sit on the root logger
    log = logging.getLogger("test.hot.svc")
    publisher = KartonLogHandler(cast(KartonBackend, None), "test.hot.svc")
    log.addHandler(publisher)
    log.setLevel(logging.INFO)
    try:
        yield log, publisher, console
    finally:
        log.removeHandler(publisher)
        parent.removeHandler(console)
        parent.propagate = True
        log.setLevel(logging.NOTSET)


@pytest.fixture
def records_made(monkeypatch: pytest.MonkeyPatch) -> list[logging.LogRecord]:
    """The records ``Logger.makeRecord`` makes during the test."""
    made: list[logging.LogRecord] = []
    make = logging.Logger.makeRecord

    def counted(self: logging.Logger, *args: Any, **kwargs: Any) -> logging.LogRecord:
        record = make(self, *args, **kwargs)
        made.append(record)
        return record

    monkeypatch.setattr(logging.Logger, "makeRecord", counted)
    return made


class _Keep(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def _hot(log: logging.Logger, n: int) -> None:
    hot_log(log, logging.INFO, "Received new task - %s%s", (f"u-{n}", ""), stacklevel=1)


def test_hot_lines_equal_the_record_path_on_the_console_and_in_karton_logs(
    records_made: list[logging.LogRecord],
) -> None:
    task = Task({"type": "x"}, payload={"n": 1})
    token = current_task.set(task)
    try:
        with service_log() as (log, publisher, console):
            _hot(log, 1)  # no record: only asynckarton's handlers
            assert [r for r in records_made if r.msg] == []  # (the site's template has none)
            keep = _Keep()
            log.addHandler(keep)  # a user's handler: the record path
            _hot(log, 2)
            log.removeHandler(keep)
    finally:
        current_task.reset(token)
    published = [json.loads(body) for _, body in publisher._buffer]
    assert [channel for channel, _ in publisher._buffer] == ["karton.log.info.test.hot.svc"] * 2
    fast, slow = published
    assert keep.records == [r for r in records_made if r.msg]  # the user's handler got it
    [record] = keep.records
    assert (record.funcName, record.getMessage()) == ("_hot", "Received new task - u-2")
    stream = cast(io.StringIO, console.stream)
    assert stream.getvalue().splitlines() == [  # what logging.basicConfig's handler prints
        REFERENCE.format(_record("Received new task - %s%s", "u-1", "", created=fast["created"])),
        REFERENCE.format(record),
    ]
    assert fast["message"] == "Received new task - u-1"
    assert slow["message"] == "Received new task - u-2"
    for line in (fast, slow):
        line.pop("created"), line.pop("message")
    assert fast == slow and fast["funcName"] == "_hot" and fast["task_id"] == task.task_uid


def test_hot_lines_respect_levels_filters_and_bad_formats(
    records_made: list[logging.LogRecord],
) -> None:
    with service_log() as (log, publisher, console):
        stream = cast(io.StringIO, console.stream)
        log.setLevel(logging.WARNING)
        _hot(log, 1)
        assert not publisher._buffer and stream.getvalue() == "" and not records_made
        log.setLevel(logging.INFO)
        log.addFilter(lambda record: record.getMessage().endswith("3"))
        _hot(log, 2)  # filtered out by the logger's filter (the record path)
        _hot(log, 3)
        log.filters.clear()
        assert [json.loads(body)["message"] for _, body in publisher._buffer] == [
            "Received new task - u-3"
        ]
        assert stream.getvalue().endswith("][INFO] Received new task - u-3\n")
        errors = io.StringIO()
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(sys, "stderr", errors)
            hot_log(log, logging.INFO, "bad %d", ("x",))  # reported as logging does, not raised
        assert "--- Logging error ---" in errors.getvalue()
        console.setFormatter(logging.Formatter("%(name)s: %(message)s"))  # an operator's own
        _hot(log, 4)
        assert stream.getvalue().endswith("\ntest.hot.svc: Received new task - u-4\n")


def test_configure_logging_keeps_a_programs_own_handlers() -> None:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    try:
        assert configure_logging("warning") == "WARNING"
        assert root.handlers == handlers and root.level == logging.WARNING
        assert not any(isinstance(h, ConsoleHandler) for h in root.handlers)
    finally:
        root.setLevel(level)


def test_a_console_alone_gets_lines_with_no_publisher() -> None:
    log = logging.getLogger("test.hot.alone")
    stream = io.StringIO()
    console = ConsoleHandler(stream)
    log.addHandler(console)
    log.propagate = False
    log.setLevel(logging.INFO)
    try:
        before = time.time()
        hot_log(log, logging.INFO, "Task done - %s", ("u-9",))
    finally:
        log.removeHandler(console)
        log.propagate = True
        log.setLevel(logging.NOTSET)
    [line] = stream.getvalue().splitlines()
    assert line.endswith("][INFO] Task done - u-9")
    assert line[1:20] == time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(before)) or (
        line[1:20] == time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(before + 1))
    )


class Quiet(Consumer):
    identity = "test.console.quiet"
    filters: ClassVar[list[dict[str, Any]]] = [{"type": "quiet"}]

    async def process(self, task: Task) -> None:
        pass


@pytest.mark.anyio
async def test_a_consumers_per_task_lines_on_the_console_and_in_karton_logs(
    tmp_path: Path, published: list[dict[str, Any]], records_made: list[logging.LogRecord]
) -> None:
    """The CLI's set-up: published lines as before, console lines in Karton's format."""
    stream = io.StringIO()
    console = ConsoleHandler(stream)
    log = logging.getLogger(Quiet.identity)
    log.addHandler(console)
    log.propagate = False
    log.setLevel(logging.INFO)
    try:
        async with testing.pipeline(Quiet, data_dir=tmp_path) as p:
            sent = [Task({"type": "quiet"}) for _ in range(3)]
            for task in sent:
                await p.send(task)
            await p.wait_idle()
            done = await p.tasks(receiver=Quiet.identity)
    finally:
        log.removeHandler(console)
        log.propagate = True
        log.setLevel(logging.NOTSET)
    console.flush()
    uids = {task.uid for task in done}
    assert len(uids) == 3
    assert not [r for r in records_made if r.name == Quiet.identity and " - " in r.getMessage()]
    lines = [line for line in stream.getvalue().splitlines() if " - " in line]
    for uid in uids:
        mine = [line.split("][INFO] ", 1)[1] for line in lines if uid in line]
        assert mine == [f"Received new task - {uid}", f"Task done - {uid}"]
    per_task = {
        (line["message"], json.loads(line["task"])["status"])
        for line in published
        if " - " in line["message"]
    }
    assert per_task == {(f"Received new task - {u}", "Spawned") for u in uids} | {
        (f"Task done - {u}", "Finished") for u in uids
    }
    for line in published:
        assert line["filename"] == "_consumer.py" or " - " not in line["message"]
