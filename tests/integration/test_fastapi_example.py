"""``examples/fastapi_app.py`` served by uvicorn, driven by a real HTTP client.

Plus the lifespan factory in-process (FastAPI's TestClient) and the import guard.
"""

from __future__ import annotations

import hashlib
import importlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from fastapi import FastAPI

from asynckarton import Config, Consumer, Task
from asynckarton.fastapi import ProducerDep, lifespan
from tests.servers import free_port

REPO = Path(__file__).resolve().parents[2]
STARTUP_TIMEOUT = 90.0


@pytest.fixture
def server(tmp_path: Path) -> Iterator[tuple[str, subprocess.Popen[bytes], Path]]:
    """The example app under uvicorn on a free loopback port (embedded mode)."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("KARTON_")}
    env["HOME"] = str(tmp_path)  # no karton.ini: embedded, data under tmp_path
    log = tmp_path / "uvicorn.log"
    command = [sys.executable, "-m", "uvicorn", "examples.fastapi_app:app", "--app-dir",
               str(REPO), "--host", "127.0.0.1", "--port", str(port)]  # fmt: skip
    with log.open("wb") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, cwd=tmp_path,
                                   env=env)  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + STARTUP_TIMEOUT
        while True:
            if process.poll() is not None:
                pytest.fail(f"uvicorn exited:\n{log.read_text()}")
            try:
                if httpx.get(f"{base}/healthz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"uvicorn did not come up:\n{log.read_text()}")
            time.sleep(0.1)
        yield base, process, log
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=10)


@pytest.mark.integration
def test_upload_is_hashed_by_the_consumer(
    server: tuple[str, subprocess.Popen[bytes], Path],
) -> None:
    base, process, log = server
    content = os.urandom(300_000)
    with httpx.Client(base_url=base, timeout=10) as client:
        sent = client.post("/tasks", files={"file": ("blob.bin", content)})
        assert sent.status_code == 200, sent.text
        ids = sent.json()
        assert ids["uid"].startswith("{" + ids["root_uid"] + "}:")
        assert client.get("/results/unknown").status_code == 404

        deadline = time.monotonic() + 30
        while (reply := client.get(f"/results/{ids['root_uid']}")).status_code == 404:
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.05)
    assert reply.status_code == 200
    result = reply.json()
    assert result["sha256"] == hashlib.sha256(content).hexdigest()
    assert result["size"] == len(content)
    assert result["name"] == "blob.bin"

    process.send_signal(signal.SIGTERM)
    process.wait(timeout=30)
    assert "Application shutdown complete" in log.read_text()


@pytest.mark.integration
@pytest.mark.filterwarnings("ignore:Using `httpx` with `starlette.testclient` is deprecated")
def test_lifespan_in_process(tmp_path: Path) -> None:
    """The factory alone: ProducerDep is injected, consumers run and are stopped, and all
    of them share one runtime."""
    from fastapi.testclient import TestClient

    seen: list[str] = []

    class Echo(Consumer):
        identity = "test.echo"
        filters = [{"type": "echo"}]

        async def process(self, task: Task) -> None:
            seen.append(task.headers["word"])

    config = Config(search_paths=[], environ={"HOME": str(tmp_path)})
    config.set("logging", "enable_publish", "0")
    echo = Echo(config)
    app = FastAPI(lifespan=lifespan(config, consumers=[echo], system=True, grace=1.0))

    @app.post("/echo/{word}")
    async def send(word: str, producer: ProducerDep) -> dict[str, str]:
        task = Task({"type": "echo", "word": word})
        await producer.send_task(task)
        return {"uid": task.uid}

    @app.get("/runtime")
    async def runtime(producer: ProducerDep) -> dict[str, bool]:
        return {"shared": producer.runtime is echo.runtime}

    with TestClient(app) as client:
        assert client.get("/runtime").json() == {"shared": True}  # one pool per app
        assert client.post("/echo/hello").status_code == 200
        deadline = time.monotonic() + 30
        while not seen:
            assert time.monotonic() < deadline
            time.sleep(0.02)
    assert seen == ["hello"]
    assert echo._scopes is None  # stopped with the app
    assert echo.given_runtime is None  # the lifespan's runtime was lent, then taken back


def test_import_guard_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "fastapi", None)  # makes 'import fastapi' fail
    monkeypatch.delitem(sys.modules, "asynckarton.fastapi", raising=False)
    with pytest.raises(ImportError, match=r"pip install 'asynckarton\[fastapi\]'"):
        importlib.import_module("asynckarton.fastapi")
