"""A karton-core 5.9.1 asyncio consumer (``karton.core.asyncio.Karton``)."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

from karton.core import Config, Task
from karton.core.asyncio import Karton

from benchmarks._workers._common import consumer_args


def main() -> None:
    args = consumer_args(__doc__ or "")

    class BenchAsyncKarton(Karton):  # type: ignore[misc]
        """karton-core asyncio benchmark consumer."""

        identity = args.identity
        filters: Any = args.filters
        concurrency_limit = args.concurrency

        async def process(self, task: Task) -> None:
            if args.sleep:
                await asyncio.sleep(args.sleep)
            if args.download:
                await task.get_resource("blob").download()

    service = BenchAsyncKarton(config=Config(args.config))
    with contextlib.suppress(asyncio.CancelledError):
        asyncio.run(service.loop())


if __name__ == "__main__":
    main()
