"""Garbage collector: Karton's task and resource lifecycle rules, off the routing path.

Task rules (Karton's, see docs/architecture.md), applied to one SCAN pass:

* the receiver is a non-persistent bind with no consumer online → delete (and the bind
  and its queues go first);
* Declared, in neither ``karton.tasks`` nor a router's journal and older than
  ``task_dispatched_timeout`` → delete;
* Started and older than ``task_started_timeout`` → delete, or mark Crashed when
  ``crash_started_tasks_on_timeout`` is on;
* Finished → delete; Crashed older than ``task_crashed_timeout`` → delete;
* asynckarton's addition: Spawned, older than ``task_spawned_timeout`` and in no queue,
  lease or retry schedule (its consumer died between popping and leasing it) → requeue.
* asynckarton's addition: a uid in ``asynckarton.dead:<identity>`` whose task is gone or
  no longer Crashed (restarted or cancelled by karton-dashboard, collected by
  karton-system or by this GC) is dropped from the list; each pass checks at most
  ``DEAD_LETTER_CHECKS`` uids per list, resuming where the previous pass stopped.

At a million tasks (docs/architecture.md, "At a million tasks"): the pass holds one
batch of bodies at a time, decides the list-dependent rules (the Declared and Spawned
ones) for a bounded sample of candidates after the scan, gives way to a router with a
backlog (``busy_share``), and ends by publishing the surviving tasks' counts by
receiver, priority and status, which ``status`` and the metrics serve.

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
import random
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import anyio

from .._errors import InvalidTaskError
from .._services import _metrics
from .._settings._options import SystemSettings
from .._wire import _document
from .._wire._task import Task, TaskState
from ..backend import Bind, KartonBackend
from ..backend._cache import cached_bodies, scan_cached_outputs
from ..backend._guard import TRANSIENT_ERRORS
from ..backend._inspect import StatusCounts, publish_task_counts
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
#: Old Declared (and, separately, old Spawned) tasks a pass decides on at most: a random
#: sample of them when there are more, so memory stays bounded and every one is reached
#: over the passes.
CANDIDATES = 10_000
#: Share of wall time a pass may use while routers have a backlog (see ``scan_tasks``).
BUSY_SHARE = 0.02


class _Sample:
    """A uniform sample of at most ``size`` items among those offered (reservoir)."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.items: dict[str, tuple[dict[str, Any], str]] = {}
        self._seen = 0
        self._keys: list[str] = []

    def clear(self) -> None:
        self.items.clear()
        self._keys.clear()
        self._seen = 0

    def offer(self, uid: str, value: tuple[dict[str, Any], str]) -> None:
        self._seen += 1
        if len(self._keys) < self.size:
            self._keys.append(uid)
            self.items[uid] = value
            return
        slot = random.randrange(self._seen)
        if slot < self.size:
            del self.items[self._keys[slot]]
            self._keys[slot] = uid
            self.items[uid] = value


