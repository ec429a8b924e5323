"""A crafted migration stream against a destination: every field is checked before use, each refusal names the
field, nothing becomes a traceback, and a waiting VMM keeps waiting (and a trickling peer cannot hold it).

The first half is pure (the header parser); the second sends crafted streams to a real `pvmit vmm --incoming`.
"""

from __future__ import annotations

import copy
import json
import re
import secrets
import socket
import time
from pathlib import Path
from typing import Any

import pytest

from pvmit.catalog.loader import Catalog
from pvmit.interface.core import VmInterface
from pvmit.interface.forms import Form, InterfaceConfig
from pvmit.interface.state import snapshot
from pvmit.kvm.system import kvm_available
from pvmit.migration.destination import Refused, parse_header
from pvmit.migration.fields import need
from pvmit.migration.stream import StreamError, Unusable, encode_header, encode_json, loads
from pvmit.migration.transport import Channel
from pvmit.net.peer import ACK
from pvmit.node.cluster import VmmHandle
from pvmit.vmm.personality import resolve

USABLE, WHY = kvm_available()
needs_kvm = [pytest.mark.kvm, pytest.mark.skipif(not USABLE, reason=f"needs a usable /dev/kvm: {WHY}")]


def valid(catalog: Catalog) -> tuple[dict[str, Any], dict[str, Any]]:
    """A header and HELO as a real source would send them for an Ice Lake guest."""
    personality = resolve(catalog, "icelake-server-v2")
    host = catalog.get("icelake-sp").facts
    config = InterfaceConfig(Form.INTEL, 0x2)
    core = VmInterface(config, host, personality.facts)
    header = {"pvmit": "0.1.0", "mode": "pre-copy", "page_size": 4096, "migration": secrets.token_hex(16),
              "vm_id": secrets.token_hex(8), "source_control": "unix:/nonexistent/src.ctl",
              "source_host": {"name": "crafted", "facts": host.to_json(), "stand_in": True},
              "vm": {"personality": personality.to_json(), "config": config.to_json(), "memory_size": 8 << 20,
                     "vcpus": 1, "cpuid": {}}}
    return header, snapshot(core)


def put(doc: dict[str, Any], path: str, value: Any) -> dict[str, Any]:
    doc = copy.deepcopy(doc)
    *parents, last = path.split(".")
    target = doc
    for p in parents:
        target = target[p]
    target[last] = value
    return doc


BAD_FIELDS = [
    ("vm.memory_size", float("inf"), "vm.memory_size must be an integer"),
    ("vm.memory_size", 1e300, "vm.memory_size must be an integer"),
    ("vm.memory_size", "8M", "vm.memory_size must be an integer"),
    ("vm.memory_size", True, "vm.memory_size must be an integer"),
    ("vm.memory_size", None, "vm.memory_size must be an integer"),
    ("vm.vcpus", None, "vm.vcpus must be an integer"),
    ("vm.vcpus", [1], "vm.vcpus must be an integer"),
    ("vm.config.supported", float("inf"), "supported must be an integer"),
    ("vm.config.supported", -1, "supported"),
    ("vm.config.form", "nope", "form 'nope' is not one of"),
    ("vm.cpuid", {"0x7.0.edx": 1 << 40}, "out of range"),
    ("vm.cpuid", [], "vm.cpuid must be an object"),
    ("vm", None, "vm must be an object"),
    ("source_host.name", "\ud800", "unpaired surrogate"),
    ("source_host.name", "x" * 5000, "longer than"),
    ("source_host.facts", {"vendor": "Foo"}, "source_host.facts"),
    ("vm.personality", {"facts": None}, "vm.personality"),
    ("migration", "../../etc", "32 lowercase hex digits"),
    ("page_size", 65536, "page_size"),
    ("mode", "turbo", "mode 'turbo'"),
]


