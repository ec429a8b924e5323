"""The forcing policy, SPEC_CTRL mask/shadow, and snapshot/restore."""

from __future__ import annotations

import json

import pytest

from pvmit.catalog.loader import Catalog
from pvmit.derive import Mitigation
from pvmit.errors import InputError
from pvmit.interface import Form, InterfaceConfig, OperatorSettings, VmInterface, check, decide, restore, snapshot
from pvmit.interface.policy import Why, assumed_reliance, supported_requests
from pvmit.x86.bits import SpecCtrl

R, B = Mitigation.RETPOLINE, Mitigation.BHB_SHORT
RRSBA_DIS_S, BHI_DIS_S = int(SpecCtrl.RRSBA_DIS_S), int(SpecCtrl.BHI_DIS_S)


@pytest.fixture
def f(catalog: Catalog):  # type: ignore[no-untyped-def]
    return lambda name: catalog.get(name).facts


def test_retpoline_on_rrsba_host_with_control_forces_rrsba_dis_s(f) -> None:  # type: ignore[no-untyped-def]
    d = decide(f("sapphirerapids"), frozenset({R}), f("icelake-sp"))
    assert d.mask == RRSBA_DIS_S and d.value == RRSBA_DIS_S and d.safe
    (forced,) = d.forced
    assert forced.why is Why.GUEST and "retpoline is ineffective here" in forced.reason and forced.in_hardware


def test_short_bhb_where_ineffective_forces_bhi_dis_s(f) -> None:  # type: ignore[no-untyped-def]
    d = decide(f("sapphirerapids"), frozenset({B}), f("cascadelake-sp"))
    assert d.mask == BHI_DIS_S == d.value


def test_nothing_forced_where_the_software_mitigation_works(f) -> None:  # type: ignore[no-untyped-def]
    d = decide(f("icelake-sp"), frozenset({R, B}), f("icelake-sp"))
    assert d.mask == 0 and d.safe and len(d.notes) == 2 and all("nothing forced" in n for n in d.notes)
    assert decide(f("epyc-milan"), frozenset({R, B}), f("epyc-rome")).mask == 0


def test_exposure_where_no_control_exists(f) -> None:  # type: ignore[no-untyped-def]
    d = decide(f("cascadelake-sp"), frozenset({R}), f("cascadelake-sp"))
    assert not d.safe and d.mask == 0
    (e,) = d.exposures
    assert e.mitigation is R and not e.override and "RRSBA_CTRL" in e.reason
    # both facts read on real hardware (Firecracker's Cascade Lake fingerprint): nothing assumed
    assert not d.assumed and "firecracker" in e.reason


def test_operator_settings_take_precedence(f) -> None:  # type: ignore[no-untyped-def]
    spr, icx = f("sapphirerapids"), f("icelake-sp")
    on = decide(spr, frozenset(), icx, OperatorSettings(force_on=BHI_DIS_S))
    assert on.mask == on.value == BHI_DIS_S and on.forced[0].why is Why.OPERATOR
    off = decide(spr, frozenset({R}), icx, OperatorSettings(force_off=RRSBA_DIS_S))
    assert off.mask == RRSBA_DIS_S and off.value == 0
    assert off.safe, "an operator override is reported, not refused"
    assert any(e.override for e in off.exposures) and any("left exposed" in w for w in off.warnings)
    missing = decide(f("epyc-milan"), frozenset(), f("epyc-rome"), OperatorSettings(force_on=BHI_DIS_S))
    assert any("modelled only" in w for w in missing.warnings) and not missing.forced[0].in_hardware


def test_operator_settings_validation() -> None:
    with pytest.raises(ValueError, match="both on and off"):
        OperatorSettings(force_on=RRSBA_DIS_S, force_off=RRSBA_DIS_S)
    with pytest.raises(ValueError, match="not controls"):
        OperatorSettings(force_on=1 << 20)
    with pytest.raises(ValueError, match="unreported"):
        OperatorSettings(unreported="maybe")  # type: ignore[arg-type]
    s = OperatorSettings(force_on=BHI_DIS_S, force_off=RRSBA_DIS_S, unreported="trust")
    assert OperatorSettings.from_json(json.loads(json.dumps(s.to_json()))) == s
    with pytest.raises(ValueError, match="no bit named 'NOPE'"):
        OperatorSettings.from_json({"force_on": ["NOPE"]})


def test_unreported_guests(f) -> None:  # type: ignore[no-untyped-def]
    spr, icx_guest = f("sapphirerapids"), f("Icelake-Server")
    worst = decide(spr, None, icx_guest)  # default: assume the worst
    assert not worst.reported and worst.forced and all(x.why is Why.ASSUMED for x in worst.forced)
    assert any("assuming the worst" in n for n in worst.notes)
    trusted = decide(spr, None, icx_guest, OperatorSettings(unreported="trust"))
    assert trusted.mask == 0 and any("trusts it" in w for w in trusted.warnings)
    relied, why = assumed_reliance(f("haswell-ep"))
    assert relied == {R} and "Retpolines" in why  # no eIBRS shown: retpoline
    relied, _ = assumed_reliance(f("cascadelake-sp"))
    assert relied == {B}  # eIBRS shown, no BHI_CTRL: the short loop
    assert assumed_reliance(f("sapphirerapids"))[0] == frozenset()  # eIBRS and BHI_DIS_S


