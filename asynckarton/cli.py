"""The ``asynckarton`` command line, and the only place that owns signals and logging.

Library classes never install signal handlers or configure logging (style R15): this
module does both, for the ``asynckarton`` console script and for ``Service.main()``
(through :func:`serve_forever`).  Shutdown is two-stage, like Karton's graceful killer:
the first SIGINT/SIGTERM stops fetching and gives in-flight tasks the grace period to
finish; a second one hands whatever still runs back to its queue at once.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
import tempfile
import traceback
from collections.abc import Iterator, Sequence
from contextlib import AsyncExitStack, contextmanager
from pathlib import Path
from typing import Annotated, Any, Protocol, cast

import anyio
import typer
from anyio.abc import TaskStatus

from ._cli_tasks import tasks_app
from ._config import Config
from ._errors import ConfigError, KartonError
from ._loader import CommonOptions, build_services, load_service_class, split_targets
from ._service import ServiceBase
from ._version import __version__
from .backend import KARTON_PROTOCOL_VERSION
from .system import SystemService

__all__ = ["app", "main", "serve_forever", "startup_errors"]

LOG_FORMAT = "[%(asctime)s][%(levelname)s] %(message)s"  # karton-core's format
log = logging.getLogger("asynckarton.cli")


class _Runnable(Protocol):
    async def run(self, *, task_status: TaskStatus[None] = ...) -> None: ...
    def stop(self, *, grace: float | None = None) -> None: ...


# -- logging and errors ------------------------------------------------------------------


def configure_logging(level: str | None) -> str:
    """Set up the root logger in Karton's format; return the level name used.

    Raises:
        ConfigError: ``level`` is not a logging level name.
    """
    name = (level or "INFO").strip().upper()
    if name not in logging.getLevelNamesMapping():
        raise ConfigError("unknown log level", option="--log-level", value=level)
    logging.basicConfig(format=LOG_FORMAT, level=name)
    logging.getLogger().setLevel(name)
    return name


def _leaves(exc: BaseException) -> Iterator[BaseException]:
    if isinstance(exc, BaseExceptionGroup):
        for inner in exc.exceptions:
            yield from _leaves(inner)
    else:
        yield exc


def describe_error(exc: BaseException) -> str:
    """One line for a failure: our errors speak for themselves, others get their type."""
    leaves = [e for e in _leaves(exc) if not isinstance(e, asyncio.CancelledError)]
    first = leaves[0] if leaves else exc
    text = str(first) if isinstance(first, KartonError) else f"{type(first).__name__}: {first}"
    return " ".join(text.split())


@contextmanager
def startup_errors(log_level: str | None = None) -> Iterator[None]:
    """Turn any exception into a one-line error on stderr and exit code 1.

    The traceback is printed too when ``log_level`` is DEBUG.
    """
    try:
        yield
    except Exception as exc:  # noqa: BLE001 - the program's edge: any failure is one line
        if str(log_level or "").upper() == "DEBUG":
            traceback.print_exception(exc)
        print(f"asynckarton: error: {describe_error(exc)}", file=sys.stderr)
        raise SystemExit(1) from None


# -- serving -----------------------------------------------------------------------------


class _Supervisor:
    """Runs services in one task group and turns signals into ``stop()`` calls."""

    def __init__(self, services: Sequence[ServiceBase], grace: float | None) -> None:
        for service in services:
            if not all(callable(getattr(service, name, None)) for name in ("run", "stop")):
                raise TypeError(f"{type(service).__name__} has no run()/stop(): cannot serve it")
        self.services = services
        self.runnables = [cast(_Runnable, service) for service in services]
        self.grace = grace
        self.started = False
        self.scope: anyio.CancelScope | None = None  # startup and run; made in the loop

    async def serve(self) -> None:
        with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async with anyio.create_task_group() as watcher:
                watcher.start_soon(self._watch, signals)
                with anyio.CancelScope() as self.scope:
                    async with AsyncExitStack() as stack:
                        for service in self.services:
                            await stack.enter_async_context(service)
                        async with anyio.create_task_group() as group:
                            for runnable in self.runnables:
                                await group.start(runnable.run)
                            self.started = True
                            names = ", ".join(s.identity for s in self.services)
                            log.info("Running %s; SIGINT/SIGTERM drains, twice stops now", names)
                watcher.cancel_scope.cancel()  # every service returned: stop listening

    async def _watch(self, signals: Any) -> None:
        received = 0
        async for signum in signals:
            received += 1
            name = signal.Signals(signum).name
            if not self.started or received > 2:
                log.warning("%s: cancelling everything", name)
                if self.scope is not None:
                    self.scope.cancel()
            elif received == 1:
                grace = "configured" if self.grace is None else f"{self.grace:g} s"
                log.warning("%s: draining (%s grace); send it again to stop now", name, grace)
                for runnable in self.runnables:
                    runnable.stop(grace=self.grace)
            else:
                log.warning("%s again: handing in-flight tasks back to their queues", name)
                for runnable in self.runnables:
                    runnable.stop(grace=0)


def serve_forever(
    services: Sequence[ServiceBase], *, log_level: str | None = None, grace: float | None = None
) -> None:
    """Run ``services`` in one event loop until they stop or SIGINT/SIGTERM stops them.

    The first signal stops fetching and gives in-flight tasks ``grace`` seconds (default:
    each service's ``[karton] shutdown_grace``); a second one hands them back at once.
    Returns normally (exit code 0) once every service returned; a failure, at startup
    or later, prints one line on stderr and exits with code 1.

    Args:
        services: Consumers, Kartons and SystemServices (not yet open).
        log_level: root log level (default: the first service's ``[logging] level``).
        grace: seconds in-flight tasks get after the first signal.
    """
    if not services:
        raise ValueError("serve_forever() needs at least one service")
    with startup_errors(log_level):
        level = log_level or services[0].config.logging_settings().level
        level = configure_logging(level)
    with startup_errors(level):
        anyio.run(_Supervisor(services, grace).serve)
    log.info("All services stopped")


# -- the typer application ---------------------------------------------------------------

app = typer.Typer(
    name="asynckarton",
    help="asyncio-native Karton: run services, karton-system, a demo, and task admin.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
app.add_typer(tasks_app, name="tasks")

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
    from . import demo as demo_module

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
        typer.echo(f"asynckarton: error: not every file was reported within {timeout:g} s",
                   err=True)
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
