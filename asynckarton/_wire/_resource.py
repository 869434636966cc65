"""Resources: files attached to tasks, stored in S3 (or a directory) and passed by reference.

Wire format (docs/wire-format.md), inside ``{"__karton_resource__": {...}}``::

    {"uid": str, "name": str, "bucket": str | None, "size": int,
     "metadata": {..., "sha256": hex}, "flags": ["Directory"]?, "sha256": hex | None}

Differences from karton-core, all invisible on the wire:

* Nothing blocks the event loop. Constructors do no I/O and no hashing; the SHA-256 of a
  file is computed while it uploads (one read pass instead of Karton's two), or earlier by
  :meth:`LocalResource.prepare`. Zipping, extraction and file access run in threads.
* Large files stream: multipart upload, chunked download, ranged reads.
* Directory archives are extracted safely (see :mod:`asynckarton._wire._archive`).
* Optional content-addressed deduplication: the object key is the SHA-256 of the content,
  so a second upload of the same bytes is a single existence check. Karton's GC deletes
  any unreferenced object in the default bucket whatever its key, so deduplicated objects
  live exactly as long as some task references them, as any other resource does. Call
  :meth:`LocalResource.prepare` (``deduplicate=True``) *before* the task is declared: the
  uid then already is the digest, and Karton's "declare, then upload" GC invariant holds.
"""

from __future__ import annotations

import io
import os
import shutil
import tempfile
import uuid
import zipfile
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, BinaryIO, Self

import anyio

from asynckarton._errors import InvalidTaskError, StorageError
from asynckarton._wire._archive import safe_extract, zip_directory_to
from asynckarton.storage._base import Source, Storage
from asynckarton.storage._io import hash_source, sha256_bytes

__all__ = [
    "DIRECTORY_FLAG",
    "RESOURCE_KEY",
    "LocalResource",
    "RemoteResource",
    "ResourceBase",
    "resource_from_wire",
    "resource_to_wire",
]

RESOURCE_KEY = "__karton_resource__"
"""The key that marks a resource inside a task payload."""
DIRECTORY_FLAG = "Directory"
"""The flag of zipped-directory resources (kept for Karton 3.x services)."""

_INLINE_HASH_LIMIT = 64 << 10  # below this, hashing on the loop is cheaper than a thread hop
_PUT_BYTES_LIMIT = 16 << 20  # larger contents go through put_file (multipart, streaming)
_GiB = 1 << 30


class ResourceBase:
    """What local and remote resources share: identity, metadata and the wire format.

    Attributes:
        name: the resource's file name, as the receiving service should see it.
        uid: the object key in the bucket (a uuid4, or the SHA-256 when deduplicated).
        bucket: the bucket; None until a producer assigns its default bucket.
        metadata: free-form JSON metadata; ``metadata["sha256"]`` mirrors :attr:`sha256`.
        size: size in bytes; None until known (a file's size is known after upload).
        flags: Karton flags, e.g. ``["Directory"]``.
    """

    DIRECTORY_FLAG = DIRECTORY_FLAG

    def __init__(
        self,
        name: str,
        *,
        bucket: str | None = None,
        metadata: Mapping[str, Any] | None = None,
        uid: str | None = None,
        sha256: str | None = None,
        size: int | None = None,
        flags: list[str] | None = None,
    ) -> None:
        self.name = name
        self.uid = uid or str(uuid.uuid4())
        self.bucket = bucket
        self.metadata: dict[str, Any] = dict(metadata or {})
        if sha256 is not None:
            self.metadata["sha256"] = sha256
        self.size = size
        self.flags = list(flags or [])

    @property
    def sha256(self) -> str | None:
        """Hex SHA-256 of the content, when known (stored in ``metadata["sha256"]``)."""
        value = self.metadata.get("sha256")
        return str(value) if value is not None else None

    @sha256.setter
    def sha256(self, value: str | None) -> None:
        self.metadata["sha256"] = value

    @property
    def is_directory(self) -> bool:
        """Whether this is a zipped directory (it carries the ``"Directory"`` flag)."""
        return DIRECTORY_FLAG in self.flags

    def to_dict(self) -> dict[str, Any]:
        """The inner wire dict (what goes under ``"__karton_resource__"``)."""
        return {
            "uid": self.uid,
            "name": self.name,
            "bucket": self.bucket,
            "size": self.size,
            "metadata": {**self.metadata, "sha256": self.sha256},
            "flags": list(self.flags),
            "sha256": self.sha256,
        }

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(name={self.name!r}, uid={self.uid!r}, "
            f"bucket={self.bucket!r}, size={self.size!r})"
        )


