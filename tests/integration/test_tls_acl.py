"""Redis over TLS (client certificates required) with the README's restricted ACL user.

A real redis-server started with TLS only, a real S3 server (moto), and the exact
``ACL SETUSER`` line of README.md's "Operating asynckarton" section: a producer, the
system service (router and GC) and a consumer route, finish and collect a task as that
user; what the ACL leaves out is refused; the password shows up nowhere.
"""

from __future__ import annotations

import json
import logging
import re
import shlex
import sys
from collections.abc import Iterator
from pathlib import Path

import anyio
import pytest
import redis
from redis.exceptions import NoPermissionError
from typer.testing import CliRunner

from asynckarton import (
    BackendError,
    Config,
    ConfigError,
    Karton,
    LocalResource,
    RemoteResource,
    Runtime,
    Task,
)
from asynckarton.cli._app import app
from asynckarton.testing import pipeline
from tests.servers import S3Server, TlsRedisServer, tls_redis_server

pytestmark = [pytest.mark.integration, pytest.mark.anyio]

README = Path(__file__).resolve().parents[2] / "README.md"
USER = "karton"
PASSWORD = "Pa55-w0rd-that-must-not-leak"


def readme_acl_lines() -> tuple[str, str]:
    """The README's ``ACL SETUSER`` lines: the user, and the per-identity key pattern."""
    user, identity = re.findall(r"^ACL SETUSER .*$", README.read_text(), flags=re.MULTILINE)
    return user, identity


@pytest.fixture(scope="module")
def tls_redis() -> Iterator[TlsRedisServer]:
    with tls_redis_server() as server:
        admin = server.admin()
        user, per_identity = readme_acl_lines()
        for line in (user.replace("CHANGE-ME", PASSWORD), per_identity):
            command = shlex.split(line.replace("<identity>", Upper.identity))
            admin.execute_command(*command)  # type: ignore[no-untyped-call]
        admin.close()
        yield server


def user_client(server: TlsRedisServer) -> redis.Redis:
    kwargs = {**server.client_kwargs(), "username": USER, "password": PASSWORD}
    return redis.Redis(**kwargs)


def write_ini(
    path: Path, server: TlsRedisServer, s3: S3Server, bucket: str, password: str = PASSWORD
) -> Path:
    tls = server.tls
    path.write_text(
        f"[redis]\nhost = 127.0.0.1\nport = {server.port}\nssl = 1\n"
        f"ssl_ca_certs = {tls['ca']}\nssl_certfile = {tls['client_cert']}\n"
        f"ssl_keyfile = {tls['client_key']}\nusername = {USER}\npassword = {password}\n"
        f"\n[s3]\naddress = {s3.url}\naccess_key = {s3.access_key}\n"
        f"secret_key = {s3.secret_key}\nbucket = {bucket}\n"
        "\n[system]\nsetup_bucket = 1\ngc_interval = 0.3\n"
    )
    return path


class Upper(Karton):
    identity = "tls.upper"
    filters = [{"type": "text"}]

    async def process(self, task: Task) -> None:
        resource = task.get_resource("text")
        assert isinstance(resource, RemoteResource)
        data = await resource.download()
        self.log.info("upper-cased %d bytes", len(data))


