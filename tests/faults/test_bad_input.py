"""Bad input: each case gets a clear error naming the problem, everything else keeps going.

Services run in-process (fast) but against the real redis-server (``redis_url``, flushed
per test) and the moto S3 server, never the embedded default.
"""

from __future__ import annotations

import io
import json
import logging
import os
import stat
import time
import uuid
import zipfile
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Any, ClassVar

import anyio
import pytest
import redis

from asynckarton import (
    Config,
    ConfigError,
    Consumer,
    InvalidTaskError,
    LocalResource,
    Producer,
    ResourceNotFoundError,
    Task,
    UnsafeArchiveError,
)
from asynckarton.backend import Bind
from asynckarton.storage import S3Storage
from asynckarton.system import SystemService
from tests.faults.conftest import poll
from tests.servers import S3Server, service_config

pytestmark = [
    pytest.mark.anyio,
    pytest.mark.faults,
    pytest.mark.integration,
    pytest.mark.timeout(60),
]

ID = "bad.recorder"
QUEUE = f"karton.queue.normal:{ID}"
LEASES = f"asynckarton.leases:{ID}"
MiB = 1 << 20


class Recorder(Consumer):
    """Records the ``n`` of every task; can download resources or extract archives."""

    identity = ID
    filters = [{"type": "bad"}]
    seen: ClassVar[list[Any]] = []
    errors: ClassVar[list[BaseException]] = []
    extract_root: ClassVar[Path | None] = None

    async def process(self, task: Task) -> None:
        try:
            if task.has_payload("sample"):
                await task.get_resource("sample").download()
            if task.has_payload("archive"):
                assert self.extract_root is not None
                target = self.extract_root / "target" / task.task_uid
                await task.get_resource("archive").extract_to_directory(target, max_size=MiB)
        except Exception as exc:
            type(self).errors.append(exc)
            raise
        type(self).seen.append(task.payload.get("n"))


@pytest.fixture
def env(redis_url: str, s3_srv: S3Server, s3_bucket: str, tmp_path: Path) -> dict[str, Any]:
    import boto3  # type: ignore[import-untyped]

    boto3.client(
        "s3",
        endpoint_url=s3_srv.url,
        aws_access_key_id=s3_srv.access_key,
        aws_secret_access_key=s3_srv.secret_key,
        region_name="us-east-1",
    ).create_bucket(Bucket=s3_bucket)
    Recorder.seen, Recorder.errors, Recorder.extract_root = [], [], tmp_path
    config = service_config(
        redis_url, s3_srv, s3_bucket, source="test",
        karton={"lease_timeout": 3}, system={"enable_gc": 0}, logging={"enable_publish": 0},
    )  # fmt: skip
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    return {"config": config, "r": client, "bucket": s3_bucket, "s3": s3_srv, "tmp": tmp_path}


@asynccontextmanager
async def running(
    config: Config, *, system: bool = True, consumer: bool = True
) -> AsyncIterator[Producer]:
    """Run the system service and a Recorder in-process; yield a producer."""
    async with AsyncExitStack() as stack:
        services: list[Any] = []
        if system:
            services.append(await stack.enter_async_context(SystemService(config)))
        if consumer:
            services.append(await stack.enter_async_context(Recorder(config)))
        producer = await stack.enter_async_context(Producer(config, identity="bad.producer"))
        group = await stack.enter_async_context(anyio.create_task_group())
        stack.callback(group.cancel_scope.cancel)
        for service in services:
            await group.start(service.run)
        yield producer


def good(n: int, **payload: Any) -> Task:
    return Task({"type": "bad", "kind": "good"}, payload={"n": n, **payload})


def raw_task(status: str = "Declared", **fields: Any) -> tuple[str, str]:
    """A Karton 5 task document written by hand; returns (uid, body)."""
    root = str(uuid.uuid4())
    uid = f"{{{root}}}:{uuid.uuid4()}"
    doc = {
        "uid": uid,
        "root_uid": root,
        "parent_uid": None,
        "orig_uid": None,
        "status": status,
        "priority": "normal",
        "last_update": time.time(),
        "headers": {"type": "bad", "origin": "hand"},
        "headers_persistent": {},
        "payload": {"n": "hand"},
        "payload_persistent": {},
        "error": None,
        **fields,
    }
    return uid, json.dumps(doc, sort_keys=True)


