"""Is a CPU affected by each vulnerability class whose "not affected" bits a hypervisor may show its guests?

Pure functions over `CpuFacts`, following Linux's bare-metal classification (torvalds/linux@a508cec6
arch/x86/kernel/cpu/common.c cpu_set_bug_bits(), vulnerable_to_rfds(), vulnerable_to_its(), the cpu_vuln_whitelist
and cpu_vuln_blacklist, the latter kept as the CPU's `linux_blacklist` facts). KVM sets a guest's "not affected" bits
from exactly these host bugs (x86.c kvm_get_arch_capabilities: "if (!boot_cpu_has_bug(X86_BUG_ITS)) data |=
ARCH_CAP_ITS_NO" and the like). Every answer is a `Finding` whose `answer` is True when the CPU is affected; a fact
that is unknown, or only inferred and pointing the unsafe way, is taken as "affected" and listed in `assumed`.
"""

from __future__ import annotations

from collections.abc import Callable

from pvmit.catalog.facts import CpuFacts, Fact
from pvmit.derive import Finding

_AMD_LIKE = ("amd", "hygon")


def _no_bit(cpu: CpuFacts, reg: str, bit: str) -> Fact:
    """A "not affected" bit: only a sourced 1 counts (an inferred 1 points the unsafe way)."""
    f = cpu.fact(reg, bit)
    if f.inferred and f.value:
        return Fact(f.register, f.bit, None, f"only inferred ({f.source})")
    return f


def _listed(cpu: CpuFacts, flag: str) -> Fact:
    """Membership in Linux's cpu_vuln_blacklist: an inferred 0 is not relied on."""
    f = cpu.fact("linux_blacklist", flag)
    if f.inferred and f.value is False:
        return Fact(f.register, f.bit, None, f"only inferred ({f.source})")
    return f


def _assumed(*facts: Fact) -> tuple[str, ...]:
    return tuple(f"{f.register}.{f.bit}" for f in facts if not f.known)


def _not_on_amd(name: str, whitelist: str) -> Callable[[CpuFacts], Finding | None]:
    def check(cpu: CpuFacts) -> Finding | None:
        if cpu.vendor in _AMD_LIKE:
            return Finding(False, f"{cpu.vendor.upper()} is not affected by {name} ({whitelist})")
        return None
    return check


def _no_bit_rule(cpu: CpuFacts, name: str, reg: str, bit: str) -> Finding:
    f = _no_bit(cpu, reg, bit)
    if f.value:
        return Finding(False, f"not affected by {name}: {f.cite()}")
    if f.value is None:
        return Finding(True, f"assumed affected by {name}: {f.cite()}", _assumed(f))
    return Finding(True, f"affected by {name}: {f.cite()}")


def meltdown(cpu: CpuFacts) -> Finding:
    return _not_on_amd("Meltdown", "common.c cpu_vuln_whitelist NO_MELTDOWN")(cpu) or \
        _no_bit_rule(cpu, "Meltdown", "arch_capabilities", "RDCL_NO")


def l1tf(cpu: CpuFacts) -> Finding:
    """X86_BUG_L1TF follows Meltdown on Intel (cpu_set_bug_bits returns before L1TF when RDCL_NO)."""
    return _not_on_amd("L1TF", "common.c cpu_vuln_whitelist NO_L1TF")(cpu) or \
        _no_bit_rule(cpu, "L1TF", "arch_capabilities", "RDCL_NO")


def mds(cpu: CpuFacts) -> Finding:
    return _not_on_amd("MDS", "common.c cpu_vuln_whitelist NO_MDS")(cpu) or \
        _no_bit_rule(cpu, "MDS", "arch_capabilities", "MDS_NO")


def taa(cpu: CpuFacts) -> Finding:
    """X86_BUG_TAA needs TSX; pvmit does not know whether RTM is enabled, so only TAA_NO clears it on Intel."""
    return _not_on_amd("TAA", "AMD parts have no TSX, and TAA needs RTM or TSX_CTRL (cpu_set_bug_bits)")(cpu) or \
        _no_bit_rule(cpu, "TAA", "arch_capabilities", "TAA_NO")


