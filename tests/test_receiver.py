"""The destination's Receiver driven in this process with crafted streams over a socket pair, on a real KVM VM:
every refusal sent back to the peer, every progress and log line, the Arrival's fields and the ledger's record,
asserted whole (mutation testing runs these: a broken rule in src/pvmit/migration/destination.py fails here).

The peer's side is written by a thread ahead of the Receiver (the stream is small), then everything the Receiver
sent back is read after `run()` returns. Deadlines are short; nothing here waits on a timer to pass or fail.
"""

from __future__ import annotations

import gc
import re
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from fault_exit import Exited, raise_instead
from test_stream_validation import put, valid

from pvmit.catalog.loader import Catalog
from pvmit.interface.core import VmInterface
from pvmit.interface.forms import Form, InterfaceConfig
from pvmit.interface.policy import PartialSettings
from pvmit.interface.state import snapshot
from pvmit.kvm.system import Kvm, kvm_available
from pvmit.migration import vmstate
from pvmit.migration.destination import Arrival, Incoming, Receiver, _cpuid_differences
from pvmit.migration.ledger import Ledger
from pvmit.migration.stream import PAGE, encode_header, encode_json, encode_pages, encode_zero
from pvmit.migration.transport import Channel, PeerClosed
from pvmit.vmm.hosts import stand_in
from pvmit.vmm.personality import resolve
from pvmit.vmm.vmm import Vmm

USABLE, WHY = kvm_available()
MEMORY = 8 << 20
TOTAL = MEMORY // PAGE


@pytest.fixture(scope="module")
def kvm() -> Iterator[Kvm]:
    if not USABLE:
        pytest.skip(f"needs a usable /dev/kvm: {WHY}")
    with Kvm() as k:
        yield k


@dataclass
class Got:
    """What one Receiver did: its Arrival, what it sent back (kind, JSON), what it said, and its ledger."""

    arrival: Arrival
    sent: list[tuple[str, Any]]
    progress: list[str]
    lines: list[str]
    ledger: Ledger
    receiver: Receiver
    died: int | None = None

    def kinds(self) -> list[str]:
        return [k for k, _ in self.sent]

    def doc(self, kind: str) -> Any:
        return next(d for k, d in self.sent if k == kind)


@pytest.fixture
def exits(monkeypatch: pytest.MonkeyPatch) -> None:
    raise_instead(monkeypatch)  # destination.py's os._exit: the Receiver stops there


_CPUS: dict[int, dict[str, Any]] = {}


def cpus_of(kvm: Kvm, catalog: Catalog) -> dict[str, Any]:
    """A whole vCPU state as a source captures it (from a fresh VM of the same kind)."""
    if id(kvm) not in _CPUS:
        header, _ = valid(catalog)
        vmm = Vmm(kvm, resolve(catalog, "icelake-server-v2"), dest_host(catalog), _config(header),
                  memory_size=MEMORY)
        _CPUS[id(kvm)] = vmstate.capture(vmm.vcpu)
        vmm.close()
    return _CPUS[id(kvm)]


def _config(header: dict[str, Any]) -> Any:
    return InterfaceConfig.from_json(header["vm"]["config"])


def dest_host(catalog: Catalog, model: str = "sapphirerapids") -> Any:
    from test_migration_inprocess import real_host
    return stand_in(catalog, model, real_host(catalog))


def stream(header: dict[str, Any], hello: Any, *sections: bytes, cpus: Any = None, done: Any = None,
           devs: Any = None, ista: Any = None, cmit: Any = None) -> bytes:
    """Header, HELO, `sections` (pages), ISTA (the HELO state unless given), CPUS, DEVS, DONE, CMIT; a part given
    as False is left out."""
    out = encode_header(header) + encode_json(b"HELO", hello) + b"".join(sections)
    if ista is not False:
        out += encode_json(b"ISTA", hello if ista is None else ista)
    if cpus is not False:
        out += encode_json(b"CPUS", cpus)
    if devs is not None:
        out += encode_json(b"DEVS", devs)
    if done is not False:
        out += encode_json(b"DONE", {"pages": 0} if done is None else done)
    if cmit is not False:
        out += encode_json(b"CMIT", {"migration": header["migration"]} if cmit is None else cmit)
    return out


