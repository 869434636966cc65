"""pynenc's ``call_result_cache`` and ``force_new_workflow`` in Karton's model.

**Result cache** (a consumer policy, off by default).  A consumer identity plays the part
of a pynenc task, and a routed copy's headers and payload (persistent payload included)
are its arguments: resources compare by sha256, routing fields (``receiver``, ``origin``;
uids, status and timestamps are not arguments at all) and the names in
``disable_cache_args`` are left out.  When a copy's handler succeeds, the tasks it sent
are recorded under the sha256 of its arguments for ``call_result_cache_ttl`` seconds.  A
later copy with equal arguments is not processed: the recorded outputs are sent again as
children of the new copy (new uids, the new copy's analysis), so its analysis tree is as
complete as if it had run, and the copy is Finished.  pynenc caches a return value; a
Karton handler returns nothing, its result *is* the tasks it sends.

Two equal copies handled at the same moment both run (the cache is filled on success,
not reserved on start); running concurrency is the tool that serialises them.  Known
limit, the same window as deduplicated resources have (``storage/_gc.py``): an entry that
expires between a hit reading it and the resent outputs reaching Redis, while a GC pass
scans, can lose its resources to that pass.

**force_new_workflow** (a producer option and a ``send_tasks`` argument).  A task sent
from inside a handler normally joins the handled task's analysis (its ``root_uid``).
With it, the task starts its own analysis: ``root_uid`` becomes the task's own uid, as
for a task sent from outside any handler.  The link is kept twice: ``parent_uid`` still
names the handled task (Karton's parent link), and the payload field
``asynckarton.parent_analysis`` = ``{"root_uid": ..., "uid": ...}`` names the parent
analysis and task in plain JSON that karton-core and karton-dashboard read as any payload.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

from .._errors import InvalidTaskError
from .._wire._resource import ResourceBase
from .._wire._task import Task
from ..backend import KartonBackend
from ..backend._cache import cache_get, cache_put
from ..backend._guard import TRANSIENT_ERRORS
from ..storage import Storage

__all__ = [
    "PARENT_ANALYSIS",
    "ROUTING_HEADERS",
    "ResultCache",
    "arguments_digest",
    "new_workflow",
    "record_outputs",
]

#: Payload field linking a task that started a new analysis to its parent analysis.
PARENT_ANALYSIS = "asynckarton.parent_analysis"
#: Headers that say where a copy goes or came from, not what it is about.
ROUTING_HEADERS = frozenset({"receiver", "origin"})

Sender = Callable[..., Awaitable[None]]


@dataclass(slots=True)
class _Capture:
    uid: str  # the handled task whose outputs are recorded
    bodies: list[str] = field(default_factory=list)


_capture: ContextVar[_Capture | None] = ContextVar("asynckarton_result_capture", default=None)


def new_workflow(task: Task, parent: Task) -> None:
    """Make ``task`` (sent while handling ``parent``) the root of a new analysis."""
    task.root_uid = Task.fquid_to_uid(task.uid)
    task.payload[PARENT_ANALYSIS] = {"root_uid": parent.root_uid, "uid": parent.uid}


def record_outputs(parent: Task | None, bodies: Iterable[str]) -> None:
    """Remember tasks sent while handling ``parent`` if its result is being cached."""
    capture = _capture.get()
    if capture is not None and parent is not None and parent.uid == capture.uid:
        capture.bodies.extend(bodies)


def _comparable(value: Any) -> Any:
    if isinstance(value, ResourceBase):
        return {"$resource": value.sha256 or value.uid}
    if isinstance(value, dict):
        return {str(k): _comparable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_comparable(v) for v in value]
    return value


def arguments_digest(task: Task, excluded: Sequence[str] = ()) -> str:
    """sha256 of ``task``'s arguments (see the module docstring) minus ``excluded``.

    ``excluded`` holds ``headers.NAME`` and ``payload.NAME`` (a bare ``NAME`` is a
    payload name); ``payload.NAME`` covers the persistent payload too.
    """
    skip_headers = {n.removeprefix("headers.") for n in excluded if n.startswith("headers.")}
    skip_payload = {n.removeprefix("payload.") for n in excluded if not n.startswith("headers.")}
    skip_headers |= ROUTING_HEADERS
    skip_payload.add(PARENT_ANALYSIS)
    payload = {**task.payload, **task.payload_persistent}
    document = {
        "headers": {k: v for k, v in task.headers.items() if k not in skip_headers},
        "payload": {k: _comparable(v) for k, v in payload.items() if k not in skip_payload},
    }
    text = json.dumps(document, sort_keys=True, separators=(",", ":"), default=repr)
    return hashlib.sha256(text.encode()).hexdigest()


class ResultCache:
    """The result cache of one consumer identity (see the module docstring).

    Args:
        backend, storage: where entries and the outputs' resources live.
        identity: the consumer's identity (entries are per identity).
        excluded: ``disable_cache_args``.
        ttl: seconds an entry lives.
        send: the consumer's ``send_tasks`` (None for a consumer that cannot send: its
            entries hold no outputs).
        log: the consumer's logger.
    """

    def __init__(
        self,
        backend: Callable[[], KartonBackend],
        storage: Callable[[], Storage],
        identity: str,
        *,
        excluded: Sequence[str],
        ttl: float,
        send: Sender | None,
        log: logging.Logger,
    ) -> None:
        self._backend = backend
        self._storage = storage
        self._identity = identity
        self._excluded = tuple(excluded)
        self._ttl = ttl
        self._send = send
        self._log = log

    async def run(
        self, task: Task, call: Callable[[Task], Awaitable[BaseException | None]]
    ) -> BaseException | None:
        """Serve ``task`` from the cache, or ``call(task)`` and cache its success."""
        digest = arguments_digest(task, self._excluded)
        try:
            document = await cache_get(self._backend(), self._identity, digest)
        except TRANSIENT_ERRORS as exc:
            self._log.warning("Result cache unreadable (%s); task %s runs", exc, task.uid)
            document = None
        if document is not None:
            return await self._replay(task, document)
        capture = _Capture(task.uid)
        token = _capture.set(capture)
        try:
            error = await call(task)
        finally:
            _capture.reset(token)
        if error is None:
            entry = {"uid": task.uid, "finished": time.time(), "outputs": capture.bodies}
            try:
                await cache_put(
                    self._backend(), self._identity, digest, json.dumps(entry), self._ttl
                )
            except TRANSIENT_ERRORS as exc:
                self._log.warning("Result of task %s not cached: %s", task.uid, exc)
        return error

    async def _replay(self, task: Task, document: str) -> BaseException | None:
        """Send the cached outputs again as children of ``task``; its error or None."""
        try:
            entry = json.loads(document)
            outputs = [Task.unserialize(body, self._storage()) for body in entry["outputs"]]
        except (ValueError, KeyError, TypeError, InvalidTaskError) as exc:
            return InvalidTaskError(f"result cache entry of {self._identity!r} unreadable: {exc}")
        fresh: list[Task] = []
        linked: list[Task] = []
        for old in outputs:
            payload = dict(old.payload)
            new_analysis = payload.pop(PARENT_ANALYSIS, None) is not None
            copy = Task(
                headers={k: v for k, v in old.headers.items() if k not in ROUTING_HEADERS},
                headers_persistent=old.headers_persistent,
                payload=payload,
                payload_persistent=old.payload_persistent,
                priority=old.priority,
            )
            (fresh if new_analysis else linked).append(copy)
        if outputs and self._send is None:
            return InvalidTaskError(f"{self._identity!r} cannot send its cached outputs")
        try:
            if linked and self._send is not None:
                await self._send(linked)
            if fresh and self._send is not None:
                await self._send(fresh, force_new_workflow=True)
        except Exception as exc:  # noqa: BLE001 - a failed resend is the task's failure
            return exc
        self._log.info(
            "Task %s served from the result cache (first run: %s; %d output(s) resent)",
            task.uid, entry.get("uid"), len(outputs),
        )  # fmt: skip
        return None
