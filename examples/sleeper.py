"""A consumer that takes its time: shows graceful shutdown with ``asynckarton run``.

From the ``examples`` folder, in one shell (``--with-system`` also runs the router, and
serves the embedded Redis to the other shell)::

    asynckarton run sleeper.py:Sleeper --with-system --grace 10

and in another, to feed it::

    python send_task.py '{"type": "sleep"}' '{"seconds": 3}'

Each ``{"type": "sleep"}`` task sleeps ``payload["seconds"]`` (default 1).  The first
SIGTERM stops fetching and lets running sleeps finish within the grace period; a second
SIGTERM hands them back to the queue (Spawned) for another replica to take.
"""

from __future__ import annotations

import anyio

from asynckarton import Consumer, Task


class Sleeper(Consumer):
    """Sleep for the task's ``seconds`` payload, then finish."""

    identity = "example.sleeper"
    filters = [{"type": "sleep"}]
    concurrency_limit = 4

    async def process(self, task: Task) -> None:
        seconds = float(task.get_payload("seconds", 1.0))
        self.log.info("Sleeping %.1f s for %s", seconds, task.uid)
        await anyio.sleep(seconds)


if __name__ == "__main__":
    Sleeper.main()