def errors_logged(caplog: pytest.LogCaptureFixture) -> str:
    return "\n".join(r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING)


async def bucket_keys(env: dict[str, Any]) -> list[str]:
    s3: S3Server = env["s3"]
    async with S3Storage(s3.url, s3.access_key, s3.secret_key) as storage:
        return sorted([v.key async for v in storage.list_object_versions(env["bucket"])])


# -- malformed bodies --------------------------------------------------------------------


async def test_router_quarantines_malformed_json_and_routes_the_rest(
    env: dict[str, Any], caplog: pytest.LogCaptureFixture
) -> None:
    r = env["r"]
    broken = {"bad-json": "{not json", "bad-list": "[1, 2, 3]", "bad-fields": '{"uid": 1}'}
    for uid, body in broken.items():
        r.set(f"karton.task:{uid}", body)
    async with running(env["config"]) as producer:
        await producer.send_tasks([good(1), good(2)])
        r.rpush("karton.tasks", *broken)
        await producer.send_tasks([good(3)])
        await poll(lambda: sorted(Recorder.seen) == [1, 2, 3], 20, "good tasks to be processed")
        await poll(lambda: r.llen("asynckarton.invalid") == 3, 10, "quarantine")
        await producer.send_tasks([good(4)])  # the router still routes afterwards
        await poll(lambda: 4 in Recorder.seen, 20, "a task sent after the bad ones")
    assert sorted(r.lrange("asynckarton.invalid", 0, -1)) == sorted(broken)
    assert r.hget("asynckarton.stats", "invalid") == "3"
    log = errors_logged(caplog)
    for uid in broken:
        assert f"Task {uid} is unreadable" in log, log
    assert "not valid JSON" in log and "not an object" in log


async def test_consumer_quarantines_a_malformed_body_in_its_queue(
    env: dict[str, Any], caplog: pytest.LogCaptureFixture
) -> None:
    r = env["r"]
    r.set("karton.task:consumer-bad", "{oops")
    r.rpush(QUEUE, "consumer-bad")
    async with running(env["config"]) as producer:
        await producer.send_tasks([good(1), good(2)])
        await poll(lambda: sorted(Recorder.seen) == [1, 2], 20, "good tasks")
        await poll(lambda: r.llen("asynckarton.invalid") == 1, 10, "quarantine")
    assert r.lrange("asynckarton.invalid", 0, -1) == ["consumer-bad"]
    assert r.zcard(LEASES) == 0, "a quarantined task must not keep its lease"
    assert "Task consumer-bad has an unreadable body" in errors_logged(caplog)


async def test_missing_task_body_is_skipped_with_a_warning(
    env: dict[str, Any], caplog: pytest.LogCaptureFixture
) -> None:
    r = env["r"]
    r.rpush("karton.tasks", "ghost-unrouted")
    r.rpush(QUEUE, "ghost-routed")
    async with running(env["config"]) as producer:
        await producer.send_tasks([good(1)])
        await poll(lambda: Recorder.seen == [1], 20, "the good task")
        await poll(lambda: r.llen(QUEUE) == 0 and r.zcard(LEASES) == 0, 10, "queue drained")
    log = errors_logged(caplog)
    assert "Task ghost-unrouted has no body" in log, log
    assert "Task ghost-routed vanished" in log, log
    assert not r.exists("karton.task:ghost-unrouted", "karton.task:ghost-routed")


async def test_unknown_status_is_quarantined_and_named(
    env: dict[str, Any], caplog: pytest.LogCaptureFixture
) -> None:
    r = env["r"]
    unrouted, body = raw_task(status="Bogus")
    r.set(f"karton.task:{unrouted}", body)
    routed, body = raw_task(status="Exploded", headers={"type": "bad", "receiver": ID})
    r.set(f"karton.task:{routed}", body)
    r.rpush(QUEUE, routed)
    async with running(env["config"]) as producer:
        r.rpush("karton.tasks", unrouted)
        await producer.send_tasks([good(1)])
        await poll(lambda: Recorder.seen == [1], 20, "the good task")
        await poll(lambda: r.llen("asynckarton.invalid") == 2, 10, "quarantine")
    lines = errors_logged(caplog).splitlines()
    for uid, value in ((unrouted, "'Bogus'"), (routed, "'Exploded'")):
        # Named by the uid, and by the field or the offending value.
        assert any(uid in line and ("status" in line or value in line) for line in lines), lines
    assert r.zcard(LEASES) == 0


