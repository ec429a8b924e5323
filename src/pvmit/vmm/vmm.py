"""The VMM: KVM exits bound to the sans-IO interface core.

Guest RDMSR/WRMSR of the interface's MSRs and IA32_ARCH_CAPABILITIES reach Python through KVM's MSR filter
(KVM_CAP_X86_USER_SPACE_MSR + KVM_X86_SET_MSR_FILTER); IA32_SPEC_CTRL joins them only while the core forces a bit,
so with nothing forced the guest's IA32_SPEC_CTRL accesses never leave KVM. The value in effect is written to KVM
for the bits this machine's hardware has and its KVM keeps (probed once per vCPU); the rest (on an AMD host:
RRSBA_DIS_S and BHI_DIS_S; on a KVM that emulates guests in software: all) are kept in the vCPU state and reported
as modelled only.

The pass-through path is KVM's own: with nothing forced, a guest write of a bit the hardware lacks is KVM's to
accept or refuse (the KVM on the development machine drops it; mainline KVM answers #GP), exactly as without pvmit.
Once intercepted, IA32_SPEC_CTRL stays intercepted while the guest's value holds such a bit, so that it reads back
what it wrote.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

from pvmit.catalog.facts import CpuFacts
from pvmit.interface.core import SpecCtrlChanged, VmInterface
from pvmit.interface.forms import ALL_INTERFACE_MSRS, Form, InterfaceConfig, neutral_leaves
from pvmit.interface.policy import OperatorSettings
from pvmit.interface.spec_ctrl import HardwareMask, SpecCtrlBackend, guest_writable
from pvmit.kvm import abi
from pvmit.kvm.errors import KvmError
from pvmit.kvm.system import CpuidEntry, Kvm
from pvmit.kvm.vcpu import IoExit, MsrExit, Vcpu
from pvmit.kvm.vm import MsrRange
from pvmit.vmm.machine import Machine, enter_long_mode
from pvmit.vmm.personality import Personality, build_cpuid
from pvmit.vmm.serial import COM1, LSR, LSR_IDLE, Serial
from pvmit.x86.bits import SpecCtrl
from pvmit.x86.registers import CPU_FACT_REGISTERS, KVM_CPUID_FEATURES, MSR_IA32_ARCH_CAPABILITIES, MSR_IA32_SPEC_CTRL

USER_SPACE_MSR_REASONS = (abi.KVM_MSR_EXIT_REASON_INVAL | abi.KVM_MSR_EXIT_REASON_UNKNOWN |
                          abi.KVM_MSR_EXIT_REASON_FILTER)


def spec_ctrl_bits_kept(vcpu: Vcpu, candidates: int) -> int:
    """The IA32_SPEC_CTRL bits among `candidates` (what the CPU enumerates) that this KVM keeps for a vCPU: each is
    written alone and read back. A KVM that emulates its guests in software may keep none. Leaves the register 0."""
    kept = 0
    for bit in (1 << i for i in range(64) if candidates >> i & 1):
        try:
            if vcpu.set_msrs({MSR_IA32_SPEC_CTRL: bit}) and \
                    vcpu.get_msrs([MSR_IA32_SPEC_CTRL]).get(MSR_IA32_SPEC_CTRL, 0) & bit:
                kept |= bit
        except KvmError:
            pass
    if candidates:
        try:
            vcpu.set_msrs({MSR_IA32_SPEC_CTRL: 0})
        except KvmError:
            pass
    return kept


class GuestStopped(Exception):
    """The guest can no longer run (shutdown, failed entry, internal error); the message says which."""


@dataclass
class Host:
    """The host the policy decides for (`facts`) and what this machine's hardware really has (`real`)."""

    name: str
    facts: CpuFacts
    real: CpuFacts
    stand_in: bool  # True when `facts` is a catalog model standing in for another host

    @property
    def hardware_spec_ctrl(self) -> int:
        """IA32_SPEC_CTRL bits this machine can apply for a guest (the real CPU's enumeration)."""
        return guest_writable(self.real)


@dataclass
class ExitCounts:
    total: int = 0
    msr_read: int = 0
    msr_write: int = 0
    spec_ctrl: int = 0
    io: int = 0
    hlt: int = 0
    other: int = 0
    by_msr: dict[int, int] = field(default_factory=dict)

    def to_json(self) -> dict[str, object]:
        return {"total": self.total, "msr_read": self.msr_read, "msr_write": self.msr_write,
                "spec_ctrl": self.spec_ctrl, "io": self.io, "hlt": self.hlt, "other": self.other,
                "by_msr": {(f"{k:#x}" if k >= 0 else "other"): v for k, v in sorted(self.by_msr.items())}}


