"""Conformance of the three wire forms: every case of the RFC's KVM selftest (virtual_mitigation_msr_test.c),
reset values, #GP on reserved and unenumerated bits, read-back, and the enumeration each form shows."""

from __future__ import annotations

import struct

import pytest

from pvmit.catalog.loader import Catalog
from pvmit.interface import Form, InterfaceConfig, VmInterface
from pvmit.interface.forms import (
    MSR_KVM_PVMIT_MITIGATION,
    NEUTRAL_SIGNATURE,
    kvm_feature_leaf_bits,
    neutral_leaves,
)
from pvmit.x86.bits import ArchCapabilities
from pvmit.x86.registers import MSR_VIRTUAL_ENUMERATION, MSR_VIRTUAL_MITIGATION_CTRL, MSR_VIRTUAL_MITIGATION_ENUM

FORMS = list(Form)


def make(catalog: Catalog, form: Form, supported: int = 3, host: str = "sapphirerapids",
         personality: str = "icelake-sp") -> VmInterface:
    return VmInterface(InterfaceConfig(form, supported), catalog.get(host).facts, catalog.get(personality).facts)


def ctrl_index(form: Form) -> int:
    return MSR_KVM_PVMIT_MITIGATION if form is Form.KVM else MSR_VIRTUAL_MITIGATION_CTRL


def read_ctrl(vm: VmInterface) -> int | None:
    v = vm.rdmsr(0, ctrl_index(vm.config.form))
    return None if v is None else v & 0xFFFF_FFFF if vm.config.form is Form.KVM else v


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("supported", [0, 1, 2, 3])
def test_selftest_walk_all_64_bits_of_ctrl(catalog: Catalog, form: Form, supported: int) -> None:
    """Case 1 of the selftest: setting bit i succeeds and reads back iff bit i is enumerated; otherwise #GP and
    the old value stays; a final write of 0 succeeds. (The kvm form also accepts its read-only high half when it
    equals the supported bits, so that a read-modify-write works.)"""
    vm = make(catalog, form, supported)
    idx = ctrl_index(form)
    assert read_ctrl(vm) == 0  # reset value
    for i in range(64):
        before = read_ctrl(vm)
        ok = vm.wrmsr(0, idx, 1 << i)
        if i < 32 and supported & (1 << i):
            assert ok and read_ctrl(vm) == 1 << i, i
        elif form is Form.KVM and i >= 32 and 1 << (i - 32) == supported:
            assert ok and read_ctrl(vm) == 0, i
        else:
            assert not ok and vm.last_fault, i
            assert read_ctrl(vm) == before, i
    assert vm.wrmsr(0, idx, 0) and read_ctrl(vm) == 0


@pytest.mark.parametrize("supported", [0, 1, 2, 3])
def test_intel_read_only_registers(catalog: Catalog, supported: int) -> None:
    vm = make(catalog, Form.INTEL, supported)
    assert vm.rdmsr(0, MSR_VIRTUAL_ENUMERATION) == 1
    assert vm.rdmsr(0, MSR_VIRTUAL_MITIGATION_ENUM) == supported
    for index in (MSR_VIRTUAL_ENUMERATION, MSR_VIRTUAL_MITIGATION_ENUM):
        before = vm.rdmsr(0, index)
        for value in (0, 1, 3, 1 << 63):
            assert not vm.wrmsr(0, index, value) and "read-only" in vm.last_fault
            assert vm.rdmsr(0, index) == before
    caps = vm.rdmsr(0, 0x10A)
    assert caps is not None and caps & ArchCapabilities.VIRTUAL_ENUM
    assert not vm.wrmsr(0, 0x10A, caps)


@pytest.mark.parametrize("form", [Form.KVM, Form.NEUTRAL])
def test_selftest_without_enumeration_every_intel_msr_faults(catalog: Catalog, form: Form) -> None:
    """Case 2 of the selftest: without ARCH_CAPABILITIES bit 63, reads of all three MSRs raise #GP."""
    vm = make(catalog, form)
    caps = vm.rdmsr(0, 0x10A)
    assert caps is not None and not caps & ArchCapabilities.VIRTUAL_ENUM
    intel_only = [MSR_VIRTUAL_ENUMERATION, MSR_VIRTUAL_MITIGATION_ENUM]
    if form is Form.KVM:
        intel_only.append(MSR_VIRTUAL_MITIGATION_CTRL)
    for index in intel_only:
        assert vm.rdmsr(0, index) is None and "does not exist" in vm.last_fault
        assert not vm.wrmsr(0, index, 0)


