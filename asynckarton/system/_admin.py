"""Operator actions on Crashed tasks: list them, restart them, cancel them.

These are karton-dashboard's "restart" and "cancel" buttons, with the same Redis writes so
the dashboard's history stays consistent:

* restart forks the crashed task under a new uid (same ``orig_uid``, same receiver),
  marks the fork Spawned with its retry count reset, RPUSHes it to
  ``karton.queue.<priority>:<receiver>`` and sets the original Finished;
* cancel sets the crashed task Finished.

Both also drop the uid from ``asynckarton.dead:<receiver>`` (the dead-letter list of
tasks that used every automatic retry).  Writes are optimistic transactions
(:meth:`KartonBackend.rewrite_tasks <asynckarton.backend.KartonBackend.rewrite_tasks>`:
WATCH on the task keys, then MULTI/EXEC), so a task that changed meanwhile (deleted by
the GC, restarted by someone else) is re-read and skipped instead of resurrected.  Tasks
are found with SCAN, never KEYS.

Redis failures are raised as ``BackendError`` naming the operation and the server.
"""

from __future__ import annotations

import re
import time
from collections.abc import AsyncIterator, Callable, Sequence

from .._errors import InvalidTaskError, UnknownTaskError
from .._wire._task import Task, TaskState
from ..backend import KartonBackend
from ..backend._records import TaskRewrite

__all__ = ["cancel_crashed", "last_error_line", "list_crashed", "restart_crashed"]

# Cheap pre-filter before parsing: Karton writes ``"status": "Crashed"``, we write it
# without the space.
_CRASHED_RE = re.compile(r'"status":\s*"Crashed"')
_CHUNK = 200
_WATCH_ATTEMPTS = 5

#: Records what happens to one Crashed task in a rewrite; returns the uid to report.
Writer = Callable[[TaskRewrite, Task, float], str | None]


def _parse_crashed(body: str | bytes | None) -> Task | None:
    if isinstance(body, bytes):
        body = body.decode("utf-8", "replace")
    if body is None or not _CRASHED_RE.search(body):
        return None
    try:
        task = Task.unserialize(body, parse_resources=False)
    except InvalidTaskError:
        return None
    return task if task.status is TaskState.CRASHED else None


async def _iter_crashed(backend: KartonBackend) -> AsyncIterator[Task]:
    async for batch in backend.scan_tasks():
        for _, body in batch:
            if (task := _parse_crashed(body)) is not None:
                yield task


async def list_crashed(backend: KartonBackend) -> list[Task]:
    """Return every Crashed task, oldest first (resources left unparsed).

    Raises:
        BackendError: Redis failed (names the operation and the server).
    """
    tasks = [task async for task in _iter_crashed(backend)]
    tasks.sort(key=lambda task: task.last_update)
    return tasks


def _why_not(body: str | bytes | None) -> str:
    """Why a task named by uid cannot be acted on: gone, or not Crashed."""
    if body is None:
        return "no such task"
    try:
        task = Task.unserialize(body, parse_resources=False)
    except InvalidTaskError as exc:
        return f"unreadable task body ({exc})"
    return f"it is {task.status.value}, not Crashed"


async def _select(
    backend: KartonBackend,
    uids: Sequence[str] | None,
    identity: str | None,
    everything: bool,
    action: str,
) -> list[Task]:
    """Return the Crashed tasks chosen by exactly one of the three selectors.

    Raises:
        UnknownTaskError: a uid names no task, or one that is not Crashed.
    """
    chosen = [bool(uids), identity is not None, everything]
    if sum(chosen) != 1:
        raise ValueError("select tasks with exactly one of uids, identity or all")
    if uids:
        wanted = set(uids)
        bodies = dict(zip(wanted, await backend.get_task_bodies(list(wanted)), strict=True))
        tasks = [t for t in map(_parse_crashed, bodies.values()) if t is not None]
        missing = wanted - {t.uid for t in tasks}
        if any("{" not in uid for uid in missing):  # a bare task uid: look it up
            short = {uid for uid in missing if "{" not in uid}
            tasks += [t async for t in _iter_crashed(backend) if t.task_uid in short]
            missing -= {t.task_uid for t in tasks}
        if missing:
            raise UnknownTaskError(action, {uid: _why_not(bodies.get(uid)) for uid in missing})
        return tasks
    return [t async for t in _iter_crashed(backend) if everything or t.receiver == identity]


