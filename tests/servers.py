"""Real servers for the test suite: a redis-server subprocess and a moto S3 server.

Integration tests never share the machine's Redis on 6379: each fixture starts its own
server on a free loopback port so tests can stop, restart, kill and fault it.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    import redis

    from asynckarton import Config


def free_port() -> int:
    """Return a loopback port that was free a moment ago."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def require(tool: str) -> str:
    """Return the path of ``tool``; fail under CI, skip elsewhere, when it is missing."""
    path = shutil.which(tool)
    if path:
        return path
    if os.environ.get("CI"):
        pytest.fail(f"{tool} must be installed in CI (see .ci/run)")
    pytest.skip(f"{tool} not installed")


def _ping(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(16).startswith(b"+PONG")
    except OSError:
        return False


class RedisServer:
    """A redis-server subprocess on a free loopback port that tests can fault.

    With ``persistent=True`` the server writes an append-only file, so a restart keeps
    its data (what the reliability suite needs: "nothing is lost, with persistence on").
    """

    def __init__(self, *, persistent: bool = False, extra_args: Sequence[str] = ()) -> None:
        self.binary = require("redis-server")
        self.port = free_port()
        self.persistent = persistent
        self.extra_args = list(extra_args)  # e.g. --replicaof, --maxmemory
        self.dir = Path(tempfile.mkdtemp(prefix="asynckarton-redis-"))
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        persistence = (
            ["--appendonly", "yes", "--appendfsync", "always", "--save", ""]
            if self.persistent
            else ["--appendonly", "no", "--save", ""]
        )
        self.process = subprocess.Popen(
            [
                self.binary,
                "--bind",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--dir",
                str(self.dir),
                "--protected-mode",
                "no",
                *persistence,
                *self.extra_args,
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while not _ping(self.port):
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"redis-server did not start on port {self.port}")
            time.sleep(0.02)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=10)
        self.process = None

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=10)
        self.process = None

    def restart(self) -> None:
        self.stop()
        self.start()

    def close(self) -> None:
        self.kill()
        shutil.rmtree(self.dir, ignore_errors=True)


def _command(port: int, *args: str) -> list[str]:
    """Send one inline command to a loopback Redis or sentinel; return its reply lines."""
    with socket.create_connection(("127.0.0.1", port), timeout=2) as sock:
        sock.sendall((" ".join(args) + "\r\n").encode())
        data = b""
        sock.settimeout(0.3)
        try:
            while chunk := sock.recv(65536):
                data += chunk
        except TimeoutError:
            pass
    return [line for line in data.decode().split("\r\n") if line]


