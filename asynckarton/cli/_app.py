"""The ``asynckarton`` command line (typer).

One CLI: every command is typer, ``-h`` and ``--help`` everywhere, switches shown as
switches.  The flags of ``run`` and ``system`` are generated from the declarations in
``_settings/_builtin.py`` (``system`` has karton-system's flags; a bad argument exits 2
and a bad configuration 1, as karton-system does); ``run MODULE:CLASS --help`` also lists
the flags the service itself adds.  Serving, signals and logging set-up live one layer
below, in ``_services/_run.py``, which ``Service.main()`` uses too.
"""

from __future__ import annotations

import argparse
import inspect
import logging
import tempfile
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Annotated, Any

import anyio
import typer
from typer.core import TyperCommand

from .._errors import ConfigError
from .._services._embedded import find_served
from .._services._run import (
    configure_logging,
    event_loop_options,
    serve_forever,
    startup_errors,
    tune_gc,
)
from .._services._runtime import DEFAULT_BUCKET, Runtime, setting_origin
from .._settings._builtin import BASE_FLAGS, BUILTIN, CONSUMER_FLAGS, SYSTEM_FLAGS
from .._settings._check import check_config
from .._settings._config import Config
from .._settings._declare import Option
from .._settings._explain import describe
from .._settings._flags import apply_sets, flag_help
from .._settings._policy import resolve_policy
from .._version import __version__
from ..backend import KARTON_PROTOCOL_VERSION
from ..system import SystemService
from . import _ops
from ._loader import CommonOptions, build_services, load_service_class, split_targets
from ._tasks import CONFIG_FILE_HELP, tasks_app

__all__ = ["app", "main"]

log = logging.getLogger("asynckarton.cli")


# -- the typer application ---------------------------------------------------------------

HELP_OPTIONS = ["-h", "--help"]

app = typer.Typer(
    name="asynckarton",
    help="asyncio-native Karton: run services, karton-system, a demo, and task admin.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": HELP_OPTIONS},  # subcommands inherit it
    rich_markup_mode=None,  # plain help, one style: switches shown without a type
)
app.add_typer(tasks_app, name="tasks")
for _name, _command in _ops.COMMANDS.items():  # list, status, delete, check, logs
    app.command(_name)(_command)

ConfigFile = Annotated[
    str | None,
    typer.Option("--config-file", "--config-path", help=CONFIG_FILE_HELP),
]
Settings = Annotated[
    list[str] | None,
    typer.Option(
        "--set",
        metavar="[IDENTITY:]SECTION.OPTION=VALUE",
        help="Set any option (repeatable); IDENTITY: limits a [karton] option to one service.",
    ),
]
LogLevel = Annotated[str | None, typer.Option("--log-level", help="DEBUG, INFO, WARNING...")]

#: The ``[redis]`` options that make up its address (named by ``config --check``).
REDIS_KEYS = ("url", "host", "port", "db")

#: ``asynckarton run``'s flags of their own: Karton's base and consumer flags, ``--embedded``.
RUN_FLAGS = (*BASE_FLAGS, *CONSUMER_FLAGS, BUILTIN["asynckarton"]["embedded"])


def _typer_parameter(option: Option) -> inspect.Parameter:
    """A typer option derived from the declaration (a bool with a fixed value: a switch)."""
    text = flag_help(option).replace("%%", "%")
    if option.type is bool and option.flag_value is not None:
        kind: Any = bool
        default: Any = False
    elif option.type is bool:
        kind, default = bool | None, None
        text += " [--no-... to turn it off]"
    else:
        kind, default = option.type | None, None
    names = (
        [option.cli_flag]
        if option.flag_value is not None or option.type is not bool
        else [f"{option.cli_flag}/--no-{option.cli_flag[2:]}"]
    )
    annotation = Annotated[kind, typer.Option(*names, help=text, show_default=False)]
    return inspect.Parameter(
        option.dest, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=annotation
    )


def _given(values: dict[str, Any], declared: Sequence[Option] = RUN_FLAGS) -> dict[str, Any]:
    """``{"section.name": value}`` of the declared flags that were given."""
    given: dict[str, Any] = {}
    for option in declared:
        value = values.get(option.dest)
        if option.type is bool and option.flag_value is not None:
            value = option.flag_value if value else None
        if value is not None:
            given[option.key] = value
    return given


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
    settings: Settings = None,
    with_system: Annotated[
        bool, typer.Option("--with-system", help="Also run karton-system's router and GC.")
    ] = False,
    **flags: Any,
) -> None:
    """Run one or more services in one process, one event loop and one runtime.

    Per-service policies: '--set <identity>:karton.concurrency_limit=4', an ini section
    [karton:<identity>], or KARTON_KARTON__<IDENTITY>__<OPTION> (see the README).
    """
    names, extras = split_targets([*targets, *ctx.args])
    if not names:
        raise typer.BadParameter("give at least one MODULE:CLASS", param_hint="TARGETS")
    values = _given(flags)
    common = CommonOptions(
        config_file=config_file,
        values={k: v for k, v in values.items() if k != "asynckarton.embedded"},
        sets=tuple(settings or ()),
        embedded="asynckarton.embedded" in values,
    )
    log_level = values.get("logging.level")
    with startup_errors(log_level):
        classes = [load_service_class(name) for name in names]
        # On the embedded default without --with-system, a service connects to the Redis
        # an 'asynckarton system' process serves, or warns that it has none (_embedded).
        services = build_services(classes, extras, common, with_system=with_system)
    grace = values.get("karton.shutdown_grace")
    serve_forever(services, log_level=log_level, grace=grace)


