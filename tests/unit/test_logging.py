"""The consumer's cheap per-task log records equal what the logging module would make."""

from __future__ import annotations

import logging
import threading
from typing import Any

from asynckarton._services._logging import RecordMaker

VOLATILE = {"created", "msecs", "relativeCreated"}


def _fields(record: logging.LogRecord) -> dict[str, Any]:
    return {k: v for k, v in record.__dict__.items() if k not in VOLATILE}


def test_made_records_match_make_record_and_format_the_same() -> None:
    logger = logging.getLogger("test.records")
    maker = RecordMaker(logger, __file__, "_handle")
    first = maker.make(logging.INFO, "Received new task - %s%s", ("uid-1", ""))  # template
    made = maker.make(logging.INFO, "Task done - %s", ("uid-2",))
    ordinary = logger.makeRecord(
        logger.name, logging.INFO, __file__, 0, "Task done - %s", ("uid-2",), None, "_handle"
    )
    assert _fields(made) == _fields(ordinary)
    assert made.getMessage() == "Task done - uid-2"
    assert first.getMessage() == "Received new task - uid-1"
    assert abs(made.created - ordinary.created) < 1.0
    assert 0 <= made.msecs < 1000
    assert made.relativeCreated > 0
    formatter = logging.Formatter("[%(levelname)s] %(name)s %(funcName)s %(message)s")
    assert formatter.format(made) == formatter.format(ordinary)


def test_each_thread_gets_its_own_thread_fields() -> None:
    logger = logging.getLogger("test.records.threads")
    maker = RecordMaker(logger, __file__, "_handle")
    maker.make(logging.INFO, "a", ())
    maker.make(logging.INFO, "a", ())
    seen: list[logging.LogRecord] = []
    worker = threading.Thread(
        target=lambda: seen.extend(maker.make(logging.INFO, "b", ()) for _ in range(2)),
        name="other-thread",
    )
    worker.start()
    worker.join()
    assert [r.threadName for r in seen] == ["other-thread", "other-thread"]
    assert maker.make(logging.INFO, "c", ()).threadName == threading.current_thread().name


def test_a_custom_record_factory_is_honoured() -> None:
    logger = logging.getLogger("test.records.factory")
    maker = RecordMaker(logger, __file__, "_handle")
    maker.make(logging.INFO, "warm", ())
    default = logging.getLogRecordFactory()

    def factory(*args: Any, **kwargs: Any) -> logging.LogRecord:
        record = default(*args, **kwargs)
        record.custom = "yes"
        return record

    logging.setLogRecordFactory(factory)
    try:
        record = maker.make(logging.INFO, "x", ())
    finally:
        logging.setLogRecordFactory(default)
    assert getattr(record, "custom", None) == "yes"


def test_a_lone_mapping_argument_is_unwrapped_as_logging_does() -> None:
    logger = logging.getLogger("test.records.mapping")
    maker = RecordMaker(logger, __file__, "_handle")
    maker.make(logging.INFO, "warm", ())
    record = maker.make(logging.INFO, "%(n)s done", ({"n": 7},))
    assert record.getMessage() == "7 done"


def test_changed_logging_flags_are_honoured() -> None:
    logger = logging.getLogger("test.records.flags")
    maker = RecordMaker(logger, __file__, "_handle")
    maker.make(logging.INFO, "warm", ())
    assert maker.make(logging.INFO, "x", ()).threadName == threading.current_thread().name
    previous = logging.logThreads
    logging.logThreads = False
    try:
        maker.make(logging.INFO, "template for the new flags", ())
        record = maker.make(logging.INFO, "x", ())
    finally:
        logging.logThreads = previous
    assert record.threadName is None and record.thread is None
