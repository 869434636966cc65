"""Garbage collector: Karton's task and resource lifecycle rules, off the routing path.

Task rules (Karton's, see docs/architecture.md), applied to one SCAN pass:

* the receiver is a non-persistent bind with no consumer online → delete (and the bind
  and its queues go first);
* Declared, not in ``karton.tasks`` and older than ``task_dispatched_timeout`` → delete;
* Started and older than ``task_started_timeout`` → delete, or mark Crashed when
  ``crash_started_tasks_on_timeout`` is on;
* Finished → delete; Crashed older than ``task_crashed_timeout`` → delete;
* asynckarton's addition: Spawned, older than ``task_spawned_timeout`` and in no queue,
  lease or retry schedule (its consumer died between popping and leasing it) → requeue.
* asynckarton's addition: a uid in ``asynckarton.dead:<identity>`` whose task is gone or
  no longer Crashed (restarted or cancelled by karton-dashboard, collected by
  karton-system or by this GC) is dropped from the list; each pass checks at most
  ``DEAD_LETTER_CHECKS`` uids per list, resuming where the previous pass stopped.

Resources: every object version in the default bucket (and in the buckets listed in
``[system] gc_extra_buckets``) not referenced by a surviving task (or by the outputs a
result-cache entry holds) is deleted, listing
first and scanning tasks second, as Karton does.  A Redis lock
keeps two collectors from running at once.

Every Redis step is a :class:`~asynckarton.backend.KartonBackend` method; :meth:`collect`
raises Redis failures as ``BackendError``, and :meth:`run` logs them and tries again at
the next interval.
"""

from __future__ import annotations

import contextlib
import logging
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field

import anyio

from .._errors import InvalidTaskError
from .._services import _metrics
from .._settings._options import SystemSettings
from .._wire._task import Task, TaskState
from ..backend import Bind, KartonBackend
from ..backend._cache import cached_bodies, scan_cached_outputs
from ..backend._guard import TRANSIENT_ERRORS
from ..storage import Storage
from ..storage._gc import collect_orphans

__all__ = ["GCReport", "GarbageCollector"]

STARTED_TIMEOUT_ERROR = (
    "This task was STARTED too long (TASK_STARTED_TIMEOUT), so status was changes to CRASHED."
)
#: The GC lock expires this long after its holder stops refreshing it (e.g. SIGKILL);
#: the holder refreshes it every third of that while it collects.
LOCK_TTL = 15.0
#: Dead-letter uids checked per identity and pass (the window moves on every pass).
DEAD_LETTER_CHECKS = 1000


class _UnreadableTask(Exception):
    """A task body could not be parsed: its resources are unknown, so delete nothing."""


@dataclass
class GCReport:
    """What one collection did."""

    deleted_tasks: int = 0
    crashed_tasks: int = 0
    requeued_orphans: int = 0
    removed_binds: list[str] = field(default_factory=list)
    deleted_objects: int = 0
    pruned_dead_letters: int = 0


