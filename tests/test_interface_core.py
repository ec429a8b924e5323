"""The backend-facing events of the protocol core (what a VMM calls besides guest accesses): taking over a core,
moving it to another host, syncing the guest's IA32_SPEC_CTRL, the VM's combined reliance, and the neutral form's
CPUID leaves."""

from __future__ import annotations

import struct

from pvmit.catalog.loader import Catalog
from pvmit.derive import Mitigation
from pvmit.interface import Form, InterfaceConfig, OperatorSettings, VmInterface, decide
from pvmit.interface.forms import NEUTRAL_SIGNATURE, CpuidLeaf, neutral_leaves
from pvmit.x86.bits import SpecCtrl

R_DIS, B_DIS = int(SpecCtrl.RRSBA_DIS_S), int(SpecCtrl.BHI_DIS_S)
CTRL = 0x50000002


def vm(catalog: Catalog, host: str = "sapphirerapids", vcpus: int = 2) -> VmInterface:
    return VmInterface(InterfaceConfig(Form.INTEL, 3), catalog.get(host).facts, catalog.get("icelake-sp").facts,
                       OperatorSettings(unreported="trust"), vcpus)


def test_current_effects_give_every_vcpu_and_drop_queued_ones(catalog: Catalog) -> None:
    v = vm(catalog, vcpus=3)
    v.take_effects()
    v.wrmsr(1, CTRL, 2)  # queues an effect for vCPU 1
    effects = v.current_effects()
    assert [e.vcpu for e in effects] == [0, 1, 2]
    assert [e.mask for e in effects] == [0, R_DIS, 0] and [e.intercept for e in effects] == [False, True, False]
    assert v.take_effects() == [], "nothing queued is left to apply twice"


def test_set_host_redecides_every_vcpu(catalog: Catalog) -> None:
    v = vm(catalog, host="icelake-sp")
    v.wrmsr(0, CTRL, 2)
    v.wrmsr(1, CTRL, 1)
    assert [c.spec.mask for c in v.vcpus] == [0, 0]
    v.take_effects()
    v.set_host(catalog.get("sapphirerapids").facts)
    assert v.host is catalog.get("sapphirerapids").facts
    assert [c.spec.mask for c in v.vcpus] == [R_DIS, B_DIS]
    assert [e.vcpu for e in v.take_effects()] == [0, 1]
    # a core that decides through a table made for its old host answers for the new one with the real policy
    icx = catalog.get("icelake-sp").facts

    def only_icx(host, *rest):  # type: ignore[no-untyped-def]
        assert host is icx, "asked about a host it was not made for"
        return decide(host, *rest)

    v2 = VmInterface(InterfaceConfig(Form.INTEL, 3), icx, icx, OperatorSettings(unreported="trust"), 1,
                     decider=only_icx)
    v2.wrmsr(0, CTRL, 2)
    v2.set_host(catalog.get("sapphirerapids").facts)
    assert v2.vcpus[0].spec.mask == R_DIS
    same = catalog.get("sapphirerapids").facts
    v2.set_host(same)  # the same host again: decided again, nothing changes
    assert v2.vcpus[0].spec.mask == R_DIS


def test_reliance_is_the_union_of_the_reports(catalog: Catalog) -> None:
    v = vm(catalog, vcpus=3)
    assert v.reliance() is None
    v.wrmsr(0, CTRL, 0)
    assert v.reliance() == frozenset()
    v.wrmsr(1, CTRL, 2)
    v.wrmsr(2, CTRL, 1)
    assert v.reliance() == frozenset(Mitigation)


def test_sync_takes_the_guest_value_as_written(catalog: Catalog) -> None:
    v = vm(catalog)
    v.sync_guest_spec_ctrl(0, 0x441)
    assert v.vcpus[0].spec.guest == 0x441 and v.rdmsr(0, 0x48) == 0x441
    v.sync_guest_spec_ctrl(1, (1 << 64) | 1)
    assert v.vcpus[1].spec.guest == 1


def test_neutral_leaves() -> None:
    sig, info, pool = neutral_leaves(InterfaceConfig(Form.NEUTRAL, 2, neutral_base=0x40000200,
                                                     neutral_msr=0x40000210))
    b, c, d = struct.unpack("<3I", NEUTRAL_SIGNATURE)
    assert sig == CpuidLeaf(0x40000200, 0, 0x40000202, b, c, d)
    assert info == CpuidLeaf(0x40000201, 0, 2, 0x40000210, 2, 0)
    assert pool == CpuidLeaf(0x40000202, 0, 0, 0, 0, 0)  # no pool description offered
    assert struct.pack("<3I", sig.ebx, sig.ecx, sig.edx) == b"VirtMitigCtl"


