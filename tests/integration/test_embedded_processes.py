"""The embedded default across processes, as a newcomer runs it: three shells, no Redis.

``asynckarton system`` serves its in-process Redis on loopback; a service started with
``asynckarton run module:Class`` from the folder holding the module, and a producer
script, find it through the data directory and work together.  A producer with nothing
to reach warns instead of silently dropping its task.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.servers import stop_processes

pytestmark = pytest.mark.integration

SERVICE = """
from pathlib import Path
from asynckarton import Consumer, RemoteResource, Task

class Echo(Consumer):
    identity = "test.echo"
    filters = [{"type": "echo"}]

    async def process(self, task: Task) -> None:
        resource = task.get_resource("sample")
        assert isinstance(resource, RemoteResource)
        Path(task.get_payload("out")).write_bytes(await resource.download())
"""

PRODUCER = """
import sys, anyio
from asynckarton import LocalResource, Producer, Task

async def main() -> None:
    async with Producer() as producer:
        sample = LocalResource("s", content=b"hello across processes")
        await producer.send_task(Task({"type": "echo"}, payload={"out": sys.argv[1], "sample": sample}))

anyio.run(main)
"""


def environment(home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("KARTON_")}
    env["HOME"] = str(home)  # no ~/.config/karton/karton.ini
    env["XDG_DATA_HOME"] = str(home / "data")
    return env


def asynckarton() -> list[str]:
    return [str(Path(sys.executable).with_name("asynckarton"))]


@pytest.fixture
def shell(tmp_path: Path) -> Iterator[list[subprocess.Popen[bytes]]]:
    """Processes started by a test, stopped (SIGTERM, then SIGKILL) at its end."""
    started: list[subprocess.Popen[bytes]] = []
    yield started
    stop_processes(started)


def wait_for(path: Path, timeout: float = 30.0, text: str | None = None) -> None:
    """Wait until ``path`` exists (and contains ``text``, when given)."""
    deadline = time.monotonic() + timeout
    while not path.exists() or (text is not None and text not in path.read_text("utf-8")):
        assert time.monotonic() < deadline, f"{path} did not get {text!r} within {timeout:g} s"
        time.sleep(0.1)


def test_services_and_producers_in_separate_processes_share_the_system_service(
    tmp_path: Path, shell: list[subprocess.Popen[bytes]]
) -> None:
    env = environment(tmp_path)
    (tmp_path / "echo_svc.py").write_text(SERVICE, encoding="utf-8")
    (tmp_path / "send.py").write_text(PRODUCER, encoding="utf-8")
    logs = tmp_path / "logs"
    logs.mkdir()
    with (logs / "system.log").open("wb") as out:
        shell.append(
            subprocess.Popen([*asynckarton(), "system"], cwd=tmp_path, env=env, stdout=out,
                             stderr=subprocess.STDOUT)
        )  # fmt: skip
    address = tmp_path / "data" / "asynckarton" / "embedded-redis.json"
    wait_for(address)
    record = json.loads(address.read_text(encoding="utf-8"))
    assert record["host"] == "127.0.0.1" and record["pid"] == shell[0].pid
    with (logs / "service.log").open("wb") as out:
        shell.append(
            subprocess.Popen([*asynckarton(), "run", "echo_svc:Echo"], cwd=tmp_path, env=env,
                             stdout=out, stderr=subprocess.STDOUT)
        )  # fmt: skip
    wait_for(logs / "service.log", text="Service test.echo started")  # its bind exists
    assert "private in-process Redis" not in (logs / "service.log").read_text("utf-8")
    out_file = tmp_path / "out.txt"
    sent = subprocess.run(
        [sys.executable, "send.py", str(out_file)], cwd=tmp_path, env=env,
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert sent.returncode == 0, sent.stderr
    assert "private in-process Redis" not in sent.stderr
    wait_for(out_file)
    assert out_file.read_bytes() == b"hello across processes"
    shell[0].send_signal(signal.SIGTERM)
    shell[0].wait(timeout=15)
    assert not address.exists()  # the serving process removed its address at exit


def test_a_producer_with_nothing_to_reach_warns_naming_the_way_out(tmp_path: Path) -> None:
    (tmp_path / "send.py").write_text(PRODUCER, encoding="utf-8")
    sent = subprocess.run(
        [sys.executable, "send.py", str(tmp_path / "never.txt")], cwd=tmp_path,
        env=environment(tmp_path), capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert sent.returncode == 0, sent.stderr
    assert "private in-process Redis" in sent.stderr
    assert "Start 'asynckarton system'" in sent.stderr
