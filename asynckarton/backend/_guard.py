"""How Redis failures reach callers: retried inside services, typed at entry points.

Two halves of one rule (stated on :class:`~asynckarton._errors.BackendError`):

* :func:`entry_point` wraps a backend method that users reach (directly or through a
  producer, the admin functions or the test kit): any redis-py error, or socket error,
  leaves it as :class:`BackendError` / :class:`BackendUnavailableError` naming the
  operation and the Redis address, chained to the original.  This is the only place that
  translates errors.
* :data:`TRANSIENT_ERRORS` and :func:`until_done` are for the services' own loops, which
  call the unwrapped hot-path methods and retry what a restart or a network blip causes
  (the wrapped kind included, so a loop may call either).
"""

from __future__ import annotations

import functools
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from typing import Any, Concatenate, ParamSpec, Protocol, TypeVar

import anyio
import redis.exceptions

from .._errors import BackendError, BackendFullError, BackendUnavailableError

__all__ = ["TRANSIENT_ERRORS", "entry_point", "entry_point_iter", "until_done"]

#: redis-py errors after which the same call may succeed later (restart, network).
_UNAVAILABLE: tuple[type[BaseException], ...] = (
    redis.exceptions.ConnectionError,
    redis.exceptions.TimeoutError,
    redis.exceptions.BusyLoadingError,
    redis.exceptions.TryAgainError,
    redis.exceptions.ReadOnlyError,
    redis.exceptions.OutOfMemoryError,  # maxmemory with noeviction: wait for memory
    OSError,
)

#: Errors after which a Redis call may succeed if retried (server restarting, network).
TRANSIENT_ERRORS: tuple[type[BaseException], ...] = (BackendUnavailableError, *_UNAVAILABLE)

_REDIS_ERRORS = (redis.exceptions.RedisError, OSError)

T = TypeVar("T")
P = ParamSpec("P")


class _Addressed(Protocol):
    @property
    def address(self) -> str: ...


S = TypeVar("S", bound=_Addressed)


def backend_error(
    exc: BaseException, operation: str, address: str, origin: str | None = None
) -> BackendError:
    """Return the :class:`BackendError` that reports ``exc`` (raise it ``from exc``)."""
    kind: type[BackendError] = BackendError
    if isinstance(exc, redis.exceptions.OutOfMemoryError):
        kind = BackendFullError
    elif isinstance(exc, _UNAVAILABLE):
        kind = BackendUnavailableError
    detail = str(exc) or "no details"
    where = f" ({origin})" if origin else ""
    return kind(
        f"Redis at {address}{where} failed to {operation}: {type(exc).__name__}: {detail}",
        operation=operation,
        address=address,
        origin=origin,
    )


def _origin(addressed: object) -> str | None:
    return getattr(addressed, "origin", None)


def entry_point(
    operation: str,
) -> Callable[
    [Callable[Concatenate[S, P], Awaitable[T]]],
    Callable[Concatenate[S, P], Coroutine[Any, Any, T]],
]:
    """Decorate a backend coroutine method so Redis errors leave it as BackendError."""

    def decorate(
        method: Callable[Concatenate[S, P], Awaitable[T]],
    ) -> Callable[Concatenate[S, P], Coroutine[Any, Any, T]]:
        @functools.wraps(method)
        async def guarded(self: S, /, *args: P.args, **kwargs: P.kwargs) -> T:
            try:
                return await method(self, *args, **kwargs)
            except _REDIS_ERRORS as exc:
                raise backend_error(exc, operation, self.address, _origin(self)) from exc

        return guarded

    return decorate


def entry_point_iter(
    operation: str,
) -> Callable[
    [Callable[Concatenate[S, P], AsyncIterator[T]]],
    Callable[Concatenate[S, P], AsyncIterator[T]],
]:
    """:func:`entry_point` for async generator methods."""

    def decorate(
        method: Callable[Concatenate[S, P], AsyncIterator[T]],
    ) -> Callable[Concatenate[S, P], AsyncIterator[T]]:
        @functools.wraps(method)
        async def guarded(self: S, /, *args: P.args, **kwargs: P.kwargs) -> AsyncIterator[T]:
            try:
                async for item in method(self, *args, **kwargs):
                    yield item
            except _REDIS_ERRORS as exc:
                raise backend_error(exc, operation, self.address, _origin(self)) from exc

        return guarded

    return decorate


async def until_done(
    call: Callable[[], Awaitable[T]], *, log: logging.Logger, what: str, max_delay: float = 10.0
) -> T:
    """Run ``call`` until Redis accepts it, backing off on transient errors.

    For writes that must not be dropped (a task's final state, a retry schedule): the
    caller holds the task's lease meanwhile, so waiting here never loses anything.
    """
    delay = 0.2
    while True:
        try:
            return await call()
        except TRANSIENT_ERRORS as exc:
            log.warning("Redis unavailable to %s (%s); retrying in %.1fs", what, exc, delay)
            await anyio.sleep(delay)
            delay = min(delay * 2, max_delay)