def receive(kvm: Kvm, catalog: Catalog, data: bytes, *, settings: PartialSettings | None = None,
            model: str = "sapphirerapids", fault: str | None = None, ask: Callable[[str, str], str] | None = None,
            close: bool = True, deadline: float = 30.0, idle: float = 10.0, commit_wait: float = 5.0,
            expect_header: bool = True, progress: Callable[[str], None] | None = None,
            ledger: Ledger | None = None) -> Got:
    """Send `data` as the source would (then close, unless told not to) and let a Receiver take it."""
    a, b = socket.socketpair()
    said: list[str] = []
    lines: list[str] = []
    led = ledger or Ledger()

    def peer() -> None:
        try:
            a.sendall(data)
        except OSError:
            return
        if close:
            a.shutdown(socket.SHUT_WR)

    t = threading.Thread(target=peer)
    t.start()
    r = Receiver(Channel(b, expect_header=expect_header, idle=idle), kvm, dest_host(catalog, model), settings,
                 ledger=led, control="unix:/dest/control", ask=ask or (lambda c, m: "committed"),
                 progress=progress or said.append, on_line=lines.append, fault=fault, deadline=deadline,
                 commit_wait=commit_wait, settle_notice=60.0)
    died = None
    try:
        arrival = r.run()
    except Exited as e:  # a fault's os._exit, caught here (see `exits`)
        died, arrival = e.code, r.arrival
    finally:
        b.shutdown(socket.SHUT_WR)
        t.join(30)
    back = Channel(a, expect_header=False)
    sent: list[tuple[str, Any]] = []
    while True:
        try:
            s = back.receive()
        except (PeerClosed, OSError):
            break
        sent.append((s.kind.decode(), s.json()))  # type: ignore[union-attr]
    a.close()
    b.close()
    return Got(arrival, sent, said, lines, led, r, died)




# --- a whole stream, taken --------------------------------------------------------------------------------------------
SPR = "Sapphire Rapids (sapphirerapids, stand-in)"
FORCED = ["RRSBA_DIS_S"]
CHANGES = [{"vcpu": 0, "added": ["RRSBA_DIS_S"], "released": []}]


def incoming(header: dict[str, Any]) -> str:
    return (f"incoming guest icelake-server-v2 (vm {header['vm_id']}) from crafted (pre-copy, 8 MiB, migration "
            f"{header['migration'][:8]})")


def taken(got: Got, header: dict[str, Any], t0: float, *, forced: list[str], changes: list[Any],
          would: str, applies: int) -> None:
    """Committed on CMIT: what went back (VRDT, REDY, CACK), what was said, the Arrival and the ledger."""
    a, m = got.arrival, header["migration"]
    assert a.vmm is not None, a.reason
    assert got.kinds() == ["VRDT", "REDY", "CACK"]
    assert got.doc("VRDT")["accepted"] is True and got.doc("VRDT")["host"] == got.receiver.host.name
    assert got.doc("REDY") == {"host": got.receiver.host.name, "forced": forced, "changes": changes, "warnings": [],
                               "migration": m, "control": "unix:/dest/control",
                               "interface_check_ms": round(a.interface_seconds * 1e3, 3),
                               "apply_ms": round(a.apply_seconds * 1e3, 3)}
    assert got.doc("CACK") == {"migration": m}
    assert got.progress == [incoming(header), f"accepted before the pause; would force: {would}",
                            f"committed (CMIT); forcing {', '.join(forced) or 'nothing'} before the guest runs here"]
    elapsed = time.monotonic() - t0
    assert 0 <= a.interface_seconds <= elapsed and 0 <= a.apply_seconds <= elapsed
    assert a.committed_at is not None and t0 <= a.committed_at <= time.monotonic()
    assert (a.source, a.migration, a.vm_id, a.settled_by, a.reason) == ("crafted", m, header["vm_id"], "CMIT", "")
    assert a.verdict["accepted"] is True and [f["control"] for d in a.verdict["decisions"]
                                              for f in d["forced"]] == forced
    assert got.ledger.phase(m) == "committed" and got.ledger.how(m) == "CMIT"
    # the VMM's lines, held while the source was paused, come out once the guest is here (not marked as refused)
    assert got.lines == ["vmm: " + e for e in a.vmm.events]
    assert sum(e.startswith(("forced IA32_SPEC_CTRL", "nothing forced")) for e in a.vmm.events) == applies
    assert got.receiver.vmm is a.vmm and got.receiver.held is None
    got.receiver._line("vmm: later")  # after the exchange a line goes straight out
    assert got.lines[-1] == "vmm: later"


