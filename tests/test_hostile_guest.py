"""A hostile guest on real KVM: it floods every interface MSR and IA32_SPEC_CTRL with random values and pokes
random ports. The VMM keeps serving, injects #GP where the spec says, keeps its memory and logs bounded, and the
promise and the operator's forced control hold after every single exit."""

from __future__ import annotations

import resource

import pytest

from pvmit.catalog.loader import Catalog
from pvmit.guest import program
from pvmit.interface.forms import Form, InterfaceConfig
from pvmit.interface.policy import OperatorSettings
from pvmit.kvm.system import Kvm, kvm_available
from pvmit.safety.verify import promise_violations
from pvmit.vmm.hosts import stand_in, this_machine
from pvmit.vmm.personality import resolve
from pvmit.vmm.vmm import Vmm
from pvmit.x86.bits import SpecCtrl

USABLE, WHY = kvm_available()
pytestmark = [pytest.mark.kvm, pytest.mark.skipif(not USABLE, reason=f"needs a usable /dev/kvm: {WHY}")]
ITERATIONS = 6000


@pytest.mark.parametrize("form", list(Form))
def test_hostile_guest_cannot_break_the_promise(catalog: Catalog, form: Form) -> None:
    real, _ = this_machine(catalog)
    host = stand_in(catalog, "sapphirerapids", real)
    operator = OperatorSettings(force_on=int(SpecCtrl.SSBD), unreported="assume-worst")
    checks = {"exits": 0}

    def invariant(vmm: Vmm) -> None:
        checks["exits"] += 1
        spec = vmm.core.vcpus[0].spec
        assert spec.effective & int(SpecCtrl.SSBD), "the operator's forced control was cleared"
        assert spec.effective & spec.mask == spec.forced & spec.mask
        problems = promise_violations(vmm.core)
        assert not problems, problems

    with Kvm() as kvm:
        vmm = Vmm(kvm, resolve(catalog, "icelake-server-v2"), host, InterfaceConfig(form, 3), operator)
        vmm.after_msr_exit = invariant
        try:
            rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            guest = program("hostile_guest")
            vmm.load(guest.code, guest.load_address, (ITERATIONS, 0x9E3779B97F4A7C15, vmm.config.ctrl_msr))
            stop = vmm.run(timeout=120)
            rss_after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            vmm.serial.close()
        finally:
            vmm.close()
    assert stop == "hlt"
    done = [ln for ln in vmm.serial.lines if ln.startswith("guest: hostile done gp 0x")]
    assert done, vmm.serial.lines[-5:]
    gp = int(done[0].rsplit("0x", 1)[1], 16)
    injected = sum(1 for e in vmm.events if e.startswith("#GP injected"))
    assert gp > ITERATIONS // 2 and injected >= min(gp, 10_000) * 0.9  # the guest saw the #GPs the VMM injected
    assert checks["exits"] >= ITERATIONS  # the invariant ran on every MSR exit
    assert len(vmm.events) <= 10_000 and len(vmm.counts.by_msr) <= 8  # bounded, however many indices it tried
    assert rss_after - rss_before < 64 * 1024  # KiB: no memory growth worth the name


def test_hostile_guest_really_reports_sometimes(catalog: Catalog) -> None:
    """The flood is not all noise: valid reports get through, so the promise is checked with controls forced."""
    real, _ = this_machine(catalog)
    seen = {"forced": 0}

    def watch(vmm: Vmm) -> None:
        if vmm.core.vcpus[0].spec.mask & int(SpecCtrl.RRSBA_DIS_S) and vmm.core.vcpus[0].reported:
            seen["forced"] += 1

    with Kvm() as kvm:
        vmm = Vmm(kvm, resolve(catalog, "icelake-server-v2"), stand_in(catalog, "sapphirerapids", real),
                  InterfaceConfig(Form.INTEL, 3), OperatorSettings(unreported="trust"))
        vmm.after_msr_exit = watch
        try:
            guest = program("hostile_guest")
            vmm.load(guest.code, guest.load_address, (3000, 12345, vmm.config.ctrl_msr))
            assert vmm.run(timeout=120) == "hlt"
        finally:
            vmm.close()
    assert seen["forced"] > 50
