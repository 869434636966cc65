"""The Redis seam: KartonBackend over a RedisConnector (real server or embedded).

The only code in asynckarton that talks to Redis.  Internals (``RoutedBatch``,
``until_done``, ``TRANSIENT_ERRORS``...) are imported from their private modules.
"""

from ._connect import EmbeddedConnector, RedisConnector, ServerConnector
from ._records import KARTON_PROTOCOL_VERSION, Bind
from ._redis import KartonBackend

__all__ = [
    "KARTON_PROTOCOL_VERSION",
    "Bind",
    "EmbeddedConnector",
    "KartonBackend",
    "RedisConnector",
    "ServerConnector",
]
