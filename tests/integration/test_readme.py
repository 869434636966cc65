"""The README and the examples, run as a new user runs them (issue 14).

Once per session a fresh virtual environment gets ``pip install '<repo>[fastapi]'`` (the
machine's pip configuration supplies the wheels).  Then, from a folder of their own and
with that environment's ``asynckarton`` and ``python`` only (no ``PYTHONPATH``, no
``karton.ini``, a home directory of their own):

* README command 1's ``asynckarton demo`` reports every file;
* the README's Python blocks: those whose first line names a file (``# reverser.py``) are
  saved under that name, the others run as scripts and must succeed; the named ones pass
  ``mypy --strict``;
* the README's three shells (``asynckarton system``, ``python reverser.py``,
  ``python send.py``) deliver the task to the service;
* each example is run and fed with the commands of its docstring.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests.servers import free_port, stop_processes

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
README = REPO / "README.md"
EXAMPLES = REPO / "examples"
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.DOTALL | re.MULTILINE)
FILE_LINE = re.compile(r"# ([\w.]+\.py)\n")


@dataclass(frozen=True)
class Block:
    """A README code block: its language, the file it names (if any) and its text."""

    language: str
    name: str | None
    code: str


def readme_blocks() -> list[Block]:
    blocks = []
    for language, code in FENCE.findall(README.read_text(encoding="utf-8")):
        named = FILE_LINE.match(code)
        blocks.append(Block(language, named.group(1) if named else None, code))
    return blocks


@dataclass(frozen=True)
class User:
    """A fresh environment and a home directory: how a newcomer's shell runs commands."""

    bin: Path
    home: Path

    def env(self) -> dict[str, str]:
        drop = ("PYTHONPATH", "VIRTUAL_ENV", "XDG_DATA_HOME", "XDG_CONFIG_HOME")
        env = {k: v for k, v in os.environ.items() if not k.startswith("KARTON_") and k not in drop}
        env["HOME"] = str(self.home)
        env["PATH"] = f"{self.bin}{os.pathsep}{env.get('PATH', '')}"
        return env

    def argv(self, command: str) -> list[str]:
        words = command.split()
        return [str(self.bin / words[0]), *words[1:]]

    def run(
        self, argv: list[str], cwd: Path, timeout: float = 120
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            argv, cwd=cwd, env=self.env(), capture_output=True, text=True, timeout=timeout,
            check=False,
        )  # fmt: skip

    @property
    def data_dir(self) -> Path:
        return self.home / ".local" / "share" / "asynckarton"


@pytest.fixture(scope="session")
def fresh_venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``python -m venv`` + ``pip install '<repo>[fastapi]'``, once per session."""
    root = tmp_path_factory.mktemp("newcomer")
    venv = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    source = root / "asynckarton-src"  # what a checkout holds, without build leftovers
    shutil.copytree(REPO, source, ignore=shutil.ignore_patterns(
        ".git", ".venv", "build", "*.egg-info", "__pycache__", ".mypy_cache", ".ruff_cache"))  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    installed = subprocess.run(
        [str(venv / "bin" / "python"), "-m", "pip", "install", "-q", f"{source}[fastapi]"],
        env=env, capture_output=True, text=True, timeout=600, check=False,
    )  # fmt: skip
    assert installed.returncode == 0, installed.stdout + installed.stderr
    return venv / "bin"


@pytest.fixture
def user(fresh_venv: Path, tmp_path: Path) -> User:
    home = tmp_path / "home"
    home.mkdir()
    return User(fresh_venv, home)


@pytest.fixture
def shells(user: User) -> Iterator[list[subprocess.Popen[bytes]]]:
    """Long-running commands of a test, stopped (SIGTERM, then SIGKILL) at its end."""
    started: list[subprocess.Popen[bytes]] = []
    yield started
    stop_processes(started)


def start(
    shells: list[subprocess.Popen[bytes]], user: User, command: str, cwd: Path, log: Path
) -> subprocess.Popen[bytes]:
    with log.open("wb") as out:
        process = subprocess.Popen(
            user.argv(command), cwd=cwd, env=user.env(), stdout=out, stderr=subprocess.STDOUT
        )
    shells.append(process)
    return process


def wait_for(path: Path, text: str | None = None, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists() or (text is not None and text not in path.read_text("utf-8")):
        if time.monotonic() > deadline:
            seen = path.read_text("utf-8") if path.exists() else "(no file)"
            raise AssertionError(f"{path.name} did not get {text!r} in {timeout:g} s:\n{seen}")
        time.sleep(0.1)


def stop(process: subprocess.Popen[bytes]) -> int:
    process.send_signal(signal.SIGTERM)
    return process.wait(timeout=30)


# -- README ------------------------------------------------------------------------------


def test_readme_command_1_demo(user: User, tmp_path: Path) -> None:
    assert "pip install . && asynckarton demo" in README.read_text(encoding="utf-8")
    result = user.run(user.argv("asynckarton demo"), cwd=tmp_path, timeout=180)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "data in a temporary folder" in result.stdout


def test_readme_three_shells_then_every_python_block(
    user: User, tmp_path: Path, shells: list[subprocess.Popen[bytes]]
) -> None:
    text = README.read_text(encoding="utf-8")
    blocks = [block for block in readme_blocks() if block.language == "python"]
    folder = tmp_path / "project"
    folder.mkdir()
    for block in blocks:
        if block.name:
            (folder / block.name).write_text(block.code, encoding="utf-8")
    assert {"reverser.py", "send.py"} <= {block.name for block in blocks}
    for command in ("asynckarton system", "python reverser.py", "python send.py"):
        assert f"\n{command} " in text, command  # the README's own three shells
    logs = tmp_path / "logs"
    logs.mkdir()
    system = start(shells, user, "asynckarton system", folder, logs / "system.log")
    wait_for(user.data_dir / "embedded-redis.json")
    service = start(shells, user, "python reverser.py", folder, logs / "reverser.log")
    wait_for(logs / "reverser.log", "Service example.reverser started")
    sent = user.run(user.argv("python send.py"), cwd=folder)
    assert sent.returncode == 0, sent.stderr
    assert sent.stdout.startswith("sent ") and "private in-process Redis" not in sent.stderr
    wait_for(logs / "reverser.log", "reversing 14 bytes")
    assert stop(service) == 0 and stop(system) == 0
    assert "Traceback" not in (logs / "reverser.log").read_text("utf-8")
    for index, block in enumerate(blocks):
        script = folder / (block.name or f"block_{index}.py")
        script.write_text(block.code, encoding="utf-8")
        python = str(user.bin / "python")
        if block.name and "__main__" in block.code:  # a service: importing it must work
            argv = [python, "-c", f"import {script.stem}"]
        else:
            argv = [python, script.name]
        ran = user.run(argv, cwd=folder)
        assert ran.returncode == 0, f"README block {index} ({script.name}):\n{ran.stderr}"
    imported = user.run(
        [str(user.bin / "python"), "-c", "import uvicorn, fastapi, multipart"], folder
    )
    assert imported.returncode == 0, imported.stderr  # the [fastapi] extra serves the app


def test_readme_service_files_pass_mypy_strict(tmp_path: Path) -> None:
    names = []
    for block in readme_blocks():
        if block.language == "python" and block.name:
            (tmp_path / block.name).write_text(block.code, encoding="utf-8")
            names.append(block.name)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    checked = subprocess.run(
        [sys.executable, "-m", "mypy", "--strict", "--no-incremental", "--config-file=",
         "--cache-dir", str(tmp_path / ".mypy"), *names],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert checked.returncode == 0, checked.stdout + checked.stderr


# -- examples ----------------------------------------------------------------------------


def docstring_commands(path: Path) -> str:
    text = path.read_text(encoding="utf-8")
    return text.split('"""')[1]