def test_policy_is_deterministic(f) -> None:  # type: ignore[no-untyped-def]
    args = (f("sapphirerapids"), frozenset({R, B}), f("icelake-sp"), OperatorSettings(force_on=int(SpecCtrl.SSBD)))
    assert decide(*args) == decide(*args)
    assert json.dumps(decide(*args).to_json()) == json.dumps(decide(*args).to_json())


def test_supported_requests_over_a_pool(f) -> None:  # type: ignore[no-untyped-def]
    assert supported_requests([f("icelake-sp"), f("sapphirerapids")]) == 3
    assert supported_requests([f("cascadelake-sp"), f("sapphirerapids")]) == int(B.request_bit)
    assert supported_requests([f("epyc-rome"), f("epyc-genoa")]) == 3
    assert supported_requests([]) == 0


def vm_on(f, host: str, personality: str = "icelake-sp", form: Form = Form.INTEL, supported: int = 3,  # type: ignore[no-untyped-def]
          vcpus: int = 2, settings: OperatorSettings = OperatorSettings()) -> VmInterface:
    return VmInterface(InterfaceConfig(form, supported), f(host), f(personality), settings, vcpus)


def test_spec_ctrl_mask_and_shadow(f) -> None:  # type: ignore[no-untyped-def]
    vm = vm_on(f, "sapphirerapids", settings=OperatorSettings(unreported="trust"))
    effects = vm.take_effects()
    assert [e.vcpu for e in effects] == [0, 1]  # the starting state of every vCPU
    assert vm.wrmsr(0, 0x50000002, 2)
    (e,) = vm.take_effects()
    assert (e.vcpu, e.mask, e.forced, e.intercept) == (0, RRSBA_DIS_S, RRSBA_DIS_S, True)
    assert vm.intercept_spec_ctrl(0) and not vm.intercept_spec_ctrl(1)
    # the guest writes IBRS (its personality enumerates it) and reads back exactly that
    assert vm.wrmsr(0, 0x48, 1) and vm.rdmsr(0, 0x48) == 1
    assert vm.vcpus[0].spec.effective == 1 | RRSBA_DIS_S
    # it cannot set a bit its personality does not enumerate (Ice Lake shows no RRSBA_CTRL)
    assert not vm.wrmsr(0, 0x48, RRSBA_DIS_S) and "not enumerated" in vm.last_fault
    assert vm.rdmsr(0, 0x48) == 1 and vm.vcpus[0].spec.effective & RRSBA_DIS_S
    assert vm.wrmsr(0, 0x48, 0) and vm.vcpus[0].spec.effective == RRSBA_DIS_S


def test_guest_that_sees_the_control_still_cannot_clear_it(f) -> None:  # type: ignore[no-untyped-def]
    vm = vm_on(f, "sapphirerapids", personality="sapphirerapids")
    vm.wrmsr(0, 0x50000002, 2)
    assert vm.wrmsr(0, 0x48, 0) and vm.rdmsr(0, 0x48) == 0
    assert vm.vcpus[0].spec.effective == RRSBA_DIS_S


def test_opting_out_releases_the_control_and_reset_recomputes(f) -> None:  # type: ignore[no-untyped-def]
    vm = vm_on(f, "sapphirerapids", settings=OperatorSettings(unreported="trust"))
    vm.take_effects()
    vm.wrmsr(0, 0x50000002, 3)
    assert vm.vcpus[0].spec.mask == RRSBA_DIS_S | BHI_DIS_S
    vm.wrmsr(0, 0x50000002, 2)  # a guest that switched to the long BHB sequence opts out of BHI_DIS_S
    assert vm.vcpus[0].spec.mask == RRSBA_DIS_S
    vm.take_effects()
    vm.wrmsr(0, 0x48, 1)
    vm.reset_vcpu(0)
    assert vm.rdmsr(0, 0x50000002) == 0 and vm.rdmsr(0, 0x48) == 0 and not vm.vcpus[0].reported
    assert vm.vcpus[0].spec.mask == 0 and not vm.intercept_spec_ctrl(0)  # trusted and unreported again
    (e,) = vm.take_effects()
    assert (e.vcpu, e.mask, e.intercept) == (0, 0, False)


def test_reset_tells_the_backend_even_when_the_forced_bits_stay(f) -> None:  # type: ignore[no-untyped-def]
    vm = vm_on(f, "sapphirerapids")  # unreported, assume the worst: both controls forced before and after reset
    vm.wrmsr(0, 0x48, 1)  # IBRS: the value in effect now has the guest's bit
    mask = vm.vcpus[0].spec.mask
    vm.take_effects()
    vm.reset_vcpu(0)
    (e,) = vm.take_effects()  # the guest's value went to 0: the backend must write the new value in effect
    assert e.mask == mask and e.effective == mask and vm.rdmsr(0, 0x48) == 0


