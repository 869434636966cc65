"""Shared fixtures: the anyio backend and the real servers integration tests need."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from tests.servers import RedisServer, S3Server, redis_server, s3_server


@pytest.fixture
def published(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    """Every line a KartonLogHandler buffers for publishing, parsed, in order."""
    import json

    from asynckarton._services._logging import KartonLogHandler

    lines: list[dict[str, Any]] = []
    append = KartonLogHandler._append

    def keep(self: KartonLogHandler, item: tuple[str, str]) -> None:
        lines.append(json.loads(item[1]))
        append(self, item)

    monkeypatch.setattr(KartonLogHandler, "_append", keep)
    return lines


@pytest.fixture(scope="session")
def anyio_backend() -> tuple[str, dict[str, Any]]:
    """asyncio's own loop; ``ASYNCKARTON_TEST_LOOP=uvloop`` runs the tests on uvloop, the
    loop ``asynckarton run`` picks by default (``.ci/run`` runs the integration tests so)."""
    if os.environ.get("ASYNCKARTON_TEST_LOOP") == "uvloop":
        return "asyncio", {"use_uvloop": True}
    return "asyncio", {}


@pytest.fixture(scope="session")
def redis_srv() -> Iterator[RedisServer]:
    """A session-wide redis-server on a free port (flush between tests with ``redis_url``)."""
    with redis_server() as server:
        yield server


@pytest.fixture
def redis_url(redis_srv: RedisServer) -> Iterator[str]:
    """URL of the session redis-server, flushed before each test."""
    import redis

    client = redis.Redis.from_url(redis_srv.url)
    client.flushall()
    client.close()
    yield redis_srv.url


@pytest.fixture(scope="session")
def s3_srv() -> Iterator[S3Server]:
    with s3_server() as server:
        yield server


@pytest.fixture
def s3_bucket(s3_srv: S3Server) -> str:
    """A fresh, empty bucket name on the session S3 server (created by the test's storage)."""
    return f"test-{uuid.uuid4().hex[:12]}"
