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
from dataclasses import dataclass, field
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
)
from ..backend._guard import TRANSIENT_ERRORS
from ._concurrency import (
    ConcurrencyControlType,
    ConcurrencyPolicy,
    arguments_digest,
    differing_fields,
    task_fields,
    task_scope,
    task_scoper,
)

__all__ = ["ConcurrencyGate"]

#: Tasks of one scope that may wait in a process behind the one running under its slot;
#: more are parked in Redis (``reroute_on_concurrency_control``).  Waiting here costs no
#: Redis command and no handler runner: the runner that ends a task runs the next one.
#: It is also how many tasks a process runs under a slot, since taking it, ahead of tasks
#: of the scope that other processes parked (then newcomers are parked behind those).
LOCAL_WAITERS_PER_SCOPE = 16
#: Tasks waiting in a process in all, at least (``ConcurrencyGate.local_cap``).
LOCAL_WAITERS_MIN = 16
#: Seconds a release waits for company.  A scope that takes a task again meanwhile needs
#: no release (its holders are rewritten instead); only parked tasks wait that long more.
RELEASE_LINGER = 0.02


@dataclass(slots=True, eq=False)
class _Scope:
    """A slot this process holds or asks for: the task running under it, those waiting."""

    running: str | None = None  # uid admitted to run under the slot (buffered or running)
    waiting: collections.deque[Task] = field(default_factory=collections.deque)
    listed: str = ""  # the holders this process last wrote in Redis ("" = none)
    asking: int = 0  # tasks of the scope in an ACQUIRE call now
    releasing: bool = False  # a release is queued
    streak: int = 0  # tasks admitted under the slot since this process took it

    @property
    def idle(self) -> bool:
        return self.running is None and not self.waiting and not self.asking

    def active(self) -> str:
        """The uids of the scope's running and waiting tasks, comma-separated."""
        uids = [self.running] if self.running is not None else []
        uids.extend(task.uid for task in self.waiting)
        return ",".join(uids)


