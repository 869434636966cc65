"""Restart / cancel / list of Crashed tasks on a real redis-server (dashboard semantics)."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
import redis.exceptions
from typer.testing import CliRunner

from asynckarton import Producer, Task, TaskPriority, TaskState
from asynckarton._errors import BackendUnavailableError, UnknownTaskError
from asynckarton.backend import KartonBackend, ServerConnector
from asynckarton.backend._keys import TASKS_QUEUE, dead_key, queue_key, task_key
from asynckarton.cli._app import app
from asynckarton.system._admin import cancel_crashed, last_error_line, list_crashed, restart_crashed
from tests.servers import RedisServer, S3Server, service_config

pytestmark = [pytest.mark.integration, pytest.mark.anyio]


def routed(receiver: str, status: TaskState, *, priority: TaskPriority | None = None) -> Task:
    """A routed copy of a fresh task, as the router writes it, then moved to ``status``."""
    original = Task({"type": "sample", "kind": "raw"}, payload={"n": 1}, priority=priority)
    task = original.fork_task()
    task.headers["receiver"] = receiver
    task.status = status
    task.attempt = 2
    if status is TaskState.CRASHED:
        task.error = ["Traceback (most recent call last):\n", "ValueError: boom\n"]
    return task


async def store(backend: KartonBackend, *tasks: Task, dead: bool = True) -> None:
    await backend.set_tasks(tasks)
    for task in tasks:
        if dead and task.status is TaskState.CRASHED and task.receiver:
            await backend.redis.rpush(dead_key(task.receiver), task.uid)


async def body(backend: KartonBackend, uid: str) -> dict[str, object]:
    raw = await backend.redis.get(task_key(uid))
    assert raw is not None
    doc: dict[str, object] = json.loads(raw)
    return doc


async def test_restart_by_uid_forks_like_karton_dashboard(backend: KartonBackend) -> None:
    crashed = routed("svc.a", TaskState.CRASHED, priority=TaskPriority.HIGH)
    await store(backend, crashed)
    before = time.time()

    (new_uid,) = await restart_crashed(backend, uids=[crashed.uid])

    fork = await body(backend, new_uid)
    assert new_uid != crashed.uid and new_uid.startswith("{" + crashed.root_uid + "}:")
    assert fork["status"] == "Spawned"
    assert fork["orig_uid"] == crashed.orig_uid  # points at the unrouted task
    assert fork["root_uid"] == crashed.root_uid
    assert fork["parent_uid"] == crashed.parent_uid
    assert fork["headers"] == crashed.headers  # same receiver
    assert fork["error"] is None
    assert "asynckarton" not in fork  # the retry count starts again
    assert float(fork["last_update"]) >= before  # type: ignore[arg-type]
    assert await backend.redis.lrange(queue_key("high", "svc.a"), 0, -1) == [new_uid]
    original = await body(backend, crashed.uid)
    assert original["status"] == "Finished"
    assert await backend.redis.lrange(dead_key("svc.a"), 0, -1) == []


async def test_restart_selects_by_identity_or_all(backend: KartonBackend) -> None:
    a1, a2 = routed("svc.a", TaskState.CRASHED), routed("svc.a", TaskState.CRASHED)
    b1 = routed("svc.b", TaskState.CRASHED)
    started = routed("svc.a", TaskState.STARTED)
    await store(backend, a1, a2, b1, started)

    new = await restart_crashed(backend, identity="svc.a")
    assert len(new) == 2
    assert sorted(await backend.redis.lrange(queue_key("normal", "svc.a"), 0, -1)) == sorted(new)
    assert (await body(backend, b1.uid))["status"] == "Crashed"
    assert (await body(backend, started.uid))["status"] == "Started"  # never touched

    (again,) = await restart_crashed(backend, all=True)
    assert await backend.redis.lrange(queue_key("normal", "svc.b"), 0, -1) == [again]
    assert await restart_crashed(backend, all=True) == []  # nothing Crashed is left


async def test_restart_accepts_bare_task_uids(backend: KartonBackend) -> None:
    crashed = routed("svc.a", TaskState.CRASHED)
    await store(backend, crashed)
    (new,) = await restart_crashed(backend, uids=[crashed.task_uid])
    assert (await body(backend, new))["status"] == "Spawned"
    assert (await body(backend, crashed.uid))["status"] == "Finished"


async def test_uids_that_are_missing_or_not_crashed_are_refused_and_nothing_changes(
    backend: KartonBackend,
) -> None:
    crashed = routed("svc.a", TaskState.CRASHED)
    finished = routed("svc.a", TaskState.FINISHED)
    await store(backend, crashed, finished)
    for act in (restart_crashed, cancel_crashed):
        with pytest.raises(UnknownTaskError) as info:
            await act(backend, uids=[crashed.uid, finished.uid, "{x}:missing"])
        assert info.value.problems == {
            finished.uid: "it is Finished, not Crashed",
            "{x}:missing": "no such task",
        }
        assert (await body(backend, crashed.uid))["status"] == "Crashed"
    assert await backend.redis.llen(queue_key("normal", "svc.a")) == 0


async def test_cancel_sets_finished_and_clears_dead_letters(backend: KartonBackend) -> None:
    a, b = routed("svc.a", TaskState.CRASHED), routed("svc.a", TaskState.CRASHED)
    await store(backend, a, b)
    assert await cancel_crashed(backend, uids=[a.uid]) == [a.uid]
    assert (await body(backend, a.uid))["status"] == "Finished"
    assert (await body(backend, b.uid))["status"] == "Crashed"
    assert await backend.redis.lrange(dead_key("svc.a"), 0, -1) == [b.uid]
    assert await backend.redis.llen(queue_key("normal", "svc.a")) == 0


async def test_list_crashed_and_selector_validation(backend: KartonBackend) -> None:
    crashed = routed("svc.a", TaskState.CRASHED)
    await store(backend, crashed, routed("svc.a", TaskState.SPAWNED))
    (found,) = await list_crashed(backend)
    assert found.uid == crashed.uid and found.receiver == "svc.a"
    assert last_error_line(found) == "ValueError: boom"
    with pytest.raises(ValueError, match="exactly one"):
        await restart_crashed(backend)
    with pytest.raises(ValueError, match="exactly one"):
        await cancel_crashed(backend, identity="svc.a", all=True)


async def test_restarted_task_is_readable_by_karton_core(backend: KartonBackend) -> None:
    from karton.core.task import Task as KartonTask

    crashed = routed("svc.a", TaskState.CRASHED)
    await store(backend, crashed)
    (new_uid,) = await restart_crashed(backend, all=True)
    raw = await backend.get_task_body(new_uid)
    assert raw is not None
    parsed = KartonTask.unserialize(raw)
    assert parsed.status.value == "Spawned"
    assert parsed.headers["receiver"] == "svc.a"


def test_tasks_cli_list_restart_cancel(  # sync: the CLI runs its own event loop
    redis_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    ini = tmp_path / "karton.ini"
    ini.write_text(f"[redis]\nurl = {redis_url}\n", encoding="utf-8")
    a, b = routed("svc.a", TaskState.CRASHED), routed("svc.b", TaskState.CRASHED)
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    client.mset({task_key(t.uid): t.serialize() for t in (a, b)})
    runner = CliRunner()

    listed = runner.invoke(app, ["tasks", "list", "--config-file", str(ini)])
    assert listed.exit_code == 0, listed.output
    assert f"{a.uid}  svc.a  ValueError: boom" in listed.stdout
    assert "2 crashed task(s)" in listed.stderr

    restarted = runner.invoke(
        app, ["tasks", "restart", "--identity", "svc.a", "--config-file", str(ini)]
    )
    assert restarted.exit_code == 0, restarted.output
    (new_uid,) = restarted.stdout.split()
    assert client.lrange(queue_key("normal", "svc.a"), 0, -1) == [new_uid]

    cancelled = runner.invoke(app, ["tasks", "cancel", "--uid", b.uid, "--config-file", str(ini)])
    assert cancelled.exit_code == 0, cancelled.output
    assert cancelled.stdout.split() == [b.uid]
    assert json.loads(client.get(task_key(b.uid)) or "{}")["status"] == "Finished"

    unknown = runner.invoke(
        app, ["tasks", "restart", "--uid", "nonexistent", "--config-file", str(ini)]
    )
    assert unknown.exit_code == 1, unknown.output
    assert "nonexistent: no such task" in unknown.stderr
    client.close()


# -- Redis down: typed errors naming the operation and the server ------------------------


@pytest.fixture
def stopped_redis() -> Iterator[RedisServer]:
    """A redis-server that was started once (its port is known) and is stopped now."""
    server = RedisServer()
    server.start()
    server.stop()
    try:
        yield server
    finally:
        server.close()


async def test_admin_functions_raise_backend_errors_when_redis_is_down(
    stopped_redis: RedisServer,
) -> None:
    backend = KartonBackend(ServerConnector(url=stopped_redis.url, socket_timeout=2))
    try:
        for call, operation in (
            (lambda: list_crashed(backend), "scan the tasks"),
            (lambda: restart_crashed(backend, uids=["{r}:u"]), "read tasks"),
            (lambda: cancel_crashed(backend, all=True), "scan the tasks"),
        ):
            with pytest.raises(BackendUnavailableError) as info:
                await call()
            error = info.value
            assert error.operation == operation
            assert error.address == stopped_redis.url
            assert str(error).startswith(f"Redis at {stopped_redis.url} failed to {operation}: ")
            assert isinstance(error.__cause__, redis.exceptions.ConnectionError)
    finally:
        await backend.aclose()


async def test_producer_raises_backend_error_when_redis_is_down(
    stopped_redis: RedisServer, s3_srv: S3Server, s3_bucket: str
) -> None:
    config = service_config(stopped_redis.url, s3_srv, s3_bucket, source="test")
    async with Producer(config, identity="test.producer") as producer:
        with pytest.raises(BackendUnavailableError, match="failed to send tasks") as info:
            await producer.send_task(Task({"type": "sample"}))
        assert info.value.address == stopped_redis.url
        assert isinstance(info.value.__cause__, redis.exceptions.ConnectionError)
        stopped_redis.start()  # Redis is back: the same producer works again
        await producer.send_task(Task({"type": "sample"}))
    client = redis.Redis.from_url(stopped_redis.url, decode_responses=True)
    assert client.llen(TASKS_QUEUE) == 1
    client.close()


def test_tasks_cli_names_the_server_when_redis_is_down(
    stopped_redis: RedisServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    ini = tmp_path / "karton.ini"
    ini.write_text(f"[redis]\nurl = {stopped_redis.url}\n", encoding="utf-8")
    listed = CliRunner().invoke(app, ["tasks", "list", "--config-file", str(ini)])
    assert listed.exit_code == 1
    assert (
        f"asynckarton: error: Redis at {stopped_redis.url} ([redis] url from {ini}:2) "
        "failed to scan the tasks: ConnectionError: " in listed.stderr
    ), listed.stderr
