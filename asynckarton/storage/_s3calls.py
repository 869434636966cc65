"""What the S3 streaming helpers need from ``S3Storage``: its client and its retried calls.

``S3Reader`` and ``S3Upload`` are given the storage that created them; they see it
through this protocol so that neither imports ``S3Storage`` (no import cycle).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, ParamSpec, Protocol, TypeVar

if TYPE_CHECKING:
    from types_aiobotocore_s3 import S3Client

P = ParamSpec("P")
T = TypeVar("T")


class S3Calls(Protocol):
    """The parts of ``S3Storage`` its readers and uploads use."""

    multipart_threshold: int
    part_size: int
    max_concurrency: int
    attempts: int
    backoff: float

    @property
    def _client(self) -> S3Client: ...

    async def _call(
        self,
        op: str,
        bucket: str,
        key: str | None,
        fn: Callable[P, Awaitable[T]],
        /,
        *args: P.args,
        **kwargs: P.kwargs,
    ) -> T: ...

    async def put_bytes(self, bucket: str, key: str, data: bytes) -> None: ...
