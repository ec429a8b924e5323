"""The BHI policies' and the pool description's marks on the interface, at their edges and in their words: where the
neutral form's pool block may sit, what a configuration from a peer may carry, the read-only registers' faults and
the MSRs a VMM must route, the KVM hint bit, and what the VMM says when a policy leaves BHI to the guest."""

from __future__ import annotations

import re

import pytest

from pvmit.catalog.loader import Catalog
from pvmit.derive import Mitigation
from pvmit.interface import Form, InterfaceConfig, OperatorSettings, VmInterface, check, decide, snapshot
from pvmit.interface.bhi import BhiPolicy
from pvmit.interface.forms import (
    KVM_HINTS_PVMIT_LONG_BHB_BIT,
    MSR_VIRTUAL_POOL_INFO,
    POOL_BLOCK,
    kvm_hint_bits,
    pool_block_problem,
)
from pvmit.interface.policy import can_honour
from pvmit.interface.pooldesc import MAX_ENTRIES, Implementation

POOL = (Implementation("intel", 6, 0x6A, 4, 6), Implementation("intel", 6, 0x8F))
A = BhiPolicy.LONG_UNDER_HYPERVISOR


def exactly(message: str) -> str:
    return f"^{re.escape(message)}$"


def test_where_the_neutral_pool_block_may_sit() -> None:
    assert POOL_BLOCK == 33
    assert pool_block_problem(MSR_VIRTUAL_POOL_INFO, 0x50000002) == ""
    base = 0x40000200
    assert pool_block_problem(base, base + 32) == "the block 0x40000200-0x40000220 overlaps the CTRL MSR"
    assert pool_block_problem(base, base) == "the block 0x40000200-0x40000220 overlaps the CTRL MSR"
    assert pool_block_problem(base, base + 33) == "" and pool_block_problem(base, base - 1) == ""
    assert pool_block_problem(0x4FFFFFF0, 0x40000100) == \
        "the block 0x4ffffff0-0x50000010 overlaps MSR_VIRTUAL_ENUMERATION"
    assert pool_block_problem(0x50000001, 0x40000100) == \
        "the block 0x50000001-0x50000021 reaches a read-only register of the Intel form"
    assert pool_block_problem(0x5FFFFFF0, 0x40000100) == ("the block 0x5ffffff0-0x60000010 reaches outside "
                                                          "0x40000000-0x5fffffff, the block kept for hypervisor "
                                                          "registers")
    assert pool_block_problem(0x5FFFFFDF, 0x40000100) == ""  # its last register is 0x5fffffff


def test_what_a_configuration_may_carry() -> None:
    with pytest.raises(ValueError, match=exactly("pool entries must be Implementation values")):
        InterfaceConfig(Form.NEUTRAL, 3, pool=("intel 6 0x8f",))  # type: ignore[arg-type]
    # the neutral pool block's place matters only where the neutral form offers a pool description
    assert InterfaceConfig(Form.KVM, 3, pool=POOL, neutral_pool_msr=0x50000000).pool == POOL
    assert InterfaceConfig(Form.NEUTRAL, 3, neutral_pool_msr=0x50000000).pool is None
    doc = InterfaceConfig(Form.NEUTRAL, 3, pool=POOL).to_json()
    for bad, message in (({**doc, "pool": "P1"}, "pool must be a list of entries or null"),
                         ({**doc, "pool": [POOL[0].to_json()] * (MAX_ENTRIES + 1)},
                          f"a pool description has 1 to {MAX_ENTRIES} entries, not {MAX_ENTRIES + 1}"),
                         ({**doc, "bhb_long": "yes"}, "bhb_long must be true, false or null")):
        with pytest.raises(ValueError, match=exactly(message)):
            InterfaceConfig.from_json(bad)
    full = InterfaceConfig.from_json({**doc, "pool": [POOL[0].to_json()] * MAX_ENTRIES})
    assert full.pool == (POOL[0],) * MAX_ENTRIES