def test_a_whole_stream_is_taken_and_committed(kvm: Kvm, catalog: Catalog) -> None:
    header, hello = valid(catalog)
    del hello["settings"]["bhi_policy"]  # the default, left out: not an operator's setting given here
    data = b"\x01" * PAGE + b"\x02" * PAGE
    t0 = time.monotonic()
    got = receive(kvm, catalog, stream(header, hello, encode_pages(3, data), encode_zero(2045, 3),
                                       encode_zero(3, 1), cpus=cpus_of(kvm, catalog),
                                       devs={"serial_partial": "half a li"}, done={"pages": 6}))
    # decided before the pause and installed then: applied once at build, once for HELO, never again
    taken(got, header, t0, forced=FORCED, changes=CHANGES, would="RRSBA_DIS_S", applies=2)
    a = got.arrival
    assert a.vmm is not None and a.pages == 6 and got.receiver.pages == 6
    assert a.vmm.serial.partial == "half a li"
    view = a.vmm.machine.memory.view
    assert bytes(view[3 * PAGE:4 * PAGE]) == bytes(PAGE) and bytes(view[4 * PAGE:5 * PAGE]) == b"\x02" * PAGE
    assert a.vmm.core.vcpus[0].spec.mask == 0x40
    a.vmm.close()


def test_a_state_that_changed_during_the_copy_is_decided_again(kvm: Kvm, catalog: Catalog) -> None:
    """HELO: the guest reported relying on nothing; paused, it has not reported: decided again, installed again."""
    header, hello = valid(catalog)
    header, hello = put(header, "vm.config.supported", 0), put(hello, "config.supported", 0)
    reported = put(hello, "vcpus", [{"ctrl": 0, "reported": True, "spec_ctrl": 0, "forced_mask": 0,
                                     "forced_value": 0}])
    t0 = time.monotonic()
    got = receive(kvm, catalog, stream(header, reported, ista=hello, cpus=cpus_of(kvm, catalog)))
    taken(got, header, t0, forced=FORCED, changes=CHANGES, would="nothing", applies=3)
    assert got.arrival.vmm is not None and got.arrival.pages == 0
    got.arrival.vmm.close()


def test_nothing_forced_here(kvm: Kvm, catalog: Catalog) -> None:
    header, hello = valid(catalog)
    t0 = time.monotonic()
    got = receive(kvm, catalog, stream(header, hello, cpus=cpus_of(kvm, catalog)), model="icelake-sp")
    taken(got, header, t0, forced=[], changes=[], would="nothing", applies=2)
    assert got.arrival.vmm is not None
    got.arrival.vmm.close()


def test_operator_settings_here_go_over_the_carried_ones(kvm: Kvm, catalog: Catalog) -> None:
    header, hello = valid(catalog)
    t0 = time.monotonic()
    got = receive(kvm, catalog, stream(header, hello, cpus=cpus_of(kvm, catalog)),
                  settings=PartialSettings(force_on=0x4, force_off=None, unreported=None))
    said = got.progress.pop(1)
    assert said == ("operator settings given here (force_on SSBD) over the VM's own {'force_on': [], 'force_off': "
                    "[], 'unreported': 'assume-worst', 'bhi_policy': 'force-bhi-dis-s'}: now {'force_on': ['SSBD'], "
                    "'force_off': [], 'unreported': 'assume-worst', 'bhi_policy': 'force-bhi-dis-s'}")
    forced = ["SSBD", "RRSBA_DIS_S"]
    taken(got, header, t0, forced=forced, changes=[{"vcpu": 0, "added": forced, "released": []}],
          would="SSBD, RRSBA_DIS_S", applies=2)
    vmm = got.arrival.vmm
    assert vmm is not None and vmm.core.vcpus[0].spec.mask == 0x44
    # the VM was built with these settings: what it forced from the start already had SSBD
    forcing = [e.split(":")[0] for e in vmm.events if e.startswith("forced")]
    assert forcing == ["forced IA32_SPEC_CTRL SSBD+RRSBA_DIS_S"] * 2
    vmm.close()


# --- refusals: the reason sent back, said, and kept; nothing runs here ------------------------------------------------
def refused(got: Got, reason: str, *, built: bool) -> None:
    a = got.arrival
    assert got.sent[-1] == ("NACK", {"reason": reason})
    assert a.reason == f"refused: {reason}" and got.progress[-1] == a.reason
    assert a.vmm is None and got.receiver.vmm is None and a.committed_at is None
    assert got.receiver.held is None
    # what the VMM said of the guest it built comes out marked as never started
    assert bool(got.lines) is built
    assert all(line.startswith("vmm: ") and line.endswith(" (incoming guest not started)") for line in got.lines)


