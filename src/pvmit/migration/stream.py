"""The migration stream: a versioned, self-describing framing, encoded and decoded without I/O.

    stream  := header section*
    header  := "PVMITMIG" u16 version u16 flags u32 length json(length) u32 crc32(everything before it)
    section := kind(4 ASCII bytes) u64 length payload(length) u32 crc32(kind, length, payload)

All integers are little-endian. The header's JSON carries the source host's facts and a description of the VM.
A decoder refuses an unknown version, an unknown section kind, a bad checksum, a section longer than the limit,
and, at the end, a stream cut short; each with a message that says which. The same framing carries the messages
a destination sends back (VRDT, REDY, NACK, CACK).

JSON in the stream is read strictly (`loads`): NaN, Infinity, numbers beyond a double and integers of more digits
than Python converts are kept as `Unusable` markers that every field check refuses by name; nesting deeper than the
parser's recursion is a StreamError.

Version 2 (this one) added ZERO sections (runs of zero pages sent as a marker), CACK (the destination's
acknowledgement of the commit) and the migration id and control addresses in the header and REDY, used to settle
who runs the guest when the connection is lost around the commit.
"""

from __future__ import annotations

import json
import math
import struct
import zlib
from dataclasses import dataclass
from typing import Any

from pvmit.errors import PvmitError

MAGIC = b"PVMITMIG"
VERSION = 2
HEADER_FIXED = struct.Struct("<8sHHI")
SECTION_HEAD = struct.Struct("<4sQ")
CRC = struct.Struct("<I")
MAX_HEADER = 1 << 20
MAX_SECTION = 64 << 20

KINDS: dict[bytes, str] = {
    b"HELO": "the VM's description and its interface state, for the destination's check before the source pauses",
    b"VRDT": "the destination's verdict on HELO (JSON)",
    b"MEMP": "guest memory pages: u64 first page number, u32 page count, then the pages",
    b"ZERO": "guest memory pages that are all zero: u64 first page number, u32 page count",
    b"ISTA": "the interface state after the source paused (pvmit.interface-state/2 JSON)",
    b"CPUS": "vCPU registers, special registers, FPU, events and MSRs (JSON)",
    b"DEVS": "device state: the serial console's unfinished line (JSON)",
    b"DONE": "end of the stream: totals to check against (JSON)",
    b"REDY": "the destination has everything, verified, and will run the guest once committed (JSON)",
    b"NACK": "the destination refuses; the source resumes (JSON with the reason)",
    b"CMIT": "the source has stopped its copy: the destination may run the guest",
    b"CACK": "the destination has the guest and runs it: the source may let its copy go (JSON)",
}
PAGE = 4096
PAGES_HEAD = struct.Struct("<QI")


class StreamError(PvmitError):
    """The stream is not one pvmit can accept; the message says what is wrong and where."""


class Unusable:
    """A number pvmit does not accept (NaN, Infinity, beyond a double's range, an integer of too many digits),
    left in place of the value so that the check of the field it stands in names that field. It equals nothing
    and is no int, float or bool, so every typed check refuses it."""

    __slots__ = ("text",)
    MAX_DIGITS = 4300  # Python's default limit for int(str)

    def __init__(self, text: str) -> None:
        self.text = text if len(text) <= 40 else f"{text[:20]}... ({len(text)} characters)"

    def __repr__(self) -> str:
        return f"the number {self.text}"


def _float(text: str) -> float | Unusable:
    value = float(text)
    return value if math.isfinite(value) else Unusable(text)


def _int(text: str) -> int | Unusable:
    return int(text) if len(text) <= Unusable.MAX_DIGITS else Unusable(text)


