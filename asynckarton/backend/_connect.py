"""How asynckarton reaches Redis: a real server, or the in-process one of the embedded mode.

Both paths hand out ``redis.asyncio.Redis`` clients, so every command goes through the
same backend code.  A connector gives:

* one shared, *unnamed* connection pool for ordinary commands, and
* dedicated *named* single connections, one per service per process, which is how
  Karton (and karton-dashboard) count replicas from ``CLIENT LIST``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol
from urllib.parse import urlsplit, urlunsplit

import redis.asyncio as aredis

_hiredis_pack: Callable[[tuple[Any, ...]], bytes] | None
try:
    from hiredis import pack_command as _hiredis_pack
except ImportError:  # pragma: no cover - hiredis is a declared dependency
    _hiredis_pack = None


class FastConnection(aredis.Connection):
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
        """Return a new client holding one dedicated connection named ``client_name``."""
        ...

    def blocking(self) -> aredis.Redis:
        """Return a new client with one connection for blocking pops."""
        ...

    async def aclose(self) -> None:
        """Close the shared pool."""
        ...


@dataclass(kw_only=True)
class ServerConnector:
    """Connects to a real redis-server (host/port or URL, as Karton's ``[redis]``)."""

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
    _pool: aredis.Redis | None = field(default=None, init=False, repr=False)

    @property
    def address(self) -> str:
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
        return cls(
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

    def _client(self, *, single: bool = False, **extra: Any) -> aredis.Redis:
        kwargs = {**self._kwargs(), **extra}
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
        return self._client(single=True, client_name=client_name, max_connections=1)

    def blocking(self) -> aredis.Redis:
        return self._client(single=True, max_connections=1)

    async def aclose(self) -> None:
        if self._pool is not None:
            pool, self._pool = self._pool, None
            await pool.aclose()


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
        return self._client(client_name=client_name, single_connection_client=True)

    def blocking(self) -> aredis.Redis:
        return self._client(single_connection_client=True)

    async def aclose(self) -> None:
        if self._pool is not None:
            pool, self._pool = self._pool, None
            await pool.aclose()