def test_config_and_settings_json(catalog: Catalog) -> None:
    import pytest

    cfg = InterfaceConfig(Form.NEUTRAL, 1, neutral_base=0x40000300, neutral_msr=0x40000310)
    doc = cfg.to_json()
    assert doc == {"form": "neutral", "supported": 1, "neutral_base": 0x40000300, "neutral_msr": 0x40000310,
                   "bhb_long": None, "pool": None, "neutral_pool_msr": 0x50000010}
    assert InterfaceConfig.from_json(doc) == cfg
    assert InterfaceConfig.from_json({"form": "kvm", "supported": 2}) == InterfaceConfig(Form.KVM, 2)
    assert OperatorSettings.from_json({}) == OperatorSettings()
    assert OperatorSettings.from_json({"force_off": ["SSBD"]}) == OperatorSettings(force_off=int(SpecCtrl.SSBD))
    with pytest.raises(ValueError, match="^expected a list of IA32_SPEC_CTRL bit names, got 'SSBD'$"):
        OperatorSettings.from_json({"force_on": "SSBD"})
    with pytest.raises(ValueError, match="^SSBD\\+RRSBA_DIS_S cannot be forced both on and off$"):
        OperatorSettings(force_on=R_DIS | int(SpecCtrl.SSBD) | B_DIS, force_off=R_DIS | int(SpecCtrl.SSBD) | 1)


def test_msr_access_edges(catalog: Catalog) -> None:
    v = VmInterface(InterfaceConfig(Form.INTEL, 3), catalog.get("icelake-sp").facts,
                    catalog.get("icelake-sp").facts)
    assert len(v.vcpus) == 1, "one vCPU unless told otherwise"
    assert not v.wrmsr(0, 0x1234, 0) and v.last_fault == "MSR 0x1234 is not handled by the mitigation interface"
    assert v.rdmsr(0, 0x1234) is None
    assert not v.wrmsr(0, 0x48, (1 << 64) - 1) and "not enumerated" in v.last_fault, "the largest value is 64-bit"
    assert not v.wrmsr(0, 0x48, 1 << 64) and v.last_fault == "WRMSR 0x48: 0x10000000000000000 is not a 64-bit value"
    from pvmit.vmm.personality import resolve

    no_caps = resolve(catalog, "icelake-server-v2").facts  # QEMU's Icelake-Server-v2: no IA32_ARCH_CAPABILITIES
    v = VmInterface(InterfaceConfig(Form.KVM, 3), catalog.get("icelake-sp").facts, no_caps)
    assert v.rdmsr(0, 0x10A) is None
    assert v.last_fault == "IA32_ARCH_CAPABILITIES is not enumerated by the guest's CPU personality"


def test_fault_reasons_name_the_register(catalog: Catalog) -> None:
    """What the VMM logs with each #GP it injects: which register, and why."""
    from pvmit.interface.forms import MSR_KVM_PVMIT_MITIGATION

    v = VmInterface(InterfaceConfig(Form.INTEL, 3), catalog.get("sapphirerapids").facts,
                    catalog.get("sapphirerapids").facts)
    for index, name in ((0x50000000, "MSR_VIRTUAL_ENUMERATION"), (0x50000001, "MSR_VIRTUAL_MITIGATION_ENUM"),
                        (0x10A, "IA32_ARCH_CAPABILITIES")):
        assert not v.wrmsr(0, index, 1) and v.last_fault == f"{name} is read-only: WRMSR 0x1 refused"
    assert v.rdmsr(0, MSR_KVM_PVMIT_MITIGATION) is None
    assert v.last_fault == "MSR 0x4b564d80 does not exist for this VM: it uses the intel form"
    k = VmInterface(InterfaceConfig(Form.KVM, 3), catalog.get("sapphirerapids").facts,
                    catalog.get("sapphirerapids").facts)
    for index in (0x50000000, 0x50000001, 0x50000002):
        assert k.rdmsr(0, index) is None and not k.wrmsr(0, index, 0)
        assert k.last_fault == (f"MSR {index:#x} does not exist for this VM: it uses the kvm form "
                                "(IA32_ARCH_CAPABILITIES bit 63 is clear)")


def test_effects_carry_the_decision(catalog: Catalog) -> None:
    v = vm(catalog)
    v.take_effects()
    v.wrmsr(0, CTRL, 2)
    (e,) = v.take_effects()
    assert e.decision is v.vcpus[0].decision and e.decision.mask == R_DIS


