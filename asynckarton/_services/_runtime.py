"""Runtime: the connections one process shares between all its services.

Every Producer, Consumer and SystemService built from equivalent configuration in one
process (and one event loop) shares one Redis connection pool and one storage client
(one aiobotocore client for S3).  The first user opens them, the last one closes them.

With no ``[redis]`` and no ``[s3]`` configured (or ``[asynckarton] embedded = 1``), the
runtime is *embedded*: an in-process Redis (fakeredis) driven by the same backend code,
and resources in a local directory.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio

from .._settings._config import Config
from ..backend import EmbeddedConnector, KartonBackend, RedisConnector, ServerConnector
from ..storage import LocalStorage, S3Storage, Storage

__all__ = ["Runtime", "acquire_runtime"]

DEFAULT_BUCKET = "karton"


@dataclass
class Runtime:
    """Redis backend + storage + default bucket, shared by a process's services."""

    backend: KartonBackend
    storage: Storage
    bucket: str
    embedded: bool
    users: int = field(default=0, repr=False)


_RUNTIMES: dict[tuple[Any, ...], Runtime] = {}
_OPENING: dict[tuple[Any, ...], anyio.Lock] = {}
# Embedded servers outlive their runtimes for the life of the process, so a service
# restarted in the same process (tests, FastAPI reloads) sees the same in-process data.
_EMBEDDED_SERVERS: dict[str, Any] = {}


def _runtime_key(config: Config) -> tuple[Any, ...]:
    loop = id(asyncio.get_running_loop())
    if config.embedded:
        return (loop, "embedded", str(config.data_dir))
    redis = config.redis_settings()
    s3 = config.s3_settings()
    return (loop, redis, s3)


def _embedded_server(data_dir: Path) -> Any:
    import fakeredis

    server = _EMBEDDED_SERVERS.get(str(data_dir))
    if server is None:
        server = _EMBEDDED_SERVERS[str(data_dir)] = fakeredis.FakeServer()
    return server


async def _open(config: Config) -> Runtime:
    connector: RedisConnector
    storage: Storage
    if config.embedded:
        data_dir = Path(config.data_dir)
        connector = EmbeddedConnector(_embedded_server(data_dir))
        storage = LocalStorage(data_dir / "resources")
        bucket = config.get("s3", "bucket") or DEFAULT_BUCKET
    else:
        connector = ServerConnector.from_settings(config.redis_settings())
        s3 = config.s3_settings()
        storage = S3Storage.from_settings(s3)
        bucket = s3.bucket or DEFAULT_BUCKET
    await storage.__aenter__()
    if config.embedded:
        await storage.ensure_bucket(bucket, create=True)
    return Runtime(KartonBackend(connector), storage, str(bucket), config.embedded)


@asynccontextmanager
async def acquire_runtime(config: Config) -> AsyncIterator[Runtime]:
    """Share (or open) the runtime for ``config`` while the block runs."""
    key = _runtime_key(config)
    async with _OPENING.setdefault(key, anyio.Lock()):
        runtime = _RUNTIMES.get(key)
        if runtime is None:
            runtime = _RUNTIMES[key] = await _open(config)
        runtime.users += 1
    try:
        yield runtime
    finally:
        runtime.users -= 1
        if runtime.users == 0 and _RUNTIMES.get(key) is runtime:
            del _RUNTIMES[key]
            _OPENING.pop(key, None)
            try:
                await runtime.storage.aclose()
            finally:
                await runtime.backend.aclose()
