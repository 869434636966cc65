"""What every asynckarton component shares: configuration, identity, runtime, logging.

``ServiceBase`` is an async context manager.  Entering it opens its runtime (Redis pool +
storage client: the one it was given, else a new one of its own, see ``_runtime``) and
starts publishing the service logger's records to Karton's log channels; leaving it stops
both (a runtime it was given closes only when its last user leaves).  Constructors do no
I/O.
"""

from __future__ import annotations

import argparse
import logging
import uuid
from collections.abc import Sequence
from contextlib import AsyncExitStack
from types import TracebackType
from typing import Any, ClassVar, Self
from urllib.parse import urlencode

import anyio

from .._errors import InvalidIdentityError
from .._settings._builtin import BUILTIN
from .._settings._check import check_config
from .._settings._config import Config, Option
from .._settings._flags import (
    add_options_to_parser,
    base_args_parser,
    base_config_from_args,
    options_from_args,
)
from .._version import __version__ as _version
from ..backend import KARTON_PROTOCOL_VERSION, KartonBackend
from ..storage import Storage
from ._logging import KartonLogHandler
from ._run import serve_forever, startup_errors
from ._runtime import Runtime

__all__ = ["ServiceBase"]

_config_log = logging.getLogger("asynckarton.config")


def validate_identity(identity: str) -> str:
    """Return ``identity`` if Karton can use it in client names and keys."""
    if not identity:
        raise InvalidIdentityError("identity must not be empty")
    if " " in identity or "?" in identity:
        raise InvalidIdentityError(f"identity {identity!r} must not contain a space or '?'")
    return identity


