"""One contract, two storages: every test runs against LocalStorage and S3Storage (moto).

The S3 side talks HTTP to a real moto server (``s3_srv``), so request signing, ranged
GETs, multipart uploads, versioning and DeleteObjects all go over the wire.
"""

from __future__ import annotations

import hashlib
import inspect
import io
import os
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import pytest
from botocore.exceptions import (
    ClientError,
    EndpointConnectionError,
    ResponseStreamingError,
)

from asynckarton._errors import ResourceNotFoundError, StorageError
from asynckarton._wire._resource import LocalResource, RemoteResource
from asynckarton.storage import LocalStorage, ObjectVersion, S3Storage, Storage, UploadResult
from asynckarton.storage._gc import collect_orphans  # internal: not re-exported by storage
from tests.servers import S3Server

pytestmark = pytest.mark.anyio

MiB = 1 << 20
PART = 5 * MiB


@dataclass
class Env:
    kind: str
    storage: Storage
    bucket: str
    s3: S3Server | None = None


@pytest.fixture(params=["local", pytest.param("s3", marks=pytest.mark.integration)])
async def env(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Env]:
    if request.param == "local":
        async with LocalStorage(tmp_path / "store") as local:
            bucket = f"test-{uuid.uuid4().hex[:12]}"
            await local.ensure_bucket(bucket, create=True)
            yield Env("local", local, bucket)
        return
    srv: S3Server = request.getfixturevalue("s3_srv")
    bucket = request.getfixturevalue("s3_bucket")
    async with S3Storage(
        srv.url,
        srv.access_key,
        srv.secret_key,
        multipart_threshold=PART + 1,
        part_size=PART,
        backoff=0.01,
    ) as s3:
        await s3.ensure_bucket(bucket, create=True)
        yield Env("s3", s3, bucket, srv)


def write_random_file(path: Path, size: int) -> str:
    """Write ``size`` pseudo-random bytes in 1 MiB chunks; return their sha256."""
    digest = hashlib.sha256()
    with path.open("wb") as out:
        left = size
        while left:
            chunk = os.urandom(min(MiB, left))
            digest.update(chunk)
            out.write(chunk)
            left -= len(chunk)
    return digest.hexdigest()


