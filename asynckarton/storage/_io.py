"""Blocking file helpers shared by the storages and resources.

Every function here blocks: callers run them through ``anyio.to_thread.run_sync`` so the
event loop never waits on a disk or on hashing.
"""

from __future__ import annotations

import hashlib
import os
import re
import stat
from typing import BinaryIO

from asynckarton.storage._base import Source, UploadResult

_SHA256 = re.compile(r"[0-9a-f]{64}")


class HashingReader:
    """Reads a binary stream front to back, hashing and counting each byte exactly once.

    Reads happen in worker threads, one at a time, so the digest sees the bytes in order.
    """

    def __init__(self, stream: BinaryIO) -> None:
        self._stream = stream
        self._hash = hashlib.sha256()
        self._size = 0

    def read(self, size: int) -> bytes:
        """Return the next ``size`` bytes, fewer only at end of stream.

        Raw or pipe-like streams may return short reads; they are retried until the
        buffer is full, so chunk boundaries never depend on the source type.
        """
        parts: list[bytes] = []
        wanted = size
        while wanted > 0:
            data = self._stream.read(wanted)
            if not data:
                break
            parts.append(data)
            wanted -= len(data)
        chunk = parts[0] if len(parts) == 1 else b"".join(parts)
        self._hash.update(chunk)
        self._size += len(chunk)
        return chunk

    def result(self) -> UploadResult:
        """The digest and size of everything read so far."""
        return UploadResult(sha256=self._hash.hexdigest(), size=self._size)


def open_source(source: Source) -> tuple[BinaryIO, bool]:
    """Return a readable binary stream for ``source`` and whether the caller must close it."""
    if isinstance(source, str | os.PathLike):
        return open(source, "rb"), True
    return source, False


def remaining_size(stream: BinaryIO) -> int | None:
    """Bytes left to read in ``stream`` when it is a regular file, else None."""
    try:
        info = os.fstat(stream.fileno())
        if not stat.S_ISREG(info.st_mode):
            return None
        return max(info.st_size - stream.tell(), 0)
    except (OSError, AttributeError, ValueError):
        # BytesIO and friends have no descriptor: their size is simply unknown here.
        return None


def hash_source(source: Source, chunk_size: int = 1 << 20) -> UploadResult:
    """Hash a whole source in one streaming pass (a path, or a stream from its position)."""
    stream, owned = open_source(source)
    try:
        reader = HashingReader(stream)
        while reader.read(chunk_size):
            pass
        return reader.result()
    finally:
        if owned:
            stream.close()


def sha256_bytes(data: bytes) -> str:
    """Hex SHA-256 of ``data`` (hashlib releases the GIL above 2 KiB, so threads help)."""
    return hashlib.sha256(data).hexdigest()


def check_range(start: int | None, end: int | None) -> tuple[int, int | None]:
    """Validate an inclusive byte range and return it with ``start`` defaulted to 0.

    Raises:
        ValueError: a negative start, or an end before the start.
    """
    first = 0 if start is None else start
    if first < 0:
        raise ValueError(f"range start must be >= 0, got {first}")
    if end is not None and end < first:
        raise ValueError(f"range end {end} is before its start {first} (end is inclusive)")
    return first, end


def check_sha256(sha256: str) -> str:
    """Return ``sha256`` when it is 64 lowercase hex digits.

    Raises:
        ValueError: anything else, since it is about to become an object key.
    """
    if not _SHA256.fullmatch(sha256):
        raise ValueError(f"not a lowercase hex SHA-256 digest: {sha256!r}")
    return sha256
