"""The interface state across a migration, at the level of the pure functions a destination runs: prepare on HELO
(before the source pauses), finish on the final state (after it); the settings a VM carries against the ones a
destination gives; vCPUs that refuse on their own."""

from __future__ import annotations

import copy
import json
from typing import Any

import pytest

from pvmit.catalog.loader import Catalog
from pvmit.derive import Mitigation
from pvmit.errors import InputError
from pvmit.interface import Form, InterfaceConfig, OperatorSettings, VmInterface, check, snapshot
from pvmit.interface.policy import PartialSettings
from pvmit.interface.state import broken_promises, finish, prepare, settings_here, verdict_for
from pvmit.x86.bits import SpecCtrl

R_DIS, B_DIS, IBRS, SSBD = (int(SpecCtrl.RRSBA_DIS_S), int(SpecCtrl.BHI_DIS_S), int(SpecCtrl.IBRS),
                            int(SpecCtrl.SSBD))
CTRL = 0x50000002


@pytest.fixture
def f(catalog: Catalog):  # type: ignore[no-untyped-def]
    return lambda name: catalog.get(name).facts


def helo(f, personality: str = "icelake-sp", vcpus: int = 2, supported: int = 3,  # type: ignore[no-untyped-def]
         settings: OperatorSettings = OperatorSettings(unreported="trust"), reports: tuple[int | None, ...] = (2,),
         host: str = "icelake-sp") -> dict[str, Any]:
    vm = VmInterface(InterfaceConfig(Form.INTEL, supported), f(host), f(personality), settings, vcpus)
    for i, r in enumerate(reports):
        if r is not None:
            assert vm.wrmsr(i, CTRL, r)
    return json.loads(json.dumps(snapshot(vm)))  # as it crosses the wire


# --- HELO, then the final state after the pause ------------------------------------------------------------------

@pytest.mark.parametrize("what,change", [
    ("config", lambda s: s["config"].update(supported=1)),
    ("config", lambda s: s["config"].update(form="neutral")),
    ("personality", lambda s: s["personality"].update(model=0x8F)),
    ("personality", lambda s: s["personality"]["registers"].pop("arch_capabilities")),
    ("settings", lambda s: s["settings"].update(force_off=["RRSBA_DIS_S"])),
    ("settings", lambda s: s["settings"].update(unreported="assume-worst")),
])
def test_a_description_changed_after_helo_is_refused(f, what: str, change) -> None:  # type: ignore[no-untyped-def]
    """The destination decided on HELO; a final state whose configuration, personality or settings differ would
    be taken on decisions made for another VM."""
    first = helo(f)
    prepared = prepare(first, f("sapphirerapids"))
    final = copy.deepcopy(first)
    change(final)
    with pytest.raises(InputError, match="^interface state: the VM's configuration changed after the destination's "
                                         "check$"):
        finish(prepared, final)


def test_only_the_registers_may_change_after_helo(f) -> None:  # type: ignore[no-untyped-def]
    first = helo(f, reports=(2, None))
    prepared = prepare(first, f("sapphirerapids"))
    assert verdict_for(prepared, first).accepted
    final = copy.deepcopy(first)
    final["vcpus"][1].update(ctrl=3, reported=True, spec_ctrl=IBRS)  # vCPU 1 reported, and wrote IBRS, meanwhile
    final["vcpus"][0].update(ctrl=0)
    verdict, vm = finish(prepared, final)
    assert verdict.accepted and vm is not None
    assert (vm.vcpus[0].ctrl, vm.vcpus[0].reported, vm.vcpus[0].spec.mask) == (0, True, 0)
    assert (vm.vcpus[1].ctrl, vm.vcpus[1].spec.guest) == (3, IBRS)
    assert vm.vcpus[1].spec.mask == R_DIS | B_DIS and vm.vcpus[1].spec.effective == R_DIS | B_DIS | IBRS
    assert [c.to_json() for c in verdict.changes] == [{"vcpu": 1, "added": ["RRSBA_DIS_S", "BHI_DIS_S"],
                                                       "released": []}]