@pytest.mark.parametrize("form", [Form.INTEL, Form.NEUTRAL])
def test_kvm_msr_does_not_exist_in_other_forms(catalog: Catalog, form: Form) -> None:
    vm = make(catalog, form)
    assert vm.rdmsr(0, MSR_KVM_PVMIT_MITIGATION) is None
    assert not vm.wrmsr(0, MSR_KVM_PVMIT_MITIGATION, 0)


def test_kvm_form_high_half_is_read_only_and_read_modify_write_works(catalog: Catalog) -> None:
    vm = make(catalog, Form.KVM, supported=3)
    assert vm.rdmsr(0, MSR_KVM_PVMIT_MITIGATION) == 3 << 32
    assert vm.wrmsr(0, MSR_KVM_PVMIT_MITIGATION, (3 << 32) | 2)  # RMW of the value read
    assert vm.rdmsr(0, MSR_KVM_PVMIT_MITIGATION) == (3 << 32) | 2
    assert not vm.wrmsr(0, MSR_KVM_PVMIT_MITIGATION, (1 << 32) | 1) and "read-only" in vm.last_fault
    assert vm.rdmsr(0, MSR_KVM_PVMIT_MITIGATION) == (3 << 32) | 2
    assert vm.wrmsr(0, MSR_KVM_PVMIT_MITIGATION, 0)


def test_enumeration_each_form_shows(catalog: Catalog) -> None:
    intel, kvm, neutral = (InterfaceConfig(f, 3) for f in FORMS)
    assert kvm_feature_leaf_bits(kvm) == 1 << 30 and kvm_feature_leaf_bits(intel) == 0
    sig, info, pool = neutral_leaves(neutral)
    assert (sig.leaf, sig.eax) == (0x40000100, 0x40000102)
    assert struct.pack("<3I", sig.ebx, sig.ecx, sig.edx) == NEUTRAL_SIGNATURE
    assert (info.leaf, info.eax, info.ebx, info.ecx, info.edx) == (0x40000101, 2, 0x50000002, 3, 0)
    assert (pool.leaf, pool.eax, pool.ebx, pool.ecx, pool.edx) == (0x40000102, 0, 0, 0, 0)


def test_intel_form_is_offered_to_amd_guests_by_emulating_arch_capabilities(catalog: Catalog) -> None:
    rome = catalog.get("EPYC-Rome").facts
    vm = VmInterface(InterfaceConfig(Form.INTEL, 3), catalog.get("epyc-milan").facts, rome)
    assert vm.rdmsr(0, 0x10A) == ArchCapabilities.VIRTUAL_ENUM  # emulated: bit 63 and nothing else
    assert vm.rdmsr(0, MSR_VIRTUAL_ENUMERATION) == 1
    plain = VmInterface(InterfaceConfig(Form.NEUTRAL, 3), catalog.get("epyc-milan").facts, rome)
    assert plain.rdmsr(0, 0x10A) is None  # an AMD personality has no IA32_ARCH_CAPABILITIES otherwise


def test_values_outside_64_bits_fault(catalog: Catalog) -> None:
    vm = make(catalog, Form.INTEL)
    assert not vm.wrmsr(0, MSR_VIRTUAL_MITIGATION_CTRL, 1 << 64) and "64-bit" in vm.last_fault
    assert not vm.wrmsr(0, MSR_VIRTUAL_MITIGATION_CTRL, -1)
    assert vm.rdmsr(0, 0x1234) is None and "not handled" in vm.last_fault


def test_config_validation() -> None:
    with pytest.raises(ValueError, match="only bits 0 and 1"):
        InterfaceConfig(Form.INTEL, 4)
    with pytest.raises(ValueError, match="0x100-aligned"):
        InterfaceConfig(Form.NEUTRAL, 3, neutral_base=0x40000180)
    cfg = InterfaceConfig(Form.KVM, 2)
    assert InterfaceConfig.from_json(cfg.to_json()) == cfg


@pytest.mark.parametrize("index,why", [(0x48, "outside"), (0x4000_0070, "Hyper-V"), (0x4B56_4DFF, "KVM's"),
                                       (0x5000_0001, "read-only register of the Intel form"), (1 << 32, "outside")])
