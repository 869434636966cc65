"""The operator's commands: ``list``, ``status``, ``delete``, ``check`` and ``logs``.

Parity with Karton's ``karton list|logs|delete``, plus the status and health views
karton-dashboard and container orchestrators need.  Each command is a thin front end over
the async inspection API (:mod:`asynckarton._services._inspect`), the health checks
(:mod:`asynckarton._services._health`) and :class:`~asynckarton._services._log_consumer.LogConsumer`;
none reads every task unless asked to (``status --scan``).  Tables are drawn with rich
(colour only on a terminal); ``--json`` prints machine-readable output instead.
"""

from __future__ import annotations

import json
import sys
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Annotated, Any, TypeVar

import anyio
import typer

from .._services._health import run_checks
from .._services._inspect import DeploymentState, TaskCounts, count_tasks, delete_bind
from .._services._log_consumer import LEVELS, LogPrinter
from .._services._run import startup_errors
from .._services._runtime import Runtime
from ..backend import KartonBackend
from ._tasks import CONFIG_FILE_HELP, server_config, with_backend

if TYPE_CHECKING:  # rich is imported by the commands that draw tables, not at start-up
    from rich.console import Console
    from rich.table import Table

__all__ = ["COMMANDS", "check", "delete", "list_binds", "logs", "status"]

T = TypeVar("T")

ConfigFile = Annotated[
    str | None, typer.Option("--config-file", "--config-path", help=CONFIG_FILE_HELP)
]
AsJson = Annotated[bool, typer.Option("--json", help="Machine-readable JSON output.")]


def _with_runtime(config_file: str | None, action: Callable[[Runtime], Awaitable[T]]) -> T:
    """Run ``await action(runtime)`` against the configured Redis and storage."""
    config = server_config(config_file)

    async def go() -> T:
        async with Runtime.from_config(config) as runtime:
            return await action(runtime)

    return anyio.run(go)


def _console() -> Console:
    from rich.console import Console

    return Console(highlight=False, soft_wrap=False)


def _table(title: str, *, show_header: bool = True) -> Table:
    from rich.table import Table

    return Table(title=title, show_header=show_header)


def _ago(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f}s ago"
    if seconds < 7200:
        return f"{seconds / 60:.0f}m ago"
    return f"{seconds / 3600:.1f}h ago"


# -- list ---------------------------------------------------------------------------------


def list_binds(config_file: ConfigFile = None, as_json: AsJson = False) -> None:
    """List binds: identity, versions, replicas online, persistence (karton list)."""
    with startup_errors():
        state = with_backend(config_file, DeploymentState.load)
    if as_json:
        for bind in state.binds.values():
            typer.echo(json.dumps({
                "identity": bind.identity, "version": bind.version,
                "service_version": bind.service_version, "replicas": bind.replicas,
                "persistent": bind.persistent, "is_async": bind.is_async,
                "filters": bind.filters, "info": bind.info,
            }))  # fmt: skip
        return
    table = _table(f"{len(state.binds)} bind(s)")
    for column in ("identity", "service version", "karton", "replicas", "persistent", "async"):
        table.add_column(column, justify="right" if column == "replicas" else "left")
    for bind in state.binds.values():
        replicas = f"[green]{bind.replicas}[/]" if bind.replicas else "[red]0[/]"
        table.add_row(
            bind.identity, bind.service_version or "-", bind.version, replicas,
            "yes" if bind.persistent else "no", "yes" if bind.is_async else "no",
        )  # fmt: skip
    _console().print(table)


# -- status -------------------------------------------------------------------------------


def status(
    config_file: ConfigFile = None,
    as_json: AsJson = False,
    scan: Annotated[
        bool,
        typer.Option(
            "--scan",
            help="Count tasks by status afresh: reads EVERY task once, O(all tasks), like "
            "a GC pass. Without it, status shows the last GC pass's count and its age.",
        ),
    ] = False,
) -> None:
    """Queues, leases, dead letters and replicas per identity; router, GC and Redis."""

    async def load(backend: KartonBackend) -> tuple[DeploymentState, TaskCounts | None]:
        state = await DeploymentState.load(backend)
        return state, (await count_tasks(backend) if scan else None)

    with startup_errors():
        state, counts = with_backend(config_file, load)
    scanned = counts is not None
    counts = counts if counts is not None else state.tasks  # else: the GC's last count
    by_identity = counts.by_identity() if counts is not None else None
    if as_json:
        doc = state.to_json()
        if scanned and counts is not None and by_identity is not None:
            doc["tasks"] = {ident: dict(c) for ident, c in by_identity.items()}
            doc["tasks_scan_seconds"] = counts.duration
        typer.echo(json.dumps(doc, default=str))
        return
    console = _console()
    table = _table("queues")
    columns = ["identity", "replicas", "high", "normal", "low", "leased", "pending", "dead"]
    if by_identity is not None:
        columns += ["Spawned", "Started", "Crashed"]
    for column in columns:
        table.add_column(column, justify="left" if column == "identity" else "right")
    for identity, queue in state.queues.items():
        replicas = state.binds[identity].replicas
        row = [
            identity,
            f"[green]{replicas}[/]" if replicas else "[red]0[/]",
            *(str(queue.queued.get(p, 0)) for p in ("high", "normal", "low")),
            str(queue.leased),
            str(queue.pending),
            f"[red]{queue.dead}[/]" if queue.dead else "0",
        ]
        if by_identity is not None:
            found = by_identity.get(identity, Counter())
            row += [str(found.get(s, 0)) for s in ("Spawned", "Started", "Crashed")]
        table.add_row(*row)
    console.print(table)
    console.print(_system_table(state, counts, scanned=scanned))


