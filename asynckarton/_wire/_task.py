"""Tasks: Karton 5's unit of work, as handlers see it.

A task is headers (what routing looks at), payload (data and resources) and bookkeeping
(uids, status, priority).  Its JSON document (field names, uid format, the legacy copy
of persistent headers, asynckarton's extra field, serialisation) belongs to
:mod:`asynckarton._wire._document`; this module adds the object model on top and the
resource encoding of payloads (``{"__karton_resource__": {...}}`` anywhere in them).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Mapping
from contextvars import ContextVar
from typing import Any

from .._errors import InvalidTaskError
from ..storage import Storage
from . import _document
from ._document import PRIORITIES, STATES, TaskPriority, TaskState, check_fields, dumps
from ._query import matches_filters
from ._resource import RESOURCE_KEY, RemoteResource, ResourceBase, resource_from_wire

__all__ = ["Task", "TaskPriority", "TaskState", "current_task", "get_current_task"]

#: The task a handler is processing right now; ``send_task`` links children to it.
current_task: ContextVar[Task | None] = ContextVar("asynckarton_current_task", default=None)


def get_current_task() -> Task | None:
    """Return the task being processed in this context, if any."""
    return current_task.get()


class Task:
    """A Karton task.

    Args:
        headers: routing information; consumers' filters match against these.
        payload: data for the receiver (values may contain resources).
        headers_persistent: headers inherited by every task derived from this one.
        payload_persistent: payload inherited by every task derived from this one.
        priority: queue priority of the whole tree (default normal).
        parent_uid, root_uid, orig_uid, uid, error: bookkeeping, normally left alone.
    """

    __slots__ = (
        "_headers_persistent_keys",
        "_wire",
        "attempt",
        "error",
        "headers",
        "last_update",
        "orig_uid",
        "parent_uid",
        "payload",
        "payload_persistent",
        "priority",
        "root_uid",
        "status",
        "uid",
    )

    def __init__(
        self,
        headers: Mapping[str, Any],
        payload: Mapping[str, Any] | None = None,
        headers_persistent: Mapping[str, Any] | None = None,
        payload_persistent: Mapping[str, Any] | None = None,
        priority: TaskPriority | None = None,
        parent_uid: str | None = None,
        root_uid: str | None = None,
        orig_uid: str | None = None,
        uid: str | None = None,
        error: list[str] | None = None,
        _status: TaskState | None = None,
        _last_update: float | None = None,
    ) -> None:
        payload = {} if payload is None else payload
        payload_persistent = {} if payload_persistent is None else payload_persistent
        headers_persistent = {} if headers_persistent is None else headers_persistent
        for value, what in (
            (payload, "payload"),
            (payload_persistent, "payload_persistent"),
            (headers_persistent, "headers_persistent"),
            (headers, "headers"),
        ):
            if type(value) is not dict and not isinstance(value, Mapping):
                raise ValueError(f"{what} must be a dict, not {type(value).__name__}")
        if uid is None:
            self.uid, self.root_uid = _document.new_uid(root_uid)
        else:
            if root_uid is None:
                raise ValueError("root_uid is required when uid is given")
            self.uid, self.root_uid = uid, root_uid
        self.orig_uid = orig_uid
        self.parent_uid = parent_uid
        self.error = error
        self.headers: dict[str, Any] = {**headers, **headers_persistent}
        self._headers_persistent_keys: set[str] = set(headers_persistent)
        self.status = _status or TaskState.DECLARED
        self.last_update: float = _last_update or time.time()
        self.priority = priority or TaskPriority.NORMAL
        self.payload: dict[str, Any] = dict(payload)
        self.payload_persistent: dict[str, Any] = dict(payload_persistent)
        self.attempt = 0  # retries so far (asynckarton extension)
        self._wire: tuple[tuple[Any, ...], str] | None = None

    # -- properties -------------------------------------------------------------------

    @property
    def headers_persistent(self) -> dict[str, Any]:
        """Headers that every descendant task inherits."""
        keys = self._headers_persistent_keys
        return {k: v for k, v in self.headers.items() if k in keys}

    @property
    def receiver(self) -> str | None:
        """Identity of the consumer this routed copy was sent to."""
        value = self.headers.get("receiver")
        return value if isinstance(value, str) else None

    @property
    def task_uid(self) -> str:
        """The uid without its ``{root}:`` prefix."""
        return self.fquid_to_uid(self.uid)

    @staticmethod
    def fquid_to_uid(fquid: str) -> str:
        """Strip the ``{root}:`` prefix from a fully qualified uid."""
        return _document.task_uid(fquid)

    # -- tree operations --------------------------------------------------------------

    def fork_task(self) -> Task:
        """Copy this task under a new uid in the same tree (the router's fan-out)."""
        forked = Task(
            headers=self.headers,
            headers_persistent=self.headers_persistent,
            payload=self.payload,
            payload_persistent=self.payload_persistent,
            priority=self.priority,
            parent_uid=self.parent_uid,
            root_uid=self.root_uid,
            orig_uid=self.uid,
        )
        forked.attempt = self.attempt
        return forked

    def derive_task(self, headers: Mapping[str, Any]) -> Task:
        """Return a new task with other headers, carrying payloads and persistent headers."""
        return Task(
            headers=headers,
            headers_persistent=self.headers_persistent,
            payload=self.payload,
            payload_persistent=self.payload_persistent,
        )

    def set_task_parent(self, parent: Task) -> None:
        """Attach this task under ``parent`` in its analysis tree."""
        self.parent_uid = parent.uid
        self.root_uid = parent.root_uid

    def merge_persistent_payload(self, other: Task) -> None:
        """Inherit ``other``'s persistent payload; it wins over our non-persistent keys."""
        for name, content in other.payload_persistent.items():
            self.payload_persistent[name] = content
            self.payload.pop(name, None)

    def merge_persistent_headers(self, other: Task) -> None:
        """Inherit ``other``'s persistent headers."""
        self.headers.update(other.headers_persistent)
        self._headers_persistent_keys |= other._headers_persistent_keys

    def matches_filters(self, filters: list[dict[str, Any]]) -> bool:
        """Tell whether this task's headers match Karton ``filters``."""
        return matches_filters(filters, self.headers)

    # -- payload access ---------------------------------------------------------------

    def add_payload(self, name: str, content: Any, persistent: bool = False) -> None:
        """Add a payload value; a name may exist in only one of the two bags."""
        if name in self.payload:
            raise ValueError(f"payload {name!r} already exists")
        if name in self.payload_persistent:
            raise ValueError(f"payload {name!r} already exists in persistent payload")
        (self.payload_persistent if persistent else self.payload)[name] = content

    def add_resource(self, name: str, resource: ResourceBase, persistent: bool = False) -> None:
        """Add a resource (Karton's deprecated alias of :meth:`add_payload`)."""
        self.add_payload(name, resource, persistent)

    def get_payload(self, name: str, default: Any = None) -> Any:
        """Return a payload value, looking at the persistent bag first."""
        if name in self.payload_persistent:
            return self.payload_persistent[name]
        return self.payload.get(name, default)

    def get_resource(self, name: str) -> RemoteResource:
        """Return the stored resource this task received under ``name``.

        Karton's name, typed for handlers: a task a consumer receives holds
        :class:`RemoteResource` objects, so ``await task.get_resource("sample").download()``
        type-checks as it is.  A :class:`LocalResource` added in this process (a task
        being built, not received) is not returned: its bytes may not be stored yet, and
        it has no ``download``.  Read such a payload with :meth:`get_payload`.

        Raises:
            TypeError: ``name`` is absent, not a resource, or a local resource (the
                message says which).
        """
        value = self.get_payload(name)
        if isinstance(value, RemoteResource):
            return value
        if isinstance(value, ResourceBase):
            raise TypeError(
                f"payload {name!r} of task {self.uid} is a {type(value).__name__} added in "
                "this process, not a stored resource; read it with get_payload()"
            )
        if value is None and not self.has_payload(name):
            raise TypeError(f"task {self.uid} has no payload {name!r}")
        raise TypeError(
            f"payload {name!r} of task {self.uid} is a {type(value).__name__}, not a resource"
        )

    def remove_payload(self, name: str) -> None:
        """Remove a non-persistent payload value (KeyError if absent)."""
        del self.payload[name]

    def has_payload(self, name: str) -> bool:
        """Tell whether ``name`` is in either payload bag."""
        return name in self.payload or name in self.payload_persistent

    def is_header_persistent(self, name: str) -> bool:
        """Tell whether header ``name`` is persistent."""
        return name in self._headers_persistent_keys

    def is_payload_persistent(self, name: str) -> bool:
        """Tell whether payload ``name`` is persistent."""
        return name in self.payload_persistent

    def walk_payload_bags(self) -> Iterator[tuple[dict[str, Any], str, Any]]:
        """Yield ``(bag, key, value)`` for the top level of both payload bags."""
        for bag in (self.payload, self.payload_persistent):
            for key, value in bag.items():
                yield bag, key, value

    def walk_payload_items(self) -> Iterator[tuple[str, Any]]:
        """Yield ``(dotted path, value)`` for every leaf in both payload bags."""
        yield from _iter_with_paths(self.payload, "payload")
        yield from _iter_with_paths(self.payload_persistent, "payload_persistent")

    def transform_payload_bags(self, func: Callable[[Any], Any]) -> None:
        """Replace every leaf in both payload bags with ``func(leaf)``."""
        self.payload = _map_leaves(func, self.payload)
        self.payload_persistent = _map_leaves(func, self.payload_persistent)

    def iterate_resources(self) -> Iterator[ResourceBase]:
        """Yield every resource anywhere in the payloads."""
        for bag in (self.payload, self.payload_persistent):
            yield from _iter_resources(bag)

    # -- wire format ------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """Return the task as the Karton 5 JSON document (resources encoded)."""
        return _document.build(
            uid=self.uid,
            root_uid=self.root_uid,
            parent_uid=self.parent_uid,
            orig_uid=self.orig_uid,
            status=self.status.value,
            priority=self.priority.value,
            last_update=self.last_update,
            payload=_encode(self.payload) if self.payload else {},
            payload_persistent=_encode(self.payload_persistent) if self.payload_persistent else {},
            headers=self.headers,
            headers_persistent=self.headers_persistent,
            error=self.error,
            attempt=self.attempt,
        )

    def serialize(self, indent: int | None = None) -> str:
        """Return the task's JSON text (sorted keys, as Karton writes it)."""
        return dumps(self.to_dict(), indent=indent)

    def serialize_state(self) -> str:
        """Return :meth:`serialize`, reusing the last result while the state is unchanged.

        The consumer writes a task and publishes log lines carrying it at each state
        change; this serialises once per state.  The state key is status, timestamp,
        attempt and error, so only callers that change the task through those (the
        consumer's own transitions) may rely on it; anyone else calls ``serialize``.
        A task :meth:`unserialize` made from text starts with that text as its
        serialisation (the document as stored), until its state changes.
        """
        key = self._state_key()
        if self._wire is None or self._wire[0] != key:
            self._wire = (key, self.serialize())
        return self._wire[1]

    def _state_key(self) -> tuple[Any, ...]:
        return (self.status, self.last_update, self.attempt, id(self.error), self.uid)

    @staticmethod
    def unserialize(
        data: str | bytes,
        storage: Storage | None = None,
        parse_resources: bool = True,
    ) -> Task:
        """Build a task from its JSON, accepting every legacy variant Karton reads.

        Raises:
            InvalidTaskError: the text is not JSON or lacks a required field.
        """
        doc = _document.parse(data)  # checked: no second check_fields in from_dict
        task = Task._from_checked(doc, storage, parse_resources)
        if isinstance(data, str):
            task._wire = (task._state_key(), data)
        return task

    @staticmethod
    def from_dict(
        doc: Mapping[str, Any], storage: Storage | None = None, parse_resources: bool = True
    ) -> Task:
        """Build a task from an already parsed JSON document."""
        check_fields(doc)
        return Task._from_checked(doc, storage, parse_resources)

    @staticmethod
    def _from_checked(
        doc: Mapping[str, Any], storage: Storage | None, parse_resources: bool
    ) -> Task:
        """:meth:`from_dict` of a document :func:`check_fields` accepted.

        The fields are set directly: ``__init__``'s checks are the ones the document
        passed already (a consumer builds every task it receives here).
        """
        uid = doc["uid"]
        headers_persistent = _document.persistent_headers(doc)
        payload, payload_persistent = doc["payload"], doc["payload_persistent"]
        if parse_resources:
            payload = _decode(payload, storage) if payload else {}
            payload_persistent = _decode(payload_persistent, storage)
        else:
            payload, payload_persistent = dict(payload), dict(payload_persistent)
        for value, what in (
            (payload, "payload"),
            (payload_persistent, "payload_persistent"),
            (headers_persistent, "headers_persistent"),
        ):
            if type(value) is not dict:  # a resource in place of a bag, a legacy oddity
                raise InvalidTaskError(
                    f"{what} must be a dict, not {type(value).__name__}", uid=uid
                )
        task = Task.__new__(Task)
        task.uid, task.root_uid = uid, doc["root_uid"]
        task.orig_uid = doc.get("orig_uid")
        task.parent_uid = doc.get("parent_uid")
        task.error = doc.get("error")
        task.headers = {**doc["headers"], **headers_persistent}
        task._headers_persistent_keys = set(headers_persistent)
        task.status = STATES[doc["status"]]
        task.last_update = doc.get("last_update") or time.time()
        task.priority = PRIORITIES[doc.get("priority") or "normal"]
        task.payload = payload
        task.payload_persistent = payload_persistent
        task.attempt = _document.attempt_of(doc)
        task._wire = None
        return task

    def __repr__(self) -> str:
        return f"<Task {self.uid} {self.status.value} headers={self.headers!r}>"


def _encode(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _encode(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_encode(v) for v in value]
    if isinstance(value, ResourceBase):
        return {RESOURCE_KEY: value.to_dict()}
    return value


def _decode(value: Any, storage: Storage | None) -> Any:
    if isinstance(value, dict):
        if RESOURCE_KEY in value:
            return resource_from_wire(value[RESOURCE_KEY], storage)
        return {k: _decode(v, storage) for k, v in value.items()}
    if isinstance(value, list):
        return [_decode(v, storage) for v in value]
    return value


def _iter_resources(value: Any) -> Iterator[ResourceBase]:
    if isinstance(value, ResourceBase):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from _iter_resources(item)
    elif isinstance(value, list | tuple):
        for item in value:
            yield from _iter_resources(item)


def _iter_with_paths(value: Any, path: str) -> Iterator[tuple[str, Any]]:
    if isinstance(value, dict):
        for key, item in value.items():
            yield from _iter_with_paths(item, f"{path}.{key}")
    elif isinstance(value, list | tuple):
        for index, item in enumerate(value):
            yield from _iter_with_paths(item, f"{path}.{index}")
    else:
        yield path, value


def _map_leaves(func: Callable[[Any], Any], value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _map_leaves(func, v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_map_leaves(func, v) for v in value]
    return func(value)
