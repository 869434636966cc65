"""Producer: declare tasks, upload their resources, hand them to the router.

Order per task (Karton's, kept because its GC depends on it; docs/guarantees.md): the task key is
written (Declared) *before* its resources are uploaded, so a GC listing objects never
sees an upload without a task referencing it, and the uid reaches ``karton.tasks`` only
after every upload finished.  Tasks without local resources skip the first write: one
pipeline (SET + RPUSH + HINCRBY) per batch is the whole cost.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from typing import ClassVar

import anyio

from .._errors import BackendFullError, InvalidTaskError
from .._settings._builtin import BUILTIN
from .._wire._resource import LocalResource
from .._wire._task import Task, get_current_task
from ._result_cache import new_workflow, record_outputs
from ._service import ServiceBase

__all__ = ["Producer"]

#: Resource uploads a producer runs at once: streamed ones (files, large contents)...
UPLOAD_CONCURRENCY = 8
#: ...and small in-memory contents (one PUT each, bytes already in memory), whose rate is
#: bound by the S3 server's latency: 8 at once held resources at ~250/s against SeaweedFS.
SMALL_UPLOAD_CONCURRENCY = 32
SMALL_UPLOAD = 1 << 20


class Producer(ServiceBase):
    """Sends tasks.  ``async with Producer(config, identity=...) as p: await p.send_task(t)``.

    A resource is deduplicated (stored under its sha256, uploaded only if no object with
    that key exists yet) when it was created with ``deduplicate=True``; one created with
    ``deduplicate=False`` never is; one that left it unset (None) follows
    ``[asynckarton] deduplicate`` (default off).  The resource's own choice wins.

    Args:
        config: configuration (default: Karton's layered loading).
        identity: the producer's identity, written to each task's ``origin`` header
            (optional, as in Karton: ``asynckarton.producer`` when none is set).
    """

    default_identity: ClassVar[str] = "asynckarton.producer"

    with_service_info = False

    async def send_task(self, task: Task) -> bool:
        """Send one task; returns True like Karton's (there is no routing result)."""
        await self.send_tasks([task])
        return True

    async def send_tasks(
        self, tasks: Iterable[Task], *, force_new_workflow: bool | None = None
    ) -> None:
        """Send a batch of tasks in one Redis round trip (plus their resource uploads).

        ``[karton] parallel_batch_size`` N > 0 splits the batch into chunks of N tasks,
        each declared, uploaded and queued on its own (0: the whole call is one chunk).
        ``force_new_workflow`` (default ``[karton] force_new_workflow``): each task sent
        from inside a handler starts a new analysis (its own ``root_uid``) instead of
        joining the handled task's; ``parent_uid`` still names the handled task, and the
        payload ``asynckarton.parent_analysis`` holds ``{"root_uid", "uid"}`` of it.

        Raises:
            InvalidTaskError: a task's payload is not JSON-serialisable; nothing of the
                batch was written to Redis or uploaded.
            BackendFullError: Redis is at ``maxmemory``; nothing of the batch was queued
                (declared keys are deleted, uploaded objects are left to the GC).
            StorageError: a resource upload failed (the first failure, as itself; the
                other uploads are cancelled); nothing of the batch was queued and its
                declared task keys are deleted.
        """
        batch = list(tasks)
        if not batch:
            return
        if self._runtime is not None:
            self._runtime.warn_if_private(f"Producer {self.identity!r}")
        size = int(self.option(BUILTIN["karton"]["parallel_batch_size"]))
        if force_new_workflow is None:
            force_new_workflow = bool(self.option(BUILTIN["karton"]["force_new_workflow"]))
        parent = get_current_task()
        step = size or len(batch)
        for start in range(0, len(batch), step):
            await self._send_chunk(batch[start : start + step], parent, force_new_workflow)

    async def _send_chunk(
        self, batch: list[Task], parent: Task | None, force_new_workflow: bool
    ) -> None:
        now = time.time()
        for task in batch:
            self._prepare(task, parent, now)
            if force_new_workflow and parent is not None:
                new_workflow(task, parent)
        bodies = self._serialize(batch)  # fail before anything is written
        local = [
            (task, res)
            for task in batch
            for res in task.iterate_resources()
            if isinstance(res, LocalResource)
        ]
        if local:
            await self._declare_and_upload(batch, local)
            bodies = self._serialize(batch)  # now with sha256 and sizes
        try:
            await self.backend.enqueue_unrouted(bodies, self.identity)
        except BackendFullError:
            if local:  # refused as a whole: drop the Declared keys; the objects are orphans
                with anyio.CancelScope(shield=True):
                    await self.backend.delete_tasks([t.uid for t in batch])
            raise
        record_outputs(parent, bodies.values())  # the result cache's capture, if on

    def _prepare(self, task: Task, parent: Task | None, now: float) -> None:
        if parent is not None:
            task.set_task_parent(parent)
            task.merge_persistent_payload(parent)
            task.merge_persistent_headers(parent)
            task.priority = parent.priority
        task.last_update = now
        task.headers["origin"] = self.identity

    @staticmethod
    def _serialize(batch: Sequence[Task]) -> dict[str, str]:
        bodies: dict[str, str] = {}
        for task in batch:
            try:
                bodies[task.uid] = task.serialize()
            except InvalidTaskError as exc:
                raise InvalidTaskError(str(exc), uid=task.uid) from None
        return bodies

    async def _declare_and_upload(
        self, batch: Sequence[Task], local: Sequence[tuple[Task, LocalResource]]
    ) -> None:
        bucket = self.runtime.bucket
        default = bool(self.config.getboolean("asynckarton", "deduplicate", False))
        uploads: list[tuple[LocalResource, bool]] = []
        for _, resource in local:
            if resource.bucket is None:
                resource.bucket = bucket
            # The resource's own choice wins; None leaves it to the configured default.
            dedup = default if resource.deduplicate is None else resource.deduplicate
            if dedup:  # the uid becomes the sha256: declare the final object key
                await resource.prepare(deduplicate=True)
            uploads.append((resource, dedup))
        await self.backend.declare_tasks(batch)  # Declared, before any upload (GC safety)
        try:
            limiter = anyio.CapacityLimiter(UPLOAD_CONCURRENCY)
            small = anyio.CapacityLimiter(SMALL_UPLOAD_CONCURRENCY)
            failures: list[Exception] = []

            async def upload(resource: LocalResource, dedup: bool) -> None:
                in_memory = resource.size is not None and resource.size <= SMALL_UPLOAD
                try:
                    async with small if in_memory else limiter:
                        await resource.upload(self.storage, deduplicate=dedup)
                except Exception as exc:  # noqa: BLE001 - re-raised after the group
                    failures.append(exc)  # the first failure stops the other uploads
                    group.cancel_scope.cancel()

            async with anyio.create_task_group() as group:
                for resource, dedup in uploads:
                    group.start_soon(upload, resource, dedup)
            if failures:  # raised as itself, not wrapped in an exception group
                raise failures[0]
        except BaseException:
            # Nothing half-written: the declared keys go, unreferenced objects are
            # orphans the resource GC removes.
            with anyio.CancelScope(shield=True):
                await self.backend.delete_tasks([t.uid for t in batch])
            raise
