"""The migration stream on a socket: framed sends and receives with deadlines, memory pages without copies.

The framing rules are `stream`'s (one copy); this module only moves bytes. Every read and write is bounded twice:
by an idle limit (no byte for that long) and by the channel's overall deadline, so a peer that trickles one byte
every few seconds cannot hold a VMM. Guest pages are written from a memoryview over guest memory in one vectored
send (no copy in Python) and received straight into guest memory (`receive(into=...)`), their checksum computed
there.
"""

from __future__ import annotations

import socket
import ssl
import time
import zlib
from dataclasses import dataclass

from pvmit.migration.stream import (
    CRC,
    HEADER_FIXED,
    PAGE,
    PAGES_HEAD,
    SECTION_HEAD,
    Header,
    Section,
    StreamError,
    check_header_fixed,
    check_section_head,
    parse_header,
)
from pvmit.net.address import Address, PeerGone

__all__ = ["Address", "Channel", "PeerClosed", "PeerGone", "Pages", "StreamTimeout"]

IDLE_SECONDS = 30.0


class PeerClosed(ConnectionError):
    """The peer closed the connection cleanly between messages."""


class StreamTimeout(ConnectionError):
    """The peer sent or took nothing for the idle limit, or the channel's overall deadline passed."""


@dataclass(frozen=True)
class Pages:
    """A MEMP section received straight into guest memory: pages [first, first + count) now hold it."""

    first: int
    count: int
    offset: int
    kind: bytes = b"MEMP"


class Channel:
    """A connected socket (plain or TLS) carrying the migration stream in one direction and answers in the other."""

    def __init__(self, sock: socket.socket, *, expect_header: bool, idle: float = IDLE_SECONDS,
                 deadline: float | None = None) -> None:
        self.sock = sock
        self.idle = idle
        self.deadline = deadline  # time.monotonic() after which every operation fails; None: only the idle limit
        self._need_header = expect_header
        self._pos = 0  # bytes of the stream received so far
        self._head = bytearray(PAGES_HEAD.size + SECTION_HEAD.size)
        self.sent = 0
        self.received = 0
        self._vectored = not isinstance(sock, ssl.SSLSocket)  # SSLSocket has no sendmsg

    # --- limits ------------------------------------------------------------------------------------------------
    def _arm(self) -> None:
        limit = self.idle
        if self.deadline is not None:
            left = self.deadline - time.monotonic()
            if left <= 0:
                raise StreamTimeout("the migration's deadline passed")
            limit = min(limit, left)
        self.sock.settimeout(limit)

    def _timeout(self, what: str) -> StreamTimeout:
        if self.deadline is not None and time.monotonic() >= self.deadline:
            return StreamTimeout(f"the migration's deadline passed while {what}")
        return StreamTimeout(f"the peer stalled: nothing for {self.idle:g} s while {what}")

    # --- sending -----------------------------------------------------------------------------------------------
    def send(self, *parts: bytes | memoryview) -> None:
        """Send the parts in order, as one write where the socket allows (a vectored sendmsg: nothing copied)."""
        try:
            if self._vectored and len(parts) > 1:
                views = [memoryview(p).cast("B") for p in parts]
                while views:
                    self._arm()
                    n = self.sock.sendmsg(views)
                    self.sent += n
                    while views and n >= len(views[0]):
                        n -= len(views[0])
                        views.pop(0)
                    if views and n:
                        views[0] = views[0][n:]
            else:
                for p in parts:
                    self._arm()
                    self.sock.sendall(p)
                    self.sent += len(p)
        except TimeoutError:
            raise self._timeout("sending") from None

    # --- receiving ---------------------------------------------------------------------------------------------
    def _read_into(self, view: memoryview, what: str) -> None:
        got = 0
        while got < len(view):
            self._arm()
            try:
                n = self.sock.recv_into(view[got:])
            except TimeoutError:
                raise self._timeout(f"receiving {what}") from None
            if not n:
                if got == 0 and what == "the next section":
                    raise PeerClosed("the peer closed the connection")
                raise StreamError(f"truncated stream: the peer closed inside {what} at byte {self._pos + got}")
            got += n
            self.received += n
        self._pos += got

    def _read(self, n: int, what: str) -> bytes:
        buf = bytearray(n)
        self._read_into(memoryview(buf), what)
        return bytes(buf)

    def receive(self, into: memoryview | None = None) -> Header | Section | Pages:
        """The next header or section. With `into` (guest memory), a MEMP section's pages are read straight into it
        after their range is checked, and come back as `Pages`. PeerClosed on a clean close between sections,
        StreamError on a cut or corrupt stream, StreamTimeout when the peer stalls."""
        if self._need_header:
            start = self._pos
            fixed = self._read(HEADER_FIXED.size, "the stream header")
            try:
                length = check_header_fixed(fixed)
            except StreamError as e:
                raise StreamError(f"{e} (at byte {start})") from None
            header = parse_header(fixed + self._read(length + CRC.size, "the stream header"))
            self._need_header = False
            return header
        offset = self._pos
        head = self._read(SECTION_HEAD.size, "the next section")
        kind, length = SECTION_HEAD.unpack(head)
        check_section_head(kind, length, offset)
        name = f"the {kind.decode()} section at byte {offset}"
        if kind == b"MEMP" and into is not None and length >= PAGES_HEAD.size:
            pages_head = self._read(PAGES_HEAD.size, name)
            first, count = PAGES_HEAD.unpack(pages_head)
            if length != PAGES_HEAD.size + count * PAGE:
                raise StreamError(f"MEMP section at byte {offset}: says {count} pages but carries "
                                  f"{length - PAGES_HEAD.size} bytes")
            if (first + count) * PAGE > len(into):
                raise StreamError(f"MEMP section at byte {offset} writes beyond guest memory (pages {first}.."
                                  f"{first + count - 1}, guest has {len(into) // PAGE})")
            target = into[first * PAGE:(first + count) * PAGE]
            self._read_into(target, name)
            crc = zlib.crc32(target, zlib.crc32(pages_head, zlib.crc32(head)))
            if CRC.unpack(self._read(CRC.size, name))[0] != crc:
                raise StreamError(f"MEMP section at byte {offset}: checksum mismatch (corrupted)")
            return Pages(first, count, offset)
        body = self._read(length + CRC.size, name)
        if CRC.unpack_from(body, length)[0] != zlib.crc32(body[:length], zlib.crc32(head)):
            raise StreamError(f"{kind.decode()} section at byte {offset}: checksum mismatch (corrupted)")
        return Section(kind, body[:length], offset)

    def expect(self, *kinds: bytes, into: memoryview | None = None) -> Section | Pages:
        event = self.receive(into)
        if isinstance(event, Header):
            raise StreamError("unexpected second stream header")
        if event.kind not in kinds:
            raise StreamError(f"expected {' or '.join(k.decode() for k in kinds)}, got {event.kind.decode()} "
                              f"at byte {event.offset}")
        return event

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass
