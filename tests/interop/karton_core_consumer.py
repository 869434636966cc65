"""A karton-core 5.9.1 ``Karton`` consumer, run as a subprocess by the interop tests.

It runs karton-core's own blocking ``loop()`` (with its real SIGINT/SIGTERM handling)
and appends one JSON line per task to ``--record``: the task's linkage, headers,
payloads and the downloaded content of every resource it carries.

Usage: python karton_core_consumer.py --config-file karton.ini --identity ID
           --filters '[{"type": "x"}]' --record out.jsonl
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from karton.core import Config, Karton, Task
from karton.core.resource import RemoteResource


def _plain(value: Any) -> Any:
    """The JSON-able part of a payload value; resources become their uid."""
    if isinstance(value, RemoteResource):
        return {"resource": value.uid}
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


def _describe(task: Task) -> dict[str, Any]:
    resources = {}
    for resource in task.iterate_resources():
        assert isinstance(resource, RemoteResource)
        resources[resource.name] = {
            "uid": resource.uid,
            "bucket": resource.bucket,
            "size": resource.size,
            "sha256": resource.sha256,
            "content": resource.content.decode("latin-1"),
        }
    return {
        "uid": task.uid,
        "root_uid": task.root_uid,
        "parent_uid": task.parent_uid,
        "orig_uid": task.orig_uid,
        "status": task.status.value,
        "priority": task.priority.value,
        "headers": task.headers,
        "headers_persistent": task.headers_persistent,
        "payload": _plain(task.payload),
        "payload_persistent": _plain(task.payload_persistent),
        "resources": resources,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config-file", required=True)
    parser.add_argument("--identity", required=True)
    parser.add_argument("--filters", required=True, help="JSON list of filters")
    parser.add_argument("--record", required=True, help="JSON-lines file to append to")
    args = parser.parse_args()

    class Recorder(Karton):
        """karton-core recorder of the asynckarton interop tests."""

        identity = args.identity
        filters = json.loads(args.filters)
        version = "9.9.9"

        def process(self, task: Task) -> None:
            entry = _describe(task)
            self.log.info("recording %s", task.uid)
            with open(args.record, "a", encoding="utf-8") as out:
                out.write(json.dumps(entry) + "\n")

    Recorder(Config(args.config_file)).loop()


if __name__ == "__main__":
    main()
