"""File-type recognition by magic bytes, and strings extraction: the demo's pure logic.

Deliberately small (karton-classifier knows hundreds of formats): PE, ELF, ZIP, PDF,
``#!`` scripts and plain text.  Nothing here does I/O.
"""

from __future__ import annotations

import os
import re

__all__ = ["classify", "extract_strings"]

_STRINGS_RE = re.compile(rb"[\x20-\x7e]{6,}")


def _classify_pe(head: bytes) -> tuple[dict[str, str], str]:
    offset = int.from_bytes(head[0x3C:0x40], "little") if len(head) >= 0x40 else 0
    if offset and head[offset : offset + 4] == b"PE\0\0":
        machine = int.from_bytes(head[offset + 4 : offset + 6], "little")
        arch = {0x14C: "i386", 0x8664: "x86-64", 0xAA64: "arm64"}.get(machine, hex(machine))
        flags = int.from_bytes(head[offset + 22 : offset + 24], "little")
        ext = "dll" if flags & 0x2000 else "exe"
        return {"kind": "runnable", "platform": "win32", "extension": ext}, f"PE {ext} ({arch})"
    return {"kind": "runnable", "platform": "dos", "extension": "exe"}, "MS-DOS executable"


def _classify_elf(head: bytes) -> tuple[dict[str, str], str]:
    bits = {1: "32-bit", 2: "64-bit"}.get(head[4] if len(head) > 4 else 0, "?-bit")
    machine = int.from_bytes(head[18:20], "little") if len(head) >= 20 else 0
    arch = {0x03: "i386", 0x3E: "x86-64", 0x28: "arm", 0xB7: "aarch64"}.get(machine, hex(machine))
    return {"kind": "runnable", "platform": "linux", "extension": "elf"}, f"ELF {bits} ({arch})"


def _classify_script(head: bytes) -> tuple[dict[str, str], str]:
    line = head[2:].split(b"\n", 1)[0].decode("utf-8", "replace").strip()
    words = line.split()
    program = os.path.basename(words[0]) if words else "?"
    if program == "env" and len(words) > 1:
        program = words[1]
    return {"kind": "script", "extension": program}, f"{program} script"


def _is_text(head: bytes) -> bool:
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return all(ch.isprintable() or ch in "\t\r\n\f" for ch in text)


def classify(head: bytes) -> tuple[dict[str, str], str]:
    """Recognise a file by its first bytes.

    Returns:
        ``(headers, description)``: headers to add to the derived task (``kind`` and,
        when known, ``platform`` and ``extension``) and a human description.
    """
    if head.startswith(b"MZ"):
        return _classify_pe(head)
    if head.startswith(b"\x7fELF"):
        return _classify_elf(head)
    if head.startswith((b"PK\x03\x04", b"PK\x05\x06")):
        return {"kind": "archive", "extension": "zip"}, "ZIP archive"
    if head.startswith(b"%PDF-"):
        return {"kind": "document", "extension": "pdf"}, "PDF document"
    if head.startswith(b"#!"):
        return _classify_script(head)
    if head and _is_text(head):
        return {"kind": "text", "extension": "txt"}, "text"
    return {"kind": "unknown"}, "data" if head else "empty file"


def extract_strings(data: bytes, min_length: int = 6) -> list[str]:
    """Return the runs of printable ASCII of at least ``min_length`` characters (blocking)."""
    pattern = _STRINGS_RE if min_length == 6 else re.compile(rb"[\x20-\x7e]{%d,}" % min_length)
    return [match.decode("ascii") for match in pattern.findall(data)]
