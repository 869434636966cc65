"""Send N tasks whose ``key`` header cycles through K values (the ``keys`` scenario).

Like ``producer --lib ak --api send_tasks --batch 100``, but task ``i`` carries
``headers["key"] = f"k{i % K}"``, so a consumer with ``running_concurrency = keys`` on
``headers.key`` sees K distinct scopes.  Prints the same JSON line as ``producer``.
"""

from __future__ import annotations

import argparse
import json
import time

import anyio

from benchmarks._workers.producer import report


def parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--config", required=True)
    parser.add_argument("--n", type=int, required=True)
    parser.add_argument("--keys", type=int, default=100, help="distinct key values")
    parser.add_argument("--batch", type=int, default=100)
    parser.add_argument("--headers", default='{"type": "bench-keys"}', help="JSON headers")
    return parser.parse_args()


async def run(args: argparse.Namespace) -> None:
    from asynckarton import Config, Producer, Task

    headers = json.loads(args.headers)
    async with Producer(Config(args.config), identity="bench.producer") as producer:
        first = time.time()
        sent = 0
        while sent < args.n:
            count = min(args.batch, args.n - sent)
            now = time.time()
            await producer.send_tasks(
                [
                    Task({**headers, "key": f"k{(sent + i) % args.keys}"}, payload={"sent": now})
                    for i in range(count)
                ]
            )
            sent += count
        report(args.n, first, time.time())


if __name__ == "__main__":
    anyio.run(run, parse())
