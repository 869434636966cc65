"""The Karton 5 task document: the one place that knows the task's JSON.

Everything that reads or writes a task body goes through here: :class:`~._task.Task`
(``to_dict``/``from_dict``) and the router, which forks parsed documents without
building ``Task`` objects (it never looks inside payloads).  The module owns:

* the field names and their types (:func:`check_fields`), the state and priority
  strings (:class:`TaskState`, :class:`TaskPriority`);
* the uid format ``{root_uid}:own_uuid`` (:func:`new_uid`, :func:`task_uid`);
* persistent headers, written twice: top level and as
  ``payload_persistent["__headers_persistent"]`` (readers older than Karton 5.2 need it,
  and documents from such writers only have that copy, see :func:`persistent_headers`);
* asynckarton's one extra top-level field, ``asynckarton`` (the retry count); Karton
  readers ignore unknown fields (:func:`attempt_of`);
* serialisation: orjson with sorted keys (the same JSON document as Karton's
  ``json.dumps(sort_keys=True)``, without the optional spaces), falling back to ``json``
  for what orjson cannot represent (:func:`dumps`, :func:`loads`).

Resources inside payloads are the caller's business: :func:`build` takes payloads
already encoded.
"""

from __future__ import annotations

import enum
import json
import uuid
from collections.abc import Mapping
from typing import Any, Final

import orjson

from .._errors import InvalidTaskError

__all__ = [
    "EXTRA_FIELD",
    "PRIORITIES",
    "STATES",
    "RoutableTask",
    "TaskPriority",
    "TaskState",
    "attempt_of",
    "build",
    "check_fields",
    "dumps",
    "loads",
    "new_uid",
    "parse",
    "persistent_headers",
    "task_uid",
]


class TaskState(enum.Enum):
    """Lifecycle states, with Karton's exact wire strings."""

    DECLARED = "Declared"
    SPAWNED = "Spawned"
    STARTED = "Started"
    FINISHED = "Finished"
    CRASHED = "Crashed"


class TaskPriority(enum.Enum):
    """Queue priority, inherited by the whole task tree."""

    HIGH = "high"
    NORMAL = "normal"
    LOW = "low"


STATES: Final = {state.value: state for state in TaskState}
"""Wire string -> :class:`TaskState`."""
PRIORITIES: Final = {prio.value: prio for prio in TaskPriority}
"""Wire string -> :class:`TaskPriority`."""
EXTRA_FIELD: Final = "asynckarton"
"""asynckarton's own top-level field (``{"attempt": n}``); Karton ignores it."""
_HEADERS_COPY: Final = "__headers_persistent"


# -- uids -----------------------------------------------------------------------------


def new_uid(root_uid: str | None) -> tuple[str, str]:
    """Return ``(uid, root_uid)`` for a new task; a task without a root starts a tree."""
    own = str(uuid.uuid4())
    root = root_uid or own
    return "{" + root + "}:" + own, root


def task_uid(fquid: str) -> str:
    """Strip the ``{root}:`` prefix from a fully qualified uid."""
    return fquid.rsplit(":", 1)[-1]


# -- fields ---------------------------------------------------------------------------


def build(
    *,
    uid: str,
    root_uid: str,
    parent_uid: str | None,
    orig_uid: str | None,
    status: str,
    priority: str,
    last_update: float,
    payload: dict[str, Any],
    payload_persistent: Mapping[str, Any],
    headers: dict[str, Any],
    headers_persistent: dict[str, Any],
    error: list[str] | None,
    attempt: int,
) -> dict[str, Any]:
    """Return the Karton 5 document of a task (payloads already JSON-ready).

    ``payload_persistent`` is copied: the persistent headers' second copy is added to
    the copy, never to the caller's mapping.
    """
    doc: dict[str, Any] = {
        "uid": uid,
        "root_uid": root_uid,
        "parent_uid": parent_uid,
        "orig_uid": orig_uid,
        "status": status,
        "priority": priority,
        "last_update": last_update,
        "payload": payload,
        "payload_persistent": {**payload_persistent, _HEADERS_COPY: headers_persistent},
        "headers": headers,
        "headers_persistent": headers_persistent,
        "error": error,
    }
    if attempt:
        doc[EXTRA_FIELD] = {"attempt": attempt}
    return doc


