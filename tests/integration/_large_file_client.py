"""Client half of ``test_large_files``: runs in its own process so its peak RSS is its own.

The moto server lives in the pytest process and keeps every uploaded byte in memory, so
measuring the client's memory there would measure moto. This script uploads a file with
``S3Storage.put_file``, downloads it with ``download_to_file`` and prints one JSON line:
timings, the upload's sha256/size, and ``ru_maxrss`` (KiB on Linux) before and after.

Usage: python -m tests.integration._large_file_client URL KEY SECRET BUCKET SOURCE TARGET
"""

from __future__ import annotations

import json
import resource
import sys
import time

import anyio

from asynckarton.storage import S3Storage


def peak_rss_kib() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


async def main(url: str, key: str, secret: str, bucket: str, source: str, target: str) -> None:
    async with S3Storage(url, key, secret) as storage:
        await storage.ensure_bucket(bucket, create=True)
        # Warm up: imports, the connection pool and botocore's lazy loaders.
        await storage.put_bytes(bucket, "warmup", b"x" * 1024)
        await storage.get_bytes(bucket, "warmup")
        baseline = peak_rss_kib()
        started = time.perf_counter()
        result = await storage.put_file(bucket, "large", source)
        uploaded = time.perf_counter()
        await storage.download_to_file(bucket, "large", target)
        downloaded = time.perf_counter()
    print(json.dumps({
        "sha256": result.sha256,
        "size": result.size,
        "upload_seconds": uploaded - started,
        "download_seconds": downloaded - uploaded,
        "baseline_rss_kib": baseline,
        "peak_rss_kib": peak_rss_kib(),
    }))


if __name__ == "__main__":
    anyio.run(main, *sys.argv[1:7])
