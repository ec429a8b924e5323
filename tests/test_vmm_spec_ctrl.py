"""What the VMM writes into KVM's IA32_SPEC_CTRL: exactly the value in effect, restricted to the bits the hardware
has and KVM keeps, after every guest write, report, operator change, reset and restore.

Two backends: a fake vCPU whose "KVM" keeps the bits of an Intel host (so the write path `effective & hw` is
exercised wherever the tests run), and the real /dev/kvm, where the same is asserted if its KVM keeps any
IA32_SPEC_CTRL bit. A KVM that emulates guests in software (this project's development machine) keeps none: there
the real-KVM check is skipped with that reason, and the report must say the controls are modelled only."""

from __future__ import annotations

from typing import Any

import pytest

from pvmit.catalog.loader import Catalog
from pvmit.interface.forms import Form, InterfaceConfig
from pvmit.interface.policy import OperatorSettings
from pvmit.kvm import abi
from pvmit.kvm.system import CpuidEntry, Kvm, kvm_available
from pvmit.kvm.vcpu import HltExit, MsrExit
from pvmit.vmm import vmm as vmm_mod
from pvmit.vmm.personality import resolve
from pvmit.vmm.vmm import Host, Vmm, spec_ctrl_bits_kept
from pvmit.x86.bits import SpecCtrl

SPEC = 0x48
CTRL = 0x50000002
IBRS, SSBD, R_DIS, B_DIS, DDPD_U = (int(SpecCtrl.IBRS), int(SpecCtrl.SSBD), int(SpecCtrl.RRSBA_DIS_S),
                                    int(SpecCtrl.BHI_DIS_S), int(SpecCtrl.DDPD_U))


class FakeVcpu:
    """The calls the VMM makes on a vCPU handle; IA32_SPEC_CTRL keeps only the bits in `keeps`, and a write with
    any other bit is refused whole (KVM_SET_MSRS sets 0 MSRs), as mainline KVM does."""

    def __init__(self, keeps: int) -> None:
        self.keeps = keeps
        self.spec_ctrl = 0
        self.writes: list[int] = []
        self.cpuid: list[CpuidEntry] = []
        self.exits: list[Any] = []
        self.answers: list[tuple[str, int]] = []

    def set_cpuid(self, entries: list[CpuidEntry]) -> None:
        self.cpuid = list(entries)

    def get_cpuid(self) -> list[CpuidEntry]:
        return self.cpuid

    def set_msrs(self, values: dict[int, int]) -> int:
        assert list(values) == [SPEC], "the VMM only ever writes IA32_SPEC_CTRL"
        value = values[SPEC]
        if value & ~self.keeps:
            return 0
        self.spec_ctrl = value
        self.writes.append(value)
        return 1

    def get_msrs(self, indices: list[int]) -> dict[int, int]:
        return {SPEC: self.spec_ctrl} if SPEC in indices else {}

    def run(self) -> Any:
        return self.exits.pop(0)

    def complete_wrmsr(self) -> None:
        self.answers.append(("ok", 0))

    def complete_rdmsr(self, value: int) -> None:
        self.answers.append(("read", value))

    def fault(self) -> None:
        self.answers.append(("#GP", 0))

    def request_exit(self, on: bool) -> None:
        pass


class FakeVm:
    def __init__(self) -> None:
        self.filters: list[list[int]] = []

    def enable_cap(self, cap: int, *args: int) -> None:
        pass

    def set_msr_filter(self, ranges: list[Any]) -> None:
        self.filters.append([r.base for r in ranges])


class FakeMachine:
    keeps = 0

    def __init__(self, kvm: Any, memory_size: int = 4 << 20, *, log_dirty: bool = False) -> None:
        self.vm = FakeVm()
        self.vcpu = FakeVcpu(FakeMachine.keeps)

    def close(self) -> None:
        pass


class FakeKvm:
    def supported_cpuid(self) -> list[CpuidEntry]:
        return []


def wrmsr(index: int, value: int) -> MsrExit:
    x = MsrExit(True)
    x.index, x.data = index, value
    return x


def rdmsr(index: int) -> MsrExit:
    x = MsrExit(False)
    x.index = index
    return x