def _restart_one(rewrite: TaskRewrite, task: Task, now: float) -> str | None:
    receiver = task.receiver
    if receiver is None:  # never routed: there is no queue to put it back in
        return None
    fork = task.fork_task()
    fork.orig_uid = task.orig_uid  # point at the unrouted task, as Karton's restart_task
    fork.status, fork.last_update, fork.attempt = TaskState.SPAWNED, now, 0
    task.status, task.last_update = TaskState.FINISHED, now
    rewrite.bodies[fork.uid] = fork.serialize()
    rewrite.requeue(fork.uid, fork.priority.value, receiver)
    rewrite.bodies[task.uid] = task.serialize()
    rewrite.forget_dead(receiver, task.uid)
    return fork.uid


def _cancel_one(rewrite: TaskRewrite, task: Task, now: float) -> str | None:
    task.status, task.last_update = TaskState.FINISHED, now
    rewrite.bodies[task.uid] = task.serialize()
    if task.receiver is not None:
        rewrite.forget_dead(task.receiver, task.uid)
    return task.uid


async def _commit_chunk(backend: KartonBackend, uids: list[str], write: Writer) -> list[str]:
    """Apply ``write`` to those of ``uids`` still Crashed, in one optimistic transaction."""

    def plan(bodies: Sequence[str | None]) -> TaskRewrite:
        rewrite = TaskRewrite()
        now = time.time()
        for task in map(_parse_crashed, bodies):
            if task is not None and (uid := write(rewrite, task, now)) is not None:
                rewrite.result.append(uid)
        return rewrite

    return await backend.rewrite_tasks(uids, plan, attempts=_WATCH_ATTEMPTS)


async def _apply(backend: KartonBackend, tasks: list[Task], write: Writer) -> list[str]:
    uids = list(dict.fromkeys(t.uid for t in tasks))
    done: list[str] = []
    for start in range(0, len(uids), _CHUNK):
        done += await _commit_chunk(backend, uids[start : start + _CHUNK], write)
    return done


async def restart_crashed(
    backend: KartonBackend,
    *,
    uids: Sequence[str] | None = None,
    identity: str | None = None,
    all: bool = False,
) -> list[str]:
    """Restart Crashed tasks as karton-dashboard does; return the new tasks' uids.

    Args:
        backend: Redis access.
        uids: these tasks (full ``{root}:uuid`` uids or bare task uids).
        identity: every Crashed task whose receiver is ``identity``.
        all: every Crashed task.

    Raises:
        ValueError: not exactly one of ``uids``, ``identity`` and ``all`` was given.
        UnknownTaskError: a uid names no task, or a task that is not Crashed (nothing
            is changed then).
        BackendError: Redis failed, or the tasks kept changing during the transaction.
    """
    tasks = await _select(backend, uids, identity, all, "restart")
    return await _apply(backend, tasks, _restart_one)


async def cancel_crashed(
    backend: KartonBackend,
    *,
    uids: Sequence[str] | None = None,
    identity: str | None = None,
    all: bool = False,
) -> list[str]:
    """Mark Crashed tasks Finished (karton-dashboard's cancel); return their uids.

    Selection as in :func:`restart_crashed`.

    Raises:
        ValueError: not exactly one of ``uids``, ``identity`` and ``all`` was given.
        UnknownTaskError: a uid names no task, or a task that is not Crashed (nothing
            is changed then).
        BackendError: Redis failed, or the tasks kept changing during the transaction.
    """
    tasks = await _select(backend, uids, identity, all, "cancel")
    return await _apply(backend, tasks, _cancel_one)


def last_error_line(task: Task) -> str:
    """Return the last non-empty line of a task's error (its exception message)."""
    for chunk in reversed(task.error or []):
        for line in reversed(str(chunk).splitlines()):
            if line.strip():
                return line.strip()
    return ""