def _receiver(doc: dict[str, Any]) -> str | None:
    headers = doc.get("headers") or {}
    value = headers.get("receiver") if isinstance(headers, dict) else None
    return value if isinstance(value, str) else None


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
        extra_buckets: other buckets to collect (``[system] gc_extra_buckets``).
        busy_share: while routers have a backlog, the share of wall time the pass may
            use (it sleeps between batches for the rest); None: never pace.
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
        busy_share: float | None = BUSY_SHARE,
    ) -> None:
        self.backend = backend
        self.storage = storage
        self.bucket = bucket
        self.extra_buckets = extra_buckets
        #: Old Declared / Spawned tasks set aside by this pass (see ``collect_tasks``).
        self._declared = _Sample(CANDIDATES)
        self._spawned = _Sample(CANDIDATES)
        self.busy_share = busy_share
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
        """Apply the task rules to every task once, holding one batch at a time.

        The pass streams the tasks (SCAN + MGET, :data:`~asynckarton.backend._core.CHUNK`
        at a time) and parses only the fields the rules need.  Rules that depend on a
        list (a Declared task still in ``karton.tasks``, a Spawned one still queued) are
        decided after the scan for at most :data:`CANDIDATES` tasks, sampled evenly, by
        reading the lists in slices; the rest wait for a later pass.  While routers have
        a backlog the pass paces itself (``busy_share``).  At the end it publishes the
        counts of the surviving tasks by receiver, priority and status.
        """
        report = GCReport()
        began = time.time()
        to_clear = await self._drop_offline_binds(report)
        self._declared.clear()
        self._spawned.clear()
        counts: Counter[tuple[str, str, str]] = Counter()
        collected: Counter[str] = Counter()
        async for batch in self.backend.scan_tasks(busy_share=self.busy_share):
            doomed: list[str] = []
            for index, (uid, body) in enumerate(batch):
                if index % 100 == 99:  # a batch is ~10 ms of parsing: let the router in
                    await anyio.lowlevel.checkpoint()
                try:
                    doc = _document.parse(body)
                except InvalidTaskError as exc:
                    self.log.error("GC: task %s is unreadable and is kept: %s", uid, exc)
                    counts["", "", "Unreadable"] += 1
                    continue
                status = await self._verdict(uid, doc, body, to_clear, report)
                receiver = _receiver(doc)
                if status is None:
                    doomed.append(uid)
                    collected[receiver or "unknown"] += 1
                else:
                    counts[receiver or "", str(doc.get("priority") or "normal"), status] += 1
            await self.backend.delete_tasks(doomed)
            report.deleted_tasks += len(doomed)
            await anyio.lowlevel.checkpoint()
        await self._collect_declared(report, counts, collected)
        await self._requeue_orphans(report)
        await self.backend.increment_metrics("garbage-collected", collected)
        report.pruned_dead_letters = await self.prune_dead_letters()
        await publish_task_counts(
            self.backend, StatusCounts(counts, time.time(), time.time() - began)
        )
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
        self, uid: str, doc: dict[str, Any], body: str, to_clear: set[str], report: GCReport
    ) -> str | None:
        """The status ``uid`` keeps, or None to delete it (may crash it instead).

        Declared and Spawned tasks that only a list can decide on are set aside
        (:meth:`_collect_declared`, :meth:`_requeue_orphans`) and kept for now.
        """
        s = self.settings
        status = str(doc["status"])
        age = time.time() - float(doc.get("last_update") or 0)
        if _receiver(doc) in to_clear or status == TaskState.FINISHED.value:
            return None
        if status == TaskState.DECLARED.value:
            if age > float(s.task_dispatched_timeout):
                self._declared.offer(uid, (doc, ""))
        elif status == TaskState.CRASHED.value:
            return None if age > float(s.task_crashed_timeout) else status
        elif status == TaskState.STARTED.value and age > s.task_started_timeout:
            if not s.crash_started_tasks_on_timeout:
                return None
            task = Task.from_dict(doc, parse_resources=False)
            task.status, task.error = TaskState.CRASHED, [STARTED_TIMEOUT_ERROR]
            task.last_update = time.time()
            await self.backend.crash_task(task)
            report.crashed_tasks += 1
            return TaskState.CRASHED.value
        elif (
            status == TaskState.SPAWNED.value
            and age > s.task_spawned_timeout
            and _receiver(doc) is not None
        ):
            self._spawned.offer(uid, (doc, body))
        return status

    async def _collect_declared(
        self,
        report: GCReport,
        counts: Counter[tuple[str, str, str]],
        collected: Counter[str],
    ) -> None:
        """Delete the old Declared tasks set aside that wait in no routing list."""
        candidates = self._declared.items
        if not candidates:
            return
        waiting = await self.backend.unrouted_among(candidates)
        doomed = [uid for uid in candidates if uid not in waiting]
        for uid in doomed:
            doc = candidates[uid][0]
            receiver = _receiver(doc)
            counts[receiver or "", str(doc.get("priority") or "normal"), "Declared"] -= 1
            collected[receiver or "unknown"] += 1
        for key in [k for k, n in counts.items() if n <= 0]:
            del counts[key]
        await self.backend.delete_tasks(doomed)
        report.deleted_tasks += len(doomed)

    async def _requeue_orphans(self, report: GCReport) -> None:
        """Requeue the old Spawned tasks set aside that sit in no queue of their receiver.

        One slice-wise read of each receiver's queues instead of REQUEUE_ORPHAN's LPOS per
        Spawned task (30k queued: 36 s per pass) or a copy of every queue in memory (1M
        queued: hundreds of MB).  A task missed as "queued" waits for the next pass; one
        wrongly seen as "not queued" is re-checked atomically by REQUEUE_ORPHAN.
        """
        by_receiver: dict[str, list[str]] = {}
        candidates = self._spawned.items
        for uid, (doc, _body) in candidates.items():
            by_receiver.setdefault(str(_receiver(doc)), []).append(uid)
        for receiver, uids in by_receiver.items():
            queued = await self.backend.queued_among(receiver, uids)
            for uid in uids:
                if uid in queued:
                    continue
                doc, body = candidates[uid]
                task = Task.from_dict(doc, parse_resources=False)
                if await self.backend.requeue_orphan(task, body):
                    self.log.warning("Requeued orphaned task %s for %s", uid, receiver)
                    report.requeued_orphans += 1

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
            async for batch in self.backend.scan_tasks(busy_share=self.busy_share):
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
