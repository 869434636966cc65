"""Lua scripts that fuse multi-step queue transitions into one atomic round trip.

Task bodies are never re-encoded in Lua (cjson would round floats and big integers);
scripts only move uids between lists and sorted sets, and at most *read* a body.

No script spells a key name.  A script receives the keys its caller knows as KEYS (or,
for a name it only completes, such as a router's journal, as ARGV); a key it derives
from a uid read inside the script is built from a ``_keys`` prefix that :func:`render`
writes into the text in place of an ``@NAME@`` placeholder.  ``tests/unit/test_backend.py``
checks that no string in this module holds a key prefix.

**Out of memory.**  With ``maxmemory`` reached (policy ``noeviction``) Redis refuses every
command flagged ``denyoom`` (SET, RPUSH, ZADD, HINCRBY, BLMOVE...) and, in a MULTI, even
the queuing of any command; a Lua script whose first line is :data:`ALLOW_OOM` may still
write.  Everything that moves existing work towards completion (fetch, lease, status
updates, completion, routing, GC lock) is therefore a script rendered with that line,
and the plain commands among them are sent as :class:`Writes`: as they are (no cost
while memory is available) and, when Redis refuses them for memory, as one :data:`APPLY`
call; what adds work (a producer's tasks, an operator's restart) stays refused.  The embedded
mode's fakeredis cannot parse the line and has no ``maxmemory``: its scripts are
rendered without it (``render(..., allow_oom=False)``).
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from typing import Any, Final

from . import _keys as keys

__all__ = ["ALLOW_OOM", "APPLY", "Writes", "compose", "render"]

#: A script's first line that lets it write while Redis is over ``maxmemory``
#: (Redis 7 script flags; without it, a script with a shebang is refused whole).
ALLOW_OOM: Final = "#!lua flags=allow-oom\n"

#: Most words (command name and arguments) one :class:`Writes` command carries: Lua's
#: ``unpack`` stops near 8000 values.
MAX_WORDS: Final = 2000

#: Placeholders a script may use, and the ``_keys`` value each one stands for.
PLACEHOLDERS: Final = {
    "TASK_PREFIX": keys.TASK_PREFIX,
    "ROUTING_PREFIX": keys.ROUTING_PREFIX,
}


def render(template: str, *, allow_oom: bool = False) -> str:
    """Return ``template`` with each ``@NAME@`` replaced by its key prefix as a Lua string.

    With ``allow_oom`` the script starts with :data:`ALLOW_OOM` (real servers only).
    """

    def quoted(match: re.Match[str]) -> str:
        return json.dumps(PLACEHOLDERS[match.group(1)])

    return (ALLOW_OOM if allow_oom else "") + re.sub(r"@([A-Z_]+)@", quoted, template)


# Run a list of commands and embedded scripts in one atomic step; return one reply per
# entry.  ARGV, per entry: a count n then n words (a command: name and arguments), or
# "s:<i>:<nkeys>:<nargs>" then the keys and arguments of script SUB[i] (see compose).
# Each entry runs in pcall: like MULTI/EXEC, a failing entry (a wrong type) leaves the
# others applied and its error comes back as its reply.
APPLY: Final = """
local out, a = {}, 1
while a <= #ARGV do
  local n = tonumber(ARGV[a])
  if n then
    out[#out + 1] = redis.pcall(unpack(ARGV, a + 1, a + n))
    a = a + 1 + n
  else
    local i, nk, na = string.match(ARGV[a], '^s:(%d+):(%d+):(%d+)$')
    i, nk, na = tonumber(i), tonumber(nk), tonumber(na)
    local k, v = {}, {}
    for j = 1, nk do k[j] = ARGV[a + j] end
    for j = 1, na do v[j] = ARGV[a + nk + j] end
    local ok, res = pcall(SUB[i], k, v)
    if ok then
      out[#out + 1] = res or false
    elseif type(res) == 'table' and res.err then
      out[#out + 1] = res
    else
      out[#out + 1] = {err = tostring(res)}
    end
    a = a + 1 + nk + na
  end
end
return out
"""


def compose(subscripts: Sequence[str], *, allow_oom: bool = False) -> str:
    """Return :data:`APPLY` with each of ``subscripts`` inlined as ``SUB[i]`` (1-based).

    A sub-script is a plain script body (no shebang) that reads ``KEYS`` and ``ARGV``;
    it becomes a function of those two names, so it runs unchanged inside the one step.
    """
    parts = ["local SUB = {}"]
    for i, body in enumerate(subscripts, 1):
        if body.startswith("#!"):
            raise ValueError(f"sub-script {i} of an APPLY has its own shebang line")
        parts.append(f"SUB[{i}] = function(KEYS, ARGV)\n{body}\nend")
    return render("\n".join(parts) + APPLY, allow_oom=allow_oom)


class Writes:
    """Commands (and plain scripts) to run as one atomic step.

    ``KartonBackend.commit`` sends them as they are (one MULTI/EXEC) and, if Redis
    refuses them for memory, as one :data:`APPLY` call (:meth:`flat`); ``apply`` always
    uses APPLY.  Replies come back one per entry, in order (a long command may be split
    into several entries, see :meth:`call_chunked`).
    """

    __slots__ = ("ops",)

    def __init__(self) -> None:
        #: A command's words, or ``(None, body, keys, args)`` for a plain script.
        self.ops: list[tuple[Any, ...]] = []

    def __bool__(self) -> bool:
        return bool(self.ops)

    @property
    def count(self) -> int:
        """Entries so far (= replies to expect)."""
        return len(self.ops)

    def call(self, *words: Any) -> int:
        """Add one command; return its reply's index."""
        self.ops.append(words)
        return len(self.ops) - 1

    def call_chunked(self, head: Sequence[Any], items: Sequence[Any], group: int = 1) -> None:
        """Add ``*head, *items``, split so no entry exceeds :data:`MAX_WORDS`.

        Each entry repeats ``head`` and carries whole groups of ``group`` items (2 for
        MSET's key-value pairs and ZADD's score-member pairs).
        """
        head = tuple(head)
        step = (MAX_WORDS - len(head)) // group * group
        for start in range(0, len(items), step):
            self.ops.append((*head, *items[start : start + step]))

    def mset(self, mapping: dict[str, str]) -> None:
        """Add MSET of ``mapping`` (in chunks of whole key-value pairs)."""
        self.call_chunked(("MSET",), [word for pair in mapping.items() for word in pair], 2)

    def script(self, body: str, keys: Sequence[str], args: Sequence[Any]) -> int:
        """Add a run of the plain script ``body``; return its reply's index."""
        self.ops.append((None, body, tuple(keys), tuple(args)))
        return len(self.ops) - 1

    @property
    def subscripts(self) -> list[str]:
        """The distinct script bodies, in order of first use (``SUB[1]``, ``SUB[2]``...)."""
        return list(dict.fromkeys(op[1] for op in self.ops if op[0] is None))

    def flat(self, subscripts: Sequence[str]) -> list[Any]:
        """ARGV of :data:`APPLY` composed with ``subscripts`` (see :func:`compose`)."""
        index = {body: i for i, body in enumerate(subscripts, 1)}
        args: list[Any] = []
        for op in self.ops:
            if op[0] is None:
                _, body, keys, values = op
                args.append(f"s:{index[body]}:{len(keys)}:{len(values)}")
                args.extend(keys)
                args.extend(values)
            else:
                args.append(len(op))
                args.extend(op)
        return args


# Lease the uids ARGV[3..] (a blocking pop took them; none for a plain fetch) and pop
# more from the queues in KEYS[1..n-1] (strict priority order), up to ARGV[1] uids in all;
# lease each one in KEYS[n] until ARGV[2] (ms), and return uid, body pairs ('' = body
# missing).  One ZADD and one MGET per batch: commands inside scripts count in INFO
# commandstats.
FETCH: Final = """
local want = tonumber(ARGV[1])
local uids = {}
for i = 3, #ARGV do uids[#uids + 1] = ARGV[i] end
for i = 1, #KEYS - 1 do
  if #uids >= want then break end
  local got = redis.call('LPOP', KEYS[i], want - #uids)
  if got then
    for _, uid in ipairs(got) do uids[#uids + 1] = uid end
  end
end
if #uids == 0 then return {} end
local scored, keys = {}, {}
for i, uid in ipairs(uids) do
  scored[2 * i - 1] = ARGV[2]
  scored[2 * i] = uid
  keys[i] = @TASK_PREFIX@ .. uid
end
redis.call('ZADD', KEYS[#KEYS], unpack(scored))
local bodies = redis.call('MGET', unpack(keys))
local out = {}
for i, uid in ipairs(uids) do
  out[2 * i - 1] = uid
  out[2 * i] = bodies[i] or ''
end
return out
"""

# Requeue (at the head of their queue) the tasks whose lease in KEYS[1] expired before
# ARGV[1] (ms); KEYS[2..4] = the identity's high, normal and low queues, KEYS[5] = the
# stats hash; ARGV[2] = max uids per call.  Tasks already Finished or Crashed (or
# deleted) only lose their stale lease.  A Started body goes back to Spawned by rewriting
# just its top-level status (the key before "uid" in sorted JSON, as Karton and
# asynckarton write it); cjson would re-encode floats and big integers.
RECLAIM: Final = """
local queues = {high = KEYS[2], normal = KEYS[3], low = KEYS[4]}
local uids = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, ARGV[2])
local moved = 0
for _, uid in ipairs(uids) do
  redis.call('ZREM', KEYS[1], uid)
  local key = @TASK_PREFIX@ .. uid
  local body = redis.call('GET', key)
  if body then
    local status, prio
    local fixed, n = string.gsub(
      body, '("status":%s*)"Started"(,%s*"uid":%s*"[^"]*"%s*}%s*)$', '%1"Spawned"%2')
    local ok, doc = pcall(cjson.decode, body)
    if ok and type(doc) == 'table' then
      status, prio = doc['status'], doc['priority']
    else  -- cjson refuses some valid JSON (huge integers): read the sorted layout
      status = n == 1 and 'Started' or 'Spawned'
      prio = string.match(body, '"priority":%s*"(%a+)",%s*"root_uid"')
    end
    if status == 'Spawned' or status == 'Started' then
      if prio ~= 'high' and prio ~= 'low' then prio = 'normal' end
      if n == 1 then redis.call('SET', key, fixed) end
      redis.call('LPUSH', queues[prio], uid)
      moved = moved + 1
    end
  end
end
if moved > 0 then redis.call('HINCRBY', KEYS[5], 'redelivered', moved) end
return moved
"""

# Move up to ARGV[1] uids from the head of KEYS[1] (the unrouted queue) to the tail of
# KEYS[2] (this router's journal) and return them.
ROUTE_POP: Final = """
local uids = redis.call('LRANGE', KEYS[1], 0, tonumber(ARGV[1]) - 1)
if #uids > 0 then
  redis.call('LTRIM', KEYS[1], #uids, -1)
  redis.call('RPUSH', KEYS[2], unpack(uids))
end
return uids
"""

# Top up this router's journal KEYS[2] to ARGV[1] uids from the head of KEYS[1] (the
# unrouted queue), then return the journal's uids followed by their bodies (nil = gone):
# what one routing round reads, in one step.  A journal left by a failed round is kept,
# and routed again, first.
# It carries no allow-oom flag (it is sent by EVAL inside a pipeline): it drains a full
# Redis because its first write is the LTRIM, which Redis never refuses for memory, and
# a script that has written is allowed to finish (tests/faults/test_redis_oom.py).
ROUTE_TAKE: Final = """
local journal = redis.call('LRANGE', KEYS[2], 0, -1)
local want = tonumber(ARGV[1]) - #journal
if want > 0 then
  local uids = redis.call('LRANGE', KEYS[1], 0, want - 1)
  if #uids > 0 then
    redis.call('LTRIM', KEYS[1], #uids, -1)
    redis.call('RPUSH', KEYS[2], unpack(uids))
    for _, uid in ipairs(uids) do journal[#journal + 1] = uid end
  end
end
local n = #journal
local out = {}
for i = 1, n do out[i] = journal[i] end
for first = 1, n, 1000 do
  local keys = {}
  for i = first, math.min(n, first + 999) do keys[#keys + 1] = @TASK_PREFIX@ .. journal[i] end
  local bodies = redis.call('MGET', unpack(keys))
  for j = 1, #keys do out[n + first + j - 1] = bodies[j] end
end
return out
"""

# Give the journals of routers whose heartbeat (zset KEYS[1]) expired before ARGV[1]
# back to the head of KEYS[2] (the unrouted queue), in their original order; count them
# in the stats hash KEYS[3].
RECOVER_ROUTING: Final = """
local dead = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1])
local moved = 0
for _, instance in ipairs(dead) do
  local key = @ROUTING_PREFIX@ .. instance
  local uids = redis.call('LRANGE', key, 0, -1)
  for i = #uids, 1, -1 do
    redis.call('LPUSH', KEYS[2], uids[i])
  end
  moved = moved + #uids
  redis.call('DEL', key)
  redis.call('ZREM', KEYS[1], instance)
end
if moved > 0 then redis.call('HINCRBY', KEYS[3], 'rerouted', moved) end
return moved
"""

# Renew router ARGV[1]'s heartbeat deadline (ms, ARGV[2]) in zset KEYS[1]; return the
# earliest deadline of another router (a string), or false when there is none.
HEARTBEAT_ROUTER: Final = """
redis.call('ZADD', KEYS[1], ARGV[2], ARGV[1])
local first = redis.call('ZRANGE', KEYS[1], 0, 1, 'WITHSCORES')
for i = 1, #first, 2 do
  if first[i] ~= ARGV[1] then return first[i + 1] end
end
return false
"""

# A consumer's upkeep read: the bind of ARGV[1] (hash KEYS[1]), the earliest deadline in
# its leases (zset KEYS[2]) and the earliest due time of a retry (zset KEYS[3]), each
# false when absent; when ARGV[2] is not empty, first file policy ARGV[3] of replica
# ARGV[2] in hash KEYS[4].
UPKEEP_VIEW: Final = """
if ARGV[2] ~= '' then redis.call('HSET', KEYS[4], ARGV[2], ARGV[3]) end
local lease = redis.call('ZRANGE', KEYS[2], 0, 0, 'WITHSCORES')
local retry = redis.call('ZRANGE', KEYS[3], 0, 0, 'WITHSCORES')
return {redis.call('HGET', KEYS[1], ARGV[1]), lease[2] or false, retry[2] or false}
"""

# Move retries that are due (zset KEYS[1] scored by ms, ARGV[1] = now, ARGV[2] = limit)
# to the tail of the queue recorded for them in hash KEYS[2].
RELEASE_DELAYED: Final = """
local uids = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, ARGV[2])
local moved = 0
for _, uid in ipairs(uids) do
  local queue = redis.call('HGET', KEYS[2], uid)
  redis.call('ZREM', KEYS[1], uid)
  redis.call('HDEL', KEYS[2], uid)
  if queue and redis.call('EXISTS', @TASK_PREFIX@ .. uid) == 1 then
    redis.call('RPUSH', queue, uid)
    moved = moved + 1
  end
end
return moved
"""

# Requeue a Spawned task that sits in no queue, under no lease, in no retry schedule and
# is not parked by concurrency control (a consumer died between popping and leasing it).
# KEYS = the task, the receiver's leases, the retry schedule, the task's queue, the
# receiver's bare (Karton 2.x) queue, the stats hash and the receiver's parked index; ARGV = uid and the body the GC judged: the task is requeued only if
# it has not changed since (so the verdict still holds), without parsing JSON in Lua.
# Returns 1 if requeued.
REQUEUE_ORPHAN: Final = """
local uid = ARGV[1]
if redis.call('GET', KEYS[1]) ~= ARGV[2] then return 0 end
if redis.call('ZSCORE', KEYS[2], uid) then return 0 end
if redis.call('ZSCORE', KEYS[3], uid) then return 0 end
if redis.call('LPOS', KEYS[4], uid) then return 0 end
if redis.call('LPOS', KEYS[5], uid) then return 0 end
if redis.call('HEXISTS', KEYS[7], uid) == 1 then return 0 end
redis.call('RPUSH', KEYS[4], uid)
redis.call('HINCRBY', KEYS[6], 'orphans_requeued', 1)
return 1
"""

# PUBLISH every (channel, message) pair of ARGV; return how many reached nobody.  One
# round trip and one reply to parse per batch of log records instead of one per record.
PUBLISH_MANY: Final = """
local unheard = 0
for i = 1, #ARGV, 2 do
  if redis.call('PUBLISH', ARGV[i], ARGV[i + 1]) == 0 then unheard = unheard + 1 end
end
return unheard
"""

# Extend (ARGV[2] ms) or release the lock KEYS[1] only while ARGV[1], the caller's
# token, still holds it (compared in the same step).
EXTEND_LOCK: Final = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return 0
"""
RELEASE_LOCK: Final = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""