def persistent_headers(doc: Mapping[str, Any]) -> dict[str, Any]:
    """The persistent headers of a checked document (the embedded copy for Karton < 5.2)."""
    found = doc.get("headers_persistent")
    if found is None:
        found = doc["payload_persistent"].get(_HEADERS_COPY) or {}
    return found


def attempt_of(doc: Mapping[str, Any]) -> int:
    """The retry count asynckarton stored in ``doc`` (0 when absent or malformed)."""
    extra = doc.get(EXTRA_FIELD)
    if isinstance(extra, dict):
        attempt = extra.get("attempt")
        if isinstance(attempt, int):
            return attempt
    return 0


def check_fields(doc: Mapping[str, Any]) -> None:
    """Raise InvalidTaskError naming every field Karton requires that is absent or wrong."""
    get = doc.get
    last_update = get("last_update")
    if (  # the common, valid case in one expression; the detailed report below
        type(get("uid")) is str
        and type(get("root_uid")) is str
        and type(get("status")) is str
        and get("status") in STATES
        and type(get("headers")) is dict
        and type(get("payload")) is dict
        and type(get("payload_persistent")) is dict
        and (
            get("priority") is None
            or (type(get("priority")) is str and get("priority") in PRIORITIES)
        )
        and (get("headers_persistent") is None or type(get("headers_persistent")) is dict)
        and (last_update is None or type(last_update) is float or type(last_update) is int)
        and (get("error") is None or type(get("error")) is list)
    ):
        return
    uid = get("uid")
    problems = [
        f"{name} {get(name)!r}" if name in doc else f"no {name}"
        for name, ok in (
            ("uid", isinstance(uid, str)),
            ("root_uid", isinstance(get("root_uid"), str)),
            ("status", isinstance(get("status"), str) and get("status") in STATES),
            ("headers", isinstance(get("headers"), dict)),
            ("payload", isinstance(get("payload"), dict)),
            ("payload_persistent", isinstance(get("payload_persistent"), dict)),
            (
                "priority",
                get("priority") is None
                or (isinstance(get("priority"), str) and get("priority") in PRIORITIES),
            ),
            (
                "headers_persistent",
                get("headers_persistent") is None or isinstance(get("headers_persistent"), dict),
            ),
            (
                "last_update",
                get("last_update") is None
                or (
                    isinstance(get("last_update"), int | float)
                    and not isinstance(get("last_update"), bool)
                ),
            ),
            ("error", get("error") is None or isinstance(get("error"), list)),
        )
        if not ok
    ]
    if problems:
        raise InvalidTaskError(
            "task body has an invalid " + ", ".join(problems),
            uid=uid if isinstance(uid, str) else None,
        )


