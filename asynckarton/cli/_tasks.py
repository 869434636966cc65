"""``asynckarton tasks``: list, restart and cancel Crashed tasks from the command line.

The logic lives in :mod:`asynckarton.system._admin`; this is only its typer front end (part of
the CLI edge, registered by :mod:`asynckarton.cli._app`).
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from typing import Annotated, Any, TypeVar

import anyio
import typer

from .._errors import ConfigError
from .._services._run import startup_errors
from .._services._runtime import open_backend
from .._settings._config import Config
from ..backend import KartonBackend
from ..system import _admin

__all__ = ["CONFIG_FILE_HELP", "server_config", "tasks_app", "with_backend"]

T = TypeVar("T")

tasks_app = typer.Typer(
    help="List, restart or cancel Crashed tasks.", no_args_is_help=True, rich_markup_mode=None
)

#: ``--config-file``'s help, the same on every command (and as Karton's argparse flag says).
CONFIG_FILE_HELP = "ini file read after all the others (it must exist)."

ConfigFile = Annotated[
    str | None, typer.Option("--config-file", "--config-path", help=CONFIG_FILE_HELP)
]


def server_config(config_file: str | None) -> Config:
    """The configuration, refused when it names no Redis server (the embedded mode)."""
    config = Config(config_file)
    if config.embedded:
        raise ConfigError(
            "this command needs a Redis server: embedded data lives inside the process "
            "that runs the services",
            section="redis",
        )
    return config


def with_backend(config_file: str | None, action: Callable[[KartonBackend], Awaitable[T]]) -> T:
    """Run ``await action(backend)`` against the configured Redis (no storage client)."""
    config = server_config(config_file)

    async def go() -> T:
        async with open_backend(config) as backend:
            return await action(backend)

    return anyio.run(go)


@tasks_app.command("list")
def tasks_list(
    config_file: ConfigFile = None,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object per line.")] = False,
) -> None:
    """List Crashed tasks: uid, receiver and the last line of their error."""
    with startup_errors():
        tasks = with_backend(config_file, _admin.list_crashed)
    for task in tasks:
        error = _admin.last_error_line(task)
        if as_json:
            row = {"uid": task.uid, "receiver": task.receiver, "error": error}
            typer.echo(json.dumps(row))
        else:
            typer.echo(f"{task.uid}  {task.receiver or '-'}  {error}")
    if not as_json:
        typer.echo(f"{len(tasks)} crashed task(s)", err=True)


Uids = Annotated[list[str] | None, typer.Option("--uid", help="A task uid (repeatable).")]
Identity = Annotated[str | None, typer.Option(help="Every Crashed task of this receiver.")]
All = Annotated[bool, typer.Option("--all", help="Every Crashed task.")]


def _act(
    action: Callable[..., Any], verb: str, uid: list[str] | None, identity: str | None,
    everything: bool, config_file: str | None,
) -> None:  # fmt: skip
    if sum([bool(uid), identity is not None, everything]) != 1:
        raise typer.BadParameter("choose exactly one of --uid, --identity and --all")

    async def call(backend: KartonBackend) -> list[str]:
        done: list[str] = await action(backend, uids=uid, identity=identity, all=everything)
        return done

    with startup_errors():
        done = with_backend(config_file, call)
    for new in done:
        typer.echo(new)
    typer.echo(f"{verb} {len(done)} task(s)", err=True)


@tasks_app.command("restart")
def tasks_restart(
    uid: Uids = None, identity: Identity = None, all_: All = False, config_file: ConfigFile = None
) -> None:
    """Restart Crashed tasks as karton-dashboard does; prints the new uids."""
    _act(_admin.restart_crashed, "restarted", uid, identity, all_, config_file)


@tasks_app.command("cancel")
def tasks_cancel(
    uid: Uids = None, identity: Identity = None, all_: All = False, config_file: ConfigFile = None
) -> None:
    """Mark Crashed tasks Finished (karton-dashboard's cancel); prints their uids."""
    _act(_admin.cancel_crashed, "cancelled", uid, identity, all_, config_file)
