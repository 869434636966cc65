"""Resources against LocalStorage: uploads, downloads, wire format, directories, hostile zips."""

from __future__ import annotations

import hashlib
import io
import os
import stat
import struct
import zipfile
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from asynckarton._errors import InvalidTaskError, UnsafeArchiveError
from asynckarton._wire._resource import (
    RESOURCE_KEY,
    LocalResource,
    RemoteResource,
    resource_from_wire,
    resource_to_wire,
)
from asynckarton.storage import LocalStorage

pytestmark = pytest.mark.anyio

BUCKET = "karton"
WIRE_KEYS = {"uid", "name", "bucket", "size", "metadata", "flags", "sha256"}


@pytest.fixture
async def storage(tmp_path: Path) -> AsyncIterator[LocalStorage]:
    async with LocalStorage(tmp_path / "store") as local:
        await local.ensure_bucket(BUCKET, create=True)
        yield local


def names(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


def all_names(directory: Path) -> set[str]:
    return {p.name for p in directory.rglob("*")}


def exists(path: Path) -> bool:
    return path.exists()


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


async def uploaded(storage: LocalStorage, resource: LocalResource) -> RemoteResource:
    """Upload ``resource`` and return what a consumer would receive."""
    await resource.upload(storage, bucket=BUCKET)
    return resource_from_wire(resource_to_wire(resource), storage)


# -- construction ----------------------------------------------------------------------


def test_exactly_one_source() -> None:
    with pytest.raises(ValueError, match="got none"):
        LocalResource("x")
    with pytest.raises(ValueError, match="got content and path"):
        LocalResource("x", b"data", path="/tmp/x")
    with pytest.raises(ValueError, match="got path and fd"):
        LocalResource("x", path="/tmp/x", fd=io.BytesIO())


def test_constructor_does_no_io() -> None:
    resource = LocalResource("x", path="/definitely/not/here")
    assert (resource.sha256, resource.size, resource.bucket) == (None, None, None)
    assert len(resource.uid) == 36  # a uuid4
    text = LocalResource("t", "zażółć")
    assert text.content == "zażółć".encode() and text.size == len(text.content)
    with pytest.raises(RuntimeError, match="backed by a file"):
        _ = resource.content


# -- uploads ---------------------------------------------------------------------------


async def test_bytes_round_trip(storage: LocalStorage) -> None:
    data = os.urandom(100_000)  # above the inline-hash limit: hashed in a thread
    resource = LocalResource("a.bin", data, metadata={"kind": "sample"})
    remote = await uploaded(storage, resource)
    assert resource.bucket == BUCKET
    assert resource.sha256 == resource.metadata["sha256"] == sha(data)
    assert resource.size == len(data)
    assert remote.sha256 == sha(data) and remote.metadata["kind"] == "sample"
    assert not remote.loaded()
    with pytest.raises(RuntimeError, match=r"await resource.download\(\)"):
        _ = remote.content
    assert await remote.download() == data
    assert remote.loaded() and remote.content == data
    remote.unload()
    assert not remote.loaded()


async def test_path_round_trip(storage: LocalStorage, tmp_path: Path) -> None:
    path = tmp_path / "sample.exe"
    data = os.urandom(300_000)
    path.write_bytes(data)
    resource = LocalResource("sample.exe", path=path)
    remote = await uploaded(storage, resource)
    assert (resource.sha256, resource.size) == (sha(data), len(data))
    assert (remote.sha256, remote.size) == (sha(data), len(data))
    assert await remote.download() == data


async def test_fd_uploads_whole_file_and_stays_open(storage: LocalStorage) -> None:
    fd = io.BytesIO(b"0123456789")
    fd.seek(4)  # Karton uploads a seekable fd from offset 0
    resource = LocalResource("fd.bin", fd=fd)
    remote = await uploaded(storage, resource)
    assert await remote.download() == b"0123456789"
    assert resource.sha256 == sha(b"0123456789") and not fd.closed


async def test_given_sha256_is_replaced_by_the_real_one(storage: LocalStorage) -> None:
    resource = LocalResource("x", b"abc", sha256="0" * 64)
    assert resource.sha256 == "0" * 64
    await resource.upload(storage, bucket=BUCKET)
    assert resource.sha256 == sha(b"abc")


async def test_upload_needs_a_bucket(storage: LocalStorage) -> None:
    with pytest.raises(ValueError, match="no bucket"):
        await LocalResource("x", b"abc").upload(storage)


async def test_prepare_hashes_before_upload(tmp_path: Path) -> None:
    path = tmp_path / "f"
    path.write_bytes(b"hello")
    resource = LocalResource("f", path=path)
    await resource.prepare()
    assert (resource.sha256, resource.size) == (sha(b"hello"), 5)
    await resource.prepare(deduplicate=True)
    assert resource.uid == sha(b"hello")


# -- wire format -----------------------------------------------------------------------


async def test_to_dict_exact_keys(storage: LocalStorage) -> None:
    resource = LocalResource("n", b"abc", bucket=BUCKET, uid="u-1", flags=["Directory"])
    await resource.upload(storage)
    assert resource.to_dict() == {
        "uid": "u-1",
        "name": "n",
        "bucket": BUCKET,
        "size": 3,
        "metadata": {"sha256": sha(b"abc")},
        "flags": ["Directory"],
        "sha256": sha(b"abc"),
    }
    assert resource_to_wire(resource) == {RESOURCE_KEY: resource.to_dict()}
    assert resource.is_directory


def test_from_dict_rules() -> None:
    old_style = {"uid": "u", "name": "n", "bucket": "b", "metadata": {"sha256": "meta"}}
    remote = RemoteResource.from_dict(old_style)  # 2.x writers: no size, no flags
    assert (remote.sha256, remote.size, remote.flags) == ("meta", None, [])
    remote = RemoteResource.from_dict({**old_style, "sha256": "top"})
    assert remote.sha256 == "top" and remote.metadata["sha256"] == "top"
    assert set(remote.to_dict()) == WIRE_KEYS
    wrapped = resource_from_wire({RESOURCE_KEY: {**old_style, "bucket": None}}, None)
    assert wrapped.bucket is None
    with pytest.raises(InvalidTaskError, match="uid"):
        RemoteResource.from_dict({"name": "n"})


def test_karton_core_reads_our_wire_and_we_read_its() -> None:
    from karton.core.resource import LocalResource as KartonLocal
    from karton.core.resource import RemoteResource as KartonRemote

    ours = LocalResource("n", b"abc", bucket="b", uid="u", metadata={"m": 1}, sha256=sha(b"abc"))
    theirs = KartonRemote.from_dict(ours.to_dict(), None)
    assert (theirs.uid, theirs.name, theirs.bucket, theirs.size) == ("u", "n", "b", 3)
    assert theirs.sha256 == sha(b"abc") and theirs.metadata["m"] == 1

    karton_local = KartonLocal("k", content=b"xyz", bucket="b", uid="k-1")
    back = RemoteResource.from_dict(karton_local.to_dict())
    assert (back.uid, back.size, back.sha256) == ("k-1", 3, sha(b"xyz"))


async def test_unbound_remote_resource() -> None:
    remote = RemoteResource("n", bucket="b", uid="u")
    with pytest.raises(RuntimeError, match="not bound"):
        await remote.download()


# -- streaming reads -------------------------------------------------------------------


async def test_iter_chunks_and_ranges(storage: LocalStorage) -> None:
    data = bytes(range(256)) * 100
    remote = await uploaded(storage, LocalResource("r", data))
    chunks = [c async for c in remote.iter_chunks(chunk_size=10_000)]
    assert [len(c) for c in chunks] == [10_000, 10_000, 5_600]
    assert await remote.read_range(100, 199) == data[100:200]
    await remote.download()
    assert [len(c) async for c in remote.iter_chunks(chunk_size=10_000)] == [10_000, 10_000, 5_600]
    assert await remote.read_range(100, 199) == data[100:200]


async def test_download_to_file_and_temporary_file(storage: LocalStorage, tmp_path: Path) -> None:
    data = os.urandom(50_000)
    remote = await uploaded(storage, LocalResource("r", data))
    await remote.download_to_file(tmp_path / "copy")
    assert (tmp_path / "copy").read_bytes() == data
    async with remote.download_temporary_file(suffix=".bin") as handle:
        path = Path(handle.name)
        assert path.suffix == ".bin"
        assert handle.read() == data
    assert handle.closed and not exists(path)


# -- directories -----------------------------------------------------------------------


def make_tree(root: Path) -> dict[str, bytes]:
    files = {"a.txt": b"a", "sub/b.bin": os.urandom(1000), "sub/deeper/c": b"c" * 10_000}
    for name, content in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(content)
    return files


def read_tree(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


@pytest.mark.parametrize("in_memory", [False, True])
async def test_directory_round_trip(storage: LocalStorage, tmp_path: Path, in_memory: bool) -> None:
    files = make_tree(tmp_path / "tree")
    resource = await LocalResource.from_directory(
        "tree.zip", tmp_path / "tree", in_memory=in_memory
    )
    assert resource.flags == ["Directory"]
    remote = await uploaded(storage, resource)
    assert remote.is_directory
    if not in_memory:
        assert resource.fd is None  # the temporary archive was closed after upload
    async with remote.zip_file() as archive:
        assert sorted(archive.namelist()) == sorted(files)
    await remote.extract_to_directory(tmp_path / "out")
    assert read_tree(tmp_path / "out") == files

    seen = []
    async with remote.extract_temporary() as directory:
        seen.append(directory)
        assert read_tree(directory) == files
    assert len(seen) == 1 and not seen[0].exists()


async def test_directory_interop_with_karton_core(storage: LocalStorage, tmp_path: Path) -> None:
    from karton.core.resource import LocalResource as KartonLocal
    from karton.core.resource import RemoteResource as KartonRemote

    files = make_tree(tmp_path / "tree")
    theirs = KartonLocal.from_directory("t", str(tmp_path / "tree"), in_memory=True)
    await storage.put_bytes(BUCKET, "karton-zip", theirs.content)
    remote = RemoteResource("t", bucket=BUCKET, uid="karton-zip", storage=storage)
    await remote.extract_to_directory(tmp_path / "ours")
    assert read_tree(tmp_path / "ours") == files

    ours = await LocalResource.from_directory("t", tmp_path / "tree", in_memory=True)
    karton_remote = KartonRemote("t", bucket=BUCKET, uid="u")
    karton_remote._content = ours.content
    karton_remote.extract_to_directory(str(tmp_path / "theirs"))
    assert read_tree(tmp_path / "theirs") == files


async def test_extract_temporary_cleans_up_on_error(storage: LocalStorage) -> None:
    remote = await uploaded(storage, LocalResource("z", zip_of({"f": b"x"})))
    with pytest.raises(KeyError):
        async with remote.extract_temporary() as directory:
            raise KeyError("boom")
    assert not directory.exists()


# -- hostile archives ------------------------------------------------------------------


def zip_of(members: dict[str, bytes], *, symlinks: dict[str, str] | None = None) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, content in members.items():
            archive.writestr(zipfile.ZipInfo(name), content)
        for name, target in (symlinks or {}).items():
            info = zipfile.ZipInfo(name)
            info.external_attr = (stat.S_IFLNK | 0o777) << 16
            archive.writestr(info, target)
    return buffer.getvalue()


def lying_zip(real_size: int, claimed: int) -> bytes:
    """A deflated member whose headers claim ``claimed`` bytes but inflate to ``real_size``."""
    data = bytearray(zip_of({"ok.txt": b"fine", "bomb.bin": b"\0" * real_size}))
    for signature, offset in ((b"PK\x03\x04", 22), (b"PK\x01\x02", 24)):
        position = data.find(signature, data.find(signature) + 1)  # the second member
        struct.pack_into("<I", data, position + offset, claimed)
    return bytes(data)


HOSTILE = {
    "traversal": (zip_of({"ok.txt": b"fine", "../evil.txt": b"pwned"}), {}),
    "nested-traversal": (zip_of({"a/../../evil.txt": b"pwned"}), {}),
    "absolute": (zip_of({"ok.txt": b"fine", "/tmp/evil.txt": b"pwned"}), {}),
    "drive-letter": (zip_of({"C:/evil.txt": b"pwned"}), {}),
    "backslash": (zip_of({"..\\evil.txt": b"pwned"}), {}),
    "symlink": (zip_of({"ok.txt": b"fine"}, symlinks={"link": "/etc/passwd"}), {}),
    "bomb": (zip_of({"ok.txt": b"fine", "bomb.bin": b"\0" * (3 << 20)}), {"max_size": 1 << 20}),
    "lying-sizes": (lying_zip(3 << 20, 10), {"max_size": 1 << 20}),
    "too-many-files": (zip_of({f"f{i}": b"" for i in range(20)}), {"max_files": 10}),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
@pytest.mark.parametrize("target_exists", [False, True], ids=["new-dir", "existing-dir"])
async def test_hostile_archives_are_refused(
    storage: LocalStorage, tmp_path: Path, case: str, target_exists: bool
) -> None:
    archive, limits = HOSTILE[case]
    remote = await uploaded(storage, LocalResource("evil.zip", archive, flags=["Directory"]))
    work = tmp_path / "work"
    target = work / "out"
    target.mkdir(parents=True) if target_exists else work.mkdir()
    with pytest.raises(UnsafeArchiveError):
        await remote.extract_to_directory(target, **limits)
    # Nothing partial inside the target, nothing at all outside it.
    assert names(work) == (["out"] if target_exists else [])
    if target_exists:
        assert names(target) == []
    assert not {"evil.txt", "ok.txt"} & all_names(tmp_path)
    remote.unload()
    await remote.download()  # the in-memory path refuses it too
    with pytest.raises(UnsafeArchiveError):
        await remote.extract_to_directory(target, **limits)


async def test_extract_never_writes_through_existing_symlinks(
    storage: LocalStorage, tmp_path: Path
) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    target = tmp_path / "target"
    target.mkdir()
    (target / "sub").symlink_to(outside, target_is_directory=True)
    remote = await uploaded(storage, LocalResource("z", zip_of({"sub/file": b"data"})))
    await remote.extract_to_directory(target)
    assert list(outside.iterdir()) == []
    assert (target / "sub" / "file").read_bytes() == b"data"
    assert not (target / "sub").is_symlink()


async def test_unsafe_error_names_the_member(storage: LocalStorage, tmp_path: Path) -> None:
    remote = await uploaded(storage, LocalResource("z", zip_of({"../x": b"1"})))
    with pytest.raises(UnsafeArchiveError) as info:
        await remote.extract_to_directory(tmp_path / "out")
    assert info.value.member == "../x" and "traversal" in info.value.reason


# -- deduplication ---------------------------------------------------------------------


async def test_dedup_uploads_once(storage: LocalStorage, tmp_path: Path) -> None:
    data = b"same bytes" * 1000
    first = LocalResource("a", data, bucket=BUCKET, deduplicate=True)
    await first.upload(storage)
    key = tmp_path / "store" / BUCKET / sha(data)
    mtime = key.stat().st_mtime_ns
    second = LocalResource("b", data, bucket=BUCKET)
    await second.upload(storage, deduplicate=True)
    assert first.uid == second.uid == sha(data)
    assert key.stat().st_mtime_ns == mtime  # not written again
    versions = [v async for v in storage.list_object_versions(BUCKET)]
    assert [v.key for v in versions] == [sha(data)]


async def test_dedup_directory_from_owned_tempfile(storage: LocalStorage, tmp_path: Path) -> None:
    make_tree(tmp_path / "tree")
    first = await LocalResource.from_directory("t", tmp_path / "tree", deduplicate=True)
    await first.upload(storage, bucket=BUCKET)
    assert first.uid == first.sha256 and first.fd is None


def test_decompressed_bytes_are_counted_too(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Even if the declared sizes were believed, extraction stops at max_size."""
    from asynckarton._wire import _archive

    monkeypatch.setattr(_archive, "check_members", lambda *a, **k: None)
    archive = zip_of({"ok.txt": b"fine", "big.bin": b"\0" * (3 << 20)})
    with pytest.raises(UnsafeArchiveError, match="expands past max_size"):
        _archive.safe_extract(io.BytesIO(archive), tmp_path / "out", max_size=1 << 20, max_files=10)
    assert names(tmp_path) == []