def _add_flags(command: Any, declared: Sequence[Option]) -> None:
    """Give ``command`` (with ``**flags``) one typer option per declared flag."""
    signature = inspect.signature(command, eval_str=True)
    command.__signature__ = signature.replace(
        parameters=[
            *[p for p in signature.parameters.values() if p.kind is not p.VAR_KEYWORD],
            *[_typer_parameter(option) for option in declared],
        ]
    )


class _RunCommand(TyperCommand):
    """``run``, whose help also lists the flags of the services named before ``--help``.

    (typer vendors its own click, whose context and formatter types are private: Any.)
    """

    def parse_args(self, ctx: Any, args: list[str]) -> list[str]:
        ctx.meta["asynckarton.words"] = list(args)  # --help is handled while parsing
        return super().parse_args(ctx, args)

    def format_help(self, ctx: Any, formatter: Any) -> None:
        super().format_help(ctx, formatter)
        for text in _service_flags_help(ctx.meta.get("asynckarton.words", [])):
            formatter.write(text + "\n")


def _service_flags_help(words: Sequence[str]) -> list[str]:
    """The help of the flags each named service adds to ``run``'s own (one block each)."""
    known = {
        "--help",
        "-h",
        "--version",
        "--set",
        "--with-system",
        "--config-file",
        "--config-path",
    }
    known.update(option.cli_flag for option in RUN_FLAGS)
    known.update(f"--no-{option.cli_flag[2:]}" for option in RUN_FLAGS)
    targets = [w for w, before in zip(words, ["", *words], strict=False)
               if ":" in w and not w.startswith("-") and before != "--set"]  # fmt: skip
    blocks: list[str] = []
    for target in targets:
        try:
            parser = load_service_class(target).args_parser()
        except Exception as exc:  # noqa: BLE001 - help goes on; the error is shown
            blocks.append(f"\n{target}: cannot list its flags: {exc}")
            continue
        rows = [
            (", ".join(action.option_strings) + (f" {action.metavar or action.dest.upper()}"
             if action.nargs != 0 else ""), action.help or "")
            for action in parser._actions  # argparse has no public listing
            if action.option_strings and not known.intersection(action.option_strings)
            and action.help != argparse.SUPPRESS
        ]  # fmt: skip
        if not rows:
            blocks.append(f"\n{target} adds no flags of its own.")
            continue
        width = max(len(flag) for flag, _ in rows) + 2
        lines = [f"  {flag:<{width}}{text}" for flag, text in rows]
        blocks.append(f"\nFlags of {target} (its own; give them after the targets):\n"
                      + "\n".join(lines))  # fmt: skip
    return blocks


_add_flags(run, RUN_FLAGS)
app.command(
    cls=_RunCommand,
    context_settings={"allow_extra_args": True, "ignore_unknown_options": True},
)(run)

#: ``asynckarton system``'s flags of their own: karton-system's, exactly, plus ours.
SYSTEM_COMMAND_FLAGS = (*BASE_FLAGS, *SYSTEM_FLAGS)


def _version_line() -> str:
    return f"asynckarton {__version__} (Karton protocol {KARTON_PROTOCOL_VERSION})"


def _print_version(value: bool) -> None:
    if value:
        typer.echo(_version_line())
        raise typer.Exit


def system(
    config_file: ConfigFile = None,
    settings: Settings = None,
    version: Annotated[
        bool,
        typer.Option(
            "--version", callback=_print_version, is_eager=True, help="Print the version and exit."
        ),
    ] = False,
    **flags: Any,
) -> None:
    """Run karton-system: the router and the garbage collector (karton-system's flags).

    A bad argument exits with status 2, a bad configuration with status 1.
    """
    values = _given(flags, SYSTEM_COMMAND_FLAGS)
    common = CommonOptions(config_file=config_file, values=values, sets=tuple(settings or ()))
    log_level = values.get("logging.level")
    with startup_errors(log_level):
        services = build_services([SystemService], [], common)
    serve_forever(services, log_level=log_level)


