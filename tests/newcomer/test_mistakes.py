"""A newcomer's usual mistakes get a clear error where they are made (issue 14, item 2).

* ``LocalResource(name, fd=os.open(...))``: an int descriptor is accepted (wrapped, and
  left open for its owner), not an ``AttributeError`` at send time.
* A payload value JSON cannot write (a ``datetime``) is refused before anything is
  written, naming its key path; orjson would have sent it as a string.
* A Redis that cannot be reached is named with its address and where that was set.
"""

from __future__ import annotations

import datetime
import os
import socket
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from asynckarton import (
    BackendUnavailableError,
    Config,
    InvalidTaskError,
    LocalResource,
    Producer,
    RemoteResource,
    Task,
)
from asynckarton._wire._resource import resource_from_wire, resource_to_wire
from asynckarton.testing import embedded_config

pytestmark = pytest.mark.anyio


@pytest.fixture
async def producer(tmp_path: Path) -> AsyncIterator[Producer]:
    async with Producer(embedded_config(tmp_path / "data"), identity="newcomer") as producer:
        yield producer


async def test_int_fd_is_uploaded_and_left_open(producer: Producer, tmp_path: Path) -> None:
    path = tmp_path / "sample.bin"
    path.write_bytes(b"MZ" + bytes(range(256)) * 10)
    fd = os.open(path, os.O_RDONLY)
    try:
        resource = LocalResource("sample", fd=fd)
        task = Task({"type": "sample"}, payload={"sample": resource})
        await producer.send_task(task)
        remote = resource_from_wire(resource_to_wire(resource), producer.storage)
        assert isinstance(remote, RemoteResource)
        assert await remote.download() == path.read_bytes()
        os.fstat(fd)  # still open: the caller owns it
    finally:
        os.close(fd)


async def test_datetime_in_payload_is_refused_naming_its_key(producer: Producer) -> None:
    task = Task({"type": "x"}, payload={"meta": {"when": datetime.datetime(2026, 1, 2)}})
    with pytest.raises(InvalidTaskError, match=r"payload\['meta'\]\['when'\] is a datetime"):
        await producer.send_task(task)
    assert await producer.backend.redis.dbsize() == 0  # nothing was written


def test_unserialisable_list_item_is_named() -> None:
    task = Task({"type": "x"}, payload={"items": [1, {2, 3}]})
    with pytest.raises(InvalidTaskError, match=r"payload\['items'\]\[1\] is a set"):
        task.serialize()
    with pytest.raises(InvalidTaskError, match=r"payload\['items'\]\[1\] is a set"):
        task.serialize(indent=2)


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


async def test_unreachable_redis_names_its_address_and_source(tmp_path: Path) -> None:
    ini = tmp_path / "karton.ini"
    ini.write_text(
        "[redis]\nhost = 127.0.0.1\n\n"
        "[s3]\naddress = http://127.0.0.1:9\naccess_key = a\nsecret_key = b\nbucket = karton\n"
    )
    port = _closed_port()
    config = Config(ini, environ={"KARTON_REDIS_PORT": str(port)}, search_paths=[])
    async with Producer(config) as producer:
        with pytest.raises(BackendUnavailableError) as info:
            await producer.send_task(Task({"type": "x"}))
    message = str(info.value)
    assert f"redis://127.0.0.1:{port}/0" in message
    assert f"host from {ini}:2" in message
    assert "port from env KARTON_REDIS_PORT" in message
    assert info.value.origin is not None and "KARTON_REDIS_PORT" in info.value.origin