class ServiceBase:
    """Base of Producer, Consumer and SystemService.

    Args:
        config: configuration (default: ``Config()``, Karton's layered loading).
        identity: identity when the class does not set one; ``[karton] identity``
            overrides both, as in Karton.
        runtime: the :class:`~asynckarton.Runtime` to use (shared with whoever else is
            given it); default: open a runtime of its own from ``config`` on ``__aenter__``.

    Raises:
        ConfigError: An unknown option in a built-in section, or an invalid value of one
            of the service's declared :attr:`options` (checked here, not per task).
    """

    identity: ClassVar[str] = ""
    #: Identity used when neither the class, the argument nor ``[karton] identity`` sets
    #: one ("" = required: a service without one is refused).
    default_identity: ClassVar[str] = ""
    version: ClassVar[str | None] = None
    #: Karton's flag: put service info (versions, instance) into the client name.
    with_service_info: ClassVar[bool] = True
    #: Options this service reads, declared once: from ini, env and CLI (``--sec-name``).
    options: ClassVar[Sequence[Option]] = ()
    #: Karton's default GC interval, kept so code written against Karton's docs runs.
    GC_INTERVAL: ClassVar[int] = 180

    def __init__(
        self,
        config: Config | None = None,
        identity: str | None = None,
        *,
        runtime: Runtime | None = None,
    ) -> None:
        self.config = config if config is not None else Config()
        check_config(self.config, type(self).options)  # errors only; entry points warn
        cls = type(self)
        resolved = (
            self.config.get("karton", "identity")
            or identity
            or cls.identity
            or cls.default_identity
        )
        #: The identity its ``[karton:<identity>]`` settings are looked up under (without
        #: debug mode's random suffix).
        self.config_identity = str(resolved or "")
        self.debug = bool(BUILTIN["karton"]["debug"].read(self.config, self.config_identity))
        if self.debug and resolved:
            resolved = f"{resolved}-{uuid.uuid4().hex[:8]}-dev"
        self.identity = validate_identity(str(resolved or ""))  # type: ignore[misc]
        for option in type(self).options:  # a bad value fails at start, not per task
            option.read(self.config, self.config_identity)
        self.instance_id = uuid.uuid4().hex
        self.log = logging.getLogger(self.identity)
        if self.log.level == logging.NOTSET:  # [logging] level, unless the app chose one
            self.log.setLevel(self.config.logging_settings().level)
        self._stack: AsyncExitStack | None = None
        self._given_runtime = runtime
        self._runtime: Runtime | None = None
        self._publisher: KartonLogHandler | None = None

    # -- Karton's command-line hooks ------------------------------------------------------

    @classmethod
    def args_description(cls) -> str:
        """Description shown by ``--help`` (the class docstring's first line)."""
        doc = (cls.__doc__ or "").strip()
        return doc.splitlines()[0] if doc else f"asynckarton service {cls.identity}"

    @classmethod
    def args_parser(cls) -> argparse.ArgumentParser:
        """Return the argument parser of :meth:`main` (extend it and call super)."""
        parser = base_args_parser(cls.args_description())
        parser.add_argument("--version", action="version", version=str(cls.version or _version))
        add_options_to_parser(parser, cls.options)
        return parser

    @classmethod
    def config_from_args(cls, config: Config, args: argparse.Namespace) -> None:
        """Copy parsed arguments into ``config`` (extend it and call super)."""
        base_config_from_args(config, args)
        options_from_args(config, cls.options, args)

    @classmethod
    def karton_from_args(cls, args: argparse.Namespace | None = None) -> Self:
        """Build the service from command-line arguments, as Karton's classmethod does."""
        if args is None:
            args = cls.args_parser().parse_args()
        config = Config(getattr(args, "config_file", None))
        cls.config_from_args(config, args)
        return cls(config)

    @classmethod
    def main(cls, argv: Sequence[str] | None = None) -> None:
        """Entry point: parse arguments, run until SIGINT/SIGTERM, drain, exit."""
        args = cls.args_parser().parse_args(argv)
        with startup_errors(getattr(args, "logging_level", None)):  # bad config: one line, exit 1
            service = cls.karton_from_args(args)
            for warning in check_config(service.config, cls.options):
                _config_log.warning("%s", warning)
        serve_forever([service], log_level=getattr(args, "logging_level", None))

    def option(self, option: Option) -> Any:
        """Return the value of a declared option (ini, env or CLI; else its default).

        A ``[karton]`` option is read as this service's identity sees it.
        """
        return option.read(self.config, self.config_identity)

    # -- lifecycle ----------------------------------------------------------------------

    async def __aenter__(self) -> Self:
        if self._stack is not None:
            raise RuntimeError(f"{type(self).__name__} {self.identity!r} is already open")
        stack = AsyncExitStack()
        try:
            runtime = self._given_runtime or Runtime.from_config(self.config)
            self._runtime = await stack.enter_async_context(runtime)
            await self._start_log_publishing(stack)
        except BaseException:
            await stack.aclose()
            self._runtime = None
            raise
        self._stack = stack
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Stop publishing logs and leave the runtime (closing it if this was its last user)."""
        stack, self._stack = self._stack, None
        self._publisher = None
        if stack is not None:
            try:
                await stack.aclose()
            finally:
                self._runtime = None

    async def _start_log_publishing(self, stack: AsyncExitStack) -> None:
        publish = self.config.logging_settings().enable_publish and not self.debug
        if not publish:
            return
        handler = KartonLogHandler(self.backend, self.identity)
        self.log.addHandler(handler)
        self._publisher = handler
        stack.callback(self.log.removeHandler, handler)
        group = await stack.enter_async_context(anyio.create_task_group())
        stack.callback(group.cancel_scope.cancel)  # runs first on exit: stop the publisher
        group.start_soon(handler.run)

    # -- runtime ------------------------------------------------------------------------

    @property
    def given_runtime(self) -> Runtime | None:
        """The runtime this service was given (None: it opens its own)."""
        return self._given_runtime

    def use_runtime(self, runtime: Runtime | None) -> None:
        """Use ``runtime`` from the next ``__aenter__`` on (None: open one of its own).

        Raises:
            RuntimeError: the service is open.
        """
        if self._stack is not None:
            raise RuntimeError(
                f"{type(self).__name__} {self.identity!r} is open: give it a runtime "
                "before 'async with'"
            )
        self._given_runtime = runtime

    @property
    def runtime(self) -> Runtime:
        """The runtime in use (only while the service is open)."""
        if self._runtime is None:
            raise RuntimeError(
                f"{type(self).__name__} {self.identity!r} is not open: use 'async with'"
            )
        return self._runtime

    @property
    def backend(self) -> KartonBackend:
        """Redis access."""
        return self.runtime.backend

    @property
    def storage(self) -> Storage:
        """Resource storage (S3 or a local directory)."""
        return self.runtime.storage

    @property
    def client_name(self) -> str:
        """Name of this service's presence connection, as Karton formats it."""
        if not self.with_service_info:
            return self.identity
        info = {
            "karton_version": KARTON_PROTOCOL_VERSION,
            "service_version": self.version,
            "instance_id": self.instance_id,
            "asynckarton_version": _version,
        }
        query = urlencode({k: v for k, v in info.items() if v is not None})
        return f"{self.identity}?{query}"
