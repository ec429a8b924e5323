"""Receiving a guest from another pvmit VMM process.

The destination decides twice: on HELO, before the source pauses (VRDT), and on the final interface state, after
every section arrived with a good checksum (REDY or NACK). It forces the controls the guest now needs before the
first guest instruction runs here, and it starts the guest only after the source's CMIT: a stream that ends early,
for whatever reason, leaves nothing running here.
"""

from __future__ import annotations

import gc
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from pvmit.catalog.facts import CpuFacts
from pvmit.errors import PvmitError
from pvmit.interface.forms import InterfaceConfig
from pvmit.interface.policy import OperatorSettings
from pvmit.interface.state import finish, prepare, verdict_for
from pvmit.kvm.system import Kvm
from pvmit.migration import vmstate
from pvmit.migration.stream import Header, StreamError, decode_pages, encode_json
from pvmit.migration.transport import Channel, PeerClosed
from pvmit.vmm.personality import Personality
from pvmit.vmm.vmm import Host, Vmm

MAX_MEMORY = 4 << 30


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
    resumed_at: float | None = None
    source: str = ""


def _config(info: dict[str, Any]) -> tuple[Personality, InterfaceConfig, int, str]:
    try:
        vm = info["vm"]
        personality = Personality.from_json(vm["personality"])
        config = InterfaceConfig.from_json(vm["config"])
        memory = int(vm["memory_size"])
        source = str(info["source_host"]["name"])
        CpuFacts.from_json(info["source_host"]["facts"])  # validates what the header says of the source
    except (KeyError, TypeError, ValueError) as e:
        raise StreamError(f"migration stream header: {e}") from None
    if int(vm.get("vcpus", 1)) != 1:
        raise Refused("this VMM runs one vCPU per guest")
    if not 0 < memory <= MAX_MEMORY or memory % (2 << 20):
        raise Refused(f"guest memory of {memory} bytes is not a multiple of 2 MiB up to {MAX_MEMORY >> 30} GiB")
    return personality, config, memory, source


def receive(chan: Channel, kvm: Kvm, host: Host, settings: OperatorSettings | None,
            progress: Callable[[str], None] = lambda m: None,
            on_line: Callable[[str], None] | None = None, fault: str | None = None) -> Arrival:
    """Take one incoming guest over `chan`. Never raises for a bad stream: the reason comes back in Arrival."""
    vmm: Vmm | None = None
    arrival = Arrival(None)

    def nack(reason: str) -> Arrival:
        try:
            chan.send(encode_json(b"NACK", {"reason": reason}))
        except OSError:
            pass
        if vmm is not None:
            vmm.close()
        arrival.vmm, arrival.reason = None, reason
        progress(f"refused: {reason}")
        return arrival

    try:
        header = chan.receive()
        if not isinstance(header, Header):
            return nack("expected a stream header")
        personality, config, memory, source = _config(header.info)
        arrival.source = source
        progress(f"incoming guest {personality.name} from {source} ({header.info.get('mode')}, "
                 f"{memory >> 20} MiB)")
        hello = chan.expect(b"HELO").json()
        prepared = prepare(hello, host.facts, settings)  # every decision this VM can need here, before the pause
        verdict = verdict_for(prepared, hello)
        candidate: tuple[Any, Any] | None = None
        if verdict.accepted:
            # Build the guest's interface here now, from the state before the pause. After the pause, when the
            # final state is the same (the guest reported nothing new meanwhile), there is nothing left to decide.
            candidate = finish(prepare(hello, host.facts, settings), hello)
        arrival.verdict = verdict.to_json()
        chan.send(encode_json(b"VRDT", {**verdict.to_json(), "host": host.name}))
        if not verdict.accepted:
            arrival.reason = "refused before the source paused: " + "; ".join(verdict.reasons)
            progress(arrival.reason)
            return arrival
        would = [f.control.name or "" for d in verdict.decisions for f in d.forced]
        progress(f"accepted before the pause; would force: {', '.join(would) or 'nothing'}")
        vmm = Vmm(kvm, personality, host, config, settings or OperatorSettings(), memory_size=memory,
                  on_line=on_line)
        mem = vmm.machine.memory
        pages = 0
        state: dict[str, Any] | None = None
        cpus: Any = None
        devs: Any = None
        while True:
            section = chan.expect(b"MEMP", b"ISTA", b"CPUS", b"DEVS", b"DONE")
            if section.kind == b"MEMP":
                first, data = decode_pages(section)
                if first * 4096 + len(data) > mem.size:
                    return nack(f"MEMP section at byte {section.offset} writes beyond guest memory")
                mem.view[first * 4096:first * 4096 + len(data)] = data
                pages += len(data) // 4096
                if fault == "die-after-pages":  # a test's way to kill the destination mid-stream
                    import os
                    os._exit(9)
            elif section.kind == b"ISTA":
                gc.disable()  # the source has paused: no collector pause until the guest runs here
                state = section.json()
            elif section.kind == b"CPUS":
                cpus = section.json()
            elif section.kind == b"DEVS":
                devs = section.json()
            else:
                done = section.json()
                break
        if state is None or cpus is None:
            return nack("stream ended without the interface state or the vCPU state")
        if not isinstance(done, dict) or done.get("pages") != pages:
            return nack(f"DONE says {done.get('pages') if isinstance(done, dict) else '?'} pages, {pages} arrived")
        t0 = time.perf_counter()
        if candidate is not None and state == hello:
            final, core = candidate  # decided before the pause, and nothing changed since
        else:
            final, core = finish(prepared, state)
        arrival.interface_seconds = time.perf_counter() - t0
        arrival.verdict = final.to_json()
        if core is None:
            return nack("after the pause: " + "; ".join(final.reasons))
        refused_msrs = vmstate.restore(vmm.vcpu, cpus)
        t0 = time.perf_counter()
        vmm.install_core(core)  # the controls the guest needs here are in force before it runs again
        arrival.apply_seconds = time.perf_counter() - t0
        if isinstance(devs, dict):
            vmm.serial.partial = str(devs.get("serial_partial", ""))
        forced = [f.control.name for d in final.decisions for f in d.forced]
        chan.send(encode_json(b"REDY", {"host": host.name, "forced": forced,
                                        "changes": [c.to_json() for c in final.changes],
                                        "warnings": list(final.warnings), "msrs_not_restored": refused_msrs,
                                        "interface_check_ms": round(arrival.interface_seconds * 1e3, 3),
                                        "apply_ms": round(arrival.apply_seconds * 1e3, 3)}))
        chan.expect(b"CMIT")
        arrival.vmm = vmm
        arrival.resumed_at = time.monotonic()
        gc.enable()
        progress(f"committed; forcing {', '.join(str(f) for f in forced) or 'nothing'} before the guest runs here")
        return arrival
    except Refused as e:
        gc.enable()
        return nack(str(e))
    except PeerClosed:
        gc.enable()
        if vmm is not None:
            vmm.close()
        arrival.vmm = None
        arrival.reason = "the source went away before committing: not starting a half-received guest"
        progress(arrival.reason)
        return arrival
    except (PvmitError, ConnectionError, OSError, ValueError) as e:
        gc.enable()
        return nack(f"{e}; nothing runs here")