def _system_table(state: DeploymentState, counts: TaskCounts | None, *, scanned: bool) -> Table:
    table = _table("system", show_header=False)
    table.add_column("what")
    table.add_column("value")
    alive = state.routers_alive
    routers = f"[green]{alive} alive[/]" if alive else "[red]none alive[/]"
    if state.routers:
        newest = max(r.expires_at for r in state.routers)
        routers += f" (heartbeat valid {max(0.0, newest - time.time()):.0f}s more)" if alive else ""
    table.add_row("routers", routers)
    table.add_row("karton.system connections", str(state.system_replicas))
    if state.gc is None:
        table.add_row("last GC pass", "none recorded yet (karton-system's GC records none)")
    else:
        gc = state.gc
        table.add_row(
            "last GC pass",
            f"{_ago(gc.age)}, {gc.duration:.2f}s, {gc.deleted_tasks} task(s) and "
            f"{gc.deleted_objects} object(s) deleted",
        )
    table.add_row("unrouted (waiting for the router)", str(state.unrouted))
    table.add_row("retries scheduled", str(state.retries_scheduled))
    for name, value in sorted(state.stats.items()):
        table.add_row(f"stats: {name}", str(value))
    if state.redis is not None:
        memory = state.redis.used_memory_human or str(state.redis.used_memory)
        limit = f" of {state.redis.maxmemory} bytes" if state.redis.maxmemory else ""
        table.add_row("Redis memory", memory + limit)
    if counts is not None:
        total = sum(counts.counts.values())
        table.add_row(
            "task counts",
            f"{total} task(s) read in {counts.duration:.2f}s"
            + ("" if scanned else f" by the GC pass {_ago(counts.age)} (--scan: count now)"),
        )
    else:
        table.add_row("task counts", "none yet (no asynckarton GC pass; --scan counts now)")
    return table


# -- delete -------------------------------------------------------------------------------


def delete(
    identity: Annotated[str, typer.Argument(help="The bind to unregister.")],
    force: Annotated[
        bool, typer.Option("--force", help="Even with replicas online (they shut down).")
    ] = False,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask to confirm.")] = False,
    config_file: ConfigFile = None,
    as_json: AsJson = False,
) -> None:
    """Unregister a bind; the next GC pass removes it with its queues and tasks."""
    if not yes:
        typed = typer.prompt(f"Retype {identity!r} to delete its bind")
        if typed != identity:
            typer.echo("asynckarton: error: the names differ; nothing deleted", err=True)
            raise typer.Exit(1)

    async def go(backend: KartonBackend) -> Any:
        return await delete_bind(backend, identity, force=force)

    with startup_errors():
        old = with_backend(config_file, go)
    if as_json:
        typer.echo(
            json.dumps({"identity": identity, "deleted": True, "persistent": old.persistent})
        )
    else:
        typer.echo(f"Bind {identity} unregistered; the next GC pass removes its queues and tasks.")


# -- check --------------------------------------------------------------------------------


def check(
    identity: Annotated[
        list[str] | None, typer.Option("--identity", help="Require live replicas (repeatable).")
    ] = None,
    no_router: Annotated[
        bool, typer.Option("--no-router", help="Do not require a live router.")
    ] = False,
    timeout: Annotated[float, typer.Option(help="Seconds each check may take.")] = 5.0,
    config_file: ConfigFile = None,
    as_json: AsJson = False,
) -> None:
    """Health check: Redis, bucket, a live router (and replicas); exit status 0 or 1."""

    async def go(runtime: Runtime) -> Any:
        return await run_checks(
            runtime.backend, runtime.storage, runtime.bucket,
            identities=identity or (), router=not no_router, timeout=timeout,
        )  # fmt: skip

    with startup_errors():
        checks = _with_runtime(config_file, go)
    ok = all(c.ok for c in checks)
    if as_json:
        doc = {"ok": ok, "checks": [{"name": c.name, "ok": c.ok, "detail": c.detail}
                                    for c in checks]}  # fmt: skip
        typer.echo(json.dumps(doc))
    else:
        console = _console()
        for c in checks:
            mark = "[green]ok  [/]" if c.ok else "[red]FAIL[/]"
            console.print(f"{mark} {c.name}: {c.detail}")
    if not ok:
        raise typer.Exit(1)


# -- logs ---------------------------------------------------------------------------------


def logs(
    identity: Annotated[
        list[str] | None,
        typer.Option("--identity", help="Only this identity (glob allowed; repeatable)."),
    ] = None,
    level: Annotated[str, typer.Option(help=f"Lowest level shown: {', '.join(LEVELS)}.")] = "DEBUG",
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object per line.")] = False,
    config_file: ConfigFile = None,
) -> None:
    """Tail every service's log records (Karton's log channels) until interrupted."""
    with startup_errors():
        config = server_config(config_file)
        printer = LogPrinter(
            config, identities=identity or (), level=level, as_json=as_json,
            colour=sys.stdout.isatty(),
        )  # fmt: skip
    try:
        with startup_errors():
            anyio.run(printer.run)
    except KeyboardInterrupt:
        raise typer.Exit(0) from None


#: The commands :mod:`asynckarton.cli._app` registers, by name.
COMMANDS: dict[str, Callable[..., Any]] = {
    "list": list_binds,
    "status": status,
    "delete": delete,
    "check": check,
    "logs": logs,
}
