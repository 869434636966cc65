"""Run blocking code without stalling the event loop.

``await to_thread(func, *args)`` runs ``func`` in a worker thread (the current task
context, so logging still knows the task).  ``await to_process(func, *args)`` runs it in
a separate worker process that is *killed* when the caller is cancelled, including by a
consumer's ``task_timeout``: the way to bound CPU-bound or misbehaving native code, which
no cancel scope can interrupt inside a thread.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import ParamSpec, TypeVar

import anyio
import anyio.to_process
import anyio.to_thread

__all__ = ["to_process", "to_thread"]

P = ParamSpec("P")
T = TypeVar("T")


async def to_thread(func: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs) -> T:
    """Run ``func(*args, **kwargs)`` in a worker thread and return its result.

    Cancelling the caller abandons the thread (it runs to completion in the background);
    use :func:`to_process` for code that must actually stop.
    """
    return await anyio.to_thread.run_sync(functools.partial(func, *args, **kwargs))


async def to_process(func: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs) -> T:
    """Run ``func(*args, **kwargs)`` in a worker process; kill it if we are cancelled.

    ``func``, its arguments and its result must be picklable (a module-level function).
    """
    call = functools.partial(func, *args, **kwargs)
    return await anyio.to_process.run_sync(call, cancellable=True)
