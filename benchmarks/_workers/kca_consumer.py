"""A karton-core 5.9.1 asyncio consumer (``karton.core.asyncio.Karton``)."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

from karton.core import Config, Task
from karton.core.asyncio import Karton, RemoteResource

from benchmarks._workers._common import consumer_args


def main() -> None:
    args = consumer_args(__doc__ or "")

    class BenchAsyncKarton(Karton):
        """karton-core asyncio benchmark consumer."""

        identity = args.identity
        filters: Any = args.filters
        concurrency_limit = args.concurrency

        async def process(self, task: Task) -> None:
            if args.sleep:
                await asyncio.sleep(args.sleep)
            if args.download:
                resource = task.get_resource("blob")
                assert isinstance(resource, RemoteResource)
                await resource.download()

    service = BenchAsyncKarton(config=Config(args.config))
    with contextlib.suppress(asyncio.CancelledError):
        asyncio.run(service.loop())


if __name__ == "__main__":
    main()