class GarbageCollector:
    """Runs Karton's GC rules every ``interval`` seconds.

    Args:
        backend, storage: where tasks and resources live.
        bucket: the default bucket (the only one Karton collects).
        settings: a ``SystemSettings`` (timeouts and switches of ``[system]``).
        log: the system service's logger.
    """

    def __init__(
        self,
        backend: KartonBackend,
        storage: Storage,
        bucket: str,
        settings: SystemSettings,
        log: logging.Logger,
        *,
        extra_buckets: tuple[str, ...] = (),
    ) -> None:
        self.backend = backend
        self.storage = storage
        self.bucket = bucket
        self.extra_buckets = extra_buckets
        self._queued: dict[str, set[str]] = {}  # receiver -> uids in its queues (this pass)
        self._dead_cursor: dict[str, int] = {}  # identity -> where the next check starts
        self.settings = settings
        self.log = log

    async def run(self) -> None:
        """Collect every ``gc_interval`` seconds (the first after one interval, as Karton)."""
        while True:
            await anyio.sleep(float(self.settings.gc_interval))
            try:
                began = time.perf_counter()  # metrics
                report = await self.collect()
                await _metrics.gc_pass(self.backend, report, time.perf_counter() - began)  # metrics
            except TRANSIENT_ERRORS as exc:
                self.log.warning("GC skipped, Redis unavailable: %s", exc)
            except Exception:  # a GC bug must not take the router (same task group) down
                self.log.exception("GC run failed; next run in %ss", self.settings.gc_interval)

    async def collect(self) -> GCReport | None:
        """Run one collection under the GC lock; None if another collector holds it.

        Raises:
            BackendError: Redis failed (``BackendUnavailableError`` when it is down).
            StorageError: S3 failed; nothing was deleted after the failure, and the next
                pass starts over.
        """
        token = uuid.uuid4().hex  # time.time() is not unique across hosts
        if not await self.backend.take_gc_lock(token, LOCK_TTL):
            return None
        try:
            failure: Exception | None = None
            async with anyio.create_task_group() as group:
                group.start_soon(self._keep_lock, token)
                try:
                    report = await self.collect_tasks()
                    for bucket in (self.bucket, *self.extra_buckets):
                        report.deleted_objects += await self._collect_resources(bucket)
                except Exception as exc:  # noqa: BLE001 - raised as itself below
                    failure = exc  # (not wrapped in an ExceptionGroup by the task group)
                group.cancel_scope.cancel()
            if failure is not None:
                raise failure
            return report
        finally:
            with anyio.CancelScope(shield=True), contextlib.suppress(*TRANSIENT_ERRORS):
                await self.backend.release_gc_lock(token)

    async def _keep_lock(self, token: str) -> None:
        while True:
            await anyio.sleep(LOCK_TTL / 3)
            with contextlib.suppress(*TRANSIENT_ERRORS):
                await self.backend.extend_gc_lock(token, LOCK_TTL)

    async def collect_tasks(self) -> GCReport:
        """Apply the task rules to every task once."""
        report = GCReport()
        to_clear = await self._drop_offline_binds(report)
        unrouted = await self.backend.unrouted_uids()
        self._queued = {}
        collected: Counter[str] = Counter()
        async for batch in self.backend.scan_tasks():
            doomed: list[str] = []
            for uid, body in batch:
                try:
                    task = Task.unserialize(body, parse_resources=False)
                except InvalidTaskError as exc:
                    self.log.error("GC: task %s is unreadable and is kept: %s", uid, exc)
                    continue
                if await self._verdict(task, body, unrouted, to_clear, report):
                    doomed.append(uid)
                    collected[task.receiver or "unknown"] += 1
            await self.backend.delete_tasks(doomed)
            report.deleted_tasks += len(doomed)
            await anyio.lowlevel.checkpoint()
        await self.backend.increment_metrics("garbage-collected", collected)
        report.pruned_dead_letters = await self.prune_dead_letters()
        return report

    async def prune_dead_letters(self) -> int:
        """Drop dead-letter uids whose task left the Crashed state; return how many."""
        removed = 0
        identities = await self.backend.dead_letter_identities()
        for identity in identities:
            start = self._dead_cursor.get(identity, 0)
            dropped, length = await self.backend.prune_dead_letters(
                identity, start, DEAD_LETTER_CHECKS
            )
            end = start + DEAD_LETTER_CHECKS
            self._dead_cursor[identity] = end - dropped if end < length else 0
            removed += dropped
        for gone in self._dead_cursor.keys() - set(identities):
            del self._dead_cursor[gone]
        if removed:
            self.log.info("GC dropped %d dead letter(s) of tasks no longer crashed", removed)
        return removed

    async def _verdict(
        self, task: Task, body: str, unrouted: set[str], to_clear: set[str], report: GCReport
    ) -> bool:
        """Return True when ``task`` should be deleted (may crash or requeue it instead)."""
        s = self.settings
        age = time.time() - task.last_update
        if task.receiver in to_clear:
            return True
        if task.status is TaskState.FINISHED:
            return True
        if task.status is TaskState.DECLARED:
            return task.uid not in unrouted and age > float(s.task_dispatched_timeout)
        if task.status is TaskState.CRASHED:
            return age > float(s.task_crashed_timeout)
        if task.status is TaskState.STARTED and age > s.task_started_timeout:
            if not s.crash_started_tasks_on_timeout:
                return True
            task.status, task.error = TaskState.CRASHED, [STARTED_TIMEOUT_ERROR]
            task.last_update = time.time()
            await self.backend.crash_task(task)
            report.crashed_tasks += 1
        elif (
            task.status is TaskState.SPAWNED
            and age > s.task_spawned_timeout
            and not await self._queued_now(task)
            and await self.backend.requeue_orphan(task, body)
        ):
            self.log.warning("Requeued orphaned task %s for %s", task.uid, task.receiver)
            report.requeued_orphans += 1
        return False

    async def _queued_now(self, task: Task) -> bool:
        """Whether ``task`` sat in its receiver's queues when this pass first looked.

        One LRANGE per receiver and pass instead of REQUEUE_ORPHAN's LPOS per Spawned task,
        which made a backlog of N old tasks cost O(N^2) Redis time (30k queued: 36 s per
        pass, 24 s of it inside Redis).  A stale "queued" only delays an orphan to the next
        pass; a stale "not queued" is re-checked atomically by REQUEUE_ORPHAN.
        """
        receiver = task.receiver
        if receiver is None:
            return True  # requeue_orphan refuses it anyway
        queued = self._queued.get(receiver)
        if queued is None:
            queued = self._queued[receiver] = await self.backend.queued_uids(receiver)
        return task.uid in queued

    async def _drop_offline_binds(self, report: GCReport) -> set[str]:
        online = await self.backend.online_identities()
        to_clear: set[str] = set()
        for identity, raw in (await self.backend.get_binds_raw()).items():
            try:
                bind = Bind.from_json(identity, raw)
            except (ValueError, KeyError, TypeError):
                continue
            if not bind.persistent and identity not in online:
                await self.backend.unregister_bind(identity)
                self.log.info("Non-persistent bind %s has no consumer online: removed", identity)
                to_clear.add(identity)
                report.removed_binds.append(identity)
        return to_clear

    async def _collect_resources(self, bucket: str) -> int:
        async def referenced() -> set[str]:
            found: set[str] = set()
            async for batch in self.backend.scan_tasks():
                for _, body in batch:
                    try:
                        task = Task.unserialize(body)
                    except InvalidTaskError as exc:
                        raise _UnreadableTask(str(exc)) from None
                    for resource in task.iterate_resources():
                        if (resource.bucket or self.bucket) == bucket:
                            found.add(resource.uid)
                await anyio.lowlevel.checkpoint()
            async for documents in scan_cached_outputs(self.backend):  # result cache
                for body in cached_bodies(documents):
                    try:
                        task = Task.unserialize(body)
                    except InvalidTaskError as exc:
                        raise _UnreadableTask(str(exc)) from None
                    for resource in task.iterate_resources():
                        if (resource.bucket or self.bucket) == bucket:
                            found.add(resource.uid)
            return found

        try:
            deleted = await collect_orphans(
                self.storage,
                bucket,
                referenced,
                delete_null_versions=bool(self.settings.enable_null_version_deletion),
            )
        except _UnreadableTask as exc:
            self.log.warning("Resource GC skipped: a task is unreadable (%s)", exc)
            return 0
        if deleted:
            self.log.info("GC removed %d unreferenced object(s) from %s", deleted, bucket)
        return deleted
