"""The whole Redis schema, readable in one screen.

Karton's names (shared with karton-core services and karton-dashboard) come first; they
must keep their exact meaning.  Everything asynckarton adds lives under ``asynckarton.``,
which Karton ignores (docs/wire-format.md).

Only ``backend/`` reads this module.  The Lua scripts get their key names from here too:
as KEYS/ARGV where the caller knows them, or rendered into the script text from the
constants below (see ``_scripts.render``).
"""

from __future__ import annotations

from typing import Final

# -- Karton 5 keys (the compatibility contract, docs/wire-format.md) --------------------
TASKS_QUEUE: Final = "karton.tasks"  # list: unrouted task uids (producers RPUSH)
OPERATIONS_QUEUE: Final = "karton.operations"  # list: legacy (<= 4.3) status changes
TASK_PREFIX: Final = "karton.task:"  # string: task JSON, key = prefix + uid
BINDS: Final = "karton.binds"  # hash: identity -> bind JSON
METRICS_PREFIX: Final = "karton.metrics."  # hashes: identity -> counter
OUTPUTS_PREFIX: Final = "karton.outputs:"  # set per origin: JSON of routed headers
LOG_CHANNEL_PREFIX: Final = "karton.log."  # pub/sub: karton.log.<level>.<logger>
QUEUE_PREFIX: Final = "karton.queue."  # list per priority and identity (see queue_key)
PRIORITIES: Final = ("high", "normal", "low")  # strict order consumers read queues in

# -- asynckarton's own keys --------------------------------------------------------------
LEASES_PREFIX: Final = "asynckarton.leases:"  # zset per identity: uid -> lease deadline (ms)
ROUTING_PREFIX: Final = "asynckarton.routing:"  # list per router instance: batch in flight
ROUTERS: Final = "asynckarton.routers"  # zset: router instance -> heartbeat deadline (ms)
DELAYED: Final = "asynckarton.delayed"  # zset: uid -> due time (ms) of a scheduled retry
DELAYED_ROUTES: Final = "asynckarton.delayed.routes"  # hash: uid -> queue it returns to
DEAD_PREFIX: Final = "asynckarton.dead:"  # list per identity: uids that used every retry
STATS: Final = "asynckarton.stats"  # hash: redelivered / rerouted / invalid counters
INVALID: Final = "asynckarton.invalid"  # list: uids whose body could not be parsed
GC_LOCK: Final = "asynckarton.gc.lock"  # string: token of the collector running now
RESULT_CACHE_PREFIX: Final = "asynckarton.cache:"  # string per identity and arguments (TTL)
GC_COUNTS: Final = "asynckarton.gc.counts"  # string: JSON task counts by status, per GC pass
HOLD: Final = "asynckarton.hold"  # list nobody writes: a BLPOP on it is a server-side wait


def task_key(uid: str) -> str:
    """Key holding the JSON of task ``uid``."""
    return TASK_PREFIX + uid


def queue_key(priority: str, identity: str) -> str:
    """Queue the router fills for ``identity`` at ``priority``."""
    return f"{QUEUE_PREFIX}{priority}:{identity}"


def task_uid(key: str) -> str:
    """The uid of the task held in ``key`` (the inverse of :func:`task_key`)."""
    return key[len(TASK_PREFIX) :]


def consumer_queues(identity: str) -> list[str]:
    """Queues a consumer reads, in strict priority order (the bare name is Karton 2.x's)."""
    return [identity, *(queue_key(p, identity) for p in PRIORITIES)]


def metrics_key(metric: str) -> str:
    """Hash of per-identity counters for ``metric`` (produced, consumed...)."""
    return METRICS_PREFIX + metric


def outputs_key(origin: str) -> str:
    """Set recording which headers an identity produced (dashboard graph)."""
    return OUTPUTS_PREFIX + origin


def log_channel(level: str | None, logger: str | None) -> str:
    """Pub/sub channel of a log record, as Karton names it."""
    return f"{LOG_CHANNEL_PREFIX}{(level or '*').lower()}.{logger or '*'}"


def leases_key(identity: str) -> str:
    """Leases of tasks that consumers of ``identity`` are processing."""
    return LEASES_PREFIX + identity


def routing_key(instance: str) -> str:
    """Batch a router instance has taken but not finished routing."""
    return ROUTING_PREFIX + instance


def dead_key(identity: str) -> str:
    """Dead-letter list of ``identity``: tasks crashed after their last retry."""
    return DEAD_PREFIX + identity


def result_cache_key(identity: str, digest: str) -> str:
    """Cached result (the outputs sent) of ``identity`` for the arguments ``digest``."""
    return f"{RESULT_CACHE_PREFIX}{identity}:{digest}"


# -- concurrency control (see backend/_concurrency.py) ------------------------------------


def running_key(identity: str) -> str:
    """Slots of ``identity``: scope digest -> holder uid."""
    return "asynckarton.running:" + identity


def parked_prefix(identity: str) -> str:
    """Prefix of the per-digest lists of parked uids."""
    return f"asynckarton.parked:{identity}:"


def parked_index_key(identity: str) -> str:
    """Parked uid -> "<digest> <queue key>"."""
    return "asynckarton.parked.index:" + identity


def parked_digests_key(identity: str) -> str:
    """Digests that have parked tasks."""
    return "asynckarton.parked.digests:" + identity


def pending_key(identity: str) -> str:
    """Registration digest -> uid routed to ``identity`` and not fetched yet."""
    return "asynckarton.pending:" + identity


def policy_key(identity: str) -> str:
    """Published concurrency policies of ``identity``'s replicas."""
    return "asynckarton.policy:" + identity


def concurrency_stats_key(identity: str) -> str:
    """Counters of concurrency-control outcomes for ``identity``."""
    return "asynckarton.concurrency:" + identity