def test_examples_are_fed_as_their_docstrings_say(
    user: User, tmp_path: Path, shells: list[subprocess.Popen[bytes]]
) -> None:
    folder = tmp_path / "examples"
    shutil.copytree(EXAMPLES, folder, ignore=shutil.ignore_patterns("__pycache__"))
    logs = tmp_path / "logs"
    logs.mkdir()
    cases = [
        ("sleeper.py", "asynckarton run sleeper.py:Sleeper --with-system --grace 10",
         """python send_task.py '{"type": "sleep"}' '{"seconds": 3}'""", "Sleeping 3.0 s"),
        ("smol_karton.py",
         "asynckarton run smol_karton.py:SmolKarton --with-system --how-smol 5",
         """python send_task.py '{"type": "smol-tasks", "size": 3}'""", "Task done"),
    ]  # fmt: skip
    for example, serve, feed, seen in cases:
        doc = docstring_commands(folder / example)
        assert serve in doc and feed in doc, example
        log = logs / f"{example}.log"
        process = start(shells, user, serve, folder, log)
        wait_for(log, "started (concurrency")
        headers_and_payload = re.findall(r"'([^']*)'", feed)
        sent = user.run([str(user.bin / "python"), "send_task.py", *headers_and_payload], folder)
        assert sent.returncode == 0, sent.stderr
        assert "private in-process Redis" not in sent.stderr
        wait_for(log, seen)
        assert stop(process) == 0, log.read_text("utf-8")


def test_fastapi_example_serves_from_its_documented_command(
    user: User, tmp_path: Path, shells: list[subprocess.Popen[bytes]]
) -> None:
    shutil.copytree(EXAMPLES, tmp_path / "examples", ignore=shutil.ignore_patterns("__pycache__"))
    command = "uvicorn examples.fastapi_app:app"
    assert command in docstring_commands(tmp_path / "examples" / "fastapi_app.py")
    port = free_port()
    log = tmp_path / "uvicorn.log"
    server = start(shells, user, f"{command} --port {port}", tmp_path, log)  # from the checkout
    wait_for(log, "Application startup complete", timeout=90)
    base = f"http://127.0.0.1:{port}"
    assert httpx.get(f"{base}/healthz", timeout=10).json() == {"status": "ok"}
    sent = httpx.post(f"{base}/tasks", files={"file": ("a.txt", b"abc")}, timeout=30).json()
    deadline = time.monotonic() + 30
    while (
        result := httpx.get(f"{base}/results/{sent['root_uid']}", timeout=10)
    ).status_code != 200:
        assert time.monotonic() < deadline, log.read_text("utf-8")
        time.sleep(0.2)
    assert result.json()["sha256"] == hashlib.sha256(b"abc").hexdigest()
    assert stop(server) in (0, -signal.SIGTERM)  # uvicorn re-raises the signal it handled
    assert "Application shutdown complete" in log.read_text("utf-8")
