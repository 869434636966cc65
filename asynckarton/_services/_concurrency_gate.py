"""The consumer-side gate of concurrency control: admission and release of slots.

Policies, scopes and digests are in :mod:`._concurrency`; the Redis side (slots, parking,
the Lua scripts) in :mod:`asynckarton.backend._concurrency`.
"""

from __future__ import annotations

import collections
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import anyio

from .._errors import ConcurrencyControlled, ConfigError
from .._wire._task import Task, TaskState
from ..backend import KartonBackend
from ..backend._concurrency import (
    POLICY_STALE_AFTER,
    Admission,
    Outcome,
    SlotStore,
    queue_key,
    task_key,
)
from ..backend._guard import TRANSIENT_ERRORS, until_done
from ._concurrency import (
    ConcurrencyControlType,
    ConcurrencyPolicy,
    arguments_digest,
    differing_fields,
    task_fields,
    task_scope,
)

__all__ = ["ConcurrencyGate"]

RELEASE_LINGER = (
    0.0  # seconds a release waits for company (releases made during a write share the next)
)
#: Tasks of one scope that may wait in a process behind a local holder (0: park them all).
#: Off: measured with the keys benchmark, tasks waiting inside runners made the consumer
#: slower (its dispatch treats them as slow handlers) than parking them in Redis.
LOCAL_WAITERS_PER_SCOPE = 0


@dataclass(slots=True)
class _Held:
    digest: str
    pending: str  # registration digest to clear, or ""


@dataclass(slots=True, eq=False)
class _Waiter:
    """A fetched task queued in this process behind a local holder of its slot."""

    task: Task
    digest: str
    info: str
    done: anyio.Event = field(default_factory=anyio.Event)
    transferred: bool = False  # the holder's slot was handed to this task in Redis
    abandoned: bool = False  # handed back (shutdown) while queued or in transfer


