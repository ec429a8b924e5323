"""The interface as a guest sees it (docs/interface.md): CPUID bits, MSR indices, signatures, request bits.

The hypervisor side keeps the same numbers in `pvmit.x86` and `pvmit.interface.forms`; the agent cannot import
those (they are not in the guest's bundle), so it has this copy and tests/test_agent.py checks the two agree.
"""

from __future__ import annotations

CPUID_1_ECX_HYPERVISOR = 1 << 31  # X86_FEATURE_HYPERVISOR: leaves 0x40000000+ belong to a hypervisor
CPUID_7_0_EDX_ARCH_CAPABILITIES = 1 << 29  # IA32_ARCH_CAPABILITIES exists
MSR_IA32_ARCH_CAPABILITIES = 0x10A
ARCH_CAP_VIRTUAL_ENUM = 1 << 63  # RFC v3: MSR_VIRTUAL_ENUMERATION exists
MSR_VIRTUAL_ENUMERATION = 0x50000000
VIRT_ENUM_MITIGATION_CTRL_SUPPORT = 1 << 0
MSR_VIRTUAL_MITIGATION_ENUM = 0x50000001
MSR_VIRTUAL_MITIGATION_CTRL = 0x50000002

HYPERVISOR_BASES = range(0x40000000, 0x40010000, 0x100)  # Linux hypervisor_cpuid_base()'s scan
KVM_SIGNATURE = b"KVMKVMKVM\0\0\0"
KVM_FEATURE_PVMIT_MITIGATION = 1 << 30  # in base+1 EAX (pvmit's own number)
MSR_KVM_PVMIT_MITIGATION = 0x4B564D80  # bits 31:0 request bits, 63:32 supported bits (pvmit's own number)
NEUTRAL_SIGNATURE = b"VirtMitigCtl"

BHB_CLEAR_SEQ_S_USED = 1 << 0
RETPOLINE_S_USED = 1 << 1
REQUEST_BITS = BHB_CLEAR_SEQ_S_USED | RETPOLINE_S_USED
REQUEST_NAMES = {BHB_CLEAR_SEQ_S_USED: "BHB_CLEAR_SEQ_S_USED", RETPOLINE_S_USED: "RETPOLINE_S_USED"}


# pvmit's proposal (docs/interface.md sections 9 and 10): LONG_BHB_NEEDED and the pool description, in each form
NEUTRAL_EDX_LONG_BHB_NEEDED = 1 << 0  # CPUID base+1 EDX
KVM_HINTS_PVMIT_LONG_BHB = 1 << 30  # CPUID 0x40000001.EDX
KVM_FEATURE_PVMIT_POOL = 1 << 29  # CPUID 0x40000001.EAX
MSR_KVM_PVMIT_POOL = 0x4B564D81
VIRT_ENUM_LONG_BHB_NEEDED = 1 << 1  # MSR_VIRTUAL_ENUMERATION
VIRT_ENUM_POOL_DESCRIPTION = 1 << 2
MSR_VIRTUAL_POOL_INFO = 0x50000010
POOL_MAX_ENTRIES = 32
POOL_VENDORS = {1: "intel", 2: "amd", 3: "hygon"}


def decode_pool_entry(value: int) -> dict[str, int | str]:
    """One pool-description entry: vendor, family, model, stepping range (ValueError for a value no VMM writes)."""
    if value & ~((1 << 36) - 1 | (0xF << 40)) or value & (0xF << 12) or value & (0xF << 28):
        raise ValueError(f"pool entry {value:#x}: reserved bits set")
    vendor = POOL_VENDORS.get((value >> 40) & 0xF)
    if vendor is None:
        raise ValueError(f"pool entry {value:#x}: unknown vendor code {(value >> 40) & 0xF}")
    eax = value & 0xFFFF_FFFF
    family, model = (eax >> 8) & 0xF, (eax >> 4) & 0xF
    if family == 0xF:
        family += (eax >> 20) & 0xFF
    if family >= 6:
        model |= ((eax >> 16) & 0xF) << 4
    low, high = eax & 0xF, (value >> 32) & 0xF
    if low > high:
        raise ValueError(f"pool entry {value:#x}: steppings {low}..{high} are not a range")
    return {"vendor": vendor, "family": family, "model": model, "stepping_min": low, "stepping_max": high}


def bit_names(value: int) -> str:
    """'RETPOLINE_S_USED|BHB_CLEAR_SEQ_S_USED', or 'none'."""
    names = [n for b, n in sorted(REQUEST_NAMES.items(), reverse=True) if value & b]
    return "|".join(names) or "none"