def test_the_kvm_hint_bit_only_in_the_kvm_form_and_only_when_set() -> None:
    assert kvm_hint_bits(InterfaceConfig(Form.KVM, 1, bhb_long=True)) == 1 << KVM_HINTS_PVMIT_LONG_BHB_BIT
    for config in (InterfaceConfig(Form.KVM, 1, bhb_long=False), InterfaceConfig(Form.KVM, 1),
                   InterfaceConfig(Form.INTEL, 1, bhb_long=True), InterfaceConfig(Form.NEUTRAL, 1, bhb_long=True)):
        assert kvm_hint_bits(config) == 0, config


def test_pool_registers_fault_by_name_and_nothing_past_the_block_is_routed(catalog: Catalog) -> None:
    config = InterfaceConfig(Form.INTEL, 3, pool=POOL)
    vm = VmInterface(config, catalog.get("sapphirerapids").facts, catalog.get("icelake-sp").facts)
    base = MSR_VIRTUAL_POOL_INFO
    assert not vm.wrmsr(0, base, 0) and vm.last_fault == "POOL_INFO is read-only: WRMSR 0x0 refused"
    assert not vm.wrmsr(0, base + 4, 1) and vm.last_fault == "pool description entry 3 is read-only: WRMSR 0x1 refused"
    assert set(range(base, base + POOL_BLOCK)) <= vm.handled_msrs
    assert base + POOL_BLOCK not in vm.handled_msrs and base + POOL_BLOCK + 1 not in vm.handled_msrs
    assert vm.rdmsr(0, base + POOL_BLOCK) is None
    assert vm.last_fault == f"MSR {base + POOL_BLOCK:#x} is not handled by the mitigation interface"


def test_what_the_vmm_says_when_a_policy_leaves_bhi_to_the_guest(catalog: Catalog) -> None:
    spr, icx = catalog.get("sapphirerapids").facts, catalog.get("icelake-sp").facts
    d = decide(spr, None, icx, OperatorSettings(bhi_policy=A))
    (e,) = d.by_design
    assert e.mitigation is Mitigation.BHB_SHORT and e.reason.startswith("short BHB-clearing sequence is ineffective "
                                                                        "here (branch history longer")
    assert e.reason.endswith("); under the BHI policy long-under-hypervisor the guest must run the long loop itself "
                             "and the VMM forces nothing: a guest that still runs the short one is exposed")
    assert "BHI policy long-under-hypervisor: nothing forced for the short BHB-clearing sequence; a guest that runs " \
           "it here is exposed by the policy's design" in d.warnings
    never = "and the BHI policy long-under-hypervisor never forces BHI_DIS_S: the guest must run the long " \
            "BHB-clearing loop itself"
    reported = decide(spr, frozenset({Mitigation.BHB_SHORT}), icx, OperatorSettings(bhi_policy=A))
    (x,) = reported.exposures
    assert x.reason.startswith("short BHB-clearing sequence is ineffective here (") and x.reason.endswith(never)
    ok, why = can_honour(spr, Mitigation.BHB_SHORT, A)
    assert not ok and why.endswith(never)
    vm = VmInterface(InterfaceConfig(Form.NEUTRAL, 0), icx, icx, OperatorSettings(bhi_policy=A))
    verdict = check(snapshot(vm), spr)
    assert verdict.accepted and f"vCPU 0: exposed by the BHI policy's design: {e.reason}" in verdict.warnings


def test_leaving_bhi_to_the_guest_still_forces_what_retpoline_needs(catalog: Catalog) -> None:
    """A Skylake-shown guest that has not reported is assumed to rely on the short loop and on retpoline: under (a)
    the first is left to it, and RRSBA_DIS_S is still forced for the second."""
    spr, skx = catalog.get("sapphirerapids").facts, catalog.get("skylake-sp").facts
    d = decide(spr, None, skx, OperatorSettings(bhi_policy=A))
    assert d.relied == frozenset({Mitigation.BHB_SHORT, Mitigation.RETPOLINE})
    assert [e.mitigation for e in d.by_design] == [Mitigation.BHB_SHORT] and d.exposures == ()
    assert [(f.control.name, f.on, f.why.value) for f in d.forced] == [("RRSBA_DIS_S", True, "assumed from the boot "
                                                                                              "personality")]


def test_the_policy_setting_is_checked() -> None:
    with pytest.raises(ValueError, match=exactly("bhi_policy must be a BhiPolicy, not 'long'")):
        OperatorSettings(bhi_policy="long")  # type: ignore[arg-type]
