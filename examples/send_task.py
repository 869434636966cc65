"""Send one task, to feed the other examples (or your own service) from a shell.

    python send_task.py '{"type": "sleep"}' '{"seconds": 3}'
    python send_task.py '{"type": "smol-tasks", "size": 3}'
    python send_task.py '{"type": "sample", "kind": "text"}' --file notes.txt

The first argument is the task's headers (JSON), the optional second its payload (JSON);
``--file PATH`` adds the file as the resource ``sample``.  It uses the same configuration
as every service: with no ``karton.ini``, the embedded default, so an ``asynckarton
system`` (or ``asynckarton run ... --with-system``) must be running for the task to be
routed; the producer warns when it has nothing to reach.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import anyio

from asynckarton import LocalResource, Producer, Task


async def send(headers: dict[str, str], payload: dict[str, object], file: Path | None) -> str:
    """Send the task; return its uid."""
    if file is not None:
        payload["sample"] = LocalResource(file.name, path=file)
    async with Producer() as producer:
        task = Task(headers, payload=payload)
        await producer.send_task(task)
    return task.uid


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("headers", type=json.loads, help="the task's headers, as JSON")
    parser.add_argument("payload", type=json.loads, nargs="?", default={}, help="JSON payload")
    parser.add_argument("--file", type=Path, help="a file to send as the resource 'sample'")
    args = parser.parse_args()
    uid = anyio.run(send, args.headers, args.payload, args.file)
    print(f"sent {uid}")


if __name__ == "__main__":
    main()
