"""The three wire forms of the mitigation-reporting protocol: which registers a guest uses and how it finds them.

One protocol, three ways to reach it (docs/interface.md is the specification):

  intel    Intel's virtual MSRs from the RFC: IA32_ARCH_CAPABILITIES bit 63 enumerates MSR_VIRTUAL_ENUMERATION
           (0x50000000), which enumerates MSR_VIRTUAL_MITIGATION_ENUM (0x50000001, read-only) and
           MSR_VIRTUAL_MITIGATION_CTRL (0x50000002, read-write). Offered to AMD guests by emulating
           IA32_ARCH_CAPABILITIES for them.
  kvm      KVM paravirtual style: a feature bit in CPUID 0x40000001.EAX and one MSR in KVM's 0x4b564dxx range whose
           low half holds the guest's request bits and whose high half reads back the supported bits.
  neutral  The same CTRL register as the intel form, enumerated through a vendor-neutral CPUID signature leaf that
           any hypervisor can place at the first free 0x100-aligned base of the hypervisor range, so one guest
           driver works under any hypervisor and on Intel and AMD.

The request bits mean the same in every form (bit 0: the short BHB-clearing sequence is in use; bit 1: retpoline).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from enum import Enum

from pvmit.x86.registers import (
    KVM_CPUID_FEATURES,
    KVM_MSRS_TAKEN,
    MSR_VIRTUAL_ENUMERATION,
    MSR_VIRTUAL_MITIGATION_CTRL,
    MSR_VIRTUAL_MITIGATION_ENUM,
)


class Form(Enum):
    INTEL = "intel"
    KVM = "kvm"
    NEUTRAL = "neutral"


# --- pvmit's own numbers (not assigned by KVM; see docs/interface.md) -------------------------------------------
KVM_FEATURE_PVMIT_MITIGATION_BIT = 30
"""CPUID 0x40000001.EAX bit: MSR_KVM_PVMIT_MITIGATION exists. KVM assigns bits 0-17 and 24; 18 is claimed by
several unmerged proposals, so pvmit takes a high bit."""
MSR_KVM_PVMIT_MITIGATION = 0x4B564D80
"""KVM-style MSR: bits 31:0 request bits (read-write), bits 63:32 supported bits (read-only). KVM assigns
0x4b564d00-08 and its CET series uses 0x4b564dff; the middle of the range is far from both."""
assert MSR_KVM_PVMIT_MITIGATION not in KVM_MSRS_TAKEN

NEUTRAL_SIGNATURE = b"VirtMitigCtl"
"""12-byte signature in EBX, ECX, EDX of the neutral form's base leaf."""
NEUTRAL_DEFAULT_BASE = 0x40000100
"""Where pvmit puts the neutral leaves: KVM's leaves sit at 0x40000000, so the next 0x100-aligned base."""
NEUTRAL_VERSION = 1
NEUTRAL_DEFAULT_MSR = MSR_VIRTUAL_MITIGATION_CTRL
"""The neutral form's CTRL register index, published in its CPUID leaf; by default the RFC's CTRL MSR, so a guest
driver that knows one register knows both."""

REQUEST_MASK_KVM_LOW = 0xFFFF_FFFF


def neutral_msr_problem(index: int) -> str:
    """Why `index` cannot carry the neutral form's CTRL register ('' when it can). pvmit keeps it in
    0x40000000-0x5fffffff, the block where hypervisors already put their registers (Hyper-V, KVM, Intel's virtual
    MSRs), away from the architectural MSRs, and off every other interface register: Hyper-V's synthetic MSRs
    (which KVM also emulates), KVM's paravirtual MSRs (our KVM form among them) and the Intel form's read-only
    registers. The Intel form's CTRL (0x50000002) is allowed: it is the default, with the same layout."""
    if not 0x4000_0000 <= index <= 0x5FFF_FFFF:
        return "outside 0x40000000-0x5fffffff, the block kept for hypervisor registers"
    if index <= 0x4000_00FF:
        return "Hyper-V's synthetic MSR range (0x40000000-0x400000ff)"
    if 0x4B56_4D00 <= index <= 0x4B56_4DFF:
        return "KVM's paravirtual MSR range (0x4b564d00-0x4b564dff)"
    if index in (MSR_VIRTUAL_ENUMERATION, MSR_VIRTUAL_MITIGATION_ENUM):
        return "a read-only register of the Intel form"
    return ""


