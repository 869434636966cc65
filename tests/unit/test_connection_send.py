"""FastConnection's write: no wait_for task, yet bounded when the peer stops reading."""

from __future__ import annotations

import asyncio
import time

import pytest
import redis.exceptions

from asynckarton.backend._connect import FastConnection

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


async def test_a_write_the_peer_never_reads_times_out_and_drops_the_connection() -> None:
    accepted: list[asyncio.StreamWriter] = []

    async def stop_reading(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Answer the connection's handshake (+OK per command), then read nothing."""
        accepted.append(writer)  # keeps the socket open
        while b"STOP" not in (data := await reader.read(65536)) and data:
            writer.write(b"+OK\r\n" * data.count(b"*"))

    server = await asyncio.start_server(stop_reading, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    connection = FastConnection(host="127.0.0.1", port=port, socket_timeout=0.3)
    try:
        await connection.connect()  # type: ignore[no-untyped-call]
        await connection.send_packed_command(b"*1\r\n$4\r\nSTOP\r\n")  # no wait: buffered
        started = time.monotonic()
        with pytest.raises(redis.exceptions.TimeoutError, match="Timeout writing"):
            async with asyncio.timeout(10):  # (a write without a bound would hang here)
                await connection.send_packed_command([b"x" * (64 << 20)])
        assert 0.25 <= time.monotonic() - started < 5
        assert not connection.is_connected
    finally:
        await connection.disconnect()
        server.close()
        for writer in accepted:
            writer.close()


async def test_a_write_to_a_closed_peer_is_a_connection_error() -> None:
    async def close_after_handshake(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        while b"STOP" not in (data := await reader.read(65536)) and data:
            writer.write(b"+OK\r\n" * data.count(b"*"))
        writer.transport.abort()

    server = await asyncio.start_server(close_after_handshake, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    connection = FastConnection(host="127.0.0.1", port=port, socket_timeout=1.0)
    try:
        await connection.connect()  # type: ignore[no-untyped-call]
        await connection.send_packed_command(b"*1\r\n$4\r\nSTOP\r\n")
        with pytest.raises(redis.exceptions.ConnectionError):
            for _ in range(200):  # the reset reaches the writer within a few writes
                await connection.send_packed_command([b"y" * 65536])
                await asyncio.sleep(0.01)
        assert not connection.is_connected
    finally:
        await connection.disconnect()
        server.close()
