"""Which form of the interface the hypervisor offers, and what the guest CPU looks like. Pure: CPUID and RDMSR
come in as functions, so every form and every absence can be tested without a hypervisor.

Discovery follows docs/interface.md for each form, in the spec's order (a) intel, (b) kvm, (c) neutral; every
form found is reported and the first is used (a VMM normally offers one).
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass

from pvmit.agent import wire

Cpuid = Callable[[int, int], tuple[int, int, int, int]]
"""CPUID(leaf, subleaf) -> (eax, ebx, ecx, edx)."""
Rdmsr = Callable[[int], "int | None"]
"""RDMSR(index) on one CPU -> value, or None where it faulted (#GP: the MSR does not exist)."""


@dataclass(frozen=True)
class Offer:
    """One form found: where its CTRL register is and which request bits the hypervisor supports."""

    form: str  # "intel" | "kvm" | "neutral"
    ctrl_msr: int
    supported: int
    how: str
    long_bhb: bool = False  # LONG_BHB_NEEDED shown (pvmit's proposal)
    pool_msr: int = 0  # POOL_INFO's index where a pool description is offered (pvmit's proposal), else 0

    def in_use(self, raw: int) -> int:
        """The request bits in a value read back from the CTRL register (in the kvm form bits 63:32 read back the
        supported bits; the agent writes them as 0, which the spec allows)."""
        return raw & 0xFFFF_FFFF if self.form == "kvm" else raw

    def to_json(self) -> dict[str, object]:
        return {"form": self.form, "ctrl_msr": hex(self.ctrl_msr), "supported": hex(self.supported),
                "how": self.how, "long_bhb_needed": self.long_bhb,
                "pool_info_msr": hex(self.pool_msr) if self.pool_msr else None}


@dataclass(frozen=True)
class Discovery:
    offers: tuple[Offer, ...]
    probes: tuple[str, ...]  # what was looked at, in order, one line each

    @property
    def chosen(self) -> Offer | None:
        return self.offers[0] if self.offers else None


def _signature(regs: tuple[int, int, int, int]) -> bytes:
    return struct.pack("<3I", regs[1], regs[2], regs[3])


def hypervisor_leaves(cpuid: Cpuid) -> list[tuple[int, bytes, int]]:
    """(base, signature, largest leaf) of every hypervisor block in 0x40000000-0x4000ff00, as Linux's
    hypervisor_cpuid_base() scans them; none without CPUID.1.ECX[31] (on bare metal those leaves are junk)."""
    if not cpuid(1, 0)[2] & wire.CPUID_1_ECX_HYPERVISOR:
        return []
    out = []
    for base in wire.HYPERVISOR_BASES:
        regs = cpuid(base, 0)
        sig = _signature(regs)
        if any(sig) and all(32 <= c < 127 or c == 0 for c in sig):
            out.append((base, sig, regs[0]))
    return out


def _intel(cpuid: Cpuid, rdmsr: Rdmsr, probes: list[str]) -> Offer | None:
    if cpuid(0, 0)[0] < 7 or not cpuid(7, 0)[3] & wire.CPUID_7_0_EDX_ARCH_CAPABILITIES:
        probes.append("intel: CPUID.(7,0).EDX[29] clear: no IA32_ARCH_CAPABILITIES")
        return None
    caps = rdmsr(wire.MSR_IA32_ARCH_CAPABILITIES)
    if caps is None:
        probes.append("intel: RDMSR IA32_ARCH_CAPABILITIES faulted although CPUID enumerates it")
        return None
    if not caps & wire.ARCH_CAP_VIRTUAL_ENUM:
        probes.append(f"intel: IA32_ARCH_CAPABILITIES={caps:#x}, bit 63 (VIRTUAL_ENUM) clear")
        return None
    enum = rdmsr(wire.MSR_VIRTUAL_ENUMERATION)
    if enum is None or not enum & wire.VIRT_ENUM_MITIGATION_CTRL_SUPPORT:
        probes.append("intel: MSR_VIRTUAL_ENUMERATION " + ("faulted" if enum is None else f"={enum:#x}, bit 0 clear"))
        return None
    supported = rdmsr(wire.MSR_VIRTUAL_MITIGATION_ENUM)
    if supported is None:
        probes.append("intel: MSR_VIRTUAL_MITIGATION_ENUM faulted although MSR_VIRTUAL_ENUMERATION enumerates it")
        return None
    probes.append(f"intel: offered, MSR_VIRTUAL_ENUMERATION={enum:#x}, MSR_VIRTUAL_MITIGATION_ENUM={supported:#x}")
    return Offer("intel", wire.MSR_VIRTUAL_MITIGATION_CTRL, supported & wire.REQUEST_BITS,
                 "IA32_ARCH_CAPABILITIES bit 63, MSR_VIRTUAL_ENUMERATION bit 0, MSR_VIRTUAL_MITIGATION_ENUM",
                 bool(enum & wire.VIRT_ENUM_LONG_BHB_NEEDED),
                 wire.MSR_VIRTUAL_POOL_INFO if enum & wire.VIRT_ENUM_POOL_DESCRIPTION else 0)


def _kvm(cpuid: Cpuid, rdmsr: Rdmsr, leaves: list[tuple[int, bytes, int]], probes: list[str]) -> Offer | None:
    base = next((b for b, sig, _ in leaves if sig == wire.KVM_SIGNATURE), None)
    if base is None:
        probes.append("kvm: no KVMKVMKVM signature leaf")
        return None
    top = next(t for b, _, t in leaves if b == base)
    features, _, _, hints = cpuid(base + 1, 0) if top >= base + 1 else (0, 0, 0, 0)
    if not features & wire.KVM_FEATURE_PVMIT_MITIGATION:
        probes.append(f"kvm: KVM leaves at {base:#x}, feature bit 30 clear in {base + 1:#x}.EAX={features:#x}")
        return None
    raw = rdmsr(wire.MSR_KVM_PVMIT_MITIGATION)
    if raw is None:
        probes.append(f"kvm: feature bit 30 set but RDMSR {wire.MSR_KVM_PVMIT_MITIGATION:#x} faulted")
        return None
    probes.append(f"kvm: offered at {base:#x}, MSR {wire.MSR_KVM_PVMIT_MITIGATION:#x}={raw:#x}")
    return Offer("kvm", wire.MSR_KVM_PVMIT_MITIGATION, (raw >> 32) & wire.REQUEST_BITS,
                 f"KVM leaves at {base:#x}, {base + 1:#x}.EAX bit 30, supported bits in MSR bits 63:32",
                 bool(hints & wire.KVM_HINTS_PVMIT_LONG_BHB),
                 wire.MSR_KVM_PVMIT_POOL if features & wire.KVM_FEATURE_PVMIT_POOL else 0)


def _neutral(cpuid: Cpuid, leaves: list[tuple[int, bytes, int]], probes: list[str]) -> Offer | None:
    base = next((b for b, sig, _ in leaves if sig == wire.NEUTRAL_SIGNATURE), None)
    if base is None:
        probes.append("neutral: no VirtMitigCtl signature leaf")
        return None
    top = next(t for b, _, t in leaves if b == base)
    if top < base + 1:
        probes.append(f"neutral: signature at {base:#x} but its largest leaf is {top:#x}")
        return None
    version, msr, supported, flags = cpuid(base + 1, 0)
    if version < 1:
        probes.append(f"neutral: signature at {base:#x} but version {version}")
        return None
    pool = cpuid(base + 2, 0)[0] if version >= 2 and top >= base + 2 else 0
    probes.append(f"neutral: offered at {base:#x}, version {version}, CTRL MSR {msr:#x}, supported {supported:#x}"
                  + (f", flags {flags:#x}, POOL_INFO {pool:#x}" if version >= 2 else ""))
    return Offer("neutral", msr, supported & wire.REQUEST_BITS,
                 f"VirtMitigCtl leaves at {base:#x}, version {version}",
                 version >= 2 and bool(flags & wire.NEUTRAL_EDX_LONG_BHB_NEEDED), pool)


def discover(cpuid: Cpuid, rdmsr: Rdmsr) -> Discovery:
    """Every form the hypervisor offers, and what was looked at."""
    probes: list[str] = []
    leaves = hypervisor_leaves(cpuid)
    probes.append("hypervisor leaves: " + (", ".join(f"{b:#x} {s.rstrip(bytes(1)).decode('ascii')!r}"
                                                     for b, s, _ in leaves) or "none"))
    offers = [o for o in (_intel(cpuid, rdmsr, probes), _kvm(cpuid, rdmsr, leaves, probes),
                          _neutral(cpuid, leaves, probes)) if o is not None]
    return Discovery(tuple(offers), tuple(probes))


def identify(cpuid: Cpuid) -> dict[str, object]:
    """The guest CPU as CPUID shows it: vendor, family/model/stepping, and the speculation registers pvmit's
    model of Linux reads (raw values; a leaf beyond the largest one is reported as null)."""
    top, b, c, d = cpuid(0, 0)
    ext_top = cpuid(0x80000000, 0)[0]
    eax1, _, ecx1, _ = cpuid(1, 0)
    family, model = (eax1 >> 8) & 0xF, (eax1 >> 4) & 0xF
    if family == 0xF:
        family += (eax1 >> 20) & 0xFF
    if family >= 6:
        model |= ((eax1 >> 16) & 0xF) << 4
    max7 = cpuid(7, 0)[0] if top >= 7 else -1

    def reg(ok: bool, leaf: int, sub: int, i: int) -> str | None:
        return hex(cpuid(leaf, sub)[i]) if ok else None

    return {
        "vendor": struct.pack("<3I", b, d, c).decode("ascii", "replace"),
        "family": family, "model": model, "stepping": eax1 & 0xF,
        "hypervisor": bool(ecx1 & wire.CPUID_1_ECX_HYPERVISOR),
        "cpuid_7_0_edx": reg(top >= 7, 7, 0, 3),
        "cpuid_7_2_edx": reg(max7 >= 2, 7, 2, 3),
        "cpuid_80000008_ebx": reg(ext_top >= 0x80000008, 0x80000008, 0, 1),
        "cpuid_80000021_eax": reg(ext_top >= 0x80000021, 0x80000021, 0, 0),
    }
