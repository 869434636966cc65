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
    A slot belongs to task uids (the one running and those waiting behind it in the same
    process) and counts only while one of them holds a live lease:
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
    A task whose scope a task of its own process holds is not parked: it waits there, in
    a per-scope FIFO that holds no runner (up to 16 per scope), listed among the slot's
    holders in Redis, and runs under the same slot when the one before it ends, with no
    Redis write (see :class:`~._concurrency_gate.ConcurrencyGate`).

Counters (``asynckarton.concurrency:<identity>``): ``blocked`` (Crashed, not rerouted),
``parked``/``unparked``, ``differing`` (on_diff_non_key_args_raise), ``duplicates``
(registration), ``taken_over`` (a slot whose holder had no live lease any more).

This module holds the policy, its enum and the scope/argument digests; the consumer-side
gate is in :mod:`._concurrency_gate`, the router-side registration guard in
:mod:`._registration`.
"""

from __future__ import annotations

import enum
import hashlib
import json
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import orjson

from .._errors import ConcurrencyControlled, ConfigError
from .._settings._builtin import BUILTIN
from .._settings._config import Config
from .._wire._resource import RESOURCE_KEY, ResourceBase
from .._wire._task import Task

__all__ = [
    "ConcurrencyControlType",
    "ConcurrencyControlled",
    "ConcurrencyPolicy",
    "argument_fields",
    "differing_fields",
    "scope_digest",
]

#: Header names that describe routing, not the work: never part of a task's arguments.
ROUTING_HEADERS = frozenset({"receiver", "origin"})
#: Karton < 5.2's copy of the persistent headers inside the persistent payload.
_HEADERS_COPY = "__headers_persistent"


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
    if value is None or isinstance(value, (str, int, float)):  # most key values
        return value
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


def _lookup(
    headers: Mapping[str, Any],
    payload: Mapping[str, Any],
    persistent: Mapping[str, Any],
    path: str,
) -> Any:
    """The canonical value at ``path``; payload paths look in payload, then persistent."""
    head, _, rest = path.partition(".")
    parts = rest.split(".")
    node: Any = headers
    if head != "headers":
        first = parts[0]
        if first in payload:
            node = payload
        elif first != _HEADERS_COPY and first in persistent:
            node = persistent
        else:
            return _MISSING
    for part in parts:
        if not isinstance(node, Mapping) or part not in node:
            return _MISSING
        node = node[part]
    return _canonical(node)


_KEYS_CACHE: dict[tuple[tuple[str, type, Any], ...], str] = {}
_KEYS_CACHE_SIZE = 4096


def _keys_digest(picked: dict[str, Any]) -> str:
    """``"k"`` + the digest of the picked key values (memoised for scalar values)."""
    try:  # the type is part of the key: 1, 1.0 and True encode differently
        memo = tuple((path, type(value), value) for path, value in picked.items())
        return _KEYS_CACHE[memo]
    except TypeError:  # a dict or list value: not hashable, not memoised
        return "k" + _hash(_dumps(picked))
    except KeyError:
        pass
    digest = _KEYS_CACHE[memo] = "k" + _hash(_dumps(picked))
    if len(_KEYS_CACHE) > _KEYS_CACHE_SIZE:
        _KEYS_CACHE.clear()
    return digest


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
    if mode is ConcurrencyControlType.KEYS:
        picked = {}
        for path in key_arguments:
            value = _lookup(headers, payload, payload_persistent, path)
            if value is not _MISSING:  # absent paths are left out: equal to each other
                picked[path] = value
        return _keys_digest(picked)
    merged = _payload(payload, payload_persistent)
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


def task_scoper(
    mode: ConcurrencyControlType, key_arguments: Iterable[str]
) -> Callable[[Task], str]:
    """A fast :func:`task_scope` for one policy (a consumer's admission runs it per task).

    With ``keys`` on top-level headers only, a scalar value is looked up directly and its
    digest memoised; anything else takes the general path.  The digests are the same.
    """
    paths = tuple(key_arguments)
    names = [path.partition(".") for path in paths]
    if mode is not ConcurrencyControlType.KEYS or any(
        head != "headers" or "." in rest for head, _, rest in names
    ):
        return lambda task: task_scope(task, mode, paths)
    pairs = [(path, rest) for path, (_, _, rest) in zip(paths, names, strict=True)]
    scalar = (str, int, float, bool, type(None))

    def scope(task: Task) -> str:
        headers = task.headers
        memo = []
        for path, name in pairs:
            value = headers.get(name, _MISSING)
            if value is _MISSING:
                continue
            if type(value) not in scalar:
                return task_scope(task, mode, paths)
            memo.append((path, type(value), value))
        digest = _KEYS_CACHE.get(tuple(memo))
        if digest is None:
            digest = _keys_digest({path: value for path, _, value in memo})
        return digest

    return scope


def task_fields(task: Task) -> dict[str, str]:
    """:func:`argument_fields` of a parsed task."""
    return argument_fields(task.headers, task.payload, task.payload_persistent)
