"""Sending a running guest to another pvmit VMM process, from a thread of its own while the guest keeps running.

1. HELO: the VM's description and its interface state; the destination answers VRDT after running the policy
   against its own host. A refusal ends here: the guest never paused.
2. Pre-copy (when KVM's dirty-page log works): every written page (zero pages as ZERO markers), then the pages
   dirtied meanwhile, round after round. The guest runs all along: this thread only reads memory and the dirty log,
   never the vCPU. Otherwise stop-and-copy.
3. Pause (the VMM's main thread stops the vCPU at an instruction boundary, pending I/O completed); the last dirty
   pages, ISTA (the final interface state), CPUS, DEVS, DONE.
4. The destination checks everything and answers REDY (or NACK). The source then decides: commit, recorded in its
   ledger, then CMIT; the destination runs the guest and answers CACK. On NACK, an error, a stalled peer or a lost
   connection before the decision, the guest resumes on the source, intact.
5. A connection lost after the decision (no CACK) is settled by asking the destination's VMM (`outcome`): it
   either runs the guest (done), still holds it prepared (it is told, and runs it), or lost it (its process is gone:
   the guest resumes here). Unreachable: the guest stays paused here and the operator is told what to run.

A stalled or dead destination is given up on after the idle limit (no byte moved) or the overall deadline; the
guest is never paused before the final stop-and-copy.
"""

from __future__ import annotations

import os
import struct
import threading
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from pvmit import __version__
from pvmit.errors import PvmitError
from pvmit.interface.state import snapshot
from pvmit.kvm.vm import PAGE
from pvmit.migration import vmstate
from pvmit.migration.ledger import Ledger
from pvmit.migration.stream import Section, StreamError, encode_header, encode_json, encode_zero, pages_frame
from pvmit.migration.transport import Channel, Pages
from pvmit.net.address import Address
from pvmit.net.peer import connect
from pvmit.net.text import shorten
from pvmit.net.tls import Credentials
from pvmit.vmm.vmm import Vmm

SLICE_PAGES = 1024  # 4 MiB: pages per MEMP section
MAX_ROUNDS = 6
CONVERGED_PAGES = 64
DEFAULT_DEADLINE = 300.0
DEFAULT_STALL = 30.0
SETTLE_NOTICE = 60.0
FAULTS = ("flip-memory", "flip-state", "truncate", "wrong-version", "die-after-pause", "unknown-section",
          "stop-and-copy", "report-meanwhile", "drop-before-commit", "die-before-commit", "lose-commit-ack",
          "die-after-commit", "pause-mid-line")
"""Failures a test can make the source produce on purpose (`--fault`); never used otherwise."""
FAULT_ENV = "PVMIT_FAULT_INJECTION"


def allow_fault(fault: str | None) -> None:
    """Refuse a fault-injection request unless the VMM runs with PVMIT_FAULT_INJECTION=1 (as the tests do), so
    that no control-socket client can make a production VMM corrupt a stream or exit."""
    if fault is not None and os.environ.get(FAULT_ENV) != "1":
        raise PvmitError(f"fault injection ({shorten(fault, 40)}) is for tests only: the VMM was not started with "
                         f"{FAULT_ENV}=1")


def _object(section: Section | Pages) -> dict[str, Any]:
    doc = section.json() if isinstance(section, Section) else None
    if not isinstance(doc, dict):
        raise StreamError(f"{section.kind.decode()} section at byte {section.offset}: not a JSON object")
    return doc


