"""Orphaned resource collection: the storage half of Karton's GC.

The order is what makes it safe, and it is Karton's: list the bucket *first*, then ask
which keys live tasks reference. A producer declares its task (so it is referenced)
before uploading the resource, so any object the listing saw either belongs to a task the
scan will see, or is truly orphaned. ``min_age`` adds a margin for writers that upload
before declaring (or for clocks that disagree): a key any of whose versions is younger
than ``min_age`` seconds is left for a later run.

Known limit, shared with Karton's GC: with deduplicated resources (the key is the
content's SHA-256, see :meth:`LocalResource.upload <asynckarton._wire._resource.LocalResource.upload>`)
an object can be re-referenced by a new task *after* the scan and still be deleted by this
run. The window is the scan-to-delete time; keep it short, and prefer dedup for buckets
whose GC runs with a generous ``min_age``.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Awaitable, Callable

from asynckarton.storage._base import ObjectVersion, Storage


async def collect_orphans(
    storage: Storage,
    bucket: str,
    referenced: Callable[[], Awaitable[set[str]]],
    *,
    delete_null_versions: bool = False,
    min_age: float = 0,
) -> int:
    """Delete every version and delete marker of the keys no live task references.

    Args:
        storage: where the bucket lives.
        bucket: the bucket to collect (Karton collects only its default bucket).
        referenced: returns the keys (resource uids) referenced by live tasks; it is
            awaited only after the whole bucket has been listed.
        delete_null_versions: send ``VersionId="null"`` explicitly (Karton's
            ``enable_null_version_deletion``, needed by MinIO with suspended versioning).
        min_age: keep keys with any version modified less than this many seconds ago.

    Returns:
        The number of object versions and delete markers deleted.
    """
    by_key: defaultdict[str, list[ObjectVersion]] = defaultdict(list)
    async for version in storage.list_object_versions(bucket):
        by_key[version.key].append(version)
    if not by_key:
        return 0
    keep = await referenced()
    cutoff = time.time() - min_age
    doomed = [
        version
        for key, versions in by_key.items()
        if key not in keep and all(v.last_modified <= cutoff for v in versions)
        for version in versions
    ]
    if not doomed:
        return 0
    return await storage.delete_objects(bucket, doomed, delete_null_versions=delete_null_versions)
