"""The ``asynckarton`` command line: ``asynckarton run|system|demo|tasks|config|version``."""

from ._app import app, main

__all__ = ["app", "main"]