async def test_unknown_status_error_says_status() -> None:
    _, body = raw_task(status="Bogus")
    with pytest.raises(InvalidTaskError, match="status"):
        Task.unserialize(body)


# -- binds -------------------------------------------------------------------------------


async def test_invalid_binds_do_not_stop_routing_for_others(
    env: dict[str, Any], caplog: pytest.LogCaptureFixture
) -> None:
    r = env["r"]
    bad = {
        "bad.operator": [{"$foo": 1}],
        "bad.regex": [{"x": {"$regex": "("}}],
        "bad.shape": "not a list of rules",
    }
    for identity, filters in bad.items():
        r.hset(
            "karton.binds",
            identity,
            json.dumps({"filters": filters, "info": None, "persistent": True, "version": "5.9.1"}),
        )
    r.hset("karton.binds", "bad.json", "{{{")
    # Evaluating this one raises for string headers ($mod on a str): skipped at match time.
    r.hset(
        "karton.binds",
        "bad.dynamic",
        Bind(identity="bad.dynamic", filters=[{"type": "bad", "kind": {"$mod": [2, 0]}}]).to_json(),
    )
    async with running(env["config"]) as producer:
        await producer.send_tasks([good(1), good(2)])
        await poll(lambda: sorted(Recorder.seen) == [1, 2], 20, "routing for the good bind")
    log = errors_logged(caplog)
    for identity in [*bad, "bad.json"]:
        assert f"Bind of {identity}" in log, f"no error names {identity}:\n{log}"
    assert "$foo" in log and "regex" in log.lower()
    for identity in [*bad, "bad.json", "bad.dynamic"]:
        assert r.llen(f"karton.queue.normal:{identity}") == 0


async def test_a_bind_failing_at_match_time_is_reported(
    env: dict[str, Any], caplog: pytest.LogCaptureFixture
) -> None:
    r = env["r"]
    r.hset(
        "karton.binds",
        "bad.dynamic",
        Bind(identity="bad.dynamic", filters=[{"type": "bad", "kind": {"$mod": [2, 0]}}]).to_json(),
    )
    async with running(env["config"]) as producer:
        await producer.send_tasks([good(1)])
        await poll(lambda: Recorder.seen == [1], 20, "routing for the good bind")
    assert "bad.dynamic" in errors_logged(caplog)


# -- producer side -----------------------------------------------------------------------


async def test_unserialisable_payload_fails_before_anything_is_written(env: dict[str, Any]) -> None:
    r = env["r"]
    async with Producer(env["config"], identity="bad.producer") as producer:
        await producer.send_tasks([good(0)])  # the runtime is warm, keys exist
        before_db, before_s3 = r.dbsize(), await bucket_keys(env)
        with_resource = good(1, sample=LocalResource("sample", b"MZ" * 100))
        broken = good(2, handle=object())
        with pytest.raises(InvalidTaskError, match="not JSON-serialisable") as info:
            await producer.send_tasks([with_resource, broken])
        assert info.value.uid == broken.uid
        with pytest.raises(InvalidTaskError):
            await producer.send_task(good(3, when={1, 2}))
        assert r.dbsize() == before_db
        assert await bucket_keys(env) == before_s3
        assert r.llen("karton.tasks") == 1
        await producer.send_task(good(4))  # and the producer keeps working
    assert r.llen("karton.tasks") == 2


# -- resources ---------------------------------------------------------------------------


async def test_resource_whose_object_is_gone_crashes_only_its_task(env: dict[str, Any]) -> None:
    r = env["r"]
    r.hset("karton.binds", ID, Recorder(env["config"]).bind.to_json())
    doomed = good(1, sample=LocalResource("sample", b"gone soon"))
    fine = good(2, sample=LocalResource("sample", b"still here"))
    async with running(env["config"], consumer=False) as producer:
        await producer.send_tasks([doomed, fine])
        await poll(lambda: r.llen(QUEUE) == 2, 20, "both tasks routed")
    s3: S3Server = env["s3"]
    key = doomed.get_payload("sample").uid
    async with S3Storage(s3.url, s3.access_key, s3.secret_key) as storage:
        await storage.delete_objects(env["bucket"], [key])
    async with running(env["config"], system=False):
        await poll(lambda: Recorder.seen == [2], 20, "the intact task")
        await poll(lambda: r.hget("karton.metrics.crashed", ID) == "1", 10, "the crash")
    [error] = Recorder.errors
    assert isinstance(error, ResourceNotFoundError) and key in str(error)
    crashed = [json.loads(r.get(k)) for k in r.scan_iter("karton.task:*")]
    [doc] = [d for d in crashed if d["status"] == "Crashed"]
    assert doc["root_uid"] == doomed.root_uid
    assert "ResourceNotFoundError" in "".join(doc["error"]) and key in "".join(doc["error"])