def loads(data: bytes | str, where: str) -> Any:
    """Strict JSON for everything a peer sends. Numbers pvmit cannot use become `Unusable` (refused by the field
    checks, by name); anything that is not JSON, or nested too deeply, is a StreamError naming `where`. (Files are
    read by `pvmit.userfiles.load_json`, which refuses a file at its first such number: a file has no field checks
    to name it, a stream does.)"""
    try:
        return json.loads(data, parse_constant=Unusable, parse_float=_float, parse_int=_int)
    except RecursionError:  # found by fuzzing: "[[[[..." nested deeper than the parser's recursion limit
        raise StreamError(f"{where}: JSON nested too deeply") from None
    except (UnicodeDecodeError, ValueError) as e:  # json.JSONDecodeError is a ValueError
        raise StreamError(f"{where}: not valid JSON: {str(e)[:200]}") from None


@dataclass(frozen=True)
class Header:
    version: int
    flags: int
    info: dict[str, Any]


@dataclass(frozen=True)
class Section:
    kind: bytes
    payload: bytes
    offset: int  # where the section started in the stream, for error messages

    def json(self) -> Any:
        return loads(bytes(self.payload), f"{self.kind.decode()} section at byte {self.offset}")


def encode_header(info: dict[str, Any], flags: int = 0, version: int = VERSION) -> bytes:
    body = json.dumps(info, separators=(",", ":")).encode()
    head = HEADER_FIXED.pack(MAGIC, version, flags, len(body)) + body
    return head + CRC.pack(zlib.crc32(head))


def encode_section(kind: bytes, payload: bytes) -> bytes:
    if kind not in KINDS:
        raise ValueError(f"unknown section kind {kind!r}")
    head = SECTION_HEAD.pack(kind, len(payload))
    return head + payload + CRC.pack(zlib.crc32(payload, zlib.crc32(head)))


def encode_json(kind: bytes, doc: Any) -> bytes:
    return encode_section(kind, json.dumps(doc, separators=(",", ":")).encode())


def encode_pages(first_page: int, pages: bytes | memoryview) -> bytes:
    return b"".join(pages_frame(first_page, pages))


