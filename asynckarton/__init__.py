"""asynckarton: asyncio-native Karton, wire-compatible with Karton 5.

Producers send tasks; the system service routes each one to every consumer whose
filters match; consumers run ``async def process(self, task)``.  Redis holds tasks and
queues (Karton's keys), S3 holds resources; with neither configured, an in-process Redis
and a local directory run everything in one process.

Map of the package, lowest layer first; a module imports only its own layer or lower
ones, never in a cycle (``tests/unit/test_layers.py`` checks both):

===================  ===================================================================
``_errors``          the exception tree (every error carries its data)
``_settings/``       configuration: ini layers, environment, flags, declared options
``storage/``         where resource bytes live: the ``Storage`` protocol, S3 and local
``_wire/``           Karton's wire format: tasks, resources, filters (queries), archives
``backend/``         the only code that talks to Redis: keys, Lua scripts, connections
``_services/``       producer, consumer, their runtime, logging, and the run loop
``system/``          the system service: router, garbage collector, task admin
``demo/``            a small classifier pipeline with shipped samples
``cli/``, ``fastapi``, ``testing``   the edges: command line, FastAPI, test kit
===================  ===================================================================
"""

import inspect as _inspect

from ._errors import (
    BackendError,
    BackendFullError,
    BackendUnavailableError,
    BindInUseError,
    ConcurrencyControlled,
    ConfigError,
    InvalidIdentityError,
    InvalidTaskError,
    KartonError,
    PartialDeleteError,
    QueryError,
    ResourceNotFoundError,
    Retry,
    StorageError,
    TaskTimeoutError,
    UnknownBindError,
    UnknownTaskError,
    UnsafeArchiveError,
)
from ._services._blocking import to_process, to_thread
from ._services._concurrency import ConcurrencyControlType
from ._services._consumer import Consumer
from ._services._inspect import DeploymentState
from ._services._karton import Karton
from ._services._log_consumer import LogConsumer
from ._services._producer import Producer
from ._services._runtime import Runtime
from ._settings._config import Config, Option
from ._version import __version__
from ._wire._resource import LocalResource, RemoteResource, ResourceBase
from ._wire._task import Task, TaskPriority, TaskState, get_current_task
from .system import SystemService

Resource = LocalResource

__all__ = [
    "BackendError",
    "BackendFullError",
    "BackendUnavailableError",
    "BindInUseError",
    "ConcurrencyControlType",
    "ConcurrencyControlled",
    "Config",
    "ConfigError",
    "Consumer",
    "DeploymentState",
    "InvalidIdentityError",
    "InvalidTaskError",
    "Karton",
    "KartonError",
    "LocalResource",
    "LogConsumer",
    "Option",
    "PartialDeleteError",
    "Producer",
    "QueryError",
    "RemoteResource",
    "Resource",
    "ResourceBase",
    "ResourceNotFoundError",
    "Retry",
    "Runtime",
    "StorageError",
    "SystemService",
    "Task",
    "TaskPriority",
    "TaskState",
    "TaskTimeoutError",
    "UnknownBindError",
    "UnknownTaskError",
    "UnsafeArchiveError",
    "__version__",
    "get_current_task",
    "to_process",
    "to_thread",
]

# Reprs, tracebacks and pickles name the public path (``asynckarton.Task``), not the
# private module that defines the object; pickling still works because every rewritten
# name is an attribute of this module.  Classes with class-level annotations (Consumer,
# SystemService, Option) keep their module: ``typing.get_type_hints`` resolves those
# annotations in the namespace ``__module__`` names, for them and their subclasses.
for _name in __all__:
    _value = globals()[_name]
    if not _name.startswith("__") and not (
        isinstance(_value, type) and _inspect.get_annotations(_value)
    ):
        _value.__module__ = __name__
del _name, _value