def _zip(members: list[tuple[str, bytes]], *, symlinks: dict[str, str] | None = None) -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, data in members:
            archive.writestr(zipfile.ZipInfo(name), data)
        for name, target in (symlinks or {}).items():
            info = zipfile.ZipInfo(name)
            info.external_attr = (stat.S_IFLNK | 0o777) << 16
            archive.writestr(info, target)
    return out.getvalue()


def _lying_zip() -> bytes:
    """One member whose headers claim 10 bytes but which inflates to 4 MiB."""
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("bomb.bin", b"\0" * (4 * MiB))
    data = bytearray(out.getvalue())
    real = (4 * MiB).to_bytes(4, "little")
    for signature, offset in ((b"PK\x03\x04", 22), (b"PK\x01\x02", 24)):
        at = data.find(signature)
        assert data[at + offset : at + offset + 4] == real
        data[at + offset : at + offset + 4] = (10).to_bytes(4, "little")
    return bytes(data)


async def test_unsafe_directory_archives_are_refused(env: dict[str, Any], tmp_path: Path) -> None:
    marker = f"faults-escape-{uuid.uuid4().hex}"
    outside = tmp_path / "target" / marker  # sibling of each task's own target directory
    archives = {
        "traversal": _zip([("ok.txt", b"fine"), (f"../{marker}", b"escaped")]),
        "absolute": _zip([(f"/tmp/{marker}", b"escaped")]),
        "symlink": _zip([("ok.txt", b"fine")], symlinks={"link": "../../../../etc/passwd"}),
        "bomb": _zip([("zeros.bin", b"\0" * (2 * MiB))]),  # 2 MiB declared > max_size 1 MiB
        "lying bomb": _lying_zip(),
    }
    tasks = [
        good(i, archive=LocalResource(f"{name}.zip", data, flags=["Directory"]))
        for i, (name, data) in enumerate(archives.items())
    ]
    safe = await LocalResource.from_directory("safe", _tree(tmp_path / "src"), in_memory=True)
    async with running(env["config"]) as producer:
        await producer.send_tasks([*tasks, good(99, archive=safe)])
        await poll(lambda: Recorder.seen == [99], 30, "the safe archive")
        await poll(lambda: len(Recorder.errors) == len(archives), 30, "every unsafe one")
    assert all(isinstance(e, UnsafeArchiveError) for e in Recorder.errors), Recorder.errors
    reasons = " | ".join(str(e) for e in Recorder.errors)
    for word in ("traversal", "absolute", "symbolic link", "max_size"):
        assert word in reasons, reasons
    _assert_only_safe_tree_extracted(tmp_path / "target", outside, Path(f"/tmp/{marker}"))
    crashed = [json.loads(env["r"].get(k)) for k in env["r"].scan_iter("karton.task:*")]
    errors = ["".join(d["error"]) for d in crashed if d["status"] == "Crashed"]
    assert len(errors) == len(archives) and all("UnsafeArchiveError" in e for e in errors)


def _assert_only_safe_tree_extracted(target: Path, *escapes: Path) -> None:
    assert not any(path.exists() for path in escapes), "an archive wrote outside its target"
    extracted = {p.relative_to(target) for p in target.rglob("*")}
    safe_dir = Path(next(iter(extracted)).parts[0])
    assert extracted == {safe_dir, safe_dir / "a.txt", safe_dir / "sub", safe_dir / "sub" / "b.txt"}


def _tree(root: Path) -> Path:
    (root / "sub").mkdir(parents=True)
    (root / "a.txt").write_text("a")
    (root / "sub" / "b.txt").write_text("b")
    return root