@pytest.fixture
def fake_vmm(catalog: Catalog, monkeypatch: pytest.MonkeyPatch):  # type: ignore[no-untyped-def]
    """A VMM for a Sapphire Rapids host (the policy's host and the real hardware both) on the fake vCPU, whose KVM
    keeps every bit Sapphire Rapids enumerates except SSBD (so that the restriction to what is kept shows)."""
    monkeypatch.setattr(vmm_mod, "Machine", FakeMachine)
    spr = catalog.get("sapphirerapids").facts

    def make(settings: OperatorSettings = OperatorSettings(), personality: str = "sapphirerapids") -> Vmm:
        host = Host("fake Sapphire Rapids", spr, spr, stand_in=False)
        FakeMachine.keeps = host.hardware_spec_ctrl & ~SSBD
        return Vmm(FakeKvm(), resolve(catalog, personality), host, InterfaceConfig(Form.INTEL, 3),  # type: ignore[arg-type]
                   settings)

    return make


def kvm_holds_exactly_what_is_in_effect(vmm: Vmm) -> None:
    vcpu: FakeVcpu = vmm.vcpu  # type: ignore[assignment]
    s = vmm.core.vcpus[0].spec
    assert vcpu.spec_ctrl == s.effective & vcpu.keeps, (hex(vcpu.spec_ctrl), hex(s.effective), hex(vcpu.keeps))


def test_the_probe_finds_what_kvm_keeps(fake_vmm) -> None:  # type: ignore[no-untyped-def]
    vmm = fake_vmm()
    vcpu: FakeVcpu = vmm.vcpu  # type: ignore[assignment]
    assert vcpu.keeps & (IBRS | R_DIS | B_DIS) == IBRS | R_DIS | B_DIS and not vcpu.keeps & SSBD
    assert vmm._hw == vcpu.keeps  # the bits applied in hardware: the host's, less the one this KVM drops
    assert any("this KVM does not keep IA32_SPEC_CTRL SSBD: modelled only" in e for e in vmm.events)
    assert spec_ctrl_bits_kept(FakeVcpu(IBRS | B_DIS), IBRS | SSBD | B_DIS) == IBRS | B_DIS  # type: ignore[arg-type]
    assert spec_ctrl_bits_kept(FakeVcpu(0), IBRS | SSBD) == 0  # type: ignore[arg-type]


def test_every_exit_leaves_kvm_with_the_value_in_effect(fake_vmm) -> None:  # type: ignore[no-untyped-def]
    vmm = fake_vmm(OperatorSettings(force_on=SSBD | DDPD_U, unreported="trust"))  # SSBD: not kept; DDPD_U: absent
    vcpu: FakeVcpu = vmm.vcpu  # type: ignore[assignment]
    kvm_holds_exactly_what_is_in_effect(vmm)
    assert vcpu.spec_ctrl == 0, "forced SSBD and DDPD_U are modelled only: neither reaches KVM"
    seen: list[int] = []
    vmm.after_msr_exit = lambda v: (kvm_holds_exactly_what_is_in_effect(v), seen.append(vcpu.spec_ctrl))  # type: ignore[func-returns-value]
    vcpu.exits = [
        wrmsr(CTRL, 2),                  # reports retpoline: RRSBA_DIS_S forced
        wrmsr(SPEC, IBRS),               # the guest's own IBRS joins it
        wrmsr(SPEC, IBRS | B_DIS),       # and BHI_DIS_S, which it may write itself on this personality
        wrmsr(SPEC, 0),                  # tries to clear everything: RRSBA_DIS_S stays
        rdmsr(SPEC),                     # reads back its own 0
        wrmsr(CTRL, 3),                  # now the short loop too: BHI_DIS_S forced
        wrmsr(SPEC, 1 << 9),             # a reserved bit: #GP, nothing changes
        wrmsr(CTRL, 0),                  # opts out of everything: nothing of the guest's is forced any more
        HltExit(),
    ]
    assert vmm.run() == "hlt"
    assert seen == [R_DIS, R_DIS | IBRS, R_DIS | IBRS | B_DIS, R_DIS, R_DIS, R_DIS | B_DIS, R_DIS | B_DIS, 0]
    assert ("read", 0) in vcpu.answers and ("#GP", 0) in vcpu.answers
    state = vmm.spec_ctrl_state()
    assert state["effective"] == hex(SSBD | DDPD_U) and state["kvm_value"] == "0x0"
    assert state["in_hardware"] == [] and state["modelled_only"] == ["SSBD", "DDPD_U"]


