"""LocalStorage: resources as files in a directory, for tests, laptops and single hosts.

Layout: ``<root>/<bucket>/<key>``. Bucket names and keys are single path components: no
separators, no ``..``, and no leading dot (dot files are this module's temporary files).
Every write goes to a temporary file in the bucket directory and is renamed into place,
so readers never see half an object. All file I/O runs in worker threads.

It behaves like :class:`~asynckarton.storage.S3Storage` in everything the contract suite
checks; it simply has no object versions (``version_id`` is None) and keeps no metadata.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import AsyncIterator, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from types import TracebackType
from typing import BinaryIO, Self

import anyio

from asynckarton._errors import ResourceNotFoundError, StorageError
from asynckarton.storage._base import ObjectVersion, Source, UploadResult
from asynckarton.storage._io import HashingReader, check_range, check_sha256, open_source

__all__ = ["LocalStorage"]

_COPY_CHUNK = 8 << 20
_LIST_PAGE = 1000


def _check_name(kind: str, name: str) -> str:
    if (
        not name
        or name in (".", "..")
        or name.startswith(".")
        or any(sep in name for sep in ("/", "\\", "\0"))
        or (os.altsep is not None and os.altsep in name)
    ):
        raise StorageError(
            f"invalid {kind} name {name!r} for LocalStorage: "
            "it must be one path component without a leading dot"
        )
    return name


class LocalStorage:
    """Resource storage in a local directory.

    Args:
        root: the directory holding one subdirectory per bucket; created on ``__aenter__``.

    Example:
        >>> async with LocalStorage("/var/lib/karton") as storage:
        ...     await storage.ensure_bucket("karton", create=True)
    """

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)

    def __repr__(self) -> str:
        return f"LocalStorage(root={str(self.root)!r})"

    async def __aenter__(self) -> Self:
        """Create the root directory if needed."""
        await anyio.Path(self.root).mkdir(parents=True, exist_ok=True)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Nothing to release; kept for the Storage protocol."""
        await self.aclose()

    async def aclose(self) -> None:
        """Nothing to release: files are opened and closed per call."""

    # -- paths -------------------------------------------------------------------------

    def _bucket_dir(self, bucket: str) -> Path:
        return self.root / _check_name("bucket", bucket)

    def _object_path(self, bucket: str, key: str) -> Path:
        return self._bucket_dir(bucket) / _check_name("key", key)

    @contextmanager
    def _errors(self, op: str, bucket: str, key: str | None) -> Iterator[None]:
        """Translate OSError into the storage errors S3Storage raises (runs in threads)."""
        try:
            yield
        except FileNotFoundError as exc:
            if not self._bucket_dir(bucket).is_dir():
                raise StorageError(
                    f"local {op} failed: bucket {bucket!r} does not exist under {self.root}"
                ) from exc
            if key is None:
                raise StorageError(f"local {op} on bucket {bucket!r} failed: {exc}") from exc
            raise ResourceNotFoundError(bucket, key) from exc
        except OSError as exc:
            where = f"bucket {bucket!r}" + (f", key {key!r}" if key is not None else "")
            raise StorageError(f"local {op} on {where} failed: {exc}") from exc

    # -- buckets -----------------------------------------------------------------------

    async def ensure_bucket(self, bucket: str, *, create: bool) -> bool:
        """Tell whether the bucket directory exists; create it when asked.

        Returns:
            True when it already existed, False when it was missing.
        """
        directory = anyio.Path(self._bucket_dir(bucket))
        if await directory.is_dir():
            return True
        if create:
            await directory.mkdir(parents=True, exist_ok=True)
        return False

    # -- writes ------------------------------------------------------------------------

    async def put_bytes(self, bucket: str, key: str, data: bytes) -> None:
        """Write ``data`` atomically (temporary file, then rename)."""
        target = self._object_path(bucket, key)

        def write() -> None:
            with self._errors("put_bytes", bucket, None), self._atomic(target) as out:
                out.write(data)

        await anyio.to_thread.run_sync(write)

    async def put_file(self, bucket: str, key: str, source: Source) -> UploadResult:
        """Copy ``source`` in, hashing it in the same pass; 8 MiB per worker-thread hop so
        that a cancellation is noticed between chunks."""
        target = self._object_path(bucket, key)
        stream, owned = await anyio.to_thread.run_sync(open_source, source)
        try:
            out, name = await anyio.to_thread.run_sync(self._create_partial, bucket, target)
            try:
                reader = HashingReader(stream)
                while await anyio.to_thread.run_sync(_pump, reader, out):
                    pass
                await anyio.to_thread.run_sync(out.close)
                await anyio.to_thread.run_sync(os.replace, name, target)
            except BaseException:
                with anyio.CancelScope(shield=True):
                    await anyio.to_thread.run_sync(_discard, out, name)
                raise
            return reader.result()
        finally:
            if owned:
                with anyio.CancelScope(shield=True):
                    await anyio.to_thread.run_sync(stream.close)

    def _create_partial(self, bucket: str, target: Path) -> tuple[BinaryIO, str]:
        with self._errors("put_file", bucket, None):
            fd, name = tempfile.mkstemp(prefix=".tmp-", dir=target.parent)
        return os.fdopen(fd, "wb"), name

    @contextmanager
    def _atomic(self, target: Path) -> Iterator[BinaryIO]:
        fd, name = tempfile.mkstemp(prefix=".tmp-", dir=target.parent)
        try:
            with os.fdopen(fd, "wb") as out:
                yield out
            os.replace(name, target)
        except BaseException:
            Path(name).unlink(missing_ok=True)
            raise

    # -- reads -------------------------------------------------------------------------

    async def get_bytes(
        self, bucket: str, key: str, *, start: int | None = None, end: int | None = None
    ) -> bytes:
        """Read the object or the inclusive range ``start..end``."""
        first, last = check_range(start, end)
        path = self._object_path(bucket, key)

        def read() -> bytes:
            with self._errors("get_bytes", bucket, key), open(path, "rb") as f:
                f.seek(first)
                return f.read(-1 if last is None else last - first + 1)

        return await anyio.to_thread.run_sync(read)

    async def iter_chunks(
        self,
        bucket: str,
        key: str,
        *,
        chunk_size: int = 1 << 20,
        start: int | None = None,
        end: int | None = None,
    ) -> AsyncIterator[bytes]:
        """Stream the object (or an inclusive range) in ``chunk_size`` pieces."""
        first, last = check_range(start, end)
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be positive, got {chunk_size}")
        path = self._object_path(bucket, key)

        def opener() -> BinaryIO:
            with self._errors("iter_chunks", bucket, key):
                f = open(path, "rb")  # noqa: SIM115 - wrapped and closed below
            f.seek(first)
            return f

        async with anyio.wrap_file(await anyio.to_thread.run_sync(opener)) as f:
            left = None if last is None else last - first + 1
            while left is None or left > 0:
                chunk = await f.read(chunk_size if left is None else min(chunk_size, left))
                if not chunk:
                    break
                if left is not None:
                    left -= len(chunk)
                yield chunk

    async def download_to_file(self, bucket: str, key: str, path: str | os.PathLike[str]) -> None:
        """Copy the object to ``path`` (kernel-side copy, constant memory, atomic rename)."""
        source = self._object_path(bucket, key)
        target = Path(path)

        def copy() -> None:
            with self._errors("download_to_file", bucket, key), open(source, "rb") as src:
                fd, name = tempfile.mkstemp(
                    prefix=f".{target.name}.", suffix=".part", dir=target.parent
                )
                try:
                    with os.fdopen(fd, "wb") as out:
                        shutil.copyfileobj(src, out, _COPY_CHUNK)
                    os.replace(name, target)
                except BaseException:
                    Path(name).unlink(missing_ok=True)
                    raise

        await anyio.to_thread.run_sync(copy)

    async def exists(self, bucket: str, key: str) -> bool:
        """Whether the object file exists."""
        return await anyio.Path(self._object_path(bucket, key)).is_file()

    async def find_by_sha256(self, bucket: str, sha256: str) -> str | None:
        """Return ``sha256`` when a deduplicated object with that key exists, else None."""
        key = check_sha256(sha256)
        return key if await self.exists(bucket, key) else None

    # -- listing and deleting ----------------------------------------------------------

    async def list_object_versions(self, bucket: str) -> AsyncIterator[ObjectVersion]:
        """Yield one entry per object (no versions here), stat-ing 1000 files per hop."""
        directory = self._bucket_dir(bucket)

        def names() -> list[str]:
            with self._errors("list_object_versions", bucket, None):
                return sorted(
                    entry.name
                    for entry in os.scandir(directory)
                    if not entry.name.startswith(".") and entry.is_file(follow_symlinks=False)
                )

        def stat_page(page: list[str]) -> list[ObjectVersion]:
            found = []
            for name in page:
                try:
                    mtime = (directory / name).stat().st_mtime
                except FileNotFoundError:  # deleted since the directory was read
                    continue
                found.append(ObjectVersion(name, None, False, mtime))
            return found

        listing = await anyio.to_thread.run_sync(names)
        for offset in range(0, len(listing), _LIST_PAGE):
            page = listing[offset : offset + _LIST_PAGE]
            for version in await anyio.to_thread.run_sync(stat_page, page):
                yield version

    async def delete_objects(
        self,
        bucket: str,
        items: Sequence[ObjectVersion | str],
        *,
        delete_null_versions: bool = False,
    ) -> int:
        """Remove the files behind ``items`` (version ids are meaningless here and ignored).

        Returns:
            ``len(items)``: like S3, deleting an absent object counts as done.
        """
        keys = [item if isinstance(item, str) else item.key for item in items]
        paths = [self._object_path(bucket, key) for key in keys]

        def remove(batch: list[Path]) -> None:
            for path in batch:
                with self._errors("delete_objects", bucket, path.name):
                    path.unlink(missing_ok=True)

        for offset in range(0, len(paths), _LIST_PAGE):
            await anyio.to_thread.run_sync(remove, paths[offset : offset + _LIST_PAGE])
        return len(keys)


def _pump(reader: HashingReader, out: BinaryIO) -> int:
    chunk = reader.read(_COPY_CHUNK)
    out.write(chunk)
    return len(chunk)


def _discard(partial: BinaryIO, name: str) -> None:
    partial.close()
    Path(name).unlink(missing_ok=True)