class SentinelCluster:
    """A master, ``replicas`` replicas and ``sentinels`` sentinels, all on loopback.

    The sentinels watch the master as ``name`` with quorum 2, call it down after
    ``down_after_ms`` and allow a failover every ``failover_timeout_ms``, so a SIGKILLed
    master is replaced within seconds.  Started by ``redis-server <conf> --sentinel``
    (the redis-sentinel binary is the same program).

    :meth:`start` returns once every replica holds the master's data set (its link is
    up).  Without that wait a test could kill the master before the first sync, which
    redis-server delays by ``repl-diskless-sync-delay`` (5 s by default, here
    ``sync_delay``): the sentinels then promote an *empty* replica, and everything is
    lost, binds included.  ``wait_for_sync=False`` with a long ``sync_delay`` builds that
    case on purpose.
    """

    name = "asynckarton"

    def __init__(
        self,
        *,
        replicas: int = 2,
        sentinels: int = 3,
        down_after_ms: int = 1000,
        failover_timeout_ms: int = 3000,
        sync_delay: int = 0,
        wait_for_sync: bool = True,
    ) -> None:
        sync = ["--repl-diskless-sync-delay", str(sync_delay)]
        self.master = RedisServer(extra_args=sync)
        self.replicas = [
            RedisServer(extra_args=[*sync, "--replicaof", "127.0.0.1", str(self.master.port)])
            for _ in range(replicas)
        ]
        self.wait_for_sync = wait_for_sync
        self.sentinel_ports = [free_port() for _ in range(sentinels)]
        self.down_after_ms = down_after_ms
        self.failover_timeout_ms = failover_timeout_ms
        self.dir = Path(tempfile.mkdtemp(prefix="asynckarton-sentinel-"))
        self.sentinel_procs: list[subprocess.Popen[bytes]] = []
        self.started_at = 0.0  # time.monotonic() when the master started

    @property
    def servers(self) -> list[RedisServer]:
        return [self.master, *self.replicas]

    @property
    def sentinel_addresses(self) -> str:
        """The ``[redis] sentinels`` value."""
        return ",".join(f"127.0.0.1:{port}" for port in self.sentinel_ports)

    def start(self, timeout: float = 30.0) -> None:
        self.master.start()
        self.started_at = time.monotonic()
        for replica in self.replicas:
            replica.start()
        for port in self.sentinel_ports:
            conf = self.dir / f"sentinel-{port}.conf"
            conf.write_text(
                f"port {port}\nbind 127.0.0.1\nprotected-mode no\ndir {self.dir}\n"
                f"sentinel monitor {self.name} 127.0.0.1 {self.master.port} 2\n"
                f"sentinel down-after-milliseconds {self.name} {self.down_after_ms}\n"
                f"sentinel failover-timeout {self.name} {self.failover_timeout_ms}\n"
                f"sentinel parallel-syncs {self.name} 1\n"
            )
            self.sentinel_procs.append(
                subprocess.Popen(
                    [self.master.binary, str(conf), "--sentinel"],
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
            )
        # Ready when every sentinel knows every replica and every other sentinel (a
        # failover needs a quorum and an elected leader), and every replica has synced.
        deadline = time.monotonic() + timeout
        while not self._settled():
            if time.monotonic() > deadline:
                raise RuntimeError(
                    "the sentinels did not discover each other, or the replicas did not "
                    f"sync, in time: {self.replication()}"
                )
            time.sleep(0.2)

    def _settled(self) -> bool:
        if self.wait_for_sync and not all(
            state.get("master_link_status") == "up" for state in self.replication().values()
        ):
            return False
        want_replicas = str(len(self.replicas))
        want_others = str(len(self.sentinel_ports) - 1)
        for port in self.sentinel_ports:
            try:
                reply = _command(port, "SENTINEL", "MASTER", self.name)
            except OSError:
                return False
            fields = dict(zip(reply[2::4], reply[4::4], strict=False))
            if fields.get("num-slaves") != want_replicas:
                return False
            if fields.get("num-other-sentinels") != want_others:
                return False
        return True

    def master_port(self) -> int | None:
        """The master's port as the first answering sentinel reports it."""
        for port in self.sentinel_ports:
            try:
                reply = _command(port, "SENTINEL", "GET-MASTER-ADDR-BY-NAME", self.name)
            except OSError:
                continue
            if len(reply) >= 5:
                return int(reply[4])
        return None

    def replication(self) -> dict[int, dict[str, Any]]:
        """Each replica's link to its master and replicated offset (INFO replication)."""
        import redis  # at run time only here: the rest of this module types with it

        out: dict[int, dict[str, Any]] = {}
        for replica in self.replicas:
            client = redis.Redis(port=replica.port, socket_timeout=2, decode_responses=True)
            try:
                info = client.info("replication")
            except (redis.RedisError, OSError) as exc:
                out[replica.port] = {"error": str(exc)}
                continue
            finally:
                client.close()
            keys = ("role", "master_port", "master_link_status", "master_repl_offset")
            out[replica.port] = {k: info.get(k, "?") for k in keys}
        return out

    def views(self) -> dict[int, dict[str, str]]:
        """Each sentinel's view of the master (address and flags), for diagnostics."""
        out: dict[int, dict[str, str]] = {}
        for port in self.sentinel_ports:
            try:
                reply = _command(port, "SENTINEL", "MASTER", self.name)
            except OSError as exc:
                out[port] = {"error": str(exc)}
                continue
            fields = dict(zip(reply[2::4], reply[4::4], strict=False))
            out[port] = {k: fields.get(k, "?") for k in ("ip", "port", "flags", "config-epoch")}
        return out

    def close(self) -> None:
        for proc in self.sentinel_procs:
            if proc.poll() is None:
                proc.kill()
            proc.wait(timeout=10)
        for server in self.servers:
            server.close()
        shutil.rmtree(self.dir, ignore_errors=True)


@contextmanager
def sentinel_cluster(**options: Any) -> Iterator[SentinelCluster]:
    cluster = SentinelCluster(**options)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.close()


@contextmanager
def redis_server(*, persistent: bool = False) -> Iterator[RedisServer]:
    server = RedisServer(persistent=persistent)
    server.start()
    try:
        yield server
    finally:
        server.close()


class S3Server:
    """moto's S3 server mode on a free loopback port (a real HTTP endpoint)."""

    access_key = "testing"
    secret_key = "testing"

    def __init__(self) -> None:
        from moto.server import ThreadedMotoServer

        os.environ.setdefault("AWS_ACCESS_KEY_ID", self.access_key)
        os.environ.setdefault("AWS_SECRET_ACCESS_KEY", self.secret_key)
        os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
        self._server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        self.url = ""

    def start(self) -> None:
        self._server.start()
        host, port = self._server.get_host_and_port()
        self.url = f"http://{host}:{port}"

    def stop(self) -> None:
        self._server.stop()


def service_sections(
    redis_url: str, s3: S3Server, bucket: str, **sections: dict[str, Any]
) -> dict[str, dict[str, Any]]:
    """``[redis] url``, ``[s3]`` of ``s3`` and ``bucket``, then ``sections``, as a dict."""
    return {
        "redis": {"url": redis_url},
        "s3": {
            "address": s3.url,
            "access_key": s3.access_key,
            "secret_key": s3.secret_key,
            "bucket": bucket,
        },
        **sections,
    }


def service_config(
    redis_url: str,
    s3: S3Server,
    bucket: str,
    *,
    source: str = "arguments",
    **sections: dict[str, Any],
) -> Config:
    """A Config of no file: :func:`service_sections` loaded from ``source``."""
    from asynckarton import Config

    config = Config(search_paths=[], environ={})
    config.load_from_dict(service_sections(redis_url, s3, bucket, **sections), source=source)
    return config


@contextmanager
def s3_server() -> Iterator[S3Server]:
    server = S3Server()
    server.start()
    try:
        yield server
    finally:
        server.stop()


# -- TLS and ACL (issue 12 item 5) ----------------------------------------------------------


def make_tls_files(directory: Path) -> dict[str, Path]:
    """Write a throw-away CA, a server certificate for 127.0.0.1/localhost and a client one.

    Uses the ``openssl`` command (EC P-256 keys: fast to make).  Returns the paths under the
    names ``ca``, ``server_cert``, ``server_key``, ``client_cert``, ``client_key``.
    """
    openssl = require("openssl")
    directory.mkdir(parents=True, exist_ok=True)
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]

    def run(*args: str) -> None:
        subprocess.run([openssl, *args], cwd=directory, check=True, capture_output=True)

    run("req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.crt", "-days", "2",
        "-subj", "/CN=asynckarton test CA")  # fmt: skip
    for name, ext in (
        ("server", "subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth"),
        ("client", "extendedKeyUsage=clientAuth"),
    ):
        (directory / f"{name}.ext").write_text(ext + "\n")
        run("req", *ec, "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={name}")
        run("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
            "-CAcreateserial", "-out", f"{name}.crt", "-days", "2",
            "-extfile", f"{name}.ext")  # fmt: skip
    return {
        "ca": directory / "ca.crt",
        "server_cert": directory / "server.crt",
        "server_key": directory / "server.key",
        "client_cert": directory / "client.crt",
        "client_key": directory / "client.key",
    }


