"""Where each bit layout lives (MSR index or CPUID leaf) and lossless decoding of raw values.

A `Register` ties a bit layout from `bits` to its location. `decode` turns any raw value into named bits plus the
bits no name covers; `encode` turns them back, so `encode(decode(r, v)) == v` for every v that fits the register.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntFlag
from functools import cached_property
from typing import Literal

from pvmit.x86 import bits

# MSR indices. Sources as in bits.py.
MSR_IA32_SPEC_CTRL = 0x48  # msr-index.h MSR_IA32_SPEC_CTRL
MSR_IA32_PRED_CMD = 0x49  # msr-index.h MSR_IA32_PRED_CMD
MSR_IA32_ARCH_CAPABILITIES = 0x10A  # msr-index.h MSR_IA32_ARCH_CAPABILITIES
MSR_IA32_TSC = 0x10  # msr-index.h MSR_IA32_TSC
MSR_VIRTUAL_ENUMERATION = 0x50000000  # RFC v3 msr-index.h hunk
MSR_VIRTUAL_MITIGATION_ENUM = 0x50000001  # RFC v3 msr-index.h hunk
MSR_VIRTUAL_MITIGATION_CTRL = 0x50000002  # RFC v3 msr-index.h hunk

# KVM paravirtual CPUID leaves and MSRs (kvm_para.h; Documentation/virt/kvm/x86/cpuid.rst and msr.rst).
KVM_CPUID_SIGNATURE = 0x40000000  # EAX: largest KVM leaf; EBX,ECX,EDX: "KVMKVMKVM\0\0\0"
KVM_CPUID_FEATURES = 0x40000001  # EAX: KVM_FEATURE_* bits (bits.KvmFeatures); EDX: KVM_HINTS_*
KVM_SIGNATURE = b"KVMKVMKVM\0\0\0"
MSR_KVM_BASE = 0x4B564D00  # "KVM\0" in the hypervisor MSR range; msr.rst: custom MSRs start here
KVM_MSRS_TAKEN = {
    0x4B564D00: "MSR_KVM_SYSTEM_TIME_NEW",
    0x4B564D01: "MSR_KVM_WALL_CLOCK_NEW",
    0x4B564D02: "MSR_KVM_ASYNC_PF_EN",
    0x4B564D03: "MSR_KVM_STEAL_TIME",
    0x4B564D04: "MSR_KVM_PV_EOI_EN",
    0x4B564D05: "MSR_KVM_POLL_CONTROL",
    0x4B564D06: "MSR_KVM_ASYNC_PF_INT",
    0x4B564D07: "MSR_KVM_ASYNC_PF_ACK",
    0x4B564D08: "MSR_KVM_MIGRATION_CONTROL",
}
"""MSRs KVM has assigned in its range (kvm_para.h); pvmit must not reuse these."""


@dataclass(frozen=True)
class Register:
    """One register whose bits pvmit names: where it is, how wide, and its bit layout."""

    key: str  # stable identifier used in data files and JSON
    name: str  # the name used by Intel/AMD/Linux documents
    kind: Literal["msr", "cpuid", "linux"]  # "linux": a per-model table of Linux's, not a register
    index: int  # MSR index or CPUID leaf
    subleaf: int = 0
    out: Literal["eax", "ebx", "ecx", "edx", ""] = ""  # CPUID output register; "" for MSRs
    layout: type[IntFlag] = IntFlag
    width: int = 64

    @property
    def location(self) -> str:
        if self.kind == "msr":
            return f"MSR {self.index:#x}"
        if self.kind == "linux":
            return "Linux arch/x86/kernel/cpu/common.c"
        return f"CPUID.(EAX={self.index:#x},ECX={self.subleaf}).{self.out.upper()}"

    @property
    def mask(self) -> int:
        return (1 << self.width) - 1

    @cached_property
    def _masks(self) -> dict[str, int]:
        return {m.name: int(m) for m in self.layout if m.name is not None}

    def bit(self, name: str) -> int:
        """The mask of a named bit; KeyError naming the register if there is no such bit."""
        try:
            return self._masks[name]
        except KeyError:
            raise KeyError(f"{self.name} has no bit named {name!r}") from None

    def bit_names(self) -> list[str]:
        return list(self._masks)

    @cached_property
    def named_mask(self) -> int:
        """Every bit that has a name."""
        return sum(self._masks.values())


SPEC_CTRL = Register("spec_ctrl", "IA32_SPEC_CTRL", "msr", MSR_IA32_SPEC_CTRL, layout=bits.SpecCtrl)
ARCH_CAPABILITIES = Register(
    "arch_capabilities", "IA32_ARCH_CAPABILITIES", "msr", MSR_IA32_ARCH_CAPABILITIES, layout=bits.ArchCapabilities
)
CPUID_7_0_EDX = Register("cpuid_7_0_edx", "CPUID.(7,0).EDX", "cpuid", 7, 0, "edx", bits.Cpuid7_0Edx, 32)
CPUID_7_2_EDX = Register("cpuid_7_2_edx", "CPUID.(7,2).EDX", "cpuid", 7, 2, "edx", bits.Cpuid7_2Edx, 32)
AMD_80000008_EBX = Register(
    "cpuid_80000008_ebx", "CPUID.80000008H.EBX", "cpuid", 0x80000008, 0, "ebx", bits.AmdCpuid80000008Ebx, 32
)
AMD_80000021_EAX = Register(
    "cpuid_80000021_eax", "CPUID.80000021H.EAX", "cpuid", 0x80000021, 0, "eax", bits.AmdCpuid80000021Eax, 32
)
AMD_80000021_ECX = Register(
    "cpuid_80000021_ecx", "CPUID.80000021H.ECX", "cpuid", 0x80000021, 0, "ecx", bits.AmdCpuid80000021Ecx, 32
)
LINUX_BLACKLIST = Register(
    "linux_blacklist", "Linux cpu_vuln_blacklist", "linux", 0, layout=bits.LinuxVulnBlacklist, width=12
)
VIRTUAL_ENUMERATION = Register(
    "virtual_enumeration", "MSR_VIRTUAL_ENUMERATION", "msr", MSR_VIRTUAL_ENUMERATION,
    layout=bits.VirtualEnumeration,
)
VIRTUAL_MITIGATION_ENUM = Register(
    "virtual_mitigation_enum", "MSR_VIRTUAL_MITIGATION_ENUM", "msr", MSR_VIRTUAL_MITIGATION_ENUM,
    layout=bits.MitigationEnum,
)
VIRTUAL_MITIGATION_CTRL = Register(
    "virtual_mitigation_ctrl", "MSR_VIRTUAL_MITIGATION_CTRL", "msr", MSR_VIRTUAL_MITIGATION_CTRL,
    layout=bits.MitigationCtrl,
)
KVM_FEATURES = Register("kvm_features", "CPUID.40000001H.EAX", "cpuid", KVM_CPUID_FEATURES, 0, "eax",
                        bits.KvmFeatures, 32)

REGISTERS: dict[str, Register] = {
    r.key: r
    for r in (
        SPEC_CTRL, ARCH_CAPABILITIES, CPUID_7_0_EDX, CPUID_7_2_EDX, AMD_80000008_EBX, AMD_80000021_EAX,
        AMD_80000021_ECX, LINUX_BLACKLIST, VIRTUAL_ENUMERATION, VIRTUAL_MITIGATION_ENUM, VIRTUAL_MITIGATION_CTRL,
        KVM_FEATURES,
    )
}
"""Every register pvmit names, by key."""

CPU_FACT_REGISTERS = (ARCH_CAPABILITIES, CPUID_7_0_EDX, CPUID_7_2_EDX, AMD_80000008_EBX, AMD_80000021_EAX,
                      AMD_80000021_ECX, LINUX_BLACKLIST)
"""The registers a CPU catalog entry describes (and Linux's per-model classification, kept the same way)."""


def register(key: str) -> Register:
    """Look a register up by key; KeyError lists the known keys."""
    try:
        return REGISTERS[key]
    except KeyError:
        raise KeyError(f"unknown register {key!r}; known: {', '.join(sorted(REGISTERS))}") from None


@dataclass(frozen=True)
class Decoded:
    """A raw register value split into named bits and the bits no name covers (kept, never dropped)."""

    register: Register
    value: int
    names: tuple[str, ...]
    unknown: int

    def __str__(self) -> str:
        parts = list(self.names)
        if self.unknown:
            parts.append(f"unknown({self.unknown:#x})")
        return "|".join(parts) if parts else "0"

    def to_json(self) -> dict[str, object]:
        """Hex strings, as every pvmit JSON document writes register values (64-bit values do not survive JSON
        doubles)."""
        return {"value": f"{self.value:#x}", "bits": list(self.names), "unknown": f"{self.unknown:#x}"}


def decode(reg: Register, value: int) -> Decoded:
    """Split `value` into named bits (in bit order) and unknown bits. Raises ValueError if it does not fit."""
    if value < 0 or value > reg.mask:
        raise ValueError(f"{value:#x} does not fit {reg.name} ({reg.width} bits)")
    names = tuple(m.name for m in sorted(reg.layout, key=int) if m.name is not None and value & int(m))
    known = sum(int(m) for m in reg.layout)
    return Decoded(reg, value, names, value & ~known)


def encode(reg: Register, names: list[str] | tuple[str, ...], unknown: int = 0) -> int:
    """The raw value of named bits plus raw `unknown` bits; the inverse of `decode`."""
    value = unknown
    for name in names:
        value |= reg.bit(name)
    if value > reg.mask:
        raise ValueError(f"{value:#x} does not fit {reg.name} ({reg.width} bits)")
    return value
