"""The stream header's checks, field by field and bound by bound, with whole messages (issue 15: mutation survivors
of destination.parse_header / _config / _parse, and of stream, fields, transport and vmstate).

Every integer field is tried exactly at each bound (taken) and one past it (refused with the message that names the
field and the range), every string at its longest (taken) and one character longer (refused), each with the exact
text an operator reads. Pure: no VMM process, so a mutant of the code under test is what runs.
"""

from __future__ import annotations

import base64
import copy
import ctypes as C
import socket
import threading
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from test_migration_inprocess import source_vmm
from test_stream_validation import put, valid

from pvmit.catalog.loader import Catalog
from pvmit.interface.pooldesc import Implementation
from pvmit.kvm import abi
from pvmit.kvm.system import Kvm, kvm_available
from pvmit.migration import destination, stream, transport, vmstate
from pvmit.migration.destination import Incoming, Refused, parse_header
from pvmit.migration.fields import need, optional
from pvmit.migration.stream import PAGE, Header, Section, StreamDecoder, StreamError, encode_header, encode_json
from pvmit.migration.transport import Channel, Pages, PeerClosed, StreamTimeout
from pvmit.net.text import shorten
from pvmit.net.tls import Credentials, make_test_ca
from pvmit.vmm.vmm import Vmm

DELETE = object()
OK = "ok"
H = "migration stream header"
CFG = f"{H}: vm.config: {H} vm.config"  # _config's own checks, inside _parse's naming of vm.config
ENTRY = Implementation("intel", 6, 0x6A, 4, 6).to_json()
CTRLS = "a" + "\x01" * 31  # 32 characters that escape to 4 each: shows how far a message shortens them


def edited(header: dict[str, Any], path: str, value: Any) -> dict[str, Any]:
    if value is not DELETE:
        return put(header, path, value)
    header = copy.deepcopy(header)
    *parents, last = path.split(".")
    target = header
    for p in parents:
        target = target[p]
    del target[last]
    return header


def outcome(header: dict[str, Any]) -> str:
    """OK, 'refused: ...' (Refused) or the StreamError's whole text."""
    try:
        parse_header(header)
    except Refused as e:
        return f"refused: {e}"
    except StreamError as e:
        return str(e)
    return OK


def oor(name: str, value: int, lo: int, hi: int, where: str = H) -> str:
    return f"{where}: {name} = {value} is out of range {lo}..{hi}"


U32, U64 = (1 << 32) - 1, (1 << 64) - 1
NOT_MODE = "is not pre-copy, stop-and-copy or check"
NOT_FORM = "is not one of intel, kvm, neutral"
MEMORY = "bytes is not a multiple of 2 MiB up to 1 GiB"

