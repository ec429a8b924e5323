"""`pvmit vmm`: a long-running VMM process with a control socket and, optionally, an incoming address.

It runs at most one guest at a time (booted here, or received from another pvmit VMM) and answers JSON-line
commands on its control socket: `status`, `migrate`, `outcome`, `resolve`, `quit`.

Threads, and what each may touch:
- the main thread owns the VM: it runs the vCPU, carries out commands, and pauses the guest when a migration asks;
- each connection, control or incoming, has a thread of its own (`listener`): it authenticates the peer, reads,
  writes, and never blocks the main thread; commands reach the main thread through a queue, with a kick
  (kvm_run.immediate_exit and a signal) that brings the vCPU out of KVM_RUN;
- an outgoing migration runs on a thread of its own (`migration.source.Outgoing`), reading guest memory and the
  dirty log while the guest keeps running; only after the main thread has paused the guest does it touch the vCPU;
- an incoming migration runs on its connection's thread (`migration.destination.Receiver`) and hands the guest
  to the main thread once the commit is settled.
"""

from __future__ import annotations

import os
import queue
import secrets
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from pvmit.derive import Mitigation, mitigations_to_bits
from pvmit.errors import InputError, PvmitError
from pvmit.guest import program
from pvmit.interface.forms import InterfaceConfig
from pvmit.interface.policy import OperatorSettings, PartialSettings
from pvmit.interface.state import snapshot
from pvmit.kvm.errors import KvmError
from pvmit.kvm.system import Kvm
from pvmit.migration.destination import DEFAULT_DEADLINE, Arrival, Receiver
from pvmit.migration.fields import checked
from pvmit.migration.ledger import Ledger
from pvmit.migration.source import DEFAULT_STALL, Outcome, Outgoing, allow_fault, describe
from pvmit.migration.stream import StreamError, encode_json
from pvmit.migration.transport import Channel
from pvmit.net.address import Address, PeerGone
from pvmit.net.peer import Peer
from pvmit.net.text import printable, shorten
from pvmit.net.tls import Credentials
from pvmit.node.control import ControlHandler, Request
from pvmit.node.control import request as control_request
from pvmit.node.listener import Listener
from pvmit.vmm.personality import Personality
from pvmit.vmm.vmm import GuestStopped, Host, Vmm

DEFAULT_HEARTBEAT = 2000
MAX_HEARTBEAT = 1 << 32
FILL_FROM = 2 << 20  # above the page tables, GDT and program
FILLS = ("none", "pattern", "random")
COMMANDS = ("status", "migrate", "outcome", "resolve", "quit")


def fill(view: memoryview, start: int, stop: int | None = None, how: str = "pattern") -> None:
    """Fill every page from `start` on: `pattern` (each page differs, nothing compresses away) or `random`."""
    stop = len(view) if stop is None else stop
    if how == "random":
        rng = np.random.default_rng()
        for off in range(start, stop, 16 << 20):
            end = min(stop, off + (16 << 20))
            view[off:end] = rng.bytes(end - off)
        return
    block = bytes(range(256)) * 16
    for off in range(start, stop, 4096):
        view[off:off + 4096] = block
        view[off:off + 8] = off.to_bytes(8, "little")


@dataclass
class Boot:
    personality: Personality
    config: InterfaceConfig
    settings: OperatorSettings
    uses: frozenset[Mitigation] | None  # None: an unenlightened guest that never reports
    memory_size: int
    heartbeat: int = DEFAULT_HEARTBEAT
    fill_memory: str = "none"  # write data into every free page, as a guest that uses its memory would


@dataclass
class Limits:
    """Bounds on migrations, in seconds: overall deadline, and how long a peer may send or take nothing."""

    deadline: float = DEFAULT_DEADLINE
    stall: float = DEFAULT_STALL
    settle_notice: float = 60.0
    commit_wait: float = 30.0


@dataclass
class Migrating:
    """An outgoing migration in flight, as the main thread sees it."""

    worker: Outgoing
    request: Request
    to: str
    started: float = field(default_factory=time.monotonic)


def advertised(control: Address, reach: str) -> str:
    """The control address a peer should use to reach this VMM: a wildcard TCP listener is reached at the host the
    peer already reaches it by."""
    if control.is_tcp and control.host in ("0.0.0.0", "::", ""):
        host = reach.strip("[]")
        return str(Address.parse(f"tcp:[{host}]:{control.target[1]}" if ":" in host
                                 else f"tcp:{host}:{control.target[1]}"))
    return str(control)


