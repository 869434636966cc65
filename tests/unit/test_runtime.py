"""Runtime: an explicit object; injection, sharing by choice, lifecycle, errors."""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar, Self

import anyio
import pytest
from anyio.abc import TaskStatus

from asynckarton import Config, Consumer, Producer, Runtime, Task, testing
from asynckarton._services._run import _Supervisor
from asynckarton._services._runtime import embedded_server, share_runtimes
from asynckarton.backend import EmbeddedConnector
from asynckarton.storage import LocalStorage

pytestmark = pytest.mark.anyio


class CountingStorage(LocalStorage):
    """A local storage that counts how often it is opened and closed."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.opened = 0
        self.closed = 0

    async def __aenter__(self) -> Self:
        self.opened += 1
        await super().__aenter__()
        return self

    async def aclose(self) -> None:
        self.closed += 1
        await super().aclose()


class Idle(Consumer):
    identity = "test.idle"
    filters: ClassVar[list[dict[str, object]]] = [{"type": "never"}]

    async def process(self, task: Task) -> None:
        raise AssertionError("no task is sent to it")


def quiet_config(data_dir: Path) -> Config:
    config = testing.embedded_config(data_dir)
    config.set("logging", "enable_publish", "0")
    return config


def injected(tmp_path: Path) -> tuple[Runtime, EmbeddedConnector, CountingStorage]:
    connector = EmbeddedConnector()
    storage = CountingStorage(tmp_path / "objects")
    return Runtime(connector, storage, bucket="injected", create_bucket=True), connector, storage


async def test_an_injected_backend_and_storage_are_what_the_service_uses(tmp_path: Path) -> None:
    runtime, connector, storage = injected(tmp_path)
    async with (
        runtime,
        Producer(quiet_config(tmp_path / "cfg"), "test.p", runtime=runtime) as producer,
    ):
        assert producer.runtime is runtime
        assert producer.storage is storage
        assert producer.backend.connector is connector
        task = Task({"type": "x"})
        await producer.send_task(task)
        # the task went to the injected in-process Redis, not the config's embedded one
        assert await connector.pool().exists(f"karton.task:{task.uid}") == 1
        fallback = embedded_server(tmp_path / "cfg")
        assert fallback is not connector.server
    assert (tmp_path / "objects" / "injected").is_dir()  # create_bucket=True made it
    assert (storage.opened, storage.closed) == (1, 1)


async def test_services_given_one_runtime_share_it(tmp_path: Path) -> None:
    runtime, _, storage = injected(tmp_path)
    config = quiet_config(tmp_path)
    async with (
        runtime,
        Producer(config, "test.p", runtime=runtime) as producer,
        Idle(config, runtime=runtime) as consumer,
    ):
        assert producer.backend is consumer.backend
        assert producer.backend.redis is consumer.backend.redis  # one pool
        assert runtime.users == 3
    assert storage.opened == 1


async def test_equal_configs_and_no_runtime_give_separate_pools(tmp_path: Path) -> None:
    config = quiet_config(tmp_path)
    async with Producer(config, "test.p") as first, Producer(config, identity="other") as second:
        assert first.runtime is not second.runtime
        assert first.backend.redis is not second.backend.redis
        assert first.storage is not second.storage
        # ...yet on the embedded default both reach this process's one in-process Redis
        await first.backend.redis.set("probe", "seen")
        assert await second.backend.redis.get("probe") == "seen"


async def test_runtime_closes_after_its_last_user(tmp_path: Path) -> None:
    runtime, _, storage = injected(tmp_path)
    config = quiet_config(tmp_path)
    first = Producer(config, "test.first", runtime=runtime)
    second = Producer(config, identity="second", runtime=runtime)
    await first.__aenter__()
    await second.__aenter__()
    await first.aclose()
    assert not runtime.closed
    assert runtime.users == 1
    assert await second.backend.redis.ping()
    await second.aclose()
    assert runtime.closed
    assert (storage.opened, storage.closed) == (1, 1)
    with pytest.raises(RuntimeError, match="closed"):
        await first.__aenter__()


async def test_a_service_without_runtime_closes_its_own(tmp_path: Path) -> None:
    async with Producer(quiet_config(tmp_path), "test.p") as producer:
        own = producer.runtime
        assert own.users == 1
    assert own.closed


async def test_using_an_unopened_runtime_or_service_is_an_error(tmp_path: Path) -> None:
    runtime, _, _ = injected(tmp_path)
    with pytest.raises(RuntimeError, match="not open"):
        _ = runtime.backend
    with pytest.raises(RuntimeError, match="not open"):
        _ = runtime.storage
    producer = Producer(quiet_config(tmp_path), "test.p", runtime=runtime)
    with pytest.raises(RuntimeError, match="is not open"):
        _ = producer.backend
    async with producer:
        with pytest.raises(RuntimeError, match="is open"):
            producer.use_runtime(None)
    with pytest.raises(RuntimeError, match="closed"):
        _ = runtime.backend


def test_from_config_does_no_io(tmp_path: Path) -> None:
    runtime = Runtime.from_config(quiet_config(tmp_path / "data"))
    assert runtime.embedded
    assert runtime.users == 0
    assert not (tmp_path / "data").exists()


async def test_share_runtimes_groups_by_connection_settings(tmp_path: Path) -> None:
    same = quiet_config(tmp_path / "a")
    other = quiet_config(tmp_path / "b")
    own, _, _ = injected(tmp_path)
    services = [
        Producer(same, "test.p"),
        Idle(same),
        Producer(other, identity="elsewhere"),
        Producer(same, identity="mine", runtime=own),
    ]
    async with own, share_runtimes(services) as opened:
        assert len(opened) == 2
        given = [service.given_runtime for service in services]
        assert given[0] is given[1]
        assert given[2] is not given[0]
        assert given[3] is own
        assert all(r is not None and r.users == 1 for r in opened)
    assert [service.given_runtime for service in services] == [None, None, None, own]
    assert all(r.closed for r in opened)


async def test_pipeline_shares_one_runtime(tmp_path: Path) -> None:
    async with testing.pipeline(Idle, data_dir=tmp_path) as p:
        [consumer] = p.services
        assert p.producer.runtime is consumer.runtime
        assert p.producer.runtime.users == 4  # the pipeline, system, consumer, producer


class OneShot(Producer):
    """A servable that records the runtime it ran with, then returns."""

    seen: ClassVar[list[Runtime]] = []

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        type(self).seen.append(self.runtime)

    def stop(self, *, grace: float | None = None) -> None:
        return None


async def test_serve_forever_shares_one_runtime_per_process(tmp_path: Path) -> None:
    OneShot.seen.clear()
    config = quiet_config(tmp_path)
    supervisor = _Supervisor([OneShot(config, "test.a"), OneShot(config, "test.b")], None)
    await supervisor.serve()
    first, second = OneShot.seen
    assert first is second
    assert first.closed