def test_neutral_register_cannot_clash(index: int, why: str) -> None:
    with pytest.raises(ValueError, match=why):
        InterfaceConfig(Form.NEUTRAL, 3, neutral_msr=index)
    assert InterfaceConfig(Form.NEUTRAL, 3, neutral_msr=0x5000_0002).ctrl_msr == 0x5000_0002


# --- pvmit's proposal: LONG_BHB_NEEDED and the pool description, in every form (docs/interface.md 9, 10) -----------

from pvmit.interface.forms import (  # noqa: E402
    KVM_FEATURE_PVMIT_POOL_BIT,
    KVM_HINTS_PVMIT_LONG_BHB_BIT,
    MSR_KVM_PVMIT_POOL,
    MSR_VIRTUAL_POOL_INFO,
    NEUTRAL_EDX_LONG_BHB_NEEDED,
    kvm_hint_bits,
)
from pvmit.interface.pooldesc import MAX_ENTRIES, Implementation  # noqa: E402
from pvmit.x86.bits import VirtualEnumeration  # noqa: E402

POOL = (Implementation("intel", 6, 0x55, 6, 7), Implementation("intel", 6, 0x6A, 4, 6),
        Implementation("intel", 6, 0x8F))
POOL_MSR = {Form.INTEL: MSR_VIRTUAL_POOL_INFO, Form.KVM: MSR_KVM_PVMIT_POOL, Form.NEUTRAL: MSR_VIRTUAL_POOL_INFO}


def shown_long(config: InterfaceConfig, vm: VmInterface) -> bool:
    """LONG_BHB_NEEDED as a guest of each form reads it."""
    if config.form is Form.INTEL:
        enum = vm.rdmsr(0, MSR_VIRTUAL_ENUMERATION)
        assert enum is not None
        return bool(enum & VirtualEnumeration.LONG_BHB_NEEDED)
    if config.form is Form.KVM:
        return bool(kvm_hint_bits(config) & 1 << KVM_HINTS_PVMIT_LONG_BHB_BIT)
    return bool(neutral_leaves(config)[1].edx & NEUTRAL_EDX_LONG_BHB_NEEDED)


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("long", [None, False, True])
def test_long_bhb_needed_where_each_form_shows_it(catalog: Catalog, form: Form, long: bool | None) -> None:
    config = InterfaceConfig(form, 2, bhb_long=long)
    vm = VmInterface(config, catalog.get("sapphirerapids").facts, catalog.get("icelake-sp").facts)
    assert shown_long(config, vm) is bool(long)
    # what the guest's CPUID holds (build_cpuid): the bit in this form's place only
    from pvmit.vmm.personality import build_cpuid, from_model

    table = {(e.function, e.index): e for e in build_cpuid(from_model(catalog, "icelake-sp"), config, [])}
    hints = table[(0x40000001, 0)].edx
    assert bool(hints & 1 << KVM_HINTS_PVMIT_LONG_BHB_BIT) is (form is Form.KVM and bool(long))
    neutral = table.get((0x40000101, 0))
    assert (neutral is not None) is (form is Form.NEUTRAL)
    assert neutral is None or bool(neutral.edx & NEUTRAL_EDX_LONG_BHB_NEEDED) is bool(long)
    if form is Form.INTEL:  # read-only, like the rest of MSR_VIRTUAL_ENUMERATION
        assert not vm.wrmsr(0, MSR_VIRTUAL_ENUMERATION, 1) and "read-only" in vm.last_fault
        assert vm.rdmsr(0, MSR_VIRTUAL_ENUMERATION) == 1 | (2 if long else 0)


