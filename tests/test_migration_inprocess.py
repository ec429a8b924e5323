"""The migration sides driven in one process: the source (`Outgoing`) and the destination (`Receiver`) on real KVM
VMs, over a real Unix socket, without VMM processes. Slower paths (processes, signals, the control socket) are in
tests/test_migration.py; these see every branch of the protocol from inside, so that a broken rule in
src/pvmit/migration/ fails a test in this process (mutation testing runs these).

The guest is loaded but not run between the steps here: `pause` just notes the time. Memory is filled with data so
that pages, zero runs and the dirty log all have something to carry.
"""

from __future__ import annotations

import os
import secrets
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from pvmit.catalog.loader import Catalog
from pvmit.derive import Mitigation, mitigations_to_bits
from pvmit.guest import program
from pvmit.interface.forms import Form, InterfaceConfig
from pvmit.interface.policy import OperatorSettings, PartialSettings, supported_requests
from pvmit.interface.state import snapshot
from pvmit.kvm.system import Kvm, kvm_available
from pvmit.migration import vmstate
from pvmit.migration.destination import Arrival, Receiver
from pvmit.migration.ledger import Ledger
from pvmit.migration.source import FAULT_ENV, Outcome, Outgoing, describe, runs
from pvmit.migration.stream import PAGE, StreamError, encode_header, encode_json, encode_pages, encode_zero
from pvmit.migration.transport import Channel, Pages, PeerClosed, StreamTimeout
from pvmit.net.address import Address
from pvmit.net.peer import accept
from pvmit.vmm.hosts import stand_in, this_machine
from pvmit.vmm.personality import resolve
from pvmit.vmm.vmm import Vmm

USABLE, WHY = kvm_available()
needs_kvm = pytest.mark.skipif(not USABLE, reason=f"needs a usable /dev/kvm: {WHY}")
MEMORY = 8 << 20


# --- pure pieces ------------------------------------------------------------------------------------------------
def test_runs_split_at_gaps_and_at_the_limit() -> None:
    import numpy as np
    assert runs(np.array([], dtype=np.int64), 4) == []
    assert runs(np.array([1, 2, 3, 7, 8, 20]), 1024) == [(1, 3), (7, 2), (20, 1)]
    assert runs(np.arange(10), 4) == [(0, 4), (4, 4), (8, 2)]


def test_ledger_settles_a_prepared_migration_once() -> None:
    led = Ledger()
    assert led.phase("m") == "unknown" and led.answer("m", None) == {"role": "none", "state": "unknown"}
    led.prepared("m")
    assert led.in_doubt() == ["m"] and led.role("m") == "destination"
    assert led.commit("m", "CMIT") and led.phase("m") == "committed" and led.how("m") == "CMIT"
    assert not led.abort("m", "late") and led.phase("m") == "committed"  # settled once, never flipped
    assert led.in_doubt() == []
    led.prepared("n")
    assert led.answer("n", "aborted") == {"role": "destination", "state": "aborted"}
    assert led.how("n") == "the source's VMM said aborted"
    led.start("s")
    assert led.answer("s", "committed") == {"role": "source", "state": "deciding"}  # a source is never told
    led.decide("s", "committed", "REDY received")
    assert led.answer("s", None)["state"] == "committed"
    assert not led.commit("s", "x")  # the source's own record is not a destination's to settle
    for i in range(300):
        led.start(f"x{i}")
    assert led.phase("m") == "unknown" and led.phase("x299") == "deciding"  # bounded: the oldest go


def test_channel_round_trip_and_pages_into_memory() -> None:
    a, b = socket.socketpair()
    tx, rx = Channel(a, expect_header=False), Channel(b, expect_header=True)
    memory = bytearray(16 * PAGE)
    page = bytes(range(256)) * 16
    tx.send(encode_header({"x": 1}))
    tx.send(encode_json(b"HELO", {"a": 1}))
    tx.send(*_frame(3, page + page))
    tx.send(encode_zero(5, 2))
    header = rx.receive()
    assert header.info == {"x": 1}  # type: ignore[union-attr]
    assert rx.receive().json() == {"a": 1}  # type: ignore[union-attr]
    pages = rx.receive(memoryview(memory))
    assert isinstance(pages, Pages) and (pages.first, pages.count) == (3, 2)
    assert memory[3 * PAGE:5 * PAGE] == page + page and not any(memory[:3 * PAGE]) and not any(memory[5 * PAGE:])
    zero = rx.expect(b"ZERO")
    assert zero.kind == b"ZERO"
    assert tx.sent == rx.received
    a.close()
    with pytest.raises(PeerClosed):
        rx.receive()
    b.close()