def test_a_first_section_that_is_no_header_is_refused(kvm: Kvm, catalog: Catalog) -> None:
    _, hello = valid(catalog)
    got = receive(kvm, catalog, encode_json(b"HELO", hello), expect_header=False)
    assert got.kinds() == ["NACK"] and got.progress == ["refused: expected a stream header"]
    refused(got, "expected a stream header", built=False)


HELLO_CASES = [
    (lambda h: [h], "HELO section: not a JSON object"),
    (lambda h: put(h, "config.supported", 0),  # the same personality: the configuration alone differs
     "HELO section: its interface configuration or CPU personality differs from the header's"),
    (lambda h: put(h, "personality.family", 7),
     "HELO section: its interface configuration or CPU personality differs from the header's"),
    (lambda h: {k: v for k, v in h.items() if k != "config"}, "HELO section: 'config'"),
]


@pytest.mark.parametrize("change,reason", HELLO_CASES, ids=["list", "config", "personality", "no-config"])
def test_a_hello_that_is_not_the_headers_vm_is_refused(kvm: Kvm, catalog: Catalog, change: Any,
                                                       reason: str) -> None:
    header, hello = valid(catalog)
    got = receive(kvm, catalog, encode_header(header) + encode_json(b"HELO", change(hello)))
    assert got.kinds() == ["NACK"] and got.progress[0] == incoming(header)
    refused(got, f"{reason}; nothing runs here", built=False)


def test_what_this_vmm_cannot_take_is_refused_with_the_reason(kvm: Kvm, catalog: Catalog) -> None:
    header, hello = valid(catalog)
    got = receive(kvm, catalog, stream(put(header, "vm.vcpus", 2), hello))
    assert got.progress == ["refused: this VMM runs one vCPU per guest; the stream describes 2"]
    refused(got, "this VMM runs one vCPU per guest; the stream describes 2", built=False)


def test_a_source_gone_before_the_pause_leaves_nothing(kvm: Kvm, catalog: Catalog) -> None:
    header, hello = valid(catalog)
    got = receive(kvm, catalog, encode_header(header) + encode_json(b"HELO", hello))
    reason = "the source went away before committing: not starting a half-received guest"
    assert got.kinds() == ["VRDT"] and got.arrival.reason == reason and got.progress[-1] == reason
    assert got.arrival.vmm is None and got.receiver.vmm is None and got.lines
    assert all(line.endswith(" (incoming guest not started)") for line in got.lines)


def after_hello(header: dict[str, Any], hello: Any) -> int:
    return len(encode_header(header) + encode_json(b"HELO", hello))


def test_zero_runs_up_to_the_end_of_memory_and_not_past_it(kvm: Kvm, catalog: Catalog) -> None:
    header, hello = valid(catalog)
    got = receive(kvm, catalog, stream(header, hello, encode_zero(TOTAL - 2, 3), cpus=cpus_of(kvm, catalog)))
    refused(got, f"ZERO section at byte {after_hello(header, hello)} reaches beyond guest memory", built=True)
    assert got.kinds() == ["VRDT", "NACK"]


def bad_vcpu_state(kvm: Kvm, catalog: Catalog) -> dict[str, Any]:
    """MTRR registers with reserved bits set: KVM refuses them (the rest is a real state)."""
    cpus = cpus_of(kvm, catalog)
    return {**cpus, "msrs": {**cpus["msrs"], "0x200": 1 << 63, "0x2ff": 1 << 20}}


AFTER_THE_PAUSE = [
    (dict(ista=False), "stream ended without the interface state or the vCPU state"),
    (dict(cpus=False), "stream ended without the interface state or the vCPU state"),
    (dict(done={"pages": -1}), "DONE section: pages = -1 is out of range 0..1099511627776; nothing runs here"),
    (dict(done={"pages": (1 << 40) + 1}),
     "DONE section: pages = 1099511627777 is out of range 0..1099511627776; nothing runs here"),
    (dict(done={"pages": 1 << 40}), "DONE says 1099511627776 pages were sent, 0 arrived"),
    (dict(done={"pages": "5"}), "DONE section: pages must be an integer, not a string ('5'); nothing runs here"),
    (dict(devs={"serial": ""}), "DEVS section: field serial_partial is missing; nothing runs here"),
    (dict(cpus=[]), "CPUS section: not a JSON object; nothing runs here"),
    (dict(cpus="bad"), "this KVM would not take part of the vCPU state: MSR 0x2ff, MSR 0x200"),
]


