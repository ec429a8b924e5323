"""IA32_SPEC_CTRL as a guest sees it: every bit its personality enumerates can be written and read back, every other
bit raises #GP, and a bit the operator forces one way stays that way in effect whatever the guest writes."""

from __future__ import annotations

import pytest

from pvmit.catalog.facts import CpuFacts
from pvmit.catalog.loader import Catalog, load_catalog
from pvmit.interface import Form, InterfaceConfig, OperatorSettings, VmInterface
from pvmit.interface.spec_ctrl import SpecCtrlShadow, guest_writable
from pvmit.vmm.personality import builtin_templates
from pvmit.x86.bits import SpecCtrl

MSR_SPEC_CTRL = 0x48
RRSBA_DIS_S, BHI_DIS_S, IBRS = int(SpecCtrl.RRSBA_DIS_S), int(SpecCtrl.BHI_DIS_S), int(SpecCtrl.IBRS)

# The enumeration, written out again from the SDM and Linux cpufeatures.h by bit number (not from pvmit.x86):
# (register, enumeration bit) -> IA32_SPEC_CTRL bits it makes writable.
ENUMERATES: dict[tuple[str, int], int] = {
    ("cpuid_7_0_edx", 26): 1 << 0,        # X86_FEATURE_SPEC_CTRL (18*32+26): IBRS
    ("cpuid_7_0_edx", 27): 1 << 1,        # X86_FEATURE_INTEL_STIBP (18*32+27): STIBP
    ("cpuid_7_0_edx", 31): 1 << 2,        # X86_FEATURE_SPEC_CTRL_SSBD (18*32+31): SSBD
    ("cpuid_7_2_edx", 0): 1 << 7,         # PSFD
    ("cpuid_7_2_edx", 1): 3 << 3,         # IPRED_CTRL: IPRED_DIS_U, IPRED_DIS_S
    ("cpuid_7_2_edx", 2): 3 << 5,         # RRSBA_CTRL: RRSBA_DIS_U, RRSBA_DIS_S
    ("cpuid_7_2_edx", 3): 1 << 8,         # DDPD_U
    ("cpuid_7_2_edx", 4): 1 << 10,        # BHI_CTRL: BHI_DIS_S
    ("cpuid_80000008_ebx", 14): 1 << 0,   # X86_FEATURE_AMD_IBRS (13*32+14)
    ("cpuid_80000008_ebx", 15): 1 << 1,   # X86_FEATURE_AMD_STIBP (13*32+15)
    ("cpuid_80000008_ebx", 24): 1 << 2,   # X86_FEATURE_AMD_SSBD (13*32+24)
    ("cpuid_80000008_ebx", 28): 1 << 7,   # X86_FEATURE_AMD_PSFD (13*32+28)
}


def enumerated(p: CpuFacts) -> int:
    bits = 0
    for (reg, bit), spec in ENUMERATES.items():
        rf = p.registers.get(reg)
        if rf is not None and rf.value >> bit & 1:
            bits |= spec
    return bits


def personalities() -> list[tuple[str, CpuFacts]]:
    catalog = load_catalog()
    return [(m.id, m.facts) for m in catalog] + [(n, t.facts) for n, t in builtin_templates(catalog).items()]


PERSONALITIES = personalities()


def vm_for(personality: CpuFacts, host: CpuFacts | None = None,
           settings: OperatorSettings = OperatorSettings(unreported="trust"), supported: int = 0) -> VmInterface:
    return VmInterface(InterfaceConfig(Form.INTEL, supported), host or personality, personality, settings)


def test_the_personalities_cover_the_new_controls() -> None:
    with_rrsba = {n for n, p in PERSONALITIES if enumerated(p) & RRSBA_DIS_S}
    with_bhi = {n for n, p in PERSONALITIES if enumerated(p) & BHI_DIS_S}
    assert {"sapphirerapids", "graniterapids", "alderlake"} <= with_rrsba
    assert {"sapphirerapids", "alderlake", "clearwaterforest"} <= with_bhi


@pytest.mark.parametrize("name,p", PERSONALITIES, ids=[n for n, _ in PERSONALITIES])
def test_every_enumerated_bit_is_writable_and_reads_back(name: str, p: CpuFacts) -> None:
    expected = enumerated(p)
    assert guest_writable(p) == expected, f"{name}: writable {guest_writable(p):#x}, enumerated {expected:#x}"
    vm = vm_for(p)
    for i in range(64):
        bit = 1 << i
        ok = vm.wrmsr(0, MSR_SPEC_CTRL, bit)
        assert ok == bool(expected & bit), f"{name}: WRMSR {bit:#x} {'accepted' if ok else 'refused'}"
        if ok:
            assert vm.rdmsr(0, MSR_SPEC_CTRL) == bit and vm.vcpus[0].spec.effective == bit
        else:
            assert "not enumerated" in vm.last_fault and vm.rdmsr(0, MSR_SPEC_CTRL) != bit
    if expected:  # all of them at once, as a kernel that uses every control writes them
        assert vm.wrmsr(0, MSR_SPEC_CTRL, expected) and vm.rdmsr(0, MSR_SPEC_CTRL) == expected


