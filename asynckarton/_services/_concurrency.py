"""Concurrency control, pynenc's names and semantics, enforced atomically in Redis.

In Karton's model a consumer identity plays the part of a pynenc task, and a routed
copy's headers and payload (persistent ones included) are its arguments.  Resources
compare by their sha256; routing fields (uids, ``receiver``, ``origin``, status,
timestamps) are left out.

Policies (class attributes of :class:`~asynckarton.Consumer`, or ``[karton]`` options):

``running_concurrency``
    ``task``: at most one task of the identity runs at a time, across every process and
    machine; ``arguments``: none with equal arguments at once; ``keys``: none with equal
    ``key_arguments`` at once.  The slot is taken by one Lua call right after the fetch
    (see :mod:`asynckarton.backend._concurrency`), so there is no check-then-act race.
    A slot belongs to a task uid and counts only while that uid holds a live lease:
    finishing, crashing, scheduling a retry and handing back all drop the lease in the
    same write that records the state, and a SIGKILLed holder's lease expires, so a slot
    frees itself within ``lease_timeout`` with no extra process.
``registration_concurrency``
    a copy routed to the identity while an equal one (same scope) is still pending for it
    (routed, not yet fetched) is not queued again.  This holds for routes made by
    asynckarton's system service only: karton-system knows nothing of policies and
    queues every copy; such copies are still subject to running concurrency.
``key_arguments``
    dotted paths into the task, ``headers.kind`` or ``payload.sample`` (deeper paths
    walk nested dicts; payload paths see persistent payload too, as ``get_payload``
    does).  A missing path compares equal to another missing one.
``on_diff_non_key_args_raise``
    when the scope matches (``task`` or ``keys``) but the other arguments differ, the
    newcomer ends Crashed with an error naming the differing fields, instead of being
    treated as a repeat of the holder.
``reroute_on_concurrency_control``
    False (pynenc's default): a blocked task ends **Crashed** with a
    ``ConcurrencyControlled`` error naming the holder and the scope, counted in
    ``asynckarton.concurrency:<identity>`` and logged.  Crashed because it is the one
    final Karton state that karton-dashboard keeps and lists with its error, from which
    an operator can restart the task; Finished would be deleted by the next GC pass as if
    the work had been done.  True: the task is parked (its uid in a per-scope list, its
    lease dropped, its body left Spawned) and moved back to the head of its queue when
    the holder releases the slot.  Growth is bounded: a parked task is one list entry,
    touched once per release of its scope (each release moves at most one parked task),
    and never re-queued in a loop, unlike pynenc's reroute which re-enqueues the blocked
    invocation on every pass.  A periodic sweep unparks tasks whose holder lost its lease.
    A task blocked by a holder in its own process may instead wait there (a few per
    scope, see :class:`ConcurrencyGate`) and get the slot handed over on release.

Counters (``asynckarton.concurrency:<identity>``): ``blocked`` (Crashed, not rerouted),
``parked``/``unparked``, ``differing`` (on_diff_non_key_args_raise), ``duplicates``
(registration), ``taken_over`` (a slot whose holder had no live lease any more).
"""

from __future__ import annotations

import collections
import enum
import hashlib
import json
import logging
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import anyio
import orjson

from .._errors import ConcurrencyControlled, ConfigError
from .._settings._builtin import BUILTIN
from .._settings._config import Config
from .._wire._document import dumps, loads
from .._wire._resource import RESOURCE_KEY, ResourceBase
from .._wire._task import Task, TaskState
from ..backend import KartonBackend
from ..backend._concurrency import (
    REGISTER,
    TASK_PREFIX,
    Admission,
    Outcome,
    SlotStore,
    concurrency_stats_key,
    metrics_key,
    pending_key,
    published_policies,
    queue_key,
    task_key,
)
from ..backend._guard import TRANSIENT_ERRORS, until_done

__all__ = [
    "ConcurrencyControlType",
    "ConcurrencyControlled",
    "ConcurrencyGate",
    "ConcurrencyPolicy",
    "RegistrationGuard",
    "argument_fields",
    "differing_fields",
    "scope_digest",
]

