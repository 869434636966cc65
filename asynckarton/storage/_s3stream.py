"""Resumable streaming GETs for S3Storage.

A long download that loses its connection halfway should not start over: the reader
re-issues the GET with ``Range: bytes=<next byte>-`` and ``If-Match: <ETag>`` so the
pieces are guaranteed to come from the same object version.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

import anyio

from asynckarton._errors import StorageError
from asynckarton.storage._s3calls import S3Calls
from asynckarton.storage._s3errors import (
    ClientError,
    backoff_delay,
    classify,
    error_code,
    http_status,
)

if TYPE_CHECKING:
    from types_aiobotocore_s3.type_defs import GetObjectRequestTypeDef


_READ_SIZE = 1 << 18  # what one body.read() asks aiohttp for


class S3Reader:
    """One streaming read of ``key`` between inclusive offsets ``first`` and ``last``."""

    def __init__(
        self, storage: S3Calls, bucket: str, key: str, first: int, last: int | None
    ) -> None:
        self._storage = storage
        self._bucket = bucket
        self._key = key
        self._offset = first
        self._last = last
        self._etag: str | None = None
        self._failures = 0

    async def chunks(self, chunk_size: int) -> AsyncIterator[bytes]:
        """Yield chunks of exactly ``chunk_size`` bytes (the last may be shorter)."""
        buffer = bytearray()
        while (body := await self._open()) is not None:
            try:
                while data := await self._read(body):
                    buffer += data
                    while len(buffer) >= chunk_size:
                        with memoryview(buffer) as view:
                            chunk = bytes(view[:chunk_size])
                        del buffer[:chunk_size]
                        yield chunk
            finally:
                body.close()
            if data is not None:  # a clean end of stream, not a dropped connection
                break
            await anyio.sleep(backoff_delay(self._failures, base=self._storage.backoff))
        if buffer:
            yield bytes(buffer)

    async def _open(self) -> Any:
        """GET from the current offset; None when the range starts past the object's end."""
        params: GetObjectRequestTypeDef = {"Bucket": self._bucket, "Key": self._key}
        if self._offset > 0 or self._last is not None:
            end = "" if self._last is None else str(self._last)
            params["Range"] = f"bytes={self._offset}-{end}"
        if self._etag is not None:
            params["IfMatch"] = self._etag
        client = self._storage._client

        async def get() -> Any:
            try:
                reply = await client.get_object(**params)
            except ClientError as exc:
                if http_status(exc) == 416 or error_code(exc) == "InvalidRange":
                    return None
                if error_code(exc) == "PreconditionFailed":
                    raise StorageError(
                        f"S3 object {self._key!r} in bucket {self._bucket!r} changed while "
                        "it was being read"
                    ) from exc
                raise
            self._etag = reply.get("ETag")
            return reply["Body"]

        return await self._storage._call("get_object", self._bucket, self._key, get)

    async def _read(self, body: Any) -> bytes | None:
        """The next bytes of ``body``: b"" at its end, None when the connection dropped
        (and a retry is left), so the caller reopens from the current offset."""
        try:
            data: bytes = await body.read(_READ_SIZE)
        except Exception as exc:
            failure = classify(exc, "get_object", self._bucket, self._key)
            if failure is None or not failure.transient:
                raise
            self._failures += 1
            if self._failures >= self._storage.attempts:
                raise failure.error from exc
            return None
        self._offset += len(data)
        return data