def itlb_multihit(cpu: CpuFacts) -> Finding:
    return _not_on_amd("iTLB multihit", "common.c cpu_vuln_whitelist NO_ITLB_MULTIHIT")(cpu) or \
        _no_bit_rule(cpu, "iTLB multihit", "arch_capabilities", "PSCHANGE_MC_NO")


def ssb(cpu: CpuFacts) -> Finding:
    if cpu.vendor in _AMD_LIKE:
        return _no_bit_rule(cpu, "Speculative Store Bypass", "cpuid_80000008_ebx", "SSB_NO")
    return _no_bit_rule(cpu, "Speculative Store Bypass", "arch_capabilities", "SSB_NO")


def mmio(cpu: CpuFacts) -> Finding:
    """X86_BUG_MMIO_STALE_DATA: on the blacklist and not immune (FBSDP_NO, PSDP_NO and SBDR_SSDP_NO all set)."""
    if found := _not_on_amd("MMIO Stale Data", "common.c cpu_vuln_whitelist NO_MMIO")(cpu):
        return found
    immune = [_no_bit(cpu, "arch_capabilities", b) for b in ("FBSDP_NO", "PSDP_NO", "SBDR_SSDP_NO")]
    if all(f.value for f in immune):
        return Finding(False, "immune to MMIO Stale Data: FBSDP_NO, PSDP_NO and SBDR_SSDP_NO are all 1")
    listed = _listed(cpu, "MMIO")
    if listed.value is False:
        return Finding(False, f"not affected by MMIO Stale Data: {listed.cite()}")
    if listed.value is None:
        return Finding(True, f"assumed affected by MMIO Stale Data: {listed.cite()}", _assumed(listed))
    return Finding(True, f"affected by MMIO Stale Data: {listed.cite()}")


def retbleed(cpu: CpuFacts) -> Finding:
    """X86_BUG_RETBLEED: listed, or RSBA shown, unless BTC_NO (AMD's Branch Type Confusion bit)."""
    if cpu.vendor in _AMD_LIKE:
        btc_no = _no_bit(cpu, "cpuid_80000008_ebx", "BTC_NO")
        if btc_no.value:
            return Finding(False, f"not affected by Retbleed/BTC: {btc_no.cite()}")
    listed = _listed(cpu, "RETBLEED")
    rsba = cpu.fact("arch_capabilities", "RSBA") if cpu.vendor == "intel" else None
    if listed.value or (rsba is not None and rsba.value):
        return Finding(True, f"affected by Retbleed: {listed.cite()}" + (f", {rsba.cite()}" if rsba else ""))
    if listed.value is None or (rsba is not None and rsba.value is None):
        facts = (listed,) + ((rsba,) if rsba is not None else ())
        return Finding(True, f"assumed affected by Retbleed: {', '.join(f.cite() for f in facts)}", _assumed(*facts))
    return Finding(False, f"not affected by Retbleed: {listed.cite()}" + (f", {rsba.cite()}" if rsba else ""))


def _listed_rule(cpu: CpuFacts, name: str, flag: str, no_reg: str | None = None, no_bit: str = "") -> Finding:
    if no_reg is not None:
        no = _no_bit(cpu, no_reg, no_bit)
        if no.value:
            return Finding(False, f"not affected by {name}: {no.cite()}")
    listed = _listed(cpu, flag)
    if listed.value is None:
        return Finding(True, f"assumed affected by {name}: {listed.cite()}", _assumed(listed))
    return Finding(bool(listed.value), f"{'' if listed.value else 'not '}affected by {name}: {listed.cite()}")


def gds(cpu: CpuFacts) -> Finding:
    """X86_BUG_GDS: listed and not GDS_NO (microcode that mitigates GDS is a host setting pvmit cannot see)."""
    if cpu.vendor in _AMD_LIKE:
        return Finding(False, "AMD parts are not on Linux's GDS list")
    return _listed_rule(cpu, "GDS", "GDS", "arch_capabilities", "GDS_NO")


