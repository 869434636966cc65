"""Streaming uploads for S3Storage: one PUT for small sources, parallel multipart above.

The source is read once, front to back, in worker threads through a
:class:`~asynckarton.storage._io.HashingReader`, so the SHA-256 and size come out of the
same pass that feeds the upload. Memory stays bounded: a part is read only after a slot
is free, so at most ``max_concurrency`` parts exist at once (each briefly twice: botocore
wraps the bytes in a ``BytesIO`` that aiohttp copies), i.e. about
``2 * part_size * max_concurrency`` (64 MiB with the defaults).
"""

from __future__ import annotations

import logging
import math
from typing import TYPE_CHECKING

import anyio

from asynckarton._errors import StorageError
from asynckarton.storage._io import HashingReader
from asynckarton.storage._s3calls import S3Calls

if TYPE_CHECKING:
    from types_aiobotocore_s3.type_defs import CompletedPartTypeDef


log = logging.getLogger(__name__)

_MiB = 1 << 20
_MAX_PARTS = 10_000  # S3's limit per multipart upload
_ABORT_TIMEOUT = 30.0


class S3Upload:
    """One ``put_file`` call: decides between a PUT and a multipart upload, and runs it."""

    def __init__(self, storage: S3Calls, bucket: str, key: str, reader: HashingReader) -> None:
        self._storage = storage
        self._bucket = bucket
        self._key = key
        self._reader = reader

    async def run(self, size: int | None) -> None:
        """Upload everything ``reader`` yields; ``size`` is the source size when known.

        A source of unknown size is buffered up to ``multipart_threshold`` bytes to find
        out which kind of upload it needs; a known large one starts multipart at once.
        """
        storage = self._storage
        part_size = self._part_size_for(size)
        head: list[bytes] = []
        if size is None or size <= storage.multipart_threshold:
            head, complete = await self._read_head(part_size)
            if complete:
                await storage.put_bytes(self._bucket, self._key, b"".join(head))
                return
        await self._multipart(head, part_size)

    def _part_size_for(self, size: int | None) -> int:
        """The configured part size, raised (in whole MiB) when 10,000 parts would not do."""
        part_size = self._storage.part_size
        if size is None or size <= part_size * _MAX_PARTS:
            return part_size
        return math.ceil(size / _MAX_PARTS / _MiB) * _MiB

    async def _read(self, part_size: int) -> bytes:
        return await anyio.to_thread.run_sync(self._reader.read, part_size)

    async def _read_head(self, part_size: int) -> tuple[list[bytes], bool]:
        """Read until past the threshold or the end; True when the end came first."""
        chunks: list[bytes] = []
        total = 0
        while chunk := await self._read(part_size):
            chunks.append(chunk)
            total += len(chunk)
            if total > self._storage.multipart_threshold:
                return chunks, False
        return chunks, True

    async def _multipart(self, head: list[bytes], part_size: int) -> None:
        storage, client = self._storage, self._storage._client
        bucket, key = self._bucket, self._key
        created = await storage._call(
            "create_multipart_upload",
            bucket,
            key,
            client.create_multipart_upload,
            Bucket=bucket,
            Key=key,
        )
        upload_id = created["UploadId"]
        try:
            parts = await self._upload_parts(upload_id, head, part_size)
            await storage._call(
                "complete_multipart_upload",
                bucket,
                key,
                client.complete_multipart_upload,
                Bucket=bucket,
                Key=key,
                UploadId=upload_id,
                MultipartUpload={"Parts": parts},
            )
        except BaseException:
            await self._abort(upload_id)
            raise

    async def _abort(self, upload_id: str) -> None:
        # Shielded so that a cancelled put_file still cleans up; bounded so that an
        # unreachable server cannot hold the cancellation forever.
        storage, bucket, key = self._storage, self._bucket, self._key
        with anyio.move_on_after(_ABORT_TIMEOUT, shield=True):
            try:
                await storage._call(
                    "abort_multipart_upload",
                    bucket,
                    key,
                    storage._client.abort_multipart_upload,
                    Bucket=bucket,
                    Key=key,
                    UploadId=upload_id,
                )
            except StorageError as exc:  # the original failure matters more
                log.warning("could not abort multipart upload %s of %r: %s", upload_id, key, exc)

    async def _upload_parts(
        self, upload_id: str, head: list[bytes], part_size: int
    ) -> list[CompletedPartTypeDef]:
        """Read parts in order and upload up to ``max_concurrency`` of them at once.

        A slot is taken *before* a part is read, which bounds memory. The first part that
        fails for good cancels the others and is raised as is.
        """
        storage, bucket, key = self._storage, self._bucket, self._key
        etags: dict[int, str] = {}
        errors: list[StorageError] = []
        slots = anyio.Semaphore(storage.max_concurrency)
        pending = iter(head)

        async def send(number: int, body: bytes) -> None:
            try:
                reply = await storage._call(
                    "upload_part",
                    bucket,
                    key,
                    storage._client.upload_part,
                    Bucket=bucket,
                    Key=key,
                    UploadId=upload_id,
                    PartNumber=number,
                    Body=body,
                )
                etags[number] = reply["ETag"]
            except StorageError as exc:
                errors.append(exc)
                tg.cancel_scope.cancel()
            finally:
                slots.release()

        async with anyio.create_task_group() as tg:
            number = 0
            while True:
                await slots.acquire()
                body = next(pending, None) or await self._read(part_size)
                if not body:
                    slots.release()
                    break
                number += 1
                tg.start_soon(send, number, body)
        if errors:
            raise errors[0]
        return [{"PartNumber": n, "ETag": etags[n]} for n in sorted(etags)]
