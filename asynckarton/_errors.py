"""Every exception asynckarton raises on purpose.

    KartonError
    ├── ConfigError               a bad or missing configuration value (names option and source)
    ├── InvalidIdentityError      an identity with a space or '?'
    ├── BackendError              Redis refused a command at a public entry point
    │   └── BackendUnavailableError   Redis was unreachable, timed out or still loading
    ├── StorageError              S3 / local storage failures
    │   ├── ResourceNotFoundError the object behind a resource is gone
    │   ├── UnsafeArchiveError    a directory archive that tries to escape or explode
    │   └── PartialDeleteError    a batch delete where some objects could not be removed
    ├── InvalidTaskError          a task body that cannot be (de)serialised
    ├── TaskTimeoutError          a handler ran past its deadline
    └── QueryError                a filter that cannot be compiled or evaluated

``Retry`` is not an error: a handler raises it to ask for another attempt.
"""

from __future__ import annotations


def _rebuild(
    cls: type[BaseException], args: tuple[object, ...], state: dict[str, object]
) -> BaseException:
    """Unpickle an error without calling its constructor (whose keywords differ per class)."""
    error = cls.__new__(cls, *args)
    error.args = args
    error.__dict__.update(state)
    return error


class _Picklable(Exception):
    """Errors travel between processes (``to_process``): keep their data when pickled."""

    def __reduce__(self) -> tuple[object, ...]:
        return (_rebuild, (type(self), self.args, dict(self.__dict__)))


class KartonError(_Picklable):
    """Base class for errors raised by asynckarton itself."""


class ConfigError(KartonError, ValueError):
    """A configuration value is missing or invalid.

    Attributes:
        section: the ini section (``redis``, ``karton``...).
        option: the option name inside the section.
        source: where the value came from (``/etc/karton/karton.ini:12``,
            ``env KARTON_REDIS_PORT``, ``--redis-port``, ``default``).
        value: the raw value as read, or None when missing.
    """

    def __init__(
        self,
        message: str,
        *,
        section: str | None = None,
        option: str | None = None,
        source: str | None = None,
        value: object = None,
    ) -> None:
        where = f"[{section}] {option}" if section and option else (section or option or "")
        parts = [message]
        if where:
            parts.append(f"option {where}")
        if value is not None:
            parts.append(f"value {value!r}")
        if source:
            parts.append(f"from {source}")
        super().__init__(
            ": ".join(parts[:1]) + (" (" + ", ".join(parts[1:]) + ")" if parts[1:] else "")
        )
        self.section = section
        self.option = option
        self.source = source
        self.value = value


class InvalidIdentityError(KartonError, ValueError):
    """An identity contains characters Karton cannot use in client names."""


class BackendError(KartonError):
    """Redis failed during an operation a user called.

    The rule: public entry points (``Producer.send_task``/``send_tasks``, the task admin
    and inspection functions, the ``testing`` helpers, ``GarbageCollector.collect``, and
    the ``KartonBackend`` methods they use) raise a Redis connection, timeout or response
    error as ``BackendError`` (or :class:`BackendUnavailableError`), naming the operation
    and the Redis address and chained (``raise ... from``) to the redis-py exception.
    One decorator in ``backend/`` does the wrapping.  The services' own loops (fetch,
    complete, lease renewal, routing, log publishing) call unwrapped backend methods:
    they catch the transient redis-py errors themselves and retry, so a Redis outage
    delays their work instead of stopping it.

    Attributes:
        operation: what was being done (``"send tasks"``, ``"list crashed tasks"``...).
        address: the Redis server (``redis://host:port/db``, password masked) or
            ``"embedded"``.
        origin: where that address was set (``[redis] host from /etc/karton/karton.ini:2``),
            or None when not known (embedded, or a connector built in code).
    """

    def __init__(
        self, message: str, *, operation: str, address: str, origin: str | None = None
    ) -> None:
        super().__init__(message)
        self.operation = operation
        self.address = address
        self.origin = origin


