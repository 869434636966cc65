"""Client half of ``test_large_files``: runs in its own process so its memory is its own.

The moto server lives in the pytest process and keeps every uploaded byte in memory, so
measuring the client there would measure moto. This script uploads a file with
``S3Storage.put_file``, downloads it with ``download_to_file`` and prints one JSON line with
timings, the upload's sha256/size and memory figures (KiB).

Memory: ``ru_maxrss`` is reported, but on Linux it survives ``fork`` + ``exec``: a child of
a large pytest process starts with its parent's peak. So where ``/proc`` allows it the peak
is reset after warm-up (``echo 5 > /proc/self/clear_refs``) and read back from ``VmHWM``,
which measures this process alone; elsewhere the ``ru_maxrss`` delta is the fallback.

Usage: python -m tests.integration._large_file_client URL KEY SECRET BUCKET SOURCE TARGET
"""

from __future__ import annotations

import json
import re
import resource
import sys
import time
from pathlib import Path

import anyio

from asynckarton.storage import S3Storage

STATUS = Path("/proc/self/status")


def ru_maxrss_kib() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def status_kib(field: str) -> int:
    match = re.search(rf"^{field}:\s+(\d+) kB", STATUS.read_text(), re.MULTILINE)
    assert match, field
    return int(match.group(1))


def reset_peak() -> int | None:
    """Reset VmHWM to the current RSS and return that RSS; None when unsupported."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return status_kib("VmRSS")
    except OSError:
        return None


def peak_since(baseline: int | None, ru_before: int) -> int:
    """KiB the process grew above ``baseline`` at its peak since the last reset."""
    if baseline is not None:
        return status_kib("VmHWM") - baseline
    return ru_maxrss_kib() - ru_before  # an upper bound, see the module docstring


async def main(url: str, key: str, secret: str, bucket: str, source: str, target: str) -> None:
    report: dict[str, object] = {}
    async with S3Storage(url, key, secret) as storage:
        await storage.ensure_bucket(bucket, create=True)
        # Warm up: imports, the connection pool and botocore's lazy loaders.
        await storage.put_bytes(bucket, "warmup", b"x" * 1024)
        await storage.get_bytes(bucket, "warmup")

        ru_before, baseline = ru_maxrss_kib(), reset_peak()
        started = time.perf_counter()
        result = await storage.put_file(bucket, "large", source)
        report["upload_seconds"] = time.perf_counter() - started
        report["upload_growth_kib"] = peak_since(baseline, ru_before)

        ru_before, baseline = ru_maxrss_kib(), reset_peak()
        started = time.perf_counter()
        await storage.download_to_file(bucket, "large", target)
        report["download_seconds"] = time.perf_counter() - started
        report["download_growth_kib"] = peak_since(baseline, ru_before)
    report.update(
        sha256=result.sha256,
        size=result.size,
        method="VmHWM" if baseline is not None else "ru_maxrss",
        ru_maxrss_kib=ru_maxrss_kib(),
        baseline_rss_kib=baseline,
    )
    print(json.dumps(report))


if __name__ == "__main__":
    url, key, secret, bucket, source, target = sys.argv[1:7]
    anyio.run(main, url, key, secret, bucket, source, target)