@dataclass(slots=True)
class ConcurrencyGate:
    """Admits fetched tasks through their slots and releases the slots afterwards.

    A fetched task whose scope no task of this process holds asks Redis for the slot
    (ACQUIRE, one call per fetched batch).  One whose scope this process already holds
    joins it there: it is listed among the slot's holders in the same call and waits in a
    per-scope FIFO here, holding no runner.  When the running task ends (:meth:`release`),
    the next waiter takes over under the same slot, with no Redis write, and the runner
    that ended the first runs it (:meth:`ready`).  Only when a scope has nothing left to
    run here is its slot released in Redis (in batches, by :meth:`run`), which also moves
    one task parked by another process back to its queue.  Beyond
    ``LOCAL_WAITERS_PER_SCOPE`` per scope or ``local_cap`` in all, newcomers are parked in
    Redis instead; so are they, once that many ran under the slot here, while tasks of
    the scope parked by other processes wait (no process keeps a busy key to itself).  Without
    ``reroute_on_concurrency_control`` nothing waits: a task meeting a holder, here or
    elsewhere, ends Crashed (counted ``blocked``).

    Args:
        backend: returns the service's backend (it exists only inside ``async with``).
        identity: the consumer identity (the pynenc "task").
        policy: the resolved policy.
        log: the consumer's logger.
        crash: records a task as Crashed (the consumer's completion path).
        forget: stops tracking a task that left this process (parked, or an admission
            that failed: its lease expires and it is redelivered).
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
    local_cap: int = LOCAL_WAITERS_MIN
    _store: SlotStore | None = None
    _scopes: dict[str, _Scope] = field(default_factory=dict)  # digest -> scope held here
    _of: dict[str, str] = field(default_factory=dict)  # uid (running/waiting) -> digest
    _ready: collections.deque[Task] = field(default_factory=collections.deque)
    _waiting: int = 0  # tasks waiting in all scopes
    _stopping: bool = False
    _releases: list[str] = field(default_factory=list)  # digests to release
    _wake: anyio.Event = field(default_factory=anyio.Event)
    _published: float = float("-inf")  # monotonic time the policy was last filed
    _scope_of: Callable[[Task], str] | None = None  # the running scope digest of a task
    _queues: dict[Any, str] = field(default_factory=dict)  # priority -> queue key

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
            local_cap=max(LOCAL_WAITERS_MIN, 4 * (consumer.concurrency_limit or 1)),
        )

    @property
    def running(self) -> bool:
        """Whether running concurrency is on (admission costs a script call)."""
        return self.policy.running_concurrency is not ConcurrencyControlType.DISABLED

    @property
    def waiting(self) -> int:
        """Tasks waiting in this process behind a holder of their scope (or ready)."""
        return self._waiting + len(self._ready)

    def _slots(self) -> SlotStore:
        store = self._store
        if store is None or store.backend is not self.backend():
            store = self._store = SlotStore(self.backend(), self.identity)
        return store

    async def admit(self, tasks: list[Task]) -> list[Task]:
        """Return the tasks to run now; keep those that wait here; record the others.

        One script call takes the slots of tasks whose scope this process does not hold,
        lists the others among their scope's holders (they wait here, see the class
        docstring), and parks or refuses what another process holds.  Fetching a task
        also clears the registration entry that kept equal copies from being queued.
        Should the call fail, the tasks are forgotten (their leases expire and they are
        redelivered) and the error propagates.
        """
        policy = self.policy
        if not tasks or not policy.enabled:
            return tasks
        try:
            return await self._admit(tasks)
        except BaseException:
            for task in tasks:
                if task.uid not in self._of:
                    self.forget(task)
            raise

    async def _admit(self, tasks: list[Task]) -> list[Task]:
        policy = self.policy
        registration = policy.registration_concurrency
        if not self.running:
            pairs = [(t.uid, task_scope(t, registration, policy.key_arguments)) for t in tasks]
            await self._slots().forget_pending(pairs)
            return tasks
        mode = policy.running_concurrency
        reroute = policy.reroute_on_concurrency_control
        want_info = (
            policy.on_diff_non_key_args_raise and mode is not ConcurrencyControlType.ARGUMENTS
        )
        if self._scope_of is None:
            self._scope_of = task_scoper(mode, policy.key_arguments)
        scope_of = self._scope_of
        queues = self._queues
        scopes = self._scopes
        asked: list[tuple[Task, Admission, _Scope]] = []
        room = self.local_cap - self.waiting
        for task in tasks:
            info = ""
            if want_info:
                fields = task_fields(task)
                info = arguments_digest(fields) + " " + json.dumps(fields, sort_keys=True)
            pending = ""
            if registration is not ConcurrencyControlType.DISABLED:
                pending = task_scope(task, registration, policy.key_arguments)
            digest = scope_of(task)
            scope = scopes.get(digest)
            base = ""
            if scope is None:
                scope = scopes[digest] = _Scope()
                how = "take"
            elif not reroute or (
                room > 0 and len(scope.waiting) + scope.asking < LOCAL_WAITERS_PER_SCOPE
            ):
                # Ahead of tasks of the scope parked by other processes only for a while.
                how = "stay" if scope.streak < LOCAL_WAITERS_PER_SCOPE else "join"
                room -= 1  # (without reroute, ACQUIRE refuses it: blocked)
                base = scope.active()
            else:
                how = "park"
                base = scope.active()
            scope.asking += 1
            priority = task.priority
            queue = queues.get(priority)
            if queue is None:
                queue = queues[priority] = queue_key(priority.value, self.identity)
            request = Admission(task.uid, digest, info, queue, pending, how, scope.listed, base)
            asked.append((task, request, scope))
        try:
            results = await self._slots().acquire(
                [request for _, request, _ in asked], reroute=reroute, on_diff=want_info
            )
        except BaseException:
            self._asked(asked)
            self._tidy(asked)
            raise
        self._asked(asked)
        kept: list[Task] = []
        for (task, request, scope), result in zip(asked, results, strict=True):
            if result.outcome in ("run", "wait"):
                scope.listed = result.holder
                scope.streak += 1
                self._of[task.uid] = request.digest
                if scope.running is None and not scope.waiting:
                    scope.running = task.uid  # nothing runs under it here: this one does
                    kept.append(task)
                else:
                    scope.waiting.append(task)
                    self._waiting += 1
            else:
                self._settle(task, request, result)
        self._tidy(asked)
        return kept

    @staticmethod
    def _asked(asked: list[tuple[Task, Admission, _Scope]]) -> None:
        for _, _, scope in asked:
            scope.asking -= 1

    def _tidy(self, asked: list[tuple[Task, Admission, _Scope]]) -> None:
        """Drop (or release) the scopes an admission left with nothing to run here."""
        for _, request, scope in asked:
            if scope.idle and self._scopes.get(request.digest) is scope:
                if scope.listed:
                    self._queue_release(request.digest, scope)
                else:
                    del self._scopes[request.digest]

    def _settle(self, task: Task, request: Admission, result: Outcome) -> None:
        """Apply a refusal: parked (it left this process), or Crashed."""
        mode = self.policy.running_concurrency
        if result.outcome == "parked":
            self.forget(task)
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

    def ready(self) -> Task | None:
        """A task whose turn came (its scope's previous task ended here), or None.

        The runner that ended a task runs it next; none is handed out after :meth:`stop`.
        """
        if self._ready and not self._stopping:
            return self._ready.popleft()
        return None

    def stop(self) -> None:
        """Start no waiting task any more (the consumer is stopping)."""
        self._stopping = True

    def leftovers(self) -> list[Task]:
        """Take every task still waiting here, to hand back (the end of a run).

        They leave their scopes (whose slots are then released) and :meth:`release` no
        longer knows them; the gate is ready for a later run.
        """
        self._stopping = True  # no waiter takes over while they leave
        tasks = list(self._ready)
        for scope in self._scopes.values():
            tasks.extend(scope.waiting)
        for task in tasks:
            self.release(task)
        self._ready.clear()
        self._stopping = False
        return tasks

    def release(self, task: Task) -> None:
        """``task`` ended (or was handed back): the next waiter of its scope takes over.

        Safe to call twice and for tasks that hold nothing.  When a scope has nothing
        left to run here, its slot is released in Redis (batched by :meth:`run`); losing
        that write is safe: the slot stops counting once its holders' leases are gone.
        """
        digest = self._of.pop(task.uid, None)
        if digest is None:
            return
        scope = self._scopes.get(digest)
        if scope is None:
            return
        if scope.running == task.uid:
            if scope.waiting and not self._stopping:
                successor = scope.waiting.popleft()
                self._waiting -= 1
                scope.running = successor.uid
                self._ready.append(successor)
                return
            scope.running = None
        else:
            for i, waiter in enumerate(scope.waiting):
                if waiter is task:
                    del scope.waiting[i]
                    self._waiting -= 1
                    break
        if scope.idle:
            self._queue_release(digest, scope)

    def _queue_release(self, digest: str, scope: _Scope) -> None:
        if not scope.releasing:
            scope.releasing = True
            self._releases.append(digest)
            self._wake.set()

    async def run(self) -> None:
        """Write releases as they accumulate, until cancelled (then flush, shielded)."""
        try:
            while True:
                await self._wake.wait()
                await anyio.sleep(RELEASE_LINGER)
                self._wake = anyio.Event()
                await self._flush()
        finally:
            with anyio.CancelScope(shield=True), anyio.move_on_after(5.0):
                await self._flush()

    async def _flush(self) -> None:
        while self._releases:
            batch, self._releases = self._releases, []
            sent: list[tuple[str, _Scope, str]] = []
            for digest in batch:
                scope = self._scopes.get(digest)
                if scope is None or not scope.releasing:
                    continue
                scope.releasing = False
                if not scope.idle:  # it took tasks again meanwhile: they release it
                    continue
                if not scope.listed:
                    del self._scopes[digest]
                    continue
                sent.append((digest, scope, scope.listed))
            if not sent:
                continue
            try:
                await self._slots().release([(digest, listed) for digest, _, listed in sent])
            except TRANSIENT_ERRORS as exc:
                # The slots stop counting once their holders' leases are gone (they went
                # with the final states), and any replica's sweep unparks waiters.
                self.log.warning("Redis unavailable to release %d slot(s): %s", len(sent), exc)
            for digest, scope, listed in sent:
                # Unless tasks of the scope were admitted meanwhile (they wrote new holders).
                if self._scopes.get(digest) is scope and scope.idle and scope.listed == listed:
                    del self._scopes[digest]

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
