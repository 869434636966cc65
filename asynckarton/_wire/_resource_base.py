"""What every resource shares: identity, metadata, the wire dict (see :mod:`._resource`)."""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from typing import Any

import anyio

from ..storage._io import sha256_bytes

__all__ = ["DIRECTORY_FLAG", "RESOURCE_KEY", "ResourceBase", "resource_to_wire"]

RESOURCE_KEY = "__karton_resource__"
"""The key that marks a resource inside a task payload."""
DIRECTORY_FLAG = "Directory"
"""The flag of zipped-directory resources (kept for Karton 3.x services)."""
_INLINE_HASH_LIMIT = 64 << 10  # below this, hashing on the loop is cheaper than a thread hop


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


def resource_to_wire(resource: ResourceBase) -> dict[str, Any]:
    """The wrapped wire form ``{"__karton_resource__": resource.to_dict()}``."""
    return {RESOURCE_KEY: resource.to_dict()}


async def _sha256_of(data: bytes) -> str:
    if len(data) <= _INLINE_HASH_LIMIT:
        return sha256_bytes(data)
    return await anyio.to_thread.run_sync(sha256_bytes, data)
