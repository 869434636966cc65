"""Mistakes in a service class are refused when the service is built, not per task."""

from __future__ import annotations

from typing import Any, ClassVar

import pytest

from asynckarton import Config, Consumer, Karton, Task


def embedded() -> Config:
    config = Config(search_paths=[], environ={})
    config.set("asynckarton", "embedded", "1")
    return config


class SyncPort(Karton):
    """A karton-core service ported without making process async."""

    identity = "test.sync-port"
    filters: ClassVar[list[dict[str, Any]]] = [{"type": "sample"}]

    def process(self, task: Task) -> None:  # type: ignore[override]
        self.send_task(Task({"type": "child"}))  # type: ignore[unused-coroutine]  # the mistake


class DictFilters(Consumer):
    """Filters given as one dict instead of a list of dicts."""

    identity = "test.dict-filters"
    filters = {"type": "sample"}  # type: ignore[assignment]

    async def process(self, task: Task) -> None:
        pass


def test_a_plain_def_process_is_refused_with_porting_advice() -> None:
    with pytest.raises(TypeError) as info:
        SyncPort(embedded())
    message = str(info.value)
    assert "SyncPort.process must be 'async def process(self, task)'" in message
    assert "await self.send_task" in message
    assert "to_thread" in message


def test_filters_that_are_not_a_list_of_dicts_name_the_attribute() -> None:
    with pytest.raises(TypeError) as info:
        DictFilters(embedded())
    message = str(info.value)
    assert "DictFilters.filters must be a list of dicts" in message
    assert "wrap the dict in a list" in message


def test_none_filters_are_refused_too() -> None:
    class NoFilters(Consumer):
        identity = "test.no-filters"
        filters = None  # type: ignore[assignment]

        async def process(self, task: Task) -> None:
            pass

    with pytest.raises(TypeError, match=r"NoFilters\.filters must be a list of dicts"):
        NoFilters(embedded())


def test_an_async_process_with_list_filters_is_accepted() -> None:
    class Fine(Consumer):
        identity = "test.fine"
        filters: ClassVar[list[dict[str, Any]]] = [{"type": "sample"}, {"kind": "!x"}]

        async def process(self, task: Task) -> None:
            pass

    assert Fine(embedded()).identity == "test.fine"
