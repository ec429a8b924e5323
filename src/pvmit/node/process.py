"""`pvmit vmm`: a long-running VMM process with a control socket.

It runs one guest (booted here, or received from another pvmit VMM with `--incoming`) and answers JSON-line
commands on its control socket: `status`, `migrate` (to another VMM's incoming address, or `check` only), `quit`.
A control thread accepts connections and reads each command, so a slow or silent client never stalls the guest;
it then kicks the vCPU out of KVM_RUN (kvm_run.immediate_exit and a signal), and the main thread, which owns the
VM, carries the command out between two guest exits.
"""

from __future__ import annotations

import json
import os
import queue
import select
import signal
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pvmit.derive import Mitigation, mitigations_to_bits
from pvmit.guest import program
from pvmit.interface.forms import InterfaceConfig
from pvmit.interface.policy import OperatorSettings, PartialSettings
from pvmit.kvm.system import Kvm
from pvmit.migration.destination import receive
from pvmit.migration.source import migrate_out
from pvmit.migration.transport import Address, Channel
from pvmit.vmm.personality import Personality
from pvmit.vmm.vmm import GuestStopped, Host, Vmm

DEFAULT_HEARTBEAT = 2000
FILL_FROM = 2 << 20  # above the page tables, GDT and program


def fill(view: memoryview, start: int, stop: int | None = None) -> None:
    """A non-zero pattern in every page from `start` on (each page differs, so nothing compresses away)."""
    stop = len(view) if stop is None else stop
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
    fill_memory: bool = False  # write a pattern into every free page, as a guest that uses its memory would


