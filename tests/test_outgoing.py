"""The source side of a migration (`Outgoing`) against a scripted destination on a real Unix socket: every progress
line an operator reads, the Outcome, the ledger's record and the exact bytes on the wire, for the success path,
each refusal, each fault a test can inject and each way a commit can be lost. The source is a real KVM VM in this
process (mutation testing runs these); the destination is a few lines of protocol that answer as a script says, so
that every answer the source must handle (odd verdicts, a CACK for another migration, a peer that stalls) is one
test. The real destination (`Receiver`) is in tests/test_migration_inprocess.py.
"""

from __future__ import annotations

import json
import secrets
import socket
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from fault_exit import Exited, raise_instead
from test_migration_inprocess import USABLE, WHY, source_vmm

from pvmit.catalog.loader import Catalog
from pvmit.interface.state import snapshot
from pvmit.kvm.system import Kvm
from pvmit.migration import source as source_module
from pvmit.migration import vmstate
from pvmit.migration.ledger import Ledger
from pvmit.migration.source import FAULT_ENV, Outcome, Outgoing, describe
from pvmit.migration.stream import CRC, HEADER_FIXED, PAGE, PAGES_HEAD, SECTION_HEAD, encode_json
from pvmit.net.address import Address
from pvmit.net.peer import accept
from pvmit.net.text import shorten
from pvmit.net.tls import Credentials, make_test_ca
from pvmit.vmm.vmm import Vmm

pytestmark = pytest.mark.skipif(not USABLE, reason=f"needs a usable /dev/kvm: {WHY}")

M = "0123456789abcdef0123456789abcdef"
CONTROL = "unix:/dest/control"
HOST = "destination-host-" + "h" * 100  # longer than the 64 characters the accept line keeps
PAUSED_AT = 1234.5


class Closed(Exception):
    """The source closed the connection."""


@dataclass
class Dest:
    """The destination's end of one connection: raw reads (so that corrupt or unknown sections are seen as sent),
    a copy of the guest memory the stream carries, and what it answered."""

    sock: socket.socket
    memory: bytearray
    version: int = 0
    header: dict[str, Any] = field(default_factory=dict)
    sections: list[tuple[bytes, bytes, bool]] = field(default_factory=list)  # kind, payload, checksum ok
    raw: bytearray = field(default_factory=bytearray)  # every byte after the header
    received: int = 0
    covered: list[int] = field(default_factory=list)  # page numbers the stream carried, in order
    zero: int = 0
    # called with (dest, first, count) once a MEMP section's head is read and before its pages are
    on_memp: Callable[[Dest, int, int], None] | None = None

    def read(self, n: int) -> bytes:
        buf = bytearray()
        while len(buf) < n:
            chunk = self.sock.recv(min(n - len(buf), 1 << 16))
            if not chunk:
                self.raw.extend(buf)
                raise Closed(bytes(buf))
            buf.extend(chunk)
        self.received += n
        return bytes(buf)

    def read_header(self) -> None:
        fixed = self.read(HEADER_FIXED.size)
        _, self.version, _, length = HEADER_FIXED.unpack(fixed)
        self.header = json.loads(self.read(length + CRC.size)[:length])

    def section(self) -> tuple[bytes, bytes]:
        head = self.read(SECTION_HEAD.size)
        self.raw.extend(head)
        kind, length = SECTION_HEAD.unpack(head)
        if kind == b"MEMP" and self.on_memp is not None:
            pages_head = self.read(PAGES_HEAD.size)
            hook, self.on_memp = self.on_memp, None
            hook(self, *PAGES_HEAD.unpack(pages_head))
            body = pages_head + self.read(length - PAGES_HEAD.size)
        else:
            body = self.read(length)
        crc = self.read(CRC.size)
        self.raw.extend(body + crc)
        ok = CRC.unpack(crc)[0] == zlib.crc32(body, zlib.crc32(head))
        self.sections.append((kind, body, ok))
        if kind in (b"MEMP", b"ZERO"):
            first, count = PAGES_HEAD.unpack_from(body)
            self.covered.extend(range(first, first + count))
            if kind == b"MEMP":
                self.memory[first * PAGE:(first + count) * PAGE] = body[PAGES_HEAD.size:]
            else:
                self.zero += count
        return kind, body

    def doc(self, kind: bytes) -> Any:
        got, body = self.section()
        assert got == kind, (got, kind)
        return json.loads(body)

    def until_done(self) -> dict[str, Any]:
        while True:
            kind, body = self.section()
            if kind == b"DONE":
                return dict(json.loads(body))

    def send(self, kind: bytes, doc: Any) -> None:
        self.sock.sendall(encode_json(kind, doc))

    def kinds(self) -> list[bytes]:
        return [k for k, _, _ in self.sections]

    def json(self, kind: bytes) -> Any:
        return next(json.loads(b) for k, b, _ in self.sections if k == kind)


@dataclass
class Run:
    outcome: Outcome
    said: list[str]
    dest: Dest
    ledger: Ledger
    asked: list[tuple[str, str, str]]
    vmm: Vmm
    outgoing: Outgoing
    address: Address
    error: BaseException | None = None
    doubts: list[str] = field(default_factory=list)


Script = Callable[[Dest], None]


def accepts(dest: Dest) -> None:
    dest.read_header()
    dest.doc(b"HELO")
    dest.send(b"VRDT", {"accepted": True, "host": HOST})


def commits(dest: Dest, cack: Any = None) -> None:
    """The whole success path: accept, take everything, REDY, CMIT, CACK."""
    accepts(dest)
    dest.until_done()
    dest.send(b"REDY", {"migration": M, "control": CONTROL, "forced": []})
    assert dest.doc(b"CMIT") == {"migration": M}
    dest.send(b"CACK", {"migration": M} if cack is None else cack)


_VMMS: dict[int, Vmm] = {}