def names(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


async def keys(env: Env) -> list[str]:
    return sorted({v.key async for v in env.storage.list_object_versions(env.bucket)})


def referencing(found: set[str]) -> Callable[[], Awaitable[set[str]]]:
    async def referenced() -> set[str]:
        return found

    return referenced


# -- buckets, put/get ------------------------------------------------------------------


async def test_ensure_bucket_reports_existence(env: Env) -> None:
    name = f"other-{uuid.uuid4().hex[:8]}"
    assert await env.storage.ensure_bucket(name, create=False) is False
    assert await env.storage.ensure_bucket(name, create=True) is False
    assert await env.storage.ensure_bucket(name, create=True) is True


async def test_put_get_exists(env: Env) -> None:
    await env.storage.put_bytes(env.bucket, "k1", b"hello world")
    assert await env.storage.get_bytes(env.bucket, "k1") == b"hello world"
    assert await env.storage.exists(env.bucket, "k1")
    assert not await env.storage.exists(env.bucket, "k2")
    await env.storage.put_bytes(env.bucket, "k1", b"replaced")
    assert await env.storage.get_bytes(env.bucket, "k1") == b"replaced"
    await env.storage.put_bytes(env.bucket, "empty", b"")
    assert await env.storage.get_bytes(env.bucket, "empty") == b""


async def test_ranged_get_is_inclusive(env: Env) -> None:
    data = bytes(range(256)) * 40
    await env.storage.put_bytes(env.bucket, "r", data)
    get = env.storage.get_bytes
    assert await get(env.bucket, "r", start=10, end=19) == data[10:20]
    assert await get(env.bucket, "r", start=10) == data[10:]
    assert await get(env.bucket, "r", end=9) == data[:10]
    assert await get(env.bucket, "r", start=len(data) - 5, end=len(data) + 100) == data[-5:]
    assert await get(env.bucket, "r", start=len(data)) == b""
    with pytest.raises(ValueError, match="before its start"):
        await get(env.bucket, "r", start=10, end=5)


async def test_iter_chunks_exact_sizes(env: Env) -> None:
    data = os.urandom(3 * MiB + 123)
    await env.storage.put_bytes(env.bucket, "c", data)
    chunks = [c async for c in env.storage.iter_chunks(env.bucket, "c", chunk_size=MiB)]
    assert [len(c) for c in chunks] == [MiB, MiB, MiB, 123]
    assert b"".join(chunks) == data
    ranged = [
        c
        async for c in env.storage.iter_chunks(env.bucket, "c", chunk_size=1000, start=5, end=2504)
    ]
    assert [len(c) for c in ranged] == [1000, 1000, 500]
    assert b"".join(ranged) == data[5:2505]


async def test_iter_chunks_stopped_early(env: Env) -> None:
    await env.storage.put_bytes(env.bucket, "c", os.urandom(2 * MiB))
    chunks = env.storage.iter_chunks(env.bucket, "c", chunk_size=1024)
    first = await chunks.__anext__()
    assert len(first) == 1024
    await chunks.aclose()  # type: ignore[attr-defined]
    assert await env.storage.get_bytes(env.bucket, "c", end=9) == first[:10]


async def test_download_to_file(env: Env, tmp_path: Path) -> None:
    data = os.urandom(2 * MiB + 7)
    await env.storage.put_bytes(env.bucket, "d", data)
    target = tmp_path / "out" / "file.bin"
    target.parent.mkdir()
    target.write_bytes(b"old content")
    await env.storage.download_to_file(env.bucket, "d", target)
    assert target.read_bytes() == data
    assert sorted(p.name for p in target.parent.iterdir()) == ["file.bin"]


# -- streaming uploads -----------------------------------------------------------------


async def test_put_file_small_from_path_and_stream(env: Env, tmp_path: Path) -> None:
    source = tmp_path / "small.bin"
    sha = write_random_file(source, 100_000)
    result = await env.storage.put_file(env.bucket, "p", source)
    assert result == UploadResult(sha256=sha, size=100_000)
    assert await env.storage.get_bytes(env.bucket, "p") == source.read_bytes()

    stream = io.BytesIO(b"xx" + b"payload")
    stream.seek(2)  # put_file reads from the current position
    result = await env.storage.put_file(env.bucket, "s", stream)
    assert result == UploadResult(hashlib.sha256(b"payload").hexdigest(), 7)
    assert await env.storage.get_bytes(env.bucket, "s") == b"payload"
    assert not stream.closed

    assert (await env.storage.put_file(env.bucket, "e", io.BytesIO())).size == 0
    assert await env.storage.get_bytes(env.bucket, "e") == b""


@pytest.mark.parametrize("as_stream", [False, True], ids=["path", "stream"])
async def test_put_file_multipart(env: Env, tmp_path: Path, as_stream: bool) -> None:
    source = tmp_path / "big.bin"
    size = 12 * MiB + 5
    sha = write_random_file(source, size)
    with source.open("rb") as f:
        result = await env.storage.put_file(env.bucket, "big", f if as_stream else source)
    assert result == UploadResult(sha, size)
    digest = hashlib.sha256()
    async for chunk in env.storage.iter_chunks(env.bucket, "big"):
        digest.update(chunk)
    assert digest.hexdigest() == sha
    if isinstance(env.storage, S3Storage):
        head = await env.storage._client.head_object(Bucket=env.bucket, Key="big")
        assert head["ETag"].strip('"').endswith("-3")  # 5 + 5 + 2 MiB parts


# -- errors ----------------------------------------------------------------------------


async def test_missing_object(env: Env, tmp_path: Path) -> None:
    with pytest.raises(ResourceNotFoundError) as info:
        await env.storage.get_bytes(env.bucket, "missing")
    assert (info.value.bucket, info.value.key) == (env.bucket, "missing")
    with pytest.raises(ResourceNotFoundError):
        await env.storage.get_bytes(env.bucket, "missing", start=3, end=5)
    with pytest.raises(ResourceNotFoundError):
        async for _ in env.storage.iter_chunks(env.bucket, "missing"):
            pass
    with pytest.raises(ResourceNotFoundError):
        await env.storage.download_to_file(env.bucket, "missing", tmp_path / "x")
    assert names(tmp_path) == (["store"] if env.kind == "local" else [])


async def test_missing_bucket_is_a_storage_error(env: Env) -> None:
    with pytest.raises(StorageError, match="does not exist") as info:
        await env.storage.get_bytes("no-such-bucket", "k")
    assert not isinstance(info.value, ResourceNotFoundError)
    with pytest.raises(StorageError, match="no-such-bucket"):
        await env.storage.put_bytes("no-such-bucket", "k", b"x")


# -- listing and deleting --------------------------------------------------------------


async def test_list_and_delete(env: Env) -> None:
    for key in ("a", "b", "c", "d"):
        await env.storage.put_bytes(env.bucket, key, key.encode())
    versions = [v async for v in env.storage.list_object_versions(env.bucket)]
    assert sorted(v.key for v in versions) == ["a", "b", "c", "d"]
    assert not any(v.is_delete_marker for v in versions)
    assert all(v.version_id in (None, "null") for v in versions)
    assert all(v.last_modified > 0 for v in versions)
    by_key = {v.key: v for v in versions}
    deleted = await env.storage.delete_objects(env.bucket, ["a", by_key["b"], "absent"])
    assert deleted == 3
    assert await keys(env) == ["c", "d"]
    assert await env.storage.delete_objects(env.bucket, []) == 0


async def test_list_and_delete_in_pages(env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    """Several listing pages and DeleteObjects requests (page sizes shrunk from 1000)."""
    from asynckarton.storage import _local, _s3

    for module in (_local, _s3):
        monkeypatch.setattr(module, "_LIST_PAGE", 3)
    monkeypatch.setattr(_s3, "_DELETE_BATCH", 4)
    expected = [f"k{i:02d}" for i in range(11)]
    async with anyio.create_task_group() as tg:
        for key in expected:
            tg.start_soon(env.storage.put_bytes, env.bucket, key, b"x")
    calls: list[str] = []
    if isinstance(env.storage, S3Storage):
        client = env.storage._client
        for name in ("list_object_versions", "delete_objects"):
            real = getattr(client, name)
            monkeypatch.setattr(client, name, counted(real, name, calls))
    listed = [v async for v in env.storage.list_object_versions(env.bucket)]
    assert sorted(v.key for v in listed) == expected
    assert await env.storage.delete_objects(env.bucket, [*listed, "absent"]) == 12
    if env.kind == "s3":
        assert calls == ["list_object_versions"] * 4 + ["delete_objects"] * 3
    monkeypatch.undo()
    assert await keys(env) == []


def counted(real: Callable[..., Awaitable[Any]], name: str, calls: list[str]) -> Any:
    async def wrapper(**kwargs: Any) -> Any:
        calls.append(name)
        return await real(**kwargs)

    return wrapper


@pytest.mark.parametrize("env", ["s3"], indirect=True)  # only S3 has object versions
async def test_versioned_bucket_versions_and_markers(env: Env) -> None:
    assert isinstance(env.storage, S3Storage)
    await env.storage._client.put_bucket_versioning(
        Bucket=env.bucket, VersioningConfiguration={"Status": "Enabled"}
    )
    await env.storage.put_bytes(env.bucket, "v", b"one")
    await env.storage.put_bytes(env.bucket, "v", b"two")
    await env.storage.put_bytes(env.bucket, "keep", b"k")
    await env.storage._client.delete_object(Bucket=env.bucket, Key="v")  # a delete marker
    versions = [v async for v in env.storage.list_object_versions(env.bucket)]
    mine = [v for v in versions if v.key == "v"]
    assert len(mine) == 3
    assert sum(v.is_delete_marker for v in mine) == 1
    assert all(v.version_id not in (None, "null") for v in mine)
    assert await collect_orphans(env.storage, env.bucket, referencing({"keep"})) == 3
    left = [v async for v in env.storage.list_object_versions(env.bucket)]
    assert [v.key for v in left] == ["keep"]


async def test_null_version_entries(env: Env) -> None:
    entry = ObjectVersion("n", "null", False, 0.0)
    await env.storage.put_bytes(env.bucket, "n", b"x")
    assert await env.storage.delete_objects(env.bucket, [entry]) == 1
    assert not await env.storage.exists(env.bucket, "n")


# -- garbage collection ----------------------------------------------------------------


async def test_collect_orphans(env: Env) -> None:
    for key in ("live", "orphan1", "orphan2"):
        await env.storage.put_bytes(env.bucket, key, b"x")
    # min_age protects young objects.
    assert await collect_orphans(env.storage, env.bucket, referencing(set()), min_age=3600) == 0
    assert await collect_orphans(env.storage, env.bucket, referencing({"live"})) == 2
    assert await keys(env) == ["live"]


async def test_collect_orphans_lists_before_asking(env: Env) -> None:
    """An object uploaded after the listing is never deleted by that run (Karton's order)."""
    await env.storage.put_bytes(env.bucket, "old", b"x")

    async def referenced() -> set[str]:
        await env.storage.put_bytes(env.bucket, "uploaded-meanwhile", b"y")
        return set()

    assert await collect_orphans(env.storage, env.bucket, referenced) == 1
    assert await keys(env) == ["uploaded-meanwhile"]


async def test_collect_orphans_empty_bucket_skips_scan(env: Env) -> None:
    called = False

    async def referenced() -> set[str]:
        nonlocal called
        called = True
        return set()

    assert await collect_orphans(env.storage, env.bucket, referenced) == 0
    assert not called


async def test_large_bytes_resource_streams(env: Env) -> None:
    """Contents above 16 MiB go through put_file (multipart on S3), hashed on the way."""
    data = os.urandom(17 * MiB)
    resource = LocalResource("big", data, bucket=env.bucket)
    await resource.upload(env.storage)
    assert (resource.sha256, resource.size) == (hashlib.sha256(data).hexdigest(), len(data))
    assert await RemoteResource.from_dict(resource.to_dict(), env.storage).download() == data


# -- deduplication ---------------------------------------------------------------------


class CountingStorage:
    """Counts uploads while delegating everything to a real storage."""

    def __init__(self, inner: Storage) -> None:
        self.inner = inner
        self.uploads = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    async def put_bytes(self, bucket: str, key: str, data: bytes) -> None:
        self.uploads += 1
        await self.inner.put_bytes(bucket, key, data)

    async def put_file(self, bucket: str, key: str, source: Any) -> UploadResult:
        self.uploads += 1
        return await self.inner.put_file(bucket, key, source)


async def test_dedup(env: Env, tmp_path: Path) -> None:
    counting: Any = CountingStorage(env.storage)
    data = os.urandom(200_000)
    sha = hashlib.sha256(data).hexdigest()
    assert await env.storage.find_by_sha256(env.bucket, sha) is None

    first = LocalResource("a.bin", data, bucket=env.bucket, deduplicate=True)
    await first.upload(counting)
    assert first.uid == first.sha256 == sha
    assert await env.storage.find_by_sha256(env.bucket, sha) == sha

    path = tmp_path / "same.bin"
    path.write_bytes(data)
    second = LocalResource("b.bin", path=path, bucket=env.bucket)
    await second.upload(counting, deduplicate=True)
    assert (second.uid, second.size, counting.uploads) == (sha, len(data), 1)

    remote = RemoteResource.from_dict(second.to_dict(), env.storage)
    assert await remote.download() == data
    with pytest.raises(ValueError, match="SHA-256"):
        await env.storage.find_by_sha256(env.bucket, "../etc/passwd")


# -- S3 only: retries, aborts, resumes ---------------------------------------------------


@pytest.fixture
async def s3(s3_srv: S3Server, s3_bucket: str) -> AsyncIterator[S3Storage]:
    async with S3Storage(
        s3_srv.url,
        s3_srv.access_key,
        s3_srv.secret_key,
        multipart_threshold=PART + 1,
        part_size=PART,
        backoff=0.01,
        direct_requests=False,  # these tests fault aiobotocore's client methods
    ) as storage:
        await storage.ensure_bucket(s3_bucket, create=True)
        yield storage


def client_error(status: int, code: str, op: str = "UploadPart") -> ClientError:
    return ClientError(
        {
            "Error": {"Code": code, "Message": "injected"},
            "ResponseMetadata": {"HTTPStatusCode": status},
        },
        op,
    )


async def pending_uploads(s3: S3Storage, bucket: str) -> list[Any]:
    reply = await s3._client.list_multipart_uploads(Bucket=bucket)
    return list(reply.get("Uploads", []))


@pytest.mark.integration
async def test_s3_failed_parts_are_retried(
    s3: S3Storage, s3_bucket: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = s3._client.upload_part
    failures = {2: 2, 3: 1}  # part 2 fails twice (503), part 3 once (connection drop)
    calls: list[int] = []

    async def flaky(**kwargs: Any) -> Any:
        number = kwargs["PartNumber"]
        calls.append(number)
        if failures.get(number):
            failures[number] -= 1
            if number == 2:
                raise client_error(503, "SlowDown")
            raise EndpointConnectionError(endpoint_url=s3_srv_url(s3))
        return await real(**kwargs)

    monkeypatch.setattr(s3._client, "upload_part", flaky)
    source = tmp_path / "f"
    digest = write_random_file(source, 12 * MiB)
    assert (await s3.put_file(s3_bucket, "k", source)).sha256 == digest
    assert sorted(calls) == [1, 2, 2, 2, 3, 3]
    assert hashlib.sha256(await s3.get_bytes(s3_bucket, "k")).hexdigest() == digest


def s3_srv_url(s3: S3Storage) -> str:
    return s3.address or ""


@pytest.mark.integration
async def test_s3_permanent_part_failure_aborts_upload(
    s3: S3Storage, s3_bucket: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = s3._client.upload_part
    calls: list[int] = []

    async def forbidden(**kwargs: Any) -> Any:
        calls.append(kwargs["PartNumber"])
        if kwargs["PartNumber"] == 2:
            raise client_error(403, "AccessDenied")
        return await real(**kwargs)

    monkeypatch.setattr(s3._client, "upload_part", forbidden)
    source = tmp_path / "f"
    write_random_file(source, 12 * MiB)
    with pytest.raises(StorageError, match="AccessDenied") as info:
        await s3.put_file(s3_bucket, "k", source)
    assert "upload_part" in str(info.value) and "'k'" in str(info.value)
    assert calls.count(2) == 1  # a 403 is not retried
    assert await pending_uploads(s3, s3_bucket) == []
    assert not await s3.exists(s3_bucket, "k")


@pytest.mark.integration
async def test_s3_cancelled_upload_is_aborted(
    s3: S3Storage, s3_bucket: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = s3._client.upload_part
    started = anyio.Event()

    async def hang(**kwargs: Any) -> Any:
        if kwargs["PartNumber"] == 2:
            started.set()
            await anyio.sleep_forever()
        return await real(**kwargs)

    monkeypatch.setattr(s3._client, "upload_part", hang)
    source = tmp_path / "f"
    write_random_file(source, 12 * MiB)
    async with anyio.create_task_group() as tg:
        tg.start_soon(s3.put_file, s3_bucket, "k", source)
        await started.wait()
        tg.cancel_scope.cancel()
    assert await pending_uploads(s3, s3_bucket) == []


@pytest.mark.integration
async def test_s3_transient_get_is_retried_and_permanent_is_not(
    s3: S3Storage, s3_bucket: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    await s3.put_bytes(s3_bucket, "k", b"data")
    real = s3._client.get_object
    calls = 0

    async def flaky(**kwargs: Any) -> Any:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise client_error(500, "InternalError", "GetObject")
        if kwargs["Key"] == "forbidden":
            raise client_error(403, "AccessDenied", "GetObject")
        return await real(**kwargs)

    monkeypatch.setattr(s3._client, "get_object", flaky)
    assert await s3.get_bytes(s3_bucket, "k") == b"data"
    assert calls == 2
    calls = 1
    with pytest.raises(StorageError, match="AccessDenied"):
        await s3.get_bytes(s3_bucket, "forbidden")
    assert calls == 2


@pytest.mark.integration
async def test_s3_download_resumes_after_a_dropped_connection(
    s3: S3Storage, s3_bucket: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = os.urandom(3 * MiB)
    await s3.put_bytes(s3_bucket, "k", data)
    real = s3._client.get_object
    requests: list[dict[str, Any]] = []

    class DroppingBody:
        """Serves the first read, then fails like a reset connection."""

        def __init__(self, body: Any) -> None:
            self.body, self.reads = body, 0

        async def read(self, amount: int) -> bytes:
            self.reads += 1
            if self.reads > 1:
                raise ResponseStreamingError(error="connection reset")
            chunk: bytes = await self.body.read(amount)
            return chunk

        def close(self) -> None:
            self.body.close()

    async def dropping(**kwargs: Any) -> Any:
        requests.append(kwargs)
        reply = await real(**kwargs)
        if len(requests) == 1:
            reply["Body"] = DroppingBody(reply["Body"])
        return reply

    monkeypatch.setattr(s3._client, "get_object", dropping)
    await s3.download_to_file(s3_bucket, "k", tmp_path / "out")
    assert (tmp_path / "out").read_bytes() == data
    assert len(requests) == 2
    assert requests[1]["Range"].startswith("bytes=") and requests[1]["Range"] != "bytes=0-"
    assert requests[1]["IfMatch"]


@pytest.mark.integration
async def test_s3_from_settings_and_closed_use(s3_srv: S3Server, s3_bucket: str) -> None:
    @dataclass(frozen=True)
    class Settings:
        address: str
        access_key: str
        secret_key: str
        bucket: str
        iam_auth: bool = False

    storage = S3Storage.from_settings(
        Settings(s3_srv.url, s3_srv.access_key, s3_srv.secret_key, s3_bucket)
    )
    with pytest.raises(RuntimeError, match="not open"):
        await storage.exists(s3_bucket, "k")
    async with storage:
        assert await storage.ensure_bucket(s3_bucket, create=True) is False
        assert "testing" not in repr(storage)
    async with storage:  # reopening after close works
        assert await storage.ensure_bucket(s3_bucket, create=False) is True


def test_s3_client_config_is_minio_safe() -> None:
    from asynckarton.storage._s3client import client_config

    config = client_config(32)
    assert config.s3 == {"addressing_style": "path"}
    assert config.max_pool_connections == 32
    # botocore >= 1.36 only: checksums when required, else the option does not exist.
    assert getattr(config, "request_checksum_calculation", "when_required") == "when_required"


#: Every method the Storage protocol declares (the context-manager pair included).
PROTOCOL_METHODS = sorted(
    name
    for name, value in vars(Storage).items()
    if inspect.isfunction(value) and (not name.startswith("_") or name.startswith("__a"))
)


def assert_same_parameters(
    wanted: Callable[..., Any], method: Callable[..., Any], where: str
) -> None:
    """``method`` (bound) accepts every call the protocol's ``wanted`` (unbound) accepts."""
    want = list(inspect.signature(wanted).parameters.values())[1:]  # drop self
    got = inspect.signature(method).parameters
    for param in want:
        mine = got.get(param.name)
        assert mine is not None, f"{where} has no parameter {param.name!r}"
        assert mine.kind == param.kind, f"{where}({param.name}): {mine.kind} != {param.kind}"
        assert mine.default == param.default, f"{where}({param.name}) default {mine.default!r}"
    positional = [p.name for p in want if p.kind == p.POSITIONAL_OR_KEYWORD]
    mine_positional = [n for n, p in got.items() if p.kind == p.POSITIONAL_OR_KEYWORD]
    assert mine_positional[: len(positional)] == positional, f"{where}: positional order"
    extra = [
        name
        for name, p in got.items()
        if name not in {w.name for w in want}
        and p.default is p.empty
        and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
    ]
    assert extra == [], f"{where} requires parameters the protocol does not pass: {extra}"


async def test_both_storages_satisfy_the_protocol(tmp_path: Path) -> None:
    """Each protocol method exists with the same parameters and the same calling style.

    mypy checks the annotations (the list below is typed ``list[Storage]``); this checks
    what a structural type check does not: parameter names, kinds and defaults, and
    whether a method is awaited or hands back an async iterator without being awaited.
    """
    storages: list[Storage] = [LocalStorage(tmp_path), S3Storage(None)]  # no I/O: just built
    expected = {"__aenter__", "__aexit__", "aclose", "get_bytes", "iter_chunks"}
    assert expected <= set(PROTOCOL_METHODS)
    for storage in storages:
        for name in PROTOCOL_METHODS:
            wanted = getattr(Storage, name)
            where = f"{type(storage).__name__}.{name}"
            method = getattr(storage, name, None)
            assert callable(method), f"{where} is missing"
            assert_same_parameters(wanted, method, where)
            if inspect.iscoroutinefunction(wanted):
                assert inspect.iscoroutinefunction(method), f"{where} must be 'async def'"
                continue
            # Declared with plain 'def' returning an AsyncIterator: calling it must hand
            # back the iterator at once (no await, no I/O before the first __anext__).
            assert not inspect.iscoroutinefunction(method), f"{where} must not need await"
            required = [
                p for p in inspect.signature(method).parameters.values() if p.default is p.empty
            ]
            iterator = method(*["bucket", "key"][: len(required)])
            assert isinstance(iterator, AsyncIterator), f"{where} returned {iterator!r}"
            close = getattr(iterator, "aclose", None)
            if close is not None:
                await close()


def test_s3_rejects_tiny_parts() -> None:
    with pytest.raises(ValueError, match="5 MiB"):
        S3Storage(None, part_size=MiB)
