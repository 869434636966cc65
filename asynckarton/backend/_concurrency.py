"""Concurrency slots, parked tasks, pending registrations and published policies.

Keys (all under ``asynckarton.``, which Karton ignores; see the key functions below):

=====================================  ====  ================================================
``asynckarton.running:<id>``           hash  scope digest -> uids holding it, "a,b,c": the
                                             task running under it in one process, then
                                             those waiting there behind it (then
                                             " <args digest> <fields JSON>" with
                                             on_diff_non_key_args_raise)
``asynckarton.parked:<id>:<digest>``   list  uids waiting for that slot, oldest first
``asynckarton.parked.index:<id>``      hash  parked uid -> "<digest> <queue key>"
``asynckarton.parked.digests:<id>``    set   digests that have parked tasks (the sweep's
                                             worklist)
``asynckarton.pending:<id>``           hash  registration digest -> uid routed, not fetched
                                             (then " <args digest> <fields JSON>" when
                                             differing arguments must be named)
``asynckarton.policy:<id>``            hash  replica instance -> "<ms> <policy JSON>"
``asynckarton.concurrency:<id>``       hash  counters: blocked, parked, unparked,
                                             differing, taken_over, duplicates
=====================================  ====  ================================================

A slot counts only while one of its holders' uids has a live lease in
``asynckarton.leases:<id>`` (the same sorted set the consumer renews): every path that
ends a task's run (final state, retry schedule, hand-back) drops the lease in the write
that records it, and a SIGKILLed consumer's leases expire.  So a slot never outlives its
holders by more than the lease timeout, even if the release below is never sent.  The
tasks waiting in a process behind its holder are holders too (listed when they are
admitted, in the same call): when the running one ends, the next one runs under the
same slot with no Redis write, and the slot stays held while it does.  Scripts never re-encode task
bodies (see ``_scripts.py``); they only move uids and compare strings.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any, Final, NamedTuple, cast

from . import _keys as keys
from . import _scripts as scripts
from ._keys import (
    TASK_PREFIX,
    concurrency_stats_key,
    metrics_key,
    parked_digests_key,
    parked_index_key,
    parked_prefix,
    pending_key,
    policy_key,
    queue_key,
    running_key,
    task_key,
)
from ._redis import KartonBackend

__all__ = [
    "ACQUIRE",
    "POLICY_STALE_AFTER",
    "REGISTER",
    "RELEASE",
    "SWEEP",
    "TASK_PREFIX",
    "Admission",
    "Outcome",
    "SlotStore",
    "concurrency_stats_key",
    "metrics_key",
    "parked_digests_key",
    "parked_index_key",
    "parked_prefix",
    "pending_key",
    "policy_key",
    "published_policies",
    "queue_key",
    "running_key",
    "task_key",
]

POLICY_STALE_AFTER = 30.0  # seconds without a refresh before a replica's policy is ignored


# Move the first live parked uid of one digest to the head of its queue (shared by RELEASE
# and SWEEP).  ``prefix`` = parked list prefix, ``index``/``digests``/``stats`` = keys,
# ``taskp`` = task key prefix.  Uids whose task is gone are dropped on the way.  A digest
# with nothing parked costs one SISMEMBER.
_UNPARK: Final = """
local function unpark(prefix, index, digests, stats, taskp, digest)
  if redis.call('SISMEMBER', digests, digest) == 0 then return end
  local list = prefix .. digest
  while true do
    local uid = redis.call('LPOP', list)
    if not uid then break end
    local where = redis.call('HGET', index, uid)
    redis.call('HDEL', index, uid)
    if where and redis.call('EXISTS', taskp .. uid) == 1 then
      local queue = string.match(where, '^%S+ (.+)$')
      redis.call('LPUSH', queue, uid)
      redis.call('HINCRBY', stats, 'unparked', 1)
      break
    end
  end
  if redis.call('LLEN', list) == 0 then redis.call('SREM', digests, digest) end
end
"""

# Liveness of a slot entry: its holders (the comma-separated uids before the first space)
# count while any of them has a live lease, except those in ``skip`` (uids being admitted
# right now: fetched again after their process died, so running nowhere).  Returns the
# first live one, or nil.
_LIVE: Final = """
local function live_holder(leases, holders, now, skip)
  for uid in string.gmatch(holders, '[^,]+') do
    if not skip[uid] then
      local deadline = redis.call('ZSCORE', leases, uid)
      if deadline and tonumber(deadline) >= now then return uid end
    end
  end
  return nil