@dataclass
class Outcome:
    """What happened to one migration attempt, from the source's side."""

    migrated: bool
    accepted: bool
    mode: str
    migration: str = ""
    vm: str = ""
    reason: str = ""
    verdict: dict[str, Any] = field(default_factory=dict)
    ready: dict[str, Any] = field(default_factory=dict)
    rounds: int = 0
    pages_sent: int = 0
    zero_pages: int = 0
    bytes_sent: int = 0
    total_seconds: float = 0.0
    paused_at: float | None = None  # time.monotonic() when the guest stopped running here
    committed_at: float | None = None
    in_doubt: bool = False  # the decision was commit but the destination has not confirmed it (yet)
    settled_by: str = ""

    def to_json(self) -> dict[str, Any]:
        where = ("running on the destination" if self.migrated else
                 "paused on the source, in doubt: see the reason" if self.in_doubt else "still running on the source")
        return {"migrated": self.migrated, "accepted": self.accepted, "mode": self.mode,
                "migration": self.migration, "vm": self.vm, "reason": self.reason, "verdict": self.verdict,
                "ready": self.ready,
                "rounds": self.rounds, "pages_sent": self.pages_sent, "zero_pages": self.zero_pages,
                "bytes_sent": self.bytes_sent, "total_seconds": round(self.total_seconds, 4),
                "paused_at": self.paused_at, "committed_at": self.committed_at, "in_doubt": self.in_doubt,
                "settled_by": self.settled_by, "guest": where}


def describe(vmm: Vmm, mode: str, migration: str, vm_id: str, control: str) -> dict[str, Any]:
    """The stream header: who sends, and the VM as the destination must rebuild it. Called on the VMM's main
    thread (it reads the vCPU)."""
    return {
        "pvmit": __version__,
        "mode": mode,
        "page_size": PAGE,
        "migration": migration,
        "vm_id": vm_id,
        "source_control": control,
        "source_host": {"name": vmm.host.name, "facts": vmm.host.facts.to_json(), "stand_in": vmm.host.stand_in},
        "vm": {"personality": vmm.personality.to_json(), "config": vmm.config.to_json(),
               "memory_size": vmm.machine.memory.size, "vcpus": 1, "cpuid": vmm.guest_cpuid()},
    }


def runs(pages: np.ndarray, limit: int) -> list[tuple[int, int]]:
    """Ascending page numbers as (first, count) runs of consecutive pages, each at most `limit` long."""
    if not len(pages):
        return []
    breaks = np.flatnonzero(np.diff(pages) != 1) + 1
    out = []
    for chunk in np.split(pages, breaks):
        first = int(chunk[0])
        for off in range(0, len(chunk), limit):
            out.append((first + off, min(limit, len(chunk) - off)))
    return out


def _segments(mask: np.ndarray, base: int) -> list[tuple[int, int, bool]]:
    """Runs of equal values in a boolean array, as (base + start, length, value)."""
    edges = np.flatnonzero(np.diff(mask.view(np.int8))) + 1
    starts = np.concatenate(([0], edges))
    ends = np.concatenate((edges, [len(mask)]))
    return [(base + int(a), int(b - a), bool(mask[a])) for a, b in zip(starts, ends)]


def _warm_up() -> None:
    """Call once, before the pause, every numpy routine the final stop-and-copy uses."""
    pages = np.arange(4, dtype=np.int64)
    _segments(np.asarray(pages % 2 == 0), 0)
    runs(np.union1d(pages, pages[:2]), SLICE_PAGES)


AskDest = Callable[[str, str, str], str]
"""ask(destination control, migration, what we decided) -> the destination's state: committed, prepared, aborted,
unknown, gone (nothing listens: its process is gone) or unreachable."""