class VmmProcess:
    """The state of one `pvmit vmm` process: waiting, receiving, running, migrating, paused, in-doubt, halted or
    migrated."""

    def __init__(self, kvm: Kvm, host: Host, control: Address, say: Callable[[str], None], *,
                 creds: Credentials | None = None, incoming: Address | None = None,
                 settings: PartialSettings | None = None, fault: str | None = None,
                 limits: Limits | None = None) -> None:
        self.kvm, self.host, self.creds = kvm, host, creds
        self._say_raw, self._say_lock = say, threading.Lock()
        self.settings, self.fault, self.limits = settings, fault, limits or Limits()
        self.ledger = Ledger()
        self._lock = threading.Lock()  # the incoming slot
        self.vmm: Vmm | None = None
        self.vm_id = ""
        self.state = "waiting" if incoming else "starting"
        self.last_heartbeat = ""
        self.quit = False
        self.migrating: Migrating | None = None
        self.receiver: Receiver | None = None
        self.doubt = ""  # why the guest is held here, paused, while a commit is settled
        self.events: queue.Queue[Request | Callable[[], None]] = queue.Queue()
        self._main = threading.main_thread()
        self._kickable = threading.current_thread() is self._main
        if self._kickable:
            signal.signal(signal.SIGUSR1, lambda signum, frame: None)  # only to interrupt KVM_RUN
        self.control_address = control
        self.incoming_address = incoming
        self.control = Listener(control, creds, ControlHandler(self._post, self.say), self.say, name="control")
        self.incoming: Listener | None = None
        try:
            if incoming is not None:
                self.incoming = Listener(incoming, creds, self._receive, self.say, name="incoming", limit=4,
                                         auth_seconds=10.0)
        except BaseException:
            self.control.close()
            raise
        self.say(f"vmm: control socket {control} ({self.control.protection}), pid {os.getpid()}")
        if self.incoming is not None:
            self.say(f"vmm: incoming migrations at {incoming} ({self.incoming.protection})")

    # --- output ------------------------------------------------------------------------------------------------
    def say(self, line: str) -> None:
        """One line of the VMM's log, from any thread; text from outside is escaped (terminal controls, bidi)."""
        with self._say_lock:
            self._say_raw(printable(line))

    def _guest_line(self, line: str) -> None:
        if line.startswith("guest: count"):
            self.last_heartbeat = line
        self.say(line)

    # --- the main loop -----------------------------------------------------------------------------------------
    def boot(self, b: Boot) -> None:
        self.vmm = Vmm(self.kvm, b.personality, self.host, b.config, b.settings, memory_size=b.memory_size,
                       on_line=self._guest_line, log_dirty=False)
        guest = program("counter_guest")
        if b.fill_memory != "none":
            fill(self.vmm.machine.memory.view, FILL_FROM, how=b.fill_memory)
        request = mitigations_to_bits(b.uses or frozenset()) & b.config.supported
        self.vmm.load(guest.code, guest.load_address,
                      (b.heartbeat, request, 0 if b.uses is None else b.config.ctrl_msr))
        self.vm_id = secrets.token_hex(8)
        self.state = "running"
        self.say(f"vmm: booted {b.personality.name} on {self.host.name}, form {b.config.form.value}, "
                 f"MITIGATION_ENUM {b.config.supported:#x}, {b.memory_size >> 20} MiB; vm {self.vm_id} running at "
                 f"monotonic {time.monotonic():.6f}")

    def serve(self) -> None:
        try:
            while not self.quit:
                if self.state in ("running", "migrating") and self.vmm is not None:
                    try:
                        stop = self.vmm.run(poll=self._pending, timeout=3600, max_exits=1 << 62)
                    except GuestStopped as e:
                        self.say(f"vmm: {e}")
                        self.state = "halted" if self.state == "running" else self.state
                        stop = "stopped"
                    if stop == "hlt":
                        self.say("vmm: guest halted")
                        if self.state == "running":
                            self.state = "halted"
                        else:
                            self._drain(block=0.2)  # migrating a halted guest: wait for the worker
                    self._drain()
                else:
                    self._drain(block=1.0)
        finally:
            self.close()

    def close(self) -> None:
        self.control.close()
        if self.incoming is not None:
            self.incoming.close()
        if self.vmm is not None:
            self.vmm.close()
            self.vmm = None

    def _post(self, item: Request | Callable[[], None]) -> None:
        """Give the main thread something to do, and make it look now."""
        self.events.put(item)
        vmm = self.vmm
        if vmm is not None and self._kickable and self.state in ("running", "migrating"):
            vmm.vcpu.request_exit(True)  # covers a signal that arrives just before KVM_RUN starts
            signal.pthread_kill(self._main.ident or 0, signal.SIGUSR1)

    def _pending(self) -> bool:
        return not self.events.empty()

    def _drain(self, block: float = 0.0) -> None:
        try:
            item = self.events.get(timeout=block) if block else self.events.get_nowait()
        except queue.Empty:
            return
        while True:
            if isinstance(item, Request):
                self._serve(item)
            else:
                try:
                    item()
                except Exception as e:  # noqa: BLE001 - logged; the VMM and its guest go on
                    self.say(f"vmm: internal error: {type(e).__name__}: {shorten(str(e))}")
            try:
                item = self.events.get_nowait()
            except queue.Empty:
                return

    # --- commands ----------------------------------------------------------------------------------------------
    def _serve(self, req: Request) -> None:
        try:
            self._command(req)
        except (PvmitError, StreamError) as e:
            req.reply({"ok": False, "error": str(e)})
        except Exception as e:  # noqa: BLE001 - a failed command must not end the VMM or its guest
            self.say(f"vmm: command {shorten(req.cmd, 40)!r} from {req.who} failed: {type(e).__name__}: "
                     f"{shorten(str(e))}")
            req.reply({"ok": False, "error": f"{type(e).__name__}: {shorten(str(e), 300)}"})

    def status(self) -> dict[str, Any]:
        doc: dict[str, Any] = {"ok": True, "state": self.state, "host": self.host.name, "vm": self.vm_id,
                               "heartbeat": self.last_heartbeat,
                               "spec_ctrl": self.vmm.spec_ctrl_state() if self.vmm and self.state != "receiving"
                               else None, "pid": os.getpid(), "control": str(self.control_address),
                               "incoming": str(self.incoming_address) if self.incoming_address else None}
        if self.migrating is not None:
            w = self.migrating.worker.out
            doc["migration"] = {"id": w.migration, "to": self.migrating.to, "rounds": w.rounds,
                                "pages_sent": w.pages_sent, "in_doubt": w.in_doubt}
        if self.receiver is not None:
            doc["receiving"] = {"id": self.receiver.arrival.migration, "from": self.receiver.arrival.source,
                                "pages": self.receiver.pages}
        if self.doubt:
            doc["in_doubt"] = self.doubt
        if self.ledger.in_doubt():
            doc["holding"] = self.ledger.in_doubt()
        return doc

    def _command(self, req: Request) -> None:
        cmd, doc = req.cmd, req.doc
        if cmd == "status":
            req.reply(self.status())
        elif cmd == "quit":
            busy = self.state in ("migrating", "paused", "in-doubt") or self.receiver is not None
            if busy and doc.get("force") is not True:
                req.reply({"ok": False, "error": f"not quitting while a migration is in flight (state "
                                                 f"{self.state}); wait for it, or send quit with force"})
                return
            self.say(f"vmm: quit requested by {req.who}")
            self.quit = True
            req.reply({"ok": True})
        elif cmd == "migrate":
            self._migrate(req)
        elif cmd == "outcome":
            migration = checked(doc.get("migration"), "migration", str, where="outcome", max_len=32)
            told = doc.get("told")
            if told not in (None, "committed", "aborted", "deciding"):
                raise InputError("outcome: told must be committed, aborted or deciding")
            answer = self.ledger.answer(migration, told)
            if self.migrating is not None and self.migrating.worker.migration == migration:
                self.migrating.worker.wake.set()
            req.reply({"ok": True, "migration": migration, **answer})
        elif cmd == "resolve":
            self._resolve(req, doc.get("action"))
        else:
            req.reply({"ok": False, "error": f"unknown command {shorten(cmd, 40)!r}; commands: "
                                             f"{', '.join(COMMANDS)}"})

    def _resolve(self, req: Request, action: Any) -> None:
        """The operator settles a migration in doubt: `run` the guest here, or `discard` this copy."""
        if action not in ("run", "discard"):
            raise InputError("resolve: action must be run or discard")
        if self.migrating is not None and self.migrating.worker.out.in_doubt:
            self.say(f"vmm: the operator ({req.who}) resolves migration {self.migrating.worker.migration}: {action}")
            self.migrating.worker.operator = action
            self.migrating.worker.wake.set()
            req.reply({"ok": True, "resolved": self.migrating.worker.migration, "action": action})
            return
        held = self.ledger.in_doubt()
        if held:
            how = f"the operator ({req.who}) said {action}"
            ok = (self.ledger.commit if action == "run" else self.ledger.abort)(held[-1], how)
            self.say(f"vmm: {how} for migration {held[-1]}")
            req.reply({"ok": ok, "resolved": held[-1], "action": action} if ok else
                      {"ok": False, "error": f"migration {held[-1]} was settled meanwhile"})
            return
        raise InputError("nothing is in doubt here")

    # --- outgoing migration ------------------------------------------------------------------------------------
    def _migrate(self, req: Request) -> None:
        doc = req.doc
        if self.state != "running" or self.vmm is None:
            req.reply({"ok": False, "error": f"no running guest to migrate (state {self.state})"})
            return
        to = Address.parse(checked(doc.get("to"), "to", str, where="migrate", max_len=600))
        check = doc.get("check", False)
        fault = doc.get("fault")
        if not isinstance(check, bool) or not (fault is None or isinstance(fault, str)):
            raise InputError("migrate: check must be true or false, fault a string")
        if to.is_tcp and self.creds is None:
            raise InputError(f"{to}: this VMM was started without --tls-creds, and pvmit speaks TCP only over mutual "
                             "TLS")
        allow_fault(fault)
        vmm = self.vmm
        migration = secrets.token_hex(16)
        mode = "check" if check else "pre-copy"
        if fault == "stop-and-copy":
            mode = "stop-and-copy"
            req.reply({"event": "dirty-page logging not used (fault injection); using stop-and-copy"})
        elif not check:
            try:
                vmm.machine.vm.set_dirty_logging(0, True)
                vmm.machine.vm.dirty_pages(0)  # start from a clean log
            except (KvmError, ValueError) as e:
                mode = "stop-and-copy"
                req.reply({"event": f"dirty-page logging unavailable ({e}); using stop-and-copy"})
        vmm.sync_spec_ctrl()
        header = describe(vmm, mode, migration, self.vm_id, str(self.control_address))
        hello = snapshot(vmm.core)
        self.ledger.start(migration)

        def progress(message: str) -> None:
            self.say(f"vmm: migration: {message}")
            req.reply({"event": message, "monotonic": time.monotonic()})

        worker = Outgoing(vmm, to, self.creds, header=header, hello=hello, ledger=self.ledger,
                          pause=lambda: self._pause_from_worker(fault), ask=self._ask_destination(to),
                          check_only=check,
                          fault=fault, progress=progress, on_doubt=lambda why: self._post(lambda: self._doubt(why)),
                          deadline=self.limits.deadline, stall=self.limits.stall,
                          settle_notice=self.limits.settle_notice)
        self.migrating = Migrating(worker, req, str(to))
        self.state = "migrating"

        def work() -> None:
            outcome = worker.run()
            self._post(lambda: self._migrated(outcome))

        threading.Thread(target=work, name="migrate-out", daemon=True).start()

    def _pause_from_worker(self, fault: str | None = None) -> float:
        """Called by the migration thread: have the main thread stop the guest; return when it has."""
        done = threading.Event()
        when: list[float] = []

        def pause() -> None:
            vmm = self.vmm
            if vmm is not None and self.state == "migrating" and fault == "pause-mid-line":
                # a test's way to pause while the guest is half-way through a heartbeat line
                vmm.run(poll=lambda: " spec_ctrl 0x" in vmm.serial.partial, timeout=30)
            if vmm is not None and self.state == "migrating":
                # Complete the exit KVM is in the middle of (a port write, say) without running the guest further:
                # KVM finishes pending I/O on KVM_RUN, then sees immediate_exit. Only then is the vCPU's state
                # whole (Documentation/virt/kvm/api.rst, KVM_RUN).
                vmm.vcpu.request_exit(True)
                try:
                    vmm.vcpu.run()
                except KvmError as e:
                    self.say(f"vmm: completing the last exit before the pause: {e}")
                vmm.vcpu.request_exit(False)
            when.append(time.monotonic())
            self.state = "paused"
            self.say(f"vmm: paused at monotonic {when[0]:.6f}")
            done.set()

        self._post(pause)
        if not done.wait(60):
            raise ConnectionError("the VMM's main thread did not pause the guest")
        return when[0]

    def _doubt(self, why: str) -> None:
        self.state = "in-doubt"
        self.doubt = why
        if self.migrating is not None:
            self.migrating.request.reply({"ok": True, "result": self.migrating.worker.out.to_json()})

    def _migrated(self, outcome: Outcome) -> None:
        m = self.migrating
        self.migrating, self.doubt = None, ""
        vmm = self.vmm
        if outcome.migrated:
            if vmm is not None:
                vmm.serial.partial = ""  # the unfinished line went with the guest: it is printed there, not here
                vmm.close()
            self.vmm = None
            self.say(f"vmm: vm {self.vm_id} left for {m.to if m else '?'} (migration {outcome.migration}, "
                     f"{outcome.settled_by})")
            self.vm_id = ""
            self.state = "waiting" if self.incoming is not None else "migrated"
        else:
            if vmm is not None and outcome.mode == "pre-copy":
                try:
                    vmm.machine.vm.set_dirty_logging(0, False)
                except (KvmError, ValueError):
                    pass
            if outcome.paused_at is not None:
                self.say(f"vmm: vm {self.vm_id} running at monotonic {time.monotonic():.6f} (resumed on the "
                         "source)")
            self.state = "running"
        if m is not None:
            m.request.reply({"ok": True, "result": outcome.to_json()})

    def _ask(self, control: str, migration: str, told: str | None, role: str) -> str:
        try:
            answer = control_request(control, {"cmd": "outcome", "migration": migration, "told": told},
                                     creds=self.creds, timeout=5, connect_timeout=5)
        except PeerGone:
            return "gone"
        except (ConnectionError, PvmitError, OSError, ValueError):
            return "unreachable"
        state = answer.get("state")
        if answer.get("role") == "none":
            return "unknown"
        if answer.get("role") != role or not isinstance(state, str):
            return "unreachable"
        return state

    def _ask_destination(self, to: Address) -> Callable[[str, str, str], str]:
        def ask(control: str, migration: str, told: str) -> str:
            try:
                where = advertised(Address.parse(control), to.host)
            except InputError:
                return "unreachable"
            return self._ask(where, migration, told, "destination")
        return ask

    # --- incoming migration ------------------------------------------------------------------------------------
    def _receive(self, peer: Peer) -> None:
        """On an incoming connection's thread: take one guest, if this VMM has none and takes none already."""
        chan = Channel(peer.sock, expect_header=True, idle=self.limits.stall)
        with self._lock:
            busy = self.receiver is not None or self.vmm is not None
            if not busy:
                receiver = Receiver(chan, self.kvm, self.host, self.settings, ledger=self.ledger,
                                    control="", ask=lambda c, m: "unreachable",
                                    progress=lambda m: self.say(f"vmm: incoming: {m}"), on_line=self._guest_line,
                                    fault=self.fault, deadline=self.limits.deadline,
                                    commit_wait=self.limits.commit_wait, settle_notice=self.limits.settle_notice)
                self.receiver = receiver
        if busy:
            reason = ("this VMM already receives a guest" if self.receiver is not None else
                      f"this VMM already runs a guest (state {self.state})")
            try:
                chan.send(encode_json(b"NACK", {"reason": reason}))
            except (OSError, ConnectionError):
                pass
            self.say(f"vmm: incoming: refused {peer.who}: {reason}")
            return
        self.say(f"vmm: incoming: connection from {peer.who}")
        peer_host = peer.who.split(" ", 1)[0]
        receiver.control = str(self.control_address)

        def ask_source(control: str, migration: str) -> str:
            try:
                where = advertised(Address.parse(control), peer_host)
            except InputError:
                return "unreachable"
            return self._ask(where, migration, None, "source")

        receiver.ask = ask_source
        self.state = "receiving"
        arrival = receiver.run()
        self._post(lambda: self._arrived(arrival))

    def _arrived(self, arrival: Arrival) -> None:
        self.receiver = None
        if arrival.vmm is None:
            if self.vmm is None:
                self.state = "waiting"
            return
        self.vmm = arrival.vmm
        self.vm_id = arrival.vm_id
        self.state = "running"
        self.say(f"vmm: resumed at monotonic {time.monotonic():.6f}; vm {self.vm_id} running (migration "
                 f"{arrival.migration}, {arrival.settled_by}); interface checks after the pause took "
                 f"{arrival.interface_seconds * 1e3:.3f} ms, applying the forced controls "
                 f"{arrival.apply_seconds * 1e3:.3f} ms")


__all__ = ["Boot", "DEFAULT_HEARTBEAT", "FILLS", "Limits", "MAX_HEARTBEAT", "VmmProcess", "fill"]