def test_finish_refuses_a_final_state_that_does_not_fit(f) -> None:  # type: ignore[no-untyped-def]
    first = helo(f, personality="icelake-sp")
    prepared = prepare(first, f("sapphirerapids"))
    fewer = copy.deepcopy(first)
    fewer["vcpus"].pop()
    with pytest.raises(InputError, match="1 vCPUs, but the VM was described with 2"):
        finish(prepared, fewer)
    bad = copy.deepcopy(first)
    bad["vcpus"][0]["spec_ctrl"] = R_DIS  # Ice Lake shows no RRSBA_CTRL
    with pytest.raises(InputError, match=r"vcpus\[0\].spec_ctrl 0x40 has bits the guest's personality does not"):
        finish(prepared, bad)
    for schema in ("pvmit.interface-state/3", None):
        other = copy.deepcopy(first)
        other["schema"] = schema
        with pytest.raises(InputError, match=f"^interface state: schema {schema!r} is not "
                                             r"'pvmit.interface-state/2' \(or its /1\)$"):
            finish(prepared, other)
    with pytest.raises(InputError, match="^interface state: schema None is not"):
        finish(prepared, [])  # type: ignore[arg-type]


def test_a_refused_final_state_builds_nothing(f) -> None:  # type: ignore[no-untyped-def]
    """Accepted on HELO (nothing reported, trusted); by the pause vCPU 1 reported retpoline, which Cascade Lake
    cannot keep effective: refused after the pause, and no interface is built."""
    first = helo(f, personality="cascadelake-sp", host="cascadelake-sp", supported=0, reports=(None, None))
    prepared = prepare(first, f("cascadelake-sp"))
    assert verdict_for(prepared, first).accepted
    final = copy.deepcopy(first)
    final["config"] = first["config"]
    final["vcpus"][1].update(reported=True, ctrl=0)
    verdict, vm = finish(prepared, final)
    assert verdict.accepted and vm is not None  # reported nothing: fine
    promised = helo(f, personality="cascadelake-sp", host="cascadelake-sp", supported=2, reports=(None, None))
    prepared = prepare(promised, f("cascadelake-sp"))
    verdict, vm = finish(prepared, promised)
    assert not verdict.accepted and vm is None
    assert verdict.reasons[0].startswith("the VM was promised retpoline support (MITIGATION_ENUM bit 1)")


def test_a_final_state_is_checked_whole_before_it_is_decided(f) -> None:  # type: ignore[no-untyped-def]
    """On a host that refuses the VM, a final state with a vCPU too many (or a bit its personality lacks) is still
    refused for what is wrong with it, not with a verdict that names a vCPU the VM does not have."""
    promised = helo(f, personality="cascadelake-sp", host="cascadelake-sp", supported=2, vcpus=1, reports=(None,))
    prepared = prepare(promised, f("cascadelake-sp"))
    assert not verdict_for(prepared, promised).accepted
    more = copy.deepcopy(promised)
    more["vcpus"].append(copy.deepcopy(more["vcpus"][0]))
    with pytest.raises(InputError, match=r"^interface state: 2 vCPUs, but the VM was described with 1$"):
        finish(prepared, more)
    bad = copy.deepcopy(promised)
    bad["vcpus"][0]["spec_ctrl"] = R_DIS  # Cascade Lake shows no RRSBA_CTRL
    with pytest.raises(InputError, match=r"^interface state: vcpus\[0\].spec_ctrl 0x40 has bits the guest's "):
        finish(prepared, bad)


# --- vCPUs refusing on their own ------------------------------------------------------------------------------

def test_an_unreported_vcpu_refuses_a_vm_on_its_own(f) -> None:  # type: ignore[no-untyped-def]
    """vCPU 0 reported that it relies on nothing; vCPU 1 never reported, and its boot personality (Haswell, no
    eIBRS) makes retpoline likely: under assume-worst, Cascade Lake (RRSBA, no RRSBA_DIS_S) is refused for vCPU 1
    alone, and the reason names vCPU 1 only."""
    state = helo(f, personality="haswell-ep", host="haswell-ep", supported=0, reports=(0, None),
                 settings=OperatorSettings(unreported="assume-worst"))
    verdict = check(state, f("cascadelake-sp"))
    assert not verdict.accepted
    assert verdict.reasons and all(r.startswith("vCPU 1: retpoline is ineffective") for r in verdict.reasons)
    assert not verdict.decisions[0].exposures and verdict.decisions[1].exposures
    # with vCPU 1 trusted instead, the same move is accepted, with a warning that names vCPU 1
    trusted = check(state, f("cascadelake-sp"), OperatorSettings(unreported="trust"))
    assert trusted.accepted and any(w.startswith("vCPU 1: guest has not reported") for w in trusted.warnings)


def test_each_vcpu_is_decided_on_its_own_report(f) -> None:  # type: ignore[no-untyped-def]
    state = helo(f, reports=(1, 2), vcpus=3)  # vCPU 0 short loop, 1 retpoline, 2 never reported (trusted)
    verdict = check(state, f("sapphirerapids"))
    assert verdict.accepted
    assert [d.mask for d in verdict.decisions] == [B_DIS, R_DIS, 0]
    assert [d.reported for d in verdict.decisions] == [True, True, False]