def parse(body: str | bytes) -> dict[str, Any]:
    """Parse a task body and check its fields.

    Raises:
        InvalidTaskError: not JSON, not an object, or a field Karton requires is missing
            or malformed (the message names each).
    """
    try:
        doc = loads(body)
    except ValueError as exc:
        raise InvalidTaskError(f"task body is not valid JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise InvalidTaskError(f"task body is a JSON {type(doc).__name__}, not an object")
    check_fields(doc)
    return doc


# -- JSON -----------------------------------------------------------------------------


def dumps(data: Any, indent: int | None = None) -> str:
    """Serialise like Karton (sorted keys), fast; falls back to json for huge ints.

    Raises:
        InvalidTaskError: ``data`` holds something JSON cannot represent.
    """
    if indent is None:
        try:
            return orjson.dumps(data, option=_ORJSON_OPTIONS).decode()
        except TypeError as exc:
            # json handles what orjson refuses but Karton accepts: huge ints, int keys.
            if "Integer exceeds" not in str(exc) and "Dict key must be str" not in str(exc):
                raise InvalidTaskError(
                    f"task is not JSON-serialisable: {_culprit(data) or exc}"
                ) from None
    try:
        return json.dumps(data, sort_keys=True, indent=indent)
    except (TypeError, ValueError) as exc:
        raise InvalidTaskError(f"task is not JSON-serialisable: {_culprit(data) or exc}") from None


# orjson would write datetimes and dataclasses as strings and objects; Karton's json.dumps
# refuses them, so they are refused here too (naming the key, see _culprit).
_ORJSON_OPTIONS = (
    orjson.OPT_SORT_KEYS | orjson.OPT_PASSTHROUGH_DATETIME | orjson.OPT_PASSTHROUGH_DATACLASS
)


def _culprit(value: Any, path: str = "") -> str:
    """Name the first value json cannot write, by its key path (``payload['when']``)."""
    if isinstance(value, dict):
        for key, item in value.items():
            found = _culprit(item, f"{path}[{key!r}]" if path else str(key))
            if found:
                return found
    elif isinstance(value, list | tuple):
        for index, item in enumerate(value):
            found = _culprit(item, f"{path}[{index}]")
            if found:
                return found
    elif value is not None and not isinstance(value, str | int | float):
        return f"{path} is a {type(value).__name__} ({value!r:.60}), not a JSON value"
    return ""


def loads(data: str | bytes) -> Any:
    """Parse JSON fast, falling back to json for numbers orjson rejects."""
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError:
        return json.loads(data)


# -- routing --------------------------------------------------------------------------


class RoutableTask:
    """A checked, unrouted task document as the router handles it.

    The router forks documents, not ``Task`` objects: each fork is a fresh document
    built by :func:`build` from the original's fields (what ``Task.fork_task()`` would
    write), and the original is marked Finished in place, which keeps fields a newer
    writer may have added.  Use :meth:`parse` to make one.

    Attributes:
        doc: the parsed document.
        uid, root_uid, priority: its fields (priority defaulted to ``"normal"``).
        headers: headers with the persistent ones merged in, as routing sees them.
        headers_persistent: the persistent headers (legacy copy if needed).
    """

    __slots__ = (
        "_fork_base",
        "doc",
        "headers",
        "headers_persistent",
        "priority",
        "root_uid",
        "uid",
    )

    def __init__(self, doc: dict[str, Any]) -> None:
        """Wrap a document that :func:`check_fields` accepted."""
        self.doc = doc
        self.uid: str = doc["uid"]
        self.root_uid: str = doc["root_uid"]
        persistent = persistent_headers(doc)
        self.headers_persistent: dict[str, Any] = persistent
        self.headers: dict[str, Any] = {**doc["headers"], **persistent}
        self.priority: str = doc.get("priority") or TaskPriority.NORMAL.value
        self._fork_base: dict[str, Any] | None = None

    @classmethod
    def parse(cls, body: str | bytes) -> RoutableTask:
        """Parse and check an unrouted task body (InvalidTaskError, see :func:`parse`)."""
        return cls(parse(body))

    @property
    def task_uid(self) -> str:
        """The uid without its ``{root}:`` prefix."""
        return task_uid(self.uid)

    def fork(self, receiver: str, now: float) -> tuple[str, str]:
        """Return ``(uid, JSON)`` of the Spawned copy for ``receiver``.

        The copies of one task differ only in uid and receiver: :func:`build` makes the
        first, the others are shallow copies of it with those two fields replaced.
        """
        uid, _ = new_uid(self.root_uid)
        base = self._fork_base
        if base is None or base["last_update"] != now:
            doc = self.doc
            base = self._fork_base = build(
                uid=uid,
                root_uid=self.root_uid,
                parent_uid=doc.get("parent_uid"),
                orig_uid=self.uid,
                status=TaskState.SPAWNED.value,
                priority=self.priority,
                last_update=now,
                payload=doc["payload"],
                payload_persistent=doc["payload_persistent"],
                headers=self.headers,
                headers_persistent=self.headers_persistent,
                error=None,
                attempt=attempt_of(doc),
            )
        fork = base.copy()
        fork["uid"] = uid
        fork["headers"] = {**self.headers, "receiver": receiver}
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
            _HEADERS_COPY: self.headers_persistent,
        }
        for optional in ("parent_uid", "orig_uid", "error"):
            doc.setdefault(optional, None)
        return dumps(doc)
