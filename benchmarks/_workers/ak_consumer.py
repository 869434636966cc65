"""An asynckarton consumer: ``async def process`` sleeps and/or downloads, then returns."""

from __future__ import annotations

from typing import Any, ClassVar

import anyio

from asynckarton import Config, Consumer, RemoteResource, Task
from benchmarks._workers._common import consumer_args, setup_logging


def main() -> None:
    args = consumer_args(__doc__ or "")
    setup_logging()

    class BenchConsumer(Consumer):
        """asynckarton benchmark consumer."""

        identity = args.identity
        filters: ClassVar[list[dict[str, Any]]] = args.filters
        concurrency_limit = args.concurrency

        async def process(self, task: Task) -> None:
            if args.sleep:
                await anyio.sleep(args.sleep)
            if args.download:
                resource = task.get_resource("blob")
                assert isinstance(resource, RemoteResource)
                await resource.download()

    async def run() -> None:
        consumer = BenchConsumer(Config(args.config))
        async with consumer:
            await consumer.run()

    anyio.run(run)


if __name__ == "__main__":
    main()
