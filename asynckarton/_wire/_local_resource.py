"""Local resources: what a producer uploads (see :mod:`._resource` for the design)."""

from __future__ import annotations

import io
import os
import zipfile
from collections.abc import Mapping
from typing import Any, BinaryIO, Self

import anyio

from .._errors import StorageError
from ..storage._base import Source, Storage
from ..storage._io import hash_source
from ._archive import zip_directory_to
from ._resource_base import DIRECTORY_FLAG, ResourceBase, _sha256_of

__all__ = ["LocalResource"]

_PUT_BYTES_LIMIT = 16 << 20  # larger contents go through put_file (multipart, streaming)


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
