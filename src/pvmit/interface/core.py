"""The per-VM protocol state machine, with no I/O: guest MSR accesses in, values or #GP out, control changes as
effects for the backend to apply.

A backend (the KVM VMM, a test, the verifier) routes every MSR in `handled_msrs` here:

    value = vm.rdmsr(vcpu, index)        # None means: inject #GP (vm.last_fault says why)
    ok = vm.wrmsr(vcpu, index, value)    # False means: inject #GP
    for effect in vm.take_effects():     # SpecCtrlChanged when forced bits or interception change
        apply(effect)

IA32_SPEC_CTRL needs routing only while `vm.intercept_spec_ctrl(vcpu)` is true; otherwise the backend lets the
hardware (KVM) handle it and adds no exits.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from pvmit.catalog.facts import CpuFacts
from pvmit.derive import Mitigation, mitigations_from_bits
from pvmit.interface.forms import ALL_INTERFACE_MSRS, MSR_KVM_PVMIT_MITIGATION, POOL_BLOCK, Form, InterfaceConfig
from pvmit.interface.policy import Decision, OperatorSettings, decide
from pvmit.interface.spec_ctrl import SpecCtrlShadow, guest_writable
from pvmit.x86.bits import ArchCapabilities
from pvmit.x86.registers import (
    MSR_IA32_ARCH_CAPABILITIES,
    MSR_IA32_SPEC_CTRL,
    MSR_VIRTUAL_ENUMERATION,
    MSR_VIRTUAL_MITIGATION_CTRL,
    MSR_VIRTUAL_MITIGATION_ENUM,
)

MASK64 = (1 << 64) - 1


@dataclass(frozen=True)
class SpecCtrlChanged:
    """Effect: the bits the VMM holds in a vCPU's IA32_SPEC_CTRL changed; apply `effective`, (un)intercept."""

    vcpu: int
    mask: int
    forced: int
    effective: int
    intercept: bool
    decision: Decision


@dataclass(eq=False)
class VcpuInterface:
    """What the protocol holds for one vCPU."""

    index: int
    spec: SpecCtrlShadow
    ctrl: int = 0
    reported: bool = False
    decision: Decision = field(default_factory=lambda: Decision(frozenset(), False))

    @property
    def reliance(self) -> frozenset[Mitigation] | None:
        return mitigations_from_bits(self.ctrl) if self.reported else None


Reader = Callable[[VcpuInterface], int | None]
Writer = Callable[[VcpuInterface, int], bool]


