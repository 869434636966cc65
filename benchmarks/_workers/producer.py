"""Send N tasks with one library's producer and print timing as one JSON line.

Each task carries ``payload["sent"] = time.time()`` taken just before its send call (for
``send_tasks`` the stamp of its batch), which the driver uses for send-to-finish latency.
It reports its own CPU from its first send on (``send_cpu_seconds``).

Libraries: ``ak`` (asynckarton ``Producer``; ``--api send_task`` or ``send_tasks``),
``kc`` (karton-core sync ``Producer.send_task``), ``kca`` (karton-core asyncio
``Producer.send_task``).  ``--rate R`` sends one task at a time on a steady schedule of R
tasks/s (with ``--api send_tasks``: batches paced to R tasks/s).  ``--concurrency`` runs that many
senders at once (async libraries only).  ``--window W --watch ID`` keeps at most W tasks
sent but not yet consumed by identity ID (soak runs only; it costs one HGET per batch).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any

import anyio

CONSUMED = "karton.metrics.consumed"


def parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--lib", choices=["ak", "kc", "kca"], required=True)
    parser.add_argument("--config", required=True)
    parser.add_argument("--identity", default="bench.producer")
    parser.add_argument("--api", choices=["send_task", "send_tasks"], default="send_task")
    parser.add_argument("--n", type=int, required=True)
    parser.add_argument("--batch", type=int, default=100, help="tasks per send_tasks call")
    parser.add_argument("--concurrency", type=int, default=1)
    parser.add_argument("--headers", default='{"type": "bench"}', help="JSON headers")
    parser.add_argument("--resource-bytes", type=int, default=0)
    parser.add_argument("--rate", type=float, default=0.0, help="tasks/s, one at a time")
    parser.add_argument("--window", type=int, default=0)
    parser.add_argument("--watch", default="")
    parser.add_argument("--redis-url", default="")
    return parser.parse_args()


_CPU_AT_FIRST_BLOB: list[float] = []  # process CPU when the first resource was made


def blob(size: int) -> bytes:
    if not _CPU_AT_FIRST_BLOB:
        _CPU_AT_FIRST_BLOB.append(time.process_time())
    return os.urandom(size)


_CPU_AT_START: list[float] = []  # process CPU when sending began (connections are open)


def start() -> float:
    """Mark the start of sending: returns the wall clock, remembers the process CPU."""
    _CPU_AT_START.append(time.process_time())
    return time.time()


def report(n: int, first: float, last: float) -> None:
    elapsed = max(last - first, 1e-9)
    result = {"n": n, "t_first": first, "t_last": last, "rate": n / elapsed}
    if _CPU_AT_START:  # CPU of sending every task, start-up and imports left out
        result["send_cpu_seconds"] = time.process_time() - _CPU_AT_START[0]
    if _CPU_AT_FIRST_BLOB:  # resource runs: CPU of sending (uploads included), not start-up
        result["cpu_seconds"] = time.process_time() - _CPU_AT_FIRST_BLOB[0]
    print(json.dumps(result))
    sys.stdout.flush()


# -- throttling (soak only) -------------------------------------------------------------


class AsyncWindow:
    def __init__(self, args: argparse.Namespace) -> None:
        self.limit = args.window
        self.watch = args.watch
        self.client: Any = None
        if self.limit:
            import redis.asyncio as aredis

            self.client = aredis.Redis.from_url(args.redis_url, decode_responses=True)

    async def wait(self, sent: int) -> None:
        if not self.limit:
            return
        while True:  # polling Redis, not waiting for an in-process event
            consumed = int(await self.client.hget(CONSUMED, self.watch) or 0)
            if sent - consumed <= self.limit:
                return
            await anyio.sleep(0.01)


# -- asynckarton ------------------------------------------------------------------------


async def run_ak(args: argparse.Namespace) -> None:
    from asynckarton import Config, LocalResource, Producer, Task

    headers = json.loads(args.headers)
    window = AsyncWindow(args)

    def make(now: float) -> Task:
        payload: dict[str, Any] = {"sent": now}
        if args.resource_bytes:
            payload["blob"] = LocalResource("blob", blob(args.resource_bytes))
        return Task(headers, payload=payload)

    async with Producer(Config(args.config), identity=args.identity) as producer:
        first = start()
        if args.api == "send_tasks":
            sent = 0
            while sent < args.n:
                await window.wait(sent)
                if args.rate:  # paced batches (benchmarks.capacity's load steps)
                    await anyio.sleep(max(0.0, first + sent / args.rate - time.time()))
                count = min(args.batch, args.n - sent)
                now = time.time()
                await producer.send_tasks([make(now) for _ in range(count)])
                sent += count
        elif args.rate:
            for i in range(args.n):
                await anyio.sleep(max(0.0, first + i / args.rate - time.time()))
                await producer.send_task(make(time.time()))
        else:

            async def one() -> None:
                await producer.send_task(make(time.time()))

            await _concurrently(args, one, window)
        report(args.n, first, time.time())


async def _concurrently(
    args: argparse.Namespace, send_one: Callable[[], Awaitable[None]], window: AsyncWindow
) -> None:
    counter = {"next": 0}

    async def sender() -> None:
        while counter["next"] < args.n:
            counter["next"] += 1
            if counter["next"] % args.batch == 0:
                await window.wait(counter["next"])
            await send_one()

    async with anyio.create_task_group() as group:
        for _ in range(max(1, args.concurrency)):
            group.start_soon(sender)


# -- karton-core ------------------------------------------------------------------------


def run_kc(args: argparse.Namespace) -> None:
    from karton.core import Config, Producer, Resource, Task

    if args.concurrency != 1 or args.window:
        raise SystemExit("kc: the sync producer sends one task at a time, without a window")
    headers = json.loads(args.headers)
    producer = Producer(config=Config(args.config), identity=args.identity)
    first = start()
    for i in range(args.n):
        if args.rate:
            time.sleep(max(0.0, first + i / args.rate - time.time()))
        payload: dict[str, Any] = {"sent": time.time()}
        if args.resource_bytes:
            payload["blob"] = Resource("blob", blob(args.resource_bytes))
        producer.send_task(Task(headers, payload=payload))
    report(args.n, first, time.time())


async def run_kca(args: argparse.Namespace) -> None:
    from karton.core import Config, Task
    from karton.core.asyncio import LocalResource, Producer

    headers = json.loads(args.headers)
    producer = Producer(config=Config(args.config), identity=args.identity)
    await producer.connect()
    window = AsyncWindow(args)

    async def one() -> None:
        payload: dict[str, Any] = {"sent": time.time()}
        if args.resource_bytes:
            payload["blob"] = LocalResource("blob", blob(args.resource_bytes))
        await producer.send_task(Task(headers, payload=payload))

    first = start()
    await _concurrently(args, one, window)
    report(args.n, first, time.time())


def main() -> None:
    args = parse()
    if args.lib == "ak":
        anyio.run(run_ak, args)
    elif args.lib == "kc":
        run_kc(args)
    else:
        asyncio.run(run_kca(args))


if __name__ == "__main__":
    main()
