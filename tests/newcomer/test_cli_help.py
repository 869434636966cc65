"""One CLI (issue 14 item 3): every command is typer, with ``-h`` as well as ``--help``.

Each command's help exits 0, is the same plain style, names every flag the command
takes, and shows switches as switches (no ``<bool>``).  ``system`` keeps karton-system's
flags and exit codes (2: a bad argument, 1: a bad configuration); ``run MODULE:CLASS
--help`` lists the service's own flags too.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
import typer
from typer.testing import CliRunner

from asynckarton import SystemService, __version__
from asynckarton.cli import _app
from asynckarton.cli._app import app
from asynckarton.cli._tasks import CONFIG_FILE_HELP

REPO = Path(__file__).resolve().parents[2]
COMMANDS = [
    ["run"], ["system"], ["demo"], ["version"], ["config"], ["tasks"], ["tasks", "list"],
    ["tasks", "restart"], ["tasks", "cancel"], ["list"], ["status"], ["delete"], ["check"],
    ["logs"],
]  # fmt: skip
KARTON_SYSTEM_FLAGS = (
    "--setup-bucket", "--disable-gc", "--disable-router", "--gc-interval",
    "--task-dispatched-timeout", "--task-started-timeout", "--task-crashed-timeout",
    "--config-file", "--identity", "--log-level", "--version", "--debug",
)  # fmt: skip
SERVICE = """
from asynckarton import Karton, Option, Task


class Smol(Karton):
    identity = "karton.smol"
    filters = [{"type": "smol-tasks"}]
    options = [Option("smol", "how_smol", int, default=10, help="size limit")]

    async def process(self, task: Task) -> None:
        pass
"""


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    for name in list(os.environ):
        if name.startswith("KARTON_"):
            monkeypatch.delenv(name)
    yield tmp_path


def invoke(*args: str) -> Any:
    return CliRunner().invoke(app, list(args), prog_name="asynckarton", terminal_width=200)


def command_of(words: Sequence[str]) -> Any:
    command: Any = typer.main.get_command(app)  # typer's own (vendored) click types
    for word in words:
        assert isinstance(command, typer.core.TyperGroup)
        found = command.get_command(typer.Context(command), word)
        assert found is not None, word
        command = found
    return command


@pytest.mark.parametrize("words", COMMANDS, ids=" ".join)
@pytest.mark.parametrize("help_flag", ["-h", "--help"])
def test_help_of_every_command_names_its_flags(words: list[str], help_flag: str) -> None:
    result = invoke(*words, help_flag)
    assert result.exit_code == 0, result.output
    assert result.output.startswith(f"Usage: asynckarton {' '.join(words)}"), result.output
    assert "-h, --help" in result.output
    assert "<bool>" not in result.output  # switches are shown as switches
    for param in command_of(words).params:
        if isinstance(param, typer.core.TyperOption):
            for name in (*param.opts, *param.secondary_opts):
                assert name in result.output, name


def test_system_has_karton_systems_flags() -> None:
    result = invoke("system", "-h")
    for flag in KARTON_SYSTEM_FLAGS:
        assert flag in result.output, flag


def test_system_version_is_the_version_command(home: Path) -> None:
    assert invoke("system", "--version").output == invoke("version").output
    assert __version__ in invoke("version").output


def test_system_bad_argument_exits_2_and_bad_config_exits_1(home: Path) -> None:
    assert invoke("system", "--gc-interval", "soon").exit_code == 2
    assert invoke("system", "--no-such-flag").exit_code == 2
    result = invoke("system", "--set", "system.gc_interval=abc")
    assert result.exit_code == 1, result.output
    assert "gc_interval" in result.output


def test_system_flags_reach_the_service_config(home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    served: list[Any] = []
    monkeypatch.setattr(_app, "serve_forever", lambda services, **_: served.extend(services))
    result = invoke("system", "--disable-gc", "--gc-interval", "7", "--log-level", "ERROR")
    assert result.exit_code == 0, result.output
    [service] = served
    assert isinstance(service, SystemService)
    config = service.config
    assert config.getboolean("system", "enable_gc") is False
    assert config.source("system", "enable_gc") == "argument --disable-gc"
    assert float(config.get("system", "gc_interval")) == 7.0
    assert config.get("logging", "level") == "ERROR"


def test_run_help_lists_the_services_own_flags(home: Path) -> None:
    (home / "smol.py").write_text(SERVICE)
    result = invoke("run", "smol.py:Smol", "--help")
    assert result.exit_code == 0, result.output
    assert "Flags of smol.py:Smol" in result.output
    assert "--smol-how-smol" in result.output and "size limit" in result.output
    karton_style = f"{REPO / 'examples' / 'smol_karton.py'}:SmolKarton"
    result = invoke("run", karton_style, "-h")
    assert "--how-smol" in result.output and "Sets size limit for tasks" in result.output
    plain = invoke("run", "--help")
    assert "Flags of" not in plain.output


@pytest.mark.parametrize("words", [w for w in COMMANDS if w != ["tasks"]], ids=" ".join)
def test_config_file_is_described_one_way(words: list[str]) -> None:
    options = [p for p in command_of(words).params if "--config-file" in getattr(p, "opts", ())]
    for option in options:  # every command that reads a config file says the same
        assert option.opts == ["--config-file", "--config-path"]
        assert option.help == CONFIG_FILE_HELP
