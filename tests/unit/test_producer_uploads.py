"""How many resource uploads one ``send_tasks`` runs at once: small contents vs streams."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import anyio
import pytest

from asynckarton import LocalResource, Producer, Runtime, Task, testing
from asynckarton._services import _producer
from asynckarton.backend import EmbeddedConnector
from asynckarton.storage import LocalStorage, UploadResult

pytestmark = pytest.mark.anyio


class SlowStorage(LocalStorage):
    """A local storage whose uploads take a while and which records the peak in flight."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.in_flight = 0
        self.peak = 0

    async def _slowly(self) -> None:
        self.in_flight += 1
        self.peak = max(self.peak, self.in_flight)
        await anyio.sleep(0.01)
        self.in_flight -= 1

    async def put_bytes(self, bucket: str, key: str, data: bytes) -> None:
        await self._slowly()
        await super().put_bytes(bucket, key, data)

    async def put_file(self, bucket: str, key: str, source: Any) -> UploadResult:
        await self._slowly()
        return await super().put_file(bucket, key, source)


async def peak_uploads(tmp_path: Path, resources: list[LocalResource]) -> int:
    storage = SlowStorage(tmp_path / "objects")
    runtime = Runtime(EmbeddedConnector(), storage, bucket="b", create_bucket=True)
    config = testing.embedded_config(tmp_path / "cfg")
    config.set("logging", "enable_publish", "0")
    async with runtime, Producer(config, "test.p", runtime=runtime) as producer:
        await producer.send_tasks(Task({"type": "x"}, payload={"r": r}) for r in resources)
    return storage.peak


async def test_small_contents_upload_32_at_once(tmp_path: Path) -> None:
    resources = [LocalResource(f"r{i}", b"x" * 4096) for i in range(100)]
    assert await peak_uploads(tmp_path, resources) == _producer.SMALL_UPLOAD_CONCURRENCY == 32


async def test_files_and_large_contents_upload_8_at_once(tmp_path: Path) -> None:
    files = []
    for i in range(20):
        path = tmp_path / f"f{i}"
        path.write_bytes(b"y" * 10)
        files.append(LocalResource(f"f{i}", path=path))
    large = [LocalResource(f"l{i}", b"z" * (_producer.SMALL_UPLOAD + 1)) for i in range(20)]
    assert await peak_uploads(tmp_path, [*files, *large]) == _producer.UPLOAD_CONCURRENCY == 8