class VmmProcess:
    """The state of one `pvmit vmm` process: waiting for a guest, running one, or done (halted or migrated)."""

    def __init__(self, kvm: Kvm, host: Host, control: Address, say: Callable[[str], None],
                 settings: PartialSettings | None = None, fault: str | None = None) -> None:
        self.kvm = kvm
        self.host = host
        self.say = say
        self.settings = settings
        self.fault = fault
        self.control_address = control
        self.control = control.listen()
        self.vmm: Vmm | None = None
        self.state = "waiting"
        self.last_heartbeat = ""
        self.quit = False
        self.requests: queue.Queue[tuple[socket.socket, Any, dict[str, Any] | str]] = queue.Queue()
        self._main = threading.main_thread()
        self._kickable = threading.current_thread() is self._main
        if self._kickable:
            signal.signal(signal.SIGUSR1, lambda signum, frame: None)  # only to interrupt KVM_RUN
        self._reader = threading.Thread(target=self._accept_loop, name="control", daemon=True)
        self._reader.start()

    def _guest_line(self, line: str) -> None:
        if line.startswith("guest: count"):
            self.last_heartbeat = line
        self.say(line)

    def boot(self, b: Boot) -> None:
        self.vmm = Vmm(self.kvm, b.personality, self.host, b.config, b.settings, memory_size=b.memory_size,
                       on_line=self._guest_line, log_dirty=False)
        guest = program("counter_guest")
        if b.fill_memory:
            fill(self.vmm.machine.memory.view, FILL_FROM)
        request = mitigations_to_bits(b.uses or frozenset()) & b.config.supported
        self.vmm.load(guest.code, guest.load_address,
                      (b.heartbeat, request, 0 if b.uses is None else b.config.ctrl_msr))
        self.state = "running"
        self.say(f"vmm: booted {b.personality.name} on {self.host.name}, form {b.config.form.value}, "
                 f"MITIGATION_ENUM {b.config.supported:#x}, {b.memory_size >> 20} MiB")

    def wait_incoming(self, listen: Address) -> None:
        """Accept migrations at `listen` until one commits; serve the control socket meanwhile."""
        server = listen.listen()
        self.say(f"vmm: waiting for an incoming guest at {listen} on {self.host.name}")
        try:
            while not self.quit:
                ready, _, _ = select.select([server], [], [], 0.2)
                while self._control_pending():
                    self._serve_control()
                if server in ready:
                    conn, _ = server.accept()
                    arrival = receive(Channel(conn, expect_header=True), self.kvm, self.host, self.settings,
                                      progress=lambda m: self.say(f"vmm: incoming: {m}"),
                                      on_line=self._guest_line, fault=self.fault)
                    conn.close()
                    if arrival.vmm is not None:
                        self.vmm = arrival.vmm
                        self.state = "running"
                        self.say(f"vmm: resumed at monotonic {arrival.resumed_at:.6f}; interface checks after "
                                 f"the pause took {arrival.interface_seconds * 1e3:.3f} ms, applying the forced "
                                 f"controls {arrival.apply_seconds * 1e3:.3f} ms")
                        return
        finally:
            server.close()
            listen.unlink()  # as the control socket is: no path is left behind

    # --- the main loop -----------------------------------------------------------------------------------------
    def serve(self) -> None:
        while not self.quit:
            if self.state == "running" and self.vmm is not None:
                try:
                    stop = self.vmm.run(poll=self._control_pending, timeout=3600, max_exits=1 << 62)
                except GuestStopped as e:
                    self.say(f"vmm: {e}")
                    self.state = "halted"
                    continue
                if stop == "hlt":
                    self.state = "halted"
                    self.say("vmm: guest halted")
                while self._control_pending():
                    self._serve_control()
            else:
                try:
                    self._serve_control(self.requests.get(timeout=1.0))
                except queue.Empty:
                    pass
        self.close()

    def close(self) -> None:
        if self.vmm is not None:
            self.vmm.close()
            self.vmm = None
        self.control.close()  # the control thread's accept() fails and it ends
        self.control_address.unlink()

    # --- the control socket ------------------------------------------------------------------------------------
    def _accept_loop(self) -> None:
        """The control thread: accept connections; each is read by a short-lived thread of its own, so a client
        that connects and sends nothing delays no one."""
        while True:
            try:
                conn, _ = self.control.accept()
            except OSError:
                return  # closed: the process is ending
            threading.Thread(target=self._read_command, args=(conn,), name="control-read", daemon=True).start()

    def _read_command(self, conn: socket.socket) -> None:
        """Read one command line (at most 64 KiB, within 30 s), queue it for the main thread and kick the vCPU."""
        conn.settimeout(30)
        f = conn.makefile("rwb")
        request: dict[str, Any] | str
        try:
            line = f.readline(65536)
            doc = json.loads(line) if line else {}
            request = doc if isinstance(doc, dict) else "a command is a JSON object"
        except (ValueError, OSError, RecursionError) as e:
            request = f"bad command: {type(e).__name__}: {e}"[:300]
        conn.settimeout(600)
        self.requests.put((conn, f, request))
        self._kick()

    def _kick(self) -> None:
        """Make the main thread look at the queue now, even if the guest is inside KVM_RUN without exiting."""
        vmm = self.vmm
        if vmm is not None and self._kickable:
            vmm.vcpu.request_exit(True)  # covers a signal that arrives just before KVM_RUN starts
            signal.pthread_kill(self._main.ident or 0, signal.SIGUSR1)

    def _control_pending(self) -> bool:
        return not self.requests.empty()

    def _serve_control(self, item: tuple[socket.socket, Any, dict[str, Any] | str] | None = None) -> None:
        if item is None:
            try:
                item = self.requests.get_nowait()
            except queue.Empty:
                return
        conn, f, request = item
        with conn, f:
            if isinstance(request, str):
                self._reply(f, {"ok": False, "error": request})
                return
            try:
                self._command(request, lambda doc: self._reply(f, doc))
            except Exception as e:  # noqa: BLE001 - a failed command must not end the VMM or its guest
                self.say(f"vmm: command {request.get('cmd')!r} failed: {type(e).__name__}: {e}")
                self._reply(f, {"ok": False, "error": f"{type(e).__name__}: {e}"[:300]})

    @staticmethod
    def _reply(f: Any, doc: dict[str, Any]) -> None:
        try:
            f.write(json.dumps(doc).encode() + b"\n")
            f.flush()
        except OSError:
            pass

    def _command(self, request: dict[str, Any], reply: Callable[[dict[str, Any]], None]) -> None:
        cmd = request.get("cmd")
        if cmd == "status":
            reply({"ok": True, "state": self.state, "host": self.host.name, "heartbeat": self.last_heartbeat,
                   "spec_ctrl": self.vmm.spec_ctrl_state() if self.vmm else None, "pid": os.getpid()})
        elif cmd == "quit":
            self.quit = True
            reply({"ok": True})
        elif cmd == "migrate":
            if self.state != "running" or self.vmm is None:
                reply({"ok": False, "error": f"no running guest to migrate (state {self.state})"})
                return
            to = str(request.get("to", ""))

            def progress(message: str) -> None:
                self.say(f"vmm: migration: {message}")
                reply({"event": message, "monotonic": time.monotonic()})

            try:
                Address.parse(to)
            except Exception as e:  # noqa: BLE001 - any bad address is the client's input error
                reply({"ok": False, "error": str(e)})
                return
            outcome = migrate_out(self.vmm, to, check_only=bool(request.get("check")), progress=progress,
                                  fault=request.get("fault"))
            if outcome.paused_at is not None:
                self.say(f"vmm: paused at monotonic {outcome.paused_at:.6f}")
            if outcome.migrated:
                self.vmm.close()
                self.vmm = None
                self.state = "migrated"
            reply({"ok": True, "result": outcome.to_json()})
        else:
            reply({"ok": False, "error": f"unknown command {cmd!r}; commands: status, migrate, quit"})


def control_request(address: str, request: dict[str, Any], on_event: Callable[[dict[str, Any]], None],
                    timeout: float = 600) -> dict[str, Any]:
    """Send one command to a VMM's control socket; events go to `on_event`, the final answer is returned."""
    sock = Address.parse(address).connect(timeout=timeout)
    with sock:
        sock.sendall(json.dumps(request).encode() + b"\n")
        f = sock.makefile("rb")
        while True:
            line = f.readline()
            if not line:
                raise ConnectionError(f"the VMM at {address} closed the control connection without an answer")
            doc = json.loads(line)
            if "event" in doc:
                on_event(doc)
                continue
            return dict(doc)


__all__ = ["Boot", "VmmProcess", "control_request"]