def pages_frame(first_page: int, pages: bytes | memoryview) -> tuple[bytes, bytes | memoryview, bytes]:
    """A MEMP section as (head, the pages themselves, checksum), for a vectored write that copies nothing."""
    if len(pages) % PAGE:
        raise ValueError("page data must be whole pages")
    head = SECTION_HEAD.pack(b"MEMP", PAGES_HEAD.size + len(pages)) + PAGES_HEAD.pack(first_page, len(pages) // PAGE)
    return head, pages, CRC.pack(zlib.crc32(pages, zlib.crc32(head)))


def encode_zero(first_page: int, count: int) -> bytes:
    """A run of `count` zero pages from `first_page`: 24 bytes on the wire instead of count * 4096."""
    return encode_section(b"ZERO", PAGES_HEAD.pack(first_page, count))


def decode_zero(section: Section) -> tuple[int, int]:
    if len(section.payload) != PAGES_HEAD.size:
        raise StreamError(f"ZERO section at byte {section.offset}: {len(section.payload)} bytes, expected "
                          f"{PAGES_HEAD.size}")
    first, count = PAGES_HEAD.unpack(section.payload)
    return first, count


def check_section_head(kind: bytes, length: int, offset: int, max_section: int = MAX_SECTION) -> None:
    """The rules every section head must meet before its payload is read (one copy, for every reader)."""
    if kind not in KINDS:
        raise StreamError(f"unknown section kind {kind!r} at byte {offset}")
    if length > max_section:
        raise StreamError(f"{kind.decode()} section at byte {offset}: {length} bytes is over the limit {max_section}")


def decode_pages(section: Section) -> tuple[int, memoryview]:
    """(first page number, the page bytes) of a MEMP section, checked for consistency."""
    if len(section.payload) < PAGES_HEAD.size:
        raise StreamError(f"MEMP section at byte {section.offset}: shorter than its own header")
    first, count = PAGES_HEAD.unpack_from(section.payload)
    data = memoryview(section.payload)[PAGES_HEAD.size:]
    if len(data) != count * PAGE:
        raise StreamError(f"MEMP section at byte {section.offset}: says {count} pages but carries {len(data)} bytes")
    return first, data


def check_header_fixed(raw: bytes) -> int:
    """The fixed part of a header (magic, version, flags, length) checked; returns the JSON's length."""
    magic, version, flags, length = HEADER_FIXED.unpack(raw)
    if magic != MAGIC:
        raise StreamError("not a pvmit migration stream (bad magic)")
    if version != VERSION:
        raise StreamError(f"migration stream version {version} is not supported (this pvmit speaks {VERSION})")
    if flags:
        raise StreamError(f"migration stream header flags {flags:#06x}: this pvmit defines none (a newer "
                          "source asking for something it cannot do)")
    if length > MAX_HEADER:
        raise StreamError(f"migration stream header of {length} bytes is larger than the limit {MAX_HEADER}")
    return int(length)


def parse_header(raw: bytes) -> Header:
    """A whole header (fixed part, JSON, checksum) checked and decoded."""
    length = check_header_fixed(raw[:HEADER_FIXED.size])
    if len(raw) != HEADER_FIXED.size + length + CRC.size:
        raise StreamError("migration stream header: length does not match")
    (crc,) = CRC.unpack_from(raw, len(raw) - CRC.size)
    if crc != zlib.crc32(raw[:-CRC.size]):
        raise StreamError("migration stream header: checksum mismatch (corrupted)")
    info = loads(raw[HEADER_FIXED.size:-CRC.size], "migration stream header")
    if not isinstance(info, dict):
        raise StreamError("migration stream header: not a JSON object")
    _, version, flags, _ = HEADER_FIXED.unpack_from(raw)
    return Header(version, flags, info)


class StreamDecoder:
    """Feed bytes in, take events out (`Header` first, then `Section`s); `None` means more data is needed.

    Sans-IO in the manner of h11: the caller owns the socket. `end()` says the peer closed; it raises if a header
    or section was cut short.
    """

    def __init__(self, *, expect_header: bool = True, max_section: int = MAX_SECTION) -> None:
        self._buf = bytearray()
        self._pos = 0  # bytes consumed from the stream so far
        self._need_header = expect_header
        self._max_section = max_section

    def feed(self, data: bytes | memoryview) -> None:
        self._buf += data

    def next_event(self) -> Header | Section | None:
        if self._need_header:
            return self._header()
        return self._section()

    def end(self) -> None:
        if self._buf:
            what = "header" if self._need_header else "section"
            raise StreamError(f"truncated stream: the peer closed inside a {what} at byte {self._pos} "
                              f"({len(self._buf)} bytes of it received)")

    def _take(self, n: int) -> bytes:
        out = bytes(self._buf[:n])
        del self._buf[:n]
        self._pos += n
        return out

    def _header(self) -> Header | None:
        if len(self._buf) < HEADER_FIXED.size:
            if len(self._buf) >= len(MAGIC) and bytes(self._buf[:len(MAGIC)]) != MAGIC:
                raise StreamError("not a pvmit migration stream (bad magic)")
            return None
        length = check_header_fixed(bytes(self._buf[:HEADER_FIXED.size]))
        total = HEADER_FIXED.size + length + CRC.size
        if len(self._buf) < total:
            return None
        header = parse_header(self._take(total))
        self._need_header = False
        return header

    def _section(self) -> Section | None:
        if len(self._buf) < SECTION_HEAD.size:
            return None
        kind, length = SECTION_HEAD.unpack_from(self._buf)
        start = self._pos
        check_section_head(kind, length, start, self._max_section)
        total = SECTION_HEAD.size + length + CRC.size
        if len(self._buf) < total:
            return None
        raw = self._take(total)
        (crc,) = CRC.unpack_from(raw, total - CRC.size)
        if crc != zlib.crc32(raw[:-CRC.size]):
            raise StreamError(f"{kind.decode()} section at byte {start}: checksum mismatch (corrupted)")
        return Section(kind, raw[SECTION_HEAD.size:-CRC.size], start)
