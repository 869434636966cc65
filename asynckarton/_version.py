"""The package version (one place, read by the CLI, client names and binds)."""

__version__ = "0.1.0"
