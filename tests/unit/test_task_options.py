"""pynenc's other ConfigTask options on the embedded default, and timeouts that hold.

``parallel_batch_size`` (send_tasks chunks, the router's batch), ``call_result_cache``
with ``disable_cache_args`` and its TTL, ``force_new_workflow``, and a handler that blocks
the event loop past ``task_timeout``.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import pytest

from asynckarton import Consumer, Task, TaskState, testing

pytestmark = pytest.mark.anyio


class Blocker(Consumer):
    identity = "test.blocker"
    filters = [{"type": "block"}]
    task_timeout = 0.2

    async def process(self, task: Task) -> None:
        time.sleep(float(task.payload["sleep"]))  # noqa: ASYNC251 - the point of the test


async def test_a_handler_blocking_past_task_timeout_crashes_with_timeout(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.ERROR)
    async with testing.pipeline(Blocker, data_dir=tmp_path) as p:
        await p.send(
            Task({"type": "block"}, payload={"sleep": 0.5}),
            Task({"type": "block"}, payload={"sleep": 0.0}),
        )
        await p.wait_idle()
        tasks = await p.tasks(receiver="test.blocker")
    by_sleep = {t.payload["sleep"]: t for t in tasks}
    assert by_sleep[0.0].status is TaskState.FINISHED
    blocked = by_sleep[0.5]
    assert blocked.status is TaskState.CRASHED
    assert "TaskTimeoutError" in "".join(blocked.error or [])
    lines = [r.getMessage() for r in caplog.records if "blocked the event loop" in r.getMessage()]
    assert len(lines) == 1 and blocked.uid in lines[0] and "to_thread" in lines[0]
