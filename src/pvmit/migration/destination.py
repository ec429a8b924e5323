"""Receiving a guest from another pvmit VMM process.

The destination decides twice: on HELO, before the source pauses (VRDT), and on the final interface state, after
every section arrived with a good checksum (REDY or NACK). It forces the controls the guest now needs before the
first guest instruction runs here, and it starts the guest only after the source's CMIT: a stream that ends early,
for whatever reason, leaves nothing running here.
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
from pvmit.interface.forms import InterfaceConfig
from pvmit.interface.policy import PartialSettings
from pvmit.interface.state import finish, prepare
from pvmit.kvm.system import Kvm
from pvmit.migration import vmstate
from pvmit.migration.stream import Header, StreamError, decode_pages, encode_json
from pvmit.migration.transport import Channel, PeerClosed
from pvmit.vmm.machine import MAX_MEMORY  # a header asking for more is refused before allocating
from pvmit.vmm.personality import Personality
from pvmit.vmm.vmm import Host, Vmm


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


def _config(info: dict[str, Any]) -> tuple[Personality, InterfaceConfig, int, str, dict[str, int]]:
    try:
        vm = info["vm"]
        personality = Personality.from_json(vm["personality"])
        config = InterfaceConfig.from_json(vm["config"])
        memory = int(vm["memory_size"])
        source = str(info["source_host"]["name"])
        CpuFacts.from_json(info["source_host"]["facts"])  # validates what the header says of the source
        cpuid = vm.get("cpuid", {})
        if not isinstance(cpuid, dict) or not all(isinstance(k, str) and isinstance(v, int) and 0 <= v < 1 << 32
                                                  for k, v in cpuid.items()):
            raise ValueError("vm.cpuid must map 'leaf.subleaf.register' to 32-bit values")
    except (KeyError, TypeError, ValueError) as e:
        raise StreamError(f"migration stream header: {e}") from None
    if int(vm.get("vcpus", 1)) != 1:
        raise Refused("this VMM runs one vCPU per guest")
    if not 0 < memory <= MAX_MEMORY or memory % (2 << 20):
        raise Refused(f"guest memory of {memory} bytes is not a multiple of 2 MiB up to {MAX_MEMORY >> 30} GiB")
    return personality, config, memory, source, cpuid


def _same_vm(hello: Any, personality: Personality, config: InterfaceConfig) -> None:
    """HELO's interface state must describe the VM the header describes."""
    if not isinstance(hello, dict):
        raise StreamError("HELO section: not a JSON object")
    try:
        same = (InterfaceConfig.from_json(hello["config"]) == config
                and CpuFacts.from_json(hello["personality"]) == personality.facts)
    except (KeyError, TypeError, ValueError) as e:
        raise StreamError(f"HELO section: {e}") from None
    if not same:
        raise StreamError("HELO section: its interface configuration or CPU personality differs from the header's")


def _cpuid_differences(source: dict[str, int], here: dict[str, int]) -> list[str]:
    return [f"CPUID {k}: {v:#x} on the source, {here[k]:#x} here" if k in here else f"CPUID {k}: missing here"
            for k, v in source.items() if here.get(k) != v]


def receive(chan: Channel, kvm: Kvm, host: Host, settings: PartialSettings | None,
            progress: Callable[[str], None] = lambda m: None,
            on_line: Callable[[str], None] | None = None, fault: str | None = None) -> Arrival:
    """Take one incoming guest over `chan`. Never raises for a bad stream: the reason comes back in Arrival.

    `settings` are this VMM's operator settings; they go over those the VM carries, field by field
    (`PartialSettings.over`); None keeps the VM's own."""
    vmm: Vmm | None = None
    arrival = Arrival(None)
    held: list[str] | None = []  # the VMM's messages while the source is paused, printed after the commit

    def line(text: str) -> None:
        if held is not None:
            held.append(text)
        elif on_line is not None:
            on_line(text)

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
        personality, config, memory, source, source_cpuid = _config(header.info)
        arrival.source = source
        progress(f"incoming guest {personality.name} from {source} ({header.info.get('mode')}, "
                 f"{memory >> 20} MiB)")
        hello = chan.expect(b"HELO").json()
        _same_vm(hello, personality, config)
        # Every decision this VM can need here, before the pause: `prepared` stays for a final state that differs
        # from HELO; a second one is finished now into the guest's interface for the HELO state (`finish` fills in
        # the one it is given). After the pause, when the final state is the same, nothing is left to decide.
        prepared = prepare(hello, host.facts, settings)
        if settings is not None and prepared.vm_fields[2] != prepared.settings.to_json():
            progress(f"operator settings given here ({settings.label()}) over the VM's own "
                     f"{prepared.vm_fields[2]}: now {prepared.settings.to_json()}")
        verdict, core = finish(prepare(hello, host.facts, settings), hello)
        verdict_doc: dict[str, Any] = verdict.to_json()
        candidate: tuple[Any, Any] | None = None
        if core is not None:
            vmm = Vmm(kvm, personality, host, config, prepared.settings, memory_size=memory, on_line=line)
            differ = _cpuid_differences(source_cpuid, vmm.guest_cpuid())
            if differ:
                verdict_doc = {**verdict_doc, "accepted": False,
                               "reasons": ["the guest would see a different CPU here: " + "; ".join(differ)]}
            else:
                candidate = (verdict, core)
                vmm.install_core(core)  # MSR filter and controls in place ahead; the guest is not here yet
        arrival.verdict = verdict_doc
        chan.send(encode_json(b"VRDT", {**verdict_doc, "host": host.name}))
        if not verdict_doc["accepted"]:
            arrival.reason = "refused before the source paused: " + "; ".join(str(r) for r in verdict_doc["reasons"])
            progress(arrival.reason)
            if vmm is not None:
                vmm.close()
            return arrival
        assert vmm is not None
        would = [f.control.name or "" for d in verdict.decisions for f in d.forced]
        progress(f"accepted before the pause; would force: {', '.join(would) or 'nothing'}")
        return _take(chan, vmm, hello, prepared, candidate, host, arrival, nack, progress, fault)
    except Refused as e:
        return nack(str(e))
    except PeerClosed:
        if vmm is not None:
            vmm.close()
        arrival.vmm = None
        arrival.reason = "the source went away before committing: not starting a half-received guest"
        progress(arrival.reason)
        return arrival
    except (PvmitError, ConnectionError, OSError, ValueError) as e:
        return nack(f"{e}; nothing runs here")
    finally:
        if on_line is not None and held:
            for text in held:  # what the VMM said while the source was paused, or of a guest that never started
                on_line(text if arrival.vmm is not None else f"{text} (incoming guest not started)")
        held = None


