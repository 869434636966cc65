"""The allow-oom script machinery (``backend/_scripts.py``, ``_core.Script``) on fakeredis.

What a full Redis does with these scripts is tested on a real server in
``tests/integration/test_redis_oom_backend.py`` and ``tests/faults/test_redis_oom.py``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import cast

import pytest
import redis.exceptions

from asynckarton import Task, TaskState
from asynckarton.backend import EmbeddedConnector, KartonBackend
from asynckarton.backend import _keys as keys
from asynckarton.backend import _scripts as scripts

pytestmark = pytest.mark.anyio


@pytest.fixture
async def backend() -> AsyncIterator[KartonBackend]:
    backend = KartonBackend(EmbeddedConnector())
    try:
        yield backend
    finally:
        await backend.aclose()


def test_render_adds_the_flag_line_only_when_asked() -> None:
    assert scripts.render("return 1", allow_oom=True) == "#!lua flags=allow-oom\nreturn 1"
    assert scripts.render("return 1") == "return 1"
    text = scripts.compose([scripts.PUBLISH_MANY], allow_oom=True)
    assert text.startswith(scripts.ALLOW_OOM) and text.count("#!") == 1


def test_compose_refuses_a_sub_script_with_its_own_flag_line() -> None:
    with pytest.raises(ValueError, match=r"sub-script 1 .* shebang"):
        scripts.compose(["#!lua\nreturn 1"])


async def test_embedded_scripts_carry_no_flag(backend: KartonBackend) -> None:
    assert backend.allow_oom is False


async def test_apply_returns_one_reply_per_entry(backend: KartonBackend) -> None:
    writes = scripts.Writes()
    assert not writes and await backend.apply(writes) == []
    writes.call("SET", "a", "1")
    writes.call("HGET", "h", "missing")
    writes.call("SET", "lock", "me", "NX", "PX", 10_000)
    writes.call("SET", "lock", "you", "NX", "PX", 10_000)
    writes.call("GET", "a")
    assert await backend.apply(writes) == ["OK", None, "OK", None, "1"]
    assert await backend.redis.get("lock") == "me"


async def test_a_failing_entry_raises_after_the_others_applied(backend: KartonBackend) -> None:
    await backend.redis.set("text", "x")
    writes = scripts.Writes()
    writes.call("SET", "before", "1")
    writes.call("RPUSH", "text", "uid")  # WRONGTYPE, as in a MULTI/EXEC
    writes.call("SET", "after", "1")
    with pytest.raises(redis.exceptions.ResponseError, match="WRONGTYPE"):
        await backend.apply(writes)
    assert await backend.redis.mget(["before", "after"]) == ["1", "1"]


async def test_long_commands_are_split_under_lua_unpack_limit(backend: KartonBackend) -> None:
    uids = [f"u{i}" for i in range(3 * scripts.MAX_WORDS)]
    writes = scripts.Writes()
    writes.call_chunked(("RPUSH", "q"), uids)
    writes.mset({f"k{i}": str(i) for i in range(scripts.MAX_WORDS)})
    assert writes.count == 4 + 3  # RPUSH: 3 x MAX_WORDS uids; MSET: 2 x MAX_WORDS words
    await backend.apply(writes)  # a pair split across two MSETs would fail here
    assert await backend.redis.lrange("q", 0, -1) == uids
    values = await backend.redis.mget([f"k{i}" for i in range(scripts.MAX_WORDS)])
    assert values == [str(i) for i in range(scripts.MAX_WORDS)]


async def test_chunks_keep_score_member_pairs_whole(backend: KartonBackend) -> None:
    members = [word for i in range(scripts.MAX_WORDS) for word in (i, f"m{i}")]
    await backend.redis.zadd("z", {f"m{i}": -1 for i in range(scripts.MAX_WORDS + 1)})
    writes = scripts.Writes()
    writes.call_chunked(("ZADD", "z", "XX"), members, 2)
    assert all(op[:3] == ("ZADD", "z", "XX") and len(op) % 2 == 1 for op in writes.ops)
    await backend.apply(writes)  # the fallback path: one APPLY call
    await backend.commit(writes)  # the plain path: one MULTI/EXEC
    scores = dict(
        cast(list[tuple[str, float]], await backend.redis.zrange("z", 0, -1, withscores=True))
    )
    assert scores == {**{f"m{i}": i for i in range(scripts.MAX_WORDS)}, f"m{scripts.MAX_WORDS}": -1}


async def test_sub_scripts_see_their_own_keys_and_args(backend: KartonBackend) -> None:
    body = "redis.call('SET', KEYS[1], ARGV[1] .. ARGV[2])\nreturn #ARGV"
    writes = scripts.Writes()
    first = writes.script(body, ["one"], ["a", "b"])
    writes.call("SET", "between", "1")
    second = writes.script(body, ["two"], ["c", "d", "e"])
    assert writes.subscripts == [body]  # inlined once, called twice
    replies = await backend.apply(writes)
    assert (replies[first], replies[second]) == (2, 3)
    assert await backend.redis.mget(["one", "two", "between"]) == ["ab", "cd", "1"]


async def test_a_server_without_script_flags_gets_plain_scripts(backend: KartonBackend) -> None:
    """Redis < 7 (like fakeredis) cannot parse the flag line: fall back once, for good."""
    backend.allow_oom = True  # as for a real server, before the first script ran
    task = Task({"type": "t"}, uid="t1", root_uid="t1", _status=TaskState.SPAWNED)
    await backend.redis.set(keys.task_key(task.uid), task.serialize())
    await backend.redis.rpush(keys.queue_key("normal", "who"), task.uid)
    assert [uid for uid, _ in await backend.fetch("who", 10, 30.0)] == ["t1"]
    assert backend.allow_oom is False
    await backend.complete("who", [task], crashed=0)  # APPLY works without the flag too
    assert await backend.redis.zcard(keys.leases_key("who")) == 0