@pytest.mark.parametrize("parts,reason", AFTER_THE_PAUSE, ids=[
    "no-state", "no-cpus", "done-negative", "done-past", "done-most", "done-string", "devs", "cpus-list", "msrs"])
def test_each_refusal_after_the_pause_names_what_was_wrong(kvm: Kvm, catalog: Catalog, parts: dict[str, Any],
                                                           reason: str) -> None:
    header, hello = valid(catalog)
    parts = {"cpus": cpus_of(kvm, catalog), **parts}
    if parts["cpus"] == "bad":
        parts["cpus"] = bad_vcpu_state(kvm, catalog)
    got = receive(kvm, catalog, stream(header, hello, **parts))
    assert got.kinds() == ["VRDT", "NACK"]
    refused(got, reason, built=True)
    assert got.ledger.phase(header["migration"]) == "unknown"  # never prepared: nothing to settle


def test_a_wrong_page_count_is_refused(kvm: Kvm, catalog: Catalog) -> None:
    header, hello = valid(catalog)
    got = receive(kvm, catalog, stream(header, hello, encode_pages(1, bytes(PAGE)), encode_zero(9, 4),
                                       cpus=cpus_of(kvm, catalog), done={"pages": 4}))
    refused(got, "DONE says 4 pages were sent, 5 arrived", built=True)


# --- a guest that would see another CPU, a host that cannot take it ---------------------------------------------------
def test_cpuid_differences_are_named_register_by_register() -> None:
    long = "k" * 33
    assert _cpuid_differences({"0x0.0.ebx": 1, "a": 2, "b": 0x10}, {"0x0.0.ebx": 1, "a": 0x2a, "c": 1}) == [
        "CPUID a: 0x2 on the source, 0x2a here", "CPUID b: missing here"]
    assert _cpuid_differences({long: 1, "k" * 40: 2}, {long: 3}) == [
        f"CPUID {'k' * 32}... (33 characters): 0x1 on the source, 0x3 here",
        f"CPUID {'k' * 32}... (40 characters): missing here"]
    assert _cpuid_differences({"x": 1}, {"x": 1}) == [] and _cpuid_differences({}, {"x": 1}) == []


def guest_cpuid(kvm: Kvm, catalog: Catalog) -> dict[str, int]:
    header, _ = valid(catalog)
    vmm = Vmm(kvm, resolve(catalog, "icelake-server-v2"), dest_host(catalog), _config(header), memory_size=MEMORY)
    try:
        return vmm.guest_cpuid()
    finally:
        vmm.close()


def test_a_guest_that_would_see_another_cpu_is_refused_before_the_pause(kvm: Kvm, catalog: Catalog) -> None:
    header, hello = valid(catalog)
    here = guest_cpuid(kvm, catalog)
    source = {k: v ^ 1 for k, v in list(here.items())[:8]} | {"0x99.0.eax": 5}  # nine differences
    got = receive(kvm, catalog, stream(put(header, "vm.cpuid", source), hello))
    shown = "; ".join(f"CPUID {k}: {v:#x} on the source, {here[k]:#x} here" for k, v in list(source.items())[:8])
    reason = f"the guest would see a different CPU here: {shown}"  # the first eight only
    verdict = got.doc("VRDT")
    assert got.kinds() == ["VRDT"] and verdict["accepted"] is False and verdict["reasons"] == [reason]
    assert verdict == {**got.arrival.verdict, "host": SPR}
    assert got.arrival.reason == f"refused before the source paused: {reason}"
    assert got.progress == [incoming(header), got.arrival.reason]
    assert got.arrival.vmm is None and got.receiver.vmm is None and got.lines
    assert all(line.endswith(" (incoming guest not started)") for line in got.lines)


def test_a_host_that_cannot_keep_the_promises_refuses_with_every_reason(kvm: Kvm, catalog: Catalog) -> None:
    header, hello = valid(catalog)
    got = receive(kvm, catalog, stream(header, hello), model="cascadelake-sp")
    verdict = got.doc("VRDT")
    assert got.kinds() == ["VRDT"] and verdict["accepted"] is False and len(verdict["reasons"]) == 3
    assert verdict == {**got.arrival.verdict, "host": "Cascade Lake-SP (cascadelake-sp, stand-in)"}
    assert got.arrival.reason == "refused before the source paused: " + "; ".join(verdict["reasons"])
    assert got.progress == [incoming(header), got.arrival.reason] and got.lines == []