CASES: list[tuple[str, Any, str]] = [
    # strings: at max_len, one past, wrong type, missing
    ("pvmit", "x" * 64, OK),
    ("pvmit", "x" * 65, f"{H}: pvmit is longer than 64 characters"),
    ("pvmit", DELETE, f"{H}: field pvmit is missing"),
    ("mode", "check", OK),
    ("mode", "stop-and-copy", OK),
    ("mode", "m" * 32, f"{H}: mode {'m' * 32!r} {NOT_MODE}"),
    ("mode", "m" * 33, f"{H}: mode is longer than 32 characters"),
    ("mode", CTRLS, f"{H}: mode {shorten(CTRLS, 32)!r} {NOT_MODE}"),
    ("page_size", 4095, oor("page_size", 4095, 4096, 4096)),
    ("page_size", 4097, oor("page_size", 4097, 4096, 4096)),
    ("migration", "a" * 31, f"{H}: migration must be 32 lowercase hex digits"),
    ("migration", "A" * 32, f"{H}: migration must be 32 lowercase hex digits"),
    ("migration", "a" * 33, f"{H}: migration is longer than 32 characters"),
    ("vm_id", "", f"{H}: vm_id must be lowercase hex digits"),
    ("vm_id", "XYZ", f"{H}: vm_id must be lowercase hex digits"),
    ("vm_id", "a" * 32, OK),
    ("vm_id", "a" * 33, f"{H}: vm_id is longer than 32 characters"),
    ("source_control", "s" * 600, OK),
    ("source_control", "s" * 601, f"{H}: source_control is longer than 600 characters"),
    ("source_control", 5, f"{H}: source_control must be a string, not 5"),
    ("source_control", DELETE, OK),
    ("source_host.name", "n" * 256, OK),
    ("source_host.name", "n" * 257, f"{H}: source_host.name is longer than 256 characters"),
    ("source_host.facts", {}, f"{H}: source_host.facts: CPU facts: vendor None is not one of intel, amd, hygon"),
    ("vm.personality", {}, f"{H}: vm.personality: CPU facts: expected a JSON object"),
    # vm.config (_config)
    ("vm.config", {}, f"{CFG}: field form is missing"),
    ("vm.config.form", "kvm", OK),
    ("vm.config.form", "f" * 16, f"{CFG}: form {'f' * 16!r} {NOT_FORM}"),
    ("vm.config.form", "f" * 17, f"{CFG}: form is longer than 16 characters"),
    ("vm.config.form", 3, f"{CFG}: form must be a string, not 3"),
    ("vm.config.form", CTRLS[:16], f"{CFG}: form {shorten(CTRLS[:16], 20)!r} {NOT_FORM}"),
    ("vm.config.supported", 0, OK),
    ("vm.config.supported", -1, oor("supported", -1, 0, U64, CFG)),
    ("vm.config.supported", U64, f"{H}: vm.config: supported bits {U64:#x}: only bits 0 and 1 are defined"),
    ("vm.config.supported", U64 + 1, oor("supported", U64 + 1, 0, U64, CFG)),
    ("vm.config.supported", DELETE, f"{CFG}: field supported is missing"),
    ("vm.config.neutral_base", -1, oor("neutral_base", -1, 0, U32, CFG)),
    ("vm.config.neutral_base", 0,
     f"{H}: vm.config: neutral_base 0x0 is not a 0x100-aligned base in 0x40000000-0x4000ff00"),
    ("vm.config.neutral_base", U32,
     f"{H}: vm.config: neutral_base 0xffffffff is not a 0x100-aligned base in 0x40000000-0x4000ff00"),
    ("vm.config.neutral_base", U32 + 1, oor("neutral_base", U32 + 1, 0, U32, CFG)),
    ("vm.config.neutral_base", True, f"{CFG}: neutral_base must be an integer, not true"),
    ("vm.config.neutral_base", "x", f"{CFG}: neutral_base must be an integer, not a string ('x')"),
    ("vm.config.neutral_base", 0x40000100, OK),
    ("vm.config.neutral_msr", -1, oor("neutral_msr", -1, 0, U32, CFG)),
    ("vm.config.neutral_msr", 0,
     f"{H}: vm.config: neutral_msr 0x0: outside 0x40000000-0x5fffffff, the block kept for hypervisor registers"),
    ("vm.config.neutral_msr", U32, f"{H}: vm.config: neutral_msr 0xffffffff: outside 0x40000000-0x5fffffff, "
                                   "the block kept for hypervisor registers"),
    ("vm.config.neutral_msr", U32 + 1, oor("neutral_msr", U32 + 1, 0, U32, CFG)),
    ("vm.config.neutral_msr", True, f"{CFG}: neutral_msr must be an integer, not true"),
    ("vm.config.neutral_msr", "x", f"{CFG}: neutral_msr must be an integer, not a string ('x')"),
    ("vm.config.neutral_pool_msr", -1, oor("neutral_pool_msr", -1, 0, U32, CFG)),
    ("vm.config.neutral_pool_msr", 0, OK),
    ("vm.config.neutral_pool_msr", U32, OK),
    ("vm.config.neutral_pool_msr", U32 + 1, oor("neutral_pool_msr", U32 + 1, 0, U32, CFG)),
    ("vm.config.neutral_pool_msr", True, f"{CFG}: neutral_pool_msr must be an integer, not true"),
    ("vm.config.bhb_long", 1, f"{CFG}: bhb_long must be true or false, not 1"),
    ("vm.config.bhb_long", True, OK),
    ("vm.config.bhb_long", None, OK),
    ("vm.config.pool", None, OK),
    ("vm.config.pool", [], f"{CFG}: pool has 0 entries, a description has 1 to 32"),
    ("vm.config.pool", [ENTRY], OK),
    ("vm.config.pool", [ENTRY] * 32, OK),
    ("vm.config.pool", [ENTRY] * 33, f"{CFG}: pool has 33 entries, a description has 1 to 32"),
    ("vm.config.pool", {}, f"{CFG}: pool must be a list, not a JSON object"),
    ("vm.config.pool", [ENTRY, 5], f"{CFG}: pool[1] must be an object, not 5"),
    ("vm.config.pool", [{}], f"{H}: vm.config: a pool entry has no 'family'"),
    # vm: memory and vCPUs (a refusal of what this VMM cannot run, a StreamError for what no VMM could)
    ("vm.memory_size", -1, oor("vm.memory_size", -1, 0, 1 << 62)),
    ("vm.memory_size", 0, f"refused: guest memory of 0 {MEMORY}"),
    ("vm.memory_size", 2 << 20, OK),
    ("vm.memory_size", 1 << 30, OK),
    ("vm.memory_size", (1 << 30) + (2 << 20), f"refused: guest memory of {(1 << 30) + (2 << 20)} {MEMORY}"),
    ("vm.memory_size", 1 << 62, f"refused: guest memory of {1 << 62} {MEMORY}"),
    ("vm.memory_size", (1 << 62) + 1, oor("vm.memory_size", (1 << 62) + 1, 0, 1 << 62)),
    ("vm.memory_size", DELETE, f"{H}: field vm.memory_size is missing"),
    ("vm.vcpus", -1, oor("vm.vcpus", -1, 0, 1 << 16)),
    ("vm.vcpus", 0, "refused: this VMM runs one vCPU per guest; the stream describes 0"),
    ("vm.vcpus", 1 << 16, f"refused: this VMM runs one vCPU per guest; the stream describes {1 << 16}"),
    ("vm.vcpus", (1 << 16) + 1, oor("vm.vcpus", (1 << 16) + 1, 0, 1 << 16)),
    # vm.cpuid
    ("vm.cpuid", DELETE, OK),
    ("vm.cpuid", [], f"{H}: vm.cpuid must be an object, not a JSON list"),
    ("vm.cpuid", {f"k{i}": i for i in range(256)}, OK),
    ("vm.cpuid", {f"k{i}": i for i in range(257)}, f"{H}: vm.cpuid has more than 256 registers"),
    ("vm.cpuid", {"k" * 32: 0}, OK),
    ("vm.cpuid", {"k" * 33: 0}, f"{H}: vm.cpuid key is longer than 32 characters"),
    ("vm.cpuid", {5: 0}, f"{H}: vm.cpuid key must be a string, not 5"),
    ("vm.cpuid", {"a": -1}, oor("vm.cpuid[a]", -1, 0, U32)),
    ("vm.cpuid", {"a": 0}, OK),
    ("vm.cpuid", {"a": U32}, OK),
    ("vm.cpuid", {"a": U32 + 1}, oor("vm.cpuid[a]", U32 + 1, 0, U32)),
    ("vm.cpuid", {"a": "x"}, f"{H}: vm.cpuid[a] must be an integer, not a string ('x')"),
    ("vm.cpuid", {CTRLS: -1}, oor(f"vm.cpuid[{shorten(CTRLS, 32)}]", -1, 0, U32)),
]


