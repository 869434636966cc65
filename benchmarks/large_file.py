"""The 1 GiB resource check: upload and download in constant memory (issue: resources).

Run from the repository root: ``python -m benchmarks.large_file [--mib 1024]``.
It starts moto's S3 server in its own process (moto keeps every object in memory, so it
must not share the measured process), writes a random file of ``--mib`` MiB, and runs
``tests.integration._large_file_client``: ``S3Storage.put_file`` (multipart, parallel
parts, sha256 in the same pass) then ``download_to_file``, each with the client's peak
RSS growth read from ``VmHWM`` after a warm-up reset. Exit 1 if either growth reaches
100 MiB or the sha256 differs.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from benchmarks._servers import ACCESS_KEY, BUCKET, SECRET_KEY, S3Server

MiB = 1 << 20
LIMIT_MIB = 100


def write_random_file(path: Path, mib: int) -> str:
    digest = hashlib.sha256()
    with path.open("wb") as out:
        for _ in range(mib):
            chunk = os.urandom(MiB)
            digest.update(chunk)
            out.write(chunk)
    return digest.hexdigest()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, default=1024, help="file size in MiB")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-large-") as tmp:
        work = Path(tmp)
        source, target = work / "source.bin", work / "target.bin"
        expected = write_random_file(source, args.mib)
        s3 = S3Server(work)
        s3.start()
        try:
            run = subprocess.run(
                [sys.executable, "-m", "tests.integration._large_file_client", s3.url,
                 ACCESS_KEY, SECRET_KEY, BUCKET, str(source), str(target)],
                capture_output=True, text=True, timeout=1800, check=False,
            )  # fmt: skip
        finally:
            s3.stop()
    if run.returncode != 0:
        print(run.stdout, run.stderr, file=sys.stderr)
        return 1
    report = json.loads(run.stdout.strip().splitlines()[-1])
    up_growth = report["upload_growth_kib"] / 1024
    down_growth = report["download_growth_kib"] / 1024
    print(
        f"{args.mib} MiB via S3Storage against moto: "
        f"upload {args.mib / report['upload_seconds']:.0f} MiB/s, peak RSS +{up_growth:.0f} MiB; "
        f"download {args.mib / report['download_seconds']:.0f} MiB/s, "
        f"peak RSS +{down_growth:.0f} MiB (limit {LIMIT_MIB} MiB, by {report['method']})"
    )
    ok = report["sha256"] == expected and max(up_growth, down_growth) < LIMIT_MIB
    print("PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
