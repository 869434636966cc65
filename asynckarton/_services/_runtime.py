"""Runtime: the connections services use (a Redis backend and a storage client).

A :class:`Runtime` is an explicit object.  Build it from a configuration
(:meth:`Runtime.from_config`) or from the parts (a :class:`~asynckarton.backend.RedisConnector`
and a :class:`~asynckarton.storage.Storage`, for tests and custom set-ups); neither does
I/O.  It is an async context manager with a count of users: the first ``async with``
opens the storage client and the Redis pool, the last one to leave closes both, and a
closed runtime cannot be opened again.  Services share a runtime only when they are given
the same one::

    async with Runtime.from_config(config) as runtime:
        async with Producer(config, runtime=runtime) as producer, Hasher(config, runtime=runtime):
            ...

A service that is not given a runtime opens its own on ``__aenter__`` and closes it on
``__aexit__``: two services with equal configurations and no runtime get two pools.  The
program's edges choose to share: ``serve_forever`` (so ``asynckarton run A B`` and
``Service.main()``), ``asynckarton.fastapi.lifespan`` and ``asynckarton.testing.pipeline``
open one runtime per distinct connection settings (:func:`share_runtimes`) for the
services of their process.

With no ``[redis]`` and no ``[s3]`` configured (or ``[asynckarton] embedded = 1``), the
runtime is *embedded*: an in-process Redis (fakeredis) driven by the same backend code,
and resources in ``<data_dir>/resources``.  The in-process Redis *server* belongs to the
data directory, not to a runtime: every runtime of this process built for the same
``data_dir`` connects to the same server (:func:`embedded_server`), which lives as long as
the process, as a redis-server outlives its clients.  So services on the embedded default
see one another's queues whether or not they share a runtime, and a service restarted in
the same process (tests, FastAPI reloads) finds the data it left.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Hashable, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Protocol, Self, runtime_checkable

import anyio

from .._errors import ConfigError
from .._settings._config import Config
from ..backend import EmbeddedConnector, KartonBackend, RedisConnector, ServerConnector
from ..storage import LocalStorage, Storage
from . import _embedded

if TYPE_CHECKING:
    import fakeredis

__all__ = [
    "DEFAULT_BUCKET",
    "Runtime",
    "RuntimeUser",
    "embedded_server",
    "open_backend",
    "server_connector",
    "setting_origin",
    "share_runtimes",
]

#: Bucket resources go to when neither ``[s3] bucket`` nor the runtime names one.
DEFAULT_BUCKET = "karton"

# The in-process Redis servers of the embedded mode, one per data directory, for the life
# of the process (see the module docstring).
_EMBEDDED_SERVERS: dict[str, fakeredis.FakeServer] = {}


def embedded_server(data_dir: str | Path) -> fakeredis.FakeServer:
    """Return this process's in-process Redis server for ``data_dir`` (made on first use)."""
    import fakeredis

    key = str(Path(data_dir))
    server = _EMBEDDED_SERVERS.get(key)
    if server is None:
        server = _EMBEDDED_SERVERS[key] = fakeredis.FakeServer()
    return server