def test_forced_changes_reach_kvm(fake_vmm) -> None:  # type: ignore[no-untyped-def]
    """Operator changes, a reset and a restored core: each puts the new value in effect into KVM."""
    vmm = fake_vmm(OperatorSettings(unreported="trust"))
    vcpu: FakeVcpu = vmm.vcpu  # type: ignore[assignment]
    vcpu.exits = [wrmsr(SPEC, IBRS | R_DIS), HltExit()]
    vmm.run()
    assert vcpu.spec_ctrl == IBRS | R_DIS
    vmm.core.set_settings(OperatorSettings(force_on=B_DIS, force_off=R_DIS, unreported="trust"))
    vmm.install_core(vmm.core)
    kvm_holds_exactly_what_is_in_effect(vmm)
    assert vcpu.spec_ctrl == IBRS | B_DIS, "forced off: the guest's RRSBA_DIS_S leaves KVM; forced on: BHI_DIS_S"
    vmm.core.reset_vcpu(0)
    vmm.install_core(vmm.core)
    assert vcpu.spec_ctrl == B_DIS
    vmm.core.set_settings(OperatorSettings(unreported="trust"))
    vmm.install_core(vmm.core)
    assert vcpu.spec_ctrl == 0
    assert vcpu.writes[-3:] == [IBRS | B_DIS, B_DIS, 0]


# --- the real /dev/kvm ----------------------------------------------------------------------------------------

USABLE, WHY = kvm_available()


@pytest.fixture(scope="module")
def kept(catalog: Catalog) -> tuple[Host, int]:
    """This machine as a host, and the IA32_SPEC_CTRL bits its KVM keeps."""
    if not USABLE:
        pytest.skip(f"needs a usable /dev/kvm: {WHY}")
    from pvmit.vmm.hosts import this_machine
    from pvmit.vmm.machine import Machine

    real = this_machine(catalog)[0]
    with Kvm() as kvm:
        m = Machine(kvm)
        try:
            return real, spec_ctrl_bits_kept(m.vcpu, real.hardware_spec_ctrl)
        finally:
            m.close()


@pytest.mark.kvm
def test_real_kvm_holds_the_value_in_effect(catalog: Catalog, kept: tuple[Host, int]) -> None:
    real, bits = kept
    if not bits:
        pytest.skip(f"this KVM keeps none of the IA32_SPEC_CTRL bits the CPU enumerates "
                    f"({real.hardware_spec_ctrl:#x}): it emulates its guests in software; controls are modelled only")
    from pvmit.vmm.runner import run_guest

    with Kvm() as kvm:
        force = bits & -bits  # the lowest bit this KVM keeps, forced on by the operator
        r = run_guest(kvm, resolve(catalog, "EPYC-Milan" if real.real.vendor == "amd" else "icelake-server-v2"),
                      real, Form.NEUTRAL, frozenset(), OperatorSettings(force_on=force, unreported="trust"))
    assert r.passed, r.checks
    effective = int(str(r.spec_ctrl["effective"]), 16)
    assert int(str(r.spec_ctrl["kvm_value"]), 16) == effective & bits and effective & force


@pytest.mark.kvm
def test_a_kvm_that_keeps_nothing_is_reported_as_modelled_only(catalog: Catalog, kept: tuple[Host, int]) -> None:
    real, bits = kept
    if bits:
        pytest.skip(f"this KVM keeps IA32_SPEC_CTRL bits {bits:#x}: the real write path is checked instead")
    from pvmit.vmm.runner import run_guest

    force = real.hardware_spec_ctrl & -real.hardware_spec_ctrl or int(SpecCtrl.STIBP)
    with Kvm() as kvm:
        r = run_guest(kvm, resolve(catalog, "EPYC-Milan"), real, Form.NEUTRAL, frozenset(),
                      OperatorSettings(force_on=force, unreported="trust"))
    assert r.passed, r.checks
    name = next(b.name for b in SpecCtrl if b == force)
    assert r.spec_ctrl["in_hardware"] == [] and r.spec_ctrl["modelled_only"] == [name]
    assert r.spec_ctrl["kvm_value"] == "0x0" and r.spec_ctrl["effective"] == hex(force)
    if real.hardware_spec_ctrl:
        assert any("does not keep IA32_SPEC_CTRL" in e and "modelled only" in e for e in r.events)


def test_abi_exit_reasons_match_the_fake() -> None:
    assert wrmsr(SPEC, 0).reason == abi.KVM_EXIT_X86_WRMSR and rdmsr(SPEC).reason == abi.KVM_EXIT_X86_RDMSR