@pytest.mark.parametrize("path,value,expected", CASES, ids=[f"{p}-{i}" for i, (p, _, _) in enumerate(CASES)])
def test_each_header_field_at_and_past_its_bounds(catalog: Catalog, path: str, value: Any, expected: str) -> None:
    header, _ = valid(catalog)
    assert outcome(edited(header, path, value)) == expected


def test_shortened_values_in_messages_keep_their_limits() -> None:
    """The limits of `shorten` in the messages are part of what the tables above pin: spelled out here."""
    assert shorten(CTRLS, 32) == "a" + "\\x01" * 7 + "... (32 characters)"
    assert shorten(CTRLS[:16], 20) == "a" + "\\x01" * 4 + "... (16 characters)"


def test_a_valid_header_gives_what_it_says(catalog: Catalog) -> None:
    header, _ = valid(catalog)
    header = put(header, "vm.cpuid", {"0x7.0.edx": 5})
    incoming = parse_header(header)
    assert isinstance(incoming, Incoming)
    assert (incoming.memory, incoming.source, incoming.cpuid, incoming.migration, incoming.vm_id,
            incoming.source_control) == (8 << 20, "crafted", {"0x7.0.edx": 5}, header["migration"],
                                         header["vm_id"], "unix:/nonexistent/src.ctl")
    assert incoming.config.to_json() == header["vm"]["config"]
    assert incoming.personality.to_json() == header["vm"]["personality"]
    bare = edited(edited(header, "source_control", DELETE), "vm.cpuid", DELETE)
    assert (parse_header(bare).source_control, parse_header(bare).cpuid) == ("", {})