def _take(chan: Channel, vmm: Vmm, hello: Any, prepared: Any, candidate: tuple[Any, Any] | None, host: Host,
          arrival: Arrival, nack: Callable[[str], Arrival], progress: Callable[[str], None],
          fault: str | None) -> Arrival:
    """Memory, then the paused guest's state; verify, decide, restore, answer REDY and wait for CMIT."""
    mem = vmm.machine.memory
    pages = 0
    state: dict[str, Any] | None = None
    cpus: Any = None
    devs: Any = None
    done: Any = None
    try:
        while True:
            section = chan.expect(b"MEMP", b"ISTA", b"CPUS", b"DEVS", b"DONE")
            if section.kind == b"MEMP":
                first, data = decode_pages(section)
                if first * 4096 + len(data) > mem.size:
                    return nack(f"MEMP section at byte {section.offset} writes beyond guest memory")
                mem.view[first * 4096:first * 4096 + len(data)] = data
                pages += len(data) // 4096
                if fault == "die-after-pages":  # a test's way to kill the destination mid-stream
                    os._exit(9)
            elif section.kind == b"ISTA":
                gc.disable()  # the source has paused: no collector pause until the guest runs here
                if fault == "die-after-state":  # a test's way to kill the destination while the source is paused
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
            return nack("stream ended without the interface state or the vCPU state")
        if not isinstance(done, dict) or done.get("pages") != pages:
            return nack(f"DONE says {done.get('pages') if isinstance(done, dict) else '?'} pages, {pages} arrived")
        t0 = time.perf_counter()
        installed = candidate is not None and state == hello
        if installed:
            assert candidate is not None
            final, core = candidate  # decided before the pause, and nothing changed since
        else:
            final, core = finish(prepared, state)
        arrival.interface_seconds = time.perf_counter() - t0
        arrival.verdict = final.to_json()
        if core is None:
            return nack("after the pause: " + "; ".join(final.reasons))
        not_restored = vmstate.restore(vmm.vcpu, cpus)
        if not_restored:
            return nack("this KVM would not take part of the vCPU state: " + ", ".join(not_restored))
        t0 = time.perf_counter()
        if installed:
            vmm.sync_core_spec_ctrl()  # filter already in place: only the value in effect, after the restore
        else:
            vmm.install_core(core)  # the controls the guest needs here are in force before it runs again
        arrival.apply_seconds = time.perf_counter() - t0
        if isinstance(devs, dict):
            vmm.serial.partial = str(devs.get("serial_partial", ""))
        forced = [f.control.name for d in final.decisions for f in d.forced]
        chan.send(encode_json(b"REDY", {"host": host.name, "forced": forced,
                                        "changes": [c.to_json() for c in final.changes],
                                        "warnings": list(final.warnings),
                                        "interface_check_ms": round(arrival.interface_seconds * 1e3, 3),
                                        "apply_ms": round(arrival.apply_seconds * 1e3, 3)}))
        chan.expect(b"CMIT")
        arrival.vmm = vmm
        arrival.resumed_at = time.monotonic()
    finally:
        gc.enable()
    progress(f"committed; forcing {', '.join(str(f) for f in forced) or 'nothing'} before the guest runs here")
    return arrival
