"""How asynckarton reaches Redis: a real server, or the in-process one of the embedded mode.

Both paths hand out ``redis.asyncio.Redis`` clients, so every command goes through the
same backend code.  A connector gives:

* one shared, *unnamed* connection pool for ordinary commands, and
* dedicated *named* single connections, one per service per process, which is how
  Karton (and karton-dashboard) count replicas from ``CLIENT LIST``.

With ``[redis] sentinel_master`` and ``sentinels`` set, every client of a
:class:`ServerConnector` (the pool, the named and the blocking ones) reaches the master
through Redis Sentinel: each new connection asks the sentinels where the master is, so
after a failover the services' reconnect-and-retry loops land on the promoted replica
without a restart.  The services' loops already retry lost connections; nothing else
changes for them.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol
from urllib.parse import urlsplit, urlunsplit

import redis.asyncio as aredis
import redis.exceptions
from redis.asyncio.sentinel import (
    Sentinel,
    SentinelConnectionPool,
    SentinelManagedConnection,
    SentinelManagedSSLConnection,
)

from .._errors import ConfigError

_hiredis_pack: Callable[[tuple[Any, ...]], bytes] | None
try:
    from hiredis import pack_command as _hiredis_pack
except ImportError:  # pragma: no cover - hiredis is a declared dependency
    _hiredis_pack = None


class _DirectSend(aredis.Connection):
    """Writes without ``asyncio.wait_for`` (see :meth:`send_packed_command`)."""

    async def send_packed_command(
        self, command: str | bytes | Iterable[bytes], check_health: bool = True
    ) -> None:
        """Write ``command``; bound by ``socket_timeout`` only when the socket pushes back.

        redis.asyncio wraps every write in ``asyncio.wait_for`` when ``socket_timeout``
        is set: a task, a timer and two extra turns of the event loop per command, about
        a third of the loop turns of a task delivered to an idle consumer.  A write the
        transport buffers at once cannot time out, so only a write that leaves the
        buffer above its high-water mark (then ``drain`` waits) gets the timeout.
        Errors end as redis.asyncio's do: the connection is dropped and the error is a
        ``redis.exceptions.TimeoutError`` or ``ConnectionError``.
        """
        writer = self._writer
        if writer is None or not self.is_connected:
            await super().send_packed_command(command, check_health)
            return
        if check_health:
            await self.check_health()  # type: ignore[no-untyped-call]
        try:
            if isinstance(command, str):
                command = command.encode()
            if isinstance(command, bytes):
                command = [command]
            writer.writelines(command)
            transport = writer.transport
            if (
                self.socket_timeout
                and transport.get_write_buffer_size() > transport.get_write_buffer_limits()[1]
            ):
                async with asyncio.timeout(self.socket_timeout):
                    await writer.drain()
            else:
                await writer.drain()  # returns at once: the transport is not paused
        except TimeoutError:  # (before OSError, its base class)
            await self.disconnect(nowait=True)
            raise redis.exceptions.TimeoutError("Timeout writing to socket") from None
        except OSError as exc:
            await self.disconnect(nowait=True)
            raise redis.exceptions.ConnectionError(
                f"Error {exc.errno or 'UNKNOWN'} while writing to socket. {exc.strerror or exc}."
            ) from exc
        except BaseException:
            await self.disconnect(nowait=True)
            raise


class FastConnection(_DirectSend):
    """A TCP connection that packs commands with hiredis (C) instead of pure Python.

    redis.asyncio parses replies with hiredis but packs requests in Python; for the
    pipelines of the router and consumers, packing was the largest single cost.
    """

    def pack_command(self, *args: Any) -> list[bytes]:
        if _hiredis_pack is None or any(isinstance(a, memoryview) for a in args):
            return super().pack_command(*args)
        first = args[0]
        if (isinstance(first, str) and " " in first) or (
            isinstance(first, bytes) and b" " in first
        ):
            args = (*first.split(), *args[1:])
        return [_hiredis_pack(args)]


class _ResolveOnConnect(SentinelManagedConnection):
    """Ask the sentinels for the master on *every* (re)connect of this connection.

    redis-py 8 resolves the master in ``SentinelManagedConnection.connect`` only, but a
    connection that lost its socket reconnects from ``send_packed_command`` through
    ``connect_check_health``, to the host and port it had: a single-connection client
    (our named and blocking clients) then stays on a dead master after a failover.
    Resolving in ``connect_check_health`` covers both paths.
    """

    async def _connect_retry(self) -> None:
        if self._reader or not self.connection_pool.is_master:
            await super()._connect_retry()  # type: ignore[no-untyped-call]
            return
        await self.connect_check_health(
            check_health=self.connection_pool.check_connection, retry_socket_connect=False
        )

    async def connect_check_health(
        self, check_health: bool = True, retry_socket_connect: bool = True
    ) -> None:
        if self.is_connected:
            return
        if self.connection_pool.is_master:
            self.host, self.port = await self.connection_pool.get_master_address()
        await super().connect_check_health(
            check_health=check_health, retry_socket_connect=retry_socket_connect
        )


class FastSentinelConnection(_DirectSend, _ResolveOnConnect):
    """A Sentinel-resolved connection that packs commands as :class:`FastConnection`."""

    pack_command = FastConnection.pack_command


class _SentinelSSLConnection(_ResolveOnConnect, SentinelManagedSSLConnection):
    """The TLS variant (redis-py packs its commands)."""


class RedisConnector(Protocol):
    """Makes Redis clients for one deployment."""

    @property
    def address(self) -> str:
        """Where the clients connect, for error messages (no password)."""
        ...

    def pool(self) -> aredis.Redis:
        """Return the shared client (pooled, unnamed connections)."""
        ...

    def named(self, client_name: str) -> aredis.Redis:
        """Return a new client of one dedicated connection named ``client_name``.

        A pool of one connection, not a single-connection client, so pipelines work on
        it (a consumer's upkeep round is one); it must not be used by two calls at once.
        """
        ...

    def blocking(self) -> aredis.Redis:
        """Return a new client with one connection for blocking pops."""
        ...

    async def aclose(self) -> None:
        """Close the shared pool."""
        ...


def parse_sentinels(value: str) -> tuple[tuple[str, int], ...]:
    """Parse ``[redis] sentinels``: ``host:port`` pairs separated by commas.

    A bare host means port 26379; IPv6 hosts go in brackets (``[::1]:26379``).

    Raises:
        ConfigError: an entry is empty or its port is not a number in 1..65535.
    """
    out: list[tuple[str, int]] = []
    for raw in value.split(","):
        entry = raw.strip()
        if not entry:
            raise ConfigError(
                "empty sentinel address", section="redis", option="sentinels", value=value
            )
        host, port_text = entry, "26379"
        if entry.startswith("["):
            host, _, rest = entry[1:].partition("]")
            if rest:
                port_text = rest.removeprefix(":")
        elif entry.count(":") == 1:
            host, port_text = entry.split(":")
        try:
            port = int(port_text)
        except ValueError:
            port = 0
        if not host or not 1 <= port <= 65535:
            raise ConfigError(
                f"bad sentinel address {entry!r}: want host:port",
                section="redis",
                option="sentinels",
                value=value,
            )
        out.append((host, port))
    return tuple(out)


@dataclass(kw_only=True)
class ServerConnector:
    """Connects to a real redis-server (host/port or URL, as Karton's ``[redis]``).

    With ``sentinel_master`` set, connects to that Sentinel service's current master
    instead (host, port and url are then unused); ``db``, ``username``, ``password`` and
    ``ssl`` still apply to the master, ``sentinel_username``/``sentinel_password`` to the
    sentinels.
    """

    host: str = "127.0.0.1"
    port: int = 6379
    db: int = 0
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    ssl: bool = False
    url: str | None = None
    socket_timeout: float | None = 30.0
    ssl_ca_certs: str | None = None
    ssl_certfile: str | None = None
    ssl_keyfile: str | None = None
    ssl_cert_reqs: str = "required"
    ssl_check_hostname: bool = True
    max_connections: int = 64
    #: Where the address was set, for error messages (see ``Runtime.from_config``).
    origin: str | None = None
    sentinel_master: str | None = None
    sentinels: tuple[tuple[str, int], ...] = ()
    sentinel_username: str | None = None
    sentinel_password: str | None = field(default=None, repr=False)
    _pool: aredis.Redis | None = field(default=None, init=False, repr=False)
    _sentinel: Sentinel | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        if self.sentinel_master and not self.sentinels:
            raise ConfigError(
                "sentinel_master is set but no sentinels are listed",
                section="redis",
                option="sentinels",
            )
        if self.sentinels and not self.sentinel_master:
            raise ConfigError(
                "sentinels are listed but sentinel_master (the service name) is not set",
                section="redis",
                option="sentinel_master",
            )

    @property
    def address(self) -> str:
        if self.sentinel_master:
            hosts = ",".join(f"[{h}]:{p}" if ":" in h else f"{h}:{p}" for h, p in self.sentinels)
            return f"redis+sentinel://{hosts}/{self.sentinel_master}/{self.db}"
        if self.url:
            parts = urlsplit(self.url)
            if parts.password is not None:  # keep the user name, mask the password
                user = f"{parts.username}:***" if parts.username else ":***"
                netloc = f"{user}@{parts.netloc.rpartition('@')[2]}"
                parts = parts._replace(netloc=netloc)
            return urlunsplit(parts)
        scheme = "rediss" if self.ssl else "redis"
        return f"{scheme}://{self.host}:{self.port}/{self.db}"

    @classmethod
    def from_settings(cls, settings: Any) -> ServerConnector:
        """Build from a RedisSettings-like object (attributes named as ``[redis]``)."""
        sentinels = getattr(settings, "sentinels", None)
        return cls(
            sentinel_master=getattr(settings, "sentinel_master", None),
            sentinels=parse_sentinels(sentinels) if sentinels else (),
            sentinel_username=getattr(settings, "sentinel_username", None),
            sentinel_password=getattr(settings, "sentinel_password", None),
            host=settings.host or "127.0.0.1",
            port=settings.port,
            db=settings.db,
            username=settings.username,
            password=settings.password,
            ssl=settings.ssl,
            url=settings.url,
            socket_timeout=settings.socket_timeout,
            ssl_ca_certs=settings.ssl_ca_certs,
            ssl_certfile=settings.ssl_certfile,
            ssl_keyfile=settings.ssl_keyfile,
            ssl_cert_reqs=settings.ssl_cert_reqs,
            ssl_check_hostname=settings.ssl_check_hostname,
        )

    def _tls(self) -> dict[str, Any]:
        """redis-py's TLS options, for a ``rediss://`` URL or ``ssl`` (else none)."""
        if not (self.ssl or (self.url or "").startswith("rediss:")):
            return {}
        return {
            "ssl_ca_certs": self.ssl_ca_certs,
            "ssl_certfile": self.ssl_certfile,
            "ssl_keyfile": self.ssl_keyfile,
            "ssl_cert_reqs": self.ssl_cert_reqs,
            "ssl_check_hostname": self.ssl_check_hostname,
        }

    def _kwargs(self) -> dict[str, Any]:
        return {
            "decode_responses": True,
            "socket_timeout": self.socket_timeout,
            "socket_connect_timeout": 10.0,
            "health_check_interval": 15,
        }

    def _sentinel_pool(self, kwargs: dict[str, Any]) -> SentinelConnectionPool:
        assert self.sentinel_master is not None
        if self._sentinel is None:
            self._sentinel = Sentinel(  # type: ignore[no-untyped-call]
                list(self.sentinels),
                sentinel_kwargs={
                    "username": self.sentinel_username,
                    "password": self.sentinel_password,
                    "decode_responses": True,
                    "socket_timeout": 5.0,
                    "socket_connect_timeout": 5.0,
                },
            )
        master_kwargs = {
            "db": self.db,
            "username": self.username,
            "password": self.password,
            "is_master": True,
            **kwargs,
        }
        if self.ssl:
            master_kwargs["ssl"] = True
        pool: SentinelConnectionPool = SentinelConnectionPool(  # type: ignore[no-untyped-call]
            self.sentinel_master, self._sentinel, **master_kwargs
        )
        if pool.connection_class is SentinelManagedSSLConnection:
            pool.connection_class = _SentinelSSLConnection
        else:
            pool.connection_class = FastSentinelConnection
        return pool

    def _client(self, *, single: bool = False, **extra: Any) -> aredis.Redis:
        kwargs = {**self._kwargs(), **extra}
        if self.sentinel_master:
            client = aredis.Redis(
                connection_pool=self._sentinel_pool(kwargs), single_connection_client=single
            )
            client.auto_close_connection_pool = True
            return client
        if self.url:
            pool = aredis.ConnectionPool.from_url(self.url, **kwargs, **self._tls())
        else:
            pool = aredis.ConnectionPool(
                host=self.host,
                port=self.port,
                db=self.db,
                username=self.username,
                password=self.password,
                **kwargs,
            )
            if self.ssl:
                pool = aredis.ConnectionPool(
                    connection_class=aredis.SSLConnection, **pool.connection_kwargs, **self._tls()
                )
        if pool.connection_class is aredis.Connection:
            pool.connection_class = FastConnection
        client = aredis.Redis(connection_pool=pool, single_connection_client=single)
        client.auto_close_connection_pool = True  # the pool is this client's alone
        return client

    def pool(self) -> aredis.Redis:
        if self._pool is None:
            self._pool = self._client(max_connections=self.max_connections)
        return self._pool

    def named(self, client_name: str) -> aredis.Redis:
        return self._client(client_name=client_name, max_connections=1)

    def blocking(self) -> aredis.Redis:
        return self._client(single=True, max_connections=1)

    async def aclose(self) -> None:
        if self._pool is not None:
            pool, self._pool = self._pool, None
            await pool.aclose()
        if self._sentinel is not None:
            sentinel, self._sentinel = self._sentinel, None
            for client in sentinel.sentinels:
                await client.aclose()


class EmbeddedConnector:
    """An in-process Redis (fakeredis) shared by every service of this process."""

    def __init__(self, server: Any | None = None) -> None:
        import fakeredis

        self.server = server if server is not None else fakeredis.FakeServer()
        self._pool: aredis.Redis | None = None

    @property
    def address(self) -> str:
        return "embedded"

    def _client(self, **extra: Any) -> aredis.Redis:
        import fakeredis

        client: aredis.Redis = fakeredis.FakeAsyncRedis(
            server=self.server, decode_responses=True, **extra
        )
        return client

    def pool(self) -> aredis.Redis:
        if self._pool is None:
            self._pool = self._client()
        return self._pool

    def named(self, client_name: str) -> aredis.Redis:
        return self._client(client_name=client_name, max_connections=1)

    def blocking(self) -> aredis.Redis:
        return self._client(single_connection_client=True)

    async def aclose(self) -> None:
        if self._pool is not None:
            pool, self._pool = self._pool, None
            await pool.aclose()
