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
Each form also carries two things that are pvmit's proposal (docs/interface.md sections 9 and 10): the
LONG_BHB_NEEDED bit (BHI policy long-needed-bit) and the pool description (the CPU implementations the VM may run
on), each at the place that form keeps its enumeration.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from enum import Enum

from pvmit.interface.pooldesc import MAX_ENTRIES, VERSION, Implementation
from pvmit.x86.bits import VirtualEnumeration
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
NEUTRAL_VERSION = 2
"""1: leaves base and base+1; 2 adds base+1 EDX flags (LONG_BHB_NEEDED) and leaf base+2 (the pool description)."""
NEUTRAL_DEFAULT_MSR = MSR_VIRTUAL_MITIGATION_CTRL
"""The neutral form's CTRL register index, published in its CPUID leaf; by default the RFC's CTRL MSR, so a guest
driver that knows one register knows both."""

REQUEST_MASK_KVM_LOW = 0xFFFF_FFFF

# --- pvmit's proposal: the LONG_BHB_NEEDED bit and the pool description, in each form ------------------------------
NEUTRAL_EDX_LONG_BHB_NEEDED = 1 << 0
"""Neutral form, CPUID base+1 EDX bit 0: some host of the VM's pool has the longer branch history (the long BHB-
clearing loop is needed). Set only under the BHI policy long-needed-bit."""
KVM_HINTS_PVMIT_LONG_BHB_BIT = 30
"""KVM form, CPUID 0x40000001.EDX (KVM's hints; KVM assigns bit 0, KVM_HINTS_REALTIME) bit 30: LONG_BHB_NEEDED."""
KVM_FEATURE_PVMIT_POOL_BIT = 29
"""KVM form, CPUID 0x40000001.EAX bit 29: the pool description MSRs exist at MSR_KVM_PVMIT_POOL."""
MSR_KVM_PVMIT_POOL = 0x4B564D81
"""KVM form: POOL_INFO, followed by MAX_ENTRIES entry MSRs (0x4b564d82-0x4b564da1), next to its CTRL MSR."""
MSR_VIRTUAL_POOL_INFO = 0x50000010
"""Intel form (proposed beside the RFC's MSRs; MSR_VIRTUAL_ENUMERATION bit 2 enumerates it): POOL_INFO, followed by
MAX_ENTRIES entry MSRs (0x50000011-0x50000030). Also the neutral form's default, published in CPUID base+2.EAX."""
NEUTRAL_DEFAULT_POOL_MSR = MSR_VIRTUAL_POOL_INFO
POOL_BLOCK = 1 + MAX_ENTRIES
"""MSRs in a pool-description block: POOL_INFO and MAX_ENTRIES entries."""


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
    bhb_long: bool | None = None  # LONG_BHB_NEEDED as shown; None: not shown (every BHI policy but long-needed-bit)
    pool: tuple[Implementation, ...] | None = None  # the pool description shown; None: not offered
    neutral_pool_msr: int = NEUTRAL_DEFAULT_POOL_MSR

    def __post_init__(self) -> None:
        if self.supported & ~0x3:
            raise ValueError(f"supported bits {self.supported:#x}: only bits 0 and 1 are defined")
        if self.bhb_long is not None and not isinstance(self.bhb_long, bool):
            raise ValueError(f"bhb_long must be true, false or null, not {self.bhb_long!r}")
        if self.pool is not None:
            if not 1 <= len(self.pool) <= MAX_ENTRIES:
                raise ValueError(f"a pool description has 1 to {MAX_ENTRIES} entries, not {len(self.pool)}")
            if not all(isinstance(e, Implementation) for e in self.pool):
                raise ValueError("pool entries must be Implementation values")
        why = pool_block_problem(self.neutral_pool_msr, self.neutral_msr) if (
            self.pool is not None and self.form is Form.NEUTRAL) else ""
        if why:
            raise ValueError(f"neutral_pool_msr {self.neutral_pool_msr:#x}: {why}")
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
    def pool_msr(self) -> int:
        """POOL_INFO's index in this form (the entries follow it)."""
        return {Form.INTEL: MSR_VIRTUAL_POOL_INFO, Form.KVM: MSR_KVM_PVMIT_POOL,
                Form.NEUTRAL: self.neutral_pool_msr}[self.form]

    @property
    def pool_info(self) -> int:
        """POOL_INFO as read: the number of entries and the version (0 when no description is offered)."""
        return 0 if self.pool is None else len(self.pool) | (VERSION << 8)

    @property
    def virtual_enumeration(self) -> int:
        """MSR_VIRTUAL_ENUMERATION in the intel form: the RFC's bit 0, and pvmit's proposed bits 1 and 2."""
        return int(VirtualEnumeration.MITIGATION_CTRL_SUPPORT) | (
            int(VirtualEnumeration.LONG_BHB_NEEDED) if self.bhb_long else 0) | (
            int(VirtualEnumeration.POOL_DESCRIPTION) if self.pool is not None else 0)

    @property
    def msrs(self) -> frozenset[int]:
        """Every interface MSR that exists in this form (reads and writes of them reach the core)."""
        pool = frozenset(range(self.pool_msr, self.pool_msr + POOL_BLOCK)) if self.pool is not None else frozenset()
        if self.form is Form.INTEL:
            return frozenset({MSR_VIRTUAL_ENUMERATION, MSR_VIRTUAL_MITIGATION_ENUM, MSR_VIRTUAL_MITIGATION_CTRL}) | pool
        return frozenset({self.ctrl_msr}) | pool

    def to_json(self) -> dict[str, object]:
        return {"form": self.form.value, "supported": self.supported, "neutral_base": self.neutral_base,
                "neutral_msr": self.neutral_msr, "bhb_long": self.bhb_long,
                "pool": None if self.pool is None else [e.to_json() for e in self.pool],
                "neutral_pool_msr": self.neutral_pool_msr}

    @classmethod
    def from_json(cls, doc: dict[str, object]) -> InterfaceConfig:
        pool = doc.get("pool")
        if pool is not None and not isinstance(pool, list):
            raise ValueError("pool must be a list of entries or null")
        if pool is not None and not 1 <= len(pool) <= MAX_ENTRIES:  # before reading them: a list from a peer
            raise ValueError(f"a pool description has 1 to {MAX_ENTRIES} entries, not {len(pool)}")
        bhb_long = doc.get("bhb_long")
        if bhb_long is not None and not isinstance(bhb_long, bool):
            raise ValueError("bhb_long must be true, false or null")
        return cls(Form(doc["form"]), int(doc["supported"]),  # type: ignore[call-overload]
                   int(doc.get("neutral_base", NEUTRAL_DEFAULT_BASE)),  # type: ignore[call-overload]
                   int(doc.get("neutral_msr", NEUTRAL_DEFAULT_MSR)),  # type: ignore[call-overload]
                   bhb_long, None if pool is None else tuple(Implementation.from_json(e) for e in pool),
                   int(doc.get("neutral_pool_msr", NEUTRAL_DEFAULT_POOL_MSR)))  # type: ignore[call-overload]


