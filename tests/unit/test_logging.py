"""Published Karton log lines: one builder, Karton's fields, real call sites."""

from __future__ import annotations

import inspect
import json
import logging
import platform
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar, cast

import pytest

from asynckarton import Consumer, Task, testing
from asynckarton._services import _consumer
from asynckarton._services._logging import (
    KartonLogHandler,
    SiteLines,
    hot_log,
    karton_line,
    record_fields,
)
from asynckarton._wire._task import current_task
from asynckarton.backend import KartonBackend

KARTON_FIELDS = {
    "name", "levelname", "levelno", "filename", "module", "lineno", "funcName", "created",
    "type", "message", "task_id", "hostname",
}  # fmt: skip


@pytest.fixture
def logger() -> Iterator[tuple[logging.Logger, KartonLogHandler]]:
    log = logging.getLogger("test.logging.lines")
    handler = KartonLogHandler(cast(KartonBackend, None), "test.service")
    log.addHandler(handler)
    level, log.level = log.level, logging.DEBUG
    try:
        yield log, handler
    finally:
        log.removeHandler(handler)
        log.setLevel(level)


def _published(handler: KartonLogHandler) -> list[tuple[str, dict[str, Any]]]:
    return [(channel, json.loads(body)) for channel, body in handler._buffer]


def _next_line() -> int:
    """The number of the caller's next line."""
    return sys._getframe(1).f_lineno + 1


def test_a_record_outside_a_task_is_published_in_karton_shape(
    logger: tuple[logging.Logger, KartonLogHandler],
) -> None:
    log, handler = logger
    expected = _next_line()
    log.warning("disk %s is %d%% full", "sda", 93, extra={"disk": "sda"})
    [(channel, line)] = _published(handler)
    assert channel == "karton.log.warning.test.service"
    assert set(line) == KARTON_FIELDS | {"disk"}
    assert line["message"] == "disk sda is 93% full"
    assert line["name"] == "test.logging.lines" and line["levelno"] == logging.WARNING
    assert line["funcName"] == "test_a_record_outside_a_task_is_published_in_karton_shape"
    assert line["lineno"] == expected
    assert line["filename"] == "test_logging.py" and line["module"] == "test_logging"
    assert line["type"] == "log" and line["task_id"] == "(no task)" and "task" not in line
    assert line["hostname"] == platform.node()


def test_a_record_inside_a_task_carries_the_task_and_its_exception(
    logger: tuple[logging.Logger, KartonLogHandler],
) -> None:
    log, handler = logger
    task = Task({"type": "x"}, payload={"n": 1})
    token = current_task.set(task)
    try:
        try:
            empty: dict[str, int] = {}
            empty["missing"]
        except KeyError:
            log.exception("failed")
    finally:
        current_task.reset(token)
    [(channel, line)] = _published(handler)
    assert channel == "karton.log.error.test.service"
    assert line["task_id"] == task.task_uid and json.loads(line["task"]) == task.to_dict()
    assert line["excType"] == "KeyError" and line["excValue"] == "'missing'"
    assert "KeyError" in line["excTraceback"][-1] and "Traceback" in line["excText"]
    assert line["message"].startswith("failed\nTraceback")


def _both(log: logging.Logger, sites: SiteLines) -> str:
    log.info("same words", stacklevel=2)
    return sites.line(log, logging.INFO, "same words", stacklevel=2)


def test_site_lines_equal_the_handler_line_of_the_same_call(
    logger: tuple[logging.Logger, KartonLogHandler],
) -> None:
    log, handler = logger
    sites = SiteLines()
    expected = _next_line()
    lines = [json.loads(_both(log, sites)) for _ in range(2)]  # the second from the template
    published = [line for _, line in _published(handler)]
    for direct, ordinary in zip(lines, published, strict=True):
        assert direct.pop("created") <= ordinary.pop("created") + 1
        assert direct == ordinary
        assert direct["lineno"] == expected
    later = json.loads(sites.line(log, logging.WARNING, "other", created=12.5))
    assert later["created"] == 12.5 and later["levelname"] == "WARNING"
    assert later["lineno"] != lines[0]["lineno"]


def _say(log: logging.Logger, n: int, exc: BaseException | None) -> None:
    log.info("n=%d", n, exc_info=exc)  # one call site for every record of the test below


