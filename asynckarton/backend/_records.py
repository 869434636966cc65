"""The values the backend reads and writes: binds, routed batches, admin rewrites.

Plain data with Karton's serialisation; the Redis commands that store them live in the
backend classes.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from . import _keys as keys

__all__ = ["KARTON_PROTOCOL_VERSION", "Bind", "RoutedBatch", "TaskRewrite"]

#: The Karton wire protocol version asynckarton speaks; written as a bind's ``version``.
KARTON_PROTOCOL_VERSION = "5.9.1"


@dataclass(frozen=True, slots=True, kw_only=True)
class Bind:
    """A consumer's registration in ``karton.binds`` (Karton's KartonBind)."""

    identity: str
    filters: list[dict[str, Any]]
    info: str | None = None
    version: str = KARTON_PROTOCOL_VERSION
    persistent: bool = True
    service_version: str | None = None
    is_async: bool = True

    def to_json(self) -> str:
        """Serialise exactly as karton-core does (sorted keys, default separators)."""
        return json.dumps(
            {
                "filters": self.filters,
                "info": self.info,
                "version": self.version,
                "persistent": self.persistent,
                "service_version": self.service_version,
                "is_async": self.is_async,
            },
            sort_keys=True,
        )

    @classmethod
    def from_json(cls, identity: str, raw: str) -> Bind:
        """Parse a bind value, including Karton 2.x's bare filter list."""
        doc = json.loads(raw)
        if isinstance(doc, list):
            return cls(
                identity=identity,
                filters=doc,
                version="2.x.x",
                persistent=not identity.endswith(".test"),
                is_async=False,
            )
        if not isinstance(doc, dict):
            raise ValueError(f"bind of {identity!r} is a JSON {type(doc).__name__}")
        return cls(
            identity=identity,
            filters=doc["filters"],
            info=doc.get("info"),
            version=doc.get("version", "unknown"),
            persistent=bool(doc.get("persistent", True)),
            service_version=doc.get("service_version"),
            is_async=bool(doc.get("is_async", False)),
        )


@dataclass(slots=True)
class RoutedBatch:
    """Everything one routing round writes, committed in one atomic step (``commit``)."""

    bodies: dict[str, str] = field(default_factory=dict)  # task key -> JSON (forks + originals)
    queues: dict[str, list[str]] = field(default_factory=dict)  # queue key -> uids
    assigned: Counter[str] = field(default_factory=Counter)  # identity -> copies
    outputs: dict[str, set[str]] = field(default_factory=dict)  # origin -> headers JSON
    logs: list[tuple[str, str]] = field(default_factory=list)  # channel, record JSON
    invalid: list[str] = field(default_factory=list)  # uids with unreadable bodies
    # concurrency control: (script, keys, args) run inside the commit's atomic step
    scripts: list[tuple[str, list[str], list[Any]]] = field(default_factory=list)

    def add_fork(self, uid: str, body: str, priority: str, identity: str) -> None:
        """Queue the fork ``uid`` (JSON ``body``, already Spawned) for ``identity``."""
        self.bodies[keys.task_key(uid)] = body
        self.queues.setdefault(keys.queue_key(priority, identity), []).append(uid)
        self.assigned[identity] += 1

    def set_body(self, uid: str, body: str) -> None:
        """Write ``body`` (JSON) as task ``uid`` when the batch commits."""
        self.bodies[keys.task_key(uid)] = body


@dataclass(slots=True)
class TaskRewrite:
    """What one admin transaction writes, decided from the task bodies it watched.

    Built by the caller's ``plan`` in :meth:`KartonBackend.rewrite_tasks
    <asynckarton.backend.KartonBackend.rewrite_tasks>`; committed in one MULTI/EXEC.
    """

    bodies: dict[str, str] = field(default_factory=dict)  # uid -> task JSON to SET
    enqueue: list[tuple[str, str, str]] = field(default_factory=list)  # uid, priority, identity
    undead: list[tuple[str, str]] = field(default_factory=list)  # identity, uid (dead letters)
    result: list[str] = field(default_factory=list)  # uids the caller reports

    def requeue(self, uid: str, priority: str, identity: str) -> None:
        """RPUSH ``uid`` to ``identity``'s queue of ``priority``."""
        self.enqueue.append((uid, priority, identity))

    def forget_dead(self, identity: str, uid: str) -> None:
        """Remove ``uid`` from ``identity``'s dead-letter list."""
        self.undead.append((identity, uid))
