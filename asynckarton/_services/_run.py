"""Running services as a program: the run loop, signal handling and logging set-up.

Library classes never install signal handlers or configure logging; this module does
both, and only for its two callers at the program's edge: the ``asynckarton`` console
script and ``Service.main()``.  Shutdown is two-stage, like Karton's graceful killer: the
first SIGINT/SIGTERM stops fetching and gives in-flight tasks the grace period to finish;
a second one hands whatever still runs back to its queue at once.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import signal
import sys
import traceback
from collections.abc import Iterator, Sequence
from contextlib import AsyncExitStack, contextmanager
from typing import Any, Protocol, runtime_checkable

import anyio
from anyio.abc import TaskStatus

from .._errors import ConfigError, KartonError
from .._settings._builtin import BUILTIN
from .._settings._config import Config
from ._logging import CONSOLE_FORMAT, ConsoleHandler
from ._runtime import share_runtimes

__all__ = [
    "Servable",
    "configure_logging",
    "describe_error",
    "event_loop_options",
    "flush_logs",
    "serve_forever",
    "startup_errors",
    "tune_gc",
]

LOG_FORMAT = CONSOLE_FORMAT  # karton-core's format
log = logging.getLogger("asynckarton.run")


@runtime_checkable
class Servable(Protocol):
    """What :func:`serve_forever` runs: a service (Consumer, Karton, SystemService)."""

    @property
    def identity(self) -> str: ...
    @property
    def config(self) -> Config: ...
    async def __aenter__(self) -> Any: ...
    async def __aexit__(self, *exc_info: object) -> bool | None: ...

    async def run(self, *, task_status: TaskStatus[None] = ...) -> None: ...
    def stop(self, *, grace: float | None = None) -> None: ...


# -- logging and errors ------------------------------------------------------------------


def configure_logging(level: str | None) -> str:
    """Set up the root logger in Karton's format; return the level name used.

    As ``logging.basicConfig``: when the root logger has no handler yet, it gets a
    :class:`~._logging.ConsoleHandler` on stderr (Karton's lines, written once per
    event-loop turn and at once from WARNING up; see :func:`flush_logs`).  A program
    that configured logging itself keeps its handlers; only the level is set.

    Raises:
        ConfigError: ``level`` is not a logging level name.
    """
    name = (level or "INFO").strip().upper()
    if name not in logging.getLevelNamesMapping():
        raise ConfigError("unknown log level", option="--log-level", value=level)
    root = logging.getLogger()
    if not root.handlers:
        root.addHandler(ConsoleHandler(sys.stderr))
    root.setLevel(name)
    return name


def flush_logs() -> None:
    """Write what the root logger's handlers hold (the console's lines of this turn)."""
    for handler in logging.getLogger().handlers:
        handler.flush()


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
        flush_logs()  # the lines logged before the failure come first
        if str(log_level or "").upper() == "DEBUG":
            traceback.print_exception(exc)
        print(f"asynckarton: error: {describe_error(exc)}", file=sys.stderr)
        raise SystemExit(1) from None


# -- the event loop ----------------------------------------------------------------------

_EVENT_LOOPS = ("auto", "uvloop", "asyncio")


def event_loop_options(config: Config | None) -> dict[str, Any]:
    """``anyio.run`` backend options for ``[karton] event_loop`` (auto, uvloop or asyncio).

    ``auto`` (the default) runs on uvloop where it is installed (a dependency on CPython
    outside Windows): the same asyncio API with a loop written in C, which makes every
    await of a handler cheaper (benchmarks/README.md).  ``asyncio`` keeps the standard
    library's loop; ``uvloop`` insists on uvloop.

    Raises:
        ConfigError: an unknown value, or ``uvloop`` when it is not installed.
    """
    option = BUILTIN["karton"]["event_loop"]
    entry = None if config is None else option.lookup(config, None)
    name = str(option.default if entry is None else entry.value).strip().lower()
    source = "default" if entry is None else entry.source
    if name not in _EVENT_LOOPS:
        raise ConfigError(
            "value must be auto, uvloop or asyncio",
            section="karton", option="event_loop", value=entry and entry.value, source=source,
        )  # fmt: skip
    if name == "asyncio":
        return {}
    try:
        import uvloop  # noqa: F401 - only asks whether it is there
    except ImportError:
        if name == "auto":
            return {}
        raise ConfigError(
            "uvloop is not installed (pip install uvloop, or event_loop = asyncio)",
            section="karton", option="event_loop", value=entry and entry.value, source=source,
        ) from None  # fmt: skip
    return {"use_uvloop": True}


# -- the garbage collector ---------------------------------------------------------------

#: ``[karton] gc_threshold = auto``: the least size of the first generation.
AUTO_GC_GEN0 = 10_000


def gc_thresholds(config: Config | None) -> tuple[int, ...] | None:
    """The ``gc.set_threshold`` arguments ``[karton] gc_threshold`` asks for (None: keep).

    ``auto`` (the default) makes the first generation at least ``AUTO_GC_GEN0`` objects and
    keeps the interpreter's other thresholds.  A consumer holds a batch of tasks in flight
    (coroutines, frames, task objects), so with CPython's 700 every batch set off young
    collections that promoted live tasks to the old generations, and a full collection of
    the whole heap followed several times a second: 20% of a busy consumer's CPU
    (benchmarks/README.md, "The garbage collector").  ``python`` keeps the interpreter's
    thresholds; one to three integers are passed to ``gc.set_threshold`` (``0`` turns
    automatic collection off).

    Raises:
        ConfigError: a value that is none of these.
    """
    option = BUILTIN["karton"]["gc_threshold"]
    entry = None if config is None else option.lookup(config, None)
    text = str(option.default if entry is None else entry.value).strip().lower()
    if text == "python":
        return None
    if text == "auto":
        current = gc.get_threshold()
        return None if current[0] >= AUTO_GC_GEN0 else (AUTO_GC_GEN0, *current[1:])
    parts = [part.strip() for part in text.split(",")]
    if 1 <= len(parts) <= 3 and all(part.isdigit() for part in parts):
        return tuple(int(part) for part in parts)
    raise ConfigError(
        "value must be auto, python or one to three non-negative integers separated by "
        "commas (e.g. 10000,10,10)",
        section="karton", option="gc_threshold", value=entry and entry.value,
        source="default" if entry is None else entry.source,
    )  # fmt: skip


def tune_gc(config: Config | None) -> tuple[int, ...]:
    """Apply ``[karton] gc_threshold`` to this process; return the thresholds in force.

    Only the program's edge calls it (``serve_forever``, the CLI): the collector belongs
    to the whole process, and an application that embeds services keeps its own.

    Raises:
        ConfigError: see :func:`gc_thresholds`.
    """
    wanted = gc_thresholds(config)
    if wanted is not None:
        gc.set_threshold(*wanted)
    return gc.get_threshold()


# -- serving -----------------------------------------------------------------------------


class _Supervisor:
    """Runs services in one task group and turns signals into ``stop()`` calls."""

    def __init__(self, services: Sequence[object], grace: float | None) -> None:
        self.services: list[Servable] = []
        for service in services:
            if not isinstance(service, Servable):
                raise TypeError(f"{type(service).__name__} has no run()/stop(): cannot serve it")
            self.services.append(service)
        self.grace = grace
        self.started = False
        self.scope: anyio.CancelScope | None = None  # startup and run; made in the loop

    async def serve(self) -> None:
        with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async with anyio.create_task_group() as watcher:
                watcher.start_soon(self._watch, signals)
                with anyio.CancelScope() as self.scope:
                    async with AsyncExitStack() as stack:
                        # one runtime per connection settings, shared by the services
                        await stack.enter_async_context(share_runtimes(self.services))
                        for service in self.services:
                            await stack.enter_async_context(service)
                        async with anyio.create_task_group() as group:
                            for runnable in self.services:
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
                for runnable in self.services:
                    runnable.stop(grace=self.grace)
            else:
                log.warning("%s again: handing in-flight tasks back to their queues", name)
                for runnable in self.services:
                    runnable.stop(grace=0)


def serve_forever(
    services: Sequence[object], *, log_level: str | None = None, grace: float | None = None
) -> None:
    """Run ``services`` in one event loop until they stop or SIGINT/SIGTERM stops them.

    The first signal stops fetching and gives in-flight tasks ``grace`` seconds (default:
    each service's ``[karton] shutdown_grace``); a second one hands them back at once.
    Returns normally (exit code 0) once every service returned; a failure, at startup
    or later, prints one line on stderr and exits with code 1.  Services with the same
    connection settings share one runtime (``_runtime.share_runtimes``).

    Args:
        services: Consumers, Kartons and SystemServices (not yet open).
        log_level: root log level (default: the first service's ``[logging] level``).
        grace: seconds in-flight tasks get after the first signal.
    """
    if not services:
        raise ValueError("serve_forever() needs at least one service")
    with startup_errors(log_level):
        supervisor = _Supervisor(services, grace)
        level = log_level or supervisor.services[0].config.logging_settings().level
        level = configure_logging(level)
        first_config = getattr(supervisor.services[0], "config", None)
        loop_options = event_loop_options(first_config)
        tune_gc(first_config)
    try:
        with startup_errors(level):
            anyio.run(supervisor.serve, backend_options=loop_options)
        log.info("All services stopped")
    finally:
        flush_logs()