class Runtime:
    """A Redis backend and a storage client, opened and closed together.

    Args:
        connector: where Redis clients come from (a real server or an in-process one).
        storage: where resource bytes live; the runtime opens and closes it.
        bucket: bucket new resources go to.
        create_bucket: create ``bucket`` when opening if it does not exist (the embedded
            mode does; against S3 that is ``karton-system --setup-bucket``'s job).

    Attributes:
        bucket: bucket new resources go to.
        embedded: True when built by :meth:`from_config` for the embedded mode.
    """

    def __init__(
        self,
        connector: RedisConnector,
        storage: Storage,
        *,
        bucket: str = DEFAULT_BUCKET,
        create_bucket: bool = False,
    ) -> None:
        self.connector = connector
        self.bucket = bucket
        self.embedded = False
        #: For the embedded mode: the data directory whose in-process Redis this uses.
        self.data_dir: Path | None = None
        self._storage = storage
        self._create_bucket = create_bucket
        self._backend: KartonBackend | None = None
        self._users = 0
        self._closed = False
        self._lock = anyio.Lock()

    @classmethod
    def from_config(cls, config: Config) -> Runtime:
        """Build the runtime ``config`` describes (embedded, or ``[redis]`` + ``[s3]``).

        Nothing is opened yet.

        Raises:
            ConfigError: the ``[redis]`` or ``[s3]`` settings are incomplete or invalid.
        """
        if config.embedded:
            data_dir = Path(config.data_dir)
            runtime = cls(
                EmbeddedConnector(embedded_server(data_dir)),
                LocalStorage(data_dir / "resources"),
                bucket=str(config.get("s3", "bucket") or DEFAULT_BUCKET),
                create_bucket=True,
            )
            runtime.embedded = True
            runtime.data_dir = data_dir
            return runtime
        # Imported here, not at the top: aiobotocore and botocore are slow to import and
        # only a runtime with S3 storage needs them (see asynckarton.storage).
        from ..storage._s3 import S3Storage

        s3 = config.s3_settings()
        connector = server_connector(config)
        return cls(
            connector,
            S3Storage.from_settings(s3),
            bucket=str(s3.bucket or DEFAULT_BUCKET),
        )

    @staticmethod
    def sharing_key(config: Config) -> Hashable:
        """Return what two configs must have equal for their services to share a runtime.

        The connection settings: ``[redis]`` and ``[s3]``, or the embedded data directory.
        """
        if config.embedded:
            return ("embedded", str(Path(config.data_dir)), config.get("s3", "bucket"))
        return (config.redis_settings(), config.s3_settings())

    # -- lifecycle ----------------------------------------------------------------------

    @property
    def users(self) -> int:
        """How many ``async with`` blocks hold the runtime open now."""
        return self._users

    @property
    def closed(self) -> bool:
        """True once the last user left (a closed runtime cannot be reopened)."""
        return self._closed

    async def __aenter__(self) -> Self:
        async with self._lock:
            if self._closed:
                raise RuntimeError(
                    f"{self!r} is closed (its last user left); a runtime opens once: keep it "
                    "open with 'async with runtime' around every service that uses it"
                )
            if self._users == 0:
                await self._open()
            self._users += 1
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self._leave()

    async def _open(self) -> None:
        if self.data_dir is not None and isinstance(self.connector, EmbeddedConnector):
            # Another process's system service may serve this data_dir's Redis: use it.
            url = await anyio.to_thread.run_sync(_embedded.find_served, self.data_dir)
            if url is not None:
                self.connector = ServerConnector(url=url)
        await self._storage.__aenter__()
        try:
            if self._create_bucket:
                await self._storage.ensure_bucket(self.bucket, create=True)
            self._backend = KartonBackend(self.connector)
        except BaseException:
            with anyio.CancelScope(shield=True):
                await self._storage.aclose()
            raise

    async def _leave(self) -> None:
        with anyio.CancelScope(shield=True):  # a cancelled user still closes what it opened
            async with self._lock:
                self._users -= 1
                if self._users > 0:
                    return
                self._closed = True
                backend, self._backend = self._backend, None
                try:
                    await self._storage.aclose()
                finally:
                    if backend is not None:
                        await backend.aclose()

    # -- the embedded mode across processes (see _embedded) ------------------------------

    @property
    def private(self) -> bool:
        """True for an embedded runtime whose in-process Redis no other process can reach.

        That is: it neither connected to another process's served Redis nor is served by
        this process.
        """
        return (
            self.data_dir is not None
            and isinstance(self.connector, EmbeddedConnector)
            and not _embedded.served_here(self.data_dir)
            and not _embedded.has_local_system(self.data_dir)
        )

    def warn_if_private(self, who: str) -> None:
        """Warn (once per process) when :attr:`private`: nothing else can reach its tasks."""
        if self.private and self.data_dir is not None:
            _embedded.warn_private(self.data_dir, who)

    async def serve_embedded(self) -> int | None:
        """Serve this runtime's in-process Redis to other processes; return the port.

        Only for an embedded runtime that owns its in-process server (None otherwise).
        """
        if self.data_dir is None or not isinstance(self.connector, EmbeddedConnector):
            return None
        server, data_dir = self.connector.server, self.data_dir
        port: int = await anyio.to_thread.run_sync(_embedded.serve, data_dir, server)
        return port

    # -- what services use --------------------------------------------------------------

    def _check_open(self) -> None:
        if self._backend is None:
            state = "closed" if self._closed else "not open"
            raise RuntimeError(f"{self!r} is {state}: use 'async with runtime' first")

    @property
    def backend(self) -> KartonBackend:
        """Redis access (only while open)."""
        self._check_open()
        assert self._backend is not None
        return self._backend

    @property
    def storage(self) -> Storage:
        """The storage client (only while open)."""
        self._check_open()
        return self._storage

    def __repr__(self) -> str:
        kind = "embedded" if self.embedded else type(self.connector).__name__
        return f"<Runtime {kind} bucket={self.bucket!r} users={self._users}>"