def test_linux_on_sapphire_rapids_boots(catalog: Catalog) -> None:
    """A Linux guest shown Sapphire Rapids in eIBRS mode writes IBRS, RRSBA_DIS_S (spec_ctrl_disable_kernel_rrsba)
    and BHI_DIS_S (spec_ctrl_bhi_dis) itself; none of it may raise #GP, forced or not."""
    spr = catalog.get("sapphirerapids").facts
    value = IBRS | RRSBA_DIS_S | BHI_DIS_S
    for settings in (OperatorSettings(unreported="trust"), OperatorSettings(force_on=RRSBA_DIS_S),
                     OperatorSettings(force_off=BHI_DIS_S)):
        vm = vm_for(spr, settings=settings)
        assert vm.wrmsr(0, MSR_SPEC_CTRL, value), vm.last_fault
        assert vm.rdmsr(0, MSR_SPEC_CTRL) == value


@pytest.mark.parametrize("bit", [RRSBA_DIS_S, BHI_DIS_S, IBRS, int(SpecCtrl.SSBD)])
def test_a_guest_cannot_set_a_bit_the_operator_forces_off(catalog: Catalog, bit: int) -> None:
    spr = catalog.get("sapphirerapids").facts
    vm = vm_for(spr, settings=OperatorSettings(force_off=bit, unreported="trust"), supported=3)
    assert vm.intercept_spec_ctrl(0), "a forced bit keeps IA32_SPEC_CTRL intercepted"
    assert vm.wrmsr(0, MSR_SPEC_CTRL, bit | IBRS if bit != IBRS else bit)
    assert vm.rdmsr(0, MSR_SPEC_CTRL) & bit, "the guest reads back what it wrote"
    assert not vm.vcpus[0].spec.effective & bit, "but the bit is not in effect"
    # the guest reports retpoline and the short loop: it needs both controls here; the operator's choice stands
    assert vm.wrmsr(0, 0x50000002, 3) and vm.wrmsr(0, MSR_SPEC_CTRL, 0xFFFF & guest_writable(spr))
    assert not vm.vcpus[0].spec.effective & bit
    for e in vm.take_effects():
        assert not e.effective & bit and e.mask & bit


def test_a_guest_cannot_clear_a_bit_the_operator_forces_on(catalog: Catalog) -> None:
    spr = catalog.get("sapphirerapids").facts
    vm = vm_for(spr, settings=OperatorSettings(force_on=BHI_DIS_S | IBRS, unreported="trust"))
    assert vm.wrmsr(0, MSR_SPEC_CTRL, 0) and vm.rdmsr(0, MSR_SPEC_CTRL) == 0
    assert vm.vcpus[0].spec.effective == BHI_DIS_S | IBRS


def test_shadow_bit_by_bit() -> None:
    """Each bit in effect is the forced value where masked and the guest's elsewhere, over all 4-bit cases."""
    for guest in range(16):
        for mask in range(16):
            for forced in range(16):
                s = SpecCtrlShadow(writable=0xF, guest=guest)
                s.hold(mask, forced)
                for i in range(4):
                    want = (forced if mask >> i & 1 else guest) >> i & 1
                    assert s.effective >> i & 1 == want, (guest, mask, forced, i)
                assert s.forced == forced & mask and s.intercept == (mask != 0)


def test_hold_says_when_something_changed() -> None:
    s = SpecCtrlShadow(writable=0xFF, guest=1)
    assert not s.hold(0, 0), "nothing held, nothing changed"
    assert s.hold(2, 2), "a new forced bit changes the value in effect"
    assert not s.hold(2, 2), "the same again changes nothing"
    assert s.hold(1, 1), "forcing a bit the guest already set changes interception, not the value"
    assert s.effective == 1 and s.mask == 1
    assert s.hold(1, 0) and s.effective == 0
    assert s.hold(0, 0) and s.effective == 1, "released: the guest's own value is back"
    assert s.write(0x100) and s.guest == 1, "a bit not writable is refused and changes nothing"
    assert s.write(0) is None and s.guest == 0