def test_broken_promises_name_each_mitigation(f) -> None:  # type: ignore[no-untyped-def]
    assert broken_promises(3, f("sapphirerapids")) == ()
    (why,) = broken_promises(3, f("cascadelake-sp"))
    assert why.startswith("the VM was promised retpoline support (MITIGATION_ENUM bit 1) but this host cannot "
                          "honour it: retpoline is ineffective")
    assert broken_promises(1, f("cascadelake-sp")) == ()
    assert broken_promises(0, f("skylake-sp")) == ()


def test_released_controls_are_said_with_the_reason(f) -> None:  # type: ignore[no-untyped-def]
    vm = VmInterface(InterfaceConfig(Form.INTEL, 3), f("sapphirerapids"), f("icelake-sp"),
                     OperatorSettings(force_on=SSBD, unreported="trust"), 1)
    vm.wrmsr(0, CTRL, 2)
    verdict = check(json.loads(json.dumps(snapshot(vm))), f("icelake-sp"))
    assert verdict.accepted
    assert [c.to_json() for c in verdict.changes] == [{"vcpu": 0, "added": [], "released": ["RRSBA_DIS_S"]}]
    (w,) = [w for w in verdict.warnings if "no longer forced" in w]
    assert w.startswith("vCPU 0: RRSBA_DIS_S is no longer forced: retpoline: effective here")


# --- the settings a VM carries and the ones a destination gives -------------------------------------------------

def test_partial_settings_mirror_cases() -> None:
    """A destination that forces a bit one way drops it from the VM's opposite field, in both directions."""
    carried = OperatorSettings(force_on=SSBD, force_off=R_DIS, unreported="trust")
    on_here = PartialSettings(force_on=R_DIS).over(carried)  # destination forces X on, the VM carries X off
    assert on_here == OperatorSettings(force_on=R_DIS, force_off=0, unreported="trust")
    off_here = PartialSettings(force_off=SSBD).over(carried)  # destination forces X off, the VM carries X on
    assert off_here == OperatorSettings(force_on=0, force_off=SSBD, unreported="trust")
    both = PartialSettings(force_on=B_DIS, force_off=IBRS, unreported="assume-worst").over(carried)
    assert both == OperatorSettings(B_DIS, IBRS, "assume-worst")
    kept = PartialSettings(unreported="assume-worst").over(carried)
    assert kept == OperatorSettings(SSBD, R_DIS, "assume-worst")
    other_bit = PartialSettings(force_on=B_DIS).over(carried)  # a bit the VM does not carry: nothing dropped
    assert other_bit == OperatorSettings(force_on=B_DIS, force_off=R_DIS, unreported="trust")
    assert PartialSettings().over(PartialSettings()) == OperatorSettings()
    assert PartialSettings(force_off=R_DIS).over(PartialSettings(force_on=R_DIS | SSBD)) == \
        OperatorSettings(SSBD, R_DIS, "assume-worst")
    assert not PartialSettings().given and PartialSettings(force_on=0).given
    assert PartialSettings(unreported="trust").given


def test_the_mirror_case_decides_the_migration(f) -> None:  # type: ignore[no-untyped-def]
    """The VM carries RRSBA_DIS_S forced off (an override on its old host); the destination forces it on: on this
    host the guest is protected, and nothing is reported as an override."""
    state = helo(f, settings=OperatorSettings(force_off=R_DIS, unreported="trust"))
    carried_only = check(state, f("sapphirerapids"))
    assert carried_only.accepted and any(e.override for e in carried_only.decisions[0].exposures)
    verdict = check(state, f("sapphirerapids"), PartialSettings(force_on=R_DIS))
    assert verdict.accepted and not any(d.exposures for d in verdict.decisions)
    assert verdict.decisions[0].mask & R_DIS and verdict.decisions[0].value & R_DIS
    assert settings_here(OperatorSettings(force_off=R_DIS), PartialSettings(force_on=R_DIS)).force_off == 0
    assert settings_here(OperatorSettings(force_off=R_DIS), None) == OperatorSettings(force_off=R_DIS)
    whole = OperatorSettings(force_on=SSBD)
    assert settings_here(OperatorSettings(force_off=R_DIS), whole) is whole