@pytest.mark.parametrize("path,value,message", BAD_FIELDS)
def test_each_bad_header_field_is_refused_by_name(catalog: Catalog, path: str, value: Any, message: str) -> None:
    header, _ = valid(catalog)
    with pytest.raises(StreamError, match=message.replace("(", r"\(").replace("[", r"\[")):
        parse_header(put(header, path, value))


@pytest.mark.parametrize("path,value,message", [("vm.vcpus", 2, "one vCPU per guest"),
                                                ("vm.memory_size", 3 << 20, "not a multiple of 2 MiB"),
                                                ("vm.memory_size", 1 << 40, "up to 1 GiB")])
def test_what_this_vmm_cannot_take_is_a_refusal(catalog: Catalog, path: str, value: Any, message: str) -> None:
    header, _ = valid(catalog)
    with pytest.raises(Refused, match=message):
        parse_header(put(header, path, value))


@pytest.mark.parametrize("text", [b"Infinity", b"-Infinity", b"NaN", b"1e999", b"1" * 5000])
def test_unusable_numbers_are_kept_as_markers_that_no_check_takes(text: bytes) -> None:
    value = loads(b'{"n": ' + text + b"}", "test")["n"]
    assert isinstance(value, Unusable) and not isinstance(value, (int, float))
    with pytest.raises(StreamError, match=r"n must be an integer, not the number"):
        need({"n": value}, "n", int)


@pytest.mark.parametrize("text", [b"[" * 100000, b"\xff", b"{", b"{'a': 1}"])
def test_what_is_not_json_is_refused(text: bytes) -> None:
    with pytest.raises(StreamError):
        loads(text, "test")


# --- against a real waiting VMM -------------------------------------------------------------------------------------
INF = b"Infinity"  # what json.dumps writes for float("inf"): a hostile peer writes it by hand


@pytest.fixture
def dest(tmp_path: Path):  # type: ignore[no-untyped-def]
    if not USABLE:
        pytest.skip(f"needs a usable /dev/kvm: {WHY}")
    h = VmmHandle(tmp_path, "dst", ["--incoming", f"unix:{tmp_path / 'dst.mig'}", "--host-cpu", "sapphirerapids",
                                    "--deadline", "4"])
    try:
        yield h
    finally:
        h.stop()


def opened(h: VmmHandle) -> tuple[socket.socket, Channel]:
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(30)
    s.connect(str(h.log.parent / "dst.mig"))
    assert s.recv(1) == ACK
    return s, Channel(s, expect_header=False)


def accepted(h: VmmHandle, header: dict[str, Any], hello: dict[str, Any]) -> tuple[socket.socket, Channel]:
    """A connection past VRDT (accepted): the destination now waits for memory and the paused guest's state."""
    s, chan = opened(h)
    s.sendall(encode_header(header) + encode_json(b"HELO", hello))
    verdict = chan.expect(b"VRDT").json()  # type: ignore[union-attr]
    assert verdict["accepted"], verdict
    return s, chan


def refusal(chan: Channel) -> str:
    return str(chan.expect(b"NACK").json()["reason"])  # type: ignore[union-attr]


def waiting(h: VmmHandle) -> None:
    """Still there, still waiting for a guest, no traceback."""
    deadline = time.monotonic() + 10
    while h.status()["state"] != "waiting":
        assert time.monotonic() < deadline, h.status()
        time.sleep(0.05)
    assert h.proc.poll() is None
    assert "Traceback" not in h.text()