def _frame(first: int, data: bytes) -> tuple[bytes, bytes, bytes]:
    from pvmit.migration.stream import pages_frame
    head, payload, crc = pages_frame(first, data)
    return head, bytes(payload), crc


@pytest.mark.parametrize("damage,message", [
    (lambda f: f[:30], "truncated stream"), (lambda f: f[:40] + bytes([f[40] ^ 1]) + f[41:], "checksum mismatch"),
    (lambda f: f[:12] + (99999).to_bytes(8, "little") + f[20:], "writes beyond guest memory"),
    (lambda f: f[:12] + (3).to_bytes(8, "little") + (7).to_bytes(4, "little") + f[24:],
     "says 7 pages but carries 4096 bytes"),
], ids=["truncated", "flipped", "beyond", "count"])
def test_channel_refuses_a_bad_memory_section(damage: Any, message: str) -> None:
    a, b = socket.socketpair()
    a.sendall(damage(encode_pages(3, bytes(PAGE))))
    a.shutdown(socket.SHUT_WR)
    with pytest.raises(StreamError, match=message):
        Channel(b, expect_header=False).receive(memoryview(bytearray(16 * PAGE)))
    a.close()
    b.close()


def test_channel_gives_up_on_a_silent_peer_and_at_its_deadline() -> None:
    a, b = socket.socketpair()
    t0 = time.monotonic()
    with pytest.raises(StreamTimeout, match="stalled"):
        Channel(b, expect_header=False, idle=0.3).receive()
    assert time.monotonic() - t0 < 5
    chan = Channel(b, expect_header=False, idle=30, deadline=time.monotonic() + 0.3)
    a.sendall(b"HE")  # a trickle: never a whole section
    with pytest.raises(StreamTimeout, match="deadline"):
        chan.receive()
    with pytest.raises(StreamTimeout, match="deadline"):
        chan.send(b"x")
    a.close()
    b.close()


def test_channel_sends_every_part_of_a_vectored_write() -> None:
    a, b = socket.socketpair()
    a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)  # force partial sendmsg
    tx = Channel(a, expect_header=False)
    big = os.urandom(1 << 20)
    got = bytearray()

    def drain() -> None:
        while len(got) < 3 + len(big) + 4:
            got.extend(b.recv(65536))

    t = threading.Thread(target=drain)
    t.start()
    tx.send(b"abc", memoryview(big), b"wxyz")
    t.join(30)
    assert bytes(got) == b"abc" + big + b"wxyz" and tx.sent == len(got)
    a.close()
    b.close()


# --- both sides on real KVM -----------------------------------------------------------------------------------------
@dataclass
class Side:
    kvm: Kvm
    vmm: Vmm
    ledger: Ledger = field(default_factory=Ledger)


@dataclass
class Run:
    outcome: Outcome
    arrival: Arrival
    source: Side
    dest_ledger: Ledger
    events: list[str]


@pytest.fixture
def kvm() -> Iterator[Kvm]:
    if not USABLE:
        pytest.skip(f"needs a usable /dev/kvm: {WHY}")
    with Kvm() as k:
        yield k