end
"""

# Take, join or refuse the slot of each fetched task, in one atomic step.  A slot's value
# is its holders, "uid1,uid2,..." (the task running under it in one process, then the
# tasks waiting there behind it, in order), then " <args digest> <fields JSON>" when
# differing arguments are checked.
# KEYS: running, leases, parked index, parked digests, stats, pending.
# ARGV: now (ms), reroute (0/1), on_diff (0/1), parked prefix, task key prefix, then one
# argument per task, its fields joined by tabs (none holds one: JSON escapes them): uid,
# digest, info ("<args digest> <fields>" or ""), its queue key, pending digest (""),
# mode, expect, base.  Modes: "take" (no task of the scope is held in its process),
# "join" (its process holds the scope: the task waits there, behind the others, unless
# tasks of the scope are parked: then it is parked behind them), "stay" (as join, even
# ahead of parked tasks), "park" (as join, but it must not wait there: it is parked).  The entry is the process's
# own if its holders equal ``expect`` (what that process last wrote), or what this call
# wrote for the digest; then a join appends the uid to ``base`` (the scope's running and
# waiting uids in that process, finished ones left out).  An entry without a live holder
# is taken (holders being admitted in this call do not count: they run nowhere).
# Otherwise the task is refused: parked when rerouting (its lease dropped, its body back
# to Spawned), else blocked; with on_diff, "differs" when the holder's arguments differ.
# Returns per task: outcome (run / wait / parked / blocked / differs), then for run and
# wait the holders written, else the holder uid and the holder's info.
ACQUIRE: Final = (
    _LIVE
    + """
