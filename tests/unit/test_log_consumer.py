"""LogConsumer on the embedded Redis: records of a running service, filters, printing."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any, ClassVar

import anyio
import pytest

from asynckarton import Consumer, Task, testing
from asynckarton._services._log_consumer import LogConsumer, LogPrinter, decode_event
from asynckarton.backend._keys import log_channel

pytestmark = pytest.mark.anyio


class Greeter(Consumer):
    identity = "test.greeter"
    filters = [{"type": "greet"}]

    async def process(self, task: Task) -> None:
        self.log.warning("hello %s", task.headers["who"])


class Collect(LogConsumer):
    identity = "test.collector"
    events: ClassVar[list[dict[str, Any]]] = []

    async def process_log(self, event: dict[str, Any]) -> None:
        if event.get("name") == "test.collector":
            return  # our own "Logger started" record
        type(self).events.append(event)
        if event.get("message") == "explode":
            raise RuntimeError("a broken handler")


class WarningsOfGreeter(Collect):
    logger_filter = "test.greeter"
    level = "warning"


async def _until(predicate: Any, timeout: float = 10.0) -> None:
    with anyio.fail_after(timeout):
        while not predicate():
            await anyio.sleep(0.02)


async def test_a_log_consumer_receives_a_running_service_records(tmp_path: Path) -> None:
    """Records a consumer logs while handling a task arrive, with the task as a dict."""
    Collect.events = []
    async with testing.pipeline(Greeter, data_dir=tmp_path) as p:
        collector = Collect(p.config)
        async with anyio.create_task_group() as group:
            await group.start(collector.run)
            task = Task({"type": "greet", "who": "world"})
            await p.send(task)
            await _until(lambda: any(e["message"] == "hello world" for e in Collect.events))
            collector.stop()
    event = next(e for e in Collect.events if e["message"] == "hello world")
    assert event["type"] == "log"
    assert (event["name"], event["levelname"]) == ("test.greeter", "WARNING")
    assert isinstance(event["task"], dict)
    assert event["task"]["headers"]["who"] == "world"
    assert event["task_id"] == event["task"]["uid"].split(":")[-1]


async def test_filters_select_identity_and_level_and_errors_do_not_stop_it(
    tmp_path: Path,
) -> None:
    WarningsOfGreeter.events = []
    async with testing.pipeline(data_dir=tmp_path) as p:
        consumer = WarningsOfGreeter(p.config)
        backend = p.producer.backend

        def record(level: str, name: str, message: str) -> tuple[str, str]:
            body = {"type": "log", "name": name, "levelname": level.upper(), "message": message}
            return log_channel(level, name), json.dumps(body)

        async with anyio.create_task_group() as group:
            await group.start(consumer.run)
            await backend.publish_logs(
                [
                    record("info", "test.greeter", "wrong level"),
                    record("warning", "test.other", "wrong identity"),
                    record("warning", "test.greeter", "explode"),
                    record("warning", "test.greeter", "kept"),
                ]
            )
            await _until(lambda: len(WarningsOfGreeter.events) >= 2)
            await anyio.sleep(0.1)
            consumer.stop()
    assert [e["message"] for e in WarningsOfGreeter.events] == ["explode", "kept"]


async def test_printer_levels_identities_and_no_duplicates(tmp_path: Path) -> None:
    """--level is a minimum; overlapping identity globs still print each record once."""
    out = io.StringIO()
    async with testing.pipeline(data_dir=tmp_path) as p:
        printer = LogPrinter(
            p.config, identities=["svc.*", "svc.a"], level="warning", as_json=True, out=out
        )
        assert "karton.log.info.svc.a" not in printer.patterns()
        async with anyio.create_task_group() as group:
            await group.start(printer.run)
            lines = [
                (log_channel(level, name), json.dumps({"name": name, "levelname": level.upper(),
                                                       "message": f"{level} {name}"}))
                for level, name in [("info", "svc.a"), ("error", "svc.a"), ("warning", "svc.b"),
                                    ("critical", "other")]
            ]  # fmt: skip
            await p.producer.backend.publish_logs(lines)
            await _until(lambda: out.getvalue().count("\n") >= 2)
            await anyio.sleep(0.2)
            printer.stop()
    printed = [json.loads(line)["message"] for line in out.getvalue().splitlines()]
    assert printed == ["error svc.a", "warning svc.b"]


def test_printer_text_format_and_bad_level() -> None:
    config = testing.embedded_config("/nonexistent-not-opened")
    printer = LogPrinter(config, colour=True)
    event = {"created": 0.0, "levelname": "ERROR", "name": "svc.a", "message": "boom",
             "task_id": "abc"}  # fmt: skip
    line = printer.format(event)
    assert "\x1b[31m" in line and line.endswith("svc.a [abc]: boom")
    assert "\x1b" not in LogPrinter(config).format(event)
    with pytest.raises(ValueError, match="unknown log level"):
        LogPrinter(config, level="loud")


def test_decode_event_parses_karton_task_string() -> None:
    event = decode_event(json.dumps({"task": json.dumps({"uid": "x"}), "message": "m"}))
    assert event["task"] == {"uid": "x"}
    with pytest.raises(ValueError, match="not an object"):
        decode_event("[1]")