@pytest.fixture
def fault_injection(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(FAULT_ENV, "1")


_REAL: dict[int, Any] = {}


def real_host(catalog: Catalog) -> Any:
    """This machine as the VMM reads it (CPUID executed): once per session."""
    if id(catalog) not in _REAL:
        _REAL[id(catalog)] = this_machine(catalog)[0]
    return _REAL[id(catalog)]


def source_vmm(kvm: Kvm, catalog: Catalog, settings: OperatorSettings = OperatorSettings()) -> Vmm:
    real = real_host(catalog)
    host = stand_in(catalog, "icelake-sp", real)
    personality = resolve(catalog, "icelake-server-v2")
    config = InterfaceConfig(Form.INTEL, supported_requests([host.facts, catalog.get("sapphirerapids").facts]))
    vmm = Vmm(kvm, personality, host, config, settings, memory_size=MEMORY)
    guest = program("counter_guest")
    vmm.load(guest.code, guest.load_address, (2000, mitigations_to_bits(frozenset({Mitigation.RETPOLINE})),
                                              config.ctrl_msr))
    view = vmm.machine.memory.view
    for off in range(2 << 20, 4 << 20, PAGE):  # data pages, then a run of written zero pages, then untouched
        view[off:off + 8] = off.to_bytes(8, "little")
    view[4 << 20:5 << 20] = bytes(1 << 20)
    vmm.run(poll=lambda: vmm.core.vcpus[0].reported, max_exits=2000, timeout=10)  # until it reports retpoline
    assert vmm.core.vcpus[0].reported
    return vmm


def migrate(kvm: Kvm, catalog: Catalog, tmp_path: Path, *, fault: str | None = None, dest_fault: str | None = None,
            settings: PartialSettings | None = None, dest_model: str = "sapphirerapids", check: bool = False,
            mode: str = "pre-copy", source_settings: OperatorSettings = OperatorSettings()) -> Run:
    """One migration between two VMs of this process, each side on a thread of its own as in a VMM process."""
    src = Side(kvm, source_vmm(kvm, catalog, source_settings))
    real = real_host(catalog)
    dest_host = stand_in(catalog, dest_model, real)
    dest_ledger = Ledger()
    address = Address.parse(f"unix:{tmp_path / f'dst-{secrets.token_hex(3)}.mig'}")
    listener = address.listen()
    arrival: list[Arrival] = []
    events: list[str] = []

    def receive() -> None:
        conn, addr = listener.accept()
        peer = accept(conn, addr, None, deadline=time.monotonic() + 10)
        r = Receiver(Channel(peer.sock, expect_header=True, idle=5), kvm, dest_host, settings, ledger=dest_ledger,
                     control="unix:/dest/control", ask=lambda c, m: src.ledger.answer(m, None)["state"],
                     progress=lambda m: events.append(f"dest: {m}"), fault=dest_fault, commit_wait=1,
                     settle_notice=0.5)
        arrival.append(r.run())
        peer.sock.close()

    t = threading.Thread(target=receive)
    t.start()
    migration = secrets.token_hex(16)
    vmm = src.vmm
    if mode == "pre-copy":
        vmm.machine.vm.set_dirty_logging(0, True)
        vmm.machine.vm.dirty_pages(0)
    vmm.sync_spec_ctrl()
    header = describe(vmm, "check" if check else mode, migration, "0123456789abcdef", "unix:/source/control")
    src.ledger.start(migration)

    def ask_dest(control: str, m: str, told: str) -> str:
        answer = dest_ledger.answer(m, told)
        return "unknown" if answer["role"] == "none" else answer["state"]

    out = Outgoing(vmm, address, None, header=header, hello=snapshot(vmm.core), ledger=src.ledger,
                   pause=time.monotonic, ask=ask_dest, check_only=check, fault=fault,
                   progress=lambda m: events.append(f"source: {m}"), stall=5, settle_notice=0.5)
    outcome = out.run()
    t.join(30)
    listener.close()
    address.unlink()
    return Run(outcome, arrival[0], src, dest_ledger, events)


def same_guest(run: Run) -> None:
    """The destination holds the source's guest: every page, the registers, the interface state."""
    assert run.arrival.vmm is not None, run.arrival.reason
    a, b = run.source.vmm, run.arrival.vmm
    assert bytes(a.machine.memory.view) == bytes(b.machine.memory.view)
    assert a.vcpu.get_regs() == b.vcpu.get_regs()
    msrs_a, msrs_b = vmstate.capture(a.vcpu)["msrs"], vmstate.capture(b.vcpu)["msrs"]
    assert msrs_b.pop("0x10") >= msrs_a.pop("0x10")  # the TSC went on from where it was
    assert msrs_a == msrs_b
    assert b.serial.partial == a.serial.partial
    assert b.core.vcpus[0].reported and b.core.vcpus[0].ctrl == a.core.vcpus[0].ctrl


@needs_kvm
def test_a_migration_carries_everything_and_forces_what_the_guest_needs(kvm: Kvm, catalog: Catalog,
                                                                         tmp_path: Path) -> None:
    run = migrate(kvm, catalog, tmp_path)
    o = run.outcome
    assert o.migrated and o.accepted and not o.in_doubt and o.settled_by == "CACK", o.reason
    assert o.mode == "pre-copy" and o.rounds >= 1 and o.paused_at is not None and o.committed_at is not None
    assert o.ready["forced"] == ["RRSBA_DIS_S"] and o.ready["migration"] == o.migration
    assert o.ready["control"] == "unix:/dest/control"
    assert o.zero_pages >= 256  # the written MiB of zeros went as ZERO runs, not as pages
    assert o.pages_sent == run.arrival.pages and o.bytes_sent < 3 << 20
    same_guest(run)
    assert run.arrival.vmm is not None and run.arrival.vmm.core.vcpus[0].spec.mask == 0x40
    assert run.arrival.settled_by == "CMIT" and run.dest_ledger.phase(o.migration) == "committed"
    assert run.source.ledger.phase(o.migration) == "committed"
    assert o.to_json()["guest"] == "running on the destination"
    assert any("pre-copy round 1" in e for e in run.events)


@needs_kvm
def test_stop_and_copy_carries_everything(kvm: Kvm, catalog: Catalog, tmp_path: Path) -> None:
    run = migrate(kvm, catalog, tmp_path, mode="stop-and-copy")
    assert run.outcome.migrated and run.outcome.rounds == 0 and run.outcome.mode == "stop-and-copy"
    same_guest(run)


@needs_kvm
def test_check_only_moves_nothing(kvm: Kvm, catalog: Catalog, tmp_path: Path) -> None:
    run = migrate(kvm, catalog, tmp_path, check=True)
    assert run.outcome.accepted and not run.outcome.migrated and run.outcome.paused_at is None
    assert run.outcome.reason == "check only: nothing moved" and run.outcome.pages_sent == 0
    assert run.arrival.vmm is None and run.source.ledger.phase(run.outcome.migration) == "aborted"


@needs_kvm
def test_a_refusal_before_the_pause_names_the_control(kvm: Kvm, catalog: Catalog, tmp_path: Path) -> None:
    run = migrate(kvm, catalog, tmp_path, dest_model="cascadelake-sp")
    o = run.outcome
    assert not o.accepted and not o.migrated and o.paused_at is None and o.pages_sent == 0
    assert o.reason.startswith("destination refused: ") and "RRSBA_CTRL" in o.reason
    assert run.arrival.vmm is None and "refused before the source paused" in run.arrival.reason
    assert o.to_json()["guest"] == "still running on the source"


@needs_kvm
def test_operator_settings_on_the_destination_go_over_the_carried_ones(kvm: Kvm, catalog: Catalog,
                                                                        tmp_path: Path) -> None:
    run = migrate(kvm, catalog, tmp_path, settings=PartialSettings(force_on=0x4, force_off=None, unreported=None),
                  source_settings=OperatorSettings(force_on=0x1))
    assert run.outcome.migrated
    assert run.arrival.vmm is not None and run.arrival.vmm.core.vcpus[0].spec.mask == 0x44  # SSBD replaces IBRS
    assert any("over the VM's own" in e for e in run.events)


@needs_kvm
@pytest.mark.usefixtures("fault_injection")
@pytest.mark.parametrize("fault,where", [("flip-memory", "checksum mismatch"), ("flip-state", "checksum mismatch"),
                                         ("truncate", "truncated stream"),
                                         ("wrong-version", "version 99 is not supported"),
                                         ("unknown-section", "unknown section kind b'XTRA'")],
                         ids=["flip-memory", "flip-state", "truncate", "wrong-version", "unknown-section"])
def test_a_bad_stream_is_refused_and_the_source_keeps_the_guest(kvm: Kvm, catalog: Catalog, tmp_path: Path,
                                                                fault: str, where: str) -> None:
    run = migrate(kvm, catalog, tmp_path, fault=fault)
    assert not run.outcome.migrated and not run.outcome.in_doubt
    assert where in run.arrival.reason and run.arrival.vmm is None
    assert run.source.ledger.phase(run.outcome.migration) == "aborted"
    assert run.outcome.to_json()["guest"] == "still running on the source"


@needs_kvm
@pytest.mark.usefixtures("fault_injection")
def test_a_report_during_the_copy_is_decided_after_the_pause(kvm: Kvm, catalog: Catalog, tmp_path: Path) -> None:
    run = migrate(kvm, catalog, tmp_path, fault="report-meanwhile")
    assert run.outcome.migrated and run.outcome.ready["forced"] == []
    assert run.arrival.vmm is not None and run.arrival.vmm.core.vcpus[0].spec.mask == 0
    assert run.arrival.interface_seconds > 0


ASKED = "the destination's VMM says it runs the guest"


@needs_kvm
@pytest.mark.usefixtures("fault_injection")
@pytest.mark.parametrize("fault,dest_fault,migrated,settled,dest_settled", [
    ("drop-before-commit", None, False, "",
     ("the source's VMM says it kept the guest", "the source's VMM said aborted")),
    ("lose-commit-ack", None, True, ASKED, ("CMIT",)),
    (None, "lose-commit", True, ASKED, ("the source's VMM says it committed", "the source's VMM said committed")),
    (None, "drop-before-cack", True, ASKED, ("CMIT",)),
], ids=["drop-before-commit", "lose-commit-ack", "lose-commit", "drop-before-cack"])
def test_a_lost_commit_is_settled_by_asking(kvm: Kvm, catalog: Catalog, tmp_path: Path, fault: str | None,
                                            dest_fault: str | None, migrated: bool, settled: str,
                                            dest_settled: tuple[str, ...]) -> None:
    run = migrate(kvm, catalog, tmp_path, fault=fault, dest_fault=dest_fault)
    o = run.outcome
    assert o.migrated is migrated and not o.in_doubt, o
    assert (run.arrival.vmm is not None) is migrated  # exactly one side has it
    assert run.arrival.settled_by in dest_settled, run.arrival.settled_by
    m = o.migration
    if migrated:
        assert o.settled_by == settled and o.committed_at is not None, o.settled_by
        assert run.dest_ledger.phase(m) == "committed" and run.source.ledger.phase(m) == "committed"
        same_guest(run)
    else:
        assert run.dest_ledger.phase(m) == "aborted" and run.source.ledger.phase(m) == "aborted"
        assert "the source kept the guest" in run.arrival.reason


@needs_kvm
def test_a_destination_that_answers_nothing_is_given_up_on(kvm: Kvm, catalog: Catalog, tmp_path: Path) -> None:
    """A peer that accepts and then says nothing: the source gives up at its stall limit, never having paused."""
    src = source_vmm(kvm, catalog)
    address = Address.parse(f"unix:{tmp_path / 'mute.mig'}")
    listener = address.listen()
    held: list[socket.socket] = []

    def mute() -> None:
        conn, addr = listener.accept()
        held.append(accept(conn, addr, None, deadline=time.monotonic() + 10).sock)

    t = threading.Thread(target=mute)
    t.start()
    header = describe(src, "pre-copy", secrets.token_hex(16), "01", "unix:/s")
    ledger = Ledger()
    ledger.start(header["migration"])
    out = Outgoing(src, address, None, header=header, hello=snapshot(src.core), ledger=ledger, pause=time.monotonic,
                   ask=lambda *a: "unknown", stall=0.5).run()
    t.join(10)
    assert not out.migrated and out.paused_at is None and "stalled" in out.reason
    for s in held:
        s.close()
    listener.close()


@needs_kvm
def test_the_source_refuses_an_unknown_fault(kvm: Kvm, catalog: Catalog) -> None:
    from pvmit.errors import PvmitError
    src = source_vmm(kvm, catalog)
    with pytest.raises(PvmitError, match="unknown fault"):
        Outgoing(src, Address.parse("unix:/x"), None, header={"migration": "m", "mode": "pre-copy"}, hello={},
                 ledger=Ledger(), pause=time.monotonic, ask=lambda *a: "x", fault="nope")


@needs_kvm
def test_vcpu_state_round_trips_and_refuses_what_it_cannot_take(kvm: Kvm, catalog: Catalog) -> None:
    a = source_vmm(kvm, catalog)
    b = source_vmm(kvm, catalog)
    state = vmstate.capture(a.vcpu)
    assert {"regs", "sregs", "fpu", "events", "msrs"} <= set(state)
    moved = b.vcpu.get_regs()
    moved.rip, moved.rax = 0x1234, 0x5678
    b.vcpu.set_regs(moved)
    assert a.vcpu.get_regs() != b.vcpu.get_regs()
    assert vmstate.restore(b.vcpu, state) == []
    assert a.vcpu.get_regs() == b.vcpu.get_regs()
    for bad, message in (({**state, "extra": 1}, "unknown field 'extra'"), ([], "not a JSON object"),
                         ({**state, "sregs": "!!"}, "sregs is not base64"),
                         ({**state, "fpu": "AAAA"}, "fpu has 3 bytes"),
                         ({**state, "msrs": {f"0x{i:x}": 0 for i in range(200)}}, "more than"),
                         ({**state, "msrs": {"0x10": -1}}, "out of range")):
        with pytest.raises(StreamError, match=message):
            vmstate.restore(b.vcpu, bad)
