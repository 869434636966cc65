"""Fixtures shared by the integration tests (the servers are in ``tests/conftest.py``)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from asynckarton.backend import KartonBackend, ServerConnector


@pytest.fixture
async def backend(redis_url: str) -> AsyncIterator[KartonBackend]:
    """A backend on the test redis-server (a module may define its own ``backend``)."""
    backend = KartonBackend(ServerConnector(url=redis_url))
    yield backend
    await backend.aclose()