def test_parse_names_a_missing_key_and_passes_other_errors_through() -> None:
    def lookup(doc: Any) -> Any:
        return doc["vendor"]

    with pytest.raises(StreamError) as e:
        destination._parse("source_host.facts", lookup, {})
    assert str(e.value) == f"{H}: source_host.facts: missing field 'vendor'"
    with pytest.raises(StreamError) as e:
        destination._parse("vm.memory", int, "eight")
    assert str(e.value) == f"{H}: vm.memory: invalid literal for int() with base 10: 'eight'"


# --- vmstate.restore: every field of a CPUS section, on a real vCPU --------------------------------------------------
USABLE, WHY = kvm_available()
CPUS = "CPUS section"
BOGUS_MSR, BOGUS_MSR2 = "0x12345678", "0x12345679"  # no MSR there: KVM refuses to set them


@pytest.fixture(scope="module")
def paused(catalog: Catalog) -> Iterator[tuple[Vmm, dict[str, Any]]]:
    if not USABLE:
        pytest.skip(f"needs a usable /dev/kvm: {WHY}")
    with Kvm() as kvm:
        vmm = source_vmm(kvm, catalog)
        yield vmm, vmstate.capture(vmm.vcpu)


def _with(state: dict[str, Any], path: str, value: Any) -> dict[str, Any]:
    return edited(state, path, value)


def _blob(raw: bytes) -> str:
    return base64.b64encode(raw).decode()


LONG_KEY = "y" * 41
VMSTATE_CASES: list[tuple[str, Any, Any]] = [
    ("regs", DELETE, f"{CPUS}: field regs is missing"),
    ("regs", [], f"{CPUS}: regs must be an object, not a JSON list"),
    ("regs.rax", -1, oor("regs.rax", -1, 0, U64, CPUS)),
    ("regs.rax", U64, []),
    ("regs.rax", U64 + 1, oor("regs.rax", U64 + 1, 0, U64, CPUS)),
    ("regs.rip", DELETE, f"{CPUS}: field regs.rip is missing"),
    ("msrs", DELETE, []),
    ("msrs", [], f"{CPUS}: msrs must be an object, not a JSON list"),
    ("msrs", {f"0x{i:x}": 0 for i in range(len(vmstate.CARRIED_MSRS) + 1)},
     f"{CPUS}: {len(vmstate.CARRIED_MSRS) + 1} MSRs, more than the {len(vmstate.CARRIED_MSRS)} a pvmit VMM carries"),
    ("msrs", {"0x10": -1}, oor("msrs[0x10]", -1, 0, U64, CPUS)),
    ("msrs", {"0x10": "x"}, f"{CPUS}: msrs[0x10] must be an integer, not a string ('x')"),
    ("msrs", {"0x10": U64 + 1}, oor("msrs[0x10]", U64 + 1, 0, U64, CPUS)),
    ("msrs", {"0x10": U64}, []),
    ("msrs", {"0x": 0}, f"{CPUS}: MSR index '0x' is not 0x followed by up to 8 hex digits"),
    ("msrs", {"0x1": 0}, ["MSR 0x1"]),
    ("msrs", {"0xAB": 0}, ["MSR 0xab"]),
    ("msrs", {BOGUS_MSR: 0}, [f"MSR {BOGUS_MSR}"]),
    ("msrs", {BOGUS_MSR + "0": 0}, f"{CPUS}: MSR index '{BOGUS_MSR}0' is not 0x followed by up to 8 hex digits"),
    ("msrs", {"10": 0}, f"{CPUS}: MSR index '10' is not 0x followed by up to 8 hex digits"),
    ("msrs", {"0xZ1": 0}, f"{CPUS}: MSR index '0xZ1' is not 0x followed by up to 8 hex digits"),
    ("msrs", {"0xX1": 0}, f"{CPUS}: MSR index '0xX1' is not 0x followed by up to 8 hex digits"),
    ("msrs", {LONG_KEY: 0}, f"{CPUS}: MSR index {shorten(LONG_KEY, 40)!r} is not 0x followed by up to 8 hex digits"),
    ("msrs", {BOGUS_MSR: 0, BOGUS_MSR2: 0, "0x10": 5}, [f"MSR {BOGUS_MSR}", f"MSR {BOGUS_MSR2}"]),
    ("sregs", "!!", f"{CPUS}: sregs is not base64"),
    ("fpu", "AAAA", f"{CPUS}: fpu has 3 bytes, expected {C.sizeof(abi.KvmFpu)}"),
    ("events", "!!", f"{CPUS}: events is not base64"),
    ("events", DELETE, f"{CPUS}: events must be a base64 string of {C.sizeof(abi.KvmVcpuEvents)} bytes"),
    ("xsave", "!!", f"{CPUS}: xsave is not base64"),
    ("xcrs", DELETE, []),
    ("mp_state", _blob(b"\x63\0\0\0"), ["mp_state (KVM_SET_MP_STATE failed: EINVAL (Invalid argument))"]),
    (LONG_KEY, 1, f"{CPUS}: unknown field {shorten(LONG_KEY, 40)!r}"),
]