@pytest.mark.parametrize("path,value,literal,message", [
    ("vm.memory_size", float("inf"), INF, "vm.memory_size must be an integer, not the number Infinity"),
    ("vm.memory_size", float("inf"), b"1e999", "vm.memory_size must be an integer, not the number 1e999"),
    ("vm.memory_size", 1.5, None, "vm.memory_size must be an integer"),
    ("vm.config.supported", float("inf"), INF, "supported must be an integer"),
    ("vm.vcpus", None, None, "vm.vcpus must be an integer, not null"),
    ("vm.vcpus", [1, 2], None, "vm.vcpus must be an integer, not a JSON list"),
    ("vm.memory_size", 777777777, b"1" * 5000, "vm.memory_size must be an integer, not the number 1111"),
])
def test_a_crafted_header_is_refused_by_name_and_the_vmm_waits_on(catalog: Catalog, dest: VmmHandle, path: str,
                                                                  value: Any, literal: bytes | None,
                                                                  message: str) -> None:
    header, hello = valid(catalog)
    raw = encode_header(put(header, path, value))
    if literal is not None:  # rebuilt with the literal in place (and a right checksum), as a hostile peer would
        body = json.dumps(put(header, path, value)).encode().replace(
            INF if value == float("inf") else str(value).encode(), literal, 1)
        raw = encode_header_raw(body)
    s, chan = opened(dest)
    s.sendall(raw + encode_json(b"HELO", hello))
    assert message in refusal(chan)
    s.close()
    waiting(dest)


def encode_header_raw(body: bytes) -> bytes:
    import struct
    import zlib

    from pvmit.migration.stream import HEADER_FIXED, MAGIC, VERSION
    head = HEADER_FIXED.pack(MAGIC, VERSION, 0, len(body)) + body
    return head + struct.pack("<I", zlib.crc32(head))


def test_a_hostile_host_name_reaches_the_log_escaped(catalog: Catalog, dest: VmmHandle) -> None:
    header, hello = valid(catalog)
    s, chan = accepted(dest, put(header, "source_host.name", "evil\u202egnp.exe\x1b[2J\x07"), hello)
    s.close()
    waiting(dest)
    text = dest.text()
    assert "\x1b" not in text and "\u202e" not in text and "\x07" not in text
    assert "evil\\u202egnp.exe\\x1b[2J\\x07" in text, text[-800:]


REGS = ("rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rsp", "rbp", "r8", "r9", "r10", "r11", "r12", "r13", "r14",
        "r15", "rip", "rflags")


@pytest.mark.parametrize("where,literal,message", [
    ("rip", INF, "regs.rip must be an integer, not the number Infinity"),
    ("rip", b"1e999", "rip must be an integer, not the number 1e999"),
    ("rip", b"null", "rip must be an integer, not null"),
    ("rip", b"-1", "rip = -1 is out of range"),
    ("msr", INF, "msrs[0x10] must be an integer, not the number Infinity"),
    ("msr", b"NaN", "msrs[0x10] must be an integer, not the number NaN"),
    ("msr", b'"0x10"', "msrs[0x10] must be an integer, not a string"),
    ("msrkey", b"0", "MSR index"),
])
def test_crafted_vcpu_state_is_refused_by_name_after_the_pause(catalog: Catalog, dest: VmmHandle, where: str,
                                                               literal: bytes, message: str) -> None:
    header, hello = valid(catalog)
    regs = {n: 0 for n in REGS}
    regs["rip"] = 123456789
    cpus = {"regs": regs, "msrs": {"0x10": 987654321}}
    body = json.dumps(cpus).encode()
    body = body.replace(b"123456789", literal) if where == "rip" else body.replace(b"987654321", literal) \
        if where == "msr" else body.replace(b'"0x10"', b'"\\u0661\\u0660"')
    from pvmit.migration.stream import encode_section
    s, chan = accepted(dest, header, hello)
    s.sendall(encode_json(b"ISTA", hello) + encode_section(b"CPUS", body) + encode_json(b"DONE", {"pages": 0}))
    assert message in refusal(chan)
    s.close()
    waiting(dest)


@pytest.mark.parametrize("done,message", [({"pages": 5}, "DONE says 5 pages were sent, 0 arrived"),
                                          ({"pages": None}, "pages must be an integer, not null"),
                                          ({}, "field pages is missing"), ([], "must be an object")])
def test_a_wrong_page_count_is_refused(catalog: Catalog, dest: VmmHandle, done: Any, message: str) -> None:
    header, hello = valid(catalog)
    s, chan = accepted(dest, header, hello)
    s.sendall(encode_json(b"ISTA", hello) + encode_json(b"CPUS", {"regs": {}}) + encode_json(b"DONE", done))
    assert message in refusal(chan)
    s.close()
    waiting(dest)