class LocalResource(ResourceBase):
    """A resource a producer is about to upload: bytes, a file path, or an open file.

    Args:
        name: the resource name.
        content: the bytes (``str`` is UTF-8 encoded).
        path: a file to upload instead; read only at :meth:`upload`/:meth:`prepare`.
        fd: an open binary file instead; read from offset 0 when seekable (as Karton
            does), else from its current position, once. The caller keeps ownership. An
            ``int`` (as ``os.open`` returns) is wrapped here, without taking ownership.
        bucket: the bucket; None means the producer's default bucket.
        metadata: metadata sent along; ``sha256`` is filled in by the upload.
        uid: the object key; a uuid4 by default (the digest when deduplicated).
        sha256: the digest if already known; the upload replaces it with the one it
            computes (a wrong digest never reaches the wire).
        flags: Karton flags.
        deduplicate: upload under the content's SHA-256 and skip the upload when an object
            with that key already exists (see the module docstring). None (the default)
            leaves it to the producer's ``[asynckarton] deduplicate``; off elsewhere.

    Raises:
        ValueError: not exactly one of ``content``, ``path`` and ``fd`` was given.
    """

    def __init__(
        self,
        name: str,
        content: bytes | str | None = None,
        *,
        path: str | os.PathLike[str] | None = None,
        fd: BinaryIO | int | None = None,
        bucket: str | None = None,
        metadata: Mapping[str, Any] | None = None,
        uid: str | None = None,
        sha256: str | None = None,
        flags: list[str] | None = None,
        deduplicate: bool | None = None,
    ) -> None:
        given = [
            label
            for label, value in (("content", content), ("path", path), ("fd", fd))
            if value is not None
        ]
        if len(given) != 1:
            raise ValueError(
                "LocalResource needs exactly one of content, path or fd; "
                + (f"got {' and '.join(given)}" if given else "got none")
            )
        data = content.encode() if isinstance(content, str) else content
        super().__init__(
            name,
            bucket=bucket,
            metadata=metadata,
            uid=uid,
            sha256=sha256,
            size=len(data) if data is not None else None,
            flags=flags,
        )
        self._content = data
        self.path = os.fspath(path) if path is not None else None
        if isinstance(fd, int):  # an OS-level descriptor: read it through a file object
            fd = os.fdopen(fd, "rb", closefd=False)
        self.fd: BinaryIO | None = fd
        self.deduplicate = deduplicate
        self._owns_fd = False
        self._hashed = False  # whether sha256 was computed here (a given one is not trusted)

    @classmethod
    async def from_directory(
        cls,
        name: str,
        directory_path: str | os.PathLike[str],
        *,
        compression: int = zipfile.ZIP_DEFLATED,
        in_memory: bool = False,
        bucket: str | None = None,
        metadata: Mapping[str, Any] | None = None,
        uid: str | None = None,
        deduplicate: bool | None = None,
    ) -> Self:
        """Zip a directory (in a worker thread) into a ``"Directory"`` resource.

        The archive goes to an anonymous temporary file, closed after the upload, or to
        memory with ``in_memory=True``. Member names are relative to ``directory_path``,
        as karton-core writes them.

        Raises:
            NotADirectoryError: ``directory_path`` is not a directory.
        """
        archive = await anyio.to_thread.run_sync(
            lambda: zip_directory_to(directory_path, compression, in_memory=in_memory)
        )
        options: dict[str, Any] = {
            "bucket": bucket,
            "metadata": metadata,
            "uid": uid,
            "flags": [DIRECTORY_FLAG],
            "deduplicate": deduplicate,
        }
        if isinstance(archive, io.BytesIO):
            return cls(name, archive.getvalue(), **options)
        resource = cls(name, fd=archive, **options)
        resource._owns_fd = True
        return resource

    @property
    def content(self) -> bytes:
        """The bytes of a content-backed resource.

        Raises:
            RuntimeError: the resource is backed by a file (read it off the loop instead).
        """
        if self._content is None:
            raise RuntimeError(
                f"LocalResource {self.name!r} is backed by a file, not bytes: read "
                f"{self.path or 'its fd'} with anyio (e.g. anyio.Path.read_bytes)"
            )
        return self._content

    async def prepare(self, *, deduplicate: bool | None = None) -> None:
        """Compute :attr:`sha256` and :attr:`size` now, without uploading.

        One streaming pass in a worker thread (a given ``sha256`` is not trusted). With
        deduplication the uid becomes the digest: producers call this before declaring
        the task so the declared task already references the final object key.
        """
        dedup = self.deduplicate if deduplicate is None else deduplicate
        if not self._hashed:
            if self._content is not None:
                self.sha256 = await _sha256_of(self._content)
                self.size = len(self._content)
            else:
                source = await self._rewound_source()
                result = await anyio.to_thread.run_sync(hash_source, source)
                self.sha256, self.size = result.sha256, result.size
            self._hashed = True
        if dedup:
            self.uid = str(self.sha256)

    async def upload(
        self, storage: Storage, *, bucket: str | None = None, deduplicate: bool | None = None
    ) -> None:
        """Upload the content and record its :attr:`sha256` and :attr:`size`.

        Args:
            storage: where to upload.
            bucket: used (and stored in :attr:`bucket`) when the resource has none.
            deduplicate: overrides the constructor's ``deduplicate``.

        Raises:
            ValueError: no bucket at all.
            StorageError: the upload failed, or a file changed while deduplicating.
        """
        if self.bucket is None:
            if bucket is None:
                raise ValueError(f"LocalResource {self.name!r} has no bucket to upload to")
            self.bucket = bucket
        dedup = self.deduplicate if deduplicate is None else deduplicate
        if dedup:
            await self.prepare(deduplicate=True)
            if await storage.find_by_sha256(self.bucket, self.uid) is not None:
                await self._release_fd()
                return
        expected = self.uid if dedup else None
        if self._content is not None and len(self._content) <= _PUT_BYTES_LIMIT:
            if not self._hashed:
                self.sha256 = await _sha256_of(self._content)
                self._hashed = True
            await storage.put_bytes(self.bucket, self.uid, self._content)
        else:
            result = await storage.put_file(self.bucket, self.uid, await self._rewound_source())
            self.sha256, self.size = result.sha256, result.size
            await self._release_fd()
        if expected is not None and self.sha256 != expected:
            raise StorageError(
                f"{self.path or 'file'} changed while uploading resource {self.name!r}: "
                f"hashed {expected}, uploaded {self.sha256}"
            )

    async def _rewound_source(self) -> Source:
        if self._content is not None:  # big bytes stream too: multipart, hashed in a thread
            return io.BytesIO(self._content)
        if self.path is not None:
            return self.path
        fd = self.fd
        assert fd is not None  # the constructor guarantees one source

        def rewind() -> None:
            if fd.seekable():
                fd.seek(0)

        await anyio.to_thread.run_sync(rewind)
        return fd

    async def _release_fd(self) -> None:
        if self._owns_fd and self.fd is not None:
            fd, self.fd = self.fd, None
            with anyio.CancelScope(shield=True):
                await anyio.to_thread.run_sync(fd.close)


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


def resource_to_wire(resource: ResourceBase) -> dict[str, Any]:
    """The wrapped wire form ``{"__karton_resource__": resource.to_dict()}``."""
    return {RESOURCE_KEY: resource.to_dict()}


async def _sha256_of(data: bytes) -> str:
    if len(data) <= _INLINE_HASH_LIMIT:
        return sha256_bytes(data)
    return await anyio.to_thread.run_sync(sha256_bytes, data)


def _temporary_path(suffix: str | None) -> str:
    fd, path = tempfile.mkstemp(suffix=suffix)
    os.close(fd)
    return path