def test_operator_change_redecides_every_vcpu(f) -> None:  # type: ignore[no-untyped-def]
    vm = vm_on(f, "sapphirerapids")
    vm.take_effects()
    vm.set_settings(OperatorSettings(force_on=int(SpecCtrl.SSBD)))
    assert all(v.spec.mask & SpecCtrl.SSBD for v in vm.vcpus)
    assert len(vm.take_effects()) == 2


def test_snapshot_is_json_and_restore_redecides(f) -> None:  # type: ignore[no-untyped-def]
    vm = vm_on(f, "icelake-sp", settings=OperatorSettings(unreported="trust"))
    vm.wrmsr(0, 0x50000002, 2)
    vm.wrmsr(1, 0x50000002, 2)
    vm.wrmsr(0, 0x48, 1)
    state = json.loads(json.dumps(snapshot(vm)))
    verdict, vm2 = restore(state, f("sapphirerapids"))
    assert verdict.accepted and vm2 is not None
    assert [c.added for c in verdict.changes] == [("RRSBA_DIS_S",), ("RRSBA_DIS_S",)]
    assert vm2.rdmsr(0, 0x50000002) == 2 and vm2.rdmsr(0, 0x48) == 1
    assert vm2.vcpus[0].spec.effective == 1 | RRSBA_DIS_S and vm2.intercept_spec_ctrl(1)
    # and back: the control is released, and the verdict says so
    back, vm3 = restore(snapshot(vm2), f("icelake-sp"))
    assert back.accepted and vm3 is not None and vm3.vcpus[0].spec.mask == 0
    assert [c.released for c in back.changes] == [("RRSBA_DIS_S",), ("RRSBA_DIS_S",)]
    assert any("no longer forced" in w and "effective" in w for w in back.warnings)


def test_restore_refuses_where_protection_cannot_be_kept(f) -> None:  # type: ignore[no-untyped-def]
    vm = vm_on(f, "icelake-sp", supported=2)
    vm.wrmsr(0, 0x50000002, 2)
    verdict, vm2 = restore(snapshot(vm), f("cascadelake-sp"))
    assert not verdict.accepted and vm2 is None
    assert any("promised retpoline" in r for r in verdict.reasons)
    assert any(r.startswith("vCPU 0: retpoline is ineffective") for r in verdict.reasons)
    # an operator who forces the control off takes the override: accepted, and said so
    vm = vm_on(f, "icelake-sp", supported=0, settings=OperatorSettings(unreported="trust"))
    ok = check(snapshot(vm), f("sapphirerapids"), OperatorSettings(force_off=RRSBA_DIS_S, unreported="trust"))
    assert ok.accepted


@pytest.mark.parametrize("mutate,message", [
    (lambda s: s.update(schema="pvmit.interface-state/9"), "schema"),
    (lambda s: s.pop("personality"), "missing field 'personality'"),
    (lambda s: s["vcpus"][0].update(ctrl=4), "never offered"),
    (lambda s: s["vcpus"][0].update(reported="yes"), "reported must be true or false"),
    (lambda s: s["vcpus"][0].update(spec_ctrl=1 << 70), "64-bit"),
    (lambda s: s.update(vcpus=[]), "non-empty"),
    (lambda s: s["personality"].update(vendor="via"), "vendor"),
    (lambda s: s["config"].update(form="pigeon"), "pigeon"),
])
def test_malformed_state_is_refused_with_a_clear_error(f, mutate, message: str) -> None:  # type: ignore[no-untyped-def]
    state = json.loads(json.dumps(snapshot(vm_on(f, "icelake-sp"))))
    mutate(state)
    with pytest.raises(InputError, match=message):
        check(state, f("sapphirerapids"))


def test_cli_policy(cli) -> None:  # type: ignore[no-untyped-def]
    r = cli("policy", "--host-cpu", "SapphireRapids", "--guest-cpu", "Icelake-Server", "--uses", "retpoline", "--json")
    assert r.code == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["mask"] == RRSBA_DIS_S and doc["forced"][0]["control"] == "RRSBA_DIS_S" and doc["safe"]
    r = cli("policy", "--host-cpu", "cascadelake-sp", "--guest-cpu", "Icelake-Server", "--uses", "retpoline")
    assert r.code == 1 and "EXPOSED" in r.stdout
    r = cli("policy", "--host-cpu", "spr", "--guest-cpu", "icx", "--force-on", "NOPE")
    assert r.code == 2 and "no bit named 'NOPE'" in r.stderr


def test_operator_forcing_a_control_the_host_lacks_is_said(f) -> None:  # type: ignore[no-untyped-def]
    host = f("icelake-sp")  # has SSBD, has no DDPD_U
    d = decide(host, None, host, OperatorSettings(int(SpecCtrl.DDPD_U | SpecCtrl.SSBD), 0, "trust"))
    assert {f.control.name: f.in_hardware for f in d.forced} == {"SSBD": True, "DDPD_U": False}
    assert d.warnings == ("operator forces DDPD_U on, but this host does not have it: modelled only",)