@pytest.mark.kvm
@pytest.mark.parametrize("path,value,expected", VMSTATE_CASES,
                         ids=[f"{p[:12]}-{i}" for i, (p, _, _) in enumerate(VMSTATE_CASES)])
def test_each_vcpu_state_field_is_checked_and_what_kvm_refuses_is_named(
        paused: tuple[Vmm, dict[str, Any]], path: str, value: Any, expected: Any) -> None:
    vmm, state = paused
    try:
        got: Any = vmstate.restore(vmm.vcpu, _with(state, path, value))
    except StreamError as e:
        got = str(e)
    assert got == expected
    assert vmstate.restore(vmm.vcpu, state) == []  # the next case starts from the captured state


@pytest.mark.kvm
def test_vcpu_state_that_is_not_an_object_is_refused(paused: tuple[Vmm, dict[str, Any]]) -> None:
    with pytest.raises(StreamError) as e:
        vmstate.restore(paused[0].vcpu, [])
    assert str(e.value) == f"{CPUS}: not a JSON object"


@pytest.mark.kvm
def test_capture_carries_every_msr_this_kvm_has(paused: tuple[Vmm, dict[str, Any]]) -> None:
    vmm, state = paused
    have = {f"{i:#x}" for i in vmstate.CARRIED_MSRS if vmm.vcpu.get_msrs([i])}
    assert set(state["msrs"]) == have


