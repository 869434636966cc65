"""An asynckarton consumer: ``async def process`` sleeps, downloads and/or awaits an INCR."""

from __future__ import annotations

import cProfile
import os
import time
from typing import IO, Any, ClassVar

import anyio
import redis.asyncio as aredis

from asynckarton import Config, Consumer, RemoteResource, Task
from asynckarton._services._run import event_loop_options, tune_gc
from benchmarks._workers._common import COUNTER, consumer_args, setup_logging


async def _profile(spec: str) -> None:
    """``BENCH_CPROFILE=path:seconds``: cProfile this process that long, then dump."""
    path, _, seconds = spec.rpartition(":")
    profiler = cProfile.Profile()
    profiler.enable()
    await anyio.sleep(float(seconds))
    profiler.disable()
    profiler.dump_stats(path)


def main() -> None:
    args = consumer_args(__doc__ or "")
    setup_logging()
    counter: aredis.Redis | None = None
    starts: IO[str] | None = None

    class BenchConsumer(Consumer):
        """asynckarton benchmark consumer."""

        identity = args.identity
        filters: ClassVar[list[dict[str, Any]]] = args.filters
        concurrency_limit = args.concurrency

        async def process(self, task: Task) -> None:
            if starts is not None:
                starts.write(f"{task.payload['sent']} {time.time()}\n")
            if counter is not None:
                await counter.incr(COUNTER)
            if args.sleep:
                await anyio.sleep(args.sleep)
            if args.download:
                resource = task.get_resource("blob")
                assert isinstance(resource, RemoteResource)
                await resource.download()

    if args.start_log:  # written line by line, on the loop: a few us per task
        starts = open(args.start_log, "a", buffering=1)  # noqa: SIM115 - lives as long as we do

    async def run() -> None:
        nonlocal counter
        if args.incr_url:
            counter = aredis.Redis.from_url(args.incr_url)
        consumer = BenchConsumer(config)
        async with consumer, anyio.create_task_group() as group:
            if os.environ.get("BENCH_CPROFILE"):
                group.start_soon(_profile, os.environ["BENCH_CPROFILE"])
            await consumer.run()

    config = Config(args.config)
    tune_gc(config)  # as `asynckarton run` does, with its loop:
    anyio.run(run, backend_options=event_loop_options(config))


if __name__ == "__main__":
    main()