@pytest.fixture
def kvm() -> Iterator[Kvm]:
    with Kvm() as k:
        yield k


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def drive(kvm: Kvm, catalog: Catalog, tmp_path: Path, script: Script, *, mode: str = "pre-copy",
          fault: str | None = None, ask: Callable[[str, str, str], str] | None = None,
          pause: Callable[[Vmm], float] | None = None, progress: Callable[[str], None] | None = None,
          on_doubt: Callable[[Outgoing, str], None] | None = None, check: bool = False, stall: float = 5.0,
          deadline: float = 60.0, listen: bool = True, on_memp: Callable[[Dest, int, int], None] | None = None,
          settle_notice: float = 60.0, vmm: Vmm | None = None,
          tls: tuple[Credentials, Credentials] | None = None) -> Run:
    vmm = vmm or source_vmm(kvm, catalog)
    address = Address.parse(f"tcp:127.0.0.1:{free_port()}" if tls else
                            f"unix:{tmp_path / f'dst-{secrets.token_hex(3)}.mig'}")
    listener = address.listen() if listen else None
    memory = bytearray(vmm.machine.memory.size)
    dests: list[Dest] = []
    errors: list[BaseException] = []

    def serve() -> None:
        assert listener is not None
        conn, addr = listener.accept()
        peer = accept(conn, addr, tls[0] if tls else None, deadline=time.monotonic() + 10)
        dest = Dest(peer.sock, memory, on_memp=on_memp)
        dests.append(dest)
        try:
            script(dest)
            dest.sock.settimeout(10)
            while True:  # to the end: what the source sends after the script's last step is recorded too
                dest.section()
        except Closed:
            pass
        except BaseException as e:  # noqa: BLE001 - reported by the test
            errors.append(e)
        finally:
            peer.sock.close()

    t = threading.Thread(target=serve, daemon=True)
    if listen:
        t.start()
    if mode == "pre-copy":
        vmm.machine.vm.set_dirty_logging(0, True)
        vmm.machine.vm.dirty_pages(0)
    vmm.sync_spec_ctrl()
    header = describe(vmm, "check" if check else mode, M, "0123456789abcdef", "unix:/source/control")
    ledger = Ledger()
    ledger.start(M)
    said: list[str] = []
    asked: list[tuple[str, str, str]] = []
    doubts: list[str] = []

    def asking(control: str, migration: str, told: str) -> str:
        asked.append((control, migration, told))
        return ask(control, migration, told) if ask else "unknown"

    def pausing() -> float:
        return pause(vmm) if pause else PAUSED_AT

    def saying(m: str) -> None:
        said.append(m)
        if progress:
            progress(m)

    out = Outgoing(vmm, address, tls[1] if tls else None, header=header, hello=snapshot(vmm.core), ledger=ledger,
                   pause=pausing,
                   ask=asking, check_only=check, fault=fault, progress=saying, stall=stall, deadline=deadline,
                   settle_notice=settle_notice)
    if on_doubt is not None:
        out.on_doubt = lambda m: (doubts.append(m), on_doubt(out, m))  # type: ignore[func-returns-value]
    error: BaseException | None = None
    try:
        outcome = out.run()
    except BaseException as e:  # noqa: BLE001 - a simulated os._exit
        error, outcome = e, out.out
    if not (fault or "").startswith("die-"):
        assert error is None, error
    if listen:
        t.join(30)
        assert not t.is_alive()
    if listener is not None:
        listener.close()
        if not tls:
            address.unlink()
    if errors:
        raise errors[0]
    dest = dests[0] if dests else Dest(socket.socket(), memory)
    return Run(outcome, said, dest, ledger, asked, vmm, out, address, error, doubts)


