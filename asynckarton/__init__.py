"""asynckarton: asyncio-native Karton, wire-compatible with Karton 5.

Producers send tasks; the system service routes each one to every consumer whose
filters match; consumers run ``async def process(self, task)``.  Redis holds tasks and
queues (Karton's keys), S3 holds resources; with neither configured, an in-process Redis
and a local directory run everything in one process.

Layering (lower never imports higher): _errors -> _config, _query -> _resource,
storage -> _task -> backend -> _service -> _producer, _consumer -> _karton -> system
-> cli, fastapi.
"""

from ._blocking import to_process, to_thread
from ._config import Config, Option
from ._consumer import Consumer
from ._errors import (
    ConfigError,
    InvalidTaskError,
    KartonError,
    QueryError,
    ResourceNotFoundError,
    Retry,
    StorageError,
    TaskTimeoutError,
    UnsafeArchiveError,
)
from ._karton import Karton
from ._producer import Producer
from ._resource import LocalResource, RemoteResource, ResourceBase
from ._task import Task, TaskPriority, TaskState, get_current_task
from ._version import __version__
from .system import SystemService

Resource = LocalResource

__all__ = [
    "Config",
    "ConfigError",
    "Consumer",
    "InvalidTaskError",
    "Karton",
    "KartonError",
    "LocalResource",
    "Option",
    "Producer",
    "QueryError",
    "RemoteResource",
    "Resource",
    "ResourceBase",
    "ResourceNotFoundError",
    "Retry",
    "StorageError",
    "SystemService",
    "Task",
    "TaskPriority",
    "TaskState",
    "TaskTimeoutError",
    "UnsafeArchiveError",
    "__version__",
    "get_current_task",
    "to_process",
    "to_thread",
]