def pool_block_problem(index: int, ctrl: int) -> str:
    """Why the neutral form's pool block (POOL_INFO at `index` and MAX_ENTRIES entries) cannot sit there, beside a
    CTRL MSR at `ctrl` ('' when it can): every register of the block obeys `neutral_msr_problem`, and the block does
    not hold the CTRL register or the Intel form's read-only registers."""
    last = index + POOL_BLOCK - 1
    for i in (index, last):
        why = neutral_msr_problem(i)
        if why:
            return f"the block {index:#x}-{last:#x} reaches {why}"
    if index <= 0x4B56_4DFF and last >= 0x4B56_4D00:
        return f"the block {index:#x}-{last:#x} overlaps KVM's paravirtual MSR range (0x4b564d00-0x4b564dff)"
    for name, taken in (("the CTRL MSR", ctrl), ("MSR_VIRTUAL_ENUMERATION", MSR_VIRTUAL_ENUMERATION),
                        ("MSR_VIRTUAL_MITIGATION_ENUM", MSR_VIRTUAL_MITIGATION_ENUM)):
        if index <= taken <= last:
            return f"the block {index:#x}-{last:#x} overlaps {name}"
    return ""


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


def neutral_leaves(config: InterfaceConfig) -> tuple[CpuidLeaf, CpuidLeaf, CpuidLeaf]:
    """The neutral form's three CPUID leaves: signature; (version, CTRL MSR index, supported bits, flags:
    LONG_BHB_NEEDED); (POOL_INFO's index, 0 when no pool description is offered)."""
    b, c, d = struct.unpack("<3I", NEUTRAL_SIGNATURE)
    base = config.neutral_base
    flags = NEUTRAL_EDX_LONG_BHB_NEEDED if config.bhb_long else 0
    return (CpuidLeaf(base, 0, base + 2, b, c, d),
            CpuidLeaf(base + 1, 0, NEUTRAL_VERSION, config.neutral_msr, config.supported, flags),
            CpuidLeaf(base + 2, 0, config.neutral_pool_msr if config.pool is not None else 0, 0, 0, 0))


def kvm_feature_leaf_bits(config: InterfaceConfig) -> int:
    """Bits the kvm form adds to CPUID 0x40000001.EAX."""
    if config.form is not Form.KVM:
        return 0
    return 1 << KVM_FEATURE_PVMIT_MITIGATION_BIT | (1 << KVM_FEATURE_PVMIT_POOL_BIT if config.pool is not None else 0)


def kvm_hint_bits(config: InterfaceConfig) -> int:
    """Bits the kvm form adds to CPUID 0x40000001.EDX (KVM's hints)."""
    return 1 << KVM_HINTS_PVMIT_LONG_BHB_BIT if config.form is Form.KVM and config.bhb_long else 0


__all__ = [
    "ALL_INTERFACE_MSRS", "CpuidLeaf", "Form", "InterfaceConfig", "KVM_CPUID_FEATURES",
    "KVM_FEATURE_PVMIT_MITIGATION_BIT", "KVM_FEATURE_PVMIT_POOL_BIT", "KVM_HINTS_PVMIT_LONG_BHB_BIT",
    "MSR_KVM_PVMIT_MITIGATION", "MSR_KVM_PVMIT_POOL", "MSR_VIRTUAL_POOL_INFO", "NEUTRAL_DEFAULT_BASE",
    "NEUTRAL_DEFAULT_MSR", "NEUTRAL_DEFAULT_POOL_MSR", "NEUTRAL_EDX_LONG_BHB_NEEDED", "NEUTRAL_SIGNATURE",
    "NEUTRAL_VERSION", "POOL_BLOCK", "kvm_feature_leaf_bits", "kvm_hint_bits", "neutral_leaves", "pool_block_problem",
]