@pytest.mark.kvm
def test_capture_skips_an_msr_this_kvm_lacks_and_goes_on(paused: tuple[Vmm, dict[str, Any]],
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """KVM_GET_MSRS stops at an MSR it does not know: capture leaves that one out and asks again from the next."""
    vmm, state = paused
    carried = list(vmstate.CARRIED_MSRS)
    lacking = [carried[2], int(BOGUS_MSR, 16), carried[3]]  # one this KVM has before and after the unknown one
    monkeypatch.setattr(vmstate, "CARRIED_MSRS", (*carried[:2], *lacking, *carried[4:]))
    assert not vmm.vcpu.get_msrs([int(BOGUS_MSR, 16)])
    assert vmstate.capture(vmm.vcpu)["msrs"].keys() == state["msrs"].keys()
    assert f"{carried[3]:#x}" in state["msrs"]


# --- fields: the messages of the typed access ------------------------------------------------------------------------
class _Listish(list[Any]):
    """A list by type, under another name: still described as a JSON list."""


@pytest.mark.parametrize("call,expected", [
    (lambda: need(5, "a.b", int), f"{H}: the document must be an object, not 5"),
    (lambda: need({"a": 5}, "a.b", int), f"{H}: a must be an object, not 5"),
    (lambda: need({"a": 5}, "a", str), f"{H}: a must be a string, not 5"),
    (lambda: need({"a": _Listish()}, "a", int), f"{H}: a must be an integer, not a JSON list"),
    (lambda: need({"a": 10 ** 45}, "a", int, hi=0),
     f"{H}: a = {shorten(str(10 ** 45), 40)} is out of range -inf..0"),
    (lambda: optional({"a": "x"}, "a", int, 0, where="W"), "W: a must be an integer, not a string ('x')"),
])
def test_field_messages(call: Any, expected: str) -> None:
    with pytest.raises(StreamError) as e:
        call()
    assert str(e.value) == expected
    assert shorten(str(10 ** 45), 40) == "1" + "0" * 39 + "... (46 characters)"


# --- stream: framing checks, whole messages --------------------------------------------------------------------------
def _stream_error(call: Any) -> str:
    with pytest.raises(StreamError) as e:
        call()
    return str(e.value)


def test_pages_frame_takes_only_whole_pages() -> None:
    with pytest.raises(ValueError) as e:
        stream.pages_frame(0, bytes(PAGE + 1))
    assert str(e.value) == "page data must be whole pages"


def test_zero_section_of_the_wrong_size() -> None:
    assert _stream_error(lambda: stream.decode_zero(Section(b"ZERO", b"\0" * 11, 77))) == (
        "ZERO section at byte 77: 11 bytes, expected 12")


def _fixed(magic: bytes = stream.MAGIC, version: int = stream.VERSION, flags: int = 0, length: int = 0) -> bytes:
    return stream.HEADER_FIXED.pack(magic, version, flags, length)


def test_fixed_header_checks() -> None:
    assert stream.check_header_fixed(_fixed(length=stream.MAX_HEADER)) == stream.MAX_HEADER
    assert _stream_error(lambda: stream.check_header_fixed(_fixed(length=stream.MAX_HEADER + 1))) == (
        f"migration stream header of {stream.MAX_HEADER + 1} bytes is larger than the limit {stream.MAX_HEADER}")
    assert _stream_error(lambda: stream.check_header_fixed(_fixed(magic=b"PVMITMIX"))) == (
        "not a pvmit migration stream (bad magic)")
    assert _stream_error(lambda: stream.check_header_fixed(_fixed(flags=1))) == (
        "migration stream header flags 0x0001: this pvmit defines none (a newer source asking for something it "
        "cannot do)")
    assert _stream_error(lambda: stream.check_header_fixed(_fixed(version=1))) == (
        "migration stream version 1 is not supported (this pvmit speaks 2)")


def _signed(body: bytes) -> bytes:
    head = _fixed(length=len(body)) + body
    return head + stream.CRC.pack(zlib.crc32(head))


def test_whole_header_checks() -> None:
    good = encode_header({"a": 1})
    header = stream.parse_header(good)
    assert (header.version, header.flags, header.info) == (stream.VERSION, 0, {"a": 1})
    assert _stream_error(lambda: stream.parse_header(good + b"x")) == (
        "migration stream header: length does not match")
    assert _stream_error(lambda: stream.parse_header(good[:-1] + bytes([good[-1] ^ 1]))) == (
        "migration stream header: checksum mismatch (corrupted)")
    assert _stream_error(lambda: stream.parse_header(_signed(b"[1]"))) == (
        "migration stream header: not a JSON object")
    assert _stream_error(lambda: stream.parse_header(_signed(b"{"))).startswith(
        "migration stream header: not valid JSON: ")


def test_decoder_checks_a_fixed_header_or_section_head_as_soon_as_it_is_whole() -> None:
    d = StreamDecoder()
    d.feed(_fixed(version=9))  # exactly the fixed part: checked now, not after more bytes
    assert _stream_error(d.next_event) == "migration stream version 9 is not supported (this pvmit speaks 2)"
    d = StreamDecoder()
    d.feed(encode_header({}))
    assert isinstance(d.next_event(), Header)
    d.feed(stream.SECTION_HEAD.pack(b"XXXX", 0))  # exactly a section head, of a kind nobody sends
    assert _stream_error(d.next_event) == f"unknown section kind b'XXXX' at byte {len(encode_header({}))}"


# --- transport: a Channel over a socket pair -------------------------------------------------------------------------
class _Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def monotonic(self) -> float:
        return self.now


def test_the_deadline_has_passed_at_its_very_instant(monkeypatch: pytest.MonkeyPatch) -> None:
    a, b = socket.socketpair()
    with a, b:
        chan = Channel(a, expect_header=False, idle=7, deadline=100.0)
        monkeypatch.setattr(transport, "time", _Clock(100.0))
        assert str(chan._timeout("sending")) == "the migration's deadline passed while sending"
        monkeypatch.setattr(transport, "time", _Clock(99.5))
        assert str(chan._timeout("sending")) == "the peer stalled: nothing for 7 s while sending"


@pytest.mark.parametrize("parts", [1, 3])
def test_a_peer_that_takes_nothing_stalls_a_send_by_name(parts: int) -> None:
    a, b = socket.socketpair()
    with a, b:
        a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        chan = Channel(a, expect_header=False, idle=0.05)
        with pytest.raises(StreamTimeout) as e:
            chan.send(*[bytes(1 << 20)] * parts)
        assert str(e.value) == "the peer stalled: nothing for 0.05 s while sending"


def test_a_vectored_send_arrives_whole_and_in_order() -> None:
    a, b = socket.socketpair()
    with a, b:
        parts = [bytes([i]) * (50000 + i) for i in range(4)]
        chan = Channel(a, expect_header=False)
        got = bytearray()

        def read() -> None:
            while len(got) < sum(map(len, parts)):
                got.extend(b.recv(1 << 16))

        reader = threading.Thread(target=read)
        reader.start()
        chan.send(*parts)
        reader.join(30)
        assert bytes(got) == b"".join(parts) and chan.sent == len(got)


def test_a_send_of_several_parts_over_tls_is_written_part_by_part(tmp_path: Path) -> None:
    """SSLSocket has no sendmsg: a channel over TLS writes each part in turn, and they arrive whole and in order."""
    make_test_ca(tmp_path, ["127.0.0.1"])
    creds = Credentials.load(tmp_path)
    a, b = socket.socketpair()
    with a, b:
        a.settimeout(30)
        b.settimeout(30)
        served: dict[str, Any] = {}
        server = threading.Thread(target=lambda: served.update(
            sock=creds.server_context().wrap_socket(b, server_side=True)))
        server.start()
        client = creds.client_context().wrap_socket(a, server_hostname="127.0.0.1")
        server.join(30)
        parts: list[bytes | memoryview] = [b"head", memoryview(bytes(range(256)) * 16), b"tail"]
        chan = Channel(client, expect_header=False)
        chan.send(*parts)
        want = b"".join(bytes(p) for p in parts)
        got = bytearray()
        while len(got) < len(want):
            got.extend(served["sock"].recv(1 << 16))
        assert bytes(got) == want and chan.sent == len(want)
        client.close()
        served["sock"].close()


def _received(data: bytes, *, header: bool = False, into: memoryview | None = None, idle: float = 5) -> Any:
    """What a Channel makes of `data` sent whole and then closed: the events it gave, then the error that ended it."""
    a, b = socket.socketpair()
    with a, b:
        b.sendall(data)
        b.shutdown(socket.SHUT_WR)
        chan = Channel(a, expect_header=header, idle=idle)
        got: list[Any] = []
        try:
            while True:
                got.append(chan.receive(into))
        except (StreamError, PeerClosed, StreamTimeout) as e:
            return got, f"{type(e).__name__}: {e}"


def test_what_a_channel_receives_and_where_it_stops() -> None:
    head = encode_header({"a": 1})
    helo = encode_json(b"HELO", {"b": 2})
    events, end = _received(head + helo + helo, header=True)
    assert [(type(e).__name__, getattr(e, "offset", None)) for e in events] == [
        ("Header", None), ("Section", len(head)), ("Section", len(head) + len(helo))]
    assert end == "PeerClosed: the peer closed the connection"
    assert _received(b"")[1] == "PeerClosed: the peer closed the connection"
    assert _received(b"", header=True)[1] == (
        "StreamError: truncated stream: the peer closed inside the stream header at byte 0")
    assert _received(head[:20], header=True)[1] == (
        "StreamError: truncated stream: the peer closed inside the stream header at byte 20")
    assert _received(b"PVMITMIX" + head[8:], header=True)[1] == (
        "StreamError: not a pvmit migration stream (bad magic) (at byte 0)")
    assert _received(head + helo[:15], header=True)[1] == (
        f"StreamError: truncated stream: the peer closed inside the HELO section at byte {len(head)} "
        f"at byte {len(head) + 15}")
    assert _received(head + stream.SECTION_HEAD.pack(b"XXXX", 0), header=True)[1] == (
        f"StreamError: unknown section kind b'XXXX' at byte {len(head)}")


def test_memory_pages_straight_into_guest_memory() -> None:
    memory = memoryview(bytearray(11 * PAGE))
    empty = stream.SECTION_HEAD.pack(b"MEMP", stream.PAGES_HEAD.size) + stream.PAGES_HEAD.pack(3, 0)
    empty += stream.CRC.pack(zlib.crc32(empty))
    events, _ = _received(empty, into=memory)
    assert events == [Pages(3, 0, 0)]
    events, _ = _received(stream.encode_pages(9, b"\x07" * 2 * PAGE), into=memory)
    assert events == [Pages(9, 2, 0)] and bytes(memory[9 * PAGE:]) == b"\x07" * 2 * PAGE
    assert _received(stream.encode_pages(10, bytes(2 * PAGE)), into=memory)[1] == (
        "StreamError: MEMP section at byte 0 writes beyond guest memory (pages 10..11, guest has 11)")
    for cut in (17, 24 + 100, 24 + PAGE + 2):  # in its pages head, in its pages, in its checksum
        assert _received(stream.encode_pages(0, bytes(PAGE))[:cut], into=memory)[1] == (
            f"StreamError: truncated stream: the peer closed inside the MEMP section at byte 0 at byte {cut}")


def test_a_silent_peer_stalls_a_receive_by_name() -> None:
    a, b = socket.socketpair()
    with a, b:
        chan = Channel(a, expect_header=False, idle=0.05)
        with pytest.raises(StreamTimeout) as e:
            chan.receive()
        assert str(e.value) == "the peer stalled: nothing for 0.05 s while receiving the next section"


def test_expect_names_what_it_wanted_and_what_came() -> None:
    head = encode_header({})
    a, b = socket.socketpair()
    with a, b:
        b.sendall(head + encode_json(b"HELO", {}))
        chan = Channel(a, expect_header=True)
        with pytest.raises(StreamError) as e:
            chan.expect(b"HELO")
        assert str(e.value) == "unexpected second stream header"
        with pytest.raises(StreamError) as e:
            chan.expect(b"REDY", b"NACK")
        assert str(e.value) == f"expected REDY or NACK, got HELO at byte {len(head)}"


def test_a_section_that_is_not_json_is_named_by_kind_and_place() -> None:
    assert _stream_error(Section(b"HELO", b"{", 5).json).startswith("HELO section at byte 5: not valid JSON: ")


def test_strict_json_limits_and_messages() -> None:
    most = b"7" * stream.Unusable.MAX_DIGITS  # the longest integer Python converts is still an integer
    assert stream.loads(b'{"n": ' + most + b"}", "t")["n"] == int(most)
    assert isinstance(stream.loads(b'{"n": ' + most + b"7}", "t")["n"], stream.Unusable)
    assert _stream_error(lambda: stream.loads(b"{", "t")) == (
        "t: not valid JSON: Expecting property name enclosed in double quotes: line 1 column 2 (char 1)")
    assert _stream_error(lambda: stream.loads(b"[" * 100000, "t")) == "t: JSON nested too deeply"


def test_what_is_encoded_is_compact_and_kinds_are_known() -> None:
    header = encode_header({"a": 1, "b": [1, 2]})
    assert header[stream.HEADER_FIXED.size:-stream.CRC.size] == b'{"a":1,"b":[1,2]}'
    assert encode_json(b"DONE", {"a": [1, 2]})[stream.SECTION_HEAD.size:-stream.CRC.size] == b'{"a":[1,2]}'
    with pytest.raises(ValueError) as e:
        stream.encode_section(b"XXXX", b"")
    assert str(e.value) == "unknown section kind b'XXXX'"


def test_a_section_may_be_exactly_as_long_as_the_limit() -> None:
    stream.check_section_head(b"MEMP", stream.MAX_SECTION, 9)
    assert _stream_error(lambda: stream.check_section_head(b"MEMP", stream.MAX_SECTION + 1, 9)) == (
        f"MEMP section at byte 9: {stream.MAX_SECTION + 1} bytes is over the limit {stream.MAX_SECTION}")


def test_no_operation_starts_at_the_deadline(monkeypatch: pytest.MonkeyPatch) -> None:
    a, b = socket.socketpair()
    with a, b:
        chan = Channel(a, expect_header=False, idle=7, deadline=100.0)
        monkeypatch.setattr(transport, "time", _Clock(100.0))
        with pytest.raises(StreamTimeout) as e:
            chan.send(b"x")
        assert str(e.value) == "the migration's deadline passed"
        monkeypatch.setattr(transport, "time", _Clock(99.0))
        chan.send(b"x")
        assert a.gettimeout() == 1.0 and b.recv(1) == b"x"
