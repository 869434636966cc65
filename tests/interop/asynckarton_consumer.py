"""An asynckarton ``Karton`` consumer in its own process, for the interop tests.

Runs until SIGTERM/SIGINT, then stops gracefully (what the CLI does) and
exits 0.  Each processed task is appended as one JSON line to ``--record``.

Usage: python asynckarton_consumer.py --config-file karton.ini --identity ID
           --filters '[{"type": "x"}]' --record out.jsonl [--concurrency 4]
"""

from __future__ import annotations

import argparse
import json
import signal
from typing import Any

import anyio

from asynckarton import Config, Karton, RemoteResource, Task


class InteropConsumer(Karton):
    """asynckarton consumer of the interop tests."""

    version = "3.1.4"
    record: str = ""

    async def process(self, task: Task) -> None:
        resources = {}
        for resource in task.iterate_resources():
            assert isinstance(resource, RemoteResource)
            resources[resource.name] = (await resource.download()).decode("latin-1")
        line = {"uid": task.uid, "headers": task.headers, "resources": resources}
        async with await anyio.open_file(self.record, "a", encoding="utf-8") as out:
            await out.write(json.dumps(line) + "\n")


async def serve(args: argparse.Namespace) -> None:
    attrs: dict[str, Any] = {
        "identity": args.identity,
        "filters": json.loads(args.filters),
        "concurrency_limit": args.concurrency,
        "record": args.record,
        "__doc__": InteropConsumer.__doc__,
    }
    cls = type("InteropConsumer", (InteropConsumer,), attrs)
    consumer = cls(Config(args.config_file, search_paths=[], environ={}))
    with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with anyio.create_task_group() as group:
            await group.start(consumer.run)
            print("ready", flush=True)
            async for _ in signals:
                consumer.stop(grace=5)
                break


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config-file", required=True)
    parser.add_argument("--identity", required=True)
    parser.add_argument("--filters", required=True)
    parser.add_argument("--record", required=True)
    parser.add_argument("--concurrency", type=int, default=1)
    anyio.run(serve, parser.parse_args())


if __name__ == "__main__":
    main()
