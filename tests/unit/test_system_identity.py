"""What karton-system shows operators: its version in the client name, its console lines."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import anyio
import pytest
from karton.core.backend import KartonServiceInfo

from asynckarton import Karton, SystemService, Task, __version__
from asynckarton.testing import embedded_config, pipeline

pytestmark = pytest.mark.anyio


class Sink(Karton):
    identity = "test.sink"
    filters = [{"type": "sample"}]

    async def process(self, task: Task) -> None:
        pass


def test_client_name_carries_the_service_version(tmp_path: Path) -> None:
    name = SystemService(embedded_config(tmp_path)).client_name
    info = KartonServiceInfo.parse_client_name(name)  # as karton-dashboard reads it
    assert info.identity == "karton.system"
    assert info.service_version == __version__


async def test_processing_task_lines_reach_the_console_and_are_published_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="karton.system")
    async with pipeline(Sink) as pipe:
        pubsub = pipe.producer.backend.redis.pubsub()
        await pubsub.psubscribe("karton.log.*")
        task = Task({"type": "sample"})
        await pipe.send(task)
        await pipe.wait_idle()
        published: list[dict[str, Any]] = []
        with anyio.move_on_after(1.0):  # the log publisher flushes every 0.05 s
            while True:
                msg = await pubsub.get_message(ignore_subscribe_messages=True, timeout=0.05)
                if msg is not None:
                    published.append(json.loads(msg["data"]))
        await pubsub.aclose()  # type: ignore[no-untyped-call]  # redis-py leaves it untyped
    line = f"[{task.root_uid}] Processing task {task.task_uid}"
    console = [r for r in caplog.records if r.getMessage() == line]
    assert [(r.name, r.levelno) for r in console] == [("karton.system", logging.INFO)]
    assert [r["message"] for r in published if "Processing task" in r["message"]] == [line]
