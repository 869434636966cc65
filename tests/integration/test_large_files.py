"""A 256 MiB resource through S3Storage in constant memory, with throughput printed.

The client runs in a subprocess (``_large_file_client``) because the moto server shares the
pytest process and buffers the whole upload in memory. The client resets and reads its own
peak RSS around each transfer (``VmHWM``; ``ru_maxrss`` is inherited across fork + exec on
Linux, see the client's docstring), so the figures are what the transfer itself added.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.servers import S3Server

MiB = 1 << 20
SIZE = 256 * MiB
RSS_BUDGET_MIB = 100
ROOT = Path(__file__).resolve().parents[2]


def write_random_file(path: Path, size: int) -> str:
    digest = hashlib.sha256()
    with path.open("wb") as out:
        for _ in range(size // MiB):
            chunk = os.urandom(MiB)
            digest.update(chunk)
            out.write(chunk)
    return digest.hexdigest()


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(4 * MiB):
            digest.update(chunk)
    return digest.hexdigest()


@pytest.mark.integration
@pytest.mark.timeout(900)
def test_256_mib_round_trip_in_constant_memory(
    s3_srv: S3Server, s3_bucket: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    source, target = tmp_path / "large.bin", tmp_path / "large.out"
    expected = write_random_file(source, SIZE)
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "tests.integration._large_file_client",
            s3_srv.url,
            s3_srv.access_key,
            s3_srv.secret_key,
            s3_bucket,
            str(source),
            str(target),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=800,
        check=False,
    )
    assert run.returncode == 0, run.stderr
    report = json.loads(run.stdout.strip().splitlines()[-1])
    assert (report["sha256"], report["size"]) == (expected, SIZE)
    assert sha256_file(target) == expected

    up_growth = report["upload_growth_kib"] / 1024
    down_growth = report["download_growth_kib"] / 1024
    up = SIZE / MiB / report["upload_seconds"]
    down = SIZE / MiB / report["download_seconds"]
    with capsys.disabled():
        print(
            f"\n256 MiB via S3Storage (moto): upload {up:.0f} MiB/s (peak RSS +{up_growth:.0f} MiB), "
            f"download {down:.0f} MiB/s (peak RSS +{down_growth:.0f} MiB); "
            f"baseline {(report['baseline_rss_kib'] or 0) / 1024:.0f} MiB, by {report['method']}"
        )
    assert up_growth < RSS_BUDGET_MIB
    assert down_growth < RSS_BUDGET_MIB