async def test_a_task_is_routed_processed_and_collected_as_the_acl_user(
    tls_redis: TlsRedisServer,
    s3_srv: S3Server,
    s3_bucket: str,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    ini = write_ini(tmp_path / "karton.ini", tls_redis, s3_srv, s3_bucket)
    config = Config(ini, search_paths=[], environ={})
    async with pipeline(Upper, config=config, gc=True) as pipe:
        task = Task({"type": "text"}, payload={"text": LocalResource("t", b"hello")})
        await pipe.send(task)
        with anyio.fail_after(20):
            while not any("upper-cased 5 bytes" in r.getMessage() for r in caplog.records):
                await anyio.sleep(0.05)
            status = await anyio.run_process(
                [sys.executable, "-m", "asynckarton", "status", "--json",
                 "--config-file", str(ini)],
                check=False,
            )  # fmt: skip
            # the GC (SCAN, MGET, its lock script, DEL) removes the finished tasks
            while await pipe.tasks():
                await anyio.sleep(0.1)
    assert status.returncode == 0, status.stderr.decode()
    state = json.loads(status.stdout)
    assert "tls.upper" in json.dumps(state)
    refused = [r for r in caplog.records if "NOPERM" in r.getMessage() or "permission" in
               r.getMessage().lower()]  # fmt: skip
    assert refused == []
    assert PASSWORD not in caplog.text
    assert PASSWORD not in status.stdout.decode() + status.stderr.decode()


def test_what_the_acl_leaves_out_is_refused(tls_redis: TlsRedisServer) -> None:
    client = user_client(tls_redis)
    try:
        client.set("karton.acl-check", "1")  # inside the ACL
        assert client.get("karton.acl-check") == b"1"
        with pytest.raises(NoPermissionError):
            client.set("someone-else.key", "1")  # a key outside karton.* / asynckarton.*
        with pytest.raises(NoPermissionError):
            client.flushall()  # a command outside the ACL
        with pytest.raises(NoPermissionError):
            client.publish("other.channel", "x")  # a channel outside karton.log.*
        client.delete("karton.acl-check")
        pubsub = client.pubsub()  # type: ignore[no-untyped-call]
        pubsub.psubscribe("karton.log.*", "karton.log.info.*")  # the README's patterns
        confirmed = [pubsub.get_message(timeout=2) for _ in range(2)]
        assert [m and m["type"] for m in confirmed] == ["psubscribe", "psubscribe"]
        with pytest.raises(NoPermissionError):
            pubsub.psubscribe("other.*")
            pubsub.get_message(timeout=2)
        pubsub.close()
    finally:
        client.close()


def test_without_tls_the_server_cannot_be_reached(tls_redis: TlsRedisServer) -> None:
    plain = redis.Redis(host="127.0.0.1", port=tls_redis.port, socket_timeout=2)
    with pytest.raises(redis.exceptions.ConnectionError):
        plain.ping()
    plain.close()


def url_config(server: TlsRedisServer, s3: S3Server, password: str) -> Config:
    """``[redis] url = rediss://karton:<password>@...`` with the TLS files as options."""
    tls = server.tls
    config = Config(search_paths=[], environ={})
    config.set("redis", "url", f"rediss://{USER}:{password}@127.0.0.1:{server.port}/0")
    config.set("redis", "ssl_ca_certs", str(tls["ca"]))
    config.set("redis", "ssl_certfile", str(tls["client_cert"]))
    config.set("redis", "ssl_keyfile", str(tls["client_key"]))
    for option, value in (("address", s3.url), ("access_key", s3.access_key),
                          ("secret_key", s3.secret_key), ("bucket", "unused")):  # fmt: skip
        config.set("s3", option, value)
    return config


async def test_a_rediss_url_reaches_the_server_as_the_acl_user(
    tls_redis: TlsRedisServer, s3_srv: S3Server
) -> None:
    async with Runtime.from_config(url_config(tls_redis, s3_srv, PASSWORD)) as runtime:
        await runtime.backend.ping()
        assert PASSWORD not in runtime.backend.address


def test_ssl_cert_reqs_is_checked(tmp_path: Path) -> None:
    config = Config(search_paths=[], environ={})
    config.set("redis", "host", "127.0.0.1")
    config.set("redis", "ssl_cert_reqs", "sometimes")
    with pytest.raises(ConfigError, match="ssl_cert_reqs"):
        config.redis_settings()
    config.set("redis", "ssl_cert_reqs", "None")
    assert config.redis_settings().ssl_cert_reqs == "none"


@pytest.mark.parametrize("form", ["options", "url"])
async def test_a_wrong_password_is_named_but_never_shown(
    form: str,
    tls_redis: TlsRedisServer,
    s3_srv: S3Server,
    s3_bucket: str,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    wrong = "Wr0ng-Pa55-w0rd-also-secret"
    ini = write_ini(tmp_path / "karton.ini", tls_redis, s3_srv, s3_bucket, password=wrong)
    config = (
        Config(ini, search_paths=[], environ={})
        if form == "options"
        else url_config(tls_redis, s3_srv, wrong)
    )
    async with Runtime.from_config(config) as runtime:
        with pytest.raises(BackendError) as caught:
            await runtime.backend.ping()
    message = "".join(str(e) for e in (caught.value, caught.value.__cause__) if e is not None)
    assert str(tls_redis.port) in message  # where it came from
    assert wrong not in message and wrong not in repr(caught.value)
    assert wrong not in caplog.text


def test_config_output_masks_the_password_and_the_url_one(
    tls_redis: TlsRedisServer, s3_srv: S3Server, tmp_path: Path
) -> None:
    ini = write_ini(tmp_path / "karton.ini", tls_redis, s3_srv, "bucket")
    shown = CliRunner().invoke(app, ["config", "--config-file", str(ini)])
    assert "ssl_ca_certs" in shown.output
    assert PASSWORD not in shown.output
    with_url = tmp_path / "url.ini"
    with_url.write_text(
        f"[redis]\nurl = rediss://{USER}:{PASSWORD}@127.0.0.1:{tls_redis.port}/0\n"
        f"\n[s3]\naddress = {s3_srv.url}\naccess_key = a\nsecret_key = b\nbucket = c\n"
    )
    shown = CliRunner().invoke(app, ["config", "--config-file", str(with_url)])
    assert "rediss://" in shown.output
    assert PASSWORD not in shown.output
