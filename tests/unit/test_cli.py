"""The command line: help of every command, karton-system's flags, errors, serve_forever.

Everything here runs in-process (typer's CliRunner, embedded mode): no servers.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar, Self

import anyio
import pytest
from anyio.abc import TaskStatus
from typer.testing import CliRunner

from asynckarton import Config, SystemService, __version__
from asynckarton._services._run import serve_forever
from asynckarton.cli._app import app
from asynckarton.cli._loader import CommonOptions, build_services, load_service_class, split_targets
from asynckarton.demo import classify, extract_strings, sample_files

REPO = Path(__file__).resolve().parents[2]
SMOL = f"{REPO / 'examples' / 'smol_karton.py'}:SmolKarton"
KARTON_SYSTEM_FLAGS = (
    "--setup-bucket",
    "--disable-gc",
    "--disable-router",
    "--gc-interval",
    "--task-dispatched-timeout",
    "--task-started-timeout",
    "--task-crashed-timeout",
    "--config-file",
    "--identity",
    "--log-level",
    "--version",
    "--debug",
)


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """No ini file and no KARTON_* variable from the machine reaches the commands."""
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    for name in list(os.environ):
        if name.startswith("KARTON_"):
            monkeypatch.delenv(name)
    yield tmp_path


def invoke(*args: str) -> Any:
    return CliRunner().invoke(app, list(args))


def write_ini(path: Path, text: str) -> Path:
    path.write_text(text.lstrip("\n"), encoding="utf-8")
    return path


# -- help and version --------------------------------------------------------------------


@pytest.mark.parametrize(
    "command",
    [
        [],
        ["run"],
        ["demo"],
        ["version"],
        ["config"],
        ["tasks"],
        ["tasks", "list"],
        ["tasks", "restart"],
        ["tasks", "cancel"],
    ],
)
def test_help_of_every_command(command: list[str]) -> None:
    result = invoke(*command, "--help")
    assert result.exit_code == 0, result.output
    assert "Usage" in result.output


def test_top_level_help_lists_commands() -> None:
    result = invoke("--help")
    for name in ("run", "system", "demo", "tasks", "version", "config"):
        assert name in result.output


def test_system_help_lists_every_karton_system_flag() -> None:
    result = invoke("system", "--help")
    assert result.exit_code == 0, result.output
    assert "Usage: asynckarton system" in result.output
    for flag in KARTON_SYSTEM_FLAGS:
        assert flag in result.output, flag


def test_system_version() -> None:
    result = invoke("system", "--version")
    assert result.exit_code == 0
    assert __version__ in result.output


def test_version() -> None:
    result = invoke("version")
    assert result.exit_code == 0
    assert result.output.strip() == f"asynckarton {__version__} (Karton protocol 5.9.1)"


# -- config and errors -------------------------------------------------------------------


def test_config_explains_where_values_come_from(home: Path) -> None:
    ini = write_ini(home / "k.ini", "[karton]\nconcurrency_limit = 4\n")
    result = invoke("config", "--config-file", str(ini))
    assert result.exit_code == 0, result.output
    assert f"[karton] concurrency_limit = 4  # {ini}:2" in result.output
    assert "mode: embedded" in result.output


@pytest.mark.parametrize("command", [["config"], ["run", SMOL, "--embedded"]])
def test_bad_config_value_names_option_and_source(home: Path, command: list[str]) -> None:
    ini = write_ini(home / "bad.ini", "[karton]\nconcurrency_limit = lots\n")
    result = invoke(*command, "--config-file", str(ini))
    assert result.exit_code == 1
    assert "[karton] concurrency_limit" in result.stderr
    assert f"{ini}:2" in result.stderr
    assert "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_missing_config_file(home: Path) -> None:
    result = invoke("run", SMOL, "--config-file", str(home / "nope.ini"))
    assert result.exit_code == 1
    assert "configuration file not found" in result.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ([SMOL, "--embedded", "--", "--bogus"], "--bogus"),
        ([SMOL, SMOL, "--identity", "x"], "--identity needs exactly one service"),
        (["no.such.module:X"], "cannot import 'no.such.module'"),
        (["asynckarton:Config"], "not an asynckarton service class"),
        (["asynckarton:Producer"], "cannot run on its own"),
        (["asynckarton"], "must look like 'package.module:Class'"),
        ([SMOL, "--log-level", "LOUD"], "unknown log level"),
    ],
)
def test_run_errors_are_one_line(home: Path, args: list[str], message: str) -> None:
    result = invoke("run", *args)
    assert result.exit_code == 1, result.output
    assert message in result.stderr
    assert "Traceback" not in result.stderr


def test_tasks_commands_need_a_redis_server(home: Path) -> None:
    result = invoke("tasks", "list")
    assert result.exit_code == 1
    assert "needs a Redis server" in result.stderr


def test_tasks_restart_needs_one_selector(home: Path) -> None:
    result = invoke("tasks", "restart")
    assert result.exit_code != 0
    assert "exactly one of --uid, --identity and --all" in result.output


# -- building services -------------------------------------------------------------------


def test_split_targets() -> None:
    assert split_targets(["a:B", "c:D", "--x", "1", "e:F"]) == (["a:B", "c:D"], ["--x", "1", "e:F"])
    assert split_targets(["a:B"]) == (["a:B"], [])


def test_build_services_uses_each_service_hooks(home: Path) -> None:
    smol = load_service_class(SMOL)
    values = {"karton.shutdown_grace": 7.0, "karton.concurrency_limit": 3, "karton.identity": "s"}
    common = CommonOptions(values=values, embedded=True)
    services = build_services([smol], ["--how-smol", "5", "--setup-bucket"], common,
                              with_system=True)  # fmt: skip
    system, karton = services
    assert isinstance(system, SystemService) and system.setup_bucket
    assert system.identity == "karton.system"  # --identity is for the target only
    assert karton.identity == "s"
    assert karton.config.getint("smol", "how_smol") == 5  # the seed-style hooks ran
    assert karton.concurrency_limit == 3  # type: ignore[attr-defined]
    assert karton.config.source("karton", "concurrency_limit") == "argument --concurrency-limit"
    assert karton.shutdown_grace == 7.0  # type: ignore[attr-defined]
    assert karton.config.embedded


def test_smol_karton_default_is_gc_interval(home: Path) -> None:
    smol = load_service_class(SMOL)
    (karton,) = build_services([smol], [], CommonOptions())
    assert karton.config.getint("smol", "how_smol") == smol.GC_INTERVAL == 180


# -- serve_forever -----------------------------------------------------------------------


class FakeService(SystemService):
    """Looks like a service to serve_forever; records stop() calls, sends itself signals."""

    identity: ClassVar[str] = "fake.service"
    signals_to_send: ClassVar[int] = 0

    def __init__(self, config: Config) -> None:
        super().__init__(config)
        self.stops: list[float | None] = []
        self.stopped: anyio.Event | None = None

    async def __aenter__(self) -> Self:
        return self  # no runtime needed

    async def __aexit__(self, *exc: object) -> None:
        return None

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        self.stopped = anyio.Event()
        task_status.started()
        for _ in range(self.signals_to_send):
            count = len(self.stops)
            os.kill(os.getpid(), signal.SIGTERM)
            with anyio.fail_after(10):
                while len(self.stops) == count:
                    await anyio.sleep(0.01)
        if self.stops and self.stops[-1] == 0:
            return

    def stop(self, *, grace: float | None = None) -> None:
        self.stops.append(grace)


def embedded_config(home: Path) -> Config:
    config = Config(search_paths=[], environ={"HOME": str(home)})
    config.set("asynckarton", "embedded", "1")
    return config


def test_serve_forever_returns_when_services_stop_on_their_own(home: Path) -> None:
    service = FakeService(embedded_config(home))
    serve_forever([service], log_level="WARNING")
    assert service.stops == []


def test_serve_forever_first_signal_drains_second_hands_back(home: Path) -> None:
    class TwoSignals(FakeService):
        signals_to_send = 2

    service = TwoSignals(embedded_config(home))
    serve_forever([service], log_level="WARNING", grace=12.5)
    assert service.stops == [12.5, 0]


def test_serve_forever_startup_failure_is_one_line_exit_1(
    home: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    class Broken(FakeService):
        async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
            raise ConnectionError("Error 111 connecting to 127.0.0.1:1. Connection refused.")

    with pytest.raises(SystemExit) as exit_info:
        serve_forever([Broken(embedded_config(home))], log_level="WARNING")
    assert exit_info.value.code == 1
    err = capsys.readouterr().err
    assert err.strip() == (
        "asynckarton: error: ConnectionError: Error 111 connecting to 127.0.0.1:1. "
        "Connection refused."
    )


def test_service_main_is_an_entry_point(home: Path) -> None:
    FakeService.main(["--log-level", "WARNING", "--gc-interval", "5"])  # returns: exit 0


def test_service_main_bad_config_is_one_line_exit_1(
    home: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ini = write_ini(home / "bad.ini", "[system]\ngc_interval = soon\n")
    with pytest.raises(SystemExit) as exit_info:
        FakeService.main(["--config-file", str(ini)])
    assert exit_info.value.code == 1
    err = capsys.readouterr().err
    assert "[system] gc_interval" in err and f"{ini}:2" in err


# -- demo pieces -------------------------------------------------------------------------


def test_classify_shipped_samples() -> None:
    kinds = {path.name: classify(path.read_bytes()[:4096])[0]["kind"] for path in sample_files()}
    assert kinds == {
        "bundle.zip": "archive",
        "hello.elf": "runnable",
        "hello.exe": "runnable",
        "install.sh": "script",
        "readme.txt": "text",
    }
    assert all(path.stat().st_size < 4096 for path in sample_files())


@pytest.mark.parametrize(
    ("head", "kind", "extra"),
    [
        (b"%PDF-1.7\n", "document", {"extension": "pdf"}),
        (b"#!/usr/bin/env python3\nprint()\n", "script", {"extension": "python3"}),
        (b"\x00\x01\x02\xff", "unknown", {}),
        (b"MZ\x90\x00", "runnable", {"platform": "dos"}),
    ],
)
def test_classify(head: bytes, kind: str, extra: dict[str, str]) -> None:
    headers, _ = classify(head)
    assert headers["kind"] == kind
    assert extra.items() <= headers.items()


def test_extract_strings() -> None:
    data = b"\x00abc\x00GetProcAddress\x01\x02hello world\xffshort\x00"
    assert extract_strings(data) == ["GetProcAddress", "hello world"]
    assert extract_strings(data, min_length=3) == ["abc", "GetProcAddress", "hello world", "short"]