#: Header names that describe routing, not the work: never part of a task's arguments.
ROUTING_HEADERS = frozenset({"receiver", "origin"})
#: Karton < 5.2's copy of the persistent headers inside the persistent payload.
_HEADERS_COPY = "__headers_persistent"
RELEASE_LINGER = (
    0.0  # seconds a release waits for company (releases made during a write share the next)
)
#: Tasks of one scope that may wait in a process behind a local holder (0: park them all).
#: Off: measured with the keys benchmark, tasks waiting inside runners made the consumer
#: slower (its dispatch treats them as slow handlers) than parking them in Redis.
LOCAL_WAITERS_PER_SCOPE = 0


class ConcurrencyControlType(enum.StrEnum):
    """pynenc's concurrency scopes (values are the lowercase names)."""

    DISABLED = "disabled"
    TASK = "task"
    ARGUMENTS = "arguments"
    KEYS = "keys"

    @classmethod
    def parse(cls, value: object, *, option: str = "", source: str = "") -> ConcurrencyControlType:
        """Accept a member or its name in any case (config files, environment, flags).

        Raises:
            ConfigError: not one of ``disabled``, ``task``, ``arguments``, ``keys``.
        """
        if isinstance(value, cls):
            return value
        text = str(value).strip().lower()
        try:
            return cls(text)
        except ValueError:
            allowed = ", ".join(m.value for m in cls)
            raise ConfigError(
                f"{option or 'concurrency control'} must be one of {allowed}, not {value!r}",
                section="karton", option=option or None, value=value, source=source or None,
            ) from None  # fmt: skip


@dataclass(frozen=True, slots=True, kw_only=True)
class ConcurrencyPolicy:
    """One consumer identity's resolved concurrency policy."""

    running_concurrency: ConcurrencyControlType = ConcurrencyControlType.DISABLED
    registration_concurrency: ConcurrencyControlType = ConcurrencyControlType.DISABLED
    key_arguments: tuple[str, ...] = ()
    on_diff_non_key_args_raise: bool = False
    reroute_on_concurrency_control: bool = False

    def __post_init__(self) -> None:
        for path in self.key_arguments:
            head, _, rest = path.partition(".")
            if head not in ("headers", "payload") or not rest:
                raise ConfigError(
                    f"key_arguments entry {path!r} must be headers.<name> or payload.<name>",
                    section="karton", option="key_arguments", value=path,
                )  # fmt: skip
        keys = ConcurrencyControlType.KEYS
        modes = (self.running_concurrency, self.registration_concurrency)
        if keys in modes and not self.key_arguments:
            # pynenc silently degrades KEYS without keys to TASK; refusing is clearer.
            raise ConfigError(
                "concurrency control 'keys' needs key_arguments (e.g. headers.kind)",
                section="karton", option="key_arguments",
            )  # fmt: skip

    @classmethod
    def resolve(
        cls, config: Config, defaults: Mapping[str, Any], identity: str | None = None
    ) -> ConcurrencyPolicy:
        """``[karton]`` values (``[karton:<identity>]`` first) over ``defaults``.

        ``defaults`` are the consumer's class attributes: the lowest layer, as for every
        other policy.
        """
        values = dict(defaults)
        for name in (
            "running_concurrency",
            "registration_concurrency",
            "on_diff_non_key_args_raise",
            "reroute_on_concurrency_control",
            "key_arguments",
        ):
            option = BUILTIN["karton"][name]
            entry = option.lookup(config, identity)
            if entry is None or entry.value is None:
                continue
            raw = entry.value
            if name.endswith("_concurrency"):
                values[name] = raw
            elif name == "key_arguments":
                values[name] = raw.replace(",", " ").split() if isinstance(raw, str) else raw
            else:
                values[name] = option.convert(raw, entry.source)
        running = values.get("running_concurrency", ConcurrencyControlType.DISABLED)
        registration = values.get("registration_concurrency", ConcurrencyControlType.DISABLED)
        return cls(
            running_concurrency=ConcurrencyControlType.parse(
                running, option="running_concurrency",
                source=config.source("karton", "running_concurrency"),
            ),
            registration_concurrency=ConcurrencyControlType.parse(
                registration, option="registration_concurrency",
                source=config.source("karton", "registration_concurrency"),
            ),
            key_arguments=tuple(values.get("key_arguments") or ()),
            on_diff_non_key_args_raise=bool(values.get("on_diff_non_key_args_raise")),
            reroute_on_concurrency_control=bool(values.get("reroute_on_concurrency_control")),
        )  # fmt: skip

    @property
    def enabled(self) -> bool:
        """Whether either control is on."""
        off = ConcurrencyControlType.DISABLED
        return self.running_concurrency is not off or self.registration_concurrency is not off

    def to_json(self) -> str:
        """Stable JSON (sorted keys, enums as values), as pynenc's ``options_to_json``."""
        return json.dumps(
            {
                "key_arguments": list(self.key_arguments),
                "on_diff_non_key_args_raise": self.on_diff_non_key_args_raise,
                "registration_concurrency": self.registration_concurrency.value,
                "reroute_on_concurrency_control": self.reroute_on_concurrency_control,
                "running_concurrency": self.running_concurrency.value,
            },
            sort_keys=True,
            separators=(",", ":"),
        )

    @classmethod
    def from_json(cls, raw: str) -> ConcurrencyPolicy:
        """Parse :meth:`to_json` output (unknown fields are ignored: newer writers)."""
        doc = json.loads(raw)
        if not isinstance(doc, dict):
            raise ValueError(f"a policy is a JSON object, not {type(doc).__name__}")
        return cls(
            running_concurrency=ConcurrencyControlType.parse(doc.get("running_concurrency", "disabled")),
            registration_concurrency=ConcurrencyControlType.parse(
                doc.get("registration_concurrency", "disabled")
            ),
            key_arguments=tuple(doc.get("key_arguments") or ()),
            on_diff_non_key_args_raise=bool(doc.get("on_diff_non_key_args_raise")),
            reroute_on_concurrency_control=bool(doc.get("reroute_on_concurrency_control")),
        )  # fmt: skip

    def differences(self, other: ConcurrencyPolicy) -> list[str]:
        """Names of the settings whose values differ from ``other``'s."""
        mine, theirs = json.loads(self.to_json()), json.loads(other.to_json())
        return sorted(name for name in mine if mine[name] != theirs.get(name))