@dataclass(slots=True)
class ConcurrencyGate:
    """Admits fetched tasks through their slots and releases the slots afterwards.

    With ``reroute_on_concurrency_control`` and ``LOCAL_WAITERS_PER_SCOPE`` > 0, a
    fetched task whose slot is held by a task of this same process waits here instead
    of being parked in Redis (up to that many per scope and ``local_cap`` in all; the
    others are parked): when the holder ends, its release hands the slot to the waiter
    in the same script call (the holder's uid must still hold it), and the waiter runs
    only once Redis confirmed.  It saves the park/unpark round trips but holds a runner
    per waiter, which measured slower, so it is off by default.  Either way a task whose
    scope its own process holds is parked without looking at the holder's lease: the
    holder may have written its final state before its release.

    Args:
        backend: returns the service's backend (it exists only inside ``async with``).
        identity: the consumer identity (the pynenc "task").
        policy: the resolved policy.
        log: the consumer's logger.
        crash: records a task as Crashed (the consumer's completion path).
        forget: stops tracking a task that was parked (its lease is gone).
        instance: this replica's id (its published policy is filed under it).
        local_cap: most tasks waiting in this process at once.
    """

    backend: Callable[[], KartonBackend]
    identity: str
    policy: ConcurrencyPolicy
    log: logging.Logger
    crash: Callable[[Task], None]
    instance: str
    forget: Callable[[Task], None] = lambda task: None
    local_cap: int = 0
    _store: SlotStore | None = None
    _held: dict[str, _Held] = field(default_factory=dict)  # uid -> slot it holds
    _local: dict[str, str] = field(default_factory=dict)  # digest -> local holder uid
    _infos: dict[str, str] = field(default_factory=dict)  # digest -> local holder's info
    _queues: dict[str, collections.deque[_Waiter]] = field(default_factory=dict)
    _waiting: dict[str, _Waiter] = field(default_factory=dict)  # uid -> its waiter
    _releases: list[tuple[str, str]] = field(default_factory=list)  # (uid, digest) to write
    _wake: anyio.Event = field(default_factory=anyio.Event)
    _published: float = float("-inf")  # monotonic time the policy was last filed

    @classmethod
    def for_consumer(cls, consumer: Any) -> ConcurrencyGate:
        """The gate of a :class:`~asynckarton.Consumer`: class attributes under ``[karton]``."""
        defaults = {
            name: getattr(type(consumer), name)
            for name in (
                "running_concurrency",
                "registration_concurrency",
                "key_arguments",
                "on_diff_non_key_args_raise",
                "reroute_on_concurrency_control",
            )
        }
        return cls(
            backend=lambda: consumer.backend,
            identity=consumer.identity,
            policy=ConcurrencyPolicy.resolve(consumer.config, defaults, consumer.config_identity),
            log=consumer.log,
            crash=lambda task: consumer._completer_add(task, crashed=True),
            forget=lambda task: consumer._leased.pop(task.uid, None),
            instance=consumer.instance_id,
            local_cap=max(1, (consumer.concurrency_limit or 1) // 2),
        )

    @property
    def running(self) -> bool:
        """Whether running concurrency is on (admission costs a script call)."""
        return self.policy.running_concurrency is not ConcurrencyControlType.DISABLED

    def _slots(self) -> SlotStore:
        store = self._store
        if store is None or store.backend is not self.backend():
            store = self._store = SlotStore(self.backend(), self.identity)
        return store

    async def start(self, tasks: list[Task]) -> list[Task]:
        """Write fetched tasks as Started and admit them (see :meth:`admit`).

        With running concurrency both go in one round trip (the Started bodies, then the
        slot script); without it this is the plain batch write.
        """
        if not self.running:
            await self.backend().set_tasks(tasks)
            return await self.admit(tasks)
        return await self.admit(tasks, start=True)

    async def admit(self, tasks: list[Task], *, start: bool = False) -> list[Task]:
        """Return the tasks this process keeps; record the others (Crashed or parked).

        Kept tasks either hold their slot or wait in this process behind a local holder
        (:meth:`turn` tells a runner when).  One script call takes the slots of the rest
        (reporting who holds them, parking refused ones when rerouting); a second one is
        needed only when a task that others were to wait behind was refused.  Fetching a
        task also clears the registration entry that kept equal copies from being queued.
        """
        policy = self.policy
        if not tasks or not policy.enabled:
            return tasks
        registration = policy.registration_concurrency
        if not self.running:
            pairs = [(t.uid, task_scope(t, registration, policy.key_arguments)) for t in tasks]
            await self._slots().forget_pending(pairs)
            return tasks
        mode = policy.running_concurrency
        want_info = (
            policy.on_diff_non_key_args_raise and mode is not ConcurrencyControlType.ARGUMENTS
        )
        requests: dict[str, tuple[Task, Admission]] = {}
        for task in tasks:
            info = ""
            if want_info:
                fields = task_fields(task)
                info = arguments_digest(fields) + " " + json.dumps(fields, sort_keys=True)
            pending = ""
            if registration is not ConcurrencyControlType.DISABLED:
                pending = task_scope(task, registration, policy.key_arguments)
            digest = task_scope(task, mode, policy.key_arguments)
            queue = queue_key(task.priority.value, self.identity)
            requests[task.uid] = (task, Admission(task.uid, digest, info, queue, pending))
        kept: set[str] = set()
        todo = list(requests.values())
        bodies = {task_key(t.uid): t.serialize_state() for t in tasks} if start else None
        while todo:
            asked: list[tuple[Task, Admission]] = []
            later: list[tuple[Task, Admission]] = []
            first: dict[str, str] = {}  # digest -> uid asked for it in this round
            behind: collections.Counter[str] = collections.Counter()
            for task, request in todo:
                digest = request.digest
                if digest in first and self._may_wait(digest, len(later), behind[digest]):
                    later.append((task, request))  # waits behind ``first`` if it runs
                    behind[digest] += 1
                elif digest in self._local and self._may_wait(digest):
                    self._queue(task, request)
                    kept.add(task.uid)
                    asked.append((task, replace(request, digest="")))  # clears pending only
                elif digest in self._local:  # no room to wait here: parked behind ours
                    asked.append((task, replace(request, strict=True)))
                else:
                    first.setdefault(digest, task.uid)
                    asked.append((task, request))
            results = await self._slots().acquire(
                [request for _, request in asked],
                reroute=policy.reroute_on_concurrency_control,
                on_diff=want_info,
                bodies=bodies,
            )
            bodies = None  # written with the first round
            for (task, request), result in zip(asked, results, strict=True):
                if request.digest and self._settle(task, request, result):
                    kept.add(task.uid)
            todo = []
            for task, request in later:
                if request.digest in self._local:
                    self._queue(task, request)
                    kept.add(task.uid)
                else:  # the one it was to wait behind was refused: ask on its own
                    todo.append((task, request))
        return [task for task in tasks if task.uid in kept]

    def _may_wait(self, digest: str, tentative: int = 0, same: int = 0) -> bool:
        """Whether one more task may wait here for ``digest`` (``tentative`` not queued yet)."""
        if not self.policy.reroute_on_concurrency_control:
            return False
        if len(self._waiting) + tentative >= self.local_cap:
            return False
        return len(self._queues.get(digest, ())) + same < LOCAL_WAITERS_PER_SCOPE

    def _queue(self, task: Task, request: Admission) -> None:
        """Queue ``task`` behind the local holder of its slot (or refuse it: on_diff)."""
        held = self._infos.get(request.digest, "")
        if request.info and held and request.info.split(" ", 1)[0] != held.split(" ", 1)[0]:
            self._differs(task, request, Outcome("differs", self._local[request.digest], held))
            return
        waiter = _Waiter(task, request.digest, request.info)
        self._queues.setdefault(request.digest, collections.deque()).append(waiter)
        self._waiting[task.uid] = waiter

    def _settle(self, task: Task, request: Admission, result: Outcome) -> bool:
        """Apply one ACQUIRE outcome; True if the task runs (holds its slot)."""
        mode = self.policy.running_concurrency
        if result.outcome == "run":
            self._hold(task.uid, request.digest, request.info)
            return True
        if result.outcome == "parked":
            self.log.debug(
                "Task %s parked: %s concurrency held by %s; it runs once that one ends",
                task.uid, mode.value, result.holder,
            )  # fmt: skip
        elif result.outcome == "differs":
            self._differs(task, request, result)
        else:
            self._refuse(
                task,
                f"running_concurrency={mode.value}: task {result.holder} holds the slot "
                f"(scope {request.digest}); not rerouted (reroute_on_concurrency_control "
                "is off)",
            )
        return False

    def _hold(self, uid: str, digest: str, info: str) -> None:
        self._held[uid] = _Held(digest, "")
        self._local[digest] = uid
        self._infos[digest] = info

    def _differs(self, task: Task, request: Admission, result: Outcome) -> None:
        theirs = json.loads(result.info.split(" ", 1)[1]) if " " in result.info else {}
        mine = json.loads(request.info.split(" ", 1)[1]) if " " in request.info else {}
        names = differing_fields(mine, theirs, self.policy.key_arguments)
        self._refuse(
            task,
            f"same {self.policy.running_concurrency.value} as running task {result.holder} "
            f"but different non-key arguments: {', '.join(names) or '(unknown)'} "
            "(on_diff_non_key_args_raise)",
        )

    def _refuse(self, task: Task, message: str) -> None:
        self.log.warning("Task %s not run: %s", task.uid, message)
        task.status, task.last_update = TaskState.CRASHED, time.time()
        task.error = [f"{ConcurrencyControlled.__name__}: {message}\n"]
        self.crash(task)

    async def turn(self, task: Task) -> bool:
        """Wait until ``task`` holds its slot; False if it must not run after all.

        Immediate for tasks admitted directly.  A local waiter runs once its holder's
        slot was handed to it in Redis; if that hand-over failed (the slot was taken by
        another process meanwhile) it asks for the slot like a fetched task, and may end
        parked or Crashed instead (then False: the caller skips it).
        """
        waiter = self._waiting.get(task.uid)
        if waiter is None:
            return True
        await waiter.done.wait()
        del self._waiting[task.uid]
        if waiter.transferred:
            self._held[task.uid] = _Held(waiter.digest, "")
            return True
        request = Admission(
            task.uid, waiter.digest, waiter.info, queue_key(task.priority.value, self.identity), ""
        )
        [result] = await until_done(
            lambda: self._slots().acquire(
                [request],
                reroute=self.policy.reroute_on_concurrency_control,
                on_diff=bool(waiter.info),
            ),
            log=self.log,
            what=f"take the concurrency slot of {task.uid}",
        )
        if self._settle(task, request, result):
            return True
        if result.outcome == "parked":
            self.forget(task)
        self._pass_on(waiter.digest, task.uid)
        return False

    def release(self, task: Task) -> None:
        """Give back ``task``'s slot (no-op if it holds none); written in batches.

        Safe to call twice and safe to lose: the slot already stopped counting when the
        task's lease was dropped with its final state; this also hands the slot to a
        local waiter or wakes a parked task.  A waiter handed back (shutdown) leaves its
        queue; if a slot was already on its way to it, the slot is released on arrival.
        """
        waiter = self._waiting.pop(task.uid, None)
        if waiter is not None:
            waiter.abandoned = True
            queue = self._queues.get(waiter.digest)
            if queue is not None and waiter in queue:
                queue.remove(waiter)
            return
        held = self._held.pop(task.uid, None)
        if held is not None:
            self._release(task.uid, held.digest)

    def _release(self, uid: str, digest: str) -> None:
        # The slot stays "local" until the release is written: tasks of its scope fetched
        # meanwhile queue behind it and get it handed over, instead of meeting a holder
        # that still looks alive in Redis (its lease goes with its final state).
        self._releases.append((uid, digest))
        self._wake.set()

    async def run(self) -> None:
        """Write releases as they accumulate, until cancelled (then flush, shielded)."""
        try:
            while True:
                await self._wake.wait()
                self._wake = anyio.Event()
                await anyio.sleep(RELEASE_LINGER)
                await self._flush()
        finally:
            with anyio.CancelScope(shield=True), anyio.move_on_after(5.0):
                await self._flush()

    async def _flush(self) -> None:
        while self._releases:
            batch, self._releases = self._releases, []
            entries: list[tuple[str, str, _Waiter | None]] = []
            for uid, digest in batch:  # the successor is chosen now, not at release time
                queue = self._queues.get(digest)
                successor = queue.popleft() if queue else None
                if queue is not None and not queue:
                    del self._queues[digest]
                if successor is not None:
                    self._local[digest] = successor.task.uid
                    self._infos[digest] = successor.info
                entries.append((uid, digest, successor))
            try:
                moved = await self._slots().release(
                    [(u, d, w.task.uid if w else "", w.info if w else "") for u, d, w in entries]
                )
            except TRANSIENT_ERRORS as exc:
                # Slots already count as free (their leases are gone) and any replica's
                # sweep unparks waiters; local waiters ask for their slot themselves.
                self.log.warning("Redis unavailable to release %d slot(s): %s", len(batch), exc)
                moved = [False] * len(entries)
            for (uid, digest, waiter), transferred in zip(entries, moved, strict=True):
                if waiter is not None:
                    self._arrive(waiter, digest, transferred)
                elif self._local.get(digest) == uid:
                    if self._queues.get(digest):  # queued during the write: hand it over
                        self._releases.append((uid, digest))  # (the slot is free now)
                    else:
                        del self._local[digest]
                        self._infos.pop(digest, None)

    def _arrive(self, waiter: _Waiter, digest: str, transferred: bool) -> None:
        if waiter.abandoned:  # handed back meanwhile: pass the slot on (or let it go)
            if transferred:
                self._release(waiter.task.uid, digest)
            else:
                self._pass_on(digest, waiter.task.uid)
            return
        waiter.transferred = transferred  # if not, it asks for the slot itself (turn)
        waiter.done.set()

    def _pass_on(self, digest: str, uid: str) -> None:
        """``uid`` will not hold ``digest`` after all: the next local waiter asks alone."""
        if self._local.get(digest) != uid:
            return
        queue = self._queues.get(digest)
        if queue:
            waiter = queue.popleft()
            if not queue:
                del self._queues[digest]
            self._local[digest] = waiter.task.uid
            self._infos[digest] = waiter.info
            waiter.done.set()
        else:
            del self._local[digest]
            self._infos.pop(digest, None)
            self._queues.pop(digest, None)

    async def sweep(self) -> None:
        """Unpark tasks whose slot's holder lost its lease (running concurrency only)."""
        if self.running:
            moved = await self._slots().sweep()
            if moved:
                self.log.warning("Unparked %d task(s) whose slot holder died", moved)

    def policy_due(self) -> tuple[str, str] | None:
        """``(instance, policy JSON)`` when the published policy should be filed again.

        Every third of ``POLICY_STALE_AFTER`` (it stays live for the whole window); the
        consumer's upkeep files it in its own round trip, then calls :meth:`policy_filed`.
        """
        if time.monotonic() - self._published >= POLICY_STALE_AFTER / 3:
            return self.instance, self.policy.to_json()
        return None

    def policy_filed(self) -> None:
        """The policy :meth:`policy_due` returned was filed."""
        self._published = time.monotonic()

    async def publish(self) -> None:
        """Publish the resolved policy beside the bind; warn if replicas disagree."""
        others = await self._slots().publish_policy(self.instance, self.policy.to_json())
        self._published = time.monotonic()
        for instance, raw in others.items():
            try:
                other = ConcurrencyPolicy.from_json(raw)
            except (ValueError, ConfigError):
                continue
            differing = self.policy.differences(other)
            if differing:
                self.log.warning(
                    "Replica %s of %s publishes a different concurrency policy: %s differ",
                    instance, self.identity, ", ".join(differing),
                )  # fmt: skip
