"""The router-side guard of concurrency control: ``registration_concurrency``.

Policies, scopes and digests are in :mod:`._concurrency`; the REGISTER script in
:mod:`asynckarton.backend._concurrency`.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from typing import Any

import anyio

from .._errors import ConcurrencyControlled, ConfigError
from .._wire._document import dumps, loads
from .._wire._task import TaskState
from ..backend import KartonBackend
from ..backend._concurrency import (
    REGISTER,
    TASK_PREFIX,
    SlotStore,
    concurrency_stats_key,
    metrics_key,
    pending_key,
    published_policies,
    queue_key,
)
from ._concurrency import (
    ConcurrencyControlType,
    ConcurrencyPolicy,
    argument_fields,
    arguments_digest,
    scope_digest,
)

__all__ = ["RegistrationGuard"]

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