@dataclass(frozen=True)
class InterfaceConfig:
    """Per-VM choice of form and the request bits the VMM promises to honour (MITIGATION_ENUM).

    `supported` must hold on every host the VM may run on (see `policy.supported_requests`); the guest reads it
    once at boot, so it travels with the VM and a destination that cannot honour it is refused.
    """

    form: Form
    supported: int
    neutral_base: int = NEUTRAL_DEFAULT_BASE
    neutral_msr: int = NEUTRAL_DEFAULT_MSR

    def __post_init__(self) -> None:
        if self.supported & ~0x3:
            raise ValueError(f"supported bits {self.supported:#x}: only bits 0 and 1 are defined")
        if self.neutral_base & 0xFF or not 0x40000000 <= self.neutral_base < 0x40010000:
            raise ValueError(f"neutral_base {self.neutral_base:#x} is not a 0x100-aligned base in "
                             "0x40000000-0x4000ff00")
        why = neutral_msr_problem(self.neutral_msr)
        if why:
            raise ValueError(f"neutral_msr {self.neutral_msr:#x}: {why}")

    @property
    def ctrl_msr(self) -> int:
        """The MSR that carries the guest's request bits in this form."""
        return {Form.INTEL: MSR_VIRTUAL_MITIGATION_CTRL, Form.KVM: MSR_KVM_PVMIT_MITIGATION,
                Form.NEUTRAL: self.neutral_msr}[self.form]

    @property
    def msrs(self) -> frozenset[int]:
        """Every interface MSR that exists in this form (reads and writes of them reach the core)."""
        if self.form is Form.INTEL:
            return frozenset({MSR_VIRTUAL_ENUMERATION, MSR_VIRTUAL_MITIGATION_ENUM, MSR_VIRTUAL_MITIGATION_CTRL})
        return frozenset({self.ctrl_msr})

    def to_json(self) -> dict[str, object]:
        return {"form": self.form.value, "supported": self.supported, "neutral_base": self.neutral_base,
                "neutral_msr": self.neutral_msr}

    @classmethod
    def from_json(cls, doc: dict[str, object]) -> InterfaceConfig:
        return cls(Form(doc["form"]), int(doc["supported"]),  # type: ignore[call-overload]
                   int(doc.get("neutral_base", NEUTRAL_DEFAULT_BASE)),  # type: ignore[call-overload]
                   int(doc.get("neutral_msr", NEUTRAL_DEFAULT_MSR)))  # type: ignore[call-overload]


ALL_INTERFACE_MSRS = frozenset({MSR_VIRTUAL_ENUMERATION, MSR_VIRTUAL_MITIGATION_ENUM, MSR_VIRTUAL_MITIGATION_CTRL,
                                MSR_KVM_PVMIT_MITIGATION})
"""Every MSR any form may use at its default index; a VMM routes these to the core so that the forms a VM does
not offer raise #GP instead of reaching KVM."""


@dataclass(frozen=True)
class CpuidLeaf:
    leaf: int
    subleaf: int
    eax: int
    ebx: int
    ecx: int
    edx: int


def neutral_leaves(config: InterfaceConfig) -> tuple[CpuidLeaf, CpuidLeaf]:
    """The neutral form's two CPUID leaves: signature and (version, CTRL MSR index, supported bits)."""
    b, c, d = struct.unpack("<3I", NEUTRAL_SIGNATURE)
    base = config.neutral_base
    return (CpuidLeaf(base, 0, base + 1, b, c, d),
            CpuidLeaf(base + 1, 0, NEUTRAL_VERSION, config.neutral_msr, config.supported, 0))


def kvm_feature_leaf_bits(config: InterfaceConfig) -> int:
    """Bits the kvm form adds to CPUID 0x40000001.EAX."""
    return 1 << KVM_FEATURE_PVMIT_MITIGATION_BIT if config.form is Form.KVM else 0


__all__ = [
    "ALL_INTERFACE_MSRS", "CpuidLeaf", "Form", "InterfaceConfig", "KVM_CPUID_FEATURES",
    "KVM_FEATURE_PVMIT_MITIGATION_BIT", "MSR_KVM_PVMIT_MITIGATION", "NEUTRAL_DEFAULT_BASE", "NEUTRAL_DEFAULT_MSR",
    "NEUTRAL_SIGNATURE", "NEUTRAL_VERSION", "kvm_feature_leaf_bits", "neutral_leaves",
]
