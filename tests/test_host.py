"""`pvmit host` on this machine, for real."""

from __future__ import annotations

import json
import os

import pytest

from pvmit.catalog.facts import CpuFacts, RegisterFacts
from pvmit.host.cpuid import DevCpuid, InstructionCpuid, family_model_stepping, vendor_string
from pvmit.host.msr import MsrUnreadable, read_msr
from pvmit.x86.registers import REGISTERS


def test_host_json_shape(cli) -> None:  # type: ignore[no-untyped-def]
    r = cli("host", "--json")
    assert r.code == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["schema"] == "pvmit.host/1"
    assert set(doc) >= {"identity", "facts", "derived", "can_force", "ineffective_here", "nearest_model",
                        "vulnerabilities", "kvm", "unknowns"}
    ident = doc["identity"]
    assert ident["vendor_string"] in ("GenuineIntel", "AuthenticAMD", "HygonGenuine")
    assert ident["family"] > 0 and ident["signature"] != "0x00000000" and ident["cpuid_method"]
    regs = doc["facts"]["registers"]
    assert set(regs) == {"arch_capabilities", "cpuid_7_0_edx", "cpuid_7_2_edx", "cpuid_80000008_ebx",
                         "cpuid_80000021_eax", "cpuid_80000021_ecx", "linux_blacklist"}
    for r_ in regs.values():  # each is either read in full or unknown with a reason
        assert r_["all_known"] or r_["unknown_reason"]
    for key in ("retpoline_effective", "bhb_short_effective"):
        assert isinstance(doc["derived"][key]["answer"], bool) and doc["derived"][key]["reason"]
    assert all(isinstance(u["reason"], str) and u["reason"] for u in doc["unknowns"])
    if os.path.exists("/dev/kvm"):
        assert doc["kvm"]["api_version"] == 12
        assert "KVM_CAP_X86_MSR_FILTER" in doc["kvm"]["capabilities"]


def test_host_text(cli) -> None:  # type: ignore[no-untyped-def]
    r = cli("host", "--no-kvm")
    assert r.code == 0 and "Host CPU" in r.stdout and "BHI_DIS_S available here" in r.stdout


def test_cpuid_instruction_agrees_with_the_kernel() -> None:
    ins = InstructionCpuid()
    vendor = vendor_string(ins)
    assert vendor in ("GenuineIntel", "AuthenticAMD", "HygonGenuine")
    if not os.path.exists("/dev/cpu/0/cpuid"):
        pytest.skip("/dev/cpu/0/cpuid missing (cpuid module not loaded): nothing to compare with")
    dev = DevCpuid(0)
    assert vendor_string(dev) == vendor
    # leaf 1 EAX (signature) is the same on every CPU of a machine; leaf 0 entirely
    assert ins(0) == dev(0) and ins(1)[0] == dev(1)[0]


def test_family_model_stepping_decoding() -> None:
    assert family_model_stepping(0x00A00F11) == (0x19, 0x01, 1)  # AMD Milan
    assert family_model_stepping(0x00050657) == (6, 0x55, 7)  # Cascade Lake
    assert family_model_stepping(0x000806F8) == (6, 0x8F, 8)  # Sapphire Rapids


def test_msr_read_errors_are_explained() -> None:
    if os.path.exists("/dev/cpu/0/msr"):
        try:
            read_msr(0x10)
        except MsrUnreadable:
            pass
        with pytest.raises(MsrUnreadable, match="not implemented|refused|permission"):
            read_msr(0xDEAD0000)
    else:
        with pytest.raises(MsrUnreadable, match="msr module is not loaded"):
            read_msr(0x10A)


def _reading(**regs: int) -> CpuFacts:
    """A live reading as read_cpu_facts makes it: the registers read, and Linux's lists for the identity."""
    from pvmit.catalog.facts import CpuFacts
    from pvmit.catalog.linux_lists import blacklist_facts

    return CpuFacts("intel", 6, 0x8F, 8, {"linux_blacklist": blacklist_facts("intel", 6, [0x8F], [8]),
                                          **{k: RegisterFacts.exact(REGISTERS[k], v, "test reading")
                                             for k, v in regs.items()}})


