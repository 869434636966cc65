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

from ._local_resource import LocalResource
from ._remote_resource import RemoteResource, resource_from_wire
from ._resource_base import DIRECTORY_FLAG, RESOURCE_KEY, ResourceBase, resource_to_wire

__all__ = [
    "DIRECTORY_FLAG",
    "RESOURCE_KEY",
    "LocalResource",
    "RemoteResource",
    "ResourceBase",
    "resource_from_wire",
    "resource_to_wire",
]