def test_partial_settings_refuse_a_bit_both_ways() -> None:
    with pytest.raises(ValueError, match="RRSBA_DIS_S cannot be forced both on and off"):
        PartialSettings(force_on=R_DIS | SSBD, force_off=R_DIS)
    assert PartialSettings(force_on=0, force_off=R_DIS).label() == "force_off RRSBA_DIS_S"
    assert PartialSettings(force_on=R_DIS | SSBD, unreported="trust").label() == \
        "force_on SSBD+RRSBA_DIS_S, unreported trust"
    assert PartialSettings().label() == "-"
    assert PartialSettings(force_on=R_DIS).to_json() == {"force_on": ["RRSBA_DIS_S"], "force_off": None,
                                                        "unreported": None}


def test_prepare_decides_every_report_ahead(f) -> None:  # type: ignore[no-untyped-def]
    prepared = prepare(helo(f, supported=3), f("sapphirerapids"))
    assert set(prepared.decisions) == {None, frozenset(), frozenset({Mitigation.RETPOLINE}),
                                       frozenset({Mitigation.BHB_SHORT}), frozenset(Mitigation)}
    only_bhb = prepare(helo(f, supported=1, reports=(1,)), f("sapphirerapids"))
    assert set(only_bhb.decisions) == {None, frozenset(), frozenset({Mitigation.BHB_SHORT})}
    assert len(prepared.vm.vcpus) == 2 and prepared.promise_reasons == []


@pytest.mark.parametrize("field,value,message", [
    ("spec_ctrl", 1 << 64, "vcpus[0].spec_ctrl must be a 64-bit unsigned integer"),
    ("spec_ctrl", (1 << 64) - 1 + 0.0, "vcpus[0].spec_ctrl must be a 64-bit unsigned integer"),
    ("spec_ctrl", "5", "vcpus[0].spec_ctrl must be a 64-bit unsigned integer"),
    ("spec_ctrl", True, "vcpus[0].spec_ctrl must be a 64-bit unsigned integer"),
    ("spec_ctrl", -1, "vcpus[0].spec_ctrl must be a 64-bit unsigned integer"),
    ("forced_mask", None, "vcpus[0].forced_mask must be a 64-bit unsigned integer"),
    ("reported", 1, "vcpus[0].reported must be true or false"),
])
def test_vcpu_fields_are_checked_by_name(f, field: str, value: object, message: str) -> None:  # type: ignore[no-untyped-def]
    state = helo(f)
    state["vcpus"][0][field] = value
    with pytest.raises(InputError) as e:
        check(state, f("sapphirerapids"))
    assert str(e.value) == f"interface state: {message}"
    state = helo(f)
    state["vcpus"][0]["spec_ctrl"] = (1 << 64) - 1  # the largest 64-bit value parses (and is then refused as bits)
    assert check(state, f("sapphirerapids")).accepted
    state["vcpus"] = []
    with pytest.raises(InputError, match="^interface state: vcpus must be a non-empty list$"):
        check(state, f("sapphirerapids"))


def test_changes_count_only_controls_in_effect(f) -> None:  # type: ignore[no-untyped-def]
    """A control forced off is held, but not added; a forced value outside its mask (a crafted source) was never
    in effect, so it is not released."""
    state = helo(f, host="sapphirerapids")
    state["vcpus"][0].update(forced_mask=0, forced_value=R_DIS)
    verdict = check(state, f("sapphirerapids"), OperatorSettings(force_off=R_DIS | SSBD, unreported="trust"))
    assert verdict.accepted and verdict.changes == ()
    assert all("no longer forced" not in w for w in verdict.warnings)


def test_a_released_operator_control_is_said_too(f) -> None:  # type: ignore[no-untyped-def]
    state = helo(f, settings=OperatorSettings(force_on=SSBD, unreported="trust"), reports=(None,), vcpus=1)
    verdict = check(state, f("sapphirerapids"), OperatorSettings(unreported="trust"))
    assert [c.released for c in verdict.changes] == [("SSBD",)]
    assert "vCPU 0: SSBD is no longer forced: not needed here" in verdict.warnings


def test_check_and_restore_use_the_given_decider_and_settings(f) -> None:  # type: ignore[no-untyped-def]
    from pvmit.interface import decide, restore
    from pvmit.interface.policy import Decision

    asked: list[object] = []

    def counting(host, reliance, personality, settings) -> Decision:  # type: ignore[no-untyped-def]
        asked.append(settings)
        return decide(host, reliance, personality, settings)

    state = helo(f, vcpus=1)
    given = OperatorSettings(force_on=SSBD, unreported="trust")
    check(state, f("sapphirerapids"), given, decider=counting)
    assert asked and all(a == given for a in asked)
    asked.clear()
    verdict, vm = restore(state, f("sapphirerapids"), given, decider=counting)
    assert asked and vm is not None and vm.settings == given and vm.vcpus[0].spec.mask & SSBD


