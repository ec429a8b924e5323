"""The destination's Receiver driven in this process with crafted streams over a socket pair, on a real KVM VM:
every refusal sent back to the peer, every progress and log line, the Arrival's fields and the ledger's record,
asserted whole (mutation testing runs these: a broken rule in src/pvmit/migration/destination.py fails here).

The peer's side is written by a thread ahead of the Receiver (the stream is small), then everything the Receiver
sent back is read after `run()` returns. Deadlines are short; nothing here waits on a timer to pass or fail.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from test_stream_validation import put, valid

from pvmit.catalog.loader import Catalog
from pvmit.interface.policy import PartialSettings
from pvmit.kvm.system import Kvm, kvm_available
from pvmit.migration import destination, vmstate
from pvmit.migration.destination import Arrival, Receiver, _cpuid_differences, _same_vm
from pvmit.migration.ledger import Ledger
from pvmit.migration.stream import PAGE, StreamError, encode_header, encode_json, encode_pages, encode_zero
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


class Died(BaseException):
    """What os._exit does in these tests: the Receiver stops there (a BaseException: no handler of its takes it)."""

    def __init__(self, code: int) -> None:
        super().__init__(code)
        self.code = code


@pytest.fixture
def exits(monkeypatch: pytest.MonkeyPatch) -> None:
    def _exit(code: int) -> None:
        raise Died(code)
    monkeypatch.setattr(destination.os, "_exit", _exit)


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
    from pvmit.interface.forms import InterfaceConfig
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
    except Died as e:  # a fault's os._exit, caught here (see `exits`)
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




# --- a whole stream, taken -------------------------------------------------------------------------------------------
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
    assert got.arrival.vmm is not None and got.arrival.vmm.core.vcpus[0].spec.mask == 0x44
    got.arrival.vmm.close()