def written_pages(vmm: Vmm) -> list[int]:
    """Every page of guest memory that was ever written, by the test's own arithmetic."""
    pages: set[int] = set()
    for a, b in vmm.machine.memory.data_extents():
        pages.update(range(a // PAGE, -(-b // PAGE)))
    return sorted(pages)


def connected(run: Run) -> str:
    return f"connected to {run.address} (peer accepted us)"


ACCEPTED = f"destination {shorten(HOST, 64)} accepts the guest before the source pauses"


def test_the_accept_line_keeps_64_characters_of_the_host() -> None:
    assert shorten(HOST, 64) != shorten(HOST, 65) and shorten(HOST, 64) != HOST


# --- the success path -----------------------------------------------------------------------------------------------
def test_a_pre_copy_migration_says_each_step_and_sends_every_written_page(kvm: Kvm, catalog: Catalog,
                                                                          tmp_path: Path) -> None:
    vmm = source_vmm(kvm, catalog)
    odd = (5 << 20) // PAGE  # a page whose only set bit is a sign bit: all zero read as floats, not as integers
    vmm.machine.memory.view[odd * PAGE + 7] = 0x80
    vmm.machine.memory.view[(4 << 20) + (512 << 10)] = 1  # splits the written MiB of zeros in two runs
    pages = written_pages(vmm)  # before: reading a page of shared memory gives it a backing page
    run = drive(kvm, catalog, tmp_path, commits, vmm=vmm)
    o = run.outcome
    assert written_pages(vmm) == pages
    assert run.said == [connected(run), ACCEPTED, f"pre-copy round 1: {len(pages)} pages while the guest runs",
                        "guest paused on the source", "committed: the guest now runs on the destination"]
    assert o.migrated and o.accepted and o.mode == "pre-copy" and o.migration == M and o.vm == "0123456789abcdef"
    assert o.reason == "" and o.settled_by == "CACK" and not o.in_doubt and o.rounds == 1
    assert o.verdict == {"accepted": True, "host": HOST}
    assert o.ready == {"migration": M, "control": CONTROL, "forced": []}
    assert o.paused_at == PAUSED_AT and o.committed_at is not None and 0 < o.total_seconds < 60
    assert run.dest.covered == pages and o.pages_sent == len(pages) and o.zero_pages == run.dest.zero >= 255
    assert o.bytes_sent == run.dest.received
    assert run.ledger.phase(M) == "committed" and run.ledger.how(M) == "REDY received"
    assert run.asked == []
    d = run.dest
    assert d.header["source_control"] == "unix:/source/control" and d.header["vm"]["cpuid"] == vmm.guest_cpuid()
    assert d.header["source_host"] == {"name": vmm.host.name, "facts": vmm.host.facts.to_json(),
                                       "stand_in": vmm.host.stand_in}
    assert d.memory[odd * PAGE + 7] == 0x80 and odd in d.covered
    assert sum(1 for k in d.kinds() if k == b"ZERO") >= 2
    assert d.version == 2 and d.header == describe(vmm, "pre-copy", M, "0123456789abcdef", "unix:/source/control")
    assert d.kinds()[-5:] == [b"ISTA", b"CPUS", b"DEVS", b"DONE", b"CMIT"]
    assert d.kinds()[0] == b"HELO" and d.json(b"HELO") == json.loads(json.dumps(snapshot(vmm.core)))
    assert set(d.kinds()[1:-5]) == {b"MEMP", b"ZERO"} and all(ok for _, _, ok in d.sections)
    assert d.json(b"ISTA") == json.loads(json.dumps(snapshot(vmm.core)))
    cpus, now = d.json(b"CPUS"), json.loads(json.dumps(vmstate.capture(vmm.vcpu)))
    assert cpus["msrs"].pop("0x10") <= now["msrs"].pop("0x10") and cpus == now  # the TSC runs on
    assert d.json(b"DEVS") == {"serial_partial": vmm.serial.partial}
    assert d.json(b"DONE") == {"pages": o.pages_sent}
    view = vmm.machine.memory.view
    for p in pages:
        assert d.memory[p * PAGE:(p + 1) * PAGE] == view[p * PAGE:(p + 1) * PAGE], p


def run_guest(vmm: Vmm) -> float:
    """The guest ran until the pause: it dirtied a few pages that the final copy must carry."""
    vmm.run(max_exits=300, timeout=10)
    return PAUSED_AT


def test_the_pages_dirtied_before_the_pause_go_in_the_final_copy(kvm: Kvm, catalog: Catalog,
                                                                 tmp_path: Path) -> None:
    run = drive(kvm, catalog, tmp_path, commits, pause=run_guest)
    assert run.outcome.migrated and run.outcome.rounds == 1
    assert run.outcome.pages_sent == len(run.dest.covered) > len(written_pages(run.vmm))  # some went twice
    view = run.vmm.machine.memory.view
    for p in written_pages(run.vmm):
        assert run.dest.memory[p * PAGE:(p + 1) * PAGE] == view[p * PAGE:(p + 1) * PAGE], p


@pytest.mark.parametrize("where", ["round 1", "final"])
def test_pages_are_copied_while_the_guest_runs_and_sent_from_memory_once_paused(kvm: Kvm, catalog: Catalog,
                                                                               tmp_path: Path,
                                                                               where: str) -> None:
    """The destination changes the last page of the first large MEMP section while the source is still sending it
    (as the running guest would): a copy taken before sending (pre-copy) carries the old bytes, with a matching
    checksum; once paused, the pages go straight from guest memory, so the change shows."""
    changed: list[int] = []

    def change(dest: Dest, first: int, count: int) -> None:
        if count < 256:  # too small to fill the socket: the source may have sent it all
            dest.on_memp = change
            return
        last = first + count - 1
        vmm.machine.memory.view[last * PAGE + 100] ^= 0xFF
        changed.append(last)

    vmm = source_vmm(kvm, catalog)
    run = drive(kvm, catalog, tmp_path, commits, on_memp=change, vmm=vmm,
                mode="pre-copy" if where == "round 1" else "stop-and-copy")
    assert len(changed) == 1
    p = changed[0]
    sent = run.dest.memory[p * PAGE + 100]
    now = run.vmm.machine.memory.view[p * PAGE + 100]
    checks = [ok for kind, _, ok in run.dest.sections if kind == b"MEMP"]
    if where == "round 1":
        assert sent == now ^ 0xFF and all(checks)  # the copy, taken before the change, and its checksum
    else:  # no copy: the change went out, after the checksum was taken (the destination would refuse it)
        assert sent == now and checks.count(False) == 1


def test_stop_and_copy_sends_every_written_page_once_paused(kvm: Kvm, catalog: Catalog, tmp_path: Path) -> None:
    vmm = source_vmm(kvm, catalog)
    run_guest(vmm)
    pages = written_pages(vmm)
    run = drive(kvm, catalog, tmp_path, commits, mode="stop-and-copy", vmm=vmm)
    assert written_pages(vmm) == pages
    assert run.said == [connected(run), ACCEPTED, "guest paused on the source",
                        "committed: the guest now runs on the destination"]
    assert run.outcome.rounds == 0 and run.dest.covered == pages and run.outcome.pages_sent == len(pages)
    view = run.vmm.machine.memory.view
    assert all(run.dest.memory[p * PAGE:(p + 1) * PAGE] == view[p * PAGE:(p + 1) * PAGE] for p in pages)


def test_over_tls_the_connect_line_says_so(kvm: Kvm, catalog: Catalog, tmp_path: Path) -> None:
    make_test_ca(tmp_path / "pki", ["127.0.0.1"])
    creds = (Credentials.load(tmp_path / "pki", roles=("server",)),
             Credentials.load(tmp_path / "pki", roles=("client",)))
    run = drive(kvm, catalog, tmp_path, accepts, check=True, tls=creds)
    assert run.said[0] == f"connected to {run.address} (TLS, peer accepted us)" and run.address.is_tcp


SWEEPER = """
entry:
    mov rbx, 0x600000
    mov rcx, rdi
sweep:
    mov byte ptr [rbx], 1
    add rbx, 4096
    dec rcx
    jnz sweep
    mov dx, 0x3f8
    mov al, 0x2e
    out dx, al
    jmp entry
"""


def sweeper(kvm: Kvm, catalog: Catalog, pages: int) -> Vmm:
    """A guest that writes to `pages` pages, then one character to the serial port, for ever."""
    from test_migration_inprocess import MEMORY, real_host

    from pvmit.asm import assemble
    from pvmit.interface.forms import Form, InterfaceConfig
    from pvmit.interface.policy import OperatorSettings, supported_requests
    from pvmit.vmm.hosts import stand_in
    from pvmit.vmm.personality import resolve
    host = stand_in(catalog, "icelake-sp", real_host(catalog))
    config = InterfaceConfig(Form.INTEL, supported_requests([host.facts]))
    vmm = Vmm(kvm, resolve(catalog, "icelake-server-v2"), host, config, OperatorSettings(), memory_size=MEMORY)
    vmm.load(assemble(SWEEPER, 0x10000), 0x10000, (pages,))
    return vmm


@pytest.mark.parametrize("pages,sweeps,rounds", [(61, 1, 1), (62, 1, 2), (70, 99, 6)],
                         ids=["converged", "one-more", "never"])
def test_pre_copy_goes_on_while_more_than_64_pages_are_dirty_for_at_most_6_rounds(
        kvm: Kvm, catalog: Catalog, tmp_path: Path, pages: int, sweeps: int, rounds: int) -> None:
    """(The 61-page sweep dirties exactly 64 pages: the limit, still converged.)"""
    vmm = sweeper(kvm, catalog, pages)
    done = [0]

    def progress(m: str) -> None:  # the guest runs during a round: one sweep per round, `sweeps` rounds
        if m.startswith("pre-copy round") and done[0] < sweeps:
            done[0] += 1
            vmm.run(poll=lambda: True, max_exits=10, timeout=10)

    run = drive(kvm, catalog, tmp_path, commits, vmm=vmm, progress=progress)
    lines = [m for m in run.said if m.startswith("pre-copy round")]
    assert run.outcome.rounds == rounds == len(lines) and run.outcome.migrated, lines
    if pages == 62:  # its first sweep also sets accessed/dirty bits in 3 page-table pages: 65 pages, one too many
        assert lines[1] == "pre-copy round 2: 65 pages while the guest runs"


# --- refusals ---------------------------------------------------------------------------------------------------------
LONG = "why " * 150  # longer than the 400 characters a refusal keeps
REASONS = [f"reason {i}: " + "r" * 450 for i in range(17)]


def refuses(kind: bytes, doc: Any) -> Script:
    def script(dest: Dest) -> None:
        dest.read_header()
        dest.doc(b"HELO")
        dest.send(kind, doc)
    return script


@pytest.mark.parametrize("kind,doc,reason", [
    (b"NACK", {"accepted": True, "reason": LONG}, "destination refused: " + shorten(LONG, 400)),
    (b"VRDT", {"accepted": False, "reasons": REASONS, "reason": "not this"},
     "destination refused: " + "; ".join(shorten(r, 400) for r in REASONS[:16])),
    (b"VRDT", {"accepted": False, "reasons": ["one", 2]}, "destination refused: one; 2"),
    (b"VRDT", {"accepted": False, "reasons": [], "reason": "empty list"}, "destination refused: empty list"),
    (b"VRDT", {"accepted": False, "reasons": "no list", "reason": "a string"}, "destination refused: a string"),
    (b"VRDT", {"accepted": 1}, "destination refused: " + shorten(str({"accepted": 1}), 400)),
    (b"VRDT", {"accepted": "yes", "pad": LONG}, "destination refused: " + shorten(str({"accepted": "yes", "pad": LONG}),
                                                                                  400)),
], ids=["nack", "reasons", "short-reasons", "empty-reasons", "string-reasons", "not-true", "whole-verdict"])
def test_a_refusal_before_the_pause_is_said_and_recorded(kvm: Kvm, catalog: Catalog, tmp_path: Path, kind: bytes,
                                                         doc: Any, reason: str) -> None:
    assert shorten(LONG, 400) != shorten(LONG, 401)
    run = drive(kvm, catalog, tmp_path, refuses(kind, doc))
    o = run.outcome
    assert run.said == [connected(run), reason]
    assert o.reason == reason and o.verdict == doc and not o.accepted and not o.migrated and o.paused_at is None
    assert o.pages_sent == 0 and o.bytes_sent == run.dest.received and run.dest.kinds() == [b"HELO"]
    assert run.ledger.phase(M) == "aborted" and run.ledger.how(M) == reason and run.asked == []


def test_a_verdict_that_is_no_object_fails_the_migration(kvm: Kvm, catalog: Catalog, tmp_path: Path) -> None:
    run = drive(kvm, catalog, tmp_path, refuses(b"VRDT", [True]))
    offset = run.dest.received - len(encode_json(b"VRDT", [True]))  # the source received what the dest sent
    start = len(encode_json(b"HELO", snapshot(run.vmm.core)))
    assert run.outcome.reason.startswith("migration failed: VRDT section at byte ")
    assert run.outcome.reason.endswith(": not a JSON object") and run.said[-1] == run.outcome.reason
    assert offset >= 0 and start > 0


def test_a_verdict_without_a_host_name(kvm: Kvm, catalog: Catalog, tmp_path: Path) -> None:
    run = drive(kvm, catalog, tmp_path, refuses(b"VRDT", {"accepted": True}), check=True)
    assert run.said[-1] == "destination ? accepts the guest before the source pauses"


def test_check_only_stops_after_the_verdict(kvm: Kvm, catalog: Catalog, tmp_path: Path) -> None:
    run = drive(kvm, catalog, tmp_path, accepts, check=True)
    o = run.outcome
    assert run.said == [connected(run), ACCEPTED] and o.accepted and not o.migrated
    assert o.reason == "check only: nothing moved" and run.dest.header["mode"] == "check"
    assert run.ledger.phase(M) == "aborted" and run.ledger.how(M) == "check only: nothing moved"


def nack_after(doc: Any) -> Script:
    def script(dest: Dest) -> None:
        accepts(dest)
        dest.until_done()
        dest.send(b"NACK", doc)
    return script


@pytest.mark.parametrize("doc,reason", [
    ({"reason": LONG, "control": CONTROL}, "destination refused after the pause: " + shorten(LONG, 400)),
    ({}, "destination refused after the pause: None"),
], ids=["reason", "none"])
def test_a_refusal_after_the_pause_resumes_the_guest(kvm: Kvm, catalog: Catalog, tmp_path: Path, doc: Any,
                                                     reason: str) -> None:
    run = drive(kvm, catalog, tmp_path, nack_after(doc))
    o = run.outcome
    assert run.said[-2:] == ["guest paused on the source", reason] and len(run.said) == 5
    assert o.reason == reason and o.accepted and not o.migrated and o.paused_at == PAUSED_AT and o.ready == {}
    assert run.ledger.phase(M) == "aborted" and run.ledger.how(M) == reason
    assert run.asked == []  # nothing prepared there: nobody to tell
    assert run.dest.kinds()[-1] == b"DONE"


# --- the stream cut, stalled or refused -----------------------------------------------------------------------------
def test_nothing_listening_fails_before_anything_moves(kvm: Kvm, catalog: Catalog, tmp_path: Path) -> None:
    from pvmit.net.peer import connect
    run = drive(kvm, catalog, tmp_path, accepts, listen=False)
    with pytest.raises(ConnectionError) as e:
        connect(run.address, None, timeout=1)
    reason = f"migration failed: {e.value}"
    assert run.said == [reason] and run.outcome.reason == reason and run.outcome.bytes_sent == 0
    assert run.ledger.phase(M) == "aborted" and run.ledger.how(M) == reason


def silent(dest: Dest) -> None:
    dest.read_header()
    dest.doc(b"HELO")
    dest.sock.settimeout(30)
    try:
        dest.sock.recv(1)  # until the source gives up
    except OSError:
        pass


@pytest.mark.parametrize("stall,deadline,why", [(0.3, 30.0, "stalled"), (30.0, 0.5, "deadline")])
def test_a_silent_destination_is_given_up_on(kvm: Kvm, catalog: Catalog, tmp_path: Path, stall: float,
                                             deadline: float, why: str) -> None:
    run = drive(kvm, catalog, tmp_path, silent, stall=stall, deadline=deadline)
    assert why in run.outcome.reason and run.said[-1] == run.outcome.reason and run.outcome.paused_at is None
    assert run.outcome.reason.startswith("migration failed: ")


# --- a commit not acknowledged ----------------------------------------------------------------------------------------
NO_ACK = ("no acknowledgement of the commit ({}): asking the destination's VMM whether it runs the guest")
SAYS = "committed: the destination's VMM says it runs the guest"


@pytest.mark.parametrize("cack,why", [
    ({"migration": "another"}, "CACK section: it acknowledges another migration"),
    ({}, "CACK section: it acknowledges another migration"),
], ids=["another", "none"])
def test_a_cack_for_another_migration_is_settled_by_asking(kvm: Kvm, catalog: Catalog, tmp_path: Path, cack: Any,
                                                           why: str) -> None:
    run = drive(kvm, catalog, tmp_path, lambda d: commits(d, cack), ask=lambda *a: "committed")
    o = run.outcome
    assert run.said[-2:] == [NO_ACK.format(why), SAYS] and len(run.said) == 6
    assert o.migrated and not o.in_doubt and o.settled_by == "the destination's VMM says it runs the guest"
    assert run.asked == [(CONTROL, M, "committed")] and run.ledger.phase(M) == "committed"
    assert o.reason == ""  # settled in the ordinary way, not as an internal error


def test_a_cack_trickling_in_past_the_stall_limit_is_not_waited_for(kvm: Kvm, catalog: Catalog,
                                                                     tmp_path: Path) -> None:
    """After CMIT the source waits `stall` seconds in all for CACK, not `stall` per byte."""
    def script(dest: Dest) -> None:
        accepts(dest)
        dest.until_done()
        dest.send(b"REDY", {"migration": M, "control": CONTROL})
        dest.doc(b"CMIT")
        cack = encode_json(b"CACK", {"migration": M})
        try:
            dest.sock.sendall(cack[:4])
            for i in range(4, 10):  # a byte every 0.25 s: never idle for 0.6 s, but 1.5 s in all
                time.sleep(0.25)
                dest.sock.sendall(cack[i:i + 1])
            dest.sock.sendall(cack[10:])
        except OSError:  # the source gave up and closed
            pass

    run = drive(kvm, catalog, tmp_path, script, stall=0.6, ask=lambda *a: "committed")
    assert run.said[-2].startswith("no acknowledgement of the commit (") and "deadline" in run.said[-2], run.said
    assert run.said[-1] == SAYS and run.outcome.settled_by == "the destination's VMM says it runs the guest"


def resolve_run(out: Outgoing, message: str) -> None:
    out.operator = "run"
    out.wake.set()


def test_a_ready_without_a_control_address_leaves_the_guest_in_doubt(kvm: Kvm, catalog: Catalog,
                                                                      tmp_path: Path) -> None:
    def script(dest: Dest) -> None:
        accepts(dest)
        dest.until_done()
        dest.send(b"REDY", {"migration": M})
        dest.doc(b"CMIT")  # and then nothing: the connection closes

    run = drive(kvm, catalog, tmp_path, script, ask=lambda *a: "unreachable", on_doubt=resolve_run, stall=0.5,
                settle_notice=0)
    o = run.outcome
    assert run.asked == []  # nobody to ask
    assert run.doubts == [run.said[-1]] and "VMM at (no control address) cannot be reached" in run.said[-1]
    assert run.said[-2].startswith("no acknowledgement of the commit (")
    assert not o.migrated and not o.in_doubt and o.settled_by == "the operator said run"
    assert run.ledger.phase(M) == "aborted" and run.ledger.how(M) == "the operator said run"


# --- faults injected on purpose ---------------------------------------------------------------------------------------
@pytest.fixture
def faults(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(FAULT_ENV, "1")
    raise_instead(monkeypatch)  # source.py's os._exit


def lenient(dest: Dest) -> None:
    """Accepts and takes whatever comes, to the end of the stream."""
    accepts(dest)
    dest.until_done()
    dest.send(b"NACK", {"reason": "refused"})


def test_a_flipped_memory_bit_goes_out_once(kvm: Kvm, catalog: Catalog, tmp_path: Path, faults: None) -> None:
    run = drive(kvm, catalog, tmp_path, lenient, fault="flip-memory")
    memp = [(body, ok) for kind, body, ok in run.dest.sections if kind == b"MEMP"]
    assert [ok for _, ok in memp] == [False] + [True] * (len(memp) - 1)
    body = memp[0][0]
    first = PAGES_HEAD.unpack_from(body)[0]
    view = run.vmm.machine.memory.view
    sent = body[PAGES_HEAD.size:]
    assert sent[0] == view[first * PAGE] ^ 0x01 and sent[1:] == view[first * PAGE + 1:first * PAGE + len(sent)]
    assert run.outcome.reason == "destination refused after the pause: refused"


def test_a_flipped_state_bit(kvm: Kvm, catalog: Catalog, tmp_path: Path, faults: None) -> None:
    run = drive(kvm, catalog, tmp_path, lenient, fault="flip-state")
    state = bytearray(encode_json(b"ISTA", snapshot(run.vmm.core)))
    state[20] ^= 0x04
    ista = [(body, ok) for kind, body, ok in run.dest.sections if kind == b"ISTA"]
    assert ista == [(bytes(state[SECTION_HEAD.size:-CRC.size]), False)]


def test_a_report_meanwhile_clears_the_controls_in_the_final_state(kvm: Kvm, catalog: Catalog, tmp_path: Path,
                                                                   faults: None) -> None:
    vmm = sweeper(kvm, catalog, 1)  # a guest that never reported anything
    assert not snapshot(vmm.core)["vcpus"][0]["reported"]
    run = drive(kvm, catalog, tmp_path, lenient, fault="report-meanwhile", vmm=vmm)
    want = json.loads(json.dumps(snapshot(run.vmm.core)))
    want["vcpus"][0].update(ctrl=0, reported=True)
    assert run.dest.json(b"ISTA") == want


def test_a_wrong_version(kvm: Kvm, catalog: Catalog, tmp_path: Path, faults: None) -> None:
    run = drive(kvm, catalog, tmp_path, lenient, fault="wrong-version")
    assert run.dest.version == 99


def test_an_unknown_section_after_the_state(kvm: Kvm, catalog: Catalog, tmp_path: Path, faults: None) -> None:
    run = drive(kvm, catalog, tmp_path, lenient, fault="unknown-section")
    head = b"XTRA" + (2).to_bytes(8, "little")
    crc = zlib.crc32(b"{}", zlib.crc32(head)).to_bytes(4, "little")
    assert run.dest.kinds()[-5:] == [b"ISTA", b"XTRA", b"CPUS", b"DEVS", b"DONE"]
    assert head + b"{}" + crc in run.dest.raw
    assert all(ok for _, _, ok in run.dest.sections)


def test_a_truncated_state(kvm: Kvm, catalog: Catalog, tmp_path: Path, faults: None) -> None:
    def script(dest: Dest) -> None:
        accepts(dest)
        dest.until_done()

    run = drive(kvm, catalog, tmp_path, script, fault="truncate")
    state = encode_json(b"ISTA", snapshot(run.vmm.core))
    assert run.dest.raw.endswith(state[:len(state) // 2]) and run.dest.kinds()[-1] in (b"MEMP", b"ZERO")
    reason = "migration failed: stream cut short on purpose (fault injection)"
    assert run.outcome.reason == reason and run.said[-1] == reason + "; the guest resumes on the source"
    assert run.said[-2] == "guest paused on the source"
    assert run.ledger.phase(M) == "aborted" and run.ledger.how(M) == reason


def test_a_connection_dropped_before_the_commit_tells_the_destination(kvm: Kvm, catalog: Catalog, tmp_path: Path,
                                                                      faults: None) -> None:
    told = threading.Event()

    def script(dest: Dest) -> None:
        accepts(dest)
        dest.until_done()
        dest.send(b"REDY", {"migration": M, "control": CONTROL})

    def ask(*args: str) -> str:
        told.set()
        return "aborted"

    run = drive(kvm, catalog, tmp_path, script, fault="drop-before-commit", ask=ask)
    assert told.wait(10)
    reason = "migration failed: connection dropped before the commit (fault injection)"
    assert run.outcome.reason == reason and run.said[-1] == reason + "; the guest resumes on the source"
    assert run.asked == [(CONTROL, M, "aborted")] and run.ledger.how(M) == reason
    assert run.ledger.phase(M) == "aborted" and b"CMIT" not in run.dest.kinds()


def test_a_lost_commit_ack_is_settled_by_asking(kvm: Kvm, catalog: Catalog, tmp_path: Path, faults: None) -> None:
    def script(dest: Dest) -> None:
        accepts(dest)
        dest.until_done()
        dest.send(b"REDY", {"migration": M, "control": CONTROL})

    run = drive(kvm, catalog, tmp_path, script, fault="lose-commit-ack", ask=lambda *a: "committed")
    assert run.said[-2:] == [NO_ACK.format("connection dropped after the commit (fault injection)"), SAYS]
    assert run.outcome.migrated and run.asked == [(CONTROL, M, "committed")]
    assert run.dest.kinds()[-1] == b"CMIT"
    assert run.outcome.reason == ""


@pytest.mark.parametrize("fault,last,phase", [
    ("die-after-pause", "guest paused on the source", "deciding"),
    ("die-before-commit", "guest paused on the source", "deciding"),
    ("die-after-commit", "guest paused on the source", "committed"),
])
def test_a_source_that_dies(kvm: Kvm, catalog: Catalog, tmp_path: Path, faults: None, fault: str, last: str,
                            phase: str) -> None:
    def script(dest: Dest) -> None:
        accepts(dest)
        dest.until_done()
        dest.send(b"REDY", {"migration": M, "control": CONTROL})

    run = drive(kvm, catalog, tmp_path, script, fault=fault)
    assert isinstance(run.error, Exited) and run.error.code == 9
    assert run.said[-1] == last and run.ledger.phase(M) == phase
    kinds = run.dest.kinds()
    assert {"die-after-pause": b"HELO" if run.outcome.pages_sent == 0 else kinds[-1],
            "die-before-commit": b"DONE", "die-after-commit": b"CMIT"}[fault] == kinds[-1]
    if fault == "die-after-pause":
        assert all(k in (b"HELO", b"MEMP", b"ZERO") for k in kinds) and run.outcome.paused_at == PAUSED_AT


# --- errors nobody expected -------------------------------------------------------------------------------------------
class Boom(Exception):
    pass


def raising_on(line: str) -> Callable[[str], None]:
    said = [False]

    def progress(m: str) -> None:
        if m == line and not said[0]:
            said[0] = True
            raise Boom("x" * 500)
    return progress


def test_an_internal_error_before_the_commit_keeps_the_guest(kvm: Kvm, catalog: Catalog, tmp_path: Path) -> None:
    run = drive(kvm, catalog, tmp_path, commits, progress=raising_on("guest paused on the source"),
                on_doubt=resolve_run, settle_notice=0)  # (were it taken for a commit, it would end at once)
    reason = f"migration failed: internal error (Boom: {shorten('x' * 500, 300)})"
    assert shorten("x" * 500, 300) != shorten("x" * 500, 301)
    assert run.outcome.reason == reason and run.said[-1] == reason and not run.outcome.migrated
    assert run.ledger.phase(M) == "aborted" and run.ledger.how(M) == reason


def test_an_internal_error_after_the_commit_is_settled_by_asking(kvm: Kvm, catalog: Catalog, tmp_path: Path) -> None:
    run = drive(kvm, catalog, tmp_path, commits,
                progress=raising_on("committed: the guest now runs on the destination"),
                ask=lambda *a: "committed", on_doubt=resolve_run, settle_notice=0)  # a wrong address ends at once
    assert run.outcome.reason == f"internal error after the commit (Boom: {shorten('x' * 500)})"
    assert run.outcome.migrated and run.said[-1] == SAYS and run.asked == [(CONTROL, M, "committed")]



# --- _abort and _settle on their own (no VM: they touch only the ledger, `ask` and the Outcome) ---------------------
class Wake(threading.Event):
    """Records how long `_settle` would wait between questions, and returns at once."""

    def __init__(self) -> None:
        super().__init__()
        self.waits: list[float] = []

    def wait(self, timeout: float | None = None) -> bool:
        assert timeout is not None
        self.waits.append(timeout)
        return True


def bare(ask: Callable[..., str], *, notice: float = 60.0) -> tuple[Outgoing, list[str], list[str], Ledger]:
    said: list[str] = []
    doubts: list[str] = []
    led = Ledger()
    led.start(M)
    o = Outgoing(None, Address.parse("unix:/dst.mig"), None,  # type: ignore[arg-type]
                 header={"migration": M, "mode": "pre-copy", "vm_id": "ab"}, hello={}, ledger=led,
                 pause=time.monotonic, ask=ask, progress=said.append, on_doubt=doubts.append, settle_notice=notice)
    o.wake = Wake()
    return o, said, doubts, led


def test_a_new_outgoing_starts_with_an_empty_outcome() -> None:
    o, _, _, _ = bare(lambda *a: "x")
    assert o.out == Outcome(False, False, "pre-copy", M, "ab") and not o.check_only and o.fault is None
    o2 = Outgoing(None, Address.parse("unix:/d"), None, header={"migration": M, "mode": "m"},  # type: ignore[arg-type]
                  hello={}, ledger=Ledger(), pause=time.monotonic, ask=lambda *a: "x")
    assert o2.out.vm == "" and o2.out.accepted is False


def test_an_unknown_fault_and_a_fault_outside_tests_are_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    from pvmit.errors import PvmitError
    from pvmit.migration.source import FAULTS
    kw: dict[str, Any] = dict(header={"migration": M, "mode": "m"}, hello={}, ledger=Ledger(), pause=time.monotonic,
                              ask=lambda *a: "x")
    bad = "nope-" + "n" * 60
    with pytest.raises(PvmitError) as e:
        Outgoing(None, Address.parse("unix:/d"), None, fault=bad, **kw)  # type: ignore[arg-type]
    assert str(e.value) == f"unknown fault {shorten(bad, 40)!r}; known: {', '.join(FAULTS)}"
    assert shorten(bad, 40) != shorten(bad, 41)
    monkeypatch.delenv(FAULT_ENV, raising=False)
    with pytest.raises(PvmitError) as e:
        Outgoing(None, Address.parse("unix:/d"), None, fault="truncate", **kw)  # type: ignore[arg-type]
    assert str(e.value) == (f"fault injection (truncate) is for tests only: the VMM was not started with "
                            f"{FAULT_ENV}=1")


@pytest.mark.parametrize("ready,told", [({"control": CONTROL}, True), ({"control": ""}, False),
                                        ({"control": 5}, False), ({}, False)],
                         ids=["control", "empty", "number", "none"])
def test_abort_tells_a_destination_that_may_hold_the_guest(ready: dict[str, Any], told: bool) -> None:
    release = threading.Event()
    calls: list[tuple[Any, ...]] = []
    threads: list[threading.Thread] = []

    def ask(*args: Any) -> str:
        threads.append(threading.current_thread())
        calls.append(args)
        release.wait(10)
        return "aborted"

    o, said, _, led = bare(ask)
    o.out.ready = ready
    o.out.reason = "the reason"
    assert o._abort(o.out) is o.out  # returns before the destination answers
    assert led.phase(M) == "aborted" and led.how(M) == "the reason" and said == []
    release.set()
    for t in threading.enumerate():
        if t.name == "tell-aborted":
            t.join(10)
    assert calls == ([(CONTROL, M, "aborted")] if told else [])
    if told:
        assert threads[0].name == "tell-aborted" and threads[0].daemon


def test_abort_without_a_reason_records_aborted() -> None:
    o, _, _, led = bare(lambda *a: "x")
    o._abort(o.out)
    assert led.phase(M) == "aborted" and led.how(M) == "aborted" and led.role(M) == "source"
    led.decide(M, "committed", "REDY received")
    assert led.role(M) == "source" and led.answer(M, None) == {"role": "source", "state": "committed"}


def test_a_fault_outside_tests_is_refused_with_its_name_shortened(monkeypatch: pytest.MonkeyPatch) -> None:
    from pvmit.errors import PvmitError
    from pvmit.migration.source import allow_fault
    monkeypatch.delenv(FAULT_ENV, raising=False)
    name = "f" * 60
    with pytest.raises(PvmitError) as e:
        allow_fault(name)
    assert str(e.value) == (f"fault injection ({shorten(name, 40)}) is for tests only: the VMM was not started "
                            f"with {FAULT_ENV}=1")
    assert shorten(name, 40) != shorten(name, 41)
    allow_fault(None)
    monkeypatch.setenv(FAULT_ENV, "1")
    allow_fault(name)


def test_settle_asks_while_in_doubt_and_waits_less_while_prepared() -> None:
    seen: list[Any] = []
    answers = iter(["prepared", "unreachable", "prepared", "committed"])

    def ask(*args: Any) -> str:
        seen.append((args, o.out.in_doubt))
        return next(answers)

    o, said, doubts, led = bare(ask)
    out = o._settle(o.out, CONTROL)
    assert seen == [((CONTROL, M, "committed"), True)] * 4
    assert o.wake.waits == [0.5, 1.0, 0.5] and out.migrated and out.in_doubt is False  # type: ignore[attr-defined]
    assert said == [SAYS] and doubts == []


@pytest.mark.parametrize("control,shown", [("", "(no control address)"),
                                           ("unix:/" + "c" * 150, shorten("unix:/" + "c" * 150, 100))])
def test_settle_tells_the_operator_what_to_run(control: str, shown: str) -> None:
    assert shorten("unix:/" + "c" * 150, 100) != shorten("unix:/" + "c" * 150, 101)
    o, said, doubts, led = bare(lambda *a: "unreachable", notice=0)
    waits = o.wake.waits  # type: ignore[attr-defined]

    def wait(timeout: float | None = None) -> bool:
        waits.append(timeout)
        if len(waits) == 2:
            o.operator = "discard"
        return True

    o.wake.wait = wait  # type: ignore[method-assign]
    out = o._settle(o.out, control)
    text = (f"IN DOUBT: migration {M} to unix:/dst.mig: committed, but the destination's VMM at {shown} cannot be "
            "reached; the guest is paused here. If the destination runs it (`pvmit ctl DEST status`), run "
            "`pvmit ctl SOURCE resolve discard`; if it does not, `pvmit ctl SOURCE resolve run`. Asking again "
            "meanwhile.")
    assert said == [text] and doubts == [text] and out.reason == text and waits == [1.0, 1.0]
    assert out.migrated and out.in_doubt is False and out.settled_by == "the operator said discard"
    assert led.phase(M) == "deciding"  # the operator says the destination runs it: nothing to undo here



@pytest.mark.parametrize("answer,why", [
    ("unknown", "the destination's VMM knows nothing of it (its process is gone)"),
    ("gone", "nothing listens at the destination's control socket (its VMM is gone)"),
    ("aborted", "the destination's operator discarded its copy"),
])
def test_settle_resumes_when_no_living_destination_has_the_guest(answer: str, why: str) -> None:
    o, said, _, led = bare(lambda *a: answer)
    out = o._settle(o.out, CONTROL)
    reason = f"the commit did not reach a living destination: {why}"
    assert out.in_doubt is False and not out.migrated and out.settled_by == why and out.reason == reason
    assert said == [reason + "; the guest resumes on the source"]
    assert led.phase(M) == "aborted" and led.how(M) == why


def test_settle_takes_the_operators_run() -> None:
    o, said, _, led = bare(lambda *a: "unreachable")
    o.operator = "run"
    out = o._settle(o.out, CONTROL)
    assert out.in_doubt is False and out.migrated is False and out.settled_by == "the operator said run"
    assert led.phase(M) == "aborted" and led.how(M) == "the operator said run" and said == []


def test_settle_tells_the_operator_only_once_the_notice_time_has_passed(monkeypatch: pytest.MonkeyPatch) -> None:
    o, said, doubts, _ = bare(lambda *a: "unreachable", notice=5)
    now = [100.0]
    monkeypatch.setattr(source_module.time, "monotonic", lambda: now[0])
    waits = o.wake.waits  # type: ignore[attr-defined]

    def wait(timeout: float | None = None) -> bool:  # the clock reads exactly the notice time, then past it
        waits.append(timeout)
        now[0] += 5.0 if len(waits) == 1 else 0.001
        if len(waits) == 3:
            o.operator = "run"
        return True

    told_at: list[int] = []
    o.on_doubt = lambda m: told_at.append(len(waits))
    o.wake.wait = wait  # type: ignore[method-assign]
    o._settle(o.out, CONTROL)
    monkeypatch.undo()
    assert told_at == [2] and len(said) == 1  # at 5.001 s past the first question, not at exactly 5 s


def test_the_ledger_keeps_the_most_recent_256_and_knows_nothing_of_the_others() -> None:
    from pvmit.migration.ledger import KEEP
    led = Ledger()
    assert led.phase("never") == "unknown" and led.how("never") == "" and led.role("never") == ""
    for i in range(KEEP):
        led.decide(f"m{i}", "aborted", f"how {i}")
    assert led.phase("m0") == "aborted" and led.how("m0") == "how 0"  # exactly KEEP: none dropped
    led.decide("m0", "committed", "again")  # the newest now
    led.decide("new", "committed", "REDY received")  # one more than KEEP: the oldest (m1) goes
    assert led.phase("m1") == "unknown" and led.how("m1") == ""
    assert led.phase("m0") == "committed" and led.phase("new") == "committed" and led.phase("m2") == "aborted"


def test_a_long_connection_error_is_shortened_to_400_characters(kvm: Kvm, catalog: Catalog, tmp_path: Path) -> None:
    text = "lost " * 120

    def pause(vmm: Vmm) -> float:
        raise ConnectionError(text)

    run = drive(kvm, catalog, tmp_path, lenient, pause=pause)
    assert shorten(text, 400) != shorten(text, 401) and shorten(text, 400) != shorten(text)
    reason = f"migration failed: {shorten(text, 400)}"
    assert run.outcome.reason == reason and run.said[-1] == reason  # never paused: nothing to resume
    assert run.ledger.phase(M) == "aborted" and run.ledger.how(M) == reason


def test_an_internal_error_after_a_commit_without_a_control_address_asks_no_one(kvm: Kvm, catalog: Catalog,
                                                                                 tmp_path: Path) -> None:
    def script(dest: Dest) -> None:
        accepts(dest)
        dest.until_done()
        dest.send(b"REDY", {"migration": M})
        dest.doc(b"CMIT")
        dest.send(b"CACK", {"migration": M})

    run = drive(kvm, catalog, tmp_path, script, on_doubt=resolve_run, settle_notice=0,
                progress=raising_on("committed: the guest now runs on the destination"))
    assert run.asked == [] and "VMM at (no control address) cannot be reached" in run.said[-1]
    assert run.outcome.settled_by == "the operator said run" and run.ledger.phase(M) == "aborted"
