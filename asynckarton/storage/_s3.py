"""S3Storage: resources in any S3 API (AWS, MinIO, Ceph, moto) through one aiobotocore client.

Beyond Karton's boto3 usage:

* one client per storage object, opened in ``__aenter__`` and reused by every call;
* ``put_file`` streams: it reads the source once in a worker thread, hashing as it goes, and
  sends large sources as a multipart upload with a few parts in flight, so memory stays
  near ``2 * part_size * max_concurrency`` whatever the file size (``_s3upload``);
* each call is retried with capped exponential backoff on throttling, 5xx and network
  errors; downloads resume from the last byte received instead of starting over;
* a multipart upload that fails or is cancelled is aborted (shielded), leaving no parts
  behind to pay for;
* MinIO-safe settings: path-style addressing and, on botocore >= 1.36, checksums only
  where the API requires them (newer botocore otherwise adds CRC32 trailers old MinIO
  releases reject);
* small objects (``put_bytes``, ``get_bytes``, ``exists`` up to 8 MiB) skip botocore's
  per-call machinery: ``_s3direct`` sends them over aiohttp, signed by botocore's own
  SigV4 signer, with the same errors, retries and checksums (``direct_requests=False``
  sends everything through aiobotocore).

botocore's own retries are switched off so that there is exactly one retry policy.
The session and client settings are built in ``_s3client``.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import AsyncExitStack
from types import TracebackType
from typing import TYPE_CHECKING, Any, ParamSpec, Protocol, Self, TypeVar

import anyio

from asynckarton._errors import PartialDeleteError
from asynckarton.storage._base import ObjectVersion, Source, UploadResult
from asynckarton.storage._io import (
    HashingReader,
    check_range,
    check_sha256,
    open_source,
    remaining_size,
)
from asynckarton.storage._s3client import CONNECT_TIMEOUT, READ_TIMEOUT, client_config, new_session
from asynckarton.storage._s3direct import DirectS3, _Delegate
from asynckarton.storage._s3errors import (
    ClientError,
    backoff_delay,
    classify,
    error_code,
    http_status,
)
from asynckarton.storage._s3stream import S3Reader
from asynckarton.storage._s3upload import S3Upload

if TYPE_CHECKING:
    from types_aiobotocore_s3 import S3Client
    from types_aiobotocore_s3.type_defs import (
        ListObjectVersionsRequestTypeDef,
        ObjectIdentifierTypeDef,
    )

__all__ = ["S3Settings", "S3Storage"]

P = ParamSpec("P")
T = TypeVar("T")
log = logging.getLogger(__name__)

MiB = 1 << 20
_MIN_PART = 5 * MiB  # S3's floor for every part but the last
_DELETE_BATCH = 1000  # DeleteObjects' limit per request
_LIST_PAGE = 1000  # ListObjectVersions' page size (its maximum)
_DIRECT_MAX = 8 * MiB  # largest body the direct path sends or reads in one request


class S3Settings(Protocol):
    """What :meth:`S3Storage.from_settings` reads: any object with these attributes.

    ``asynckarton``'s own ``S3Settings`` and Karton-style config sections both fit; an
    ``iam_auth`` attribute, when present, is honoured too.
    """

    @property
    def address(self) -> str | None: ...
    @property
    def access_key(self) -> str | None: ...
    @property
    def secret_key(self) -> str | None: ...


class S3Storage:
    """Resource storage on an S3-compatible server.

    Args:
        address: endpoint URL (``http://minio:9000``); None or empty for AWS.
        access_key: access key id; ignored with ``iam_auth``.
        secret_key: secret access key; ignored with ``iam_auth``.
        region: region name, also used as the LocationConstraint of created buckets.
        iam_auth: take credentials from the environment, the instance profile or the
            web identity (botocore's chain) instead of the keys.
        multipart_threshold: sources larger than this go up as a multipart upload;
            smaller ones are buffered (at most this many bytes) and sent in one PUT.
        part_size: bytes per multipart part (at least 5 MiB, S3's minimum); raised
            automatically for files that would need more than 10,000 parts.
        max_concurrency: parts uploaded at the same time by one ``put_file``.
        attempts: tries per S3 call (and per part) before a transient failure is raised.
        backoff: first retry delay in seconds; it doubles up to 5 s, with jitter.
        max_pool_connections: HTTP connections the client keeps open (and as many again
            for the direct path).
        direct_requests: send small PUTs, GETs and HEADs (up to 8 MiB) over aiohttp,
            signed with botocore's SigV4 signer, instead of through aiobotocore: same
            addressing, credentials, checksums, errors and retries at a fraction of the
            CPU. Redirected buckets and large bodies still take aiobotocore.

    Example:
        >>> async with S3Storage("http://localhost:9000", "key", "secret") as storage:
        ...     await storage.put_bytes("karton", "uid", b"data")
    """

    def __init__(
        self,
        address: str | None,
        access_key: str | None = None,
        secret_key: str | None = None,
        *,
        region: str = "us-east-1",
        iam_auth: bool = False,
        multipart_threshold: int = 16 * MiB,
        part_size: int = 8 * MiB,
        max_concurrency: int = 4,
        attempts: int = 4,
        backoff: float = 0.2,
        max_pool_connections: int = 32,
        direct_requests: bool = True,
    ) -> None:
        if part_size < _MIN_PART:
            raise ValueError(f"part_size must be at least 5 MiB (S3's minimum), got {part_size}")
        if multipart_threshold < 0 or max_concurrency < 1 or attempts < 1:
            raise ValueError("multipart_threshold >= 0, max_concurrency >= 1, attempts >= 1")
        self.address = address or None
        self.region = region
        self.iam_auth = iam_auth
        self.multipart_threshold = multipart_threshold
        self.part_size = part_size
        self.max_concurrency = max_concurrency
        self.attempts = attempts
        self.backoff = backoff
        self._access_key = access_key
        self._secret_key = secret_key
        self._max_pool_connections = max_pool_connections
        self.direct_requests = direct_requests
        self._stack = AsyncExitStack()
        self._s3: S3Client | None = None
        self._direct: DirectS3 | None = None

    @classmethod
    def from_settings(cls, settings: S3Settings, **options: Any) -> Self:
        """Build a storage from a settings object (``address``, ``access_key``,
        ``secret_key`` and optionally ``iam_auth``); ``options`` go to the constructor."""
        options.setdefault("iam_auth", bool(getattr(settings, "iam_auth", False)))
        return cls(settings.address, settings.access_key, settings.secret_key, **options)

    def __repr__(self) -> str:
        return f"S3Storage(address={self.address!r}, region={self.region!r})"

    # -- lifecycle ---------------------------------------------------------------------

    async def __aenter__(self) -> Self:
        """Create the client (no request is sent until the first call)."""
        if self._s3 is not None:
            raise RuntimeError(f"{self!r} is already open")
        credentials = (
            {}
            if self.iam_auth
            else {"aws_access_key_id": self._access_key, "aws_secret_access_key": self._secret_key}
        )
        self._s3 = await self._stack.enter_async_context(
            (await new_session()).create_client(
                "s3",
                endpoint_url=self.address,
                region_name=self.region,
                config=client_config(self._max_pool_connections),
                **credentials,
            )
        )
        if self.direct_requests:
            self._direct = DirectS3(
                self._s3,
                max_connections=self._max_pool_connections,
                connect_timeout=CONNECT_TIMEOUT,
                read_timeout=READ_TIMEOUT,
            )
            self._stack.push_async_callback(self._direct.aclose)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Close the client."""
        await self.aclose()

    async def aclose(self) -> None:
        """Close the client and its connection pool. Safe to call twice."""
        self._s3 = self._direct = None
        with anyio.CancelScope(shield=True):
            await self._stack.aclose()

    @property
    def _client(self) -> S3Client:
        if self._s3 is None:
            raise RuntimeError(f"{self!r} is not open: use 'async with S3Storage(...)'")
        return self._s3

    async def _call(
        self,
        op: str,
        bucket: str,
        key: str | None,
        fn: Callable[P, Awaitable[T]],
        /,
        *args: P.args,
        **kwargs: P.kwargs,
    ) -> T:
        """Run one S3 call, retrying transient failures and translating the rest."""
        for attempt in range(1, self.attempts + 1):
            try:
                return await fn(*args, **kwargs)
            except Exception as exc:
                failure = classify(exc, op, bucket, key)
                if failure is None:
                    raise
                if not failure.transient or attempt == self.attempts:
                    raise failure.error from exc
                log.debug("retrying S3 %s (%s/%s): %s", op, attempt, self.attempts, exc)
            await anyio.sleep(backoff_delay(attempt, base=self.backoff))
        raise AssertionError("unreachable")  # pragma: no cover

    # -- buckets and small objects -----------------------------------------------------

    async def ensure_bucket(self, bucket: str, *, create: bool) -> bool:
        """Tell whether ``bucket`` exists; create it when missing and ``create`` is set.

        Returns:
            True when it already existed, False when it was missing (Karton's semantics).
        """

        async def head() -> bool:
            try:
                await self._client.head_bucket(Bucket=bucket)
            except ClientError as exc:
                if http_status(exc) == 404 or error_code(exc) == "NoSuchBucket":
                    return False
                raise
            return True

        if await self._call("head_bucket", bucket, None, head):
            return True
        if create:
            await self._call("create_bucket", bucket, None, self._create_bucket, bucket)
        return False

    async def _create_bucket(self, bucket: str) -> None:
        try:
            if self.region == "us-east-1":
                await self._client.create_bucket(Bucket=bucket)
            else:
                await self._client.create_bucket(
                    Bucket=bucket,
                    CreateBucketConfiguration={"LocationConstraint": self.region},  # type: ignore[typeddict-item]
                )
        except ClientError as exc:
            if error_code(exc) != "BucketAlreadyOwnedByYou":  # lost a harmless race
                raise

    async def put_bytes(self, bucket: str, key: str, data: bytes) -> None:
        """Store ``data`` under ``key`` in one PUT."""
        direct = self._direct
        if direct is not None and len(data) <= _DIRECT_MAX:
            with contextlib.suppress(_Delegate):
                return await self._call("put_object", bucket, key, direct.put, bucket, key, data)
        await self._call(
            "put_object", bucket, key, self._client.put_object, Bucket=bucket, Key=key, Body=data
        )

    async def exists(self, bucket: str, key: str) -> bool:
        """HEAD the object; a 404 means no."""
        direct = self._direct
        if direct is not None:
            with contextlib.suppress(_Delegate):
                return await self._call("head_object", bucket, None, direct.head, bucket, key)

        async def head() -> bool:
            try:
                await self._client.head_object(Bucket=bucket, Key=key)
            except ClientError as exc:
                if http_status(exc) == 404:
                    return False
                raise
            return True

        return await self._call("head_object", bucket, None, head)

    async def find_by_sha256(self, bucket: str, sha256: str) -> str | None:
        """Return ``sha256`` when a deduplicated object with that key exists, else None."""
        key = check_sha256(sha256)
        return key if await self.exists(bucket, key) else None

    # -- streaming upload --------------------------------------------------------------

    async def put_file(self, bucket: str, key: str, source: Source) -> UploadResult:
        """Stream ``source`` into ``key``, hashing it in the same single read pass.

        Sources up to ``multipart_threshold`` bytes take one PUT; larger ones a multipart
        upload with ``max_concurrency`` parts in flight, each retried on its own.
        """
        stream, owned = await anyio.to_thread.run_sync(open_source, source)
        try:
            reader = HashingReader(stream)
            size = await anyio.to_thread.run_sync(remaining_size, stream)
            await S3Upload(self, bucket, key, reader).run(size)
            return reader.result()
        finally:
            if owned:
                with anyio.CancelScope(shield=True):
                    await anyio.to_thread.run_sync(stream.close)

    # -- downloads ---------------------------------------------------------------------

    async def get_bytes(
        self, bucket: str, key: str, *, start: int | None = None, end: int | None = None
    ) -> bytes:
        """Read the object, or the inclusive range ``start..end``, into memory."""
        direct = self._direct
        if direct is not None:
            first, last = check_range(start, end)
            with contextlib.suppress(_Delegate):
                return await self._call(
                    "get_object",
                    bucket,
                    key,
                    direct.get,
                    bucket,
                    key,
                    first,
                    last,
                    max_size=_DIRECT_MAX,
                )
        parts = [
            chunk
            async for chunk in self.iter_chunks(
                bucket, key, chunk_size=8 * MiB, start=start, end=end
            )
        ]
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def iter_chunks(
        self,
        bucket: str,
        key: str,
        *,
        chunk_size: int = MiB,
        start: int | None = None,
        end: int | None = None,
    ) -> AsyncIterator[bytes]:
        """Stream the object in ``chunk_size`` pieces, resuming after network errors."""
        first, last = check_range(start, end)
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be positive, got {chunk_size}")
        return S3Reader(self, bucket, key, first, last).chunks(chunk_size)

    async def download_to_file(self, bucket: str, key: str, path: str | os.PathLike[str]) -> None:
        """Stream the object to ``path`` (via a sibling temp file, renamed when complete)."""
        target = anyio.Path(path)
        partial = target.with_name(f".{target.name}.{os.urandom(4).hex()}.part")
        try:
            async with await anyio.open_file(partial, "wb") as out:
                async for chunk in self.iter_chunks(bucket, key, chunk_size=4 * MiB):
                    await out.write(chunk)
            await partial.replace(target)
        except BaseException:
            with anyio.CancelScope(shield=True):
                await partial.unlink(missing_ok=True)
            raise

    # -- listing and deleting ----------------------------------------------------------

    async def list_object_versions(self, bucket: str) -> AsyncIterator[ObjectVersion]:
        """Yield every version and delete marker, one page (1000 entries) at a time."""
        params: ListObjectVersionsRequestTypeDef = {"Bucket": bucket, "MaxKeys": _LIST_PAGE}
        while True:
            page = await self._call(
                "list_object_versions", bucket, None, self._client.list_object_versions, **params
            )
            for version in page.get("Versions", []):
                yield ObjectVersion(
                    version["Key"],
                    version.get("VersionId"),
                    False,
                    version["LastModified"].timestamp(),
                )
            for marker in page.get("DeleteMarkers", []):
                yield ObjectVersion(
                    marker["Key"], marker.get("VersionId"), True, marker["LastModified"].timestamp()
                )
            if not page.get("IsTruncated"):
                return
            params["KeyMarker"] = page["NextKeyMarker"]
            params["VersionIdMarker"] = page.get("NextVersionIdMarker", "")

    async def delete_objects(
        self,
        bucket: str,
        items: Sequence[ObjectVersion | str],
        *,
        delete_null_versions: bool = False,
    ) -> int:
        """Delete keys or versions with DeleteObjects, 1000 per request.

        Raises:
            PartialDeleteError: the server refused some entries.
        """
        entries = [_identifier(item, delete_null_versions) for item in items]
        deleted = 0
        failed: list[tuple[str, str]] = []
        for offset in range(0, len(entries), _DELETE_BATCH):
            batch = entries[offset : offset + _DELETE_BATCH]
            reply = await self._call(
                "delete_objects",
                bucket,
                None,
                self._client.delete_objects,
                Bucket=bucket,
                Delete={"Objects": batch, "Quiet": False},
            )
            deleted += len(reply.get("Deleted", []))
            failed += [
                (e.get("Key", "?"), f"{e.get('Code')}: {e.get('Message')}")
                for e in reply.get("Errors", [])
            ]
        if failed:
            raise PartialDeleteError(bucket, deleted, failed)
        return deleted


def _identifier(item: ObjectVersion | str, delete_null_versions: bool) -> ObjectIdentifierTypeDef:
    if isinstance(item, str):
        return {"Key": item}
    if item.version_id is None or (item.version_id == "null" and not delete_null_versions):
        return {"Key": item.key}
    return {"Key": item.key, "VersionId": item.version_id}
