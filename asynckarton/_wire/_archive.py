"""Directory resources: zipping a tree, and extracting an untrusted zip safely.

Karton ships directories as zip archives flagged ``"Directory"`` whose member names are
paths relative to the zipped directory; this module writes exactly that
layout, so karton-core reads our archives and we read theirs.

Karton extracts with ``ZipFile.extractall``, which trusts the archive. Resources come from
other services, so :func:`safe_extract` does not:

* every member name is checked *before* anything is written: no absolute paths, drive
  letters, ``..`` components, NUL bytes or symbolic links (backslashes count as separators,
  so Windows-made archives cannot smuggle ``..\\`` past the check);
* at most ``max_files`` members and ``max_size`` bytes declared in the archive, and the
  bytes actually decompressed are counted too, so an archive lying about its sizes stops
  at the limit (zipfile's CRC check catches truncated or padded members as well);
* members are extracted into a staging directory inside the target and moved into place
  only when everything succeeded; on any failure the staging directory (and the target,
  if this call created it) is removed, so nothing partial is left behind.

Every function here blocks; callers run them in worker threads.
"""

from __future__ import annotations

import io
import os
import re
import shutil
import stat
import tempfile
import zipfile
import zlib
from pathlib import Path
from typing import BinaryIO

from asynckarton._errors import UnsafeArchiveError

_CHUNK = 1 << 20
_DRIVE = re.compile(r"^[A-Za-z]:")
# What zipfile raises on a corrupt, truncated, encrypted or exotic member.
_BROKEN = (zipfile.BadZipFile, zlib.error, EOFError, NotImplementedError, RuntimeError)


def zip_directory(directory: str | os.PathLike[str], out: BinaryIO, compression: int) -> None:
    """Write every file under ``directory`` into ``out`` as a zip, names relative to it.

    Raises:
        NotADirectoryError: ``directory`` is not a directory.
    """
    root = Path(directory)
    if not root.is_dir():
        raise NotADirectoryError(f"{str(root)!r} is not a directory")
    with zipfile.ZipFile(out, "w", compression=compression) as archive:
        for current, dirs, files in os.walk(root):
            dirs.sort()  # deterministic member order
            for name in sorted(files):
                path = os.path.join(current, name)
                archive.write(path, os.path.relpath(path, root))


def zip_directory_to(
    directory: str | os.PathLike[str], compression: int, *, in_memory: bool
) -> BinaryIO:
    """Zip ``directory`` into a ``BytesIO`` or an anonymous temporary file, rewound."""
    out: BinaryIO = io.BytesIO() if in_memory else tempfile.TemporaryFile()  # noqa: SIM115
    try:
        zip_directory(directory, out, compression)
        out.seek(0)
    except BaseException:
        out.close()
        raise
    return out


def member_parts(name: str) -> list[str]:
    """Split a member name into safe path components.

    Raises:
        UnsafeArchiveError: the name is absolute, has a drive letter, a ``..`` component,
            a NUL byte, or no component at all.
    """
    if "\0" in name:
        raise UnsafeArchiveError(name, "NUL byte in the name")
    normal = name.replace("\\", "/")
    if normal.startswith("/") or _DRIVE.match(normal):
        raise UnsafeArchiveError(name, "absolute path")
    parts = [part for part in normal.split("/") if part not in ("", ".")]
    if ".." in parts:
        raise UnsafeArchiveError(name, "path traversal ('..')")
    if not parts:
        raise UnsafeArchiveError(name, "empty path")
    return parts


def check_members(members: list[zipfile.ZipInfo], *, max_size: int, max_files: int) -> None:
    """Refuse an archive from its central directory alone, before writing anything."""
    if len(members) > max_files:
        raise UnsafeArchiveError(f"<{len(members)} members>", f"more than max_files={max_files}")
    declared = 0
    for info in members:
        member_parts(info.filename)
        if stat.S_ISLNK(info.external_attr >> 16):
            raise UnsafeArchiveError(info.filename, "symbolic links are not extracted")
        if info.flag_bits & 0x1:
            raise UnsafeArchiveError(info.filename, "encrypted members are not supported")
        declared += info.file_size
        if declared > max_size:
            raise UnsafeArchiveError(
                info.filename, f"archive declares more than max_size={max_size} bytes"
            )


def safe_extract(
    source: str | os.PathLike[str] | BinaryIO,
    target: str | os.PathLike[str],
    *,
    max_size: int,
    max_files: int,
) -> None:
    """Extract the zip ``source`` into ``target`` or raise with nothing left behind.

    Raises:
        UnsafeArchiveError: a member would escape ``target``, is a symlink, or the
            archive (declared or actual) exceeds ``max_size`` bytes or ``max_files``
            members, or a member is corrupt.
        zipfile.BadZipFile: ``source`` is not a zip archive at all.
    """
    destination = Path(target)
    with zipfile.ZipFile(source) as archive:
        members = archive.infolist()
        check_members(members, max_size=max_size, max_files=max_files)
        created = not destination.exists()
        destination.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".asynckarton-extract-", dir=destination))
        try:
            _extract_members(archive, members, staging, max_size)
            _move_into(staging, destination)
        except BaseException:
            if created:
                shutil.rmtree(destination, ignore_errors=True)
            raise
        finally:
            shutil.rmtree(staging, ignore_errors=True)


def _extract_members(
    archive: zipfile.ZipFile, members: list[zipfile.ZipInfo], staging: Path, max_size: int
) -> None:
    root = staging.resolve()
    written = 0
    for info in members:
        path = staging.joinpath(*member_parts(info.filename))
        if not path.resolve().is_relative_to(root):  # defence in depth
            raise UnsafeArchiveError(info.filename, "resolves outside the target")
        if info.is_dir():
            path.mkdir(parents=True, exist_ok=True)
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            with archive.open(info) as member, open(path, "wb") as out:
                while chunk := member.read(_CHUNK):
                    written += len(chunk)
                    if written > max_size:
                        raise UnsafeArchiveError(
                            info.filename,
                            f"expands past max_size={max_size} bytes (its sizes are false)",
                        )
                    out.write(chunk)
        except _BROKEN as exc:
            raise UnsafeArchiveError(info.filename, f"corrupt member: {exc}") from exc


def _move_into(staging: Path, destination: Path) -> None:
    """Move the staged tree into ``destination``, merging with existing directories."""
    for entry in sorted(staging.iterdir()):
        dest = destination / entry.name
        if entry.is_dir() and dest.is_dir() and not dest.is_symlink():
            _move_into(entry, dest)
            continue
        if dest.is_symlink():
            # Never write through a link that was already in the target.
            dest.unlink()
        os.replace(entry, dest)
