"""The system service: router and garbage collector."""

from ._gc import GarbageCollector, GCReport
from ._router import Router
from ._service import SystemService

__all__ = ["GCReport", "GarbageCollector", "Router", "SystemService"]
