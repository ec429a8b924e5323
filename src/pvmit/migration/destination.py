"""Receiving a guest from another pvmit VMM process.

The destination decides twice: on HELO, before the source pauses (VRDT), and on the final interface state, after
every section arrived with a good checksum (REDY or NACK). It forces the controls the guest now needs before the
first guest instruction runs here, and it starts the guest only once the commit is settled: on the source's CMIT
(answered with CACK), or, if the connection is lost after REDY, by asking the source's VMM which way it decided
(`settle`). A stream that ends before REDY, for whatever reason, leaves nothing running here.

Every field of the stream is checked before use (`fields`), any refusal names the field, and any unexpected error
while receiving becomes a refusal with a message (never a traceback): the source then keeps its guest.
"""

from __future__ import annotations

import gc
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from pvmit.catalog.facts import CpuFacts
from pvmit.errors import PvmitError
from pvmit.interface.forms import Form, InterfaceConfig
from pvmit.interface.policy import PartialSettings
from pvmit.interface.pooldesc import MAX_ENTRIES as POOL_ENTRIES
from pvmit.interface.state import Prepared, Verdict, finish, prepare
from pvmit.kvm.system import Kvm
from pvmit.migration import vmstate
from pvmit.migration.fields import checked, need, optional
from pvmit.migration.ledger import Ledger
from pvmit.migration.stream import PAGE, Header, Section, StreamError, decode_zero, encode_json
from pvmit.migration.transport import Channel, Pages, PeerClosed
from pvmit.net.text import shorten
from pvmit.vmm.machine import MAX_MEMORY  # a header asking for more is refused before allocating
from pvmit.vmm.personality import Personality
from pvmit.vmm.vmm import Host, Vmm

HELLO_SECONDS = 10.0  # from the accepted connection to HELO
DEFAULT_DEADLINE = 300.0  # from the accepted connection to REDY, whatever the peer does
COMMIT_WAIT = 30.0  # REDY sent: how long the commit may take before asking the source's VMM
MIGRATION_ID_CHARS = frozenset("0123456789abcdef")
DEST_FAULTS = ("die-after-pages", "die-after-state", "die-after-ready", "lose-commit", "drop-before-cack")
"""Failures a test can make the destination produce (`pvmit vmm --fault`, only with PVMIT_FAULT_INJECTION=1)."""


class Refused(Exception):
    """The destination will not take this guest; the message is the reason sent back."""


@dataclass
class Arrival:
    """A guest received and committed (vmm ready to run), or why not."""

    vmm: Vmm | None
    reason: str = ""
    verdict: dict[str, Any] = field(default_factory=dict)
    interface_seconds: float = 0.0  # pvmit's interface checks after the source paused (policy, state)
    apply_seconds: float = 0.0  # putting the forced controls into KVM (MSR filter, IA32_SPEC_CTRL) and logging
    committed_at: float | None = None
    source: str = ""
    migration: str = ""
    vm_id: str = ""
    pages: int = 0
    settled_by: str = ""  # how the commit was settled: "CMIT", or what the source's VMM or the operator said


@dataclass(frozen=True)
class Incoming:
    """What the header says: the VM to build and who sends it."""

    personality: Personality
    config: InterfaceConfig
    memory: int
    source: str
    cpuid: dict[str, int]
    migration: str
    vm_id: str
    source_control: str


def _parse(what: str, convert: Callable[[Any], Any], value: Any) -> Any:
    try:
        return convert(value)
    except (KeyError, TypeError, ValueError, OverflowError, AttributeError, PvmitError) as e:
        detail = f"missing field {e.args[0]!r}" if isinstance(e, KeyError) else str(e)
        raise StreamError(f"migration stream header: {what}: {shorten(detail)}") from None


