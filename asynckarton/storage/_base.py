"""The Storage protocol: where resource bytes live, and the values it hands back.

Two implementations satisfy it: :class:`~asynckarton.storage.S3Storage` (any S3 API: AWS,
MinIO, moto) and :class:`~asynckarton.storage.LocalStorage` (a directory). Both pass the same
contract suite (``tests/integration/test_storage_contract.py``).

Conventions shared by every implementation:

* Byte ranges are **inclusive** at both ends, like an HTTP ``Range: bytes=start-end``
  header: ``get_bytes(b, k, start=0, end=9)`` returns the first ten bytes. ``start=None``
  means 0 and ``end=None`` means "to the last byte". A range starting at or past the end
  of the object yields no bytes rather than an error.
* A missing object raises :class:`~asynckarton.ResourceNotFoundError`; every other failure
  raises :class:`~asynckarton.StorageError` naming the operation, bucket and key.
* Deleting an absent object counts as a success, as it does on S3.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import BinaryIO, Protocol, Self, TypeAlias

Source: TypeAlias = str | os.PathLike[str] | BinaryIO
"""What :meth:`Storage.put_file` accepts: a file path, or a binary file object read from its
current position to its end."""


@dataclass(frozen=True, slots=True)
class UploadResult:
    """What :meth:`Storage.put_file` learnt while streaming the source.

    Attributes:
        sha256: lowercase hex SHA-256 of the bytes uploaded.
        size: number of bytes uploaded.
    """

    sha256: str
    size: int


@dataclass(frozen=True, slots=True)
class ObjectVersion:
    """One entry of a bucket listing: an object version or a delete marker.

    Attributes:
        key: the object key (a resource uid).
        version_id: the S3 version id; ``"null"`` for objects written while versioning was
            off, None where the storage has no versions (:class:`LocalStorage`).
        is_delete_marker: True for an S3 delete marker (a tombstone, not data).
        last_modified: modification time, seconds since the epoch.
    """

    key: str
    version_id: str | None
    is_delete_marker: bool
    last_modified: float


class Storage(Protocol):
    """Where resource bytes live. Implemented by ``S3Storage`` and ``LocalStorage``.

    A storage is an async context manager: open it with ``async with`` (or ``__aenter__``)
    before use and close it with ``aclose``. Constructors do no I/O.
    """

    async def __aenter__(self) -> Self:
        """Open connections; return the storage itself."""
        ...

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Close the storage (see :meth:`aclose`)."""
        ...

    async def aclose(self) -> None:
        """Release connections. Safe to call twice."""
        ...

    async def ensure_bucket(self, bucket: str, *, create: bool) -> bool:
        """Tell whether ``bucket`` exists, creating it when missing and ``create`` is set.

        Returns:
            True when the bucket already existed, False when it was missing (even if it has
            just been created), matching Karton's ``check_bucket_exists``.
        """
        ...

    async def put_bytes(self, bucket: str, key: str, data: bytes) -> None:
        """Store ``data`` under ``key``, replacing any previous object."""
        ...

    async def put_file(self, bucket: str, key: str, source: Source) -> UploadResult:
        """Stream a file into ``key`` and hash it in the same pass.

        The source is read in chunks in a worker thread, so memory stays bounded whatever
        its size. Large sources go up as a multipart upload with parallel parts.
        """
        ...

    async def get_bytes(
        self, bucket: str, key: str, *, start: int | None = None, end: int | None = None
    ) -> bytes:
        """Read the whole object, or the inclusive byte range ``start..end``."""
        ...

    def iter_chunks(
        self,
        bucket: str,
        key: str,
        *,
        chunk_size: int = 1 << 20,
        start: int | None = None,
        end: int | None = None,
    ) -> AsyncIterator[bytes]:
        """Stream the object (or an inclusive range) as chunks of exactly ``chunk_size``
        bytes, except the last one."""
        ...

    async def download_to_file(self, bucket: str, key: str, path: str | os.PathLike[str]) -> None:
        """Stream the object to ``path`` in constant memory, replacing the file."""
        ...

    async def exists(self, bucket: str, key: str) -> bool:
        """Tell whether ``key`` exists in ``bucket``."""
        ...

    def list_object_versions(self, bucket: str) -> AsyncIterator[ObjectVersion]:
        """List every object version and delete marker in ``bucket``, page by page."""
        ...

    async def delete_objects(
        self,
        bucket: str,
        items: Sequence[ObjectVersion | str],
        *,
        delete_null_versions: bool = False,
    ) -> int:
        """Delete objects (by key) or object versions (by ``ObjectVersion``) in batches.

        A version id of ``"null"`` is sent only when ``delete_null_versions`` is set (some
        S3 servers need it while versioning is suspended, others refuse it when versioning
        was never enabled: Karton's ``enable_null_version_deletion``).

        Returns:
            The number of entries the storage reported deleted.

        Raises:
            PartialDeleteError: some entries could not be deleted (the rest were).
        """
        ...

    async def find_by_sha256(self, bucket: str, sha256: str) -> str | None:
        """Return the key of a deduplicated object with this content hash, or None.

        Deduplicated objects are stored under their lowercase hex SHA-256 as the key, so
        this is one existence check (see :meth:`LocalResource.upload
        <asynckarton._wire._resource.LocalResource.upload>`).
        """
        ...