def test_reconcile_does_not_trust_unsafe_zeros(catalog) -> None:  # type: ignore[no-untyped-def]
    from pvmit.derive import bhb_short_effective, control_available, retpoline_effective
    from pvmit.host.inspect import reconcile
    from pvmit.x86.bits import ArchCapabilities as AC
    from pvmit.x86.bits import SpecCtrl

    # an SPR whose microcode enumerates neither RRSBA nor BHI_CTRL
    spr = _reading(arch_capabilities=int(AC.IBRS_ALL), cpuid_7_2_edx=0)
    raw_says = retpoline_effective(spr).answer, bhb_short_effective(spr).answer
    assert raw_says == (True, True), "the raw reading alone would call both safe"
    fixed, notes = reconcile(spr, catalog.get("sapphirerapids"), under_hypervisor=False)
    assert not retpoline_effective(fixed).answer and "catalog sapphirerapids" in retpoline_effective(fixed).reason
    assert not bhb_short_effective(fixed).answer and bhb_short_effective(fixed).assumed
    assert not control_available(fixed, SpecCtrl.BHI_DIS_S).answer  # this microcode really lacks it
    assert [n.split(":")[0].split(" ")[0] for n in notes] == [
        "IA32_ARCH_CAPABILITIES.RRSBA", "CPUID.(7,2).EDX.RRSBA_CTRL=0", "CPUID.(7,2).EDX.BHI_CTRL"]
    # microcode-dependent enumeration: this host's CPUID wins for whether the controls exist
    assert fixed.fact("cpuid_7_2_edx", "RRSBA_CTRL").value is False
    assert "this host's CPUID" in fixed.fact("cpuid_7_2_edx", "RRSBA_CTRL").source
    assert not control_available(fixed, SpecCtrl.RRSBA_DIS_S).answer
    assert not control_available(fixed, SpecCtrl.RRSBA_DIS_S).assumed  # read, not assumed
    # with no catalog model: RRSBA unknown on an eIBRS part; controls hidden by a hypervisor become unknown
    alone, _ = reconcile(spr, None, under_hypervisor=True)
    assert alone.fact("arch_capabilities", "RRSBA").value is None
    assert alone.fact("cpuid_7_2_edx", "BHI_CTRL").value is None
    # ones are trusted, and AMD readings are left alone
    good = _reading(arch_capabilities=int(AC.IBRS_ALL | AC.RRSBA), cpuid_7_2_edx=0x14)
    assert reconcile(good, None, under_hypervisor=True)[0] == good


def test_live_cpuid_wins_for_microcode_dependent_controls(catalog) -> None:  # type: ignore[no-untyped-def]
    """Alder Lake enumerates RRSBA_CTRL and BHI_CTRL only with microcode from 2023 on (catalog-corrections.md): a real
    host's CPUID decides whether the controls exist, whatever the catalog says; the short loop stays ineffective."""
    from pvmit.catalog.facts import CpuFacts
    from pvmit.catalog.linux_lists import blacklist_facts
    from pvmit.derive import bhb_short_effective, control_available
    from pvmit.host.inspect import reconcile
    from pvmit.x86.bits import ArchCapabilities as AC
    from pvmit.x86.bits import SpecCtrl

    def adl(edx72: int) -> CpuFacts:
        return CpuFacts("intel", 6, 0x97, 2, {
            "linux_blacklist": blacklist_facts("intel", 6, [0x97], [2]),
            "arch_capabilities": RegisterFacts.exact(REGISTERS["arch_capabilities"], int(AC.IBRS_ALL | AC.RRSBA), "t"),
            "cpuid_7_2_edx": RegisterFacts.exact(REGISTERS["cpuid_7_2_edx"], edx72, "t")})

    model = catalog.get("alderlake")
    assert "microcode" in model.notes
    old, _ = reconcile(adl(0), model, under_hypervisor=False)
    assert not control_available(old, SpecCtrl.RRSBA_DIS_S).answer
    assert not control_available(old, SpecCtrl.BHI_DIS_S).answer
    assert not bhb_short_effective(old).answer
    new, notes = reconcile(adl(0x14), model, under_hypervisor=False)
    assert control_available(new, SpecCtrl.RRSBA_DIS_S).answer and control_available(new, SpecCtrl.BHI_DIS_S).answer
    assert not notes