def test_trusting_an_unreported_guest_names_every_mitigation_at_risk(catalog: Catalog) -> None:
    d = decide(catalog.get("sapphirerapids").facts, None, catalog.get("skylake-sp").facts,
               OperatorSettings(unreported="trust"))
    assert d.mask == 0
    (w,) = d.warnings
    assert w.startswith("guest has not reported and the operator trusts it: nothing is forced, although short "
                        "BHB-clearing sequence, retpoline would be ineffective here (boot personality suggests ")


def test_neutral_msr_and_base_bounds() -> None:
    import pytest

    from pvmit.interface.forms import neutral_msr_problem

    assert neutral_msr_problem(0x3FFF_FFFF) == "outside 0x40000000-0x5fffffff, the block kept for hypervisor registers"
    assert neutral_msr_problem(0x6000_0000) == neutral_msr_problem(0x3FFF_FFFF)
    for index in (0x4000_0000, 0x4000_0001, 0x4000_00FF):
        assert neutral_msr_problem(index) == "Hyper-V's synthetic MSR range (0x40000000-0x400000ff)"
    assert neutral_msr_problem(0x4000_0100) == ""
    for index in (0x4B56_4D00, 0x4B56_4D01, 0x4B56_4DFF):
        assert neutral_msr_problem(index) == "KVM's paravirtual MSR range (0x4b564d00-0x4b564dff)"
    assert neutral_msr_problem(0x4B56_4CFF) == neutral_msr_problem(0x4B56_4E00) == ""
    assert neutral_msr_problem(0x5000_0000) == "a read-only register of the Intel form"
    assert neutral_msr_problem(0x5FFF_FFFF) == neutral_msr_problem(0x5000_0002) == ""
    for base in (0x4000_0000, 0x4000_FF00):
        assert InterfaceConfig(Form.NEUTRAL, 0, neutral_base=base).neutral_base == base
    for base in (0x3FFF_FF00, 0x4001_0000, 0x4000_0101):
        with pytest.raises(ValueError, match=f"^neutral_base {base:#x} is not a 0x100-aligned base in "
                                             "0x40000000-0x4000ff00$"):
            InterfaceConfig(Form.NEUTRAL, 0, neutral_base=base)


def test_construction_and_arch_caps(catalog: Catalog) -> None:
    import pytest

    spr = catalog.get("sapphirerapids").facts
    with pytest.raises(ValueError, match="^a VM has at least one vCPU$"):
        VmInterface(InterfaceConfig(Form.INTEL, 3), spr, spr, vcpus=0)
    v = VmInterface(InterfaceConfig(Form.KVM, 3), spr, spr)
    assert v.last_fault == ""
    shown = spr.reg("arch_capabilities").value
    assert v.rdmsr(0, 0x10A) == shown & ~(1 << 63), "the kvm form shows the personality's bits, bit 63 clear"
    assert VmInterface(InterfaceConfig(Form.INTEL, 3), spr, spr).rdmsr(0, 0x10A) == shown | 1 << 63


def test_assumed_reliance_and_operator_reasons(catalog: Catalog) -> None:
    from pvmit.interface.policy import assumed_reliance

    relied, why = assumed_reliance(catalog.get("sapphirerapids").facts)
    assert relied == frozenset() and why.startswith("boot personality suggests nothing (")
    relied, why = assumed_reliance(catalog.get("skylake-sp").facts)
    assert why.startswith("boot personality suggests bhb-short, retpoline (")
    d = decide(catalog.get("sapphirerapids").facts, frozenset(), catalog.get("sapphirerapids").facts,
               OperatorSettings(force_on=B_DIS, force_off=R_DIS))
    assert [f.reason for f in d.forced] == ["operator forces RRSBA_DIS_S off", "operator forces BHI_DIS_S on"]


def test_decisions_name_the_facts_they_assumed(catalog: Catalog) -> None:
    srf = catalog.get("sierraforest").facts  # RRSBA unknown: retpoline assumed ineffective
    d = decide(srf, frozenset({Mitigation.RETPOLINE}), srf)
    assert "arch_capabilities.RRSBA" in d.assumed and len(set(d.assumed)) == len(d.assumed)


def test_each_released_control_gives_its_own_reason(catalog: Catalog) -> None:
    import json

    from pvmit.interface import check, snapshot

    v = vm(catalog, vcpus=1)
    v.wrmsr(0, CTRL, 3)
    verdict = check(json.loads(json.dumps(snapshot(v))), catalog.get("icelake-sp").facts)
    released = {w.split(":")[1].strip(): w for w in verdict.warnings if "no longer forced" in w}
    assert released["RRSBA_DIS_S is no longer forced"].split("forced: ")[1].startswith("retpoline: effective here")
    assert released["BHI_DIS_S is no longer forced"].split("forced: ")[1].startswith(
        "short BHB-clearing sequence: effective here")
