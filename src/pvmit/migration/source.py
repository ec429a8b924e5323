"""Sending a running guest to another pvmit VMM process.

1. HELO: the VM's description and its interface state; the destination answers VRDT after running the policy
   against its own host. A refusal ends here: the guest never paused.
2. Pre-copy (when KVM's dirty-page log works): all non-zero pages, then the pages dirtied meanwhile, round after
   round, the guest running between slices. Otherwise stop-and-copy.
3. Pause; the last dirty pages, ISTA (the final interface state), CPUS, DEVS, DONE.
4. The destination checks everything and answers REDY (or NACK). On REDY the source sends CMIT and stops its copy
   for good; on NACK, an error, or a lost connection before REDY, the guest resumes on the source, intact.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from pvmit import __version__
from pvmit.errors import PvmitError
from pvmit.interface.state import snapshot
from pvmit.kvm.errors import KvmError
from pvmit.kvm.vm import PAGE
from pvmit.migration import vmstate
from pvmit.migration.stream import Section, StreamError, encode_header, encode_json, encode_pages
from pvmit.migration.transport import Address, Channel
from pvmit.vmm.vmm import Vmm

SLICE_BYTES = 4 << 20  # pages sent between two slices of guest time during pre-copy
SLICE_RUN_SECONDS = 0.005
MAX_ROUNDS = 6
CONVERGED_PAGES = 64
FAULTS = ("flip-memory", "flip-state", "truncate", "wrong-version", "die-after-pause", "unknown-section",
          "stop-and-copy", "report-meanwhile")
"""Failures a test can make the source produce on purpose (`--fault`); never used otherwise."""
FAULT_ENV = "PVMIT_FAULT_INJECTION"


def allow_fault(fault: str | None) -> None:
    """Refuse a fault-injection request unless the VMM runs with PVMIT_FAULT_INJECTION=1 (as the tests do), so
    that no control-socket client can make a production VMM corrupt a stream or exit."""
    if fault is not None and os.environ.get(FAULT_ENV) != "1":
        raise PvmitError(f"fault injection ({fault}) is for tests only: the VMM was not started with {FAULT_ENV}=1")


def _object(section: Section) -> dict[str, Any]:
    doc = section.json()
    if not isinstance(doc, dict):
        raise StreamError(f"{section.kind.decode()} section at byte {section.offset}: not a JSON object")
    return doc


@dataclass
class Outcome:
    """What happened to one migration attempt, from the source's side."""

    migrated: bool
    accepted: bool
    mode: str
    reason: str = ""
    verdict: dict[str, Any] = field(default_factory=dict)
    ready: dict[str, Any] = field(default_factory=dict)
    rounds: int = 0
    pages_sent: int = 0
    bytes_sent: int = 0
    total_seconds: float = 0.0
    paused_at: float | None = None  # time.monotonic() when the guest stopped running here
    committed_at: float | None = None

    def to_json(self) -> dict[str, Any]:
        return {"migrated": self.migrated, "accepted": self.accepted, "mode": self.mode, "reason": self.reason,
                "verdict": self.verdict, "ready": self.ready, "rounds": self.rounds, "pages_sent": self.pages_sent,
                "bytes_sent": self.bytes_sent, "total_seconds": round(self.total_seconds, 4),
                "paused_at": self.paused_at, "committed_at": self.committed_at,
                "guest": "running on the destination" if self.migrated else "still running on the source"}


def describe(vmm: Vmm, mode: str) -> dict[str, Any]:
    """The stream header: who sends, and the VM as the destination must rebuild it."""
    return {
        "pvmit": __version__,
        "mode": mode,
        "page_size": PAGE,
        "source_host": {"name": vmm.host.name, "facts": vmm.host.facts.to_json(), "stand_in": vmm.host.stand_in},
        "vm": {"personality": vmm.personality.to_json(), "config": vmm.config.to_json(),
               "memory_size": vmm.machine.memory.size, "vcpus": 1, "cpuid": vmm.guest_cpuid()},
    }


def _nonzero_pages(view: memoryview, pages: list[int] | range) -> list[int]:
    zero = bytes(PAGE)
    return [p for p in pages if view[p * PAGE:(p + 1) * PAGE] != zero]


def _runs(pages: list[int]) -> list[tuple[int, int]]:
    """Contiguous runs of page numbers as (first, count)."""
    out: list[tuple[int, int]] = []
    for p in pages:
        if out and out[-1][0] + out[-1][1] == p and out[-1][1] < SLICE_BYTES // PAGE:
            out[-1] = (out[-1][0], out[-1][1] + 1)
        else:
            out.append((p, 1))
    return out


def _run_for(vmm: Vmm, seconds: float) -> None:
    """Let the guest run for about `seconds` between two slices of pre-copy."""
    until = time.monotonic() + seconds
    vmm.run(poll=lambda: time.monotonic() > until, timeout=1)