@runtime_checkable
class RuntimeUser(Protocol):
    """What :func:`share_runtimes` can hand a runtime to (every asynckarton service)."""

    @property
    def config(self) -> Config: ...
    @property
    def given_runtime(self) -> Runtime | None: ...
    def use_runtime(self, runtime: Runtime | None) -> None: ...


@asynccontextmanager
async def share_runtimes(
    services: Sequence[object], runtime: Runtime | None = None
) -> AsyncIterator[list[Runtime]]:
    """Give ``services`` shared runtimes, held open while the block runs.

    Services already given a runtime keep it.  The others get ``runtime`` when it is
    given; otherwise one new runtime per distinct :meth:`Runtime.sharing_key` of their
    configs, so services of one process with the same connection settings share one
    Redis pool and one storage client.  Enter this before the services, so the runtimes
    outlive them; on exit the services given a runtime here are given none again.
    Objects that are not :class:`RuntimeUser` are left alone.

    Yields:
        the runtimes this call opened or was given.
    """
    by_key: dict[Hashable, Runtime] = {}
    opened: list[Runtime] = []
    users: list[RuntimeUser] = []
    for service in services:
        if not isinstance(service, RuntimeUser) or service.given_runtime is not None:
            continue
        chosen = runtime
        if chosen is None:
            key = Runtime.sharing_key(service.config)
            chosen = by_key.get(key)
            if chosen is None:
                chosen = by_key[key] = Runtime.from_config(service.config)
        if chosen not in opened:
            opened.append(chosen)
        service.use_runtime(chosen)
        users.append(service)
    try:
        async with AsyncExitStack() as stack:
            for chosen in opened:
                await stack.enter_async_context(chosen)
            yield opened
    finally:
        for service in users:
            service.use_runtime(None)


def server_connector(config: Config) -> ServerConnector:
    """Return a connector to the Redis server ``config``'s ``[redis]`` names (no I/O).

    Its ``origin`` says where those settings were set, for error messages.
    """
    connector = ServerConnector.from_settings(config.redis_settings())
    connector.origin = setting_origin(config, "redis", ("url", "host", "port", "db"))
    return connector


@asynccontextmanager
async def open_backend(config: Config) -> AsyncIterator[KartonBackend]:
    """Open a backend on ``config``'s Redis server alone, without a storage client.

    For tools that only read or change Redis (``asynckarton status``, ``list``,
    ``delete``): they neither build an S3 client nor import aiobotocore, and need no
    ``[s3]`` settings.  The backend is closed when the block exits.

    Raises:
        ConfigError: ``config`` is embedded (its Redis lives inside another process) or
            its ``[redis]`` settings are invalid.
    """
    if config.embedded:
        raise ConfigError(
            "no Redis server configured: the embedded Redis lives inside the process that "
            "runs the services",
            section="redis",
        )
    backend = KartonBackend(server_connector(config))
    try:
        yield backend
    finally:
        with anyio.CancelScope(shield=True):  # a cancelled caller still closes the pool
            await backend.aclose()


def setting_origin(config: Config, section: str, options: Sequence[str]) -> str:
    """Say where ``[section]``'s connection options were set, for error messages.

    For example ``[redis] host from /etc/karton/karton.ini:2, port from env
    KARTON_REDIS_PORT``; options left at their default are not named.
    """
    parts = [
        f"{option} from {config.source(section, option)}"
        for option in options
        if config.entry(section, option) is not None
    ]
    return f"[{section}] " + (", ".join(parts) if parts else "defaults")
