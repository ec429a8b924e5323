"""The migration stream codec, without sockets: framing, checksums and every refusal."""

from __future__ import annotations

import struct

import pytest

from pvmit.migration.stream import (
    PAGE,
    Header,
    Section,
    StreamDecoder,
    StreamError,
    decode_pages,
    encode_header,
    encode_json,
    encode_pages,
    encode_section,
)


def decode_all(data: bytes, chunk: int = 7) -> list[Header | Section]:
    d = StreamDecoder()
    events: list[Header | Section] = []
    for i in range(0, len(data), chunk):
        d.feed(data[i:i + chunk])
        while (e := d.next_event()) is not None:
            events.append(e)
    d.end()
    return events


def sample_stream() -> bytes:
    return (encode_header({"vm": {"memory_size": 8 << 20}}) + encode_json(b"HELO", {"a": 1})
            + encode_pages(3, bytes(range(256)) * 32) + encode_json(b"DONE", {"pages": 2}))


def test_round_trip_in_any_chunking() -> None:
    for chunk in (1, 7, 4096, 1 << 20):
        events = decode_all(sample_stream(), chunk)
        assert isinstance(events[0], Header) and events[0].info == {"vm": {"memory_size": 8 << 20}}
        kinds = [e.kind for e in events[1:] if isinstance(e, Section)]
        assert kinds == [b"HELO", b"MEMP", b"DONE"]
        first, pages = decode_pages(events[2])  # type: ignore[arg-type]
        assert first == 3 and len(pages) == 2 * PAGE and bytes(pages[:3]) == b"\x00\x01\x02"


def test_truncated_stream_is_refused_at_the_end() -> None:
    data = sample_stream()
    for cut in (5, 30, len(data) - 1):
        with pytest.raises(StreamError, match="truncated stream"):
            decode_all(data[:cut])


def test_every_bit_flip_in_a_section_is_caught() -> None:
    data = bytearray(sample_stream())
    header_len = len(encode_header({"vm": {"memory_size": 8 << 20}}))
    for pos in range(header_len, len(data), 97):
        flipped = bytearray(data)
        flipped[pos] ^= 0x10
        with pytest.raises(StreamError):
            decode_all(bytes(flipped))


def test_header_errors() -> None:
    with pytest.raises(StreamError, match="version 7 is not supported"):
        decode_all(encode_header({}, version=7))
    with pytest.raises(StreamError, match="flags 0x0002: this pvmit defines none"):
        decode_all(encode_header({}, flags=2))
    with pytest.raises(StreamError, match="bad magic"):
        decode_all(b"NOTPVMIT" + bytes(20))
    bad = bytearray(encode_header({"x": 1}))
    bad[-6] ^= 1
    with pytest.raises(StreamError, match="header: checksum mismatch"):
        decode_all(bytes(bad))
    with pytest.raises(StreamError, match="not a JSON object"):
        decode_all(encode_header([1, 2]))  # type: ignore[arg-type]


def test_unknown_and_oversized_sections() -> None:
    head = struct.pack("<4sQ", b"XTRA", 0)
    import zlib
    with pytest.raises(StreamError, match="unknown section kind b'XTRA'"):
        decode_all(encode_header({}) + head + struct.pack("<I", zlib.crc32(head)))
    d = StreamDecoder(max_section=100)
    d.feed(encode_header({}) + encode_section(b"MEMP", bytes(200)))
    d.next_event()
    with pytest.raises(StreamError, match="over the limit"):
        d.next_event()
    with pytest.raises(ValueError):
        encode_section(b"NOPE", b"")


def test_inconsistent_page_section() -> None:
    s = Section(b"MEMP", struct.pack("<QI", 0, 2) + bytes(PAGE), 0)
    with pytest.raises(StreamError, match="says 2 pages but carries 4096 bytes"):
        decode_pages(s)
    with pytest.raises(StreamError, match="not valid JSON"):
        Section(b"ISTA", b"{nope", 12).json()


def test_listen_replaces_only_a_stale_unix_socket(tmp_path) -> None:  # type: ignore[no-untyped-def]
    import socket as _socket

    from pvmit.errors import InputError
    from pvmit.migration.transport import Address

    path = tmp_path / "vmm.sock"
    dead = _socket.socket(_socket.AF_UNIX)
    dead.bind(str(path))
    dead.close()  # the path stays, nobody listens: what a VMM that was killed leaves behind
    addr = Address.parse(f"unix:{path}")
    live = addr.listen()
    assert path.stat().st_mode & 0o777 == 0o600  # only the owner may connect
    try:
        with pytest.raises(InputError, match="another process is listening there"):
            addr.listen()
    finally:
        live.close()
        addr.unlink()
    assert not path.exists()
    path.write_text("not a socket")
    with pytest.raises(InputError, match="exists and is not a socket"):
        addr.listen()
    assert path.read_text() == "not a socket"