class BackendUnavailableError(BackendError):
    """Redis could not be reached, timed out, or is loading or read-only.

    Retrying later may succeed (the services' own loops retry such errors).
    """


class BackendFullError(BackendUnavailableError):
    """Redis refused a write because it reached ``maxmemory`` (policy ``noeviction``).

    Redis applied none of the refused command (a producer's batch is one transaction:
    nothing of it was queued).  Reads and deletions still work, so consumers and the
    router go on removing finished work; the write may succeed once memory is freed.
    """


class StorageError(KartonError):
    """A storage (S3 or local directory) operation failed."""


class ResourceNotFoundError(StorageError):
    """The object behind a resource does not exist."""

    def __init__(self, bucket: str | None, key: str) -> None:
        super().__init__(f"resource {key!r} not found in bucket {bucket!r}")
        self.bucket = bucket
        self.key = key


class UnsafeArchiveError(StorageError):
    """A directory resource archive would write outside its target or expand too far."""

    def __init__(self, member: str, reason: str) -> None:
        super().__init__(f"refusing to extract {member!r}: {reason}")
        self.member = member
        self.reason = reason


class InvalidTaskError(KartonError, ValueError):
    """A task body or payload cannot be (de)serialised."""

    def __init__(self, message: str, *, uid: str | None = None) -> None:
        super().__init__(f"{message} (task {uid})" if uid else message)
        self.uid = uid


class TaskTimeoutError(KartonError):
    """A handler ran past its ``task_timeout``."""

    def __init__(self, timeout: float) -> None:
        super().__init__(f"task exceeded its timeout of {timeout:g} seconds")
        self.timeout = timeout


class QueryError(KartonError):
    """A filter uses an unsupported operator or malformed operand."""


class Retry(_Picklable):
    """Raised by a handler to ask for another attempt after ``after`` seconds."""

    def __init__(self, *, after: float | None = None, reason: str = "") -> None:
        super().__init__(reason or (f"retry in {after:g}s" if after is not None else "retry"))
        self.after = after
        self.reason = reason


class PartialDeleteError(StorageError):
    """A batch delete removed some objects but the storage refused others.

    Attributes:
        bucket: the bucket the delete ran against.
        deleted: how many entries were deleted.
        failed: ``(key, reason)`` for every entry that was not deleted.
    """

    def __init__(self, bucket: str, deleted: int, failed: list[tuple[str, str]]) -> None:
        sample = ", ".join(f"{key!r} ({reason})" for key, reason in failed[:3])
        more = f" and {len(failed) - 3} more" if len(failed) > 3 else ""
        super().__init__(
            f"deleted {deleted} objects from bucket {bucket!r} but {len(failed)} failed: "
            f"{sample}{more}"
        )
        self.bucket = bucket
        self.deleted = deleted
        self.failed = failed


class UnknownBindError(KartonError, LookupError):
    """``delete`` was asked for an identity that has no bind in Redis."""

    def __init__(self, identity: str) -> None:
        super().__init__(f"no bind registered for {identity!r}")
        self.identity = identity


class BindInUseError(KartonError):
    """``delete`` refused a bind whose consumers are online (use ``force``)."""

    def __init__(self, identity: str, replicas: int) -> None:
        super().__init__(
            f"bind {identity!r} has {replicas} replica(s) online; stop them first "
            "or force the deletion (they will shut down: 'Binds changed')"
        )
        self.identity = identity
        self.replicas = replicas


class UnknownTaskError(KartonError, LookupError):
    """Tasks named by uid are not there, or not in the state the action needs."""

    def __init__(self, action: str, problems: dict[str, str]) -> None:
        listed = "; ".join(f"{uid}: {why}" for uid, why in sorted(problems.items()))
        super().__init__(f"cannot {action} {len(problems)} task(s): {listed}")
        self.action = action
        self.problems = problems


class ConcurrencyControlled(KartonError):
    """A task met a held concurrency slot (``running_concurrency``): its name and message
    are written into the task's ``error`` when it ends Crashed; it is never raised."""