# -- arguments and digests -----------------------------------------------------------------


def _canonical(value: Any) -> Any:
    """Replace resources by their sha256 (wire dicts and objects alike), recursively."""
    if isinstance(value, ResourceBase):
        return {RESOURCE_KEY: value.sha256 or value.uid}
    if isinstance(value, dict):
        inner = value.get(RESOURCE_KEY)
        if len(value) == 1 and isinstance(inner, dict):
            meta = inner.get("metadata")
            sha = inner.get("sha256") or (meta.get("sha256") if isinstance(meta, dict) else None)
            return {RESOURCE_KEY: sha or inner.get("uid")}
        return {str(k): _canonical(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_canonical(v) for v in value]
    return value


def _dumps(value: Any) -> bytes:
    try:
        return orjson.dumps(value, option=orjson.OPT_SORT_KEYS)
    except TypeError:  # integers beyond 64 bits, odd types: the slow, general encoder
        return json.dumps(value, sort_keys=True, separators=(",", ":"), default=str).encode()


def _hash(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:32]


def _payload(payload: Mapping[str, Any], persistent: Mapping[str, Any]) -> dict[str, Any]:
    merged = {k: v for k, v in persistent.items() if k != _HEADERS_COPY}
    merged.update(payload)  # get_payload looks in payload first
    return merged


def argument_fields(
    headers: Mapping[str, Any], payload: Mapping[str, Any], payload_persistent: Mapping[str, Any]
) -> dict[str, str]:
    """Map each top-level argument (``headers.x``, ``payload.y``) to a digest of its value.

    Works on a parsed :class:`Task` (resources as objects) and on a wire document
    (resources as ``{"__karton_resource__": {...}}``) alike.
    """
    out = {
        f"headers.{k}": _hash(_dumps(_canonical(v)))
        for k, v in headers.items()
        if k not in ROUTING_HEADERS
    }
    for k, v in _payload(payload, payload_persistent).items():
        out[f"payload.{k}"] = _hash(_dumps(_canonical(v)))
    return out


_MISSING = object()


def _lookup(headers: Mapping[str, Any], payload: dict[str, Any], path: str) -> Any:
    head, _, rest = path.partition(".")
    node: Any = headers if head == "headers" else payload
    for part in rest.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return _MISSING
        node = node[part]
    return _canonical(node)


def scope_digest(
    mode: ConcurrencyControlType,
    headers: Mapping[str, Any],
    payload: Mapping[str, Any],
    payload_persistent: Mapping[str, Any],
    key_arguments: Iterable[str] = (),
) -> str:
    """Digest naming the scope of a task: equal digests may not run (or queue) together.

    ``task``: one constant; ``arguments``: headers (minus routing ones) and payload with
    persistent payload; ``keys``: the values at ``key_arguments`` only.  Canonical JSON
    (sorted keys, resources by sha256) then sha256, so key order never matters.
    """
    if mode is ConcurrencyControlType.TASK or mode is ConcurrencyControlType.DISABLED:
        return "task"
    merged = _payload(payload, payload_persistent)
    if mode is ConcurrencyControlType.KEYS:
        picked = {}
        for path in key_arguments:
            value = _lookup(headers, merged, path)
            if value is not _MISSING:  # absent paths are left out: equal to each other
                picked[path] = value
        return "k" + _hash(_dumps(picked))
    doc = {
        "headers": {k: _canonical(v) for k, v in headers.items() if k not in ROUTING_HEADERS},
        "payload": _canonical(merged),
    }
    return "a" + _hash(_dumps(doc))


def arguments_digest(fields: Mapping[str, str]) -> str:
    """Digest of all arguments, from :func:`argument_fields`."""
    return _hash(_dumps(dict(fields)))


def differing_fields(
    mine: Mapping[str, str], theirs: Mapping[str, str], key_arguments: Iterable[str] = ()
) -> list[str]:
    """Top-level argument names whose values differ (or exist on one side only).

    A key argument that is itself top-level is left out (equal by definition of the
    scope); one nested inside a field leaves that field in, as its other parts differ.
    """
    names = (set(mine) | set(theirs)) - set(key_arguments)
    return sorted(n for n in names if mine.get(n) != theirs.get(n))


def task_scope(task: Task, mode: ConcurrencyControlType, key_arguments: Iterable[str]) -> str:
    """:func:`scope_digest` of a parsed task."""
    return scope_digest(mode, task.headers, task.payload, task.payload_persistent, key_arguments)


def task_fields(task: Task) -> dict[str, str]:
    """:func:`argument_fields` of a parsed task."""
    return argument_fields(task.headers, task.payload, task.payload_persistent)


# -- the consumer-side gate ------------------------------------------------------------------


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
        """Unpark tasks whose slot's holder lost its lease; refresh the published policy."""
        store = self._slots()
        if self.running:
            moved = await store.sweep()
            if moved:
                self.log.warning("Unparked %d task(s) whose slot holder died", moved)
        await store.publish_policy(self.instance, self.policy.to_json(), refresh=True)

    async def publish(self) -> None:
        """Publish the resolved policy beside the bind; warn if replicas disagree."""
        others = await self._slots().publish_policy(self.instance, self.policy.to_json())
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


# -- the router-side guard (registration concurrency) ----------------------------------------

POLICY_REFRESH = 5.0  # seconds between re-reads of the published policies


class RegistrationGuard:
    """Applies consumers' ``registration_concurrency`` when the router forks a task.

    The router reads every identity's published policy (``asynckarton.policy:<id>``,
    refreshed when the binds change and every ``POLICY_REFRESH`` seconds).  A copy for a
    guarded identity is committed by the REGISTER script inside the routed batch's
    MULTI/EXEC: if an equal copy (same scope) is still pending for that identity, the new
    one is not queued but written **Finished** with ``{"asynckarton": {"duplicate_of":
    uid}}`` (there is nothing left for it to do, and karton-dashboard shows it as done, not
    as a failure), counted as ``duplicates`` in ``asynckarton.concurrency:<id>`` and
    reported in a log line per refresh.  With ``on_diff_non_key_args_raise`` and
    differing other arguments it is written Crashed, naming the fields, instead.

    Only asynckarton's router does this: karton-system ignores published policies and
    queues every copy, so behind it registration concurrency does not hold (running
    concurrency still does, in the consumers).
    """

    def __init__(self, log: logging.Logger) -> None:
        self.log = log
        self._policies: dict[str, ConcurrencyPolicy] = {}
        self._seen: dict[str, str] = {}
        self._checked = -POLICY_REFRESH
        self._binds: object = None
        self._counted: dict[str, int] = {}
        self._open: tuple[object, dict[str, list[Any]]] | None = None

    async def refresh(self, backend: KartonBackend, binds: Mapping[str, str]) -> None:
        """Re-read published policies if the binds changed or the last read is old."""
        now = anyio.current_time()
        if binds is self._binds and now - self._checked < POLICY_REFRESH:
            return
        self._binds, self._checked = binds, now
        raw = await published_policies(backend, sorted(binds))
        policies: dict[str, ConcurrencyPolicy] = {}
        for identity, text in raw.items():
            try:
                policy = ConcurrencyPolicy.from_json(text)
            except (ValueError, ConfigError) as exc:
                if self._seen.get(identity) != text:
                    self.log.error("Published policy of %s is unreadable: %s", identity, exc)
                continue
            if policy.registration_concurrency is not ConcurrencyControlType.DISABLED:
                policies[identity] = policy
        self._seen, self._policies = raw, policies
        for identity in policies.keys() - {k.split(" ")[0] for k in self._counted}:
            stats = await SlotStore(backend, identity).stats()  # baseline for report()
            for name in ("duplicates", "differing"):
                self._counted[f"{identity} {name}"] = stats.get(name, 0)

    async def report(self, backend: KartonBackend) -> None:
        """Log how many copies the committed batch left unqueued (one read per guarded id)."""
        opened, self._open = self._open, None
        if opened is None:
            return
        for identity in {str(args[5]) for args in opened[1].values()}:
            stats = await SlotStore(backend, identity).stats()
            for name, what in (("duplicates", "duplicates of"), ("differing", "in conflict with")):
                count, before = stats.get(name, 0), self._counted.get(f"{identity} {name}", 0)
                if count > before:
                    self.log.info(
                        "Registration concurrency: %d copy(ies) for %s were %s a pending one "
                        "and were not queued", count - before, identity, what,
                    )  # fmt: skip
                self._counted[f"{identity} {name}"] = count

    def add_fork(
        self, batch: Any, doc: Mapping[str, Any], identity: str, uid: str, body: str,
        priority: str,
    ) -> None:  # fmt: skip
        """Add the fork ``uid`` for ``identity`` to ``batch`` (guarded or not)."""
        policy = self._policies.get(identity)
        if policy is None:
            batch.add_fork(uid, body, priority, identity)
            return
        mode = policy.registration_concurrency
        headers = {**doc["headers"], **(doc.get("headers_persistent") or {})}
        payload, persistent = doc["payload"], doc["payload_persistent"]
        digest = scope_digest(mode, headers, payload, persistent, policy.key_arguments)
        info = crashed = ""
        fork = loads(body)
        if policy.on_diff_non_key_args_raise and mode is not ConcurrencyControlType.ARGUMENTS:
            fields = argument_fields(headers, payload, persistent)
            info = arguments_digest(fields) + " " + json.dumps(fields, sort_keys=True)
            message = (
                f"{ConcurrencyControlled.__name__}: registration_concurrency={mode.value}: "
                "same scope as pending task __DUPLICATE_OF__ but different non-key "
                "arguments: __FIELDS__ (on_diff_non_key_args_raise)\n"
            )
            crashed = dumps({**fork, "status": TaskState.CRASHED.value, "error": [message]})
        extra = dict(fork.get("asynckarton") or {})
        extra["duplicate_of"] = "__DUPLICATE_OF__"
        dup = dumps({**fork, "status": TaskState.FINISHED.value, "asynckarton": extra})
        batch.assigned[identity] += 1
        queue = queue_key(priority, identity)
        opened = self._open
        if opened is None or opened[0] is not batch:
            opened = self._open = (batch, {})
        args = opened[1].get(queue)
        if args is None:
            args = opened[1][queue] = [
                pending_key(identity), concurrency_stats_key(identity), queue, TASK_PREFIX,
                metrics_key("crashed"), identity,
            ]  # fmt: skip
            batch.scripts.append((REGISTER, [], args))
        args += [uid, digest, info, body, dup, crashed]
