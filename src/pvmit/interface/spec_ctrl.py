"""IA32_SPEC_CTRL virtualization with a mask and a shadow, per vCPU.

The value in effect is the guest's own value with the forced bits replaced: (guest & ~mask) | (forced & mask). The
guest reads back exactly what it wrote and can never change a masked bit; a bit its CPU personality does not
enumerate raises #GP, as on hardware (KVM's kvm_is_valid_spec_ctrl() applies the same rule to guest CPUID).
Two backends hold the forced bits (`SpecCtrlBackend`): interception (what pvmit does on any KVM) and the hardware
mask (FORCE_SPEC_CTRL-style, modelled by `HardwareMask`); both put the same value in effect.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from pvmit.catalog.facts import CpuFacts
from pvmit.x86.bits import SpecCtrl
from pvmit.x86.registers import REGISTERS

# (IA32_SPEC_CTRL bits, the enumeration that makes them writable): Intel CPUID.(7,0).EDX / (7,2).EDX,
# AMD CPUID 0x80000008.EBX. Sources as in pvmit.x86.bits.
_ENUMERATION: tuple[tuple[int, str, str], ...] = (
    (SpecCtrl.IBRS, "cpuid_7_0_edx", "SPEC_CTRL"),
    (SpecCtrl.STIBP, "cpuid_7_0_edx", "INTEL_STIBP"),
    (SpecCtrl.SSBD, "cpuid_7_0_edx", "SPEC_CTRL_SSBD"),
    (SpecCtrl.IPRED_DIS_U | SpecCtrl.IPRED_DIS_S, "cpuid_7_2_edx", "IPRED_CTRL"),
    (SpecCtrl.RRSBA_DIS_U | SpecCtrl.RRSBA_DIS_S, "cpuid_7_2_edx", "RRSBA_CTRL"),
    (SpecCtrl.PSFD, "cpuid_7_2_edx", "PSFD"),
    (SpecCtrl.DDPD_U, "cpuid_7_2_edx", "DDPD_U"),
    (SpecCtrl.BHI_DIS_S, "cpuid_7_2_edx", "BHI_CTRL"),
    (SpecCtrl.IBRS, "cpuid_80000008_ebx", "IBRS"),
    (SpecCtrl.STIBP, "cpuid_80000008_ebx", "STIBP"),
    (SpecCtrl.SSBD, "cpuid_80000008_ebx", "SSBD"),
    (SpecCtrl.PSFD, "cpuid_80000008_ebx", "PSFD"),
)


_ENUMERATION_MASKS = tuple((int(mask), reg, REGISTERS[reg].bit(name)) for mask, reg, name in _ENUMERATION)


def guest_writable(personality: CpuFacts) -> int:
    """IA32_SPEC_CTRL bits a guest shown `personality` may set (unknown facts are not shown)."""
    bits = 0
    for mask, reg, enum_bit in _ENUMERATION_MASKS:
        rf = personality.registers.get(reg)
        if rf is not None and rf.value & enum_bit:
            bits |= mask
    return bits


@dataclass
class SpecCtrlShadow:
    """One vCPU's IA32_SPEC_CTRL: what the guest wrote, and the bits the VMM holds (mask) at `forced` values."""

    writable: int
    guest: int = 0
    mask: int = 0
    forced: int = 0

    @property
    def effective(self) -> int:
        return (self.guest & ~self.mask) | (self.forced & self.mask)

    @property
    def intercept(self) -> bool:
        """Accesses must reach the VMM only while something is forced; otherwise KVM handles them natively."""
        return self.mask != 0

    def write(self, value: int) -> str | None:
        """A guest WRMSR; returns the #GP reason, or None when accepted."""
        bad = value & ~self.writable
        if bad:
            return (f"IA32_SPEC_CTRL write {value:#x}: bits {bad:#x} are not enumerated by the guest's CPU "
                    f"personality")
        self.guest = value
        return None

    def hold(self, mask: int, value: int) -> bool:
        """Set the forced mask and values; True when the effective value or interception changed."""
        before = (self.effective, self.mask)
        self.mask, self.forced = mask, value & mask
        return (self.effective, self.mask) != before


class SpecCtrlBackend(Enum):
    """How a VMM holds the forced bits.

    intercept  what pvmit does on any KVM today: every guest access to IA32_SPEC_CTRL exits to the VMM while a bit is
               forced (`SpecCtrlShadow.intercept`), which writes the value in effect back;
    hw-mask    the per-vCPU hardware mask the RFC's KVM_CAP_FORCE_SPEC_CTRL builds on (VMX tertiary control bit 7,
               "virtualize IA32_SPEC_CTRL", VMCS IA32_SPEC_CTRL_MASK and _SHADOW; <20240410143446.797262-2-
               chao.gao@intel.com>): a guest write lands as (value & ~mask) | (forced & mask) with no exit, writes
               to masked bits are silently ignored, RDMSR returns the shadow. No KVM offers it yet, so here it is
               `HardwareMask`, a model: the VMM stops intercepting and says the mask is modelled.
    """

    INTERCEPT = "intercept"
    HW_MASK = "hw-mask"


@dataclass
class HardwareMask:
    """The hw-mask backend's register for one vCPU, as the hardware would keep it: no exit on any guest access."""

    mask: int = 0
    forced: int = 0
    shadow: int = 0  # what the guest last wrote; RDMSR returns it
    value: int = 0  # what the hardware holds

    def guest_write(self, v: int) -> None:
        """A guest WRMSR: no exit; the masked bits keep their forced values."""
        self.shadow = v
        self.value = (v & ~self.mask) | (self.forced & self.mask)

    def guest_read(self) -> int:
        return self.shadow

    def hold(self, mask: int, forced: int) -> None:
        """The VMM sets the mask and the forced values (its only write: when the decision changes)."""
        self.mask, self.forced = mask, forced & mask
        self.value = (self.shadow & ~mask) | self.forced
