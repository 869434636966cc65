"""``asynckarton config --check`` connects (Redis PING, S3 bucket HEAD) and names the source.

Against the test suite's real redis-server and S3 server; a wrong port is traced back to
the ini line that set it, and the command exits 1.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import anyio
import pytest
from typer.testing import CliRunner

from asynckarton.cli._app import app
from asynckarton.storage import S3Storage
from tests.servers import RedisServer, S3Server, free_port

pytestmark = pytest.mark.integration


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    for name in list(os.environ):
        if name.startswith("KARTON_"):
            monkeypatch.delenv(name)
    yield tmp_path


def write_ini(home: Path, redis_port: int, s3: S3Server, bucket: str) -> Path:
    ini = home / "karton.ini"
    ini.write_text(
        f"[redis]\nhost = 127.0.0.1\nport = {redis_port}\n\n"
        f"[s3]\naddress = {s3.url}\naccess_key = {s3.access_key}\n"
        f"secret_key = {s3.secret_key}\nbucket = {bucket}\n"
    )
    return ini


def make_bucket(s3: S3Server, bucket: str) -> None:
    async def make() -> None:
        async with S3Storage(s3.url, s3.access_key, s3.secret_key) as storage:
            await storage.ensure_bucket(bucket, create=True)

    anyio.run(make)


def redis_port(server: RedisServer) -> int:
    port = urlsplit(server.url).port
    assert port is not None
    return port


def test_check_reports_each_connection_ok(
    home: Path, redis_srv: RedisServer, s3_srv: S3Server, s3_bucket: str
) -> None:
    make_bucket(s3_srv, s3_bucket)
    port = redis_port(redis_srv)
    ini = write_ini(home, port, s3_srv, s3_bucket)
    result = CliRunner().invoke(app, ["config", "--check"])
    assert result.exit_code == 0, result.output
    assert f"# check: Redis redis://127.0.0.1:{port}/0 ([redis] host from {ini}:2" in result.output
    assert f"# check: S3 bucket '{s3_bucket}' at {s3_srv.url}" in result.output
    assert result.output.count(": ok") == 2, result.output


def test_check_names_the_wrong_address_and_where_it_was_set(
    home: Path, s3_srv: S3Server, s3_bucket: str
) -> None:
    port = free_port()  # nothing listens there
    ini = write_ini(home, port, s3_srv, s3_bucket)  # and the bucket was never made
    result = CliRunner().invoke(app, ["config", "--check"])
    assert result.exit_code == 1, result.output
    redis_line = next(line for line in result.output.splitlines() if "check: Redis" in line)
    assert f"redis://127.0.0.1:{port}/0" in redis_line
    assert f"port from {ini}:3" in redis_line and "FAILED" in redis_line
    s3_line = next(line for line in result.output.splitlines() if "check: S3" in line)
    assert "FAILED: the bucket does not exist" in s3_line


def test_without_check_nothing_is_tried(home: Path, s3_srv: S3Server, s3_bucket: str) -> None:
    write_ini(home, free_port(), s3_srv, s3_bucket)
    result = CliRunner().invoke(app, ["config"])
    assert result.exit_code == 0, result.output
    assert "# check:" not in result.output


def test_check_on_the_embedded_default_says_whether_a_system_serves_it(home: Path) -> None:
    result = CliRunner().invoke(app, ["config", "--check"])
    assert result.exit_code == 0, result.output
    assert "# check: embedded mode: no system service serves" in result.output
    assert "start 'asynckarton system'" in result.output