def rfds(cpu: CpuFacts) -> Finding:
    """vulnerable_to_rfds(): RFDS_NO clears it; RFDS_CLEAR (affected, with the microcode) or the list sets it."""
    if cpu.vendor in _AMD_LIKE:
        return Finding(False, "AMD parts are not on Linux's RFDS list")
    no = _no_bit(cpu, "arch_capabilities", "RFDS_NO")
    if no.value:
        return Finding(False, f"not affected by RFDS: {no.cite()}")
    clear = cpu.fact("arch_capabilities", "RFDS_CLEAR")
    if clear.value:
        return Finding(True, f"affected by RFDS (with the clearing microcode): {clear.cite()}")
    return _listed_rule(cpu, "RFDS", "RFDS")


def its(cpu: CpuFacts) -> Finding:
    """vulnerable_to_its(): not Intel, ITS_NO or BHI_CTRL clear it ("None of the affected CPUs have BHI_CTRL");
    otherwise the list decides. ITS_NATIVE_ONLY parts are affected too (intra-mode attacks inside the guest)."""
    if cpu.vendor != "intel":
        return Finding(False, f"{cpu.vendor.upper()} is not affected by ITS (vulnerable_to_its: Intel only)")
    no = _no_bit(cpu, "arch_capabilities", "ITS_NO")
    if no.value:
        return Finding(False, f"not affected by ITS: {no.cite()}")
    bhi_ctrl = _no_bit(cpu, "cpuid_7_2_edx", "BHI_CTRL")
    if bhi_ctrl.value:
        return Finding(False, f"not affected by ITS: {bhi_ctrl.cite()} ('None of the affected CPUs have BHI_CTRL')")
    return _listed_rule(cpu, "ITS", "ITS")


def tsa(cpu: CpuFacts) -> Finding:
    """X86_BUG_TSA (AMD): not when both TSA_SQ_NO and TSA_L1_NO are shown; otherwise the list decides."""
    if cpu.vendor not in _AMD_LIKE:
        return Finding(False, "TSA is an AMD vulnerability")
    sq, l1 = _no_bit(cpu, "cpuid_80000021_ecx", "TSA_SQ_NO"), _no_bit(cpu, "cpuid_80000021_ecx", "TSA_L1_NO")
    if sq.value and l1.value:
        return Finding(False, f"not affected by TSA: {sq.cite()}, {l1.cite()}")
    return _listed_rule(cpu, "TSA", "TSA")


def srso(cpu: CpuFacts) -> Finding:
    if cpu.vendor not in _AMD_LIKE:
        return Finding(False, "SRSO is an AMD/Hygon vulnerability")
    return _listed_rule(cpu, "SRSO", "SRSO", "cpuid_80000021_eax", "SRSO_NO")


def pbrsb(cpu: CpuFacts) -> Finding:
    """X86_BUG_EIBRS_PBRSB: eIBRS parts without PBRSB_NO (AMD/Hygon are on the NO_EIBRS_PBRSB whitelist)."""
    if found := _not_on_amd("PBRSB", "common.c cpu_vuln_whitelist NO_EIBRS_PBRSB")(cpu):
        return found
    no = _no_bit(cpu, "arch_capabilities", "PBRSB_NO")
    if no.value:
        return Finding(False, f"not affected by PBRSB: {no.cite()}")
    eibrs = cpu.fact("arch_capabilities", "IBRS_ALL")
    if eibrs.value is False and not eibrs.inferred:
        return Finding(False, f"not affected by PBRSB (an eIBRS bug): {eibrs.cite()}")
    if no.value is None:
        return Finding(True, f"assumed affected by PBRSB: {no.cite()}", _assumed(no))
    return Finding(True, f"affected by PBRSB: {no.cite()}, {eibrs.cite()}")


BUGS: dict[str, Callable[[CpuFacts], Finding]] = {
    "meltdown": meltdown, "l1tf": l1tf, "mds": mds, "taa": taa, "itlb_multihit": itlb_multihit, "ssb": ssb,
    "mmio": mmio, "retbleed": retbleed, "gds": gds, "rfds": rfds, "its": its, "tsa": tsa, "srso": srso,
    "pbrsb": pbrsb,
}
"""Every class the pool rule asks about, by name."""


def affected(cpu: CpuFacts, bug: str) -> Finding:
    """Whether `cpu` is affected by `bug` (a key of BUGS); KeyError names the known classes."""
    try:
        return BUGS[bug](cpu)
    except KeyError:
        raise KeyError(f"no vulnerability class {bug!r}; known: {', '.join(BUGS)}") from None