# -- configuration -----------------------------------------------------------------------


def test_invalid_config_values_name_option_and_source(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ini = tmp_path / "karton.ini"
    ini.write_text(
        "[karton]\nidentity = bad.recorder\nlease_timeout = soon\n[system]\ngc_interval = -5x\n"
    )
    with pytest.raises(ConfigError) as info:
        Recorder(Config(ini, search_paths=[], environ={}))
    message = str(info.value)
    assert "[karton] lease_timeout" in message and "'soon'" in message, message
    assert f"{ini}:3" in message, message
    with pytest.raises(ConfigError, match=r"\[system\] gc_interval.*karton\.ini:5"):
        SystemService(Config(ini, search_paths=[], environ={}))

    environ = {"KARTON_KARTON_LEASE_TIMEOUT": "-1"}
    with pytest.raises(ConfigError) as info:
        Recorder(Config(search_paths=[], environ=environ))
    assert "[karton] lease_timeout" in str(info.value)
    assert "env KARTON_KARTON_LEASE_TIMEOUT" in str(info.value)

    bad_port = tmp_path / "port.ini"
    bad_port.write_text("[redis]\nhost = 127.0.0.1\nport = 99999\n")
    with pytest.raises(ConfigError, match=rf"\[redis\] port.*{bad_port}:3"):
        Config(bad_port, search_paths=[], environ={}).redis_settings()
    assert not os.environ.get("KARTON_KARTON_LEASE_TIMEOUT")


# -- poison bodies: valid JSON objects with a field of the wrong type --------------------


async def test_router_survives_a_status_of_the_wrong_type(
    env: dict[str, Any], caplog: pytest.LogCaptureFixture
) -> None:
    """``"status": []`` raises TypeError (unhashable), not InvalidTaskError."""
    r = env["r"]
    poison, body = raw_task(status=[])  # type: ignore[arg-type]
    r.set(f"karton.task:{poison}", body)
    async with running(env["config"]) as producer:
        r.rpush("karton.tasks", poison)
        await producer.send_tasks([good(1)])
        await poll(lambda: Recorder.seen == [1], 15, "a good task routed after the poison")
        await poll(lambda: r.llen("asynckarton.invalid") == 1, 5, "quarantine")
    assert str(poison) in errors_logged(caplog)


async def test_consumer_survives_a_priority_of_the_wrong_type(
    env: dict[str, Any], caplog: pytest.LogCaptureFixture
) -> None:
    r = env["r"]
    poison, body = raw_task(status="Spawned", priority=["high"])
    r.set(f"karton.task:{poison}", body)
    r.rpush(QUEUE, poison)
    async with running(env["config"]) as producer:
        await producer.send_tasks([good(1)])
        await poll(lambda: Recorder.seen == [1], 15, "a good task after the poison")
        await poll(lambda: r.llen("asynckarton.invalid") == 1, 5, "quarantine")
    assert r.zcard(LEASES) == 0


async def test_gc_survives_a_last_update_of_the_wrong_type(
    env: dict[str, Any], caplog: pytest.LogCaptureFixture
) -> None:
    """A Finished task whose ``last_update`` is a string cannot be judged: kept and named.

    The GC cannot read it, so it keeps it untouched (its resources are unknown too, so
    the resource pass deletes nothing) and says so, naming the task; every other task is
    still collected, pass after pass.
    """
    r = env["r"]
    poison, body = raw_task(status="Finished", last_update="yesterday")
    r.set(f"karton.task:{poison}", body)
    config = env["config"]
    config.set("system", "enable_gc", "1")
    config.set("system", "gc_interval", "0.5")
    async with running(config, consumer=False):
        for _ in range(2):  # two passes: the poison survives both, the GC keeps running
            done, finished = raw_task(status="Finished")
            key = f"karton.task:{done}"
            r.set(key, finished)
            await poll(lambda k=key: not r.exists(k), 10, "the GC to keep collecting")
    assert r.get(f"karton.task:{poison}") == body, "the unreadable task must be kept untouched"
    assert r.llen(QUEUE) == 0 and r.llen("asynckarton.invalid") == 0
    kept = [
        line
        for line in errors_logged(caplog).splitlines()
        if poison in line and "unreadable and is kept" in line
    ]
    assert kept, errors_logged(caplog)
    assert "last_update" in kept[0], kept[0]