@pytest.mark.parametrize("which", ["past the end", "wrapping", "zero run past the end"])
def test_memory_pages_beyond_guest_memory_are_refused(catalog: Catalog, dest: VmmHandle, which: str) -> None:
    from pvmit.migration.stream import encode_pages, encode_zero
    frame = {"past the end": encode_pages(2048, bytes(4096)), "wrapping": encode_pages((1 << 64) - 1, bytes(4096)),
             "zero run past the end": encode_zero(2047, 2)}[which]
    header, hello = valid(catalog)  # 8 MiB: pages 0..2047
    s, chan = accepted(dest, header, hello)
    s.sendall(frame)
    assert "beyond guest memory" in refusal(chan)
    s.close()
    waiting(dest)


def test_a_changed_configuration_after_hello_is_refused(catalog: Catalog, dest: VmmHandle) -> None:
    header, hello = valid(catalog)
    s, chan = accepted(dest, header, hello)
    changed = put(hello, "settings.force_off", 0x40)
    s.sendall(encode_json(b"ISTA", changed) + encode_json(b"CPUS", {"regs": {n: 0 for n in REGS}})
              + encode_json(b"DONE", {"pages": 0}))
    assert "configuration changed" in refusal(chan)
    s.close()
    waiting(dest)


def test_a_trickling_peer_cannot_hold_the_vmm(catalog: Catalog, dest: VmmHandle) -> None:
    """One byte a second to --incoming: the control socket answers meanwhile, the peer is cut off at the deadline
    (--deadline 4), and a real stream is taken afterwards."""
    header, hello = valid(catalog)
    s, _ = opened(dest)
    data = encode_header(header)
    t0 = time.monotonic()
    for i in range(len(data)):
        try:
            s.sendall(data[i:i + 1])
        except OSError:
            break  # cut off
        if i == 1:
            q = time.monotonic()
            assert dest.status()["state"] == "receiving" and time.monotonic() - q < 5
        if time.monotonic() - t0 > 10:
            break
        time.sleep(1.0)
    assert time.monotonic() - t0 < 12
    s.close()
    waiting(dest)
    assert "deadline passed" in dest.text()
    s, chan = accepted(dest, header, hello)
    s.close()
    waiting(dest)


def test_a_guest_that_would_see_another_cpu_is_refused_before_the_pause(catalog: Catalog, dest: VmmHandle) -> None:
    header, hello = valid(catalog)
    header = put(header, "vm.cpuid", {"0x0.0.ebx": 0x12345678})  # not the vendor this destination shows
    s, chan = opened(dest)
    s.sendall(encode_header(header) + encode_json(b"HELO", hello))
    verdict = chan.expect(b"VRDT").json()  # type: ignore[union-attr]
    assert not verdict["accepted"]
    assert any("would see a different CPU here: CPUID 0x0.0.ebx: 0x12345678 on the source" in r
               for r in verdict["reasons"]), verdict
    s.close()
    waiting(dest)


@pytest.mark.parametrize("path,value,message", [
    ("vm.config.bhb_long", 1, "bhb_long must be true or false, not 1"),
    ("vm.config.pool", {}, "pool must be a list, not a JSON object"),
    ("vm.config.pool", [], "pool has 0 entries"),
    ("vm.config.pool", [{}] * 33, "pool has 33 entries"),
    ("vm.config.pool", [7], "pool[0] must be an object, not 7"),
    ("vm.config.neutral_pool_msr", -1, "neutral_pool_msr = -1 is out of range"),
])
def test_the_pool_description_a_header_carries_is_checked(catalog: Catalog, path: str, value: Any,
                                                          message: str) -> None:
    header, _ = valid(catalog)
    with pytest.raises(StreamError, match=re.escape(message)):
        parse_header(put(header, path, value))