def test_verdict_and_decision_as_json(f) -> None:  # type: ignore[no-untyped-def]
    state = helo(f, vcpus=1, settings=OperatorSettings(force_off=R_DIS, unreported="trust"))
    verdict = check(state, f("sapphirerapids"))
    d = verdict.decisions[0]
    doc = d.to_json()
    assert verdict.to_json() == {
        "accepted": True, "reasons": [], "decisions": [doc], "changes": [],
        "warnings": ["vCPU 0: " + doc["exposures"][0]["reason"],
                     "vCPU 0: operator setting forces RRSBA_DIS_S off: the guest is left exposed (retpoline)"]}
    assert doc == {
        "relied_on": ["retpoline"], "reported": True,
        "forced": [{"control": "RRSBA_DIS_S", "value": 0, "why": "operator setting",
                    "reason": "operator forces RRSBA_DIS_S off", "exists_on_host": True}],
        "mask": R_DIS, "value": 0,
        "exposures": [{"mitigation": "retpoline", "operator_override": True, "reason": doc["exposures"][0]["reason"]}],
        "safe": True, "notes": [], "warnings": list(d.warnings), "assumed_facts": list(d.assumed),
        "exposed_by_policy_design": []}
    assert doc["exposures"][0]["reason"].startswith("the operator forces RRSBA_DIS_S off, which retpoline needs here: "
                                                    "retpoline is ineffective here (")
    refused = check(helo(f, vcpus=1, supported=2), f("cascadelake-sp"))
    assert refused.to_json()["accepted"] is False and refused.to_json()["reasons"] == list(refused.reasons)


def test_partial_settings_labels_and_errors_with_several_bits() -> None:
    with pytest.raises(ValueError, match="^SSBD\\+RRSBA_DIS_S cannot be forced both on and off$"):
        PartialSettings(force_on=R_DIS | SSBD, force_off=R_DIS | SSBD)
    assert PartialSettings(force_off=R_DIS | SSBD).label() == "force_off SSBD+RRSBA_DIS_S"
    assert PartialSettings(force_off=R_DIS | SSBD).to_json()["force_off"] == ["SSBD", "RRSBA_DIS_S"]
    carried = OperatorSettings(force_on=IBRS | SSBD)
    assert PartialSettings(unreported="trust").over(carried) == OperatorSettings(IBRS | SSBD, 0, "trust")


def test_parse_errors_say_exactly_what(f) -> None:  # type: ignore[no-untyped-def]
    host = f("sapphirerapids")
    with pytest.raises(InputError, match="^interface state: not a JSON object$"):
        check([], host)  # type: ignore[arg-type]
    with pytest.raises(InputError,
                       match=r"^interface state: schema 'x/1' is not 'pvmit.interface-state/2' \(or its /1\)$"):
        check({**helo(f), "schema": "x/1"}, host)
    with pytest.raises(InputError, match="^interface state: missing field 'config'$"):
        check({k: v for k, v in helo(f).items() if k != "config"}, host)
    bad = helo(f)
    bad["personality"]["vendor"] = "via"
    with pytest.raises(InputError, match="^interface state: CPU facts: vendor 'via' is not one of"):
        check(bad, host)
    bad = helo(f)
    del bad["vcpus"][1]["ctrl"]
    with pytest.raises(InputError, match="^interface state: missing field 'ctrl'$"):
        check(bad, host)


def test_prepared_holds_what_it_was_made_from(f) -> None:  # type: ignore[no-untyped-def]
    from pvmit.interface import decide
    from pvmit.interface.policy import Decision

    state = helo(f, reports=(2,), vcpus=1)
    host = f("sapphirerapids")
    given = PartialSettings(force_on=SSBD)
    p = prepare(state, host, given)
    assert p.host is host and p.settings == OperatorSettings(force_on=SSBD, unreported="trust")
    assert p.personality.to_json() == state["personality"] and p.config == InterfaceConfig(Form.INTEL, 3)
    assert p.vm_fields == (state["config"], state["personality"], state["settings"])
    no_vcpus = {k: v for k, v in state.items() if k != "vcpus"}
    assert len(prepare(no_vcpus, host).vm.vcpus) == 1

    def forgetful(h, reliance, personality, settings) -> Decision:  # type: ignore[no-untyped-def]
        d = decide(h, reliance, personality, settings)
        return Decision(d.relied, d.reported, (), d.exposures, d.notes, d.warnings, d.assumed)

    verdict, vm = finish(prepare(state, host, decider=forgetful), state)
    assert verdict.accepted and vm is not None
    assert vm.vcpus[0].spec.mask == 0, "the restored core decides with the decider it was prepared with"
