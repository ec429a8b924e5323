"""Writing a cpio archive in the "newc" format the kernel unpacks as an initramfs (Documentation/
driver-api/early-userspace/buffer-format.rst): a 110-byte ASCII header per entry, name and data each padded to 4
bytes, and a TRAILER!!! entry. Written here so that building an initramfs needs no cpio binary."""

from __future__ import annotations

import gzip
import stat
from dataclasses import dataclass


@dataclass(frozen=True)
class Entry:
    path: str  # inside the archive, without a leading '/'
    mode: int  # file type and permission bits (stat.S_IFREG | 0o755, ...)
    data: bytes = b""  # file contents, or the target of a symlink
    mtime: int = 0


def _pad(n: int) -> bytes:
    return b"\0" * (-n % 4)


def newc(entries: list[Entry]) -> bytes:
    """The archive; directories must come before what they contain."""
    out = bytearray()
    for ino, e in enumerate([*entries, Entry("TRAILER!!!", 0)], start=1):
        name = e.path.encode() + b"\0"
        nlink = 2 if stat.S_ISDIR(e.mode) else 1
        fields = (ino, e.mode, 0, 0, nlink, e.mtime, len(e.data), 0, 0, 0, 0, len(name), 0)
        header = b"070701" + b"".join(f"{f:08X}".encode() for f in fields)
        out += header + name + _pad(len(header) + len(name)) + e.data + _pad(len(e.data))
    return bytes(out)


def gzipped(entries: list[Entry]) -> bytes:
    return gzip.compress(newc(entries), compresslevel=6, mtime=0)