class Vmm:
    """One guest on KVM with the mitigation interface. Build, `start()`, then `run()` until it halts."""

    def __init__(self, kvm: Kvm, personality: Personality, host: Host, config: InterfaceConfig,
                 settings: OperatorSettings = OperatorSettings(), *, memory_size: int = 4 << 20,
                 on_line: Callable[[str], None] | None = None, log_dirty: bool = False,
                 core: VmInterface | None = None,
                 spec_ctrl_backend: SpecCtrlBackend = SpecCtrlBackend.INTERCEPT) -> None:
        self.kvm = kvm
        self.personality = personality
        self.host = host
        self.config = config
        self.core = core or VmInterface(config, host.facts, personality.facts, settings, vcpus=1)
        self.machine = Machine(kvm, memory_size, log_dirty=log_dirty)
        self.vcpu = self.machine.vcpu
        self.serial = Serial(on_line)
        self._on_line = on_line
        self.counts = ExitCounts()
        self.spec_ctrl_writes = 0  # values the VMM put into KVM's IA32_SPEC_CTRL
        self.backend = spec_ctrl_backend
        self.hw_mask = HardwareMask()  # the hw-mask backend's model (one vCPU)
        self.events: list[str] = []
        self._intercepting = False
        self._running = False  # before the first run, KVM's IA32_SPEC_CTRL holds nothing of the guest's
        self._hw = spec_ctrl_bits_kept(self.vcpu, host.hardware_spec_ctrl)  # what reaches the hardware here
        self._interface_ranges = self._ranges_for(config)
        self._interface_indices = frozenset(i for r in self._interface_ranges
                                            for i in range(r.base, r.base + r.count)) | {MSR_IA32_SPEC_CTRL}
        self.after_msr_exit: Callable[[Vmm], None] | None = None  # a test's invariant check, run after each
        self.machine.vm.enable_cap(abi.KVM_CAP_X86_USER_SPACE_MSR, USER_SPACE_MSR_REASONS)
        wanted = build_cpuid(personality, config, kvm.supported_cpuid())
        self.vcpu.set_cpuid(wanted)
        self.cpuid_overridden = self._cpuid_differences(wanted)
        if host.hardware_spec_ctrl & ~self._hw:
            self._event("this KVM does not keep IA32_SPEC_CTRL " + "+".join(
                str(b.name) for b in SpecCtrl if b & host.hardware_spec_ctrl & ~self._hw) + ": modelled only")
        for leaf in self.cpuid_overridden:
            self._event(f"this KVM did not keep CPUID {leaf}: the guest does not see the personality there")
        self._apply(self.core.take_effects())

    def _checked_registers(self) -> list[tuple[int, int, str]]:
        """The CPUID registers a personality or interface form sets. Only these are compared: KVM legitimately
        adjusts others (APIC ids, cache topology)."""
        hints = [(KVM_CPUID_FEATURES, 0, "edx")] if self.config.form is Form.KVM else []  # LONG_BHB_NEEDED there
        return [(0, 0, r) for r in ("ebx", "ecx", "edx")] + [(1, 0, "eax")] + [
            (r.index, r.subleaf, r.out) for r in CPU_FACT_REGISTERS if r.kind == "cpuid"] + [
            (KVM_CPUID_FEATURES, 0, "eax")] + hints + [
            (leaf.leaf, 0, r) for leaf in neutral_leaves(self.config)
                                               for r in ("eax", "ebx", "ecx", "edx")
                                               if self.config.form is Form.NEUTRAL]

    def _cpuid_differences(self, wanted: list[CpuidEntry]) -> list[str]:
        """Registers pvmit set that KVM did not keep (some KVM builds replace leaf 7 with the host's)."""
        got = {(e.function, e.index): e for e in self.vcpu.get_cpuid()}
        want = {(e.function, e.index): e for e in wanted}
        out = []
        for leaf, sub, reg in self._checked_registers():
            w, g = want.get((leaf, sub)), got.get((leaf, sub))
            if w is None:
                continue
            if g is None or g.out(reg) != w.out(reg):
                out.append(f"{leaf:#x}.{sub}.{reg} (set {w.out(reg):#x}, kept {g.out(reg) if g else 0:#x})")
        return out

    def guest_cpuid(self) -> dict[str, int]:
        """What the guest sees in the checked CPUID registers, as KVM holds them ('0x7.0.edx': value). A migration
        carries it, and the destination refuses a guest that would see a different CPU there."""
        got = {(e.function, e.index): e for e in self.vcpu.get_cpuid()}
        return {f"{leaf:#x}.{sub}.{reg}": got[(leaf, sub)].out(reg)
                for leaf, sub, reg in self._checked_registers() if (leaf, sub) in got}

    @staticmethod
    def _ranges_for(config: InterfaceConfig) -> list[MsrRange]:
        """One filter range per run of consecutive indices (a pool description is a block of them)."""
        ranges: list[MsrRange] = []
        for i in sorted(config.msrs | ALL_INTERFACE_MSRS | {MSR_IA32_ARCH_CAPABILITIES}):
            last = ranges[-1] if ranges else None
            if last is not None and last.base + last.count == i:
                ranges[-1] = MsrRange(last.base, last.count + 1)
            else:
                ranges.append(MsrRange(i))
        return ranges

    def _event(self, message: str) -> None:
        """Something the VMM did or decided: kept in `events` and shown in the transcript as it happens."""
        if len(self.events) < 10_000:
            self.events.append(message)
        if self._on_line:
            self._on_line(f"vmm: {message}")

    # --- setup -------------------------------------------------------------------------------------------------
    def load(self, code: bytes, address: int, args: tuple[int, ...] = ()) -> None:
        """Load a 64-bit program and point the vCPU at it, with rdi, rsi, rdx, rcx, r8, r9 = args."""
        self.machine.load(code, address)
        enter_long_mode(self.vcpu, address, self.machine.stack_top, args)

    def close(self) -> None:
        self.serial.close()
        self.machine.close()

    # --- the exit loop -----------------------------------------------------------------------------------------
    def run(self, *, max_exits: int = 2_000_000, timeout: float = 60.0,
            poll: Callable[[], bool] | None = None) -> str:
        """Run until the guest halts ('hlt'), `poll()` returns True ('stopped'), or a limit is hit.

        `poll` is asked after each port-I/O exit (a guest's heartbeat), after a kick (KVM_EXIT_INTR) and every 1024
        exits, not after every exit.
        """
        vcpu, counts = self.vcpu, self.counts
        self._running = True
        deadline = time.monotonic() + timeout
        rd_reason, wr_reason = abi.KVM_EXIT_X86_RDMSR, abi.KVM_EXIT_X86_WRMSR
        io_reason, hlt_reason = abi.KVM_EXIT_IO, abi.KVM_EXIT_HLT
        for n in range(max_exits):
            x = vcpu.run()
            counts.total += 1
            reason = x.reason
            if reason == rd_reason or reason == wr_reason:
                assert isinstance(x, MsrExit)
                self._msr(x)
            elif reason == io_reason:
                assert isinstance(x, IoExit)
                counts.io += 1
                self._io(x)
                if poll is not None and poll():
                    return "stopped"
            elif reason == hlt_reason:
                counts.hlt += 1
                return "hlt"
            elif reason == abi.KVM_EXIT_INTR:  # kicked (another thread wants the VMM's attention)
                counts.other += 1
                vcpu.request_exit(False)
                if poll is not None and poll():
                    return "stopped"
            else:
                counts.other += 1
                raise GuestStopped(f"guest stopped: {abi.EXIT_NAMES.get(reason, reason)} "
                                   f"{getattr(x, 'detail', '')}".strip())
            if not n & 0x3FF:
                if poll is not None and poll():
                    return "stopped"
                if time.monotonic() > deadline:
                    return "timeout"
        return "max-exits"

    def _msr(self, x: MsrExit) -> None:
        counts, core, vcpu = self.counts, self.core, self.vcpu
        index = x.index
        key = index if index in self._interface_indices else -1  # -1: any other MSR (bounded: one entry)
        counts.by_msr[key] = counts.by_msr.get(key, 0) + 1
        if index == MSR_IA32_SPEC_CTRL:
            counts.spec_ctrl += 1
        if x.write:
            counts.msr_write += 1
            if core.wrmsr(0, index, x.data):
                vcpu.complete_wrmsr()
                if index == MSR_IA32_SPEC_CTRL:
                    self._write_spec_ctrl(core.vcpus[0].spec.effective)
            else:
                vcpu.fault()
                self._event(f"#GP injected: {core.last_fault}")
            effects = core.take_effects()
            if effects:
                self._apply(effects)
        else:
            counts.msr_read += 1
            value = core.rdmsr(0, index)
            if value is None:
                vcpu.fault()
                self._event(f"#GP injected: {core.last_fault}")
            else:
                vcpu.complete_rdmsr(value)
        if self.after_msr_exit is not None:
            self.after_msr_exit(self)

    def _io(self, x: IoExit) -> None:
        if x.out:
            if x.port == COM1:
                self.serial.write(self.vcpu.io_data(x))
            return
        data = self.vcpu.io_data(x)
        data[:] = bytes([LSR_IDLE if x.port == LSR else 0xFF]) * len(data)

    # --- applying the core's decisions -------------------------------------------------------------------------
    def _apply(self, effects: list[SpecCtrlChanged]) -> None:
        for e in effects:
            # Also intercept while the guest's own value holds bits this hardware lacks: KVM would not keep them,
            # and the guest must read back what it wrote. With the hardware mask nothing is intercepted: the mask
            # holds the forced bits (modelled: no KVM here offers it).
            intercept = self.backend is SpecCtrlBackend.INTERCEPT and (
                e.intercept or bool(self.core.vcpus[e.vcpu].spec.guest & ~self._hw))
            if self.backend is SpecCtrlBackend.HW_MASK:
                self.hw_mask.hold(e.mask, e.forced)
            if intercept and not self._intercepting and self._running:
                self.sync_spec_ctrl()  # the guest's own value so far lives in KVM; the core takes it over
            self._set_intercept(intercept)
            self._write_spec_ctrl(self.core.vcpus[e.vcpu].spec.effective)
            forced = [b.name for b in SpecCtrl if b & e.mask]
            if forced:
                hw = [b.name for b in SpecCtrl if b & e.mask & self._hw]
                modelled = [b.name for b in SpecCtrl if b & e.mask & ~self._hw]
                self._event(
                    f"forced IA32_SPEC_CTRL {'+'.join(str(n) for n in forced)}: "
                    f"in hardware {', '.join(str(n) for n in hw) or 'none'}; "
                    f"modelled only {', '.join(str(n) for n in modelled) or 'none'}"
                    + ("; held by the per-vCPU hardware mask (modelled: guest accesses do not exit)"
                       if self.backend is SpecCtrlBackend.HW_MASK else ""))
            else:
                self._event("nothing forced; IA32_SPEC_CTRL " + (
                    "still intercepted: the guest's value has bits this hardware lacks" if intercept
                    else "not intercepted"))

    def install_core(self, core: VmInterface) -> None:
        """Take over a core restored from a migration stream, and put what it forces into effect before the guest
        runs here."""
        self.core = core
        self._apply(core.current_effects())

    def sync_core_spec_ctrl(self) -> None:
        """Write the core's value in effect into KVM again (after a vCPU state restore on a destination that put
        the core in place before the pause)."""
        self._write_spec_ctrl(self.core.vcpus[0].spec.effective)

    def sync_spec_ctrl(self) -> None:
        """While IA32_SPEC_CTRL is not intercepted the guest's writes go to KVM; copy its value into the core
        (before interception starts, and before a snapshot)."""
        if not self._intercepting:
            current = self.vcpu.get_msrs([MSR_IA32_SPEC_CTRL]).get(MSR_IA32_SPEC_CTRL, 0)
            self.core.sync_guest_spec_ctrl(0, current & self.core.vcpus[0].spec.writable)

    def _set_intercept(self, on: bool) -> None:
        if on == self._intercepting and self.counts.total:
            return
        ranges = self._interface_ranges + ([MsrRange(MSR_IA32_SPEC_CTRL)] if on else [])
        self.machine.vm.set_msr_filter(ranges)
        self._intercepting = on

    def _write_spec_ctrl(self, effective: int) -> None:
        """Put the value in effect into KVM, for the bits this hardware has; the others stay modelled."""
        self.spec_ctrl_writes += 1
        try:
            self.vcpu.set_msrs({MSR_IA32_SPEC_CTRL: effective & self._hw})
        except KvmError as e:
            self._event(f"KVM refused IA32_SPEC_CTRL {effective & self._hw:#x}: {e}")

    # --- reporting ---------------------------------------------------------------------------------------------
    def spec_ctrl_state(self) -> dict[str, object]:
        s = self.core.vcpus[0].spec
        kvm_value = self.vcpu.get_msrs([MSR_IA32_SPEC_CTRL]).get(MSR_IA32_SPEC_CTRL)
        return {
            "guest_value": f"{s.guest:#x}", "effective": f"{s.effective:#x}",
            "forced_mask": f"{s.mask:#x}", "forced_value": f"{s.forced:#x}", "intercepted": self._intercepting,
            "in_hardware": [b.name for b in SpecCtrl if b & s.effective & self._hw],
            "modelled_only": [b.name for b in SpecCtrl if b & s.effective & ~self._hw],
            "kvm_value": None if kvm_value is None else f"{kvm_value:#x}",
        }