def _config(doc: Any) -> InterfaceConfig:
    where = "migration stream header vm.config"
    form = need(doc, "form", str, where=where, max_len=16)
    if form not in {f.value for f in Form}:
        raise StreamError(f"{where}: form {shorten(form, 20)!r} is not one of {', '.join(f.value for f in Form)}")
    need(doc, "supported", int, where=where, lo=0, hi=(1 << 64) - 1)
    optional(doc, "neutral_base", int, 0, where=where, lo=0, hi=(1 << 32) - 1)
    optional(doc, "neutral_msr", int, 0, where=where, lo=0, hi=(1 << 32) - 1)
    optional(doc, "neutral_pool_msr", int, 0, where=where, lo=0, hi=(1 << 32) - 1)
    if doc.get("bhb_long") is not None:
        checked(doc["bhb_long"], "bhb_long", bool, where=where)
    if doc.get("pool") is not None:
        pool = checked(doc["pool"], "pool", list, where=where)
        if not 1 <= len(pool) <= POOL_ENTRIES:
            raise StreamError(f"{where}: pool has {len(pool)} entries, a description has 1 to {POOL_ENTRIES}")
        for i, entry in enumerate(pool):
            checked(entry, f"pool[{i}]", dict, where=where)
    return InterfaceConfig.from_json(doc)


def parse_header(info: dict[str, Any]) -> Incoming:
    """Check every field of the stream header; StreamError names the first one that is wrong, Refused says what
    this VMM cannot take."""
    need(info, "pvmit", str, max_len=64)
    mode = need(info, "mode", str, max_len=32)
    if mode not in ("pre-copy", "stop-and-copy", "check"):
        raise StreamError(f"migration stream header: mode {shorten(mode, 32)!r} is not pre-copy, stop-and-copy "
                          "or check")
    need(info, "page_size", int, lo=PAGE, hi=PAGE)
    migration = need(info, "migration", str, max_len=32)
    if len(migration) != 32 or not set(migration) <= MIGRATION_ID_CHARS:
        raise StreamError("migration stream header: migration must be 32 lowercase hex digits")
    vm_id = need(info, "vm_id", str, max_len=32)
    if not vm_id or not set(vm_id) <= MIGRATION_ID_CHARS:
        raise StreamError("migration stream header: vm_id must be lowercase hex digits")
    source_control = optional(info, "source_control", str, "", where="migration stream header", max_len=600)
    source = need(info, "source_host.name", str, max_len=256)
    _parse("source_host.facts", CpuFacts.from_json, need(info, "source_host.facts", dict))
    vm = need(info, "vm", dict)
    personality = _parse("vm.personality", Personality.from_json, need(info, "vm.personality", dict))
    config = _parse("vm.config", _config, need(info, "vm.config", dict))
    memory = need(info, "vm.memory_size", int, lo=0, hi=1 << 62)
    vcpus = need(info, "vm.vcpus", int, lo=0, hi=1 << 16)
    cpuid = optional(vm, "cpuid", dict, {}, where="migration stream header", name="vm.cpuid")
    if len(cpuid) > 256:
        raise StreamError("migration stream header: vm.cpuid has more than 256 registers")
    for k, v in cpuid.items():
        checked(k, "vm.cpuid key", str, where="migration stream header", max_len=32)
        checked(v, f"vm.cpuid[{shorten(k, 32)}]", int, where="migration stream header", lo=0, hi=(1 << 32) - 1)
    if vcpus != 1:
        raise Refused(f"this VMM runs one vCPU per guest; the stream describes {vcpus}")
    if not 0 < memory <= MAX_MEMORY or memory % (2 << 20):
        raise Refused(f"guest memory of {memory} bytes is not a multiple of 2 MiB up to {MAX_MEMORY >> 30} GiB")
    return Incoming(personality, config, memory, source, dict(cpuid), migration, vm_id, source_control)


def _same_vm(hello: Any, personality: Personality, config: InterfaceConfig) -> None:
    """HELO's interface state must describe the VM the header describes."""
    if not isinstance(hello, dict):
        raise StreamError("HELO section: not a JSON object")
    try:
        same = (InterfaceConfig.from_json(hello["config"]) == config
                and CpuFacts.from_json(hello["personality"]) == personality.facts)
    except (KeyError, TypeError, ValueError, OverflowError, AttributeError) as e:
        raise StreamError(f"HELO section: {shorten(str(e))}") from None
    if not same:
        raise StreamError("HELO section: its interface configuration or CPU personality differs from the header's")


def _cpuid_differences(source: dict[str, int], here: dict[str, int]) -> list[str]:
    return [f"CPUID {shorten(k, 32)}: {v:#x} on the source, {here[k]:#x} here" if k in here
            else f"CPUID {shorten(k, 32)}: missing here" for k, v in source.items() if here.get(k) != v]


