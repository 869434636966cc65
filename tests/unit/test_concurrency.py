"""Concurrency control: argument digests, the policy, the slot scripts, the consumer gate.

Scripts run on the embedded backend (fakeredis with Lua); the consumer tests run whole
in-process pipelines.  Multi-process checks live in tests/integration/test_concurrency.py.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, ClassVar

import anyio
import pytest

from asynckarton import ConfigError, Consumer, Task, TaskState, testing
from asynckarton._services import _concurrency_gate as concurrency_gate
from asynckarton._services._concurrency import (
    ConcurrencyControlType,
    ConcurrencyPolicy,
    argument_fields,
    differing_fields,
    scope_digest,
    task_scope,
    task_scoper,
)
from asynckarton._services._concurrency_gate import ConcurrencyGate
from asynckarton._settings._config import Config
from asynckarton._wire._resource import RemoteResource
from asynckarton.backend import EmbeddedConnector, KartonBackend
from asynckarton.backend import _keys as keys
from asynckarton.backend._concurrency import (
    Admission,
    SlotStore,
    concurrency_stats_key,
    parked_index_key,
    policy_key,
    published_policies,
    running_key,
)

ARGS = ConcurrencyControlType.ARGUMENTS
KEYS = ConcurrencyControlType.KEYS
ID = "test.slots"


def _resource(name: str, uid: str, sha: str) -> dict[str, Any]:
    return {
        "__karton_resource__": {
            "uid": uid,
            "name": name,
            "bucket": "b",
            "size": 3,
            "metadata": {"sha256": sha},
            "flags": [],
            "sha256": sha,
        }
    }


# -- digests ---------------------------------------------------------------------------------


def test_equal_arguments_in_a_different_key_order_give_equal_digests() -> None:
    a = scope_digest(ARGS, {"type": "x", "kind": "y"}, {"a": {"p": 1, "q": [1, 2]}, "b": 2}, {})
    b = scope_digest(ARGS, {"kind": "y", "type": "x"}, {"b": 2, "a": {"q": [1, 2], "p": 1}}, {})
    assert a == b


def test_a_resource_compares_by_sha256_not_by_name_or_uid() -> None:
    one = scope_digest(ARGS, {"type": "x"}, {"f": _resource("a.exe", "u1", "aa" * 32)}, {})
    same = scope_digest(ARGS, {"type": "x"}, {"f": _resource("b.exe", "u2", "aa" * 32)}, {})
    other = scope_digest(ARGS, {"type": "x"}, {"f": _resource("a.exe", "u1", "bb" * 32)}, {})
    obj = RemoteResource("c.bin", bucket=None, uid="u3", sha256="aa" * 32)
    as_object = scope_digest(ARGS, {"type": "x"}, {"f": obj}, {})
    assert one == same == as_object
    assert one != other


def test_a_different_header_value_gives_a_different_digest() -> None:
    a = scope_digest(ARGS, {"type": "x", "kind": "y"}, {}, {})
    b = scope_digest(ARGS, {"type": "x", "kind": "z"}, {}, {})
    assert a != b


def test_routing_fields_are_left_out_and_persistent_payload_counts() -> None:
    a = scope_digest(ARGS, {"type": "x", "receiver": "r1", "origin": "o1"}, {"p": 1}, {})
    b = scope_digest(ARGS, {"type": "x", "receiver": "r2", "origin": "o2"}, {"p": 1}, {})
    c = scope_digest(ARGS, {"type": "x"}, {"p": 1}, {"q": 2})
    d = scope_digest(ARGS, {"type": "x"}, {"p": 1}, {"__headers_persistent": {"h": 1}})
    assert a == b == d
    assert a != c


def test_keys_scope_looks_at_key_arguments_only() -> None:
    paths = ("headers.kind", "payload.meta.family")
    a = scope_digest(KEYS, {"kind": "pe", "x": 1}, {"meta": {"family": "f", "n": 1}}, {}, paths)
    b = scope_digest(KEYS, {"kind": "pe", "x": 2}, {"meta": {"family": "f", "n": 2}}, {}, paths)
    c = scope_digest(KEYS, {"kind": "elf", "x": 1}, {"meta": {"family": "f"}}, {}, paths)
    missing = scope_digest(KEYS, {"kind": "pe"}, {}, {}, paths)
    assert a == b
    assert a != c != missing
    assert scope_digest(ConcurrencyControlType.TASK, {"a": 1}, {}, {}) == scope_digest(
        ConcurrencyControlType.TASK, {"b": 2}, {"c": 3}, {}
    )


def test_keys_digests_are_memoised_by_value_and_type() -> None:
    paths = ("headers.k",)
    one, true, real = (scope_digest(KEYS, {"k": v}, {}, {}, paths) for v in (1, True, 1.0))
    assert len({one, true, real}) == 3  # JSON tells them apart, so must the memo
    assert scope_digest(KEYS, {"k": 1}, {}, {}, paths) == one
    nested = scope_digest(KEYS, {"k": {"a": [1]}}, {}, {}, paths)  # not memoised
    assert nested == scope_digest(KEYS, {"k": {"a": [1]}}, {}, {}, paths) != one


@pytest.mark.parametrize(
    ("mode", "paths"),
    [
        (KEYS, ("headers.k",)),
        (KEYS, ("headers.k", "headers.j")),
        (KEYS, ("headers.k", "payload.p")),
        (KEYS, ("headers.k.deep",)),
        (ARGS, ()),
        (ConcurrencyControlType.TASK, ()),
    ],
)
def test_the_fast_scoper_gives_task_scope_digests(
    mode: ConcurrencyControlType, paths: tuple[str, ...]
) -> None:
    scoper = task_scoper(mode, paths)
    for headers in ({"k": "a"}, {"k": 1}, {"k": True}, {"k": None}, {}, {"k": {"deep": [1]}},
                    {"k": "a", "j": 2.5}):  # fmt: skip
        task = Task({"type": "x", **headers}, payload={"p": 1})
        assert scoper(task) == task_scope(task, mode, paths), headers


def test_a_parsed_task_and_its_wire_document_give_the_same_digest() -> None:
    task = Task({"type": "x", "receiver": "r"}, payload={"f": _resource("a", "u", "cc" * 32)})
    wire = Task.unserialize(task.serialize())
    doc: dict[str, Any] = {"headers": {"type": "x"}, "payload": task.payload, "pp": {}}
    assert task_scope(wire, ARGS, ()) == scope_digest(ARGS, doc["headers"], doc["payload"], {})
    assert isinstance(wire.payload["f"], RemoteResource)


def test_differing_fields_name_the_top_level_arguments_that_differ() -> None:
    mine = argument_fields({"type": "x", "kind": "a"}, {"v": 1, "w": 1}, {})
    theirs = argument_fields({"type": "x", "kind": "a"}, {"v": 2, "w": 1, "extra": 0}, {})
    assert differing_fields(mine, theirs) == ["payload.extra", "payload.v"]
    assert differing_fields(mine, theirs, ["payload.v"]) == ["payload.extra"]


# -- policy ------------------------------------------------------------------------------------


def test_control_type_parses_case_insensitively_and_names_bad_values() -> None:
    assert ConcurrencyControlType.parse(" KeYs ") is KEYS
    with pytest.raises(ConfigError, match="disabled, task, arguments, keys"):
        ConcurrencyControlType.parse("lock", option="running_concurrency")


def test_policy_resolves_config_over_class_defaults() -> None:
    config = Config(search_paths=[], environ={})
    config.set("karton", "running_concurrency", "Keys")
    config.set("karton", "key_arguments", "headers.kind, payload.sample")
    config.set("karton", "reroute_on_concurrency_control", "true")
    policy = ConcurrencyPolicy.resolve(
        config, {"running_concurrency": "task", "on_diff_non_key_args_raise": True}
    )
    assert policy.running_concurrency is KEYS
    assert policy.key_arguments == ("headers.kind", "payload.sample")
    assert policy.reroute_on_concurrency_control and policy.on_diff_non_key_args_raise
    assert ConcurrencyPolicy.from_json(policy.to_json()) == policy
    assert '"running_concurrency":"keys"' in policy.to_json()
    assert policy.differences(ConcurrencyPolicy()) == [
        "key_arguments",
        "on_diff_non_key_args_raise",
        "reroute_on_concurrency_control",
        "running_concurrency",
    ]


def test_keys_without_key_arguments_and_bad_paths_are_refused() -> None:
    with pytest.raises(ConfigError, match="needs key_arguments"):
        ConcurrencyPolicy(running_concurrency=KEYS)
    with pytest.raises(ConfigError, match=r"headers\.<name> or payload\.<name>"):
        ConcurrencyPolicy(running_concurrency=KEYS, key_arguments=("kind",))


# -- scripts -----------------------------------------------------------------------------------


@pytest.fixture
async def backend() -> AsyncIterator[KartonBackend]:
    b = KartonBackend(EmbeddedConnector())
    try:
        yield b
    finally:
        await b.aclose()


async def _lease(b: KartonBackend, uid: str, seconds: float) -> None:
    await b.redis.zadd(keys.leases_key(ID), {uid: int((time.time() + seconds) * 1000)})
    await b.redis.set(keys.task_key(uid), "{}")


def _ask(uid: str, digest: str = "k1", info: str = "") -> Admission:
    return Admission(uid, digest, info, keys.queue_key("normal", ID), "")


@pytest.mark.anyio
async def test_a_live_holder_blocks_and_an_expired_one_is_taken_over(
    backend: KartonBackend,
) -> None:
    store = SlotStore(backend, ID)
    await _lease(backend, "a", 30)
    await _lease(backend, "b", 30)
    [first, second] = await store.acquire([_ask("a"), _ask("b")], reroute=False, on_diff=False)
    assert (first.outcome, second.outcome, second.holder) == ("run", "blocked", "a")
    await backend.redis.zadd(keys.leases_key(ID), {"a": int(time.time() * 1000) - 1})
    [third] = await store.acquire([_ask("b")], reroute=False, on_diff=False)
    assert third.outcome == "run"
    assert await backend.redis.hget(running_key(ID), "k1") == "b"
    assert await store.stats() == {"blocked": 1, "taken_over": 1}


@pytest.mark.anyio
async def test_reroute_parks_and_release_moves_one_task_to_the_queue_head(
    backend: KartonBackend,
) -> None:
    store = SlotStore(backend, ID)
    queue = keys.queue_key("normal", ID)
    for uid in ("a", "b", "c"):
        await _lease(backend, uid, 30)
    await backend.redis.rpush(queue, "other")
    out = await store.acquire([_ask("a"), _ask("b"), _ask("c")], reroute=True, on_diff=False)
    assert [o.outcome for o in out] == ["run", "parked", "parked"]
    assert await backend.redis.zscore(keys.leases_key(ID), "b") is None
    assert await backend.redis.hget(parked_index_key(ID), "b") == f"k1 {queue}"

    assert await store.release([("k1", "b")]) == [False]  # not the holder: no-op
    assert await backend.redis.lrange(queue, 0, -1) == ["other"]
    assert await store.release([("k1", "a")]) == [True]
    assert await backend.redis.lrange(queue, 0, -1) == ["b", "other"]
    assert await backend.redis.hget(running_key(ID), "k1") is None
    assert await store.release([("k1", "a")]) == [False]  # twice is harmless
    assert await backend.redis.lrange(queue, 0, -1) == ["b", "other"]
    [again] = await store.acquire([_ask("b")], reroute=True, on_diff=False)
    assert again.outcome == "run"
    assert (await store.stats())["unparked"] == 1


@pytest.mark.anyio
async def test_sweep_frees_the_slot_of_a_holder_whose_lease_expired(
    backend: KartonBackend,
) -> None:
    store = SlotStore(backend, ID)
    queue = keys.queue_key("normal", ID)
    await _lease(backend, "a", 30)
    await _lease(backend, "b", 30)
    await store.acquire([_ask("a"), _ask("b")], reroute=True, on_diff=False)
    assert await store.sweep() == 0  # the holder is alive
    await backend.redis.zadd(keys.leases_key(ID), {"a": int(time.time() * 1000) - 1})
    assert await store.sweep() == 1
    assert await backend.redis.lrange(queue, 0, -1) == ["b"]
    assert await backend.redis.hlen(running_key(ID)) == 0


@pytest.mark.anyio
async def test_on_diff_reports_the_holder_arguments_only_when_they_differ(
    backend: KartonBackend,
) -> None:
    store = SlotStore(backend, ID)
    for uid in ("a", "b", "c"):
        await _lease(backend, uid, 30)
    out = await store.acquire(
        [_ask("a", info='d1 {"x":"1"}'), _ask("b", info='d2 {"x":"2"}'), _ask("c", info="d1 {}")],
        reroute=False,
        on_diff=True,
    )
    assert [(o.outcome, o.holder, o.info) for o in out] == [
        ("run", "a", ""),  # run: the holders written
        ("differs", "a", 'd1 {"x":"1"}'),
        ("blocked", "a", 'd1 {"x":"1"}'),
    ]
    assert await backend.redis.hgetall(concurrency_stats_key(ID)) == {
        "differing": "1",
        "blocked": "1",
    }


# -- the consumer, in-process ------------------------------------------------------------------


class KeyWorker(Consumer):
    """Holds each task a while and records overlaps per key from inside the handler."""

    identity = "test.keyworker"
    filters: ClassVar[list[dict[str, Any]]] = [{"type": "keyed"}]
    running_concurrency = "keys"
    key_arguments = ("headers.key",)
    concurrency_limit = 8
    active: ClassVar[dict[str, int]] = {}
    worst: ClassVar[int] = 0
    ran: ClassVar[list[str]] = []

    async def process(self, task: Task) -> None:
        key = str(task.headers["key"])
        cls = type(self)
        cls.active[key] = cls.active.get(key, 0) + 1
        cls.worst = max(cls.worst, cls.active[key])
        try:
            await anyio.sleep(float(task.payload.get("sleep", 0.05)))
        finally:
            cls.active[key] -= 1
        cls.ran.append(str(task.payload["n"]))


class RerouteWorker(KeyWorker):
    identity = "test.rerouter"
    reroute_on_concurrency_control = True


def _reset(cls: type[KeyWorker]) -> None:
    cls.active, cls.worst, cls.ran = {}, 0, []


@pytest.mark.anyio
async def test_blocked_task_ends_crashed_with_the_holder_named(tmp_path: Path) -> None:
    _reset(KeyWorker)
    async with testing.pipeline(KeyWorker, data_dir=tmp_path) as p:
        await p.send(*(Task({"type": "keyed", "key": "same"}, payload={"n": i}) for i in range(3)))
        await p.wait_idle()
        tasks = await p.tasks(receiver=KeyWorker.identity)
        stats = await SlotStore(p.producer.backend, KeyWorker.identity).stats()
    assert KeyWorker.worst == 1
    assert sorted(t.status.value for t in tasks) == ["Crashed", "Crashed", "Finished"]
    winner = next(t for t in tasks if t.status is TaskState.FINISHED)
    for crashed in (t for t in tasks if t.status is TaskState.CRASHED):
        text = "".join(crashed.error or [])
        assert "ConcurrencyControlled" in text and winner.uid in text and "keys" in text
    assert stats["blocked"] == 2


@pytest.mark.anyio
@pytest.mark.parametrize("local_waiters", [0, 16])
async def test_rerouted_tasks_all_run_later_one_key_at_a_time(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, local_waiters: int
) -> None:
    monkeypatch.setattr(concurrency_gate, "LOCAL_WAITERS_PER_SCOPE", local_waiters)
    _reset(RerouteWorker)
    async with testing.pipeline(RerouteWorker, data_dir=tmp_path) as p:
        await p.send(
            *(
                Task({"type": "keyed", "key": f"k{i % 3}"}, payload={"n": i, "sleep": 0.02})
                for i in range(30)
            )
        )
        with anyio.fail_after(20):
            await p.wait_idle(timeout=20)
        tasks = await p.tasks(receiver=RerouteWorker.identity)
        stats = await SlotStore(p.producer.backend, RerouteWorker.identity).stats()
    assert RerouteWorker.worst == 1
    assert sorted(RerouteWorker.ran, key=int) == [str(i) for i in range(30)]
    assert all(t.status is TaskState.FINISHED for t in tasks)
    if local_waiters:  # one process: every task waits here behind its key's holder
        assert "parked" not in stats
    else:
        assert stats["parked"] >= 1 and stats["unparked"] >= 1


class StrictKeyWorker(KeyWorker):
    identity = "test.strictkeys"
    on_diff_non_key_args_raise = True


@pytest.mark.anyio
async def test_equal_keys_with_different_other_arguments_crash_naming_the_fields(
    tmp_path: Path,
) -> None:
    _reset(StrictKeyWorker)
    async with testing.pipeline(StrictKeyWorker, data_dir=tmp_path) as p:
        await p.send(
            Task({"type": "keyed", "key": "k"}, payload={"n": 0, "sleep": 0.5}),
            Task({"type": "keyed", "key": "k"}, payload={"n": 1, "sleep": 0.5}),
            Task({"type": "keyed", "key": "k"}, payload={"n": 0, "sleep": 0.5}),
        )
        await p.wait_idle()
        tasks = await p.tasks(receiver=StrictKeyWorker.identity)
        stats = await SlotStore(p.producer.backend, StrictKeyWorker.identity).stats()
    errors = sorted("".join(t.error or []) for t in tasks if t.status is TaskState.CRASHED)
    assert StrictKeyWorker.ran == ["0"]
    assert len(errors) == 2
    assert "different non-key arguments: payload.n " in errors[1]
    assert "different non-key" not in errors[0] and "holds the slot" in errors[0]
    assert stats == {"differing": 1, "blocked": 1}


class Registrar(Consumer):
    """One task at a time; ``payload["sleep"]`` long; registration dedup on ``headers.key``."""

    identity = "test.registrar"
    filters: ClassVar[list[dict[str, Any]]] = [{"type": "reg"}]
    registration_concurrency = "keys"
    key_arguments = ("headers.key",)
    ran: ClassVar[list[str]] = []

    async def process(self, task: Task) -> None:
        type(self).ran.append(str(task.headers["key"]))
        await anyio.sleep(float(task.payload.get("sleep", 0)))


class StrictRegistrar(Registrar):
    identity = "test.strictregistrar"
    on_diff_non_key_args_raise = True


@pytest.mark.anyio
async def test_a_copy_equal_to_a_pending_one_is_not_queued_again(tmp_path: Path) -> None:
    Registrar.ran = []
    async with testing.pipeline(Registrar, data_dir=tmp_path) as p:
        await p.send(Task({"type": "reg", "key": "busy"}, payload={"sleep": 0.5}))
        with anyio.fail_after(5):
            while Registrar.ran != ["busy"]:
                await anyio.sleep(0.01)
        await p.send(*(Task({"type": "reg", "key": "a"}, payload={"n": n}) for n in range(4)))
        await p.wait_idle()
        await p.send(Task({"type": "reg", "key": "a"}))  # nothing pending any more: queued
        await p.wait_idle()
        tasks = await p.tasks(receiver=Registrar.identity)
        stats = await SlotStore(p.producer.backend, Registrar.identity).stats()
    assert Registrar.ran == ["busy", "a", "a"]
    assert stats == {"duplicates": 3}
    assert all(t.status is TaskState.FINISHED for t in tasks) and len(tasks) == 6


@pytest.mark.anyio
async def test_registration_with_differing_other_arguments_crashes_the_newcomer(
    tmp_path: Path,
) -> None:
    StrictRegistrar.ran = []
    async with testing.pipeline(StrictRegistrar, data_dir=tmp_path) as p:
        await p.send(Task({"type": "reg", "key": "busy"}, payload={"sleep": 0.5}))
        with anyio.fail_after(5):
            while StrictRegistrar.ran != ["busy"]:
                await anyio.sleep(0.01)
        await p.send(
            Task({"type": "reg", "key": "a"}, payload={"n": 1}),
            Task({"type": "reg", "key": "a"}, payload={"n": 1}),
            Task({"type": "reg", "key": "a", "extra": "x"}, payload={"n": 2}),
        )
        await p.wait_idle()
        tasks = await p.tasks(receiver=StrictRegistrar.identity)
        stats = await SlotStore(p.producer.backend, StrictRegistrar.identity).stats()
    [crashed] = [t for t in tasks if t.status is TaskState.CRASHED]
    assert "different non-key arguments: headers.extra, payload.n " in "".join(crashed.error or [])
    assert StrictRegistrar.ran == ["busy", "a"]
    assert stats == {"duplicates": 1, "differing": 1}


@pytest.mark.anyio
async def test_replicas_publish_their_policy_and_warn_when_they_differ(
    backend: KartonBackend, caplog: pytest.LogCaptureFixture
) -> None:
    log = logging.getLogger("test.replicas")

    def gate(instance: str, policy: ConcurrencyPolicy) -> ConcurrencyGate:
        return ConcurrencyGate(
            backend=lambda: backend,
            identity=ID,
            policy=policy,
            log=log,
            crash=lambda task: None,
            instance=instance,
        )

    keyed = ConcurrencyPolicy(running_concurrency=KEYS, key_arguments=("headers.k",))
    with caplog.at_level(logging.WARNING, logger="test.replicas"):
        await gate("one", keyed).publish()
        await gate("two", keyed).publish()
        assert caplog.text == ""
        await anyio.sleep(0.01)  # the router takes the most recent one (ms stamps)
        await gate("three", ConcurrencyPolicy()).publish()
    assert "Replica one of test.slots" in caplog.text
    assert "key_arguments, running_concurrency differ" in caplog.text
    stored = await backend.redis.hget(policy_key(ID), "one")
    assert str(stored).split(" ", 1)[1] == keyed.to_json()
    assert await published_policies(backend, [ID, "nobody"]) == {ID: ConcurrencyPolicy().to_json()}


def _join(uid: str, expect: str, base: str, *, mode: str = "join", info: str = "") -> Admission:
    return Admission(uid, "k1", info, keys.queue_key("normal", ID), "", mode, expect, base)


@pytest.mark.anyio
async def test_a_join_lists_the_task_among_the_holders_and_keeps_the_slot_live(
    backend: KartonBackend,
) -> None:
    store = SlotStore(backend, ID)
    for uid in ("a", "b", "c", "x"):
        await _lease(backend, uid, 30)
    # One call: "a" takes the slot, "b" joins behind it (the call's own write counts).
    out = await store.acquire([_ask("a"), _join("b", "", "")], reroute=True, on_diff=False)
    assert [(o.outcome, o.holder) for o in out] == [("run", "a"), ("wait", "a,b")]
    # A later join names what this process wrote and the tasks it still has (not "a").
    [joined] = await store.acquire([_join("c", "a,b", "b")], reroute=True, on_diff=False)
    assert (joined.outcome, joined.holder) == ("wait", "b,c")
    assert await backend.redis.hget(running_key(ID), "k1") == "b,c"
    # "b" ended (its lease went with its final state): "c" keeps the slot live for others.
    await backend.redis.zrem(keys.leases_key(ID), "b")
    [other] = await store.acquire([_ask("x")], reroute=False, on_diff=False)
    assert (other.outcome, other.holder) == ("blocked", "c")
    # A release naming older holders is a no-op; the current ones release it.
    assert await store.release([("k1", "a,b")]) == [False]
    assert await store.release([("k1", "b,c")]) == [True]
    assert await backend.redis.hget(running_key(ID), "k1") is None


@pytest.mark.anyio
async def test_a_join_meets_whoever_holds_the_slot_when_it_is_no_longer_ours(
    backend: KartonBackend,
) -> None:
    store = SlotStore(backend, ID)
    for uid in ("a", "b", "x", "y"):
        await _lease(backend, uid, 30)
    await store.acquire([_ask("x")], reroute=True, on_diff=False)  # another process
    [parked] = await store.acquire([_join("a", "old", "")], reroute=True, on_diff=False)
    assert (parked.outcome, parked.holder) == ("parked", "x")
    [blocked] = await store.acquire([_join("b", "old", "")], reroute=False, on_diff=False)
    assert (blocked.outcome, blocked.holder) == ("blocked", "x")
    # Released meanwhile: a join takes the free slot (its process runs it at once).
    assert await store.release([("k1", "x")]) == [True]
    await backend.redis.delete(keys.queue_key("normal", ID))
    [took] = await store.acquire([_join("y", "old", "")], reroute=True, on_diff=False)
    assert (took.outcome, took.holder) == ("wait", "y")
    # Our own slot, but the task may not wait here (cap reached): parked behind it.
    [behind] = await store.acquire([_join("b", "y", "y", mode="park")], reroute=True, on_diff=False)
    assert behind.outcome == "parked"
    # Parked tasks of the scope exist: a join is parked behind them, not ahead.
    await _lease(backend, "z", 30)
    [fair] = await store.acquire([_join("z", "y", "y")], reroute=True, on_diff=False)
    assert fair.outcome == "parked"
    assert await backend.redis.lrange(keys.parked_prefix(ID) + "k1", 0, -1) == ["b", "z"]
    # ... unless its process may still run tasks ahead of them ("stay").
    await _lease(backend, "s", 30)
    [ahead] = await store.acquire([_join("s", "y", "y", mode="stay")], reroute=True, on_diff=False)
    assert (ahead.outcome, ahead.holder) == ("wait", "y,s")


@pytest.mark.anyio
async def test_join_without_reroute_or_with_other_arguments_is_refused(
    backend: KartonBackend,
) -> None:
    store = SlotStore(backend, ID)
    for uid in ("a", "b", "c"):
        await _lease(backend, uid, 30)
    out = await store.acquire(
        [_ask("a", info='d1 {"x":"1"}'), _join("b", "", "", info='d2 {"x":"2"}')],
        reroute=True,
        on_diff=True,
    )
    assert [(o.outcome, o.holder) for o in out] == [("run", "a"), ("differs", "a")]
    [blocked] = await store.acquire([_join("c", "a", "a")], reroute=False, on_diff=False)
    assert (blocked.outcome, blocked.holder) == ("blocked", "a")
    assert await backend.redis.hget(running_key(ID), "k1") == 'a d1 {"x":"1"}'


@pytest.mark.anyio
async def test_sweep_frees_a_slot_only_once_every_holder_is_gone(backend: KartonBackend) -> None:
    store = SlotStore(backend, ID)
    for uid in ("a", "b", "w"):
        await _lease(backend, uid, 30)
    await store.acquire([_ask("a"), _join("b", "", "")], reroute=True, on_diff=False)
    await store.acquire([_ask("w")], reroute=True, on_diff=False)  # parked behind a,b
    await backend.redis.zrem(keys.leases_key(ID), "a")
    assert await store.sweep() == 0  # "b" still holds it
    await backend.redis.zadd(keys.leases_key(ID), {"b": int(time.time() * 1000) - 1})
    assert await store.sweep() == 1
    assert await backend.redis.lrange(keys.queue_key("normal", ID), 0, -1) == ["w"]


# -- the gate: tasks of a scope this process holds wait here ---------------------------------


def _keyed_gate(backend: KartonBackend) -> tuple[ConcurrencyGate, list[Task], list[Task]]:
    crashed: list[Task] = []
    forgotten: list[Task] = []
    gate = ConcurrencyGate(
        backend=lambda: backend,
        identity=ID,
        policy=ConcurrencyPolicy(
            running_concurrency=KEYS,
            key_arguments=("headers.k",),
            reroute_on_concurrency_control=True,
        ),
        log=logging.getLogger("test.gate"),
        crash=crashed.append,
        forget=forgotten.append,
        instance="one",
    )
    return gate, crashed, forgotten


async def _keyed(backend: KartonBackend, *keys_: str) -> list[Task]:
    tasks = [Task({"type": "x", "k": k}) for k in keys_]
    for task in tasks:
        await _lease(backend, task.uid, 30)
    return tasks


@pytest.mark.anyio
async def test_gate_runs_the_tasks_of_a_held_scope_one_after_another_under_one_slot(
    backend: KartonBackend,
) -> None:
    gate, crashed, forgotten = _keyed_gate(backend)
    a1, b1, a2, a3 = await _keyed(backend, "a", "b", "a", "a")
    assert await gate.admit([a1, b1, a2]) == [a1, b1]
    assert await gate.admit([a3]) == []  # a1 still holds "a": a3 waits here too
    digest = task_scope(a1, KEYS, ("headers.k",))
    assert await backend.redis.hget(running_key(ID), digest) == f"{a1.uid},{a2.uid},{a3.uid}"
    assert gate.waiting == 2 and gate.ready() is None
    gate.release(a1)
    assert gate.ready() is a2  # its turn, no Redis write
    gate.release(a2)
    assert gate.ready() is a3
    gate.release(a3)
    gate.release(b1)
    assert gate.ready() is None
    async with anyio.create_task_group() as tg:
        tg.start_soon(gate.run)
        with anyio.fail_after(5):
            while await backend.redis.hlen(running_key(ID)):
                await anyio.sleep(0.01)
        tg.cancel_scope.cancel()
    assert gate._scopes == {} and gate.waiting == 0
    assert crashed == forgotten == []


@pytest.mark.anyio
async def test_gate_after_stop_starts_no_waiter_and_gives_them_back(
    backend: KartonBackend,
) -> None:
    gate, _, _ = _keyed_gate(backend)
    a1, a2, a3 = await _keyed(backend, "a", "a", "a")
    assert await gate.admit([a1, a2, a3]) == [a1]
    gate.stop()
    gate.release(a1)
    assert gate.ready() is None
    assert gate.leftovers() == [a2, a3]
    gate.release(a2)
    gate.release(a3)
    await gate._flush()
    assert await backend.redis.hlen(running_key(ID)) == 0
    assert gate._scopes == {}


@pytest.mark.anyio
async def test_gate_leftovers_include_a_task_whose_turn_came_and_nothing_takes_over(
    backend: KartonBackend,
) -> None:
    gate, _, _ = _keyed_gate(backend)
    a1, a2, a3 = await _keyed(backend, "a", "a", "a")
    assert await gate.admit([a1, a2, a3]) == [a1]
    gate.release(a1)  # a cancelled run (no stop()): a2's turn came, nobody ran it
    assert gate.leftovers() == [a2, a3]
    assert gate.ready() is None and gate.waiting == 0 and gate._of == {}
    await gate._flush()
    assert gate._scopes == {} and await backend.redis.hlen(running_key(ID)) == 0


@pytest.mark.anyio
async def test_gate_forgets_parked_tasks_and_tasks_of_a_failed_admission(
    backend: KartonBackend, monkeypatch: pytest.MonkeyPatch
) -> None:
    gate, _, forgotten = _keyed_gate(backend)
    other, _, _ = _keyed_gate(backend)
    x, a1, a2 = await _keyed(backend, "a", "a", "a")
    assert await other.admit([x]) == [x]  # another process holds "a"
    assert await gate.admit([a1]) == []
    assert forgotten == [a1]  # parked: it left this process

    async def down(*args: object, **kwargs: object) -> None:
        raise ConnectionError("redis is down")

    monkeypatch.setattr(SlotStore, "acquire", down)
    with pytest.raises(ConnectionError):
        await gate.admit([a2])
    assert forgotten == [a1, a2] and gate._scopes == {}


class Holder(Consumer):
    """The first task of a key holds it ``payload["sleep"]`` s; the others are quick."""

    identity = "test.holder"
    filters: ClassVar[list[dict[str, Any]]] = [{"type": "held"}]
    running_concurrency = "keys"
    key_arguments = ("headers.key",)
    reroute_on_concurrency_control = True
    concurrency_limit = 4
    ran: ClassVar[list[int]] = []

    async def process(self, task: Task) -> None:
        type(self).ran.append(int(task.payload["n"]))
        await anyio.sleep(float(task.payload.get("sleep", 0)))


@pytest.mark.anyio
async def test_stop_hands_back_tasks_waiting_behind_a_holder_and_frees_the_slot(
    tmp_path: Path,
) -> None:
    Holder.ran = []
    consumer = Holder(testing.embedded_config(tmp_path))
    async with testing.pipeline(consumer, data_dir=tmp_path) as p:
        redis = p.producer.backend.redis
        await p.send(
            Task({"type": "held", "key": "k"}, payload={"n": 0, "sleep": 0.5}),
            *(Task({"type": "held", "key": "k"}, payload={"n": n}) for n in (1, 2, 3)),
        )
        with anyio.fail_after(5):
            while consumer._gate.waiting < 3:
                await anyio.sleep(0.01)
        consumer.stop(grace=10)
        with anyio.fail_after(10):
            while consumer._scopes is not None:
                await anyio.sleep(0.01)
        tasks = await p.tasks(receiver=Holder.identity)
        queued = await redis.lrange(keys.queue_key("normal", Holder.identity), 0, -1)
        leases = await redis.zcard(keys.leases_key(Holder.identity))
        slots = await redis.hlen(running_key(Holder.identity))
    assert Holder.ran == [0]  # the holder finished; nothing started after stop()
    assert sorted(t.status.value for t in tasks) == ["Finished"] + ["Spawned"] * 3
    assert len(queued) == 3 and leases == 0 and slots == 0


@pytest.mark.anyio
async def test_holders_fetched_again_after_their_process_died_do_not_block_themselves(
    backend: KartonBackend,
) -> None:
    store = SlotStore(backend, ID)
    for uid in ("h", "w"):
        await _lease(backend, uid, 30)
    await store.acquire([_ask("h"), _join("w", "", "")], reroute=True, on_diff=False)
    # Their process died; both were requeued and fetched (leased) by another one.
    out = await store.acquire([_ask("w"), _join("h", "", "")], reroute=True, on_diff=False)
    assert [(o.outcome, o.holder) for o in out] == [("run", "w"), ("wait", "w,h")]
    assert (await store.stats())["taken_over"] == 1