_add_flags(system, SYSTEM_COMMAND_FLAGS)
app.command()(system)


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
        config = demo_module.demo_config(where, log_level)
        kept = (
            f"data in {where}" if data_dir else "data in a temporary folder (--data-dir keeps it)"
        )
        typer.echo(f"asynckarton demo: {len(paths)} file(s), embedded mode, {kept}\n")
        with startup_errors(log_level):
            tune_gc(config)
            result = anyio.run(
                demo_module.run_demo, paths, config, timeout,
                backend_options=event_loop_options(config),
            )  # fmt: skip
    typer.echo(demo_module.format_report(result))
    if not result.complete:
        typer.echo(
            f"asynckarton: error: not every file was reported within {timeout:g} s", err=True
        )
        raise typer.Exit(1)


@app.command()
def version() -> None:
    """Print the asynckarton version and the Karton protocol it speaks."""
    typer.echo(_version_line())


@app.command("config")
def show_config(
    target: Annotated[
        str | None,
        typer.Argument(
            help="A service class ('module:Class'): show its options and policy.",
            metavar="[MODULE:CLASS]",
        ),
    ] = None,
    config_file: ConfigFile = None,
    identity: Annotated[
        str | None, typer.Option(help="Show the [karton] values this identity sees.")
    ] = None,
    settings: Settings = None,
    check: Annotated[
        bool,
        typer.Option(
            "--check", help="Also connect: Redis PING and S3 bucket HEAD, each with its source."
        ),
    ] = False,
) -> None:
    """Print every setting of a service with its value and source, then validate it.

    Without a target: the built-in settings of a plain consumer (named by --identity).
    Secrets are masked; an invalid value exits with status 1, and so does a connection
    that --check could not make.
    """
    with startup_errors():
        config = Config(config_file)
        apply_sets(config, settings)
        if target is not None:
            cls = load_service_class(target)
            if identity is not None:
                config.set("karton", "identity", identity, source="argument --identity")
            service = cls(config)
            name: str | None = service.config_identity
            options = list(cls.options)
            where = (config.source("karton", "identity") if config.entry("karton", "identity")
                     else f"class {cls.__module__}.{cls.__qualname__}")  # fmt: skip
        else:
            name, options = identity, []
            where = "argument --identity" if identity else "default"
        policy = (
            getattr(service, "policy", None) if target else resolve_policy(config, object, name)
        )
        warnings = check_config(config, options)  # unknown built-in options fail first
        present = [(section, option) for section, option, _, _ in config.entries()]
        rows = describe(config, identity=name, identity_source=where, policy=policy,
                        options=options, present=present)  # fmt: skip
        for row in rows:
            typer.echo(str(row))
        for warning in warnings:
            typer.echo(f"# warning: {warning}")
        config.karton_settings(name)
        config.logging_settings()
        config.system_settings()
        if config.embedded:
            typer.echo(f"# mode: embedded (data in {config.data_dir})")
        else:
            config.redis_settings()
            config.s3_settings()
            typer.echo("# mode: Redis + S3")
    if check and not config.embedded:
        results = anyio.run(_check_connections, config)
        for line in results:
            typer.echo(line)
        if any(" FAILED" in line for line in results):
            raise typer.Exit(1)
    elif check:
        served = find_served(config.data_dir)  # a file read and a loopback connect: quick
        typer.echo(
            f"# check: embedded mode: a system service serves {config.data_dir} at {served}"
            if served
            else f"# check: embedded mode: no system service serves {config.data_dir}: "
            "start 'asynckarton system' for services and producers in other processes to meet"
        )


#: Seconds each connection check of ``asynckarton config --check`` may take.
CHECK_TIMEOUT = 10.0


async def _check_connections(config: Config) -> list[str]:
    """Try Redis (PING) and the S3 bucket (HEAD); one line each, naming address and source."""
    runtime = Runtime.from_config(config)
    redis_at = f"Redis {runtime.connector.address} ({setting_origin(config, 'redis', REDIS_KEYS)})"
    s3 = config.s3_settings()
    bucket = str(s3.bucket or DEFAULT_BUCKET)
    s3_at = (
        f"S3 bucket {bucket!r} at {s3.address or 'AWS'} "
        f"({setting_origin(config, 's3', ('address', 'bucket'))})"
    )
    lines: list[str] = []

    async def attempt(what: str, probe: Callable[[], Awaitable[str | None]]) -> None:
        try:
            with anyio.fail_after(CHECK_TIMEOUT):
                problem = await probe()
        except TimeoutError:
            problem = f"no answer within {CHECK_TIMEOUT:g} s"
        except Exception as exc:  # noqa: BLE001 - reported, then exit status 1
            problem = f"{type(exc).__name__}: {exc}"
        lines.append(f"# check: {what}: " + (f"FAILED: {problem}" if problem else "ok"))

    async def ping() -> None:
        await runtime.backend.ping()

    async def head() -> str | None:
        found = await runtime.storage.ensure_bucket(bucket, create=False)
        return None if found else "the bucket does not exist (see 'system --setup-bucket')"

    async with runtime:
        await attempt(redis_at, ping)
        await attempt(s3_at, head)
    return lines


def main(argv: Sequence[str] | None = None) -> None:
    """Console-script entry point (``asynckarton``)."""
    app(args=list(argv) if argv is not None else None, prog_name="asynckarton")
