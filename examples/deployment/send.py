"""Send ``--count`` text tasks into the deployment (``python send.py --config-file ...``)."""

from __future__ import annotations

import argparse

import anyio

from asynckarton import Config, Producer, Resource, Task


async def send(config_file: str, count: int) -> None:
    async with Producer(Config(config_file), identity="example.sender") as producer:
        for n in range(count):
            text = f"hello from task {n}".encode()
            await producer.send_task(
                Task({"type": "text", "stage": "raw"}, payload={"text": Resource("in.txt", text)})
            )
    print(f"sent {count} task(s)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--config-file", default="karton.ini")
    parser.add_argument("--count", type=int, default=1)
    args = parser.parse_args()
    anyio.run(send, args.config_file, args.count)


if __name__ == "__main__":
    main()