class TlsRedisServer:
    """A redis-server reachable only over TLS (client certificates required).

    The ``default`` user has the password :attr:`admin_password`: tests use it to create
    the restricted users they check (``ACL SETUSER``), then connect as those users.
    """

    admin_password = "admin-secret-for-tests"

    def __init__(self) -> None:
        self.binary = require("redis-server")
        self.port = free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="asynckarton-redis-tls-"))
        self.tls = make_tls_files(self.dir / "tls")
        self.process: subprocess.Popen[bytes] | None = None

    def client_kwargs(self) -> dict[str, Any]:
        """redis-py keyword arguments that reach this server (as the default user)."""
        return {
            "host": "127.0.0.1",
            "port": self.port,
            "ssl": True,
            "ssl_ca_certs": str(self.tls["ca"]),
            "ssl_certfile": str(self.tls["client_cert"]),
            "ssl_keyfile": str(self.tls["client_key"]),
            "password": self.admin_password,
        }

    def admin(self) -> redis.Redis:
        """A synchronous client logged in as the default (unrestricted) user."""
        import redis as redis_sync

        return redis_sync.Redis(**self.client_kwargs())

    def _arguments(self) -> list[str]:
        tls = self.tls
        options = {
            "bind": "127.0.0.1", "port": "0", "tls-port": str(self.port),
            "tls-cert-file": str(tls["server_cert"]), "tls-key-file": str(tls["server_key"]),
            "tls-ca-cert-file": str(tls["ca"]), "tls-auth-clients": "yes",
            "requirepass": self.admin_password, "dir": str(self.dir),
            "appendonly": "no", "save": "",
        }  # fmt: skip
        return [part for name, value in options.items() for part in (f"--{name}", value)]

    def start(self) -> None:
        import redis as redis_sync

        self.process = subprocess.Popen(
            [self.binary, *self._arguments()],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while True:
            try:
                with self.admin() as client:
                    client.ping()
                return
            except redis_sync.ConnectionError:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"TLS redis-server did not start on {self.port}") from None
                time.sleep(0.05)

    def close(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=10)
        self.process = None
        shutil.rmtree(self.dir, ignore_errors=True)


@contextmanager
def tls_redis_server() -> Iterator[TlsRedisServer]:
    server = TlsRedisServer()
    server.start()
    try:
        yield server
    finally:
        server.close()


class RestartableS3Server(S3Server):
    """A moto S3 server that a test stops and starts again on the same port.

    The objects survive a restart (moto keeps them in this process); while stopped,
    connections to the port are refused, as with an S3 server that is down.
    """

    def __init__(self) -> None:
        super().__init__()
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.running = False

    def start(self) -> None:
        from moto.server import ThreadedMotoServer

        self._server = ThreadedMotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)
        deadline = time.monotonic() + 10
        while True:
            try:
                self._server.start()
                break
            except OSError:  # the port is still being released
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
        self.running = True

    def stop(self) -> None:
        if self.running:
            self._server.stop()
            self.running = False


@contextmanager
def restartable_s3_server() -> Iterator[RestartableS3Server]:
    server = RestartableS3Server()
    server.start()
    try:
        yield server
    finally:
        server.stop()


def stop_processes(started: Sequence[subprocess.Popen[bytes]], timeout: float = 20.0) -> None:
    """Stop a test's long-running commands: SIGTERM to all, then SIGKILL what outlives it."""
    for process in started:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
    for process in started:
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