def migrate_out(vmm: Vmm, to: str, *, check_only: bool = False, progress: Callable[[str], None] = lambda m: None,
                fault: str | None = None, timeout: float = 30.0) -> Outcome:
    """Move `vmm`'s guest to the VMM listening at `to`. Returns the outcome; the guest runs on exactly one side."""
    if fault is not None and fault not in FAULTS:
        raise PvmitError(f"unknown fault {fault!r}; known: {', '.join(FAULTS)}")
    allow_fault(fault)
    start = time.monotonic()
    vm, mem = vmm.machine.vm, vmm.machine.memory
    mode = "check" if check_only else "pre-copy"
    if fault == "stop-and-copy":
        mode = "stop-and-copy"
        progress("dirty-page logging not used (fault injection); using stop-and-copy")
    elif not check_only:
        try:
            vm.set_dirty_logging(0, True)
            vm.dirty_pages(0)  # start from a clean log
        except (KvmError, ValueError) as e:
            mode = "stop-and-copy"
            progress(f"dirty-page logging unavailable ({e}); using stop-and-copy")
    out = Outcome(False, False, mode)
    try:
        chan = Channel(Address.parse(to).connect(timeout), expect_header=False, timeout=timeout)
    except ConnectionError as e:
        out.reason = f"migration failed: {e}"
        progress(out.reason)
        if mode == "pre-copy":
            vm.set_dirty_logging(0, False)
        return out
    paused = False
    try:
        vmm.sync_spec_ctrl()
        chan.send(encode_header(describe(vmm, mode), version=99 if fault == "wrong-version" else 1))
        chan.send(encode_json(b"HELO", snapshot(vmm.core)))
        answer = chan.expect(b"VRDT", b"NACK")
        verdict = _object(answer)
        out.verdict = verdict
        if answer.kind == b"NACK" or verdict.get("accepted") is not True:
            reasons = verdict.get("reasons")
            if isinstance(reasons, list) and reasons:
                out.reason = "destination refused: " + "; ".join(str(r) for r in reasons)
            else:
                out.reason = f"destination refused: {verdict.get('reason', verdict)}"
            progress(out.reason)
            return out
        out.accepted = True
        progress(f"destination {verdict.get('host', '?')} accepts the guest before the source pauses")
        if check_only:
            out.reason = "check only: nothing moved"
            return out

        pages = range(mem.size // PAGE)
        todo: list[int] = []
        if mode == "pre-copy":
            todo = _nonzero_pages(mem.view, pages)
            while True:
                out.rounds += 1
                progress(f"pre-copy round {out.rounds}: {len(todo)} pages while the guest runs")
                for first, count in _runs(todo):
                    chan.send(encode_pages(first, mem.view[first * PAGE:(first + count) * PAGE]))
                    out.pages_sent += count
                    _run_for(vmm, SLICE_RUN_SECONDS)
                todo = vm.dirty_pages(0)
                if len(todo) <= CONVERGED_PAGES or out.rounds >= MAX_ROUNDS:
                    break
        # --- the guest stops running here ---
        out.paused_at = time.monotonic()
        paused = True
        progress("guest paused on the source")
        if fault == "die-after-pause":
            import os
            os._exit(9)
        # the pages dirtied in the last round are still to send, with those dirtied since
        final = sorted(set(todo) | set(vm.dirty_pages(0))) if mode == "pre-copy" else _nonzero_pages(mem.view, pages)
        for first, count in _runs(final):
            frame = bytearray(encode_pages(first, mem.view[first * PAGE:(first + count) * PAGE]))
            if fault == "flip-memory":
                frame[40] ^= 0x01
                fault = None
            chan.send(bytes(frame))
            out.pages_sent += count
        vmm.sync_spec_ctrl()
        final_state = snapshot(vmm.core)
        if fault == "report-meanwhile":  # as if the guest had opted out of every mitigation during the copy
            final_state["vcpus"][0].update(ctrl=0, reported=True)
        state = bytearray(encode_json(b"ISTA", final_state))
        if fault == "flip-state":
            state[20] ^= 0x04
        if fault == "truncate":
            chan.send(bytes(state[: len(state) // 2]))
            chan.sock.shutdown(2)
            raise ConnectionError("stream cut short on purpose (fault injection)")
        chan.send(bytes(state))
        if fault == "unknown-section":
            import struct
            import zlib
            head = struct.pack("<4sQ", b"XTRA", 2)
            chan.send(head + b"{}" + struct.pack("<I", zlib.crc32(b"{}", zlib.crc32(head))))
        chan.send(encode_json(b"CPUS", vmstate.capture(vmm.vcpu)))
        chan.send(encode_json(b"DEVS", {"serial_partial": vmm.serial.partial}))
        chan.send(encode_json(b"DONE", {"pages": out.pages_sent}))
        reply = chan.expect(b"REDY", b"NACK")
        answer_doc = _object(reply)
        if reply.kind == b"NACK":
            out.reason = f"destination refused after the pause: {answer_doc.get('reason')}"
            progress(out.reason)
            return out
        out.ready = answer_doc
        chan.send(encode_json(b"CMIT", {}))
        out.committed_at = time.monotonic()
        out.migrated = True
        progress("committed: the guest now runs on the destination")
        return out
    except (StreamError, ConnectionError, OSError) as e:
        out.reason = f"migration failed: {e}"
        progress(out.reason + ("; the guest resumes on the source" if paused else ""))
        return out
    finally:
        out.bytes_sent = chan.sent
        out.total_seconds = time.monotonic() - start
        chan.close()
        if not out.migrated and mode == "pre-copy":
            try:
                vm.set_dirty_logging(0, False)
            except KvmError:
                pass