# --- what the operator reads of the peer ------------------------------------------------------------------------------
def test_names_in_the_progress_line_are_cut_at_64_characters(kvm: Kvm, catalog: Catalog) -> None:
    header, hello = valid(catalog)
    for n in (64, 65):
        h = put(put(put(header, "vm.personality.name", "p" * n), "source_host.name", "s" * n), "vm.memory_size",
                10 << 20)
        got = receive(kvm, catalog, encode_header(h) + encode_json(b"HELO", [1]))
        p, s = ("p" * 64 + "... (65 characters)", "s" * 64 + "... (65 characters)") if n == 65 else ("p" * 64,
                                                                                                    "s" * 64)
        assert got.progress[0] == (f"incoming guest {p} (vm {h['vm_id']}) from {s} (pre-copy, 10 MiB, migration "
                                   f"{h['migration'][:8]})")


@pytest.mark.parametrize("error,reason", [
    (OSError("e" * 401), "e" * 400 + "... (401 characters); nothing runs here"),
    (OSError("e" * 400), "e" * 400 + "; nothing runs here"),
    (RuntimeError("r" * 301), "internal error while receiving (RuntimeError: " + "r" * 300
     + "... (301 characters)); nothing runs here"),
    (RuntimeError("r" * 300), "internal error while receiving (RuntimeError: " + "r" * 300 + "); nothing runs here"),
], ids=["os-401", "os-400", "internal-301", "internal-300"])
def test_an_unexpected_error_becomes_a_refusal_with_its_text(kvm: Kvm, catalog: Catalog, error: Exception,
                                                              reason: str) -> None:
    header, hello = valid(catalog)
    said: list[str] = []

    def progress(text: str) -> None:
        said.append(text)
        if len(said) == 1:
            raise error

    got = receive(kvm, catalog, stream(header, hello), progress=progress)
    assert got.sent == [("NACK", {"reason": reason})] and said == [incoming(header), f"refused: {reason}"]
    assert got.arrival.reason == f"refused: {reason}" and got.arrival.vmm is None


# --- deadlines --------------------------------------------------------------------------------------------------------
def deadline_passed(what: str) -> str:
    return rf"refused: the migration's deadline passed( while ({what}|sending))?; nothing runs here"


def test_a_silent_peer_is_cut_off_at_the_deadline_before_hello(kvm: Kvm, catalog: Catalog) -> None:
    got = receive(kvm, catalog, b"", close=False, deadline=0.3, idle=20)
    assert re.fullmatch(deadline_passed("receiving the stream header"), got.arrival.reason), got.arrival.reason
    assert got.progress == [got.arrival.reason] and got.arrival.vmm is None


def test_a_peer_silent_after_hello_is_cut_off_at_the_deadline(kvm: Kvm, catalog: Catalog) -> None:
    header, hello = valid(catalog)
    got = receive(kvm, catalog, encode_header(header) + encode_json(b"HELO", hello), close=False, deadline=1.5,
                  idle=20)
    assert re.fullmatch(deadline_passed("receiving the next section"), got.arrival.reason), got.arrival.reason
    assert got.progress[-1] == got.arrival.reason and got.arrival.vmm is None and got.receiver.vmm is None


# --- the commit -------------------------------------------------------------------------------------------------------
ENDED = "the connection ended after REDY without the commit ({}): asking the source's VMM how it decided"


@pytest.mark.parametrize("cmit,why", [
    (False, "the peer closed the connection"),
    ({}, "CMIT section: field migration is missing"),
    ({"migration": "0" * 32}, "CMIT section: it commits another migration, not {m}"),
], ids=["none", "empty", "another"])
def test_without_a_commit_on_the_stream_the_sources_vmm_is_asked(kvm: Kvm, catalog: Catalog, cmit: Any,
                                                                 why: str) -> None:
    header, hello = valid(catalog)
    m = header["migration"]
    asked: list[tuple[str, str]] = []

    def ask(control: str, migration: str) -> str:
        asked.append((control, migration))
        return "committed"

    got = receive(kvm, catalog, stream(header, hello, cpus=cpus_of(kvm, catalog), cmit=cmit), ask=ask)
    settled = "the source's VMM says it committed"
    assert got.kinds() == ["VRDT", "REDY"] and asked == [("unix:/nonexistent/src.ctl", m)]
    assert got.progress[2:] == [ENDED.format(why.format(m=m)),
                                f"committed ({settled}); forcing RRSBA_DIS_S before the guest runs here"]
    assert got.arrival.vmm is not None and got.arrival.settled_by == settled and got.ledger.how(m) == settled
    got.arrival.vmm.close()


