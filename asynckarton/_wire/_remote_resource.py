"""Remote resources: what a consumer receives, read from storage (see :mod:`._resource`)."""

from __future__ import annotations

import io
import os
import shutil
import tempfile
import zipfile
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, BinaryIO, Self

import anyio

from .._errors import InvalidTaskError, StorageError
from ..storage._base import Storage
from ._archive import safe_extract
from ._resource_base import RESOURCE_KEY, ResourceBase

__all__ = ["RemoteResource", "resource_from_wire"]

_GiB = 1 << 30


class RemoteResource(ResourceBase):
    """A resource already in storage, as a consumer receives it.

    Bind it to a storage (``Task`` deserialisation does) to read it. ``download`` keeps
    the bytes in memory (:attr:`content`); the other readers stream.
    """

    def __init__(
        self,
        name: str,
        *,
        bucket: str | None,
        uid: str,
        metadata: Mapping[str, Any] | None = None,
        size: int | None = None,
        sha256: str | None = None,
        flags: list[str] | None = None,
        storage: Storage | None = None,
    ) -> None:
        super().__init__(
            name, bucket=bucket, metadata=metadata, uid=uid, sha256=sha256, size=size, flags=flags
        )
        self._storage = storage
        self._content: bytes | None = None

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], storage: Storage | None = None) -> Self:
        """Read the inner wire dict; a top-level ``sha256`` overrides the metadata's.

        Raises:
            InvalidTaskError: ``uid`` or ``name`` is missing or not a string.
        """
        for field in ("uid", "name"):
            if not isinstance(data.get(field), str):
                raise InvalidTaskError(f"resource spec without a string {field!r}: {dict(data)!r}")
        metadata = dict(data.get("metadata") or {})
        if "sha256" in data:
            metadata["sha256"] = data["sha256"]
        return cls(
            data["name"],
            bucket=data.get("bucket"),
            uid=data["uid"],
            metadata=metadata,
            size=data.get("size"),
            flags=data.get("flags"),
            storage=storage,
        )

    def bind(self, storage: Storage) -> Self:
        """Attach the storage reads go to; returns the resource."""
        self._storage = storage
        return self

    def _where(self) -> tuple[Storage, str]:
        if self._storage is None:
            raise RuntimeError(f"RemoteResource {self.name!r} is not bound to a storage")
        if self.bucket is None:
            raise StorageError(f"RemoteResource {self.name!r} ({self.uid}) has no bucket")
        return self._storage, self.bucket

    # -- in memory ---------------------------------------------------------------------

    def loaded(self) -> bool:
        """Whether :meth:`download` has cached the content."""
        return self._content is not None

    def unload(self) -> None:
        """Drop the cached content."""
        self._content = None

    @property
    def content(self) -> bytes:
        """The cached content.

        Raises:
            RuntimeError: not downloaded yet; ``await resource.download()`` first.
        """
        if self._content is None:
            raise RuntimeError(
                f"RemoteResource {self.name!r} is not loaded: 'await resource.download()' "
                "first, or stream it with iter_chunks() / download_to_file()"
            )
        return self._content

    async def download(self) -> bytes:
        """Fetch the whole object into memory (cached; see :meth:`unload`)."""
        if self._content is None:
            storage, bucket = self._where()
            self._content = await storage.get_bytes(bucket, self.uid)
        return self._content

    async def read_range(self, start: int, end: int) -> bytes:
        """Bytes ``start`` to ``end`` *inclusive* (HTTP Range style)."""
        if self._content is not None:
            if start < 0 or end < start:
                raise ValueError(f"invalid inclusive range {start}-{end}")
            return self._content[start : end + 1]
        storage, bucket = self._where()
        return await storage.get_bytes(bucket, self.uid, start=start, end=end)

    async def iter_chunks(self, chunk_size: int = 1 << 20) -> AsyncIterator[bytes]:
        """Stream the content in ``chunk_size`` pieces (from the cache when loaded)."""
        if self._content is not None:
            for offset in range(0, len(self._content), chunk_size):
                yield self._content[offset : offset + chunk_size]
            return
        storage, bucket = self._where()
        async for chunk in storage.iter_chunks(bucket, self.uid, chunk_size=chunk_size):
            yield chunk

    async def remove(self) -> None:
        """Delete the object (Karton's deprecated ``remove``; GC normally does this)."""
        storage, bucket = self._where()
        await storage.delete_objects(bucket, [self.uid])

    # -- files -------------------------------------------------------------------------

    async def download_to_file(self, path: str | os.PathLike[str]) -> None:
        """Stream the object to ``path`` (written from the cache when loaded)."""
        if self._content is not None:
            await anyio.Path(path).write_bytes(self._content)
            return
        storage, bucket = self._where()
        await storage.download_to_file(bucket, self.uid, path)

    @asynccontextmanager
    async def download_temporary_file(self, suffix: str | None = None) -> AsyncIterator[BinaryIO]:
        """Download to a temporary file and yield it open for reading (``rb``).

        The file is closed and deleted when the block exits. It is a plain blocking file
        (handy for parsers that want one); read large ones via ``anyio.to_thread``.
        """
        path = await anyio.to_thread.run_sync(_temporary_path, suffix)
        try:
            await self.download_to_file(path)
            handle: BinaryIO = await anyio.to_thread.run_sync(open, path, "rb")
            try:
                yield handle
            finally:
                with anyio.CancelScope(shield=True):
                    await anyio.to_thread.run_sync(handle.close)
        finally:
            with anyio.CancelScope(shield=True):
                await anyio.Path(path).unlink(missing_ok=True)

    @asynccontextmanager
    async def zip_file(self) -> AsyncIterator[zipfile.ZipFile]:
        """Yield the content opened as a ``ZipFile`` (over a temporary file, or over the
        cache when loaded). Its methods block: call them through ``anyio.to_thread``."""
        if self._content is not None:
            archive = await anyio.to_thread.run_sync(zipfile.ZipFile, io.BytesIO(self._content))
            with archive:
                yield archive
            return
        async with self.download_temporary_file(suffix=".zip") as handle:
            archive = await anyio.to_thread.run_sync(zipfile.ZipFile, handle)
            with archive:
                yield archive

    async def extract_to_directory(
        self,
        path: str | os.PathLike[str],
        *,
        max_size: int = _GiB,
        max_files: int = 100_000,
    ) -> None:
        """Safely extract a zipped directory resource into ``path`` (created if needed).

        Raises:
            UnsafeArchiveError: a member would land outside ``path``, is a symlink, or the
                archive holds more than ``max_files`` members or ``max_size`` bytes
                (declared or actually decompressed). Nothing is left behind.
        """
        if self._content is not None:
            await anyio.to_thread.run_sync(
                lambda: safe_extract(
                    io.BytesIO(self.content), path, max_size=max_size, max_files=max_files
                )
            )
            return
        async with self.download_temporary_file(suffix=".zip") as handle:
            await anyio.to_thread.run_sync(
                lambda: safe_extract(handle, path, max_size=max_size, max_files=max_files)
            )

    @asynccontextmanager
    async def extract_temporary(
        self, *, max_size: int = _GiB, max_files: int = 100_000
    ) -> AsyncIterator[Path]:
        """Extract into a new temporary directory, yield its path once, then delete it."""
        directory = Path(await anyio.to_thread.run_sync(tempfile.mkdtemp))
        try:
            await self.extract_to_directory(directory, max_size=max_size, max_files=max_files)
            yield directory
        finally:
            with anyio.CancelScope(shield=True):
                await anyio.to_thread.run_sync(shutil.rmtree, directory, True)


def resource_from_wire(data: Mapping[str, Any], storage: Storage | None) -> RemoteResource:
    """Build a :class:`RemoteResource` from its wire dict, wrapped or not.

    Accepts the inner dict as well as ``{"__karton_resource__": {...}}``.
    """
    inner = data.get(RESOURCE_KEY, data)
    if not isinstance(inner, Mapping):
        raise InvalidTaskError(f"malformed resource: {dict(data)!r}")
    return RemoteResource.from_dict(inner, storage)


def _temporary_path(suffix: str | None) -> str:
    fd, path = tempfile.mkstemp(suffix=suffix)
    os.close(fd)
    return path
