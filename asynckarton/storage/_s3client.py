"""How :class:`~asynckarton.storage.S3Storage` builds its aiobotocore client.

One session per storage sharing one pre-parsed botocore data loader (parsed once, in a
worker thread, so opening a storage does not block the event loop), and the client
settings every S3 server accepts.
"""

from __future__ import annotations

import contextlib
import os
from typing import Any

import anyio
from aiobotocore.config import AioConfig
from aiobotocore.session import AioSession, get_session

from asynckarton.storage._s3errors import DataNotFoundError, create_loader

__all__ = ["CONNECT_TIMEOUT", "READ_TIMEOUT", "client_config", "new_session"]

CONNECT_TIMEOUT = 10.0
READ_TIMEOUT = 60.0

_WARM: dict[str, Any] = {}  # "loader": a botocore data loader with S3's models parsed


def load_models() -> Any:
    """Parse the botocore JSON an S3 client needs (blocking, hence run in a thread once)."""
    loader = create_loader(os.environ.get("AWS_DATA_PATH"))
    for service_name, type_name in (("s3", "service-2"), ("s3", "endpoint-rule-set-1")):
        with contextlib.suppress(DataNotFoundError):
            loader.load_service_model(service_name, type_name)
    for name in ("endpoints", "partitions", "sdk-default-configuration", "_retry"):
        with contextlib.suppress(DataNotFoundError):
            loader.load_data(name)
    return loader


async def new_session() -> AioSession:
    """A fresh session sharing one pre-warmed data loader.

    Creating a client parses several MiB of JSON on the calling thread: 0.5-1.5 s of a
    blocked event loop per storage. The parsing happens once, in a worker thread; the
    session itself stays per storage (its credential caches hold loop-bound locks).
    """
    if "loader" not in _WARM:
        _WARM["loader"] = await anyio.to_thread.run_sync(load_models)
    session = get_session()
    session.register_component("data_loader", _WARM["loader"])
    return session


def client_config(max_pool_connections: int) -> AioConfig:
    """The client's settings, safe on every S3 server (MinIO included).

    Path-style addressing, SigV4, our timeouts, botocore's retries off (``S3Storage``
    retries), and checksums only where the API requires them.
    """
    options: dict[str, Any] = {
        "s3": {"addressing_style": "path"},
        "signature_version": "s3v4",
        "connect_timeout": CONNECT_TIMEOUT,
        "read_timeout": READ_TIMEOUT,
        "max_pool_connections": max_pool_connections,
        "retries": {"mode": "standard", "total_max_attempts": 1},
    }
    try:
        return AioConfig(
            **options,
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
        )
    except TypeError:
        # botocore < 1.36 has no flexible checksums by default, hence nothing to turn off.
        return AioConfig(**options)