def test_a_commit_that_never_comes_is_given_up_at_the_commit_wait(kvm: Kvm, catalog: Catalog) -> None:
    header, hello = valid(catalog)
    got = receive(kvm, catalog, stream(header, hello, cpus=cpus_of(kvm, catalog), cmit=False), close=False,
                  idle=20, commit_wait=0.3)
    ended = got.progress[2]
    assert re.fullmatch(ENDED.replace("(", r"\(").replace(")", r"\)").format(
        "the migration's deadline passed( while receiving the next section)?"), ended), ended
    assert got.arrival.vmm is not None and got.arrival.settled_by == "the source's VMM says it committed"
    got.arrival.vmm.close()


# --- a test's faults: where the destination dies ----------------------------------------------------------------------
@pytest.mark.usefixtures("exits")
@pytest.mark.parametrize("fault,sent,pages,phase", [
    ("die-after-pages", ["VRDT"], 1, "unknown"), ("die-after-state", ["VRDT"], 1, "unknown"),
    ("die-after-ready", ["VRDT", "REDY"], 1, "prepared"),
])
def test_a_fault_kills_the_destination_where_it_says(kvm: Kvm, catalog: Catalog, fault: str, sent: list[str],
                                                     pages: int, phase: str) -> None:
    header, hello = valid(catalog)
    got = receive(kvm, catalog, stream(header, hello, encode_pages(1, bytes(PAGE)), encode_pages(2, bytes(PAGE)),
                                       cpus=cpus_of(kvm, catalog), done={"pages": 2}), fault=fault)
    assert got.died == 9 and got.kinds() == sent and got.receiver.pages == (2 if fault != "die-after-pages" else 1)
    assert got.ledger.phase(header["migration"]) == phase and got.arrival.vmm is None
    assert gc.isenabled()


def no_longer_reporting(kvm: Kvm, catalog: Catalog) -> tuple[dict[str, Any], Got]:
    """A Skylake guest whose HELO reported relying on nothing and whose state after the pause has not reported,
    received by a Skylake host."""
    header, _ = valid(catalog)
    personality = resolve(catalog, "qemu-tcg-skylake-server")
    config = InterfaceConfig(Form.INTEL, 0)
    hello = snapshot(VmInterface(config, catalog.get("skylake-client").facts, personality.facts))
    header = put(put(header, "vm.personality", personality.to_json()), "vm.config", config.to_json())
    reported = put(hello, "vcpus", [{"ctrl": 0, "reported": True, "spec_ctrl": 0, "forced_mask": 0,
                                     "forced_value": 0}])
    return header, receive(kvm, catalog, stream(header, reported, ista=hello, cpus=cpus_of(kvm, catalog)),
                           model="skylake-client")


def test_a_guest_that_no_longer_reports_is_refused_after_the_pause(kvm: Kvm, catalog: Catalog) -> None:
    """A Skylake guest that had reported relying on nothing is accepted on a Skylake host; paused, it has not
    reported, so its boot personality's retpoline is assumed, which that host cannot make safe: refused."""
    header, got = no_longer_reporting(kvm, catalog)
    verdict = got.arrival.verdict
    assert got.doc("VRDT")["accepted"] is True and verdict["accepted"] is False
    assert len(verdict["reasons"]) == 1 and verdict["reasons"][0].startswith(
        "vCPU 0: retpoline is ineffective here (RET may predict from the BTB on RSB underflow (Retbleed)")
    assert got.kinds() == ["VRDT", "NACK"]
    refused(got, "after the pause: " + verdict["reasons"][0], built=True)
    assert got.ledger.phase(header["migration"]) == "unknown"