local now = tonumber(ARGV[1])
local reroute, ondiff = ARGV[2] == '1', ARGV[3] == '1'
local prefix, taskp = ARGV[4], ARGV[5]
local anyparked = redis.call('HLEN', KEYS[3]) > 0
local written = {}
local out = {}
local asking = {}
local requests = {}
for i = 6, #ARGV do
  local text, r, pos = ARGV[i], {}, 1
  for n = 1, 7 do
    local tab = string.find(text, '\t', pos, true)
    r[n] = string.sub(text, pos, tab - 1)
    pos = tab + 1
  end
  r[8] = string.sub(text, pos)
  requests[#requests + 1] = r
  asking[r[1]] = true
end
local function park(uid, digest, queue)
  redis.call('RPUSH', prefix .. digest, uid)
  redis.call('HSET', KEYS[3], uid, digest .. ' ' .. queue)
  redis.call('SADD', KEYS[4], digest)
  redis.call('ZREM', KEYS[2], uid)
  redis.call('HINCRBY', KEYS[5], 'parked', 1)
  local body = redis.call('GET', taskp .. uid)  -- waiting again: Started -> Spawned
  if body then
    local fixed, n = string.gsub(
      body, '("status":%s*)"Started"(,%s*"uid":%s*"[^"]*"%s*}%s*)$', '%1"Spawned"%2')
    if n == 1 then redis.call('SET', taskp .. uid, fixed) end
  end
end
local function decide(uid, digest, info, queue, mode, expect, base)
  if mode == 'take' and not written[digest] then  -- the usual case: nobody holds it
    local value = info ~= '' and (uid .. ' ' .. info) or uid
    if redis.call('HSETNX', KEYS[1], digest, value) == 1 then
      written[digest] = uid
      out[#out + 1] = 'run'; out[#out + 1] = uid; out[#out + 1] = ''
      return
    end
  end
  local entry = redis.call('HGET', KEYS[1], digest)
  local holders = entry and string.match(entry, '^(%S+)')
  local held = entry and (string.match(entry, '^%S+ (.*)$') or '') or ''
  local mine = written[digest] or expect
  local ours = holders ~= nil and mine ~= '' and holders == mine
  local live = nil
  if holders and not ours then live = live_holder(KEYS[2], holders, now, asking) end
  local differs = ondiff and held ~= '' and info ~= '' and
    string.match(held, '^(%S+)') ~= string.match(info, '^(%S+)')
  if not ours and not live then
    if holders then redis.call('HINCRBY', KEYS[5], 'taken_over', 1) end
    local list = uid
    local before = written[digest] or base
    if mode ~= 'take' and before ~= '' then list = before .. ',' .. uid end
    if info ~= '' then redis.call('HSET', KEYS[1], digest, list .. ' ' .. info)
    else redis.call('HSET', KEYS[1], digest, list) end
    written[digest] = list
    out[#out + 1] = mode == 'take' and 'run' or 'wait'; out[#out + 1] = list
    out[#out + 1] = ''
    return
  end
  local holder = live or string.match(holders, '^([^,]+)')
  local parked_behind = ours and mode == 'join' and anyparked and
    redis.call('SISMEMBER', KEYS[4], digest) == 1
  if differs then
    redis.call('HINCRBY', KEYS[5], 'differing', 1)
    out[#out + 1] = 'differs'
  elseif not reroute then
    redis.call('HINCRBY', KEYS[5], 'blocked', 1)
    out[#out + 1] = 'blocked'
  elseif ours and (mode == 'join' or mode == 'stay') and not parked_behind then
    local list = (written[digest] or base)
    list = list == '' and uid or (list .. ',' .. uid)
    redis.call('HSET', KEYS[1], digest, list .. (held ~= '' and (' ' .. held) or ''))
    written[digest] = list
    out[#out + 1] = 'wait'; out[#out + 1] = list; out[#out + 1] = ''
    return
  else
    park(uid, digest, queue)
    out[#out + 1] = 'parked'
  end
  out[#out + 1] = holder; out[#out + 1] = ondiff and held or ''
end
for _, r in ipairs(requests) do
  local uid, digest, pend = r[1], r[2], r[5]
  if pend ~= '' and string.match(redis.call('HGET', KEYS[6], pend) or '', '^(%S+)') == uid then
    redis.call('HDEL', KEYS[6], pend)
  end
  local where = anyparked and redis.call('HGET', KEYS[3], uid)
  if where then  -- parked, then delivered by another path (GC, operator): unpark it here
    redis.call('LREM', prefix .. string.match(where, '^(%S+)'), 0, uid)
    redis.call('HDEL', KEYS[3], uid)
  end
  decide(uid, digest, r[3], r[4], r[6], r[7], r[8])
end
return out
"""
)

# Release slots whose holders in one process have all ended.
# KEYS: running, parked index, parked digests, stats.  ARGV: parked prefix, task key
# prefix, then per slot: digest, holders (what that process last wrote).  A slot is
# deleted only if its holders are still those (else another process took it meanwhile,
# or this one wrote newer holders): then the first parked task of the digest goes back to
# the head of its queue.  Returns 1 per slot released, else 0.
RELEASE: Final = (
    _UNPARK
    + """
local out = {}
local anyparked = redis.call('EXISTS', KEYS[3]) == 1
for i = 3, #ARGV, 2 do
  local digest, expect = ARGV[i], ARGV[i + 1]
  local holders = string.match(redis.call('HGET', KEYS[1], digest) or '', '^(%S+)')
  if holders == expect then
    redis.call('HDEL', KEYS[1], digest)
    if anyparked then unpark(ARGV[1], KEYS[2], KEYS[3], KEYS[4], ARGV[2], digest) end
    out[#out + 1] = 1
  else
    out[#out + 1] = 0
  end
end
return out
"""
)

# Sweep: free slots whose holder has no live lease (SIGKILLed, or its release was lost) and
# unpark one task for every parked digest whose slot is free.  KEYS: running, leases,
# parked index, parked digests, stats.  ARGV: now (ms), parked prefix, task key prefix,
# most slots inspected.  Returns how many tasks were unparked.
SWEEP: Final = (
    _UNPARK
    + _LIVE
    + """
local now = tonumber(ARGV[1])
local function dead(entry)
  return live_holder(KEYS[2], string.match(entry, '^(%S+)'), now, {}) == nil
end
if redis.call('HLEN', KEYS[1]) <= tonumber(ARGV[4]) then
  local slots = redis.call('HGETALL', KEYS[1])
  for i = 1, #slots, 2 do
    if dead(slots[i + 1]) then redis.call('HDEL', KEYS[1], slots[i]) end
  end
end
local before = tonumber(redis.call('HGET', KEYS[5], 'unparked') or '0')
for _, digest in ipairs(redis.call('SMEMBERS', KEYS[4])) do
  local entry = redis.call('HGET', KEYS[1], digest)
  if not entry or dead(entry) then
    redis.call('HDEL', KEYS[1], digest)
    unpark(ARGV[2], KEYS[3], KEYS[4], KEYS[5], ARGV[3], digest)
  end
end
return tonumber(redis.call('HGET', KEYS[5], 'unparked') or '0') - before
"""
)

# Route copies for one identity's queue under registration concurrency; runs inside the
# router's MULTI/EXEC, so it commits with the rest of the routed batch or not at all.
# ARGV: pending key, stats key, queue key, task key prefix, crashed-metric key, identity,
# then per copy: uid, digest, info ("<args digest> <fields JSON>" or ""), Spawned body,
# duplicate body (Finished, "__DUPLICATE_OF__" stands for the pending uid), crashed body
# ("" unless differing arguments must fail; "__FIELDS__" stands for their names).
# A copy whose digest maps to a task still Spawned (routed, not fetched: fetching clears
# the entry) is not queued: it is written as the duplicate, or Crashed when its other
# arguments differ.  Otherwise it is written Spawned, queued, and becomes the pending one.
# "Spawned" is read from the body's tail, where sorted JSON puts status and uid, so no
# body is re-encoded; the fields maps (string -> hex) are safe for cjson.
REGISTER: Final = """
local pending, stats, queue, taskp = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
local dups, diffs = 0, 0
local function field_names(mine, theirs)
  local a = cjson.decode(string.match(mine, '^%S+ (.*)$'))
  local b = cjson.decode(string.match(theirs, '^%S+ (.*)$'))
  local names = {}
  for k, v in pairs(a) do if b[k] ~= v then names[#names + 1] = k end end
  for k, _ in pairs(b) do if a[k] == nil then names[#names + 1] = k end end
  table.sort(names)
  return string.sub(cjson.encode(table.concat(names, ', ')), 2, -2)
end
for i = 7, #ARGV, 6 do
  local uid, digest, info = ARGV[i], ARGV[i + 1], ARGV[i + 2]
  local body, dup, crashed = ARGV[i + 3], ARGV[i + 4], ARGV[i + 5]
  local entry = redis.call('HGET', pending, digest)
  local held, heldinfo, live = nil, '', false
  if entry then
    held = string.match(entry, '^(%S+)')
    heldinfo = string.match(entry, '^%S+ (.*)$') or ''
    if held ~= uid then
      local other = redis.call('GET', taskp .. held)
      live = other ~= false and
        string.find(other, '"status":%s*"Spawned",%s*"uid":%s*"[^"]*"%s*}%s*$') ~= nil
    end
  end
  if live then
    local out = dup
    if crashed ~= '' and info ~= '' and heldinfo ~= '' and
        string.match(info, '^(%S+)') ~= string.match(heldinfo, '^(%S+)') then
      local names = field_names(info, heldinfo)
      out = string.gsub(crashed, '__FIELDS__', function() return names end)
      diffs = diffs + 1
    else
      dups = dups + 1
    end
    redis.call('SET', taskp .. uid, (string.gsub(out, '__DUPLICATE_OF__', function() return held end)))
  else
    redis.call('SET', taskp .. uid, body)
    redis.call('RPUSH', queue, uid)
    if info ~= '' then redis.call('HSET', pending, digest, uid .. ' ' .. info)
    else redis.call('HSET', pending, digest, uid) end
  end
end
if dups > 0 then redis.call('HINCRBY', stats, 'duplicates', dups) end
if diffs > 0 then
  redis.call('HINCRBY', stats, 'differing', diffs)
  redis.call('HINCRBY', ARGV[5], ARGV[6], diffs)
end
return dups + diffs
"""


class Admission(NamedTuple):
    """One fetched task asking for its slot (see ACQUIRE for ``mode``).

    A tuple in ACQUIRE's field order: it is sent joined by tabs.
    """

    uid: str
    digest: str  # running scope digest
    info: str  # "<args digest> <fields JSON>" when differing arguments must be named
    queue: str  # key of the queue it goes back to (head) when unparked
    pending: str  # registration digest whose pending entry this fetch clears ("" = none)
    mode: str = "take"  # "take", "join"/"stay" (wait behind this process's holders), "park"
    expect: str = ""  # the holders this process last wrote for the digest ("" = none)
    base: str = ""  # this process's running and waiting uids of the scope, comma-separated


class Outcome(NamedTuple):
    """What ACQUIRE decided for one task."""

    outcome: str  # "run", "wait", "parked", "blocked" or "differs"
    holder: str  # run/wait: the holders written; else the uid holding the slot
    info: str  # the holder's "<args digest> <fields JSON>" ("" when unknown)


def _ms(seconds: float) -> int:
    return int(seconds * 1000)


class SlotStore:
    """The Redis side of one identity's concurrency control (one script call each)."""

    def __init__(self, backend: KartonBackend, identity: str) -> None:
        self.backend = backend
        self.identity = identity
        # Flagged allow-oom (on real servers): admitting, releasing and sweeping slots
        # moves existing work on, so it keeps running when Redis is over maxmemory.
        self._acquire = backend._script(ACQUIRE)
        self._release = backend._script(RELEASE)
        self._sweep = backend._script(SWEEP)
        self._forget = backend._script(_FORGET_PENDING)
        self._acquire_keys = [
            running_key(identity),
            keys.leases_key(identity),
            parked_index_key(identity),
            parked_digests_key(identity),
            concurrency_stats_key(identity),
            pending_key(identity),
        ]
        self._release_keys = [
            running_key(identity),
            parked_index_key(identity),
            parked_digests_key(identity),
            concurrency_stats_key(identity),
        ]
        self._parked_prefix = parked_prefix(identity)

    async def acquire(
        self, requests: Sequence[Admission], *, reroute: bool, on_diff: bool
    ) -> list[Outcome]:
        """Take, join or refuse each slot (ACQUIRE); parks refused ones when ``reroute``."""
        args: list[Any] = [
            _ms(time.time()),
            int(reroute),
            int(on_diff),
            self._parked_prefix,
            keys.TASK_PREFIX,
        ]
        args.extend(["\t".join(request) for request in requests])
        flat = cast(list[str], await self._acquire(keys=self._acquire_keys, args=args))
        return [Outcome(*flat[i : i + 3]) for i in range(0, len(flat), 3)]

    async def release(self, held: Sequence[tuple[str, str]]) -> list[bool]:
        """Release ``(digest, holders)`` slots (see RELEASE); True per slot released."""
        if not held:
            return []
        args: list[Any] = [self._parked_prefix, keys.TASK_PREFIX]
        for entry in held:
            args += entry
        flags = cast(list[int], await self._release(keys=self._release_keys, args=args))
        return [bool(flag) for flag in flags]

    async def sweep(self, limit: int = 5000) -> int:
        """Free slots of holders without a live lease; unpark where a slot is free."""
        identity = self.identity
        moved: int = await self._sweep(
            keys=[
                running_key(identity),
                keys.leases_key(identity),
                parked_index_key(identity),
                parked_digests_key(identity),
                concurrency_stats_key(identity),
            ],
            args=[_ms(time.time()), parked_prefix(identity), keys.TASK_PREFIX, limit],
        )
        return moved

    async def forget_pending(self, pairs: Sequence[tuple[str, str]]) -> None:
        """Clear pending registrations of fetched ``(uid, digest)`` (only if still theirs)."""
        pairs = [(uid, digest) for uid, digest in pairs if digest]
        if not pairs:
            return
        # Compare-and-delete per entry in one script call (ACQUIRE does it for slots).
        flat = [part for pair in pairs for part in pair]
        await self._forget(keys=[pending_key(self.identity)], args=flat)

    async def publish_policy(
        self, instance: str, policy: str, *, refresh: bool = False
    ) -> dict[str, str]:
        """File this replica's policy; return other live replicas' (unless ``refresh``)."""
        redis = self.backend.redis
        key = policy_key(self.identity)
        now = time.time()
        filing = scripts.Writes()  # a full Redis still takes it (a consumer starting then)
        filing.call("HSET", key, instance, f"{_ms(now)} {policy}")
        await self.backend.commit(filing)
        if refresh:
            return {}
        others: dict[str, str] = {}
        stale: list[str] = []
        raw = cast(dict[str, str], await redis.hgetall(key))
        for other, value in raw.items():
            if other == instance:
                continue
            stamp, _, text = value.partition(" ")
            if not stamp.isdigit() or int(stamp) < _ms(now - POLICY_STALE_AFTER):
                stale.append(other)
            else:
                others[other] = text
        if stale:
            await redis.hdel(key, *stale)
        return others

    async def stats(self) -> dict[str, int]:
        """Counters of ``asynckarton.concurrency:<identity>``."""
        raw = cast(
            dict[str, str], await self.backend.redis.hgetall(concurrency_stats_key(self.identity))
        )
        return {k: int(v) for k, v in raw.items()}


_FORGET_PENDING: Final = """
for i = 1, #ARGV, 2 do
  local entry = redis.call('HGET', KEYS[1], ARGV[i + 1]) or ''
  if string.match(entry, '^(%S+)') == ARGV[i] then redis.call('HDEL', KEYS[1], ARGV[i + 1]) end
end
return 0
"""


async def published_policies(backend: KartonBackend, identities: Sequence[str]) -> dict[str, str]:
    """The freshest published policy JSON of each identity that has one (one pipeline)."""
    if not identities:
        return {}
    async with backend.redis.pipeline(transaction=False) as pipe:
        for identity in identities:
            pipe.hgetall(policy_key(identity))
        replies = cast(list[dict[str, str]], await pipe.execute())
    out: dict[str, str] = {}
    for identity, entries in zip(identities, replies, strict=True):
        best = -1
        for value in entries.values():
            stamp, _, text = value.partition(" ")
            if stamp.isdigit() and int(stamp) > best:
                best, out[identity] = int(stamp), text
    return out
