"""`pvmit host`: what this machine is, what it can force for guests, and what would be ineffective here.

Everything is read for real (CPUID executed, MSRs through the msr driver, sysfs, /dev/kvm). Whatever cannot be
read is reported as unknown with the reason; decisions then treat it conservatively (see `pvmit.derive`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from pvmit.catalog.facts import VENDOR_STRINGS, CpuFacts, RegisterFacts
from pvmit.catalog.linux_lists import blacklist_facts
from pvmit.catalog.loader import Catalog, CpuModel
from pvmit.derive import Mitigation, cpu_summary, need
from pvmit.host.cpuid import (
    CpuidSource,
    brand_string,
    family_model_stepping,
    hypervisor_signature,
    open_cpuid,
    vendor_string,
)
from pvmit.host.msr import MsrUnreadable, read_msr
from pvmit.host.sysfs import VULN_DIR, read_vulnerabilities
from pvmit.userfiles import FileError
from pvmit.x86 import bits, decode
from pvmit.x86.registers import (
    AMD_80000008_EBX,
    AMD_80000021_EAX,
    AMD_80000021_ECX,
    ARCH_CAPABILITIES,
    CPUID_7_0_EDX,
    CPUID_7_2_EDX,
    KVM_FEATURES,
    LINUX_BLACKLIST,
    MSR_IA32_ARCH_CAPABILITIES,
    Register,
)

SCHEMA = "pvmit.host/1"


@dataclass
class HostReport:
    """Everything `pvmit host` found, ready to print or to serialise as JSON."""

    identity: dict[str, Any]
    facts: CpuFacts | None
    unknowns: list[dict[str, str]] = field(default_factory=list)
    vulnerabilities: dict[str, str] | None = None
    kvm: dict[str, Any] | None = None
    nearest: dict[str, Any] | None = None

    def to_json(self) -> dict[str, Any]:
        doc: dict[str, Any] = {"schema": SCHEMA, "identity": self.identity}
        doc["facts"] = self.facts.to_json() if self.facts else None
        if self.facts:
            doc["derived"] = summary = cpu_summary(self.facts)
            doc["can_force"] = [name for name, f in summary["controls"].items() if f["answer"]]
            doc["ineffective_here"] = [
                {"mitigation": m.value, "reason": n.effective.reason, "compensation": n.control.name,
                 "compensation_available": n.can_force}
                for m in Mitigation if (n := need(self.facts, m)).must_force
            ]
        else:
            doc["derived"] = None
            doc["can_force"] = []
            doc["ineffective_here"] = []
        doc["nearest_model"] = self.nearest
        doc["vulnerabilities"] = self.vulnerabilities
        doc["kvm"] = self.kvm
        doc["unknowns"] = self.unknowns
        return doc


def _cpuid_register(cpuid: CpuidSource, reg: Register, present: bool, method: str) -> RegisterFacts:
    if not present:
        return RegisterFacts.exact(reg, 0, f"{method}: leaf {reg.index:#x} subleaf {reg.subleaf} not present")
    a, b, c, d = cpuid(reg.index, reg.subleaf)
    value = {"eax": a, "ebx": b, "ecx": c, "edx": d}[reg.out]
    return RegisterFacts.exact(reg, value, method)


def read_cpu_facts(cpuid: CpuidSource, unknowns: list[dict[str, str]]) -> tuple[dict[str, Any], CpuFacts]:
    """Identity and speculation registers of this CPU, as CPUID and the msr driver report them."""
    vstr = vendor_string(cpuid)
    max_leaf = cpuid(0)[0]
    eax1 = cpuid(1)[0]
    family, model, stepping = family_model_stepping(eax1)
    max_ext = cpuid(0x80000000)[0]
    hv = hypervisor_signature(cpuid)
    identity = {
        "vendor_string": vstr,
        "vendor": VENDOR_STRINGS.get(vstr),
        "family": family,
        "model": model,
        "stepping": stepping,
        "signature": f"{eax1:#010x}",
        "brand": brand_string(cpuid),
        "hypervisor": {"signature": hv[1], "max_leaf": f"{hv[0]:#x}"} if hv else None,
        "cpuid_method": cpuid.method,
    }
    method = f"{cpuid.method} on this host"
    max_sub7 = cpuid(7, 0)[0] if max_leaf >= 7 else 0
    regs = {
        CPUID_7_0_EDX.key: _cpuid_register(cpuid, CPUID_7_0_EDX, max_leaf >= 7, method),
        CPUID_7_2_EDX.key: _cpuid_register(cpuid, CPUID_7_2_EDX, max_leaf >= 7 and max_sub7 >= 2, method),
        AMD_80000008_EBX.key: _cpuid_register(cpuid, AMD_80000008_EBX, max_ext >= 0x80000008, method),
        AMD_80000021_EAX.key: _cpuid_register(cpuid, AMD_80000021_EAX, max_ext >= 0x80000021, method),
        AMD_80000021_ECX.key: _cpuid_register(cpuid, AMD_80000021_ECX, max_ext >= 0x80000021, method),
    }
    if not regs[CPUID_7_0_EDX.key].value & bits.Cpuid7_0Edx.ARCH_CAPABILITIES:
        regs[ARCH_CAPABILITIES.key] = RegisterFacts.exact(
            ARCH_CAPABILITIES, 0, "CPUID.(7,0).EDX.ARCH_CAPABILITIES=0: the MSR does not exist on this CPU")
    else:
        try:
            regs[ARCH_CAPABILITIES.key] = RegisterFacts.exact(
                ARCH_CAPABILITIES, read_msr(MSR_IA32_ARCH_CAPABILITIES), "RDMSR 0x10a via /dev/cpu/0/msr")
        except MsrUnreadable as e:
            unknowns.append({"what": "IA32_ARCH_CAPABILITIES", "reason": str(e)})
            regs[ARCH_CAPABILITIES.key] = RegisterFacts.unknown(ARCH_CAPABILITIES, str(e))
    vendor = VENDOR_STRINGS.get(vstr)
    if vendor is None:
        unknowns.append({"what": "vendor",
                         "reason": f"unrecognised CPUID vendor {vstr!r}; decisions treat it as Intel"})
    else:
        core_type = None
        if vendor == "intel" and max_leaf >= 0x1A:  # CPUID.1AH.EAX[31:24]: 0x20 Atom, 0x40 Core (hybrid parts)
            core_type = {0x20: "atom", 0x40: "core"}.get(cpuid(0x1A)[0] >> 24)
        regs[LINUX_BLACKLIST.key] = blacklist_facts(vendor, family, [model], [stepping], core_type)
    facts = CpuFacts(vendor or "intel", family, model, stepping, regs, method)
    return identity, facts


_BEHAVIOUR = ("RSBA", "RRSBA")  # IA32_ARCH_CAPABILITIES bits whose 0 would say "retpoline is safe"
_CONTROLS = ("RRSBA_CTRL", "BHI_CTRL")  # CPUID.(7,2).EDX bits whose 0 would say "short history / no control"


def reconcile(reading: CpuFacts, model: CpuModel | None, under_hypervisor: bool) -> tuple[CpuFacts, list[str]]:
    """Make a live reading safe to decide from: a 0 read where a 0 is the unsafe answer is trusted only when
    nothing contradicts it.

    Microcode before 2023 did not enumerate RRSBA ("Other parts have differing enumeration with microcode
    version", Xen retpoline_calculations), old microcode lacks BHI_CTRL (seen on a real i7-12650H), and a hypervisor
    may hide either. So on Intel: RSBA/RRSBA read as 0 take the exact catalog model's value where it has one and
    are unknown otherwise (RRSBA on eIBRS parts, RSBA on the others). The controls' enumeration depends on microcode
    (Alder Lake), so this host's CPUID decides whether a control exists: RRSBA_CTRL read as 0 stays 0 on bare metal;
    BHI_CTRL read as 0 where the catalog model has it becomes unknown (the control is then taken as absent, and the
    part's long branch history is not forgotten); both are unknown under a hypervisor. Unknown facts are then
    decided conservatively downstream.
    """
    if reading.vendor != "intel":
        return reading, []
    notes: list[str] = []
    regs = dict(reading.registers)
    arch, edx = reading.reg("arch_capabilities"), reading.reg("cpuid_7_2_edx")
    eibrs = reading.fact("arch_capabilities", "IBRS_ALL").value

    def forget(rf: RegisterFacts, bit: str, why: str) -> RegisterFacts:
        mask = rf.register.bit(bit)
        notes.append(f"{rf.register.name}.{bit} read as 0 but not relied on: {why}")
        sources = {**{k: v for k, v in rf.sources.items()}, bit: why}
        return RegisterFacts(rf.register, rf.value & ~mask, rf.known & ~mask, sources, why, rf.inferred & ~mask)

    for bit in _BEHAVIOUR:
        f = arch.fact(bit)
        # RRSBA matters on eIBRS parts, RSBA on the others ("CPUs are not expected to enumerate both")
        if f.value is not False or (bit == "RRSBA" and eibrs is False) or (bit == "RSBA" and eibrs is True):
            continue
        catalog_fact = model.facts.fact("arch_capabilities", bit) if model else None
        if catalog_fact is not None and catalog_fact.known:
            mask = arch.register.bit(bit)
            value = (arch.value & ~mask) | (mask if catalog_fact.value else 0)
            notes.append(f"IA32_ARCH_CAPABILITIES.{bit}: the catalog's {model.id if model else ''} value is used "
                         f"({catalog_fact.source}); microcode may not enumerate it")
            arch = RegisterFacts(arch.register, value, arch.known | mask,
                                 {**arch.sources, bit: f"catalog {model.id if model else ''}: {catalog_fact.source}"},
                                 arch.unknown_reason, arch.inferred | (mask if catalog_fact.inferred else 0))
        else:
            arch = forget(arch, bit, "microcode before 2023 did not enumerate it (Xen retpoline_calculations) and "
                                     "no catalog model of this CPU says otherwise")
    for bit in _CONTROLS:
        f = edx.fact(bit)
        if f.value is not False:
            continue
        catalog_fact = model.facts.fact("cpuid_7_2_edx", bit) if model else None
        if under_hypervisor:
            edx = forget(edx, bit, "running under a hypervisor, which may hide it")
        elif catalog_fact is not None and catalog_fact.value:
            # Microcode-dependent enumeration (Alder Lake: InstLatx64 dumps before 2023-06 show neither control):
            # this host's CPUID wins for whether the control exists, and it does not here. RRSBA_CTRL says nothing
            # else, so its 0 stands. BHI_CTRL also marks the long branch history of the part, which microcode does
            # not shorten, so its 0 is not taken as "short history": it becomes unknown (control absent, short
            # loop assumed ineffective).
            if bit == "RRSBA_CTRL":
                mask = edx.register.bit(bit)
                notes.append(f"CPUID.(7,2).EDX.{bit}=0 read on this host wins over the catalog's "
                             f"{model.id if model else ''} (1 with newer microcode): RRSBA_DIS_S does not exist here")
                edx = RegisterFacts(edx.register, edx.value, edx.known, {
                    **edx.sources, bit: f"this host's CPUID: its microcode does not enumerate {bit} (the catalog's "
                                        f"{model.id if model else ''} has it with newer microcode)"},
                    edx.unknown_reason, edx.inferred & ~mask)
            else:
                edx = forget(edx, bit, f"this host's microcode does not enumerate it, so BHI_DIS_S does not exist "
                                       f"here (this host's CPUID wins); the catalog's {model.id if model else ''} "
                                       "has it, so the part's branch history is the long one all the same")
    regs["arch_capabilities"], regs["cpuid_7_2_edx"] = arch, edx
    return CpuFacts(reading.vendor, reading.family, reading.model, reading.stepping, regs,
                    reading.identity_source), notes


def kvm_report(unknowns: list[dict[str, str]]) -> dict[str, Any] | None:
    """What /dev/kvm offers guests here; None (with the reason in `unknowns`) when it cannot be used."""
    from pvmit.kvm.errors import KvmError, KvmUnavailable
    from pvmit.kvm.system import Kvm

    try:
        kvm = Kvm()
        caps = kvm.capabilities()
    except (KvmUnavailable, KvmError) as e:
        unknowns.append({"what": "kvm", "reason": str(e)})
        return None
    with kvm:
        out: dict[str, Any] = {"device": "/dev/kvm", "api_version": 12, "capabilities": caps}
        out["needed_capabilities_present"] = all(
            out["capabilities"][c] for c in ("KVM_CAP_X86_USER_SPACE_MSR", "KVM_CAP_X86_MSR_FILTER"))
        out["force_spec_ctrl"] = (
            "KVM_CAP_FORCE_SPEC_CTRL was never merged (RFC v3 only; its number 236 is KVM_CAP_PRE_FAULT_MEMORY "
            "upstream): pvmit forces IA32_SPEC_CTRL bits from userspace through the MSR filter")
        try:
            entries = kvm.supported_cpuid()
            supported: dict[str, Any] = {}
            for reg in (CPUID_7_0_EDX, CPUID_7_2_EDX, AMD_80000008_EBX, AMD_80000021_EAX, AMD_80000021_ECX,
                        KVM_FEATURES):
                ent = next((x for x in entries if x.function == reg.index and x.index == reg.subleaf), None)
                supported[reg.key] = decode(reg, ent.out(reg.out)).to_json() if ent else None
            out["supported_cpuid"] = supported
        except KvmError as e:
            out["supported_cpuid"] = None
            unknowns.append({"what": "KVM_GET_SUPPORTED_CPUID", "reason": str(e)})
        try:
            features = kvm.msr_feature_index_list()
            out["feature_msrs"] = [f"{i:#x}" for i in features]
            if MSR_IA32_ARCH_CAPABILITIES in features:
                value = kvm.feature_msrs([MSR_IA32_ARCH_CAPABILITIES])[MSR_IA32_ARCH_CAPABILITIES]
                out["arch_capabilities_offered"] = decode(ARCH_CAPABILITIES, value).to_json()
            else:
                out["arch_capabilities_offered"] = None
        except KvmError as e:
            out["feature_msrs"] = None
            out["arch_capabilities_offered"] = None
            unknowns.append({"what": "KVM feature MSRs", "reason": str(e)})
    return out


def nearest_model(catalog: Catalog, facts: CpuFacts) -> dict[str, Any] | None:
    """The catalog model this CPU is, or is closest to, with how close the match is."""
    same_vendor = [m for m in catalog if m.vendor == facts.vendor]
    if not same_vendor:
        return None

    def score(m: CpuModel) -> tuple[int, int, int, int]:
        fam = m.family == facts.family
        mod = fam and facts.model in m.models
        step = mod and (not m.steppings or facts.stepping in m.steppings)
        distance = -min(abs(x - facts.model) for x in m.models) if fam else -0x1000
        return (int(fam), int(mod), int(step), distance)

    best = max(same_vendor, key=score)
    fam, mod, step, _ = score(best)
    match = "exact" if step else "model" if mod else "family" if fam else "vendor"
    return {"id": best.id, "name": best.name, "match": match,
            "reason": f"{facts.vendor} family {facts.family:#x} model {facts.model:#x} stepping {facts.stepping}"
                      f" vs {best.id}: family {best.family:#x} model(s) "
                      f"{', '.join(f'{x:#x}' for x in best.models)} steppings {list(best.steppings) or 'any'}"}


def inspect_host(catalog: Catalog, *, with_kvm: bool = True) -> HostReport:
    """Read everything `pvmit host` reports. Never raises for an unreadable source; it is recorded instead."""
    unknowns: list[dict[str, str]] = []
    cpuid, problems = open_cpuid()
    for p in problems:
        unknowns.append({"what": "cpuid method", "reason": p})
    nearest = None
    if cpuid is None:
        identity: dict[str, Any] = {"vendor": None}
        facts = None
    else:
        identity, reading = read_cpu_facts(cpuid, unknowns)
        nearest = nearest_model(catalog, reading)
        exact = catalog.get(nearest["id"]) if nearest and nearest["match"] == "exact" else None
        facts, notes = reconcile(reading, exact, identity["hypervisor"] is not None)
        unknowns.extend({"what": "reading adjusted", "reason": n} for n in notes)
    try:
        vulns: dict[str, str] | None = read_vulnerabilities()
    except OSError as e:
        vulns = None
        unknowns.append({"what": "vulnerabilities", "reason": f"{VULN_DIR}: {e.strerror or e}"})
    except FileError as e:
        vulns = None
        unknowns.append({"what": "vulnerabilities", "reason": str(e)})
    kvm = kvm_report(unknowns) if with_kvm else None
    return HostReport(identity, facts, unknowns, vulns, kvm, nearest)
