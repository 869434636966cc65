"""A karton-core 5.9.1 *sync* consumer (``karton.core.Karton``): one task at a time."""

from __future__ import annotations

import time
from typing import IO, Any

import redis
from karton.core import Config, Karton, RemoteResource, Task

from benchmarks._workers._common import COUNTER, consumer_args


def main() -> None:
    args = consumer_args(__doc__ or "")
    counter = redis.Redis.from_url(args.incr_url) if args.incr_url else None
    starts: IO[str] | None = open(args.start_log, "a", buffering=1) if args.start_log else None  # noqa: SIM115

    class BenchKarton(Karton):
        """karton-core benchmark consumer."""

        identity = args.identity
        filters: Any = args.filters

        def process(self, task: Task) -> None:
            if starts is not None:
                starts.write(f"{task.payload['sent']} {time.time()}\n")
            if counter is not None:
                counter.incr(COUNTER)
            if args.sleep:
                time.sleep(args.sleep)
            if args.download:
                resource = task.get_resource("blob")
                assert isinstance(resource, RemoteResource)
                resource.download()

    BenchKarton(config=Config(args.config)).loop()


if __name__ == "__main__":
    main()
