"""The ``asynckarton`` command line (typer).

Serving, signals and logging set-up live one layer below, in ``_services/_run.py``, which
``Service.main()`` uses too.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated

import anyio
import typer

from .._errors import ConfigError
from .._services._run import configure_logging, serve_forever, startup_errors
from .._settings._config import Config
from .._version import __version__
from ..backend import KARTON_PROTOCOL_VERSION
from ..system import SystemService
from . import _ops
from ._loader import CommonOptions, build_services, load_service_class, split_targets
from ._tasks import tasks_app

__all__ = ["app", "main"]

log = logging.getLogger("asynckarton.cli")


# -- the typer application ---------------------------------------------------------------

app = typer.Typer(
    name="asynckarton",
    help="asyncio-native Karton: run services, karton-system, a demo, and task admin.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
app.add_typer(tasks_app, name="tasks")
for _name, _command in _ops.COMMANDS.items():  # list, status, delete, check, logs
    app.command(_name)(_command)

ConfigFile = Annotated[
    str | None, typer.Option("--config-file", help="ini file read after the default ones.")
]
LogLevel = Annotated[str | None, typer.Option("--log-level", help="DEBUG, INFO, WARNING...")]


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def run(
    ctx: typer.Context,
    targets: Annotated[
        list[str],
        typer.Argument(
            help="Service classes, as 'package.module:Class' or 'path/file.py:Class', "
            "then any service arguments (e.g. after '--').",
            metavar="MODULE:CLASS",
        ),
    ],
    config_file: ConfigFile = None,
    identity: Annotated[str | None, typer.Option(help="Identity (one service only).")] = None,
    log_level: LogLevel = None,
    debug: Annotated[bool, typer.Option("--debug", help="Karton's development mode.")] = False,
    embedded: Annotated[
        bool, typer.Option("--embedded", help="In-process Redis and local storage.")
    ] = False,
    grace: Annotated[float | None, typer.Option(help="Seconds to drain on SIGTERM.")] = None,
    concurrency_limit: Annotated[int | None, typer.Option(help="Tasks at once.")] = None,
    task_timeout: Annotated[float | None, typer.Option(help="Seconds per task.")] = None,
    max_retries: Annotated[int | None, typer.Option(help="Retries after a failure.")] = None,
    with_system: Annotated[
        bool, typer.Option("--with-system", help="Also run karton-system's router and GC.")
    ] = False,
) -> None:
    """Run one or more services in one process, one event loop and one runtime."""
    names, extras = split_targets([*targets, *ctx.args])
    if not names:
        raise typer.BadParameter("give at least one MODULE:CLASS", param_hint="TARGETS")
    common = CommonOptions(
        config_file=config_file,
        identity=identity,
        log_level=log_level,
        debug=debug,
        shutdown_grace=grace,
        concurrency_limit=concurrency_limit,
        task_timeout=task_timeout,
        max_retries=max_retries,
        embedded=embedded,
    )
    with startup_errors(log_level):
        classes = [load_service_class(name) for name in names]
        services = build_services(classes, extras, common, with_system=with_system)
        alone = not any(isinstance(service, SystemService) for service in services)
        if alone and services[0].config.embedded:
            typer.echo("asynckarton: warning: embedded mode without --with-system: nothing "
                       "in this process routes tasks", err=True)  # fmt: skip
    serve_forever(services, log_level=log_level, grace=grace)


@app.command(
    context_settings={
        "allow_extra_args": True,
        "ignore_unknown_options": True,
        "help_option_names": [],
    },
    add_help_option=False,
)
def system(ctx: typer.Context) -> None:
    """Run karton-system (router + GC), with karton-system's flags; see 'system --help'."""
    parser = SystemService.args_parser()
    parser.prog = "asynckarton system"
    args = parser.parse_args(ctx.args)
    with startup_errors(args.log_level):
        service = SystemService.karton_from_args(args)
    serve_forever([service], log_level=args.log_level)


@app.command()
def demo(
    files: Annotated[
        list[Path] | None, typer.Argument(help="Files to analyse (default: shipped samples).")
    ] = None,
    timeout: Annotated[float, typer.Option(help="Seconds to wait for every report.")] = 30.0,
    data_dir: Annotated[
        Path | None, typer.Option(help="Keep embedded data here (default: a temp dir).")
    ] = None,
    log_level: Annotated[str, typer.Option(help="Service logs at this level.")] = "WARNING",
) -> None:
    """Run a small classifier -> strings -> reporter pipeline in one process."""
    from .. import demo as demo_module

    with startup_errors(log_level):
        configure_logging(log_level)
        paths = list(files or demo_module.sample_files())
        for path in paths:
            if not path.is_file():
                raise ConfigError(f"no such file: {str(path)!r}")
    with tempfile.TemporaryDirectory(prefix="asynckarton-demo-") as tmp:
        where = data_dir or Path(tmp)
        config = demo_module.demo_config(where)
        typer.echo(f"asynckarton demo: {len(paths)} file(s), embedded mode, data in {where}\n")
        with startup_errors(log_level):
            result = anyio.run(demo_module.run_demo, paths, config, timeout)
    typer.echo(demo_module.format_report(result))
    if not result.complete:
        typer.echo(
            f"asynckarton: error: not every file was reported within {timeout:g} s", err=True
        )
        raise typer.Exit(1)


@app.command()
def version() -> None:
    """Print the asynckarton version and the Karton protocol it speaks."""
    typer.echo(f"asynckarton {__version__} (Karton protocol {KARTON_PROTOCOL_VERSION})")


@app.command("config")
def show_config(config_file: ConfigFile = None) -> None:
    """Print every configuration value and where it came from, then validate it."""
    with startup_errors():
        config = Config(config_file)
        for line in config.explain():
            typer.echo(line)
        config.karton_settings()
        config.logging_settings()
        config.system_settings()
        if config.embedded:
            typer.echo(f"# mode: embedded (data in {config.data_dir})")
        else:
            config.redis_settings()
            config.s3_settings()
            typer.echo("# mode: Redis + S3")


def main(argv: Sequence[str] | None = None) -> None:
    """Console-script entry point (``asynckarton``)."""
    app(args=list(argv) if argv is not None else None, prog_name="asynckarton")
