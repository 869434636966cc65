"""Routing on parsed JSON documents: the router's hot path, without Task objects.

The router never looks inside payloads, so it works on the document as parsed: each fork
is a fresh dict built from the original's fields (what ``Task.fork_task()`` would write,
byte for byte in meaning), and the original is marked Finished in place, which also keeps
fields a newer writer may have added.  Tests pin the equivalence with ``Task``.
"""

from __future__ import annotations

import uuid
from typing import Any

from .._errors import InvalidTaskError
from .._wire._task import TaskState, _check_fields, dumps, loads

__all__ = ["RoutableTask", "parse_routable"]


class RoutableTask:
    """An unrouted task as the router needs it: normalised headers and the raw document."""

    __slots__ = ("doc", "headers", "headers_persistent", "priority", "root_uid", "uid")

    def __init__(self, doc: dict[str, Any]) -> None:
        self.doc = doc
        self.uid: str = doc["uid"]
        self.root_uid: str = doc["root_uid"]
        payload_persistent = doc["payload_persistent"]
        persistent = doc.get("headers_persistent")
        if persistent is None:  # Karton < 5.2 writers: the embedded copy
            persistent = payload_persistent.get("__headers_persistent") or {}
        self.headers_persistent: dict[str, Any] = persistent
        self.headers: dict[str, Any] = {**doc["headers"], **persistent}
        self.priority: str = doc.get("priority") or "normal"

    @property
    def task_uid(self) -> str:
        """The uid without its ``{root}:`` prefix."""
        return self.uid.rsplit(":", 1)[-1]

    def fork(self, receiver: str, now: float) -> tuple[str, str]:
        """Return ``(uid, JSON)`` of the Spawned copy for ``receiver``."""
        doc = self.doc
        own = str(uuid.uuid4())
        uid = "{" + self.root_uid + "}:" + own
        fork: dict[str, Any] = {
            "uid": uid,
            "root_uid": self.root_uid,
            "parent_uid": doc.get("parent_uid"),
            "orig_uid": self.uid,
            "status": TaskState.SPAWNED.value,
            "priority": self.priority,
            "last_update": now,
            "payload": doc["payload"],
            "payload_persistent": {
                **doc["payload_persistent"],
                "__headers_persistent": self.headers_persistent,
            },
            "headers": {**self.headers, "receiver": receiver},
            "headers_persistent": self.headers_persistent,
            "error": None,
        }
        extra = doc.get("asynckarton")
        if isinstance(extra, dict) and extra.get("attempt"):
            fork["asynckarton"] = {"attempt": extra["attempt"]}
        return uid, dumps(fork)

    def finished(self, now: float) -> str:
        """Return the original's JSON marked Finished (Karton's routed-original state)."""
        doc = self.doc
        doc["status"] = TaskState.FINISHED.value
        doc["last_update"] = now
        doc["priority"] = self.priority
        doc["headers"] = self.headers
        doc["headers_persistent"] = self.headers_persistent
        doc["payload_persistent"] = {
            **doc["payload_persistent"],
            "__headers_persistent": self.headers_persistent,
        }
        for optional in ("parent_uid", "orig_uid", "error"):
            doc.setdefault(optional, None)
        return dumps(doc)


def parse_routable(body: str) -> RoutableTask:
    """Parse and check an unrouted task body.

    Raises:
        InvalidTaskError: not JSON, or a field Karton requires is missing or malformed.
    """
    try:
        doc = loads(body)
    except ValueError as exc:
        raise InvalidTaskError(f"task body is not valid JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise InvalidTaskError(f"task body is a JSON {type(doc).__name__}, not an object")
    _check_fields(doc)
    return RoutableTask(doc)