Ask = Callable[[str, str], str]
"""ask(source_control, migration) -> what the source's VMM says of it: committed, aborted, deciding, unknown
(it knows nothing of it: the process that had the guest is gone), gone (nothing listens there), or unreachable."""


class Receiver:
    """One incoming guest on one connection. `run()` never raises; it returns the Arrival."""

    def __init__(self, chan: Channel, kvm: Kvm, host: Host, settings: PartialSettings | None, *,
                 ledger: Ledger, control: str, ask: Ask, progress: Callable[[str], None] = lambda m: None,
                 on_line: Callable[[str], None] | None = None, fault: str | None = None,
                 deadline: float = DEFAULT_DEADLINE, commit_wait: float = COMMIT_WAIT,
                 settle_notice: float = 60.0) -> None:
        self.chan, self.kvm, self.host, self.settings = chan, kvm, host, settings
        self.ledger, self.control, self.ask = ledger, control, ask
        self.progress, self.on_line, self.fault = progress, on_line, fault
        self.deadline, self.commit_wait, self.settle_notice = deadline, commit_wait, settle_notice
        self.vmm: Vmm | None = None
        self.arrival = Arrival(None)
        self.held: list[str] | None = []  # the VMM's messages while the source is paused, printed after the commit
        self.pages = 0  # pages received so far (status shows them)

    # --- helpers -----------------------------------------------------------------------------------------------
    def _line(self, text: str) -> None:
        if self.held is not None:
            self.held.append(text)
        elif self.on_line is not None:
            self.on_line(text)

    def _drop(self, reason: str) -> Arrival:
        if self.vmm is not None:
            self.vmm.close()
            self.vmm = None
        self.arrival.vmm, self.arrival.reason = None, reason
        self.progress(reason)
        return self.arrival

    def _nack(self, reason: str) -> Arrival:
        try:
            self.chan.send(encode_json(b"NACK", {"reason": reason}))
        except (OSError, ConnectionError):
            pass
        return self._drop(f"refused: {reason}")

    # --- the exchange ------------------------------------------------------------------------------------------
    def run(self) -> Arrival:
        start = time.monotonic()
        self.chan.deadline = start + min(HELLO_SECONDS, self.deadline)
        try:
            header = self.chan.receive()
            if not isinstance(header, Header):
                return self._nack("expected a stream header")
            inc = parse_header(header.info)
            a = self.arrival
            a.source, a.migration, a.vm_id = inc.source, inc.migration, inc.vm_id
            self.progress(f"incoming guest {shorten(inc.personality.name, 64)} (vm {inc.vm_id}) from "
                          f"{shorten(inc.source, 64)} ({header.info['mode']}, {inc.memory >> 20} MiB, migration "
                          f"{inc.migration[:8]})")
            hello_section = self.chan.expect(b"HELO")
            assert isinstance(hello_section, Section)
            hello = hello_section.json()
            _same_vm(hello, inc.personality, inc.config)
            self.chan.deadline = start + self.deadline
            return self._decide_and_take(inc, hello)
        except Refused as e:
            return self._nack(str(e))
        except PeerClosed:
            return self._drop("the source went away before committing: not starting a half-received guest")
        except (PvmitError, ConnectionError, OSError) as e:
            return self._nack(f"{shorten(str(e), 400)}; nothing runs here")
        except Exception as e:  # noqa: BLE001 - whatever a peer sends, the answer is a refusal, never a traceback
            return self._nack(f"internal error while receiving ({type(e).__name__}: {shorten(str(e), 300)}); "
                              "nothing runs here")
        finally:
            gc.enable()
            if self.on_line is not None and self.held:
                for text in self.held:  # what the VMM said while the source was paused, or of a guest never started
                    self.on_line(text if self.arrival.vmm is not None else f"{text} (incoming guest not started)")
            self.held = None

    def _decide_and_take(self, inc: Incoming, hello: dict[str, Any]) -> Arrival:
        host, settings = self.host, self.settings
        # Every decision this VM can need here, before the pause: `prepared` stays for a final state that differs
        # from HELO; a second one is finished now into the guest's interface for the HELO state (`finish` fills in
        # the one it is given). After the pause, when the final state is the same, nothing is left to decide.
        prepared = prepare(hello, host.facts, settings)
        if settings is not None and prepared.vm_fields[2] != prepared.settings.to_json():
            self.progress(f"operator settings given here ({settings.label()}) over the VM's own "
                          f"{prepared.vm_fields[2]}: now {prepared.settings.to_json()}")
        verdict, core = finish(prepare(hello, host.facts, settings), hello)
        verdict_doc: dict[str, Any] = verdict.to_json()
        candidate: tuple[Verdict, Any] | None = None
        if core is not None:
            self.vmm = Vmm(self.kvm, inc.personality, host, inc.config, prepared.settings, memory_size=inc.memory,
                           on_line=self._line)
            differ = _cpuid_differences(inc.cpuid, self.vmm.guest_cpuid())
            if differ:
                verdict_doc = {**verdict_doc, "accepted": False,
                               "reasons": ["the guest would see a different CPU here: " + "; ".join(differ[:8])]}
            else:
                candidate = (verdict, core)
                self.vmm.install_core(core)  # MSR filter and controls in place ahead; the guest is not here yet
        self.arrival.verdict = verdict_doc
        self.chan.send(encode_json(b"VRDT", {**verdict_doc, "host": host.name}))
        if not verdict_doc["accepted"]:
            return self._drop("refused before the source paused: " +
                              "; ".join(str(r) for r in verdict_doc["reasons"]))
        would = [f.control.name or "" for d in verdict.decisions for f in d.forced]
        self.progress(f"accepted before the pause; would force: {', '.join(would) or 'nothing'}")
        return self._take(inc, hello, prepared, candidate)

    def _take(self, inc: Incoming, hello: dict[str, Any], prepared: Prepared,
              candidate: tuple[Verdict, Any] | None) -> Arrival:
        """Memory, then the paused guest's state; verify, decide, restore, answer REDY; then settle the commit."""
        vmm = self.vmm
        assert vmm is not None
        mem = vmm.machine.memory
        total = mem.size // PAGE
        state: Any = None
        cpus: Any = None
        devs: Any = None
        done: Any = None
        while True:
            section = self.chan.expect(b"MEMP", b"ZERO", b"ISTA", b"CPUS", b"DEVS", b"DONE", into=mem.view)
            if isinstance(section, Pages):
                self.pages += section.count
                if self.fault == "die-after-pages":  # a test's way to kill the destination mid-stream
                    os._exit(9)
            elif section.kind == b"ZERO":
                first, count = decode_zero(section)
                if first + count > total:
                    return self._nack(f"ZERO section at byte {section.offset} reaches beyond guest memory")
                mem.zero(first * PAGE, count * PAGE)
                self.pages += count
            elif section.kind == b"ISTA":
                gc.disable()  # the source has paused: no collector pause until the guest runs here
                if self.fault == "die-after-state":  # a test's way to kill the destination while the source is paused
                    os._exit(9)
                state = section.json()
            elif section.kind == b"CPUS":
                cpus = section.json()
            elif section.kind == b"DEVS":
                devs = section.json()
            else:
                done = section.json()
                break
        if state is None or cpus is None:
            return self._nack("stream ended without the interface state or the vCPU state")
        sent = need(done, "pages", int, where="DONE section", lo=0, hi=1 << 40)
        if sent != self.pages:
            return self._nack(f"DONE says {sent} pages were sent, {self.pages} arrived")
        t0 = time.perf_counter()
        installed = candidate is not None and state == hello
        if installed:
            assert candidate is not None
            final, core = candidate  # decided before the pause, and nothing changed since
        else:
            final, core = finish(prepared, state)
        self.arrival.interface_seconds = time.perf_counter() - t0
        self.arrival.verdict = final.to_json()
        if core is None:
            return self._nack("after the pause: " + "; ".join(final.reasons))
        not_restored = vmstate.restore(vmm.vcpu, cpus)
        if not_restored:
            return self._nack("this KVM would not take part of the vCPU state: " + ", ".join(not_restored))
        t0 = time.perf_counter()
        if installed:
            vmm.sync_core_spec_ctrl()  # filter already in place: only the value in effect, after the restore
        else:
            vmm.install_core(core)  # the controls the guest needs here are in force before it runs again
        self.arrival.apply_seconds = time.perf_counter() - t0
        if devs is not None:
            partial = need(devs, "serial_partial", str, where="DEVS section")
            vmm.serial.partial = partial
        forced = [str(f.control.name) for d in final.decisions for f in d.forced]
        self.arrival.pages = self.pages
        self.ledger.prepared(inc.migration)
        self.chan.send(encode_json(b"REDY", {"host": self.host.name, "forced": forced,
                                             "changes": [c.to_json() for c in final.changes],
                                             "warnings": list(final.warnings), "migration": inc.migration,
                                             "control": self.control,
                                             "interface_check_ms": round(self.arrival.interface_seconds * 1e3, 3),
                                             "apply_ms": round(self.arrival.apply_seconds * 1e3, 3)}))
        if self.fault == "die-after-ready":
            os._exit(9)
        if self._commit_from_stream(inc) or self._settle(inc):
            self.arrival.vmm = vmm
            self.arrival.committed_at = time.monotonic()
            self.progress(f"committed ({self.arrival.settled_by}); forcing {', '.join(forced) or 'nothing'} "
                          "before the guest runs here")
            return self.arrival
        return self._drop(f"the source kept the guest ({self.arrival.settled_by}); nothing runs here")

    def _commit_from_stream(self, inc: Incoming) -> bool:
        """Wait for CMIT; on it, commit and acknowledge. False when the connection ends without one (then the
        commit is settled with the source's VMM)."""
        if self.fault == "lose-commit":
            self.chan.close()  # as if the connection dropped with CMIT in flight
            return False
        self.chan.deadline = time.monotonic() + self.commit_wait
        try:
            cmit = self.chan.expect(b"CMIT")
            need(cmit.json() if isinstance(cmit, Section) else None, "migration", str, where="CMIT section")
            if cmit.json()["migration"] != inc.migration:  # type: ignore[union-attr]
                raise StreamError(f"CMIT section: it commits another migration, not {inc.migration}")
        except (ConnectionError, OSError, StreamError) as e:
            self.progress(f"the connection ended after REDY without the commit ({shorten(str(e))}): asking the "
                          "source's VMM how it decided")
            return False
        if not self.ledger.commit(inc.migration, "CMIT"):
            self.arrival.settled_by = f"CMIT arrived after {self.ledger.phase(inc.migration)}"
            return False
        self.arrival.settled_by = "CMIT"
        if self.fault != "drop-before-cack":
            try:
                self.chan.send(encode_json(b"CACK", {"migration": inc.migration}))
            except (OSError, ConnectionError):
                pass  # the source will ask this VMM, and hear "committed"
        return True

    def _settle(self, inc: Incoming) -> bool:
        """In doubt after REDY: ask the source's VMM which way it decided, until it or the operator says.

        Only the source decides. committed: run here. aborted: drop. Its VMM knows nothing of the migration, or
        nothing listens at its control socket any more: the process that had the guest is gone, so this copy is the
        only one and runs here. Unreachable: keep asking (the guest is held, not run), and tell the operator."""
        migration = inc.migration
        told = False
        started = time.monotonic()
        while True:
            phase = self.ledger.phase(migration)  # the source's VMM, or the operator, may have told us meanwhile
            if phase in ("committed", "aborted"):
                self.arrival.settled_by = self.ledger.how(migration)
                return phase == "committed"
            answer = self.ask(inc.source_control, migration) if inc.source_control else "unreachable"
            if answer in ("committed", "unknown", "gone"):
                why = {"committed": "the source's VMM says it committed",
                       "unknown": "the source's VMM knows nothing of it: the process that had the guest is gone",
                       "gone": "nothing listens at the source's control socket: its VMM is gone"}[answer]
                if self.ledger.commit(migration, why):
                    self.arrival.settled_by = why
                    return True
            elif answer == "aborted":
                self.ledger.abort(migration, "the source's VMM says it kept the guest")
            if not told and time.monotonic() - started > self.settle_notice:
                told = True
                self.progress(
                    f"IN DOUBT: migration {migration} from {shorten(inc.source, 64)}: the source's VMM at "
                    f"{shorten(inc.source_control or '(unknown address)', 100)} cannot be reached; the guest is held "
                    f"here, not running. If the source no longer runs it (`pvmit ctl SOURCE status`), run "
                    f"`pvmit ctl {self.control} resolve run`; if it does, `pvmit ctl {self.control} resolve "
                    "discard`. Asking again meanwhile.")
            time.sleep(0.5 if answer != "unreachable" else 1.0)


__all__ = ["Arrival", "DEST_FAULTS", "Receiver", "Refused", "parse_header"]