def pool_enumerated(config: InterfaceConfig, vm: VmInterface) -> int:
    """Where a guest of each form finds POOL_INFO (0: not offered)."""
    if config.form is Form.INTEL:
        enum = vm.rdmsr(0, MSR_VIRTUAL_ENUMERATION)
        assert enum is not None
        return MSR_VIRTUAL_POOL_INFO if enum & VirtualEnumeration.POOL_DESCRIPTION else 0
    if config.form is Form.KVM:
        return MSR_KVM_PVMIT_POOL if kvm_feature_leaf_bits(config) & 1 << KVM_FEATURE_PVMIT_POOL_BIT else 0
    sig, _, leaf = neutral_leaves(config)
    assert sig.eax >= leaf.leaf  # the largest leaf of the block reaches base+2
    return leaf.eax


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("count", [1, 3, MAX_ENTRIES])
def test_pool_description_registers(catalog: Catalog, form: Form, count: int) -> None:
    """POOL_INFO gives the count and version; entry i < count reads its encoding; every register is read-only
    (#GP, value unchanged); an entry at or past the count raises #GP, and so does the MSR after the block."""
    entries = (POOL * MAX_ENTRIES)[:count] if count <= len(POOL) else tuple(
        Implementation("intel", 6, m) for m in range(count))
    config = InterfaceConfig(form, 3, pool=entries)
    vm = VmInterface(config, catalog.get("sapphirerapids").facts, catalog.get("icelake-sp").facts)
    base = pool_enumerated(config, vm)
    assert base == POOL_MSR[form]
    assert vm.rdmsr(0, base) == count | 1 << 8
    for i in range(MAX_ENTRIES):
        value = vm.rdmsr(0, base + 1 + i)
        if i < count:
            assert value == entries[i].encode() and Implementation.decode(value) == entries[i]
        else:
            assert value is None and f"entry {i} is past the {count} entries" in vm.last_fault
    assert vm.rdmsr(0, base + 1 + MAX_ENTRIES) is None  # past the block: not a register of the interface
    for index in range(base, base + 1 + count):
        before = vm.rdmsr(0, index)
        for v in (0, 1, before or 0, 1 << 63):
            assert not vm.wrmsr(0, index, v) and "read-only" in vm.last_fault
        assert vm.rdmsr(0, index) == before
    for other in FORMS:  # another form's block does not exist here
        if POOL_MSR[other] != base:
            assert vm.rdmsr(0, POOL_MSR[other]) is None


@pytest.mark.parametrize("form", FORMS)
def test_no_pool_description_offered(catalog: Catalog, form: Form) -> None:
    config = InterfaceConfig(form, 3)
    vm = VmInterface(config, catalog.get("sapphirerapids").facts, catalog.get("icelake-sp").facts)
    assert pool_enumerated(config, vm) == 0
    for base in set(POOL_MSR.values()):
        for index in (base, base + 1, base + MAX_ENTRIES):
            assert vm.rdmsr(0, index) is None and not vm.wrmsr(0, index, 0)
    assert config.pool_info == 0 and config.msrs == InterfaceConfig(form, 3).msrs


def test_pool_description_configuration_is_checked() -> None:
    with pytest.raises(ValueError, match="1 to 32 entries, not 0"):
        InterfaceConfig(Form.NEUTRAL, 3, pool=())
    with pytest.raises(ValueError, match="1 to 32 entries, not 33"):
        InterfaceConfig(Form.NEUTRAL, 3, pool=tuple(Implementation("intel", 6, m) for m in range(33)))
    with pytest.raises(ValueError, match="overlaps the CTRL MSR"):
        InterfaceConfig(Form.NEUTRAL, 3, pool=POOL, neutral_msr=0x50000020)
    with pytest.raises(ValueError, match="KVM's paravirtual MSR range"):
        InterfaceConfig(Form.NEUTRAL, 3, pool=POOL, neutral_pool_msr=0x4B564CF0)
    with pytest.raises(ValueError, match="outside 0x40000000-0x5fffffff"):
        InterfaceConfig(Form.NEUTRAL, 3, pool=POOL, neutral_pool_msr=0x5FFFFFF0)
    relocated = InterfaceConfig(Form.NEUTRAL, 3, pool=POOL, neutral_pool_msr=0x40000300)
    assert neutral_leaves(relocated)[2].eax == 0x40000300 and relocated.pool_msr == 0x40000300
    assert 0x40000300 + MAX_ENTRIES in relocated.msrs and 0x40000300 + MAX_ENTRIES + 1 not in relocated.msrs
    with pytest.raises(ValueError, match="bhb_long must be true, false or null"):
        InterfaceConfig(Form.NEUTRAL, 3, bhb_long=1)  # type: ignore[arg-type]
    assert InterfaceConfig.from_json(relocated.to_json()) == relocated
    assert InterfaceConfig.from_json({**InterfaceConfig(Form.KVM, 1, bhb_long=False).to_json()}).bhb_long is False