class VmInterface:
    """One VM's view of the protocol: its form, promised bits, personality, host, operator settings and vCPUs."""

    def __init__(self, config: InterfaceConfig, host: CpuFacts, personality: CpuFacts,
                 settings: OperatorSettings = OperatorSettings(), vcpus: int = 1, *,
                 decider: Callable[[CpuFacts, frozenset[Mitigation] | None, CpuFacts, OperatorSettings],
                                   Decision] = decide) -> None:
        if vcpus < 1:
            raise ValueError("a VM has at least one vCPU")
        self._decide = decider  # `policy.decide`, or a table of its answers prepared ahead (state.Prepared)
        self.config = config
        self.host = host
        self.personality = personality
        self.settings = settings
        self.last_fault = ""
        self._effects: list[SpecCtrlChanged] = []
        shown = personality.reg("arch_capabilities")
        self.arch_caps_present = bool(personality.fact("cpuid_7_0_edx", "ARCH_CAPABILITIES").value) or \
            config.form is Form.INTEL
        self.arch_caps = (shown.value & ~int(ArchCapabilities.VIRTUAL_ENUM)) | (
            int(ArchCapabilities.VIRTUAL_ENUM) if config.form is Form.INTEL else 0)
        writable = guest_writable(personality)
        self.vcpus = [VcpuInterface(i, SpecCtrlShadow(writable)) for i in range(vcpus)]
        self._dispatch = self._build_dispatch()
        for i in range(vcpus):
            self._redecide(i)
            self._emit(i)  # the backend learns every vCPU's starting state, changed or not

    # --- what a backend needs to know --------------------------------------------------------------------------
    @property
    def handled_msrs(self) -> frozenset[int]:
        """MSRs whose every access must reach this core (IA32_SPEC_CTRL only while intercepted)."""
        return frozenset(self._dispatch) - {MSR_IA32_SPEC_CTRL}

    def intercept_spec_ctrl(self, vcpu: int) -> bool:
        return self.vcpus[vcpu].spec.intercept

    def current_effects(self) -> list[SpecCtrlChanged]:
        """Every vCPU's present state as effects, for a backend that takes over this core (and drops queued ones)."""
        self._effects = []
        for i in range(len(self.vcpus)):
            self._emit(i)
        return self.take_effects()

    def take_effects(self) -> list[SpecCtrlChanged]:
        effects, self._effects = self._effects, []
        return effects

    # --- guest accesses ----------------------------------------------------------------------------------------
    def rdmsr(self, vcpu: int, index: int) -> int | None:
        entry = self._dispatch.get(index)
        if entry is None:
            self.last_fault = f"MSR {index:#x} is not handled by the mitigation interface"
            return None
        return entry[0](self.vcpus[vcpu])

    def wrmsr(self, vcpu: int, index: int, value: int) -> bool:
        entry = self._dispatch.get(index)
        if entry is None:
            self.last_fault = f"MSR {index:#x} is not handled by the mitigation interface"
            return False
        if not 0 <= value <= MASK64:
            self.last_fault = f"WRMSR {index:#x}: {value:#x} is not a 64-bit value"
            return False
        return entry[1](self.vcpus[vcpu], value)

    # --- VMM and operator events -------------------------------------------------------------------------------
    def sync_guest_spec_ctrl(self, vcpu: int, value: int) -> None:
        """The backend tells the core what the guest wrote to IA32_SPEC_CTRL while it was not intercepted (and so
        went straight to the hypervisor), before interception starts."""
        v = self.vcpus[vcpu]
        v.spec.guest = value & MASK64

    def reset_vcpu(self, vcpu: int) -> None:
        """INIT/RESET: the request register and the guest's IA32_SPEC_CTRL go to 0, and the forced bits are
        recomputed (the RFC's KVM code reset the register but kept the old forced bits)."""
        v = self.vcpus[vcpu]
        v.ctrl, v.reported, v.spec.guest = 0, False, 0
        v.decision = self._decide(self.host, v.reliance, self.personality, self.settings)
        v.spec.hold(v.decision.mask, v.decision.value)
        self._emit(vcpu)  # always: the guest's value went to 0, so the value in effect changed even if the mask did not

    def set_settings(self, settings: OperatorSettings) -> None:
        self.settings = settings
        self._decide = decide  # a prepared table knows only the settings it was made for
        for i in range(len(self.vcpus)):
            self._redecide(i)

    def redecide_all(self) -> None:
        for i in range(len(self.vcpus)):
            self._redecide(i)

    def set_host(self, host: CpuFacts) -> None:
        """The VM now runs on `host` (restore on a migration destination): every vCPU is decided again."""
        if host is not self.host:
            self._decide = decide
        self.host = host
        for i in range(len(self.vcpus)):
            self._redecide(i)

    def reliance(self) -> frozenset[Mitigation] | None:
        """What the VM as a whole relies on: the union of its vCPUs' reports, None if no vCPU has reported."""
        reports = [v.reliance for v in self.vcpus if v.reported]
        if not reports:
            return None
        return frozenset().union(*reports)  # type: ignore[arg-type]

    # --- internals ---------------------------------------------------------------------------------------------
    def _redecide(self, i: int) -> None:
        v = self.vcpus[i]
        v.decision = self._decide(self.host, v.reliance, self.personality, self.settings)
        if v.spec.hold(v.decision.mask, v.decision.value):
            self._emit(i)

    def _emit(self, i: int) -> None:
        v = self.vcpus[i]
        self._effects = [e for e in self._effects if e.vcpu != i]  # only the latest state of a vCPU matters
        self._effects.append(SpecCtrlChanged(i, v.spec.mask, v.spec.forced, v.spec.effective, v.spec.intercept,
                                             v.decision))

    def _build_dispatch(self) -> dict[int, tuple[Reader, Writer]]:
        cfg = self.config
        ro = self._read_only
        d: dict[int, tuple[Reader, Writer]] = {}
        for index in ALL_INTERFACE_MSRS:
            d[index] = (self._not_offered(index), self._not_offered_w(index))
        if cfg.form is Form.INTEL:
            d[MSR_VIRTUAL_ENUMERATION] = (lambda v: cfg.virtual_enumeration, ro("MSR_VIRTUAL_ENUMERATION"))
            d[MSR_VIRTUAL_MITIGATION_ENUM] = (lambda v: cfg.supported, ro("MSR_VIRTUAL_MITIGATION_ENUM"))
            d[MSR_VIRTUAL_MITIGATION_CTRL] = (self._read_ctrl, self._write_ctrl)
        elif cfg.form is Form.KVM:
            d[MSR_KVM_PVMIT_MITIGATION] = (self._read_kvm, self._write_kvm)
        else:
            d[cfg.neutral_msr] = (self._read_ctrl, self._write_ctrl)
        if cfg.pool is not None:
            base = cfg.pool_msr
            d[base] = (lambda v: cfg.pool_info, ro("POOL_INFO"))
            for i in range(POOL_BLOCK - 1):
                d[base + 1 + i] = (self._pool_entry(i), ro(f"pool description entry {i}"))
        d[MSR_IA32_ARCH_CAPABILITIES] = (self._read_arch_caps, ro("IA32_ARCH_CAPABILITIES"))
        d[MSR_IA32_SPEC_CTRL] = (lambda v: v.spec.guest, self._write_spec_ctrl)
        return d

    def _not_offered(self, index: int) -> Reader:
        reason = (f"MSR {index:#x} does not exist for this VM: it uses the {self.config.form.value} form"
                  + (" (IA32_ARCH_CAPABILITIES bit 63 is clear)" if index in (
                      MSR_VIRTUAL_ENUMERATION, MSR_VIRTUAL_MITIGATION_ENUM, MSR_VIRTUAL_MITIGATION_CTRL) else ""))

        def read(v: VcpuInterface) -> int | None:
            self.last_fault = reason
            return None

        return read

    def _not_offered_w(self, index: int) -> Writer:
        read = self._not_offered(index)

        def write(v: VcpuInterface, value: int) -> bool:
            read(v)
            return False

        return write

    def _read_only(self, name: str) -> Writer:
        def write(v: VcpuInterface, value: int) -> bool:
            self.last_fault = f"{name} is read-only: WRMSR {value:#x} refused"
            return False

        return write

    def _pool_entry(self, i: int) -> Reader:
        pool = self.config.pool or ()
        value = pool[i].encode() if i < len(pool) else None
        reason = f"pool description entry {i} is past the {len(pool)} entries POOL_INFO gives"

        def read(v: VcpuInterface) -> int | None:
            if value is None:
                self.last_fault = reason
            return value

        return read

    def _read_arch_caps(self, v: VcpuInterface) -> int | None:
        if not self.arch_caps_present:
            self.last_fault = "IA32_ARCH_CAPABILITIES is not enumerated by the guest's CPU personality"
            return None
        return self.arch_caps

    def _read_ctrl(self, v: VcpuInterface) -> int | None:
        return v.ctrl

    def _write_ctrl(self, v: VcpuInterface, value: int) -> bool:
        bad = value & ~self.config.supported
        if bad:
            self.last_fault = (f"MITIGATION_CTRL write {value:#x}: bits {bad:#x} are reserved or not enumerated in "
                               f"MITIGATION_ENUM ({self.config.supported:#x})")
            return False
        v.ctrl, v.reported = value, True
        self._redecide(v.index)
        return True

    def _read_kvm(self, v: VcpuInterface) -> int | None:
        return v.ctrl | (self.config.supported << 32)

    def _write_kvm(self, v: VcpuInterface, value: int) -> bool:
        high = value >> 32
        if high not in (0, self.config.supported):
            self.last_fault = (f"MSR_KVM_PVMIT_MITIGATION write {value:#x}: bits 63:32 are read-only and must be 0 "
                               f"or the supported bits ({self.config.supported:#x})")
            return False
        return self._write_ctrl(v, value & 0xFFFF_FFFF)

    def _write_spec_ctrl(self, v: VcpuInterface, value: int) -> bool:
        fault = v.spec.write(value)
        if fault:
            self.last_fault = fault
            return False
        return True
