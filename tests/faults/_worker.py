"""Processes the fault-injection suite starts, written against the public library API.

    python tests/faults/_worker.py consumer --config karton.ini [--seed 7] [--grace 1]
    python tests/faults/_worker.py system --config karton.ini

Both roles run until SIGTERM/SIGINT (which calls ``stop(grace=...)``) or until the test
kills them.  The consumer records every processing in Redis so the test can count
deliveries without trusting the library's own bookkeeping:

* ``HSET faults:holder <root_uid> <pid>`` and ``HINCRBY faults:started <root_uid> 1``
  when a handler starts,
* ``HINCRBY faults:done <root_uid> 1`` when it finishes (then the task is Finished).

The bookkeeping is written by an ``allow-oom`` script (on a real server), so it is
counted while Redis is over ``maxmemory`` too (``test_redis_oom``).

The handler sleeps ``payload["first_sleep"]`` seconds on its first attempt of a root
(tests use it to have a task "mid-processing"), ``payload["sleep"]`` on later ones, and a
random 0-20 ms otherwise.  The module is also importable as a service target:
``python -m asynckarton run tests/faults/_worker.py:FaultWorker``.
"""

from __future__ import annotations

import argparse
import logging
import os
import random
import signal
import sys
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import anyio
import redis.exceptions

from asynckarton import Config, Consumer, Task
from asynckarton.backend import KartonBackend
from asynckarton.system import SystemService

IDENTITY = "faults.worker"
FILTERS = [{"type": "faults"}]
RECORD_PATIENCE = 60.0  # seconds a handler keeps retrying its bookkeeping during outages

T = TypeVar("T")
log = logging.getLogger("faults.worker")


async def _patiently(call: Callable[[], Awaitable[T]]) -> T:
    """Retry a bookkeeping command through a Redis restart or full memory (bounded)."""
    delay = 0.05
    deadline = anyio.current_time() + RECORD_PATIENCE
    while True:
        try:
            return await call()
        except (
            redis.exceptions.ConnectionError,
            redis.exceptions.TimeoutError,
            redis.exceptions.BusyLoadingError,
            redis.exceptions.OutOfMemoryError,  # test_redis_oom: wait for memory
            OSError,
        ):
            if anyio.current_time() > deadline:
                raise
            await anyio.sleep(delay)
            delay = min(delay * 2, 1.0)


_RECORD = "return redis.call(ARGV[1], KEYS[1], unpack(ARGV, 2))"


async def _record(backend: KartonBackend, command: str, key: str, *args: Any) -> Any:
    """Run one bookkeeping command, accepted even over ``maxmemory`` on a real server."""
    script = ("#!lua flags=allow-oom\n" if backend.allow_oom else "") + _RECORD
    return await _patiently(lambda: backend.redis.eval(script, 1, key, command, *args))


class FaultWorker(Consumer):
    """Fault-suite consumer: a little async work, then count the processing in Redis."""

    identity = IDENTITY
    filters = FILTERS
    rng = random.Random(int(os.environ.get("FAULTS_SEED", "0")) ^ os.getpid())

    async def process(self, task: Task) -> None:
        backend = self.backend
        root = task.root_uid
        await _record(backend, "HSET", "faults:holder", root, os.getpid())
        attempt = await _record(backend, "HINCRBY", "faults:started", root, 1)
        if "first_sleep" in task.payload and attempt == 1:
            await anyio.sleep(float(task.payload["first_sleep"]))
        elif "sleep" in task.payload:
            await anyio.sleep(float(task.payload["sleep"]))
        else:
            await anyio.sleep(self.rng.uniform(0.0, 0.02))
        await _record(backend, "HINCRBY", "faults:done", root, 1)


async def _serve(service: Any, grace: float | None, ready_key: str) -> None:
    with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with service, anyio.create_task_group() as group:
            await group.start(service.run)
            await _record(service.backend, "SADD", "faults:ready", ready_key)
            async for signum in signals:
                log.warning("%s: stopping (grace %s)", signal.Signals(signum).name, grace)
                service.stop(grace=grace)
                break
    log.warning("%s stopped cleanly", ready_key)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("role", choices=["consumer", "system"])
    parser.add_argument("--config", required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--grace", type=float, default=None)
    args = parser.parse_args(argv)
    logging.basicConfig(
        stream=sys.stderr,
        level=logging.INFO,
        format=f"%(asctime)s {args.role}[%(process)d] %(name)s %(levelname)s %(message)s",
    )
    config = Config(args.config, search_paths=[])
    service: Any
    if args.role == "consumer":
        FaultWorker.rng = random.Random(args.seed)
        service = FaultWorker(config)
    else:
        service = SystemService(config, setup_bucket=True)
    anyio.run(_serve, service, args.grace, f"{args.role}:{os.getpid()}")


if __name__ == "__main__":
    main()
