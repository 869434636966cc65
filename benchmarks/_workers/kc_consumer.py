"""A karton-core 5.9.1 *sync* consumer (``karton.core.Karton``): one task at a time."""

from __future__ import annotations

import time
from typing import Any

from karton.core import Config, Karton, RemoteResource, Task

from benchmarks._workers._common import consumer_args


def main() -> None:
    args = consumer_args(__doc__ or "")

    class BenchKarton(Karton):
        """karton-core benchmark consumer."""

        identity = args.identity
        filters: Any = args.filters

        def process(self, task: Task) -> None:
            if args.sleep:
                time.sleep(args.sleep)
            if args.download:
                resource = task.get_resource("blob")
                assert isinstance(resource, RemoteResource)
                resource.download()

    BenchKarton(config=Config(args.config)).loop()


if __name__ == "__main__":
    main()