def test_a_refusal_after_the_pause_gives_every_reason(kvm: Kvm, catalog: Catalog,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """A final state with more than one reason is refused with all of them, in order, joined by '; ' (one vCPU's
    state gives one reason here; the join is checked on the real refusal given a second reason)."""
    import dataclasses

    from pvmit.migration import destination
    real = destination.finish

    def finish(prepared: Any, state: Any) -> Any:
        final, core = real(prepared, state)
        if final.accepted:  # the decisions before the pause stand
            return final, core
        return dataclasses.replace(final, reasons=(*final.reasons, "a second reason")), None

    monkeypatch.setattr(destination, "finish", finish)
    _, got = no_longer_reporting(kvm, catalog)
    assert got.kinds() == ["VRDT", "NACK"]
    first = got.arrival.verdict["reasons"][0]
    assert first.startswith("vCPU 0: retpoline is ineffective here")
    refused(got, f"after the pause: {first}; a second reason", built=True)


def test_the_durations_in_ready_are_milliseconds(kvm: Kvm, catalog: Catalog, monkeypatch: pytest.MonkeyPatch) -> None:
    """A clock that moves a quarter of a second per reading: each measured step took exactly that long."""
    header, hello = valid(catalog)
    data = stream(header, hello, cpus=cpus_of(kvm, catalog))
    ticks = iter(range(1, 1000))
    monkeypatch.setattr(time, "perf_counter", lambda: next(ticks) / 4)
    got = receive(kvm, catalog, data)
    monkeypatch.undo()
    a = got.arrival
    assert (a.interface_seconds, a.apply_seconds) == (0.25, 0.25)
    ready = got.doc("REDY")
    assert (ready["interface_check_ms"], ready["apply_ms"]) == (250.0, 250.0)
    assert a.vmm is not None
    a.vmm.close()


# --- settling with the source's VMM (REDY sent, no CMIT): what it says, how often it asks ----------------------------
M = "0123456789abcdef0123456789abcdef"


def settle(monkeypatch: pytest.MonkeyPatch, answers: list[str], *, notice: float, source: str = "Ice Lake",
           control: str = "unix:/src.ctl") -> tuple[bool, list[str], list[float], list[str], Receiver]:
    """_settle with scripted answers; in the pause after the last one the operator says run. The pauses between
    questions are recorded, not slept."""
    said: list[str] = []
    slept: list[float] = []
    asked: list[str] = []
    led = Ledger()
    led.prepared(M)

    def ask(c: str, m: str) -> str:
        asked.append(c)
        return answers[len(asked) - 1]

    def pause(seconds: float) -> None:
        slept.append(seconds)
        if len(slept) == len(answers):
            led.commit(M, "the operator said run")

    r = Receiver(None, None, None, None, ledger=led, control="unix:/dst.ctl", ask=ask,  # type: ignore[arg-type]
                 progress=said.append, settle_notice=notice)
    inc = Incoming(None, None, 0, source, {}, M, "ab", control)  # type: ignore[arg-type]
    monkeypatch.setattr(time, "sleep", pause)
    result = r._settle(inc)
    monkeypatch.undo()
    return result, said, slept, asked, r


def test_settling_asks_again_sooner_while_the_source_decides(monkeypatch: pytest.MonkeyPatch) -> None:
    result, said, slept, asked, r = settle(monkeypatch, ["deciding", "unreachable"], notice=60.0)
    assert result is True and r.arrival.settled_by == "the operator said run"
    assert asked == ["unix:/src.ctl"] * 2 and slept == [0.5, 1.0] and said == []  # no notice before 60 s


def test_settling_in_doubt_tells_the_operator_exactly_what_to_do(monkeypatch: pytest.MonkeyPatch) -> None:
    result, said, slept, asked, _ = settle(monkeypatch, ["unreachable", "unreachable"], notice=0.0, source="s" * 65,
                                           control="c" * 101)
    assert result is True and slept == [1.0, 1.0]
    assert said == [
        f"IN DOUBT: migration {M} from {'s' * 64}... (65 characters): the source's VMM at {'c' * 100}... (101 "
        "characters) cannot be reached; the guest is held here, not running. If the source no longer runs it "
        "(`pvmit ctl SOURCE status`), run `pvmit ctl unix:/dst.ctl resolve run`; if it does, `pvmit ctl "
        "unix:/dst.ctl resolve discard`. Asking again meanwhile."]


def test_settling_without_the_sources_address_asks_no_one(monkeypatch: pytest.MonkeyPatch) -> None:
    result, said, slept, asked, _ = settle(monkeypatch, ["-"], notice=0.0, control="")
    assert result is True and asked == [] and slept == [1.0]  # as for an unreachable VMM
    assert said[0].startswith(f"IN DOUBT: migration {M} from Ice Lake: the source's VMM at (unknown address) cannot "
                              "be reached; the guest is held here, not running.")
