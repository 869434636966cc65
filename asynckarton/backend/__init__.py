"""The Redis seam: KartonBackend over a RedisConnector (real server or embedded)."""

from ._connect import EmbeddedConnector, RedisConnector, ServerConnector
from ._redis import (
    KARTON_PROTOCOL_VERSION,
    TRANSIENT_ERRORS,
    Bind,
    KartonBackend,
    RoutedBatch,
    until_done,
)

__all__ = [
    "KARTON_PROTOCOL_VERSION",
    "TRANSIENT_ERRORS",
    "Bind",
    "EmbeddedConnector",
    "KartonBackend",
    "RedisConnector",
    "RoutedBatch",
    "ServerConnector",
    "until_done",
]
