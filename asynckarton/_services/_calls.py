"""Calling a consumer's own code: the class check, ``process`` under its timeout, hooks.

These are the places where the service author's code runs inside a
:class:`~asynckarton.Consumer`; each turns what that code does wrong (a sync
``process``, a handler that raises or overruns ``task_timeout``, a failing hook) into
data or a log line, never into a crash of the consumer.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable, Iterable
from typing import Any

import anyio

from .._errors import TaskTimeoutError
from .._wire._task import Task

__all__ = ["PostHook", "PreHook", "call_process", "check_service_class", "run_hooks", "run_timed"]

PreHook = Callable[[Task], Any]
PostHook = Callable[[Task, BaseException | None], Any]


def check_service_class(cls: type[Any]) -> None:
    """Refuse, before anything runs, the two mistakes a port from karton-core makes.

    Raises:
        TypeError: ``process`` is not ``async def``, or ``filters`` is not a list of dicts.
    """
    name = cls.__qualname__
    if not inspect.iscoroutinefunction(cls.process):
        raise TypeError(
            f"{name}.process must be 'async def process(self, task)': asynckarton awaits it "
            "on the event loop. To port a karton-core service, make it 'async def' and "
            "await what does I/O ('await self.send_task(...)', 'await resource.download()'); "
            "run blocking code with 'await asynckarton.to_thread(fn, ...)'"
        )
    filters = cls.filters
    if not isinstance(filters, list | tuple) or not all(isinstance(f, dict) for f in filters):
        hint = " (wrap the dict in a list)" if isinstance(filters, dict) else ""
        raise TypeError(
            f"{name}.filters must be a list of dicts such as [{{'type': 'sample'}}] "
            f"([] matches nothing), got {type(filters).__name__} {filters!r}{hint}"
        )


async def run_timed(
    process: Callable[[Task], Any], task: Task, timeout: float | None, log: logging.Logger
) -> BaseException | None:
    """Run ``process``; return its exception (a timeout as TaskTimeoutError) or None."""
    if not timeout:  # no deadline: no cancel scope on the hot path
        return await call_process(process, task)
    error: BaseException | None = None
    timeout = float(timeout)
    began = anyio.current_time()
    with anyio.CancelScope(deadline=began + timeout) as scope:
        error = await call_process(process, task)
    elapsed = anyio.current_time() - began
    # A handler that blocks the loop (time.sleep, CPU work) gives the scope no
    # checkpoint to cancel it at: its overrun is seen only once it returns.
    blocked = not scope.cancelled_caught and elapsed > timeout
    if blocked:
        log.error(
            "Task %s: the handler blocked the event loop past task_timeout (%.2fs > "
            "%gs), so it could not be cancelled; run blocking code with "
            "asynckarton.to_thread or to_process",
            task.uid, elapsed, timeout,
        )  # fmt: skip
    if scope.cancelled_caught or blocked:
        try:
            raise TaskTimeoutError(timeout)
        except TaskTimeoutError as exc:
            return exc
    return error


async def call_process(process: Callable[[Task], Any], task: Task) -> BaseException | None:
    """Run ``process(task)`` (sync or async); its exception or None."""
    try:
        result = process(task)
        if inspect.isawaitable(result):
            await result
    except Exception as exc:  # noqa: BLE001 - a handler's failure is data
        return exc
    return None


async def run_hooks(
    hooks: Iterable[tuple[str | None, Callable[..., Any]]], log: logging.Logger, *args: Any
) -> None:
    """Run each hook with ``args`` in order; a failing hook is logged, not raised."""
    for name, hook in hooks:
        try:
            result = hook(*args)
            if inspect.isawaitable(result):
                await result
        except Exception:  # Karton logs and swallows hook errors
            log.exception("Hook %s failed", name or getattr(hook, "__name__", hook))