def test_lines_of_one_call_site_equal_the_full_build(
    logger: tuple[logging.Logger, KartonLogHandler],
) -> None:
    log, handler = logger
    keep = _Keep()
    log.addHandler(keep)
    try:
        _say(log, 1, None)
        _say(log, 2, None)  # from the site's template
        _say(log, 3, KeyError("k"))  # exceptions never use a template
        _say(log, 4, None)
    finally:
        log.removeHandler(keep)
    published = [line for _, line in _published(handler)]
    expected = [json.loads(karton_line(record_fields(r))) for r in keep.records]
    assert published == expected
    assert [line["message"].split("\n")[0] for line in published] == ["n=1", "n=2", "n=3", "n=4"]
    assert "excType" in published[2] and "excType" not in published[3]


def test_hot_lines_equal_ordinary_ones_with_or_without_other_handlers(
    logger: tuple[logging.Logger, KartonLogHandler],
) -> None:
    log, handler = logger
    log.propagate = False
    keep = _Keep()
    try:
        expected = _next_line()
        hot_log(log, logging.INFO, "hot %s %d", ("a", 1))  # alone: no record made
        assert handler.takes_alone(log, logging.INFO)
        log.addHandler(keep)
        assert not handler.takes_alone(log, logging.INFO)
        for _ in range(2):
            hot_log(log, logging.INFO, "hot %s %d", ("a", 1))  # a record, then handled
        hot_log(log, logging.DEBUG - 1, "below the level", ())
    finally:
        log.propagate = True
        log.removeHandler(keep)
    alone, *ordinary = [line for _, line in _published(handler)]
    assert len(ordinary) == 2 and [r.getMessage() for r in keep.records] == ["hot a 1"] * 2
    assert alone["lineno"] == expected and alone["message"] == "hot a 1"
    assert ordinary[0]["lineno"] == expected + 5 and keep.records[0].lineno == expected + 5
    for line in (alone, *ordinary):
        line.pop("created"), line.pop("lineno")
    assert alone == ordinary[0] == ordinary[1]


class Quiet(Consumer):
    identity = "test.logging.quiet"
    filters: ClassVar[list[dict[str, Any]]] = [{"type": "quiet"}]

    async def process(self, task: Task) -> None:
        pass


class _Keep(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.mark.anyio
async def test_per_task_lines_carry_the_consumers_real_line(tmp_path: Path) -> None:
    log = logging.getLogger(Quiet.identity)
    keep = _Keep()
    log.addHandler(keep)
    level, log.level = log.level, logging.INFO
    try:
        async with testing.pipeline(Quiet, data_dir=tmp_path) as p:
            await p.send(Task({"type": "quiet"}))
            await p.wait_idle()
    finally:
        log.removeHandler(keep)
        log.setLevel(level)
    source = inspect.getsource(_consumer)
    sites = {
        record.getMessage().split(" - ")[0]: (record.filename, record.funcName, record.lineno)
        for record in keep.records
        if " - " in record.getMessage()
    }
    for message in ("Received new task", "Task done"):
        filename, func, lineno = sites[message]
        assert filename == "_consumer.py"
        assert source.splitlines()[lineno - 1].strip().startswith(f'self._log_info("{message}')
        assert func != "_log_info"


@pytest.mark.anyio
async def test_per_task_lines_carry_the_task_as_karton_logs_it(
    tmp_path: Path, published: list[dict[str, Any]]
) -> None:
    """ "Received new task" carries the task as fetched (Spawned), "Task done" as finished."""
    log = logging.getLogger(Quiet.identity)
    level, log.level = log.level, logging.INFO
    try:
        async with testing.pipeline(Quiet, data_dir=tmp_path) as p:
            await p.send(Task({"type": "quiet"}))
            await p.wait_idle()
            [done] = await p.tasks(receiver=Quiet.identity)
    finally:
        log.setLevel(level)
    lines = {
        line["message"].split(" - ")[0]: line for line in published if " - " in line["message"]
    }
    received = json.loads(lines["Received new task"]["task"])
    finished = json.loads(lines["Task done"]["task"])
    assert received["uid"] == finished["uid"] == done.uid
    assert (received["status"], finished["status"]) == ("Spawned", "Finished")
    assert finished == json.loads(done.serialize())