class Outgoing:
    """One outgoing migration. Built on the VMM's main thread (which takes the HELO snapshot), `run()` on a thread
    of its own. `pause()` asks the main thread to stop the guest and returns when it has, with the time."""

    def __init__(self, vmm: Vmm, to: Address, creds: Credentials | None, *, header: dict[str, Any],
                 hello: dict[str, Any], ledger: Ledger, pause: Callable[[], float], ask: AskDest,
                 check_only: bool = False, fault: str | None = None,
                 progress: Callable[[str], None] = lambda m: None, on_doubt: Callable[[str], None] = lambda m: None,
                 deadline: float = DEFAULT_DEADLINE, stall: float = DEFAULT_STALL,
                 settle_notice: float = SETTLE_NOTICE) -> None:
        if fault is not None and fault not in FAULTS:
            raise PvmitError(f"unknown fault {shorten(fault, 40)!r}; known: {', '.join(FAULTS)}")
        allow_fault(fault)
        self.vmm, self.to, self.creds = vmm, to, creds
        self.header, self.hello, self.ledger = header, hello, ledger
        self.pause, self.ask, self.check_only, self.fault = pause, ask, check_only, fault
        self.progress, self.on_doubt = progress, on_doubt
        self.deadline, self.stall, self.settle_notice = deadline, stall, settle_notice
        self.migration = str(header["migration"])
        self.mode = str(header["mode"])
        self.out = Outcome(False, False, self.mode, self.migration, str(header.get("vm_id", "")))
        self.operator: str | None = None  # "run" or "discard", set by `pvmit ctl ... resolve` while in doubt
        self.wake = threading.Event()
        self._bounce = bytearray(SLICE_PAGES * PAGE)

    # --- sending pages -----------------------------------------------------------------------------------------
    def _send_pages(self, chan: Channel, pages: np.ndarray, *, running: bool) -> None:
        """Send `pages` (ascending): non-zero ones as MEMP, zero ones as ZERO runs. While the guest runs, each
        slice is copied first, so its checksum matches what is sent; once paused, sent from guest memory."""
        mem = self.vmm.machine.memory
        if not len(pages):
            return
        rows = np.frombuffer(mem.mmap, dtype=np.uint64).reshape(-1, PAGE // 8)
        view = mem.view
        for first, count in runs(pages, SLICE_PAGES):
            nonzero = np.asarray(rows[first:first + count].any(axis=1))  # reads these pages only, copies nothing
            for sub_first, sub_count, data in _segments(nonzero, first):
                if not data:
                    chan.send(encode_zero(sub_first, sub_count))
                    self.out.pages_sent += sub_count
                    self.out.zero_pages += sub_count
                    continue
                payload: memoryview = view[sub_first * PAGE:(sub_first + sub_count) * PAGE]
                if running:
                    n = sub_count * PAGE
                    self._bounce[:n] = payload
                    payload = memoryview(self._bounce)[:n]
                head, _, crc = pages_frame(sub_first, payload)
                if self.fault == "flip-memory":  # the first pages sent arrive with one bit flipped
                    flipped = bytearray(payload)
                    flipped[0] ^= 0x01
                    payload, self.fault = memoryview(flipped), None
                chan.send(head, payload, crc)
                self.out.pages_sent += sub_count

    # --- the exchange ------------------------------------------------------------------------------------------
    def run(self) -> Outcome:
        out, start = self.out, time.monotonic()
        vm = self.vmm.machine.vm
        chan: Channel | None = None
        try:
            try:
                peer = connect(self.to, self.creds, timeout=min(10.0, self.stall))
            except (ConnectionError, PvmitError) as e:
                out.reason = f"migration failed: {e}"
                self.progress(out.reason)
                return self._abort(out)
            chan = Channel(peer.sock, expect_header=False, idle=self.stall, deadline=start + self.deadline)
            self.progress(f"connected to {self.to} ({'TLS, ' if self.to.is_tcp else ''}peer accepted us)")
            chan.send(encode_header(self.header, version=99 if self.fault == "wrong-version" else 2))
            chan.send(encode_json(b"HELO", self.hello))
            answer = chan.expect(b"VRDT", b"NACK")
            verdict = _object(answer)
            out.verdict = verdict
            if answer.kind == b"NACK" or verdict.get("accepted") is not True:
                reasons = verdict.get("reasons")
                if isinstance(reasons, list) and reasons:
                    out.reason = "destination refused: " + "; ".join(shorten(str(r), 400) for r in reasons[:16])
                else:
                    out.reason = f"destination refused: {shorten(str(verdict.get('reason', verdict)), 400)}"
                self.progress(out.reason)
                return self._abort(out)
            out.accepted = True
            self.progress(f"destination {shorten(str(verdict.get('host', '?')), 64)} accepts the guest before "
                          "the source pauses")
            if self.check_only:
                out.reason = "check only: nothing moved"
                return self._abort(out)
            mem = self.vmm.machine.memory
            todo = np.zeros(0, dtype=np.int64)
            _warm_up()  # numpy's first calls load code (20+ ms measured): not while the guest is paused
            if self.mode == "pre-copy":
                written = np.concatenate([np.arange(a // PAGE, (b + PAGE - 1) // PAGE) for a, b in
                                          mem.data_extents()] or [np.zeros(0, dtype=np.int64)])
                todo = written
                while True:
                    out.rounds += 1
                    self.progress(f"pre-copy round {out.rounds}: {len(todo)} pages while the guest runs")
                    self._send_pages(chan, todo, running=True)
                    todo = np.asarray(vm.dirty_pages(0), dtype=np.int64)
                    if len(todo) <= CONVERGED_PAGES or out.rounds >= MAX_ROUNDS:
                        break
            # --- the guest stops running here ---
            out.paused_at = self.pause()
            self.progress("guest paused on the source")
            if self.fault == "die-after-pause":
                os._exit(9)
            if self.mode == "pre-copy":  # the pages dirtied in the last round are still to send, and those since
                final = np.union1d(todo, np.asarray(vm.dirty_pages(0), dtype=np.int64))
            else:
                final = np.concatenate([np.arange(a // PAGE, (b + PAGE - 1) // PAGE) for a, b in
                                        mem.data_extents()] or [np.zeros(0, dtype=np.int64)])
            self._send_pages(chan, final, running=False)
            self.vmm.sync_spec_ctrl()
            final_state = snapshot(self.vmm.core)
            if self.fault == "report-meanwhile":  # as if the guest had opted out of every mitigation during the copy
                final_state["vcpus"][0].update(ctrl=0, reported=True)
            state = bytearray(encode_json(b"ISTA", final_state))
            if self.fault == "flip-state":
                state[20] ^= 0x04
            if self.fault == "truncate":
                chan.send(bytes(state[: len(state) // 2]))
                chan.sock.shutdown(2)
                raise ConnectionError("stream cut short on purpose (fault injection)")
            chan.send(bytes(state))
            if self.fault == "unknown-section":
                head = struct.pack("<4sQ", b"XTRA", 2)
                chan.send(head + b"{}" + struct.pack("<I", zlib.crc32(b"{}", zlib.crc32(head))))
            chan.send(encode_json(b"CPUS", vmstate.capture(self.vmm.vcpu)))
            chan.send(encode_json(b"DEVS", {"serial_partial": self.vmm.serial.partial}))
            chan.send(encode_json(b"DONE", {"pages": out.pages_sent}))
            reply = chan.expect(b"REDY", b"NACK")
            answer_doc = _object(reply)
            if reply.kind == b"NACK":
                out.reason = f"destination refused after the pause: {shorten(str(answer_doc.get('reason')), 400)}"
                self.progress(out.reason)
                return self._abort(out)
            out.ready = answer_doc
            if self.fault == "drop-before-commit":
                raise ConnectionError("connection dropped before the commit (fault injection)")
            if self.fault == "die-before-commit":
                os._exit(9)
            # --- the decision: from here the source never resumes the guest unless the destination lost it ---
            self.ledger.decide(self.migration, "committed", "REDY received")
            try:
                chan.send(encode_json(b"CMIT", {"migration": self.migration}))
                if self.fault == "die-after-commit":
                    os._exit(9)
                if self.fault == "lose-commit-ack":
                    raise ConnectionError("connection dropped after the commit (fault injection)")
                chan.deadline = time.monotonic() + self.stall
                if _object(chan.expect(b"CACK")).get("migration") != self.migration:
                    raise StreamError("CACK section: it acknowledges another migration")
                out.committed_at = time.monotonic()
                out.migrated, out.settled_by = True, "CACK"
                self.progress("committed: the guest now runs on the destination")
                return out
            except (StreamError, ConnectionError, OSError) as e:
                self.progress(f"no acknowledgement of the commit ({shorten(str(e))}): asking the destination's "
                              "VMM whether it runs the guest")
                return self._settle(out, str(answer_doc.get("control", "")))
        except (StreamError, ConnectionError, OSError) as e:
            out.reason = f"migration failed: {shorten(str(e), 400)}"
            self.progress(out.reason + ("; the guest resumes on the source" if out.paused_at else ""))
            return self._abort(out)
        except Exception as e:  # noqa: BLE001 - an unexpected error must not lose the guest: it stays here
            if self.ledger.phase(self.migration) == "committed":
                out.reason = f"internal error after the commit ({type(e).__name__}: {shorten(str(e))})"
                return self._settle(out, str(out.ready.get("control", "")))
            out.reason = f"migration failed: internal error ({type(e).__name__}: {shorten(str(e), 300)})"
            self.progress(out.reason)
            return self._abort(out)
        finally:
            out.bytes_sent = chan.sent if chan else 0
            out.total_seconds = time.monotonic() - start
            if chan is not None:
                chan.close()

    def _abort(self, out: Outcome) -> Outcome:
        """The guest stays (or resumes) here. If the destination may hold it prepared, tell it, in passing, from
        another thread: the guest resumes now, not after the destination answers (it also asks us if it must)."""
        self.ledger.decide(self.migration, "aborted", out.reason or "aborted")
        control = out.ready.get("control") if out.ready else None
        if isinstance(control, str) and control:
            threading.Thread(target=self.ask, args=(control, self.migration, "aborted"), name="tell-aborted",
                             daemon=True).start()
        return out

    def _settle(self, out: Outcome, control: str) -> Outcome:
        """Decided commit, unconfirmed: find out from the destination's VMM. Never resumes the guest while the
        destination may run it."""
        out.in_doubt = True
        started, told = time.monotonic(), False
        while True:
            if self.operator is not None:
                out.migrated = self.operator == "discard"
                out.in_doubt = False
                out.settled_by = f"the operator said {self.operator}"
                if not out.migrated:
                    self.ledger.decide(self.migration, "aborted", out.settled_by)
                return out
            answer = self.ask(control, self.migration, "committed") if control else "unreachable"
            if answer == "committed":
                out.migrated, out.in_doubt = True, False
                out.committed_at = time.monotonic()
                out.settled_by = "the destination's VMM says it runs the guest"
                self.progress(f"committed: {out.settled_by}")
                return out
            if answer in ("unknown", "gone", "aborted"):
                out.in_doubt = False
                out.settled_by = {"unknown": "the destination's VMM knows nothing of it (its process is gone)",
                                  "gone": "nothing listens at the destination's control socket (its VMM is gone)",
                                  "aborted": "the destination's operator discarded its copy"}[answer]
                out.reason = f"the commit did not reach a living destination: {out.settled_by}"
                self.ledger.decide(self.migration, "aborted", out.settled_by)
                self.progress(out.reason + "; the guest resumes on the source")
                return out
            if not told and time.monotonic() - started > self.settle_notice:
                told = True
                out.reason = (f"IN DOUBT: migration {self.migration} to {self.to}: committed, but the destination's "
                              f"VMM at {shorten(control or '(no control address)', 100)} cannot be reached; the "
                              "guest is paused here. If the destination runs it (`pvmit ctl DEST status`), run "
                              "`pvmit ctl SOURCE resolve discard`; if it does not, `pvmit ctl SOURCE resolve run`. "
                              "Asking again meanwhile.")
                self.progress(out.reason)
                self.on_doubt(out.reason)
            self.wake.wait(0.5 if answer == "prepared" else 1.0)
            self.wake.clear()


__all__ = ["DEFAULT_DEADLINE", "DEFAULT_STALL", "FAULTS", "FAULT_ENV", "Outcome", "Outgoing", "allow_fault",
           "describe", "runs"]
